"""symfast.symmetry.stationary: the chunked per-sample part and the per-sample Hessian block.

Oracles: per-sample gradients from a plain loop over torch.autograd.grad, and the batch-mean
Hessian-vector product (jvp of grad), which for a batch of one sample is the per-sample one.
"""

import pytest
import torch
import torch.nn as nn

from autograd_functions import OnceCube
from symfast import symmetry as S
from symfast.curvature import functional_loss
from symfast.curvature.checks import UnsupportedOpError
from symfast.symmetry import stationary

D64 = torch.float64


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D64)


def _loss_fn(p, b):
    x, y = b
    h = torch.tanh(x @ p["W1"].T + p["b1"])
    return ((h @ p["W2"].T - y) ** 2).sum(1)


def _params():
    return {"W1": _randn(5, 3, seed=1), "b1": _randn(5, seed=2), "W2": _randn(2, 5, seed=3)}


def _loop(params, batch):
    conds, norms = [], []
    m = S.unit_permutation_mirror(params, ["W1", "b1"], ["W2"], 0, 2)
    for i in range(batch[0].shape[0]):
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        g = dict(zip(p, torch.autograd.grad(_loss_fn(p, (batch[0][i:i + 1], batch[1][i:i + 1]))[0], list(p.values()))))
        conds.append(m.condition(g).norm())
        norms.append(torch.cat([v.reshape(-1) for v in g.values()]).norm())
    return m, torch.stack(conds), torch.stack(norms)


