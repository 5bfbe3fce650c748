"""symfast.curvature: per-sample directional derivatives, curvatures and HVPs.

Every supported layer is checked against central finite differences of the
per-sample loss vector in float64 (independent of any autodiff rule) and
against the torch.func reference path (vmap over jvp of grad) where that path
applies. The closed forms of the paper's eq. (6) and of linear regression pin
the definitions down.
"""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import symfast
from autograd_functions import Cube, CubeJvp, OnceCubeJvp
from symfast.curvature import (
    UnsupportedOpError,
    functional_loss,
    per_sample_curvatures,
    per_sample_directional_derivatives,
    per_sample_hvp,
)
from symfast.curvature.per_sample import PerSamplePathWarning

DT = torch.float64
EPS = 1e-4  # central differences: truncation ~eps^2, rounding ~1e-16/eps^2


def _randn(*shape, seed=0, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _directions(params, K, seed=1, dtype=None):
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn((K,) + tuple(v.shape), generator=g, dtype=torch.float64).to(dtype or v.dtype)
        for k, v in params.items()
    }


def _shift(params, *pairs):
    out = dict(params)
    for coef, d in pairs:
        out = {k: out[k] + coef * d[k] for k in out}
    return out


def fd_first(loss_fn, params, n, batch, eps=EPS):
    with torch.no_grad():
        return (loss_fn(_shift(params, (eps, n)), batch) - loss_fn(_shift(params, (-eps, n)), batch)) / (2 * eps)


def fd_second(loss_fn, params, n, batch, eps=EPS):
    with torch.no_grad():
        return (
            loss_fn(_shift(params, (eps, n)), batch) - 2 * loss_fn(params, batch)
            + loss_fn(_shift(params, (-eps, n)), batch)
        ) / eps**2


def fd_mixed(loss_fn, params, n, m, batch, eps=EPS):
    with torch.no_grad():
        f = lambda a, b: loss_fn(_shift(params, (a, m), (b, n)), batch)  # noqa: E731
        return (f(eps, eps) - f(eps, -eps) - f(-eps, eps) + f(-eps, -eps)) / (4 * eps**2)


def _assert_fd_close(actual, expected, what):
    # FD error: ~eps^2 * |4th derivative| + 1e-16 * |l| / eps^2; scale with the values.
    scale = expected.abs().max().item() + 1.0
    err = (actual - expected).abs().max().item()
    assert err <= 2e-5 * scale, f"{what}: max |engine - finite differences| = {err:.3e} (scale {scale:.3e})"


