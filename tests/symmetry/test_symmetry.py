"""symfast.symmetry: mirrors, their constructors, verify, find_symmetries and stationary_report.

Oracles are independent of the code under test: dense formulas (I - 2 O O^T), eq. 5 written
out, SVD (Theorem 2), per-sample gradients from a Python loop over torch.autograd.grad, dense
Hessians from torch.autograd.functional.hessian, and eq. 6's closed form.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import symfast
from symfast import symmetry as S

D64 = torch.float64


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, dtype=D64):
    return torch.randn(*shape, generator=_g(seed), dtype=D64).to(dtype)


def _orthonormal(D, k, seed=0):
    q, _ = torch.linalg.qr(_randn(D, k, seed=seed))
    return q


def _loop_grads(loss_fn, params, batch, B):
    """Per-sample gradients by a plain loop over torch.autograd.grad (the oracle for vmap)."""
    out = []
    for i in range(B):
        p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        sample = tuple(t[i:i + 1] for t in batch)
        (l,) = loss_fn(p, sample)
        gs = torch.autograd.grad(l, list(p.values()), allow_unused=True)
        out.append({k: (g if g is not None else torch.zeros_like(p[k])) for k, g in zip(p, gs)})
    return out


# ============================================================================== Mirror
def test_mirror_dense_formulas():
    D, k = 9, 3
    O = _orthonormal(D, k)
    m = S.Mirror(O)
    th = _randn(D, seed=1)
    P = O @ O.T
    I = torch.eye(D, dtype=D64)
    torch.testing.assert_close(m.projection, P)
    torch.testing.assert_close(m.reflect(th), (I - 2 * P) @ th)
    torch.testing.assert_close(m.symmetric_solution(th), (I - P) @ th)
    torch.testing.assert_close(m.condition(th), O.T @ th)
    torch.testing.assert_close(m.project(th), P @ th)
    torch.testing.assert_close(m.reflect(m.reflect(th)), th)
    torch.testing.assert_close(m.condition(m.symmetric_solution(th)), torch.zeros(k, dtype=D64), atol=1e-14, rtol=0)
    # leading batch dims
    ths = _randn(4, 2, D, seed=2)
    torch.testing.assert_close(m.reflect(ths), ths @ (I - 2 * P).T)
    assert m.rank == k and m.dim == D


def test_mirror_rejects_non_orthonormal_O():
    O = _orthonormal(6, 2)
    O[:, 1] *= 1.3
    with pytest.raises(ValueError, match=r"Mirror: O must have orthonormal columns.*max \|O\^T O - I\| = 0\.69"):
        S.Mirror(O)
    with pytest.raises(ValueError, match=r"O must have shape \(D, k\)"):
        S.Mirror(torch.zeros(2, 2, 2))
    with pytest.raises(TypeError, match="O must be a torch.Tensor"):
        S.Mirror([[1.0], [0.0]])
    with pytest.raises(ValueError, match="O has 6 rows but params has 5 entries"):
        S.Mirror(_orthonormal(6, 2), params={"a": torch.zeros(5)})


def test_mirror_from_projection():
    O = _orthonormal(7, 3, seed=3)
    P = O @ O.T
    m = S.Mirror.from_projection(P)
    assert m.rank == 3
    torch.testing.assert_close(m.projection, P)
    with pytest.raises(ValueError, match=r"P must be an orthogonal projection.*max \|P - P\^T\| = .*max \|P @ P - P\|"):
        S.Mirror.from_projection(P + 0.1 * torch.triu(torch.ones(7, 7, dtype=D64), 1))
    with pytest.raises(ValueError, match=r"P @ P - P\| = 0\.19"):
        S.Mirror.from_projection(1.2 * P)
    with pytest.raises(ValueError, match=r"square matrix \(D, D\), got \(3, 4\)"):
        S.Mirror.from_projection(torch.zeros(3, 4))


def test_mirror_on_dicts_follows_documented_flat_order():
    params = {"a": _randn(2, 3, seed=1), "b": _randn(4, seed=2), "c": _randn(1, 2, seed=3)}
    flat = S.flatten(params)
    assert flat.shape == (12,)
    torch.testing.assert_close(flat[:6], params["a"].reshape(-1))
    O = _orthonormal(12, 4, seed=5)
    m = S.Mirror(O, params=params)
    out = m.reflect(params)
    torch.testing.assert_close(S.flatten(out), m.reflect(flat))
    # the dict's own order does not matter; unknown keys pass through
    shuffled = {"c": params["c"], "x": torch.ones(3), "a": params["a"], "b": params["b"]}
    out2 = m.reflect(shuffled)
    for k in params:
        torch.testing.assert_close(out2[k], out[k])
    assert out2["x"] is shuffled["x"]
    torch.testing.assert_close(S.unflatten(flat, params)["b"], params["b"])
    with pytest.raises(KeyError, match=r"theta is missing parameter 'b' \(expected shape \(4,\)\)"):
        m.reflect({"a": params["a"], "c": params["c"]})
    with pytest.raises(ValueError, match=r"theta\['a'\] must have shape \(2, 3\), got \(3, 2\)"):
        m.condition({**params, "a": params["a"].T})
    with pytest.raises(ValueError, match=r"theta must have shape \(\.\.\., 12\).*got \(11,\)"):
        m.reflect(flat[:11])
    with pytest.raises(TypeError, match="built from a flat O without parameter names"):
        S.Mirror(O).reflect(params)


def test_sparse_mirror_matches_eq5_and_with_layout():
    d = 4
    params = {"t1": _randn(d, seed=1), "t2": _randn(d, seed=2), "z": _randn(3, seed=3)}
    m = S.permutation_mirror(params, "t1", "t2")
    # eq. 5: P = 1/2 [[I, -I], [-I, I]] on (t1, t2), zero on z
    I = torch.eye(d, dtype=D64)
    P = torch.zeros(11, 11, dtype=D64)
    P[:8, :8] = 0.5 * torch.cat([torch.cat([I, -I], 1), torch.cat([-I, I], 1)])
    torch.testing.assert_close(m.projection, P)
    torch.testing.assert_close(m.condition(params), (params["t1"] - params["t2"]) / math.sqrt(2))
    r = m.reflect(params)
    torch.testing.assert_close(r["t1"], params["t2"])
    torch.testing.assert_close(r["t2"], params["t1"])
    assert r["z"] is params["z"]
    # placing the mirror in a larger layout keeps it the same mirror
    big = {"w": torch.zeros(5, dtype=D64), **params}
    mb = m.with_layout(big)
    torch.testing.assert_close(S.flatten(mb.reflect(big))[5:], S.flatten(r))
    assert mb.dim == 16
    with pytest.raises(ValueError, match="a and b must select distinct entries"):
        S.rescaling_mirror(params, "t1", ("t1", slice(0, 2)))
    with pytest.raises(ValueError, match=r"same \(nonzero\) number of entries; got 4 \(a\) and 3 \(b\)"):
        S.permutation_mirror(params, "t1", "z")
    with pytest.raises(KeyError, match="names parameter 'nope'"):
        S.permutation_mirror(params, "nope", "t1")
    with pytest.raises(IndexError, match=r"does not index parameter 't1' of shape \(4,\)"):
        S.permutation_mirror(params, ("t1", 7), ("t2", 0))


# ============================================================================== constructors
def _check_theorem4_part1(loss_fn, params, mirror, batch, B, *, generic_min=1e-3):
    """The loss is invariant under R, and at the symmetric solution every per-sample gradient has
    O^T grad = 0 (Theorem 4 part 1), while at the generic point it does not."""
    res = S.verify(loss_fn, params, mirror, [batch])
    assert res.passed and not res.vacuous and bool(res), str(res)
    sym = mirror.symmetric_solution(params)
    assert mirror.condition(sym).abs().max() < 1e-12
    for g in _loop_grads(loss_fn, sym, batch, B):
        gn = S.flatten(g).norm()
        assert mirror.condition(g).norm() <= 1e-12 * max(gn.item(), 1.0)
    generic = max(mirror.condition(g).norm().item() for g in _loop_grads(loss_fn, params, batch, B))
    assert generic > generic_min  # the check above can fail


def test_rescaling_sign_mirror():
    # l(u, w) depends on u and w only through (u.x1) (w.x2): rescaling symmetry (rho u, w / rho)
    B = 6
    x1, x2, y = _randn(B, 3, seed=1), _randn(B, 4, seed=2), _randn(B, seed=3)

    def loss_fn(p, b):
        x1, x2, y = b
        return ((x1 @ p["u"]) * (x2 @ p["w"]) + x1.sum(1) * p["c"] - y) ** 2 + 0.1 * (p["u"] ** 2).sum()

    params = {"u": _randn(3, seed=4), "w": _randn(4, seed=5), "c": _randn((), seed=6)}
    m = S.rescaling_mirror(params, "u", "w", kind="sign")
    assert m.rank == 7
    r = m.reflect(params)
    torch.testing.assert_close(r["u"], -params["u"])
    torch.testing.assert_close(r["w"], -params["w"])
    _check_theorem4_part1(loss_fn, params, m, (x1, x2, y), B)
    # the sign mirror's symmetric solution is u = w = 0 (Theorem 1 part 1)
    sym = m.symmetric_solution(params)
    assert sym["u"].abs().max() == 0 and sym["w"].abs().max() == 0


@pytest.mark.parametrize("kind", ["swap", "antiswap"])
def test_rescaling_pair_mirrors_dcs(kind):
    # theta = w * u through the fused DCS op: every (w_i, u_i) pair has the mirrors n2 = (1, -1)
    # (swap, condition w = u) and n1 = (1, 1) (antiswap w -> -u, condition w = -u)
    B, d = 8, 5
    x, y = _randn(B, d, seed=1), _randn(B, seed=2)

    def loss_fn(p, b):
        x, y = b
        return (x @ symfast.dcs(p["w"], p["u"]) - y) ** 2

    params = {"w": _randn(d, seed=3), "u": _randn(d, seed=4)}
    m = S.rescaling_mirror(params, "w", "u", kind=kind)
    r = m.reflect(params)
    s = 1 if kind == "swap" else -1
    torch.testing.assert_close(r["w"], s * params["u"])
    torch.testing.assert_close(r["u"], s * params["w"])
    _check_theorem4_part1(loss_fn, params, m, (x, y), B)
    sym = m.symmetric_solution(params)
    torch.testing.assert_close(sym["w"], s * sym["u"])


def test_rescaling_pair_mirror_is_not_a_symmetry_without_the_product():
    # theta = w * u + w breaks the swap symmetry: verify must fail
    x, y = _randn(6, 3, seed=1), _randn(6, seed=2)

    def loss_fn(p, b):
        x, y = b
        return (x @ (p["w"] * p["u"] + p["w"]) - y) ** 2

    params = {"w": _randn(3, seed=3), "u": _randn(3, seed=4)}
    res = S.verify(loss_fn, params, S.rescaling_mirror(params, "w", "u", kind="swap"), [(x, y)])
    assert not res.passed and res.relative_deviation > 1e-3
    with pytest.raises(ValueError, match="same number of entries; got 3 \\(a\\) and 2 \\(b\\)"):
        S.rescaling_mirror(params, "w", ("u", slice(0, 2)), kind="swap")
    with pytest.raises(ValueError, match="kind must be 'sign', 'swap' or 'antiswap'"):
        S.rescaling_mirror(params, "w", "u", kind="flip")


def _mlp_loss(act):
    def loss_fn(p, b):
        x, y = b
        h = act(x @ p["W1"].T + p["b1"])
        return ((h @ p["W2"].T + p["b2"] - y) ** 2).sum(1)

    return loss_fn


def _mlp_params(i=3, h=5, o=2, seed=0):
    return {"W1": _randn(h, i, seed=seed), "b1": _randn(h, seed=seed + 1), "W2": _randn(o, h, seed=seed + 2),
            "b2": _randn(o, seed=seed + 3)}


def test_permutation_mirror_hidden_units():
    B = 7
    batch = (_randn(B, 3, seed=10), _randn(B, 2, seed=11))
    params = _mlp_params()
    loss_fn = _mlp_loss(torch.tanh)
    m = S.unit_permutation_mirror(params, ["W1", "b1"], ["W2"], 1, 3)
    r = m.reflect(params)
    torch.testing.assert_close(r["W1"][[1, 3]], params["W1"][[3, 1]])
    torch.testing.assert_close(r["W2"][:, [1, 3]], params["W2"][:, [3, 1]])
    _check_theorem4_part1(loss_fn, params, m, batch, B)
    # Theorem 3 part 1: at theta_a = theta_b the two neurons get equal gradients
    sym = m.symmetric_solution(params)
    torch.testing.assert_close(sym["W1"][1], sym["W1"][3])
    for g in _loop_grads(loss_fn, sym, batch, B):
        torch.testing.assert_close(g["W1"][1], g["W1"][3], atol=1e-12, rtol=0)
        torch.testing.assert_close(g["W2"][:, 1], g["W2"][:, 3], atol=1e-12, rtol=0)


def test_unit_sign_mirror_linear_vs_relu():
    B = 6
    batch = (_randn(B, 3, seed=1), _randn(B, 2, seed=2))
    params = _mlp_params()
    m = S.unit_sign_mirror(params, ["W1", "b1"], ["W2"], 2)
    _check_theorem4_part1(_mlp_loss(lambda t: t), params, m, batch, B)
    assert S.verify(_mlp_loss(torch.tanh), params, m, [batch]).passed  # odd activation
    assert not S.verify(_mlp_loss(torch.relu), params, m, [batch]).passed


def test_single_rotation_mirror_theorem2():
    # l depends on W only through W^T W (here |W x|^2 and |W|^2): l(Omega W) = l(W) for orthogonal
    # Omega acting on the rows (eq. 3)
    B = 6
    x, y = _randn(B, 4, seed=1), _randn(B, seed=2)

    def loss_fn(p, b):
        x, y = b
        z = x @ p["W"].T
        return ((z ** 2).sum(1) - y) ** 2 + 0.01 * p["W"].pow(2).sum()

    params = {"W": _randn(3, 4, seed=3)}
    m = S.rotation_mirror(params, ("W", 0))  # default: the least-used left singular direction
    assert m.rank == 4  # one constraint n^T W[:, c] per column c
    _check_theorem4_part1(loss_fn, params, m, (x, y), B)
    # Theorem 2 part 2: the symmetric solution is W with its smallest singular value set to zero
    U, s, Vh = torch.linalg.svd(params["W"], full_matrices=False)
    s0 = s.clone()
    s0[-1] = 0
    sym = m.symmetric_solution(params)
    torch.testing.assert_close(sym["W"], U @ torch.diag(s0) @ Vh)
    # with an explicit direction: reflect = (I - 2 n n^T) W
    n2 = _randn(3, seed=9)
    n2 = n2 / n2.norm()
    m2 = S.rotation_mirror(params, ("W", 0), n2)
    torch.testing.assert_close(m2.reflect(params)["W"], (torch.eye(3, dtype=D64) - 2 * torch.outer(n2, n2)) @ params["W"])
    _check_theorem4_part1(loss_fn, params, m2, (x, y), B)
    # a rotation of the columns is not a symmetry of this loss
    n4 = torch.ones(4, dtype=D64) / 2
    assert not S.verify(loss_fn, params, S.rotation_mirror(params, ("W", 1), n4), [(x, y)]).passed
    with pytest.raises(ValueError, match=r"directions must have orthonormal columns; got max \|N\^T N - I\|"):
        S.rotation_mirror(params, ("W", 0), 2 * n2)
    with pytest.raises(ValueError, match=r"directions must have shape \(3,\) or \(3, r\)"):
        S.rotation_mirror(params, ("W", 0), n4)


def test_double_rotation_mirror_linear_factorization():
    B = 8
    x, y = _randn(B, 4, seed=1), _randn(B, 3, seed=2)

    def loss_fn(p, b):
        x, y = b
        return ((x @ p["W"].T + p["b"]) @ p["U"].T - y).pow(2).sum(1)

    params = {"W": _randn(5, 4, seed=3), "b": _randn(5, seed=4), "U": _randn(3, 5, seed=5)}
    n = _orthonormal(5, 2, seed=6)
    m = S.double_rotation_mirror(params, "U", ["W", ("b", 0)], n)
    R = torch.eye(5, dtype=D64) - 2 * n @ n.T
    r = m.reflect(params)
    torch.testing.assert_close(r["U"], params["U"] @ R)
    torch.testing.assert_close(r["W"], R @ params["W"])
    torch.testing.assert_close(r["b"], R @ params["b"])
    _check_theorem4_part1(loss_fn, params, m, (x, y), B)
    sym = m.symmetric_solution(params)
    assert (sym["U"] @ n).abs().max() < 1e-12 and (n.T @ sym["W"]).abs().max() < 1e-12
    # a rotation is not a symmetry through a nonlinearity
    assert not S.verify(_mlp_loss(torch.tanh), _mlp_params(4, 5, 3),
                        S.double_rotation_mirror(_mlp_params(4, 5, 3), "W2", ["W1", ("b1", 0)], n), [(x, y)]).passed


# ============================================================================== verify
def test_verify_reports_and_tolerance():
    x, y = _randn(5, 3, seed=1), _randn(5, seed=2)
    params = {"w": _randn(3, seed=3), "u": _randn(3, seed=4)}
    m = S.rescaling_mirror(params, "w", "u", kind="sign")

    def sym_loss(p, b):
        return (b[0] @ (p["w"] * p["u"]) - b[1]) ** 2

    res = S.verify(sym_loss, params, m, [(x, y), (x[:2], y[:2])])
    assert res.passed and res.n_samples == 7 and res.n_batches == 2 and res.rtol == 1e-9
    assert "PASS" in str(res)
    # a relative asymmetry of ~1e-3 is caught at the default float64 tolerance
    res = S.verify(lambda p, b: sym_loss(p, b) + 1e-3 * p["w"].sum(), params, m, [(x, y)])
    assert not res.passed and not res
    # vacuous when theta is already on the condition
    res = S.verify(sym_loss, m.symmetric_solution(params), m, [(x, y)])
    assert res.passed and res.vacuous and not res
    with pytest.raises(ValueError, match=r"verify: loss_fn\(params, batch\) must return per-sample losses of shape \[B\] = \[5\], got shape \(\) \(a scalar"):
        S.verify(lambda p, b: sym_loss(p, b).mean(), params, m, [(x, y)])
    with pytest.raises(ValueError, match=r"shape \[B\] = \[5\].*got shape \(4,\)"):
        S.verify(lambda p, b: sym_loss(p, b)[:4], params, m, [(x, y)])
    with pytest.raises(ValueError, match="batches is empty"):
        S.verify(sym_loss, params, m, [])


# ============================================================================== find_symmetries
class DuckDCSLinear(nn.Module):
    """A DCS layer as symfast.nn will provide it, duck-typed: theta = (1 - m) v + m w u."""

    def __init__(self, i, o, mask, seed=0):
        super().__init__()
        g = _g(seed)
        self.in_features, self.out_features = i, o
        self.w = nn.Parameter(torch.randn(o, i, generator=g))
        self.u = nn.Parameter(torch.randn(o, i, generator=g))
        self.v = nn.Parameter(torch.randn(o, i, generator=g))
        self.bias = nn.Parameter(torch.randn(o, generator=g))
        self.register_buffer("mask", mask)

    @property
    def weight(self):
        return symfast.dcs(self.w, self.u, self.v, self.mask)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def _found(report):
    return {(f.kind, f.modules) for f in report.found}


def _rejected(report):
    return {(f.kind, f.modules) for f in report.rejected}


def _output_loss(model):
    def loss_fn(p, b):
        return functional_call(model, p, (b,)).pow(2).flatten(1).sum(1)
    return loss_fn


def test_find_symmetries_mlp_chain():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3), nn.Linear(3, 2))
    x = torch.randn(16, 4)
    rep = S.find_symmetries(model, x)
    assert _found(rep) == {
        ("permutation", ("0", "2")), ("permutation", ("2", "4")), ("permutation", ("4", "5")),
        ("sign", ("2", "4")),            # tanh is odd
        ("sign", ("4", "5")), ("rotation", ("4", "5")),  # linear bottleneck: rescaling and rotation
    }
    assert _rejected(rep) == {("sign", ("0", "2")), ("rotation", ("0", "2")), ("rotation", ("2", "4"))}
    assert all(len(f.checks) >= 2 for f in rep.checked)
    assert "rejected" in str(rep)
    # every reported mirror is a symmetry of a loss on the outputs, independently verified here;
    # every rejected one is not
    params = {k: v.detach() for k, v in model.named_parameters()}
    xb = torch.randn(32, 4)
    for f in rep.found:
        assert S.verify(_output_loss(model), params, f.mirror, [xb]).passed, f.description
    for f in rep.rejected:
        assert not S.verify(_output_loss(model), params, f.mirror, [xb]).passed, f.description
    perm = next(f for f in rep.found if f.modules == ("0", "2"))
    other = perm.build(2, 5)
    r = other.reflect(params)
    torch.testing.assert_close(r["0.weight"][[2, 5]], params["0.weight"][[5, 2]])
    assert model.training  # mode restored


def test_find_symmetries_layernorm_between_and_dcs_layer():
    torch.manual_seed(0)
    mask = torch.rand(5, 4, generator=_g(1)) > 0.3
    model = nn.Sequential(DuckDCSLinear(4, 5, mask), nn.LayerNorm(5), nn.GELU(), nn.Linear(5, 3))
    rep = S.find_symmetries(model, torch.randn(16, 4))
    found = _found(rep)
    # DCS factor mirrors of the first layer: (w, u) sign, swap and antiswap
    for kind in ("dcs-sign", "dcs-swap", "dcs-antiswap"):
        assert (kind, ("0",)) in found
    swap = next(f for f in rep.found if f.kind == "dcs-swap")
    assert swap.mirror.rank == int(mask.sum())  # restricted to the entries that use w * u
    # the pairs involving v are not mirrors of the weight
    assert sum(1 for f in rep.rejected if f.kind == "dcs-sign") == 2
    # hidden units of a DCS layer with a non-uniform mask cannot be permuted (rows of the mask differ)
    assert ("permutation", ("0", "3")) in _rejected(rep)

    # with a row-uniform mask they can, LayerNorm parameters permuted along
    mask2 = torch.ones(5, 4, dtype=torch.bool)
    mask2[:, 1] = False
    model2 = nn.Sequential(DuckDCSLinear(4, 5, mask2), nn.LayerNorm(5), nn.GELU(), nn.Linear(5, 3))
    rep2 = S.find_symmetries(model2, torch.randn(16, 4))
    perm = next(f for f in rep2.found if f.kind == "permutation")
    assert {"1.weight", "1.bias", "0.w", "0.u", "0.v", "0.bias", "3.weight"} <= set(perm.mirror.names)
    # dcs_mirrors on the module alone
    ms = S.dcs_mirrors(model[0], prefix="0.")
    assert sorted(m.kind for m in ms) == ["dcs-antiswap", "dcs-sign", "dcs-swap"]
    assert S.dcs_mirrors(nn.Linear(3, 2)) == []


def test_find_symmetries_attention():
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.att(x, x, x)[0]

    model = Block()
    rep = S.find_symmetries(model, torch.randn(2, 5, 8))
    assert _found(rep) == {("attention-qk-rotation", ("att",)), ("attention-vo-rotation", ("att",)),
                           ("head-permutation", ("att",))}
    qk = next(f for f in rep.found if f.kind == "attention-qk-rotation")
    # q/k rotation touches the q and k blocks of in_proj only
    m = qk.mirror
    th = {k: v.detach() for k, v in model.named_parameters()}
    r = m.reflect(th)
    changed = (r["att.in_proj_weight"] != th["att.in_proj_weight"]).any(1)
    assert changed[:16].any() and not changed[16:].any()


def test_find_symmetries_bad_inputs():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        S.find_symmetries(lambda x: x, torch.zeros(1))
    with pytest.raises(ValueError, match="mode must be 'eval' or 'train'"):
        S.find_symmetries(nn.Linear(2, 2), torch.zeros(1, 2), mode="test")


# ============================================================================== stationary_report
def _dcs_two_layer(d=4):
    """Eq. 6's model: scalar input and output, l = (x sum_i w_i u_i - y)^2 / 2, theta = w * u by DCS."""

    def loss_fn(p, b):
        x, y = b
        return 0.5 * (x * symfast.dcs(p["w"], p["u"]).sum() - y) ** 2

    params = {"w": torch.zeros(d, dtype=D64), "u": torch.zeros(d, dtype=D64)}
    return loss_fn, params