@pytest.mark.parametrize("direct", [True, False], ids=["columns", "per_sample_grads"])
@pytest.mark.parametrize("chunk_size", [None, 1, 4, 64])
def test_per_sample_gradient_part_in_chunks_matches_the_loop(chunk_size, direct, monkeypatch):
    # x @ W.T is no layer with a closed-form norm: |g_i| takes the vmap fallback, in chunks; |O^T g_i|
    # comes from the column backwards (J O), or (k above the limit) per-sample gradients in chunks
    if not direct:
        monkeypatch.setattr(stationary, "_DIRECT_MAX_RANK", 0)
    params, batch = _params(), (_randn(7, 3, seed=4), _randn(7, 2, seed=5))
    m, conds, norms = _loop(params, batch)
    rep = S.stationary_report(_loss_fn, params, m, batch, chunk_size=chunk_size, eigen=False, n_pairs=1)
    torch.testing.assert_close(rep.grad_condition, conds, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(rep.grad_norm, norms, rtol=1e-10, atol=0)
    assert conds.min() > 1e-3  # off the condition: the numbers are not all zero
    assert rep.methods["per_sample_grad_norm"].startswith("vmap (used by")
    how = rep.methods["per_sample_grad_condition"]
    assert how.startswith("J O from the" if direct else "vmap per-sample gradients")


@pytest.mark.parametrize("flat", [False, True])
def test_per_sample_hessian_block_of_one_sample_is_the_mean_block(flat):
    # with B = 1 the batch mean is the sample: |m^T H(x_1) n| (nested forward mode on the batch)
    # must equal |m^T H n| (jvp of grad of the mean loss), for the same random (m, n) pairs
    params = _params()
    m = S.unit_permutation_mirror(params, ["W1", "b1"], ["W2"], 1, 3)
    batch = (_randn(1, 3, seed=6), _randn(1, 2, seed=7))
    loss_fn = _loss_fn
    if flat:
        layout = {k: v for k, v in params.items()}
        m = S.Mirror(m.basis)
        params = S.flatten(params)
        loss_fn = lambda theta, b: _loss_fn(S.unflatten(theta, layout), b)  # noqa: E731
    rep = S.stationary_report(loss_fn, params, m, batch, n_pairs=3, per_sample_hessian=True, eigen=False)
    assert rep.per_sample_hessian_block.shape == (1, 3)
    assert rep.hessian_block.min() > 1e-4  # off the condition: a real comparison
    torch.testing.assert_close(rep.per_sample_hessian_block[0], rep.hessian_block, rtol=1e-10, atol=1e-13)
    assert rep.methods["per_sample_hessian"].startswith("per_sample_hvp(onto)")


def test_per_sample_hessian_block_falls_back_where_the_engine_refuses():
    # det: forward over forward is silently wrong through it, so the engine refuses it; the report
    # then takes one Hessian-vector product per sample (forward over reverse, right for det)
    params = _params()
    m = S.unit_permutation_mirror(params, ["W1", "b1"], ["W2"], 0, 2)

    def loss_fn(p, b):
        x, y = b
        h = torch.tanh(x @ p["W1"].T + p["b1"])
        return ((h @ p["W2"].T - y) ** 2).sum(1) + torch.linalg.det(h[:, :4].reshape(-1, 2, 2))

    batch = (_randn(1, 3, seed=6), _randn(1, 2, seed=7))
    rep = S.stationary_report(loss_fn, params, m, batch, n_pairs=2, per_sample_hessian=True, eigen=False)
    assert rep.methods["per_sample_hessian"] == "vmap"
    assert rep.hessian_block.min() > 1e-4
    torch.testing.assert_close(rep.per_sample_hessian_block[0], rep.hessian_block, rtol=1e-10, atol=1e-13)
    # |O^T g_i| comes from the column backwards, reverse mode, which is exact through det
    assert rep.methods["per_sample_grad_condition"].startswith("J O from the")


def test_block_check_from_the_columns_equals_its_own_products(monkeypatch):
    # with the columns H O (k <= _DIRECT_MAX_RANK, or the eigen part), H n = (H O) c for n = O c;
    # else H n is a product of its own
    params = _params()
    m = S.unit_permutation_mirror(params, ["W1", "b1"], ["W2"], 0, 2)
    batch = (_randn(6, 3, seed=4), _randn(6, 2, seed=5))
    a = S.stationary_report(_loss_fn, params, m, batch, n_pairs=3, eigen=True)
    monkeypatch.setattr(stationary, "_DIRECT_MAX_RANK", 0)
    b = S.stationary_report(_loss_fn, params, m, batch, n_pairs=3, eigen=False)
    assert a.hessian_block.min() > 1e-4  # off the condition: a real comparison
    torch.testing.assert_close(a.hessian_block, b.hessian_block, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(a.hessian_scale, b.hessian_scale, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(a.mean_grad_condition, b.mean_grad_condition, rtol=1e-10, atol=1e-13)
    assert "columns H O" in a.methods["hvp"] and "columns H O" not in b.methods["hvp"]


def _cube_loss(cube):
    def loss_fn(p, b):
        x, y = b
        h = cube(x @ p["W1"].T + p["b1"])
        return ((h @ p["W2"].T - y) ** 2).sum(1)
    return loss_fn


def test_a_once_differentiable_function_is_refused_by_name():
    # reverse over reverse would silently drop the Function's part of H v and J v (its backward's
    # result is cut off from the graph), and torch.func's jvp of grad gives it a zero tangent
    params = _params()
    m = S.unit_permutation_mirror(params, ["W1", "b1"], ["W2"], 0, 2)
    batch = (_randn(6, 3, seed=4), _randn(6, 2, seed=5))
    with pytest.warns(UserWarning), pytest.raises(UnsupportedOpError, match=r"autograd.Function 'OnceCube': its backward is marked @once_differentiable"):
        S.stationary_report(_cube_loss(OnceCube.apply), params, m, batch, n_pairs=2)


class _FailsTwice(torch.autograd.Function):
    """The identity, whose backward fails (out of memory, say) when it is differentiated."""

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("out of memory")


class _SquareWithFragileBackward(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        x, = ctx.saved_tensors
        return _FailsTwice.apply(2 * x * g)


def test_only_a_missing_double_backward_changes_the_path():
    # any other error of the second backward is the caller's to see
    params = _params()
    m = S.unit_permutation_mirror(params, ["W1", "b1"], ["W2"], 0, 2)
    batch = (_randn(6, 3, seed=4), _randn(6, 2, seed=5))
    with pytest.raises(RuntimeError, match="out of memory"):
        S.stationary_report(_cube_loss(_SquareWithFragileBackward.apply), params, m, batch, n_pairs=2)


def test_closed_form_norms_in_the_report_match_the_loop():
    # nn.Linear layers: |g_i| from the closed form (one forward and backward), checked against the loop
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    loss_fn, params = functional_loss(model, nn.MSELoss(reduction="none"))
    m = S.unit_permutation_mirror(params, ["0.weight", "0.bias"], ["2.weight"], 1, 3)
    batch = (_randn(7, 3, seed=4), _randn(7, 2, seed=5))
    rep = S.stationary_report(loss_fn, params, m, batch, n_pairs=1)
    norms = []
    for i in range(7):
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        gs = torch.autograd.grad(loss_fn(p, (batch[0][i:i + 1], batch[1][i:i + 1]))[0], list(p.values()))
        norms.append(torch.cat([g.reshape(-1) for g in gs]).norm())
    torch.testing.assert_close(rep.grad_norm, torch.stack(norms), rtol=1e-10, atol=0)
    assert rep.methods["per_sample_grad_norm"] == "ghost (linear): 0.weight, 0.bias, 2.weight, 2.bias"


@pytest.mark.parametrize("direct", [True, False], ids=["columns", "jacobian_rows"])
def test_samples_coupled_by_batch_statistics_follow_the_batch_convention(direct, monkeypatch):
    # training-mode batch norm: every per-sample number is that of loss_fn(params, batch)[i]
    # (whole-batch statistics), on the column path and on the path for large k alike
    if not direct:
        monkeypatch.setattr(stationary, "_DIRECT_MAX_RANK", 0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2)).double().train()
    loss_fn, params = functional_loss(model, nn.MSELoss(reduction="none"))
    m = S.unit_permutation_mirror(params, ["0.weight", "0.bias", "1.weight", "1.bias"], ["3.weight"], 1, 3)
    batch = (_randn(7, 3, seed=4), _randn(7, 2, seed=5))
    rep = S.stationary_report(loss_fn, params, m, batch, n_pairs=1, eigen=False)
    jac = torch.func.jacrev(lambda p: loss_fn(p, batch))(params)
    conds = m.condition(jac, batch_dims=1).norm(dim=1)
    norms = sum(j.reshape(7, -1).square().sum(1) for j in jac.values()).sqrt()
    assert conds.min() > 1e-4
    torch.testing.assert_close(rep.grad_condition, conds, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(rep.grad_norm, norms, rtol=1e-10, atol=0)
    how = rep.methods["per_sample_grad_condition"]
    assert how.startswith("J O from the" if direct else "Jacobian rows of")