# ------------------------------------------------------------------ models
class DCSLinear(nn.Module):
    """A Linear layer whose weight is the DCS product symfast.dcs(w, u) (paper eq. 10, P = I)."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d_out, d_in) / math.sqrt(d_in))
        self.u = nn.Parameter(torch.randn(d_out, d_in))
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x):
        return F.linear(x, symfast.dcs(self.w, self.u), self.bias)


class SDPABlock(nn.Module):
    """Causal single-head attention written with F.scaled_dot_product_attention."""

    def __init__(self, d=6, out=3):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.head = nn.Linear(d, out)

    def forward(self, x):
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).squeeze(1)
        return self.head(y.mean(1))


class TransformerBlock(nn.Module):
    """Pre-norm block: LayerNorm, MultiheadAttention (need_weights=False), LayerNorm, GELU MLP."""

    def __init__(self, d=8, heads=2, out=3):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, out)

    def forward(self, x):
        y = self.ln1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        x = x + self.mlp(self.ln2(x))
        return self.head(x.mean(1))


class Pool(nn.Module):
    def forward(self, x):
        return x.mean(1)


def _ce():
    return nn.CrossEntropyLoss(reduction="none")


def _mse():
    return nn.MSELoss(reduction="none")


B = 6
METHODS = ["fast", "forward", "reference"]


def _cls_batch(shape, classes=3, seed=2):
    return _randn(B, *shape, seed=seed), torch.randint(0, classes, (B,), generator=torch.Generator().manual_seed(seed))


def _reg_batch(shape, out, seed=2):
    return _randn(B, *shape, seed=seed), _randn(B, out, seed=seed + 1)


# name -> (module factory, loss factory, batch factory, reference path works, module mode)
CASES = {
    "linear-ce": (lambda: nn.Linear(5, 3), _ce, lambda: _cls_batch((5,)), True, "train"),
    "mlp-tanh-mse": (lambda: nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2)), _mse,
                     lambda: _reg_batch((5,), 2), True, "train"),
    "mse-mean-functional": (lambda: nn.Sequential(nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 2)), None,
                            lambda: _reg_batch((5,), 2), True, "train"),
    "huber": (lambda: nn.Sequential(nn.Linear(5, 4), nn.SiLU(), nn.Linear(4, 2)),
              lambda: nn.HuberLoss(reduction="none", delta=0.5), lambda: _reg_batch((5,), 2), True, "train"),
    "conv2d-relu": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3)),
                    _ce, lambda: _cls_batch((2, 4, 4)), True, "train"),
    "layernorm-gelu": (lambda: nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.GELU(), nn.Linear(6, 3)),
                       _ce, lambda: _cls_batch((5,)), True, "train"),
    "batchnorm1d-train": (lambda: nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Softplus(), nn.Linear(6, 3)),
                          _ce, lambda: _cls_batch((5,)), False, "train"),
    "batchnorm2d-train": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ELU(), nn.Flatten(),
                                                nn.Linear(12, 3)), _ce, lambda: _cls_batch((2, 4, 4)), False, "train"),
    "batchnorm2d-eval": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ELU(), nn.Flatten(),
                                               nn.Linear(12, 3)), _ce, lambda: _cls_batch((2, 4, 4)), True, "eval"),
    "instance-group-norm": (lambda: nn.Sequential(nn.Conv1d(2, 4, 3), nn.InstanceNorm1d(4, affine=True),
                                                  nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)),
                            _ce, lambda: _cls_batch((2, 5)), True, "train"),
    "glu-hardsigmoid": (lambda: nn.Sequential(nn.Linear(5, 8), nn.GLU(), nn.Hardsigmoid(), nn.Linear(4, 3)),
                        _ce, lambda: _cls_batch((5,)), True, "train"),
    "multihead-attention": (TransformerBlock, _ce, lambda: _cls_batch((4, 8)), True, "train"),
    # gelu, not the default relu: finite differences across a relu kink are meaningless.
    "transformer-encoder-eval": (lambda: nn.Sequential(
        nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation="gelu", batch_first=True), Pool(),
        nn.Linear(8, 3)), _ce, lambda: _cls_batch((4, 8)), True, "eval"),
    "sdpa-causal": (SDPABlock, _ce, lambda: _cls_batch((5, 6)), True, "train"),
    "dcs-linear": (lambda: nn.Sequential(DCSLinear(5, 4), nn.Tanh(), nn.Linear(4, 3)), _ce,
                   lambda: _cls_batch((5,)), True, "train"),
}


def _build(name, dtype=DT):
    make_module, make_loss, make_batch, ref_ok, mode = CASES[name]
    torch.manual_seed(0)
    module = make_module().to(dtype)
    module.train(mode == "train")
    if make_loss is None:
        # A hand-written loss_fn: F.mse_loss(reduction="mean") per sample under vmap.
        def loss_fn(p, batch):
            x, y = batch
            out = torch.func.functional_call(module, p, (x,))
            return torch.stack([F.mse_loss(out[i], y[i]) for i in range(out.shape[0])])

        params = {k: v.detach() for k, v in module.named_parameters()}
    else:
        loss_fn, params = functional_loss(module, make_loss())
    x, y = make_batch()
    return loss_fn, params, (x.to(dtype), y if not y.is_floating_point() else y.to(dtype)), ref_ok


@pytest.mark.parametrize("name", list(CASES))
def test_curvatures_match_finite_differences_and_reference(name):
    loss_fn, params, batch, ref_ok = _build(name)
    dirs = _directions(params, K=2)
    h = per_sample_curvatures(loss_fn, params, dirs, batch)
    assert h.shape == (B, 2) and h.dtype == DT
    fd = torch.stack([fd_second(loss_fn, params, {k: v[i] for k, v in dirs.items()}, batch) for i in range(2)], 1)
    _assert_fd_close(h, fd, f"{name}: curvature")
    if ref_ok:
        ref = per_sample_curvatures(loss_fn, params, dirs, batch, method="reference")
        torch.testing.assert_close(h, ref, rtol=1e-9, atol=1e-9)
    else:
        with pytest.raises(UnsupportedOpError, match="couples the samples"):
            per_sample_curvatures(loss_fn, params, dirs, batch, method="reference")


@pytest.mark.parametrize("name", list(CASES))
def test_taylor_mode_and_nested_forward_mode_agree(name):
    """method='fast' (op-by-op second-order jets, all K directions in one pass, no fallback) and
    method='forward' (jvp of jvp of the whole loss), for h and g."""
    loss_fn, params, batch, _ = _build(name)
    dirs = _directions(params, K=3, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerSamplePathWarning)  # the jets follow every op of these models
        fast = per_sample_curvatures(loss_fn, params, dirs, batch)
        fast_g = per_sample_directional_derivatives(loss_fn, params, dirs, batch)
        one_at_a_time = per_sample_curvatures(loss_fn, params, dirs, batch, chunk_size=1)
    nested = per_sample_curvatures(loss_fn, params, dirs, batch, method="forward")
    torch.testing.assert_close(fast, nested, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(one_at_a_time, fast, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast_g, per_sample_directional_derivatives(loss_fn, params, dirs, batch,
                                                                          method="forward"), rtol=1e-10, atol=1e-10)


class MaskedAttention(nn.Module):
    """MultiheadAttention with a bool causal mask, a key padding mask, separate q/k/v weights and returned weights."""

    def __init__(self, d=6, heads=2):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, kdim=5, vdim=5, batch_first=True)
        self.head = nn.Linear(d, 3)

    def forward(self, x, kv, pad):
        T = x.shape[1]
        causal = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
        out, w = self.attn(x, kv, kv, attn_mask=causal, key_padding_mask=pad, need_weights=True)
        return self.head(out.mean(1) + w.sum(1)[:, :1])


def test_attention_with_masks_matches_finite_differences():
    torch.manual_seed(0)
    module = MaskedAttention().to(DT)
    x, kv = _randn(B, 4, 6, seed=7), _randn(B, 4, 5, seed=8)
    pad = torch.zeros(B, 4, dtype=torch.bool)
    pad[::2, -1] = True
    y = torch.randint(0, 3, (B,), generator=torch.Generator().manual_seed(9))
    loss_fn, params = functional_loss(module, _ce())
    batch = ((x, kv, pad), y)
    dirs = _directions(params, K=2)
    h = per_sample_curvatures(loss_fn, params, dirs, batch)
    fd = torch.stack([fd_second(loss_fn, params, {k: v[i] for k, v in dirs.items()}, batch) for i in range(2)], 1)
    _assert_fd_close(h, fd, "masked attention")
    torch.testing.assert_close(h, per_sample_curvatures(loss_fn, params, dirs, batch, method="forward"))


class PaddedSDPA(nn.Module):
    """One attention layer over a left-padded batch, as HF models call it (sdpa with a bool mask)."""

    def __init__(self, d=6, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.head = nn.Linear(d, 3)

    def forward(self, x, mask):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.head(y.transpose(1, 2).reshape(b, t, d).sum(1))


def _left_padded_mask(lengths, T, float_mask):
    """[B, 1, T, T] causal mask over the last ``length`` positions; padded query rows allow no key."""
    keep = torch.arange(T)[None, :] >= (T - torch.tensor(lengths))[:, None]
    allowed = keep[:, None, :, None] & keep[:, None, None, :] & torch.ones(T, T, dtype=torch.bool).tril()
    if not float_mask:
        return allowed
    return torch.zeros(allowed.shape, dtype=DT).masked_fill(~allowed, float("-inf"))


@pytest.mark.parametrize("float_mask", [False, True], ids=["bool-mask", "float-mask"])
@pytest.mark.parametrize("method", ["fast", "forward", "reference"])
def test_sdpa_rows_that_allow_no_key_give_zero_output_not_nan(float_mask, method):
    torch.manual_seed(0)
    module = PaddedSDPA().to(DT)
    T, lengths = 5, [5, 3, 1, 4]
    x, mask = _randn(len(lengths), T, 6, seed=3), _left_padded_mask(lengths, T, float_mask)
    with torch.no_grad():  # torch's own semantics: a fully masked row gives 0, and our decomposition agrees
        assert torch.equal(torch.isnan(module(x, mask)), torch.zeros(len(lengths), 3, dtype=torch.bool))
    y = torch.tensor([0, 2, 1, 1])
    loss_fn, params = functional_loss(module, _ce())
    batch = ((x, mask), y)
    dirs = _directions(params, K=2)
    g = per_sample_directional_derivatives(loss_fn, params, dirs, batch, method=method)
    h = per_sample_curvatures(loss_fn, params, dirs, batch, method=method)
    assert torch.isfinite(g).all() and torch.isfinite(h).all()
    fd_g = torch.stack([fd_first(loss_fn, params, {k: v[i] for k, v in dirs.items()}, batch) for i in range(2)], 1)
    fd_h = torch.stack([fd_second(loss_fn, params, {k: v[i] for k, v in dirs.items()}, batch) for i in range(2)], 1)
    _assert_fd_close(g, fd_g, f"left-padded sdpa first derivative ({method})")
    _assert_fd_close(h, fd_h, f"left-padded sdpa curvature ({method})")


def test_in_place_ops_fall_back_with_a_warning_and_tied_parameters_work():
    # nn.ReLU(inplace=True) mutates a tensor that carries a jet: the fast path says so and takes nested jvp.
    module = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)).to(DT)
    loss_fn, params = functional_loss(module, _ce())
    batch = _cls_batch((4,))
    dirs = _directions(params, K=1)
    with pytest.warns(PerSamplePathWarning,
                      match=r"cannot follow relu \(an in-place op.*with nested forward mode \(jvp of jvp"):
        h = per_sample_curvatures(loss_fn, params, dirs, batch)
    torch.testing.assert_close(h, per_sample_curvatures(loss_fn, params, dirs, batch, method="reference"))
    with pytest.warns(PerSamplePathWarning, match=r"cannot follow relu \(an in-place op.*with forward mode \(one jvp"):
        g = per_sample_directional_derivatives(loss_fn, params, dirs, batch)
    torch.testing.assert_close(g, per_sample_directional_derivatives(loss_fn, params, dirs, batch,
                                                                     method="reference"))
    # one tensor under two names: each name gets its own direction
    w = _randn(3, 4)
    params = {"a": w, "b": w}

    def tied(p, x):
        return (torch.tanh(x @ p["a"].T) * (x @ p["b"].T)).sum(1)

    x = _randn(B, 4, seed=3)
    dirs = _directions(params, K=2)
    h = per_sample_curvatures(tied, params, dirs, x)
    fd = torch.stack([fd_second(tied, params, {k: v[i] for k, v in dirs.items()}, x) for i in range(2)], 1)
    _assert_fd_close(h, fd, "tied parameters")


@pytest.mark.parametrize("name", ["linear-ce", "layernorm-gelu", "batchnorm1d-train", "multihead-attention",
                                  "mse-mean-functional", "dcs-linear"])
def test_directional_derivatives_match_finite_differences_and_reference(name):
    loss_fn, params, batch, ref_ok = _build(name)
    dirs = _directions(params, K=3)
    g = per_sample_directional_derivatives(loss_fn, params, dirs, batch)
    assert g.shape == (B, 3)
    fd = torch.stack([fd_first(loss_fn, params, {k: v[i] for k, v in dirs.items()}, batch) for i in range(3)], 1)
    _assert_fd_close(g, fd, f"{name}: directional derivative")
    if ref_ok:
        ref = per_sample_directional_derivatives(loss_fn, params, dirs, batch, method="reference")
        torch.testing.assert_close(g, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["layernorm-gelu", "batchnorm1d-train", "multihead-attention", "dcs-linear",
                                  "conv2d-relu"])
def test_hvp_projections_match_finite_differences(name):
    loss_fn, params, batch, ref_ok = _build(name)
    n = {k: v[0] for k, v in _directions(params, K=1, seed=5).items()}
    onto = _directions(params, K=2, seed=6)
    proj = per_sample_hvp(loss_fn, params, n, batch, onto=onto)
    assert proj.shape == (B, 2)
    fd = torch.stack([fd_mixed(loss_fn, params, n, {k: v[i] for k, v in onto.items()}, batch) for i in range(2)], 1)
    _assert_fd_close(proj, fd, f"{name}: m^T H n")

    full = per_sample_hvp(loss_fn, params, n, batch)
    assert set(full) == set(params) and all(full[k].shape == (B,) + params[k].shape for k in params)
    dotted = sum(torch.einsum("bp,kp->bk", full[k].reshape(B, -1), onto[k].reshape(2, -1)) for k in params)
    torch.testing.assert_close(dotted, proj, rtol=1e-9, atol=1e-9)
    if ref_ok:
        ref = per_sample_hvp(loss_fn, params, n, batch, method="reference")
        for k in params:
            torch.testing.assert_close(full[k], ref[k], rtol=1e-9, atol=1e-9)
        ref_proj = per_sample_hvp(loss_fn, params, n, batch, onto=onto, method="reference")
        torch.testing.assert_close(proj, ref_proj, rtol=1e-9, atol=1e-9)


def test_mixed_curvature_is_symmetric_and_matches_curvature_on_the_diagonal():
    loss_fn, params, batch, _ = _build("multihead-attention")
    dirs = _directions(params, K=2, seed=3)
    n0 = {k: v[0] for k, v in dirs.items()}
    n1 = {k: v[1] for k, v in dirs.items()}
    h = per_sample_curvatures(loss_fn, params, dirs, batch)
    a = per_sample_hvp(loss_fn, params, n0, batch, onto=dirs)
    b = per_sample_hvp(loss_fn, params, n1, batch, onto=dirs)
    torch.testing.assert_close(a[:, 0], h[:, 0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(b[:, 1], h[:, 1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(a[:, 1], b[:, 0], rtol=1e-10, atol=1e-10)  # m^T H n = n^T H m


# ------------------------------------------------------------ closed forms
def test_two_layer_linear_network_at_the_origin_eq6():
    """l = (x * sum_i u_i w_i - y)^2 / 2 at u = w = 0: H has blocks [[0, -xy], [-xy, 0]] (eq. 6).

    Along (e_u_i + e_w_i)/sqrt2 the curvature is -x*y, along (e_u_i - e_w_i)/sqrt2 it is +x*y
    (the paper's text pairs the eigenvalues the other way round; the matrix of eq. 6 is what counts).
    """
    d = 3
    x, y = _randn(B, seed=3), _randn(B, seed=4)

    def loss_fn(p, batch):
        xs, ys = batch
        return 0.5 * (xs * (p["u"] * p["w"]).sum() - ys) ** 2

    params = {"u": torch.zeros(d, dtype=DT), "w": torch.zeros(d, dtype=DT)}
    eye = torch.eye(d, dtype=DT) / math.sqrt(2)
    dirs = {"u": torch.cat([eye, eye]), "w": torch.cat([eye, -eye])}  # K = 2d
    h = per_sample_curvatures(loss_fn, params, dirs, (x, y))
    xy = (x * y).unsqueeze(1)
    torch.testing.assert_close(h, torch.cat([-xy.expand(B, d), xy.expand(B, d)], 1), rtol=1e-12, atol=1e-12)
    # Theorem 4.1: the gradient along every mirror direction vanishes at the symmetric solution.
    g = per_sample_directional_derivatives(loss_fn, params, dirs, (x, y))
    assert g.abs().max().item() == 0.0


def test_linear_regression_curvature_is_squared_projection():
    """l = (theta . x - y)^2 / 2: n^T H(x) n = (n . x)^2, exactly, for every sample."""
    d, K = 7, 4
    x, y = _randn(B, d, seed=5), _randn(B, seed=6)
    params = {"theta": _randn(d, seed=7)}
    dirs = {"theta": _randn(K, d, seed=8)}

    def loss_fn(p, batch):
        xs, ys = batch
        return 0.5 * (xs @ p["theta"] - ys) ** 2

    h = per_sample_curvatures(loss_fn, params, dirs, (x, y))
    torch.testing.assert_close(h, (x @ dirs["theta"].T) ** 2, rtol=1e-12, atol=1e-12)
    g = per_sample_directional_derivatives(loss_fn, params, dirs, (x, y))
    torch.testing.assert_close(g, (x @ params["theta"] - y).unsqueeze(1) * (x @ dirs["theta"].T))


# ----------------------------------------------------- chunking, dtypes, K
def test_chunking_does_not_change_results():
    loss_fn, params, batch, _ = _build("layernorm-gelu")
    dirs = _directions(params, K=5)
    base = per_sample_curvatures(loss_fn, params, dirs, batch)
    for kw in ({"chunk_size": 2}, {"chunk_size": 5}, {"batch_chunk_size": 4}, {"chunk_size": 3, "batch_chunk_size": 1}):
        torch.testing.assert_close(per_sample_curvatures(loss_fn, params, dirs, batch, **kw), base,
                                   rtol=1e-12, atol=1e-12, msg=str(kw))
    g = per_sample_directional_derivatives(loss_fn, params, dirs, batch)
    torch.testing.assert_close(per_sample_directional_derivatives(loss_fn, params, dirs, batch, chunk_size=2,
                                                                  batch_chunk_size=4), g)
    full = per_sample_hvp(loss_fn, params, {k: v[0] for k, v in dirs.items()}, batch)
    split = per_sample_hvp(loss_fn, params, {k: v[0] for k, v in dirs.items()}, batch, batch_chunk_size=4)
    for k in full:
        torch.testing.assert_close(split[k], full[k])


def test_batch_chunking_refuses_models_that_couple_samples():
    loss_fn, params, batch, _ = _build("batchnorm1d-train")
    dirs = _directions(params, K=1)
    with pytest.raises(UnsupportedOpError, match="batch_chunk_size"):
        per_sample_curvatures(loss_fn, params, dirs, batch, batch_chunk_size=2)
    with pytest.raises(UnsupportedOpError, match="batch_chunk_size"):
        per_sample_hvp(loss_fn, params, {k: v[0] for k, v in dirs.items()}, batch, batch_chunk_size=2)


def test_float32_fast_path_agrees_with_float64():
    loss_fn64, params64, batch64, _ = _build("multihead-attention")
    loss_fn32, params32, batch32, _ = _build("multihead-attention", dtype=torch.float32)
    dirs64 = _directions(params64, K=2)
    dirs32 = {k: v.float() for k, v in dirs64.items()}
    h64 = per_sample_curvatures(loss_fn64, params64, dirs64, batch64)
    h32 = per_sample_curvatures(loss_fn32, params32, dirs32, batch32)
    ref32 = per_sample_curvatures(loss_fn32, params32, dirs32, batch32, method="reference")
    assert h32.dtype == torch.float32
    # flash-attention's rule: our float32 error is at most ~2x that of the float32 reference path
    err, ref_err = (h32.double() - h64).abs().max(), (ref32.double() - h64).abs().max()
    assert err <= 2 * ref_err + 1e-5 * h64.abs().max(), (err, ref_err)


def test_zero_directions_give_empty_results():
    loss_fn, params, batch, _ = _build("linear-ce")
    dirs = {k: v.new_zeros((0,) + v.shape) for k, v in params.items()}
    assert per_sample_curvatures(loss_fn, params, dirs, batch).shape == (B, 0)
    assert per_sample_directional_derivatives(loss_fn, params, dirs, batch).shape == (B, 0)


def test_weight_decay_adds_two_gamma_norm_squared():
    module = nn.Linear(4, 3).to(DT)
    batch = _cls_batch((4,))
    plain, params = functional_loss(module, _ce())
    decayed, _ = functional_loss(module, _ce(), weight_decay=0.25)
    dirs = _directions(params, K=2)
    norm2 = sum(v.reshape(2, -1).pow(2).sum(1) for v in dirs.values())
    torch.testing.assert_close(per_sample_curvatures(decayed, params, dirs, batch),
                               per_sample_curvatures(plain, params, dirs, batch) + 0.5 * norm2)


def test_functional_loss_selects_parameters_and_leaves_module_untouched():
    module = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).to(DT)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    loss_fn, params = functional_loss(module, _ce(), parameters=["2.weight"])
    assert list(params) == ["2.weight"] and not params["2.weight"].requires_grad
    per_sample_curvatures(loss_fn, params, _directions(params, K=1), _cls_batch((4,)))
    for k, v in module.state_dict().items():  # running statistics are not updated
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="not parameters of the module"):
        functional_loss(module, _ce(), parameters=["nope"])


# ------------------------------------------------------------- refusals
def test_dropout_in_training_mode_is_refused():
    module = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Linear(5, 3)).to(DT)
    loss_fn, params = functional_loss(module, _ce())
    batch = _cls_batch((4,))
    with pytest.raises(UnsupportedOpError, match="dropout"):
        per_sample_curvatures(loss_fn, params, _directions(params, K=1), batch)
    module.eval()  # dropout off: fine, and equal to the model without dropout
    h = per_sample_curvatures(loss_fn, params, _directions(params, K=1), batch)
    assert torch.isfinite(h).all()


def test_attention_dropout_is_refused():
    torch.manual_seed(0)
    block = TransformerBlock().to(DT)
    block.attn.dropout = 0.1
    loss_fn, params = functional_loss(block, _ce())
    with pytest.raises(UnsupportedOpError, match="dropout"):
        per_sample_curvatures(loss_fn, params, _directions(params, K=1), _cls_batch((4, 8)))


@pytest.mark.parametrize("op", [torch.logdet, torch.linalg.det, lambda a: torch.linalg.slogdet(a)[1],
                                lambda a: torch.linalg.solve(a, a[:, :1]).sum()])
def test_ops_with_wrong_forward_rules_are_refused(op):
    params = {"a": torch.eye(3, dtype=DT) * 2 + 0.1 * _randn(3, 3)}

    def loss_fn(p, x):
        return x * op(p["a"] @ p["a"].T)

    with pytest.raises(UnsupportedOpError, match="wrong second derivatives"):
        per_sample_curvatures(loss_fn, params, _directions(params, K=1), _randn(B))


def test_missing_forward_rule_is_reported_not_hidden():
    # cdist has no forward-mode rule in PyTorch; the error names the problem.
    params = {"a": _randn(3, 2)}

    def loss_fn(p, x):
        return torch.cdist(x.reshape(-1, 1, 2), p["a"].unsqueeze(0)).sum((1, 2))

    with pytest.raises(UnsupportedOpError, match="no higher-order rule"):
        per_sample_curvatures(loss_fn, params, _directions(params, K=1), _randn(B, 2))


# --------------------------------------------------------------- bad inputs
def _simple():
    params = {"w": _randn(3), "b": _randn(())}

    def loss_fn(p, x):
        return (x @ p["w"] + p["b"]) ** 2

    return loss_fn, params, _randn(B, 3)


def test_scalar_loss_is_rejected_with_a_clear_message():
    _, params, x = _simple()
    with pytest.raises(ValueError, match=r"per-sample losses of shape \[B\], got shape \(\).*reduction='none'"):
        per_sample_curvatures(lambda p, x: ((x @ p["w"]) ** 2).mean(), params, _directions(params, 1), x)
    with pytest.raises(ValueError, match=r"got shape \(6, 1\)"):
        per_sample_directional_derivatives(lambda p, x: (x @ p["w"]).unsqueeze(1), params, _directions(params, 1), x)
    with pytest.raises(ValueError, match="reduction='none'"):
        functional_loss(nn.Linear(3, 2), nn.CrossEntropyLoss())


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda p: {"w": p["w"]}, r"directions is missing keys \['b'\]"),
        (lambda p: {**p, "z": p["w"]}, r"keys \['z'\] that are not in params"),
        (lambda p: {"w": p["w"][0], "b": p["b"]},
         r"directions\['w'\] must have shape \(K, \*params\['w'\].shape\) = \(K, 3\), got \(3,\)"),
        (lambda p: {"w": p["w"], "b": p["b"][:1]}, r"same leading K"),
        (lambda p: {"w": p["w"].float(), "b": p["b"]}, r"directions\['w'\] must have dtype torch.float64"),
        (lambda p: [p["w"]], "must be a dict of tensors"),
    ],
)
def test_bad_directions_are_rejected(bad, match):
    loss_fn, params, x = _simple()
    dirs = _directions(params, K=2)
    with pytest.raises((ValueError, TypeError), match=match):
        per_sample_curvatures(loss_fn, params, bad(dirs), x)


def test_bad_single_direction_and_options_are_rejected():
    loss_fn, params, x = _simple()
    match = r"direction\['w'\] must have the shape of params\['w'\], \(3,\), got \(1, 3\)"
    with pytest.raises(ValueError, match=match):
        per_sample_hvp(loss_fn, params, {"w": params["w"][None], "b": params["b"]}, x)
    with pytest.raises(ValueError, match="method must be one of"):
        per_sample_curvatures(loss_fn, params, _directions(params, 1), x, method="exact")
    with pytest.raises(ValueError, match="chunk_size must be None or a positive int, got 0"):
        per_sample_curvatures(loss_fn, params, _directions(params, 1), x, chunk_size=0)
    with pytest.raises(TypeError, match=r"params\['w'\] must be a floating tensor"):
        per_sample_curvatures(loss_fn, {"w": torch.ones(3, dtype=torch.long)}, {"w": torch.ones(1, 3)}, x)
    with pytest.raises(ValueError, match="params must hold at least one tensor"):
        per_sample_curvatures(loss_fn, {}, {}, x)


# ------------------------------------------------- constants inside loss_fn: integers, bools, no_grad
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("const", ["int-offset", "bool-mask", "cat-int"])
def test_integer_and_bool_constants_have_zero_derivative(const, method):
    # l_i = ||W x_i + c||^2 with c a non-floating constant: h_ik = 2 ||N_k x_i||^2 whatever c is.
    W, x = _randn(3, 4, seed=3), _randn(B, 4, seed=4)
    dirs = {"W": _randn(2, 3, 4, seed=5)}
    if const == "int-offset":
        lf = lambda q, b: ((b @ q["W"].T + torch.arange(3)) ** 2).sum(1)  # noqa: E731
    elif const == "bool-mask":
        lf = lambda q, b: ((b @ q["W"].T + (torch.arange(3) > 0)) ** 2).sum(1)  # noqa: E731
    else:
        lf = lambda q, b: (torch.cat([b @ q["W"].T, torch.full((b.shape[0], 2), 3)], 1) ** 2).sum(1)  # noqa: E731
    expected = 2 * torch.einsum("kij,bj->bki", dirs["W"], x).pow(2).sum(-1)
    torch.testing.assert_close(per_sample_curvatures(lf, {"W": W}, dirs, x, method=method), expected)


def _no_grad_td_loss(stop):
    # l_i = (tanh(w.s_i) - r_i - 0.9 tanh(w.s2_i))^2, the target computed under no_grad (or detached)
    def lf(p, batch):
        s, s2, r = batch
        q = torch.tanh(s @ p["w"])
        if stop == "no_grad":
            with torch.no_grad():
                target = r + 0.9 * torch.tanh(s2 @ p["w"])
        else:
            target = (r + 0.9 * torch.tanh(s2 @ p["w"])).detach()
        return (q - target) ** 2

    return lf


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("stop", ["no_grad", "detach"])
def test_no_grad_results_inside_loss_fn_are_constants_on_every_method(stop, method):
    w, n, m = _randn(4, seed=6), _randn(4, seed=7), _randn(2, 4, seed=8)
    s, s2, r = _randn(B, 4, seed=9), _randn(B, 4, seed=10), _randn(B, seed=11)
    batch, params = (s, s2, r), {"w": w}
    # closed form with the target frozen: u = w.s, t = tanh u, l = (t - c)^2
    t = torch.tanh(s @ w)
    c = r + 0.9 * torch.tanh(s2 @ w)
    d1, d2 = 1 - t * t, -2 * t * (1 - t * t)
    sn, sm = s @ n, s @ m.T
    g = 2 * (t - c) * d1 * sn
    coef = 2 * d1 * d1 + 2 * (t - c) * d2  # d2l/du2
    h, mhn = coef * sn * sn, coef[:, None] * sm * sn[:, None]
    hvp = (coef * sn)[:, None] * s
    # autograd (reverse mode respects no_grad) agrees on g: the expected values mean what autograd means
    wr = w.clone().requires_grad_(True)
    losses = _no_grad_td_loss("no_grad")({"w": wr}, batch)
    g_autograd = torch.stack([torch.autograd.grad(losses[i], wr, retain_graph=True)[0] @ n for i in range(B)])
    torch.testing.assert_close(g_autograd, g)
    lf = _no_grad_td_loss(stop)
    torch.testing.assert_close(
        per_sample_directional_derivatives(lf, params, {"w": n[None]}, batch, method=method)[:, 0], g)
    torch.testing.assert_close(per_sample_curvatures(lf, params, {"w": n[None]}, batch, method=method)[:, 0], h)
    torch.testing.assert_close(per_sample_hvp(lf, params, {"w": n}, batch, onto={"w": m}, method=method), mhn)
    torch.testing.assert_close(per_sample_hvp(lf, params, {"w": n}, batch, method=method)["w"], hvp)
    # called under an outer no_grad, the derivatives are still computed
    with torch.no_grad():
        torch.testing.assert_close(
            per_sample_curvatures(_no_grad_td_loss("no_grad"), params, {"w": n[None]}, batch)[:, 0], h)


@pytest.mark.parametrize("method", ["fast", "forward"])
@pytest.mark.parametrize("layer", ["linear", "conv2d"])
def test_bias_differentiated_with_frozen_weight(layer, method):
    # BitFit: only the bias is a parameter of the loss; the bias derivative broadcasts to the output.
    torch.manual_seed(0)
    if layer == "linear":
        module, batch = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT), _cls_batch((5,))
        names = ["2.bias"]  # straight into the cross-entropy (a generic, shape-checked rule)
    else:
        module = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Tanh(), nn.Linear(12, 3)).to(DT)
        batch, names = _cls_batch((2, 4, 4)), ["0.bias"]
    loss_fn, params = functional_loss(module, _ce(), parameters=names)
    dirs = _directions(params, K=2)
    ref = per_sample_curvatures(loss_fn, params, dirs, batch, method="reference")
    for k in range(2):
        _assert_fd_close(ref[:, k], fd_second(loss_fn, params, {n: d[k] for n, d in dirs.items()}, batch), "ref")
    torch.testing.assert_close(per_sample_curvatures(loss_fn, params, dirs, batch, method=method), ref)
    for name, p in module.named_parameters():  # frozen weights: the default parameters are the biases
        p.requires_grad_(name.endswith("bias"))
    loss_fn, params = functional_loss(module, _ce())
    dirs = _directions(params, K=2)
    torch.testing.assert_close(per_sample_curvatures(loss_fn, params, dirs, batch),
                               per_sample_curvatures(loss_fn, params, dirs, batch, method="reference"))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("B_, K", [(0, 2), (B, 0), (0, 0)])
def test_reference_method_returns_empty_shapes_like_the_fast_path(B_, K, method):
    W, x = _randn(3, 4, seed=3), _randn(B_, 4, seed=4)
    params, dirs = {"W": W}, {"W": torch.zeros(K, 3, 4, dtype=DT)}
    lf = lambda q, b: ((b @ q["W"].T) ** 2).sum(1)  # noqa: E731
    for out in (per_sample_curvatures(lf, params, dirs, x, method=method),
                per_sample_directional_derivatives(lf, params, dirs, x, method=method),
                per_sample_hvp(lf, params, {"W": W}, x, onto=dirs, method=method)):
        assert out.shape == (B_, K), out.shape


@pytest.mark.parametrize("method", METHODS)
def test_numpy_integer_chunk_sizes_are_accepted(method):
    np = pytest.importorskip("numpy")
    loss_fn, params, batch, _ = _build("mlp-tanh-mse")
    dirs = _directions(params, K=3)
    fd = torch.stack([fd_second(loss_fn, params, {k: v[i] for k, v in dirs.items()}, batch) for i in range(3)], 1)
    h = per_sample_curvatures(loss_fn, params, dirs, batch, method=method, chunk_size=np.int64(2),
                              batch_chunk_size=None if method == "reference" else np.int32(4))
    _assert_fd_close(h, fd, method)


def test_non_integer_chunk_sizes_are_refused():
    np = pytest.importorskip("numpy")
    loss_fn, params, batch, _ = _build("mlp-tanh-mse")
    dirs = _directions(params, K=3)
    for bad in (np.float64(2.0), True, 2.5, "2"):
        with pytest.raises(ValueError, match=r"chunk_size must be None or a positive int, got " + re.escape(repr(bad))):
            per_sample_curvatures(loss_fn, params, dirs, batch, chunk_size=bad)


@pytest.mark.parametrize("spelling", ["public", "raw-op"])
def test_symfast_ops_stay_on_the_fast_path(spelling):
    """symfast.dcs / dcs_group reach the jets as their custom ops (the C++ autograd op in eager
    mode, the raw op under torch.compile): each has a jet rule, so no fallback."""
    w, u, s, mask = _randn(4, 5, seed=1), _randn(4, 5, seed=2), _randn(4, seed=3), _randn(4, 5, seed=4) > 0
    params = {"w": w, "u": u, "v": _randn(4, 5, seed=5), "s": s}
    if spelling == "public":
        dcs, group = symfast.dcs, symfast.dcs_group
    else:
        dcs, group = torch.ops.symfast.dcs, torch.ops.symfast.dcs_group

    def loss_fn(p, x):
        a = F.linear(x, dcs(p["w"], p["u"], p["v"], mask))
        return torch.tanh(F.linear(a, group(p["w"], p["s"], 0).T)).pow(2).sum(1)

    x = _randn(B, 5, seed=6)
    dirs = _directions(params, K=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerSamplePathWarning)
        h = per_sample_curvatures(loss_fn, params, dirs, x)
        g = per_sample_directional_derivatives(loss_fn, params, dirs, x)

    def public(p, x):  # the raw ops have no forward-mode rule: the reference runs the public spelling
        a = F.linear(x, symfast.dcs(p["w"], p["u"], p["v"], mask))
        return torch.tanh(F.linear(a, symfast.dcs_group(p["w"], p["s"], 0).T)).pow(2).sum(1)

    torch.testing.assert_close(h, per_sample_curvatures(public, params, dirs, x, method="reference"),
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g, per_sample_directional_derivatives(public, params, dirs, x, method="reference"),
                               rtol=1e-10, atol=1e-10)


# the vmap rules let the reference path (vmap over samples) batch them
class _Cube(CubeJvp):
    @staticmethod
    def vmap(info, in_dims, x):
        return _Cube.apply(x), in_dims[0]


class _OnceCube(OnceCubeJvp):
    @staticmethod
    def vmap(info, in_dims, x):
        return _OnceCube.apply(x), in_dims[0]


class _CubeNoJvp(Cube):
    @staticmethod
    def vmap(info, in_dims, x):
        return _CubeNoJvp.apply(x), in_dims[0]


def _cube_model(fn):
    """l_i = sum_j c(x_i . w_j) + 0.5 |w|^2 with c(z) = z^3 by ``fn``: closed-form derivatives."""
    params = {"w": _randn(3, 4)}

    def loss_fn(p, x):
        return fn.apply(x @ p["w"].T).sum(1) + 0.5 * (p["w"] ** 2).sum()

    return loss_fn, params, _randn(B, 4, seed=3)


def _cube_second(params, x, n, m):
    """m^T H_i n = sum_j 6 (x_i . w_j)(x_i . n_j)(x_i . m_j) + m . n, per sample."""
    return (6 * (x @ params["w"].T) * (x @ n["w"].T) * (x @ m["w"].T)).sum(1) + (n["w"] * m["w"]).sum()


@pytest.mark.parametrize("method", ["fast", "forward"])
def test_autograd_function_with_jvp_routes_to_forward_over_reverse_and_is_exact(method):
    # torch.func's jvp of jvp drops the Function's second derivative (the outer jvp does not
    # differentiate its jvp rule): the nested-forward path would give 6 z (x.n)^2 -> 0 here.
    fn = _Cube
    loss_fn, params, x = _cube_model(fn)
    dirs = _directions(params, K=2)
    with pytest.warns(PerSamplePathWarning, match=rf"runs autograd.Function '{fn.__qualname__}'; nested forward "
                                                  r"mode .* forward over reverse per sample"):
        h = per_sample_curvatures(loss_fn, params, dirs, x, method=method)
    exact = torch.stack([_cube_second(params, x, *[{"w": dirs["w"][k]}] * 2) for k in range(2)], 1)
    torch.testing.assert_close(h, exact, rtol=1e-12, atol=1e-12)
    fd = torch.stack([fd_second(loss_fn, params, {"w": dirs["w"][k]}, x) for k in range(2)], 1)
    _assert_fd_close(h, fd, "Function with jvp")

    n, onto = {"w": dirs["w"][0]}, _directions(params, K=2, seed=4)
    with pytest.warns(PerSamplePathWarning, match="forward over reverse per sample"):
        proj = per_sample_hvp(loss_fn, params, n, x, onto=onto)
    exact = torch.stack([_cube_second(params, x, n, {"w": onto["w"][k]}) for k in range(2)], 1)
    torch.testing.assert_close(proj, exact, rtol=1e-12, atol=1e-12)
    # first order (one jvp) and reverse over forward (grad of jvp) are exact through the Function
    g = per_sample_directional_derivatives(loss_fn, params, dirs, x, method="forward")
    fd1 = torch.stack([fd_first(loss_fn, params, {"w": dirs["w"][k]}, x) for k in range(2)], 1)
    _assert_fd_close(g, fd1, "Function with jvp: g")
    full = per_sample_hvp(loss_fn, params, n, x)["w"]
    torch.testing.assert_close(torch.einsum("bij,kij->bk", full, onto["w"]), exact, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["fast", "forward", "reference"])
def test_a_once_differentiable_function_is_refused_even_with_a_jvp(method):
    # forward over reverse runs its backward under no_grad and loses the part of H that flows
    # through the Function's input (see test_per_sample): no second-order path is exact, so every
    # method refuses, naming it. The full per-sample product (grad of jvp) differentiates the jvp
    # rule, not the backward, and stays exact.
    loss_fn, params, x = _cube_model(_OnceCube)
    dirs = _directions(params, K=2)
    match = r"cannot differentiate autograd.Function '_OnceCube': its backward is marked @once_differentiable"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PerSamplePathWarning)
        with pytest.raises(UnsupportedOpError, match=match):
            per_sample_curvatures(loss_fn, params, dirs, x, method=method)
        with pytest.raises(UnsupportedOpError, match=match):
            per_sample_hvp(loss_fn, params, {"w": dirs["w"][0]}, x, onto=dirs, method=method)
        n, m = {"w": dirs["w"][0]}, {"w": dirs["w"][1]}
        full = per_sample_hvp(loss_fn, params, n, x)["w"]
    torch.testing.assert_close((full * m["w"]).sum((1, 2)), _cube_second(params, x, n, m), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["fast", "forward", "reference"])
def test_autograd_function_without_jvp_is_refused_naming_it(method):
    loss_fn, params, x = _cube_model(_CubeNoJvp)
    dirs = _directions(params, K=1)
    match = "_CubeNoJvp' has no jvp staticmethod" if method != "reference" else "implement the jvp"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no path change is announced: the call stops
        with pytest.raises((UnsupportedOpError, NotImplementedError), match=match):
            per_sample_curvatures(loss_fn, params, dirs, x, method=method)
        if method != "reference":
            with pytest.raises(UnsupportedOpError, match=match):
                per_sample_hvp(loss_fn, params, {"w": dirs["w"][0]}, x, onto=dirs, method=method)


def _many_ops(p, batch):
    """A loss through most jet rules: affine, shape, bilinear, elementwise, rows, indexing."""
    x, ids, t = batch
    W, V, E, c = p["W"], p["V"], p["E"], p["c"]
    a = torch.addmm(c, x, W.T, beta=0.5, alpha=2.0)              # [B, 4]
    a = a + E[ids].sum(1) + F.embedding(ids, E).mean(1)          # tensor index, embedding
    b = torch.stack([a, 1 - a, a / 3.0, a.exp() * 0.1], 1)       # [B, 4, 4]: stack, rsub, div, exp
    b = torch.baddbmm(b, b, b.transpose(1, 2), beta=0.3, alpha=0.2)
    b = b.permute(0, 2, 1).reshape(b.shape[0], -1).unflatten(1, (2, 8)).mT   # [B, 8, 2]
    v = torch.matmul(b, V)                                        # 3-D @ 1-D
    v = torch.where(v > 0, v, 0.5 * v.pow(3)) + torch.sqrt(v * v + 1.0).log() + v.sin() * v.cos()
    v = v.masked_fill(torch.arange(8) % 3 == 0, -2.0) + torch.rsqrt(1.0 + a.pow(2).mean(1, keepdim=True))
    u, w = v.split([3, 5], dim=1)
    z = torch.cat([u.softmax(0) * 2.0, F.log_softmax(w, -1), torch.reciprocal(2.0 + u.tanh())[:, :, None].expand(
        -1, -1, 1).squeeze(-1)], 1)                              # [B, 11]
    z = F.layer_norm(z, (11,), p["g"], None) + F.rms_norm(z, (11,), p["g"], 1e-3) if hasattr(F, "rms_norm") \
        else F.layer_norm(z, (11,), p["g"], None)
    z = torch.einsum("bi,ij->bj", z, p["H"])
    # logsumexp and atan: the generic rule (nested jvp of the op, vmapped over K)
    return F.cross_entropy(z, t, reduction="none", ignore_index=1) + F.softplus(z, 2.0).sum(1) \
        + torch.logsumexp(torch.atan(z), 1) \
        + F.silu(z).mean(1) + F.gelu(z, approximate="tanh")[:, 0] + torch.sigmoid(z)[:, -1]


def test_every_rule_agrees_with_nested_forward_mode_and_stays_on_the_fast_path():
    params = {"W": _randn(4, 5, seed=1), "V": _randn(2, seed=2), "E": _randn(7, 4, seed=3) * 0.3,
              "c": _randn(4, seed=4), "g": _randn(11, seed=5), "H": _randn(11, 3, seed=6)}
    g = torch.Generator().manual_seed(7)
    batch = (_randn(B, 5, seed=8), torch.randint(0, 7, (B, 3), generator=g), torch.tensor([0, 1, 2, 1, 0, 2]))
    dirs = _directions(params, K=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerSamplePathWarning)
        h = per_sample_curvatures(_many_ops, params, dirs, batch)
        gd = per_sample_directional_derivatives(_many_ops, params, dirs, batch)
    torch.testing.assert_close(h, per_sample_curvatures(_many_ops, params, dirs, batch, method="forward"),
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gd, per_sample_directional_derivatives(_many_ops, params, dirs, batch,
                                                                      method="forward"), rtol=1e-10, atol=1e-10)
    fd = torch.stack([fd_second(_many_ops, params, {k: v[i] for k, v in dirs.items()}, batch) for i in range(3)], 1)
    _assert_fd_close(h, fd, "many ops")


REDUCTIONS = {
    "sum-dims": lambda y: y.sum((1, 2)),
    "mean-last": lambda y: y.mean(-1).sum(1),
    "keepdim": lambda y: torch.sum(y, 1, keepdim=True).mean(2)[:, 0],
    "dim-list": lambda y: y.sum(dim=[2, 1]) + y.mean(dim=1, keepdim=True).sum((1, 2)),
    "dtype": lambda y: y.sum(1, dtype=DT).sum(1),
    "all": lambda y: y.sum(1).pow(2).sum(1) + y.sum() * torch.ones(B, dtype=DT)
    + y.mean(dim=None, keepdim=True).reshape(1).expand(B),
}


@pytest.mark.parametrize("name", list(REDUCTIONS))
def test_reductions_act_on_each_direction(name):
    params = {"W": _randn(3, 4, 5, seed=1)}

    def loss_fn(p, x):
        return REDUCTIONS[name](torch.tanh(torch.einsum("bi,jik->bjk", x, p["W"])))

    x = _randn(B, 4, seed=2)
    dirs = _directions(params, K=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerSamplePathWarning)
        h = per_sample_curvatures(loss_fn, params, dirs, x)
    torch.testing.assert_close(h, per_sample_curvatures(loss_fn, params, dirs, x, method="forward"),
                               rtol=1e-10, atol=1e-10)


def test_in_place_activation_passed_by_position_falls_back_with_a_warning():
    params = {"W": _randn(3, 4, seed=1)}

    def loss_fn(p, x):
        return F.silu(x @ p["W"].T, True).pow(2).sum(1)  # inplace=True by position

    x = _randn(B, 4, seed=2)
    dirs = _directions(params, K=2)
    with pytest.warns(PerSamplePathWarning, match=r"cannot follow silu \(an in-place op"):
        h = per_sample_curvatures(loss_fn, params, dirs, x)
    torch.testing.assert_close(h, per_sample_curvatures(loss_fn, params, dirs, x, method="reference"))


INDEXING = {
    "lists-apart": lambda y: y[:, [0, 2], :, [1, 3]],  # advanced indices apart: their dims go first
    "lists-adjacent": lambda y: y[:, [0, 1], [1, 0]],
    "slices-ellipsis-none": lambda y: y[..., 1:3, None],
    "tensor": lambda y: y[:, torch.tensor([2, 0])],
    "bool-mask": lambda y: y[y.detach() > 0.2].reshape(1, -1).expand(B, -1),
}


@pytest.mark.parametrize("name", list(INDEXING))
def test_indexing_acts_on_each_direction(name):
    params = {"W": _randn(3, 4, 5, seed=1)}

    def loss_fn(p, x):
        y = torch.tanh(torch.einsum("bi,jik->bjk", x, p["W"]))[:, :, None, :].expand(-1, -1, 2, -1)
        return INDEXING[name](y).pow(2).reshape(B, -1).sum(1)

    x = _randn(B, 4, seed=2)
    dirs = _directions(params, K=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerSamplePathWarning)
        h = per_sample_curvatures(loss_fn, params, dirs, x)
    torch.testing.assert_close(h, per_sample_curvatures(loss_fn, params, dirs, x, method="forward"),
                               rtol=1e-10, atol=1e-10)


def test_batch_with_autograd_history_is_data_on_the_fast_path():
    params = {"W": _randn(3, 4, seed=1)}
    x = _randn(B, 4, seed=2).requires_grad_(True) * 1.5  # the output of some other differentiable computation

    def loss_fn(p, x):
        return torch.tanh(x @ p["W"].T).pow(2).sum(1)

    dirs = _directions(params, K=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerSamplePathWarning)
        h = per_sample_curvatures(loss_fn, params, dirs, x)
    torch.testing.assert_close(h, per_sample_curvatures(loss_fn, params, dirs, x.detach(), method="reference"))