def test_stationary_report_eq6_dcs_hessian_at_origin():
    d, B = 4, 16
    loss_fn, params = _dcs_two_layer(d)
    x, y = _randn(B, seed=1), _randn(B, seed=2)
    c = (x * y).mean()  # at the origin each 2x2 block is [[0, -c], [-c, 0]] (eq. 6, batch mean)
    e = torch.eye(2 * d, dtype=D64)
    plus = torch.stack([(e[i] + e[d + i]) / math.sqrt(2) for i in range(d)], 1)   # (1, 1) per pair
    minus = torch.stack([(e[i] - e[d + i]) / math.sqrt(2) for i in range(d)], 1)  # (1, -1) per pair

    rep = S.stationary_report(loss_fn, params, S.rescaling_mirror(params, "w", "u", kind="sign"), (x, y))
    assert rep.on_condition and rep.condition_norm == 0
    assert rep.grad_condition.abs().max() == 0
    torch.testing.assert_close(rep.eigenvalues, torch.cat([-c.expand(d), c.expand(d)]))
    assert rep.eigen_residual.max() < 1e-12
    V = rep.eigenvectors  # [2d, 2d] in the flat order (w, u)
    # eigenspaces: (1, 1) directions for -c, (1, -1) directions for +c
    torch.testing.assert_close(V[:, :d] @ V[:, :d].T, plus @ plus.T)
    torch.testing.assert_close(V[:, d:] @ V[:, d:].T, minus @ minus.T)

    for kind, val in (("swap", c), ("antiswap", -c)):
        r = S.stationary_report(loss_fn, params, S.rescaling_mirror(params, "w", "u", kind=kind), (x, y))
        torch.testing.assert_close(r.eigenvalues, val.expand(d))
        assert r.eigen_residual.max() < 1e-12
        assert r.hessian_block.max() < 1e-12  # part 2


