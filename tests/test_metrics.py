"""symfast.metrics against closed forms and independent computations (numpy, scipy, loops)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import symfast
from symfast import metrics as M

scipy = pytest.importorskip("scipy")
from scipy.sparse.csgraph import connected_components  # noqa: E402
from scipy.stats import entropy, ortho_group  # noqa: E402

D64 = torch.float64


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _with_singular_values(s, m, n, seed=0, dtype=D64):
    """U diag(s) V^T with Haar-random orthogonal U, V (scipy)."""
    U = ortho_group.rvs(m, random_state=seed)[:, : len(s)]
    V = ortho_group.rvs(n, random_state=seed + 1)[:, : len(s)]
    return torch.from_numpy(U @ np.diag(s) @ V.T).to(dtype)


# ============================================================================== sparsity, ranks
def test_sparsity_against_numpy():
    g = _g(0)
    a = torch.randn(50, 7, generator=g) * (torch.rand(50, 7, generator=g) > 0.6)
    b = torch.randn(13, generator=g) * 1e-7
    want = (np.abs(a.numpy()) < 1e-6).sum() + 13
    assert M.sparsity({"a": a, "b": b}) == pytest.approx(want / (350 + 13))
    assert M.sparsity(a, tol=0.5) == pytest.approx((np.abs(a.numpy()) < 0.5).mean())
    lin = nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight[0] = 0
    assert M.sparsity(lin) == pytest.approx(4 / 15)
    with pytest.raises(ValueError, match="no entries"):
        M.sparsity(torch.zeros(0))


@pytest.mark.parametrize("dtype", [torch.float32, D64])
def test_numerical_rank_against_numpy(dtype):
    g = _g(1)
    for m, n, r in ((20, 30, 7), (15, 15, 15), (40, 10, 1)):
        A = (torch.randn(m, r, generator=g, dtype=D64) @ torch.randn(r, n, generator=g, dtype=D64)).to(dtype)
        assert M.numerical_rank(A) == np.linalg.matrix_rank(A.numpy()) == r
    assert M.numerical_rank(torch.zeros(3, 4)) == 0
    # conv weights are viewed as [out, -1]
    W = torch.randn(6, 2, 3, 3, generator=g)
    assert M.numerical_rank(W) == np.linalg.matrix_rank(W.reshape(6, -1).numpy())


def test_effective_rank_closed_form():
    s = np.array([5.0, 3.0, 1.0, 0.5, 0.0])
    A = _with_singular_values(s, 8, 6)
    assert M.effective_rank(A) == pytest.approx(math.exp(entropy(s / s.sum())), rel=1e-10)
    # k equal singular values: exactly k
    assert M.effective_rank(_with_singular_values(np.ones(4), 7, 9, seed=3)) == pytest.approx(4.0, rel=1e-10)
    assert M.effective_rank(torch.zeros(3, 3)) == 0.0


def test_approximate_and_stable_rank_closed_form():
    s = np.array([10.0, 5.0, 3.0, 1.0, 0.5, 0.3, 0.2])  # sum 20
    A = _with_singular_values(s, 9, 8, seed=5)
    cum = np.cumsum(s) / s.sum()
    for t in (0.5, 0.9, 0.99, 1.0):
        want = int(np.argmax(cum >= t - 1e-12)) + 1
        assert M.approximate_rank(A, threshold=t) == want
    assert M.approximate_rank(A) == 6  # 19.8 / 20 = 0.99 exactly at k = 6
    assert M.stable_rank(A) == pytest.approx((s ** 2).sum() / 100.0, rel=1e-10)
    An = A.numpy()
    assert M.stable_rank(A) == pytest.approx(np.linalg.norm(An, "fro") ** 2 / np.linalg.norm(An, 2) ** 2, rel=1e-10)
    r = M.rank_metrics(A)
    assert r == {"numerical_rank": 7, "effective_rank": pytest.approx(M.effective_rank(A)), "approximate_rank": 6,
                 "stable_rank": pytest.approx(M.stable_rank(A))}
    with pytest.raises(ValueError, match="threshold must be in"):
        M.approximate_rank(A, threshold=0)
    with pytest.raises(ValueError, match=r"M must be a matrix.*got shape \(5,\)"):
        M.effective_rank(torch.ones(5))


# ============================================================================== homogeneity
def _block_neurons(sizes=(5, 4, 3), singles=4, dim=40, noise=0.05, seed=0):
    g = _g(seed)
    rows, labels = [], []
    for b, k in enumerate(sizes):
        base = torch.randn(dim, generator=g, dtype=D64)
        for _ in range(k):
            rows.append(base + noise * torch.randn(dim, generator=g, dtype=D64))
            labels.append(b)
    for j in range(singles):
        rows.append(torch.randn(dim, generator=g, dtype=D64))
        labels.append(len(sizes) + j)
    perm = torch.randperm(len(rows), generator=g)
    return torch.stack(rows)[perm], torch.tensor(labels)[perm]


def test_homogeneity_blocks_on_constructed_neurons():
    X, truth = _block_neurons()
    h = M.homogeneity(X)
    assert h.block_count == 3 and h.block_sizes == [5, 4, 3]
    # the partition equals the constructed blocks (labels up to renaming)
    for a in range(len(truth)):
        for b in range(len(truth)):
            assert (h.labels[a] == h.labels[b]) == (truth[a] == truth[b])
    # against numpy's correlation and scipy's connected components
    C = np.corrcoef(X.numpy())
    torch.testing.assert_close(h.correlation, torch.from_numpy(C)[h.order][:, h.order])
    n_comp, lab = connected_components(C >= 0.9, directed=False)
    assert n_comp == len(set(h.labels.tolist()))
    # sorted by the top eigenvector of C (sign fixed to sum >= 0)
    w, V = np.linalg.eigh(C)
    v = V[:, -1] * np.sign(V[:, -1].sum())
    assert np.all(np.diff(v[h.order.numpy()]) >= 0)
    # the largest block has the largest top-eigenvector entries: it ends the order, contiguous
    big = truth[h.order[-5:]]
    assert (big == big[0]).all() and (truth == big[0]).sum() == 5


def test_homogeneity_block_count_matches_scipy_on_random_graphs():
    g = _g(7)
    for trial in range(3):
        X = torch.randn(30, 6, generator=g, dtype=D64)  # few features: many high correlations
        h = M.homogeneity(X, corr_threshold=0.6, min_block_size=1)
        n_comp, _ = connected_components(np.corrcoef(X.numpy()) >= 0.6, directed=False)
        assert h.block_count == n_comp


def test_homogeneity_near_identical_against_brute_force():
    g = _g(3)
    base = torch.randn(6, 10, generator=g, dtype=D64)
    X = torch.cat([base, base[:2] * 1.05, base[2:3] + 0.5 * torch.randn(10, generator=g, dtype=D64), torch.zeros(2, 10, dtype=D64)])
    h = M.homogeneity(X)
    n = X.shape[0]
    close = np.zeros((n, n), bool)
    for i in range(n):
        for j in range(n):
            if i != j:
                a, b = X[i].numpy(), X[j].numpy()
                den = a @ a + b @ b
                d = 0.0 if den == 0 else 2 * np.sum((a - b) ** 2) / den
                close[i, j] = d < 0.1
    assert h.near_identical_fraction == pytest.approx(close.any(1).mean())
    assert h.near_identical_pair_fraction == pytest.approx(close.sum() / 2 / (n * (n - 1) / 2))
    # base[0], base[1], their two scaled copies and the two zero neurons
    assert close.any(1).sum() == 6


def test_homogeneity_from_activations():
    # neurons 0-2 are copies (same incoming weights), neuron 3 is anti-aligned: the activation
    # correlation groups 0-2
    g = _g(5)
    W = torch.randn(6, 8, generator=g, dtype=D64)
    W[1] = W[0] * 2
    W[2] = W[0] * 0.5
    x = torch.randn(500, 8, generator=g, dtype=D64)
    acts = torch.tanh(x @ W.T)
    h = M.homogeneity(W, activations=acts)
    assert h.block_count == 1 and h.block_sizes == [3]
    torch.testing.assert_close(h.correlation, torch.from_numpy(np.corrcoef(acts.numpy().T))[h.order][:, h.order])
    with pytest.raises(ValueError, match=r"activations must have shape \[samples, 6\]"):
        M.homogeneity(W, activations=acts.T)


# ============================================================================== neurons, units, gradients
def test_vanishing_neurons():
    lin = nn.Linear(5, 4)
    nxt = nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight[1] = 0
        lin.bias[1] = 0
        lin.weight[2] = 0  # bias of unit 2 stays: not vanishing
        nxt.weight[:, 3] = 0
    assert M.vanishing_neurons(lin).tolist() == [False, True, False, False]
    assert M.vanishing_neurons(lin.weight).tolist() == [False, True, True, False]
    with torch.no_grad():
        lin.weight[3] = 0
        lin.bias[3] = 0
    # with the outgoing weights, unit 1 is alive (its outgoing column is not zero); unit 3 vanishes
    assert M.vanishing_neurons(lin, outgoing=nxt.weight).tolist() == [False, False, False, True]
    with pytest.raises(ValueError, match=r"outgoing must have shape \[out, 4, \.\.\.\]"):
        M.vanishing_neurons(lin, outgoing=nxt.weight.T)


def test_dormant_units_closed_form():
    acts = torch.tensor([[1.0, 0.0, 0.02, -2.0], [3.0, 0.0, -0.02, 2.0]])
    # mean |h| = [2, 0, 0.02, 2]; average 1.005; scores [1.99, 0, 0.0199, 1.99]
    assert M.dormant_units(acts).tolist() == [False, True, True, False]
    assert M.dormant_units(acts, tau=0.0).tolist() == [False, True, False, False]
    conv = torch.zeros(2, 3, 4, 4)
    conv[:, 0] = 1
    assert M.dormant_units(conv, unit_dim=1).tolist() == [False, True, True]
    assert M.dormant_units(torch.zeros(5, 2)).all()


def _dead_model():
    """A ReLU unit that never fires (its incoming weights and bias get no gradient), and a DCS
    factor pair at w_i = u_i = 0 (zero gradient by Theorem 1)."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 4)
    with torch.no_grad():
        lin.weight[2] = 0.0
        lin.bias[2] = -10.0
    w = torch.randn(4, dtype=torch.float32)
    u = torch.randn(4, dtype=torch.float32)
    w[1] = u[1] = 0.0
    params = {"lin.weight": lin.weight.detach(), "lin.bias": lin.bias.detach(), "w": w, "u": u}

    def loss_fn(p, b):
        x, y = b
        h = F.relu(x @ p["lin.weight"].T + p["lin.bias"])
        return (h @ symfast.dcs(p["w"], p["u"]) - y) ** 2

    expected = {"lin.weight": torch.zeros(4, 3, dtype=torch.bool), "lin.bias": torch.zeros(4, dtype=torch.bool),
                "w": torch.zeros(4, dtype=torch.bool), "u": torch.zeros(4, dtype=torch.bool)}
    expected["lin.weight"][2] = True
    expected["lin.bias"][2] = True
    expected["w"][1] = expected["u"][1] = True
    # w_2, u_2 multiply the dead unit's output: their gradient vanishes too
    expected["w"][2] = expected["u"][2] = True
    # and unit 1's outgoing weight theta_1 = w_1 u_1 is 0: its incoming weights get no gradient
    expected["lin.weight"][1] = True
    expected["lin.bias"][1] = True
    return loss_fn, params, expected


