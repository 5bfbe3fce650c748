"""symfast.curvature.grad_norms: per-sample gradient norms from one forward and backward.

Oracles: torch.func vmap(grad) norms (the textbook per-sample gradients), a loop over samples with
torch.autograd.grad, and the closed form of least squares, ||g_i||^2 = |r_i|^2 (|x_i|^2 + 1).
"""

import pytest
import torch
import torch.func as tf
import torch.nn as nn
import torch.nn.functional as F

from symfast.curvature import functional_loss, grad_norms
from symfast.curvature.grad_norms import per_sample_grad_norms

D64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _vmap_norms(loss_fn, params, batch):
    x, y = batch

    def one(p, xi, yi):
        return loss_fn(p, (xi[None], yi[None]))[0]

    g = tf.vmap(tf.grad(one), in_dims=(None, 0, 0))(params, x, y)
    return sum(v.reshape(v.shape[0], -1).square().sum(1) for v in g.values()).sqrt()


def _loop_norms(loss_fn, params, batch):
    x, y = batch
    out = []
    for i in range(x.shape[0]):
        p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        gs = torch.autograd.grad(loss_fn(p, (x[i:i + 1], y[i:i + 1]))[0], list(p.values()), allow_unused=True)
        out.append(torch.sqrt(sum((g.square().sum() for g in gs if g is not None), torch.zeros((), dtype=D64))))
    return torch.stack(out)


class _Tokens(nn.Module):
    """Embedding -> LayerNorm (over d, or over (T, d) jointly) -> Linear -> tanh -> Linear on [B, T]
    tokens, mean over T."""

    def __init__(self, vocab=7, d=6, hidden=6, n_out=3, padding_idx=None, ln_shape=None):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=padding_idx)
        self.ln = nn.LayerNorm(ln_shape or d)
        self.lin = nn.Linear(d, hidden)
        self.out = nn.Linear(hidden, n_out)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(self.ln(self.emb(x))))).mean(1)


class _Conv(nn.Module):
    def __init__(self, stride=1, padding=0, dilation=1):
        super().__init__()
        self.c = nn.Conv2d(2, 3, 3, stride=stride, padding=padding, dilation=dilation)
        self.l = nn.LazyLinear(4)

    def forward(self, x):
        return self.l(torch.tanh(self.c(x)).flatten(1))


def _case(name):
    ce = nn.CrossEntropyLoss(reduction="none")
    B = 9
    if name == "mlp":
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        x, y = torch.randn(B, 4, generator=_gen(1)), torch.randint(0, 3, (B,), generator=_gen(2))
    elif name in ("tokens", "tokens-padding", "tokens-ln2d"):
        kw = {"tokens": {}, "tokens-padding": {"padding_idx": -2}, "tokens-ln2d": {"ln_shape": (5, 6)}}[name]
        model = _Tokens(**kw)
        x, y = torch.randint(0, 7, (B, 5), generator=_gen(1)), torch.randint(0, 3, (B,), generator=_gen(2))
    elif name in ("conv", "conv-strided"):
        kw = {"conv": {}, "conv-strided": {"stride": 2, "padding": 2, "dilation": 2}}[name]
        model = _Conv(**kw)
        x, y = torch.randn(B, 2, 6, 6, generator=_gen(1)), torch.randint(0, 4, (B,), generator=_gen(2))
    else:
        raise ValueError(name)
    torch.manual_seed(0)
    model(x[:1].to(torch.float32) if x.is_floating_point() else x[:1])  # materialize lazy modules
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    loss_fn, params = functional_loss(model, ce)
    return loss_fn, params, (x, y)