def test_stationary_report_part1_and_part2_against_dense_oracles():
    B = 6
    batch = (_randn(B, 3, seed=1), _randn(B, 2, seed=2))
    loss_fn = _mlp_loss(torch.tanh)
    params = _mlp_params()
    m = S.unit_permutation_mirror(params, ["W1", "b1"], ["W2"], 0, 2)

    def dense_hessian(p):
        def f(flat):
            q = S.unflatten(flat, p)
            return loss_fn(q, batch).mean()
        return torch.autograd.functional.hessian(f, S.flatten(p))

    O = m.basis
    P = O @ O.T
    I = torch.eye(P.shape[0], dtype=D64)
    for point, on in ((params, False), (m.symmetric_solution(params), True)):
        rep = S.stationary_report(loss_fn, point, m, batch, n_pairs=3, per_sample_hessian=True)
        assert rep.on_condition == on
        # per-sample |O^T g_i| against the loop oracle
        oracle = torch.stack([m.condition(g).norm() for g in _loop_grads(loss_fn, point, batch, B)])
        torch.testing.assert_close(rep.grad_condition, oracle, atol=1e-12, rtol=1e-9)
        H = dense_hessian(point)
        off_block = ((I - P) @ H @ P).abs().max()
        ev = torch.linalg.eigvalsh(O.T @ H @ O)
        torch.testing.assert_close(rep.eigenvalues, ev, atol=1e-10, rtol=1e-8)
        if on:
            assert oracle.max() < 1e-12 and off_block < 1e-12
            assert rep.hessian_block.max() < 1e-12 and rep.per_sample_hessian_block.max() < 1e-12
            assert rep.eigen_residual.max() < 1e-10
        else:
            assert oracle.max() > 1e-3 and off_block > 1e-3
            assert rep.hessian_block.max() > 1e-6 and rep.eigen_residual.max() > 1e-4
    assert rep.methods["per_sample_grad_condition"].startswith("J O from the")
    assert rep.methods["hvp"].startswith("vjp(grad)")
    assert "Hessian block" in str(rep)