def test_dead_parameters_on_constructed_model():
    loss_fn, params, expected = _dead_model()
    g = _g(1)
    batch = (torch.randn(20, 3, generator=g), torch.randn(20, generator=g))
    mag = M.gradient_magnitude(loss_fn, params, batch, chunk_size=7)
    dead = M.dead_parameters(mag)
    for k in expected:
        assert torch.equal(dead.mask[k], expected[k]), k
    assert dead.count == 6 + 2 + 2 + 2 and dead.total == 12 + 4 + 4 + 4
    assert dead.fraction == pytest.approx(12 / 24)
    # the per-sample maximum against a loop over torch.autograd.grad
    oracle = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(20):
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        (l,) = loss_fn(p, (batch[0][i:i + 1], batch[1][i:i + 1]))
        for k, gk in zip(p, torch.autograd.grad(l, list(p.values()))):
            oracle[k] = torch.maximum(oracle[k], gk.abs())
    for k in oracle:
        torch.testing.assert_close(mag[k], oracle[k])
    mean = M.gradient_magnitude(loss_fn, params, batch, per_sample=False)
    assert all((mean[k] <= mag[k] + 1e-6).all() for k in mag)
    # from a module's .grad
    lin = nn.Linear(3, 2)
    lin(torch.randn(4, 3))[:, 0].sum().backward()
    d = M.dead_parameters(lin)
    assert d.mask["weight"][1].all() and not d.mask["weight"][0].any() and d.mask["bias"].tolist() == [False, True]
    with pytest.raises(ValueError, match=r"gradient_magnitude: loss_fn\(params, batch\) must return per-sample losses of shape \[B\] = \[20\], got shape \(\)"):
        M.gradient_magnitude(lambda p, b: loss_fn(p, b).mean(), params, batch)


