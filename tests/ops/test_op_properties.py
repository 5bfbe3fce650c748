"""Property tests: symfast.dcs and symfast.dcs_group equal symfast.reference bit for bit on random inputs.

hypothesis draws the inputs (shapes incl. empty and past the kernels' grain size, the four dtypes,
contiguous / transposed / strided / stride-0 expanded views, no mask / bool / float 0-1 / broadcast /
0-d masks, NaN and inf in w, u and v where the mask is 0, one or two intra-op threads) and every
path a user can take through the op is compared with the reference formula it implements: the call,
autograd backward, torch.func.grad, torch.func.jvp, torch.func.vmap (of the call and of grad), and
forward AD. The comparison is on the bits (NaN payloads and the sign of zero included), since both
sides round each product once from the same operands.

The one exception is dcs_group's gate gradient, a per-group sum whose order differs from torch.sum's:
it is held to the low-precision rule of tests/ops/test_dcs_group.py.

``make test`` runs a bounded, derandomized number of examples (the "suite" profile); set
``SYMFAST_HYPOTHESIS_PROFILE=thorough`` for many more, drawn afresh on each run (see conftest.py).
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
import torch.func as tf
from hypothesis import given, strategies as st

import symfast
from symfast import reference as ref

from matrix import FLOAT_DTYPES
from test_dcs_group import _assert_gate_grad

INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
            torch.bfloat16: torch.int16}


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert got.dtype == want.dtype, (what, got.dtype, want.dtype)
    same = got.view(INT_VIEW[got.dtype]) == want.view(INT_VIEW[want.dtype])
    if not bool(same.all()):
        i = int((~same).flatten().nonzero()[0])
        raise AssertionError(f"{what}: {int((~same).sum())} of {same.numel()} elements differ in their bits, "
                             f"first at flat index {i}: got {got.flatten()[i].item()!r}, "
                             f"want {want.flatten()[i].item()!r}")


# ---------------------------------------------------------------- strategies
def _shapes():
    small = st.lists(st.integers(0, 6), min_size=0, max_size=4).map(tuple)
    # Past the kernels' grain size, so the parallel loops run on several threads.
    large = st.tuples(st.integers(1, 3), st.integers(20_000, 40_000))
    return st.one_of(small, small, small, large)


def _layouts(ndim):
    return st.sampled_from(["contiguous"] + (["strided", "expand"] if ndim >= 1 else [])
                           + (["transposed"] if ndim >= 2 else []))


def _view(shape, dtype, layout, seed, expand_dim):
    """A tensor of logical ``shape`` in ``layout``, and for each of its elements the flat index into
    the storage it reads (so values can be planted where a mask hides every reader)."""
    if layout == "transposed":
        base_shape = shape[:-2] + (shape[-1], shape[-2])
        to_view = lambda t: t.transpose(-1, -2)
    elif layout == "strided":
        base_shape = shape[:-1] + (2 * shape[-1],)
        to_view = lambda t: t[..., ::2]
    elif layout == "expand":  # stride 0 along expand_dim
        k = expand_dim % len(shape)
        base_shape = shape[:k] + (1,) + shape[k + 1:]
        to_view = lambda t: t.expand(shape)
    else:
        base_shape = shape
        to_view = lambda t: t
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(base_shape, generator=g, dtype=torch.float64).to(dtype)
    index = torch.arange(base.numel()).view(base_shape)
    return base, to_view, to_view(index)


def _plant_non_finite(base, index, hidden, seed):
    """NaN, inf and -inf into the storage elements whose every reader is masked off (hidden)."""
    read = torch.zeros(base.numel(), dtype=torch.bool)
    read[index[~hidden]] = True
    free = (~read).nonzero().flatten()
    if free.numel() == 0:
        return
    g = torch.Generator().manual_seed(seed)
    pick = free[torch.rand(free.numel(), generator=g) < 0.5]
    specials = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=base.dtype)
    base.view(-1)[pick] = specials[torch.randint(0, 3, (pick.numel(),), generator=g)]


@st.composite
def dcs_cases(draw):
    shape = draw(_shapes())
    ndim = len(shape)
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)

    mask_kinds = ["none", "bool", "float", "0-d"] + (["broadcast"] if ndim >= 1 else [])
    mask_kind = draw(st.sampled_from(mask_kinds))
    if mask_kind == "none":
        mask = None
    elif mask_kind == "0-d":
        mask = torch.tensor(draw(st.booleans()))
    else:
        mshape = shape
        if mask_kind == "broadcast":  # fewer leading dims, and size 1 where it broadcasts
            keep = draw(st.integers(0, ndim))
            ones = draw(st.lists(st.booleans(), min_size=keep, max_size=keep))
            mshape = tuple(1 if one else n for one, n in zip(ones, shape[ndim - keep:]))
        mask = torch.rand(mshape, generator=g) < draw(st.sampled_from([0.0, 0.5, 1.0]))
        if mask_kind == "float":
            mask = mask.to(draw(st.sampled_from([torch.float32, dtype])))
    hidden = (torch.zeros(shape, dtype=torch.bool) if mask is None
              else ~ref._bool_mask(mask).expand(shape))

    tensors, tangents = {}, {}
    names = ["w", "u"] + (["v"] if mask is not None and draw(st.booleans()) else [])
    for i, name in enumerate(names):
        layout = draw(_layouts(ndim))
        base, to_view, index = _view(shape, dtype, layout, seed + 1 + i, draw(st.integers(0, 7)))
        if mask is not None and draw(st.booleans()):
            # w and u are not read where the mask is 0; v is (it is theta there), so its
            # non-finite values must come out exactly as they went in.
            _plant_non_finite(base, index, hidden if name != "v" else torch.ones(shape, dtype=torch.bool),
                              seed + 10 + i)
        tensors[name] = to_view(base)
        # A tangent has its primal's layout: forward AD cannot attach a dense tangent to a stride-0 primal.
        tangents[name] = to_view(torch.randn(base.shape, generator=g, dtype=torch.float64).to(dtype))
    cot = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    threads = draw(st.sampled_from([1, 2]))
    return tensors, mask, cot, tangents, threads


@st.composite
def group_cases(draw):
    shape = draw(_shapes().filter(lambda s: len(s) >= 1))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    dim = draw(st.integers(-len(shape), len(shape) - 1))
    seed = draw(st.integers(0, 2**31 - 1))
    base, to_view, _ = _view(shape, dtype, draw(_layouts(len(shape))), seed, draw(st.integers(0, 7)))
    w = to_view(base)
    G = shape[dim]
    s_layout = draw(st.sampled_from(["contiguous", "strided", "expand"]))
    s_base, s_view, _ = _view((G,), dtype, s_layout, seed + 1, 0)
    if draw(st.booleans()):  # dead gates: exactly zero
        s_base[torch.rand(s_base.shape, generator=torch.Generator().manual_seed(seed + 2)) < 0.3] = 0
    s = s_view(s_base)
    g = torch.Generator().manual_seed(seed + 3)
    cot = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    w_dot = to_view(torch.randn(base.shape, generator=g, dtype=torch.float64).to(dtype))  # the primal's layout
    s_dot = s_view(torch.randn(s_base.shape, generator=g, dtype=torch.float64).to(dtype))
    threads = draw(st.sampled_from([1, 2]))
    return w, s, dim, cot, (w_dot, s_dot), threads


class _threads:
    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


# ----------------------------------------------------------------------- dcs
@given(dcs_cases())
def test_dcs_every_path_equals_the_reference_bitwise(case):
    tensors, mask, cot, tangents, threads = case
    names = list(tensors)
    w, u, v = tensors["w"], tensors["u"], tensors.get("v")
    with _threads(threads):
        _check_dcs(names, w, u, v, mask, cot, tangents)


def _check_dcs(names, w, u, v, mask, cot, tangents):
    args = [tensors for tensors in (w, u, v) if tensors is not None]

    def f(*p):
        return symfast.dcs(p[0], p[1], p[2] if len(p) > 2 else None, mask)

    theta = ref.dcs(w, u, v, mask)
    assert_same_bits(f(*args), theta, "call")

    want_grads = ref.dcs_backward(cot, w, u, mask, True, True, v is not None)[: len(args)]
    leaves = [a.detach().requires_grad_() for a in args]  # detach keeps the view's strides
    out = f(*leaves)
    assert_same_bits(out.detach(), theta, "autograd forward")
    for n, got, want in zip(names, torch.autograd.grad(out, leaves, cot), want_grads):
        assert_same_bits(got, want, f"backward d/d{n}")

    argnums = tuple(range(len(args)))
    for n, got, want in zip(names, tf.grad(lambda *p: (f(*p) * cot).sum(), argnums)(*args), want_grads):
        # sum(theta * cot) differentiates to cot * dtheta/dp elementwise: the backward formula itself.
        assert_same_bits(got, want, f"torch.func.grad d/d{n}")

    tans = [tangents[n] for n in names]
    want_tan = ref.dcs_jvp(w, u, mask, tans[0], tans[1], tans[2] if v is not None else None)
    primal, tan = tf.jvp(f, tuple(args), tuple(tans))
    assert_same_bits(primal, theta, "torch.func.jvp primal")
    assert_same_bits(tan, want_tan, "torch.func.jvp tangent")

    with fwAD.dual_level():
        dual = f(*[fwAD.make_dual(a, t) for a, t in zip(args, tans)])
        p, t = fwAD.unpack_dual(dual)
        assert_same_bits(p, theta, "forward AD primal")
        assert_same_bits(t, want_tan, "forward AD tangent")

    if w.dim() >= 1 and w.shape[0] >= 1:  # vmap over the first dim (torch.func maps no size-0 batch)
        m_dim = None
        m = mask
        if mask is not None and mask.dim() == w.dim():
            if mask.shape[0] == w.shape[0]:
                m_dim = 0
            else:
                m = mask.squeeze(0)  # broadcast along the batch: the same mask for every sample
        in_dims = (0,) * len(args) + (m_dim,)
        mapped = lambda *p: symfast.dcs(p[0], p[1], p[2] if len(p) > 3 else None, p[-1])
        assert_same_bits(tf.vmap(mapped, in_dims=in_dims)(*args, m), theta, "vmap")
        grad_one = tf.grad(lambda *p: (mapped(*p[:-1]) * p[-1]).sum(), argnums)
        per_sample = tf.vmap(grad_one, in_dims=in_dims + (0,))(*args, m, cot)
        for n, got, want in zip(names, per_sample, want_grads):
            assert_same_bits(got, want, f"vmap(grad) d/d{n}")


# ----------------------------------------------------------------- dcs_group
@given(group_cases())
def test_dcs_group_every_path_equals_the_reference(case):
    w, s, dim, cot, (w_dot, s_dot), threads = case
    with _threads(threads):
        _check_group(w, s, dim, cot, w_dot, s_dot)


def _check_group(w, s, dim, cot, w_dot, s_dot):
    f = lambda w, s: symfast.dcs_group(w, s, dim)
    theta = ref.dcs_group(w, s, dim)
    assert_same_bits(f(w, s), theta, "call")
    want_gw = ref.dcs_group_backward(cot, w, s, dim, True, False)[0]

    leaves = [w.detach().requires_grad_(), s.detach().requires_grad_()]
    out = f(*leaves)
    assert_same_bits(out.detach(), theta, "autograd forward")
    gw, gs = torch.autograd.grad(out, leaves, cot)
    assert_same_bits(gw, want_gw, "backward d/dw")
    _assert_gate_grad(gs, cot, w, s, dim)

    gw, gs = tf.grad(lambda w, s: (f(w, s) * cot).sum(), (0, 1))(w, s)
    assert_same_bits(gw, want_gw, "torch.func.grad d/dw")
    _assert_gate_grad(gs, cot, w, s, dim)

    want_tan = ref.dcs_group_jvp(w, s, dim, w_dot, s_dot)
    primal, tan = tf.jvp(f, (w, s), (w_dot, s_dot))
    assert_same_bits(primal, theta, "torch.func.jvp primal")
    assert_same_bits(tan, want_tan, "torch.func.jvp tangent")
    with fwAD.dual_level():
        p, t = fwAD.unpack_dual(f(fwAD.make_dual(w, w_dot), fwAD.make_dual(s, s_dot)))
        assert_same_bits(p, theta, "forward AD primal")
        assert_same_bits(t, want_tan, "forward AD tangent")

    # vmap over a new leading batch dim of w (two samples), the gates shared or batched too.
    W = torch.stack([w, -w])
    d = dim % w.dim()
    for s_batched in (False, True):
        S = torch.stack([s, s.flip(0)]) if s_batched else s
        got = tf.vmap(f, in_dims=(0, 0 if s_batched else None))(W, S)
        for b in range(2):
            assert_same_bits(got[b], ref.dcs_group(W[b], S[b] if s_batched else S, d), f"vmap sample {b}")