def test_stationary_report_bad_inputs():
    loss_fn, params = _dcs_two_layer(3)
    batch = (_randn(8, seed=1), _randn(8, seed=2))
    m = S.rescaling_mirror(params, "w", "u", kind="sign")
    with pytest.raises(ValueError, match=r"stationary_report: loss_fn\(params, batch\) must return per-sample losses of shape \[B\] = \[8\], got shape \(\)"):
        S.stationary_report(lambda p, b: loss_fn(p, b).mean(), params, m, batch)
    with pytest.raises(TypeError, match="must return a tensor of per-sample losses"):
        S.stationary_report(lambda p, b: 1.0, params, m, batch)
    with pytest.raises(KeyError, match="theta is missing parameter 'u'"):
        S.stationary_report(loss_fn, {"w": params["w"]}, m, batch)
    with pytest.raises(TypeError, match="mirror must be a symfast.symmetry.Mirror"):
        S.stationary_report(loss_fn, params, torch.eye(6), batch)
    with pytest.raises(ValueError, match="n_pairs must be >= 1"):
        S.stationary_report(loss_fn, params, m, batch, n_pairs=0)


def test_stationary_report_float32_model_and_module_mirror():
    # end to end on a float32 nn.Module: find a mirror, move to its symmetric solution, report
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(10, 3), torch.randn(10, 2)
    rep = S.find_symmetries(model, x)
    perm = next(f for f in rep.found if f.kind == "permutation")

    def loss_fn(p, b):
        return F.mse_loss(functional_call(model, p, (b[0],)), b[1], reduction="none").sum(1)

    params = {k: v.detach() for k, v in model.named_parameters()}
    sym = perm.mirror.symmetric_solution(params)
    r = S.stationary_report(loss_fn, sym, perm.mirror, (x, y))
    assert r.on_condition
    assert (r.grad_condition / r.grad_norm).max() < 1e-5
    assert (r.hessian_block / r.hessian_scale).max() < 1e-4
    r0 = S.stationary_report(loss_fn, params, perm.mirror, (x, y), eigen=False)
    assert (r0.grad_condition / r0.grad_norm).max() > 1e-2 and r0.eigenvalues is None and "skipped" in r0.eigen_note