# ============================================================================== rank and neuron metrics: bad input and empty layers
_RANK_FNS = [M.singular_values, M.numerical_rank, M.effective_rank, M.approximate_rank, M.stable_rank, M.rank_metrics]


@pytest.mark.parametrize("fn", _RANK_FNS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_rank_metrics_reject_non_finite_matrices(fn, bad):
    A = torch.eye(4, dtype=D64)
    A[0, 1] = A[2, 3] = bad
    with pytest.raises(ValueError, match=rf"{fn.__name__}: M must be finite, got 2 non-finite entries"):
        fn(A)


def test_neuron_metrics_reject_nan():
    x = torch.zeros(3, 4)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"sparsity: x must be finite, got 1 non-finite"):
        M.sparsity(x)
    with pytest.raises(ValueError, match=r"sparsity: x\['w'\] must be finite, got 1 non-finite"):
        M.sparsity({"w": x})
    with pytest.raises(ValueError, match=r"vanishing_neurons: incoming must be finite, got 1 non-finite"):
        M.vanishing_neurons(x)
    with pytest.raises(ValueError, match=r"vanishing_neurons: outgoing must be finite, got 1 non-finite"):
        M.vanishing_neurons(torch.zeros(4, 2), outgoing=x)
    with pytest.raises(ValueError, match=r"dormant_units: activations must be finite, got 1 non-finite"):
        M.dormant_units(x)