@pytest.mark.parametrize("name", ["mlp", "tokens", "tokens-padding", "tokens-ln2d", "conv", "conv-strided"])
def test_closed_forms_match_vmap_and_the_loop(name):
    loss_fn, params, batch = _case(name)
    out = per_sample_grad_norms(loss_fn, params, batch)
    ref = _vmap_norms(loss_fn, params, batch)
    torch.testing.assert_close(out.norms, ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(out.norms, _loop_norms(loss_fn, params, batch), rtol=1e-10, atol=0)
    assert ref.min() > 1e-3
    assert all(m.startswith("ghost") for m in out.methods.values()), out.methods
    assert set(out.methods) == set(params)
    torch.testing.assert_close(out.losses, loss_fn(params, batch))


@pytest.mark.parametrize("T,n_in,n_out", [(1, 5, 4), (3, 5, 4), (2, 6, 6), (4, 2, 3)],
                         ids=["no-seq", "direct", "gram", "gram-small"])
def test_linear_with_sequence_dims_both_forms(T, n_in, n_out):
    # [B, T, in] inputs: the Gram form where T^2 (in + out) <= T in out, else delta^T a
    B = 5
    W = torch.randn(n_out, n_in, generator=_gen(3), dtype=D64)
    b = torch.randn(n_out, generator=_gen(4), dtype=D64)
    x = torch.randn(B, T, n_in, generator=_gen(5), dtype=D64)
    y = torch.randn(B, T, n_out, generator=_gen(6), dtype=D64)

    def loss_fn(p, batch):
        xx, yy = batch
        return (torch.tanh(F.linear(xx, p["W"], p["b"])) - yy).square().sum((1, 2))

    params = {"W": W, "b": b}
    out = per_sample_grad_norms(loss_fn, params, (x, y))
    torch.testing.assert_close(out.norms, _vmap_norms(loss_fn, params, (x, y)), rtol=1e-10, atol=0)
    assert out.methods == {"W": "ghost (linear)", "b": "ghost (linear)"}


def test_least_squares_closed_form_float32_and_non_contiguous():
    # l_i = |W x_i + b - y_i|^2 / 2: g_W = r_i x_i^T, g_b = r_i, so ||g_i||^2 = |r_i|^2 (|x_i|^2 + 1)
    B, n_in, n_out = 16, 8, 3
    W = torch.randn(n_out, n_in, generator=_gen(1))
    b = torch.randn(n_out, generator=_gen(2))
    x = torch.randn(n_in, B, generator=_gen(3)).T  # non-contiguous
    y = torch.randn(B, n_out, generator=_gen(4))

    def loss_fn(p, batch):
        xx, yy = batch
        return 0.5 * (F.linear(xx, p["W"], p["b"]) - yy).square().sum(1)

    out = per_sample_grad_norms(loss_fn, {"W": W, "b": b}, (x, y))
    r = (x.double() @ W.double().T + b.double() - y.double())
    exact = (r.square().sum(1) * (x.double().square().sum(1) + 1)).sqrt()
    assert out.norms.dtype == D64
    # float32 rounding of the forward and backward, with a margin: a few ulps of float32
    torch.testing.assert_close(out.norms, exact, rtol=1e-5, atol=0)


def _reference_fallback(monkeypatch, loss_fn, params, batch):
    """The same call with every closed form disabled: the exact vmap fallback for every parameter."""
    with monkeypatch.context() as mp:
        mp.setattr(grad_norms, "_role_tensors", lambda func, args, kwargs: {})
        return per_sample_grad_norms(loss_fn, params, batch)


@pytest.mark.parametrize("name", ["mlp", "tokens", "conv-strided"])
def test_closed_forms_match_the_fallback(name, monkeypatch):
    loss_fn, params, batch = _case(name)
    fb = _reference_fallback(monkeypatch, loss_fn, params, batch)
    assert all(m.startswith("vmap (used by") for m in fb.methods.values()), fb.methods
    torch.testing.assert_close(per_sample_grad_norms(loss_fn, params, batch).norms, fb.norms, rtol=1e-10, atol=0)


class _Tied(nn.Module):
    """Input embedding tied to the output projection (as in language models)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 5)
        self.mix = nn.Linear(5, 5)

        self.out_bias = nn.Parameter(torch.linspace(-1, 1, 7))

    def forward(self, x):  # the output layer's bias keeps its closed form though its weight is tied
        return F.linear(torch.tanh(self.mix(self.emb(x))), self.emb.weight, self.out_bias).mean(1)


def test_tied_parameter_takes_the_fallback_and_says_so():
    torch.manual_seed(0)
    model = _Tied().double()
    loss_fn, params = functional_loss(model, nn.CrossEntropyLoss(reduction="none"))
    batch = (torch.randint(0, 7, (6, 4), generator=_gen(1)), torch.randint(0, 7, (6,), generator=_gen(2)))
    out = per_sample_grad_norms(loss_fn, params, batch)
    torch.testing.assert_close(out.norms, _vmap_norms(loss_fn, params, batch), rtol=1e-10, atol=0)
    assert out.methods["emb.weight"] == "vmap (shared by 2 layers)"
    assert out.methods["mix.weight"] == "ghost (linear)" and out.methods["mix.bias"] == "ghost (linear)"
    assert out.methods["out_bias"] == "ghost (linear)"


def test_weight_decay_and_transpose_take_the_fallback():
    W1 = torch.randn(4, 3, generator=_gen(1), dtype=D64)
    W2 = torch.randn(2, 4, generator=_gen(2), dtype=D64)
    batch = (torch.randn(7, 3, generator=_gen(3), dtype=D64), torch.randn(7, 2, generator=_gen(4), dtype=D64))

    def loss_fn(p, b):
        x, y = b
        h = torch.tanh(x @ p["W1"].T)
        return (F.linear(h, p["W2"]) - y).square().sum(1) + 0.1 * p["W2"].square().sum()

    params = {"W1": W1, "W2": W2}
    out = per_sample_grad_norms(loss_fn, params, batch)
    torch.testing.assert_close(out.norms, _vmap_norms(loss_fn, params, batch), rtol=1e-10, atol=0)
    assert out.methods["W1"].startswith("vmap (used by") and out.methods["W2"].startswith("vmap (used by")


def test_sequence_first_layout_is_detected_even_when_T_equals_B():
    # the model runs the layer on [T, B, d] (sequence first): row t of its output is a time step,
    # not sample t, though T = B makes the shapes look right; the weighted backward sees it
    B = T = 6
    W = torch.randn(3, 4, generator=_gen(1), dtype=D64)
    x = torch.randn(B, T, 4, generator=_gen(2), dtype=D64)
    y = torch.zeros(B, dtype=D64)

    def loss_fn(p, b):
        xs, _ = b
        return torch.tanh(F.linear(xs.transpose(0, 1), p["W"])).square().sum((0, 2))

    params = {"W": W}
    out = per_sample_grad_norms(loss_fn, params, (x, y))
    assert out.methods["W"] == "Jacobian rows of the batch (row i of its linear output is not sample i's alone)"
    ref = _vmap_norms(loss_fn, params, (x, y))
    torch.testing.assert_close(out.norms, ref, rtol=1e-10, atol=0)
    # what the closed form would have said, taking rows for samples: wrong, so the check matters
    h = F.linear(x.transpose(0, 1), W)
    delta = 2 * torch.tanh(h) * (1 - torch.tanh(h).square())
    naive = (x.transpose(0, 1).square().sum(-1) * delta.square().sum(-1)).sum(1).sqrt()
    assert (naive - ref).abs().max() > 1e-2 * ref.max()


def test_unused_parameter_and_empty_batch():
    W = torch.randn(2, 3, generator=_gen(1), dtype=D64)

    def loss_fn(p, b):
        return F.linear(b, p["W"]).square().sum(1)

    out = per_sample_grad_norms(loss_fn, {"W": W, "spare": torch.ones(4, dtype=D64)},
                                torch.randn(5, 3, generator=_gen(2), dtype=D64))
    assert out.methods == {"W": "ghost (linear)", "spare": "unused"}
    empty = per_sample_grad_norms(loss_fn, {"W": W}, torch.zeros(0, 3, dtype=D64))
    assert empty.norms.shape == (0,) and empty.norms.dtype == D64

    def detached(p, b):  # the layer's output does not reach the losses differentiably
        return F.linear(b, p["W"]).detach().square().sum(1)

    out = per_sample_grad_norms(detached, {"W": W}, torch.randn(5, 3, generator=_gen(2), dtype=D64))
    assert out.methods == {"W": "unused"} and out.norms.abs().max() == 0


def test_flat_parameter_vector_takes_the_fallback():
    theta = torch.randn(8, generator=_gen(1), dtype=D64)
    x = torch.randn(5, 3, generator=_gen(2), dtype=D64)

    def loss_fn(t, b):
        return torch.tanh(F.linear(b, t[:6].view(2, 3), t[6:])).square().sum(1)

    out = per_sample_grad_norms(loss_fn, theta, x)
    ref = tf.vmap(tf.grad(lambda t, xi: loss_fn(t, xi[None])[0]), in_dims=(None, 0))(theta, x).norm(dim=1)
    torch.testing.assert_close(out.norms, ref, rtol=1e-10, atol=0)
    assert out.methods["theta"].startswith("vmap (used by")


def test_bad_inputs_name_the_argument():
    with pytest.raises(TypeError, match=r"per_sample_grad_norms: params must be a dict of tensors or a tensor, "
                                        r"got list"):
        per_sample_grad_norms(lambda p, b: b.sum(1), [torch.ones(2)], torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"must return per-sample losses of shape \[B\] = \[3\], got shape \(\)"):
        per_sample_grad_norms(lambda p, b: F.linear(b, p["W"]).sum(), {"W": torch.ones(1, 2)}, torch.ones(3, 2))


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_samples_coupled_by_batch_statistics_take_the_batch_jacobian_rows(chunk_size):
    # training-mode batch norm couples the samples: |grad l_i| is that of loss_fn(params, batch)[i]
    # (the batch convention), the norm of row i of the whole batch's Jacobian; a sample alone
    # would have another loss (and batch norm refuses a batch of one)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double().train()
    loss_fn, params = functional_loss(model, nn.CrossEntropyLoss(reduction="none"))
    batch = (torch.randn(5, 4, generator=_gen(1), dtype=D64), torch.randint(0, 3, (5,), generator=_gen(2)))
    out = per_sample_grad_norms(loss_fn, params, batch, chunk_size=chunk_size)
    jac = tf.jacrev(lambda p: loss_fn(p, batch))(params)
    ref = sum(j.reshape(5, -1).square().sum(1) for j in jac.values()).sqrt()
    torch.testing.assert_close(out.norms, ref, rtol=1e-10, atol=0)
    assert out.methods["0.weight"].startswith("Jacobian rows of the batch")
    assert out.methods["3.weight"] == "ghost (linear)"  # its output rows are the samples


def test_batch_statistics_with_no_closed_form_layer_take_the_batch_jacobian_rows():
    # no row check runs (x @ W.T is no closed-form layer), so the per-sample map meets the batch
    # norm itself and refuses it; the norms then come from the batch's Jacobian rows
    W = torch.randn(6, 4, generator=_gen(3), dtype=D64)
    x = torch.randn(5, 4, generator=_gen(4), dtype=D64)

    def loss_fn(p, b):
        h = F.batch_norm(b @ p["W"].T, None, None, training=True)
        return torch.tanh(h).square().sum(1)

    out = per_sample_grad_norms(loss_fn, {"W": W}, x)
    jac = tf.jacrev(lambda p: loss_fn(p, x))({"W": W})["W"].reshape(5, -1)
    torch.testing.assert_close(out.norms, jac.norm(dim=1), rtol=1e-10, atol=0)
    assert out.methods["W"].startswith("Jacobian rows of the batch") and "batch statistics" in out.methods["W"]