def test_flat_vector_constructors_and_float32_directions():
    # constructors on a flat vector of size D (int params) and flat positions as groups
    m = S.permutation_mirror(6, torch.arange(3), torch.arange(3, 6))
    x = torch.randn(6, generator=_g(0))
    torch.testing.assert_close(m.reflect(x), x[[3, 4, 5, 0, 1, 2]], rtol=0, atol=0)  # exact swap
    with pytest.raises(TypeError, match="built from a flat O without parameter names"):
        m.reflect({"a": x})
    # float32 directions orthonormal to float32 precision are accepted
    n = torch.tensor([3.0, 4.0, 12.0]) / 13.0
    params = {"W": torch.randn(3, 5, generator=_g(1))}
    r = S.rotation_mirror(params, ("W", 0), n)
    R = torch.eye(3) - 2 * torch.outer(n, n)
    torch.testing.assert_close(r.reflect(params)["W"], R @ params["W"])
    # stationary_report on a flat parameter vector
    xb, yb = _randn(5, 3, seed=2), _randn(5, seed=3)

    def loss_fn(theta, b):
        return (b[0] @ (theta[:3] * theta[3:]) - b[1]) ** 2

    mir = S.rescaling_mirror(6, torch.arange(3), torch.arange(3, 6), kind="antiswap")
    theta = mir.symmetric_solution(_randn(6, seed=4))
    rep = S.stationary_report(loss_fn, theta, mir, (xb, yb))
    assert rep.on_condition and rep.grad_condition.max() < 1e-12 and rep.eigen_residual.max() < 1e-12