@pytest.mark.parametrize("shape", [(0, 4), (3, 0), (0, 2, 3)])
def test_empty_layers_have_defined_metrics(shape):
    W = torch.zeros(shape)
    n = shape[0]
    # an empty matrix has no singular values and rank 0 (numpy agrees on the rank)
    assert M.singular_values(W).shape == (0,)
    assert M.numerical_rank(W) == np.linalg.matrix_rank(np.zeros((n, math.prod(shape[1:])))) == 0
    assert M.rank_metrics(W) == {"numerical_rank": 0, "effective_rank": 0.0, "approximate_rank": 0, "stable_rank": 0.0}
    assert M.effective_rank(W) == 0.0 and M.approximate_rank(W) == 0 and M.stable_rank(W) == 0.0
    # n neurons without parameters have norm 0 < tol: all vanish
    assert M.vanishing_neurons(W).tolist() == [True] * n
    h = M.homogeneity(W)
    assert h.block_count == 0 if n == 0 else h.correlation.shape == (n, n)
    assert M.dormant_units(torch.zeros(5, 0)).shape == (0,)


def test_dormant_units_refuse_zero_samples():
    with pytest.raises(ValueError, match=r"dormant_units: activations has no samples \(shape \(0, 4\)"):
        M.dormant_units(torch.zeros(0, 4))