def test_find_symmetries_mode_with_dropout():
    # with dropout active the sampled function is not permutation invariant (the masks stay at their
    # positions): mode="train" rejects what mode="eval" finds
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 2))
    x = torch.randn(8, 4)
    assert ("permutation", ("0", "3")) in _found(S.find_symmetries(model, x))
    assert ("permutation", ("0", "3")) in _rejected(S.find_symmetries(model, x, mode="train"))


def test_find_symmetries_on_symfast_nn_layers_if_present():
    # symfast.nn is optional here: find_symmetries only duck-types it (a computed .weight)
    nn_mod = pytest.importorskip("symfast.nn")
    torch.manual_seed(0)
    ew = nn.Sequential(nn_mod.DCSLinear(4, 6, structure="elementwise", alpha=1e-3), nn.ReLU(), nn.Linear(6, 2))
    found = _found(S.find_symmetries(ew, torch.randn(8, 4)))
    assert {("dcs-sign", ("0",)), ("dcs-swap", ("0",)), ("dcs-antiswap", ("0",)), ("permutation", ("0", "2"))} <= found
    lr = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn_mod.DCSLinear(6, 3, structure="lowrank", alpha=1e-3))
    found = _found(S.find_symmetries(lr, torch.randn(8, 4)))
    assert {("dcs-sign", ("2",)), ("dcs-rotation", ("2",)), ("permutation", ("0", "2"))} <= found


# ============================================================================== verify tolerances and find_symmetries edge cases
def test_verify_vacuous_tolerance_follows_dtype():
    # rotating layer 0's input space is no symmetry of a ReLU net; at the symmetric solution
    # R theta = theta up to float32 rounding, so the check must read vacuous, not verified
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(20, 6)
    params = {k: v.detach() for k, v in model.named_parameters()}
    n = torch.randn(6)
    m = S.rotation_mirror(params, [("0.weight", 1)], n / n.norm())
    assert not S.verify(_output_loss(model), params, m, [x]).passed  # not a symmetry
    sym = m.symmetric_solution(params)
    cond = m.condition(sym).double().norm().item() / S.flatten(sym).double().norm().item()
    assert 1e-12 < cond < 1e-6  # float32 rounding: on the condition, though not to 1e-12
    res = S.verify(_output_loss(model), sym, m, [x])
    assert res.vacuous and not res
    assert S.stationary_report(_output_loss(model), sym, m, x).on_condition == res.vacuous


def test_find_symmetries_train_mode_leaves_buffers_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(16, 4) * 3 + 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = S.find_symmetries(model, x, mode="train")
    assert ("permutation", ("0", "3")) in _found(rep)
    after = model.state_dict()
    assert after.keys() == before.keys() and model.training
    for k, v in before.items():
        assert torch.equal(after[k], v), k  # bit-identical, running statistics included


def test_find_symmetries_report_says_families_are_sampled_and_checks_must_be_positive():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    rep = S.find_symmetries(model, torch.randn(10, 3))
    assert "verified on a sample of 3 members" in str(rep)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"checks must be a positive int .*got " + repr(bad).replace(".", r"\.")):
            S.find_symmetries(model, torch.randn(10, 3), checks=bad)
