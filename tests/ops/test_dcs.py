"""symfast.dcs and its backward/forward-mode ops against the pure-PyTorch reference.

Every case compares values and gradients with symfast.reference, and the
transforms (gradcheck, gradgradcheck, opcheck, torch.compile, torch.func)
run on the compiled ops.
"""

import itertools

import pytest
import torch
import torch.func as tf

import symfast
from symfast import reference as ref

from matrix import DEVICES, FLOAT_DTYPES

ops = torch.ops.symfast

# Shapes: 0-d, empty, odd sizes and sizes that are not a multiple of any SIMD
# width, and one large enough (> grain size) to run on several threads.
SHAPES = [(), (0,), (3, 0, 2), (1,), (7,), (33,), (5, 7), (3, 4, 5), (2, 3, 5, 7), (70001,)]


def _randn(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def _mask_variants(shape, device):
    """None, a bool mask, a float 0/1 mask, and (where possible) a broadcast mask."""
    g = torch.Generator().manual_seed(123)
    full = (torch.rand(shape, generator=g) > 0.5).to(device)
    yield "none", None
    yield "bool", full
    yield "float", full.to(torch.float32)
    if len(shape) >= 1:
        yield "broadcast-last", (torch.rand(shape[-1:], generator=g) > 0.5).to(device)
    if len(shape) >= 2:
        yield "broadcast-col", (torch.rand(shape[:-1] + (1,), generator=g) > 0.5).to(device)


def _inputs(shape, dtype, device, mask_kind, with_v=True, requires_grad=False):
    w, u, v = (_randn(shape, dtype, device, s) for s in (1, 2, 3))
    mask = dict(_mask_variants(shape, device))[mask_kind]
    if mask is None or not with_v:
        v = None
    for t in (w, u, v):
        if t is not None:
            t.requires_grad_(requires_grad)
    return w, u, v, mask


# The kernels and the reference round each product once from the same
# operands (half types through float), so they must agree bit for bit in every
# dtype; the low-precision rule below checks accuracy against float64.
EXACT = dict(atol=0, rtol=0)


CASES = [
    (shape, kind)
    for shape in SHAPES
    for kind, _ in _mask_variants(shape, "cpu")
]


# ------------------------------------------------------------------ values
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape,mask_kind", CASES)
@pytest.mark.parametrize("with_v", [True, False])
def test_forward_and_backward_match_reference(device, dtype, shape, mask_kind, with_v):
    w, u, v, mask = _inputs(shape, dtype, device, mask_kind, with_v, requires_grad=True)
    out = symfast.dcs(w, u, v, mask)
    expected = ref.dcs(w, u, v, mask)
    assert out.shape == expected.shape and out.dtype == dtype and out.is_contiguous()
    # Both round w*u once from the exact product, so they agree bit for bit.
    torch.testing.assert_close(out, expected, **EXACT)
    g = _randn(shape, dtype, device, 9)
    inputs = [t for t in (w, u, v) if t is not None]
    got = torch.autograd.grad(out, inputs, g)
    want = torch.autograd.grad(expected, inputs, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **EXACT)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape,mask_kind", [c for c in CASES if c[0] in [(), (0,), (33,), (3, 4, 5), (70001,)]])
def test_backward_op_matches_reference(device, dtype, shape, mask_kind):
    w, u, _, mask = _inputs(shape, dtype, device, mask_kind)
    g = _randn(shape, dtype, device, 9)
    flags = [f for f in itertools.product([False, True], repeat=3) if mask is not None or not f[2]]
    for flag in flags:
        got = ops.dcs_backward(g, w, u, mask, *flag)
        want = ref.dcs_backward(g, w, u, mask, *flag)
        for a, b, needed in zip(got, want, flag):
            assert a.shape == (w.shape if needed else (0,))
            torch.testing.assert_close(a, b, **EXACT)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape,mask_kind", [c for c in CASES if c[0] in [(), (0,), (33,), (3, 4, 5), (70001,)]])
def test_jvp_op_matches_reference(device, dtype, shape, mask_kind):
    w, u, _, mask = _inputs(shape, dtype, device, mask_kind)
    wd, ud, vd = (_randn(shape, dtype, device, s) for s in (4, 5, 6))
    for present in itertools.product([False, True], repeat=3):
        if present[2] and mask is None:
            continue
        tangents = [t if p else None for t, p in zip((wd, ud, vd), present)]
        got = ops.dcs_jvp(w, u, mask, *tangents)
        want = ref.dcs_jvp(w, u, mask, *tangents)
        torch.testing.assert_close(got, want, **EXACT)


# --------------------------------------------------------- memory layouts
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_and_broadcast_inputs(device, dtype):
    base = [_randn((6, 10), dtype, device, s) for s in (1, 2, 3, 4)]
    w = base[0].t()                       # transposed
    u = base[1][:, ::1].t().contiguous()  # contiguous, same logical shape
    v = base[2].t()[:, :]                 # transposed
    g = base[3][::1, :].t()
    masks = [
        (torch.rand(10, 6, device=device) > 0.5).t().t(),
        (torch.rand(20, 6, device=device) > 0.5)[::2],            # strided rows
        (torch.rand(6, device=device) > 0.5),                     # broadcast row
        (torch.rand(10, 1, device=device) > 0.5).expand(10, 6),   # stride-0 view
        torch.tensor(True, device=device),                         # 0-d mask
    ]
    for mask in masks:
        for t in (w, u, v):
            t.requires_grad_(True)
        out, exp = symfast.dcs(w, u, v, mask), ref.dcs(w, u, v, mask)
        torch.testing.assert_close(out, exp, atol=0, rtol=0)
        got = torch.autograd.grad(out, (w, u, v), g)
        want = torch.autograd.grad(exp, (w, u, v), g)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        torch.testing.assert_close(
            ops.dcs_jvp(w.detach(), u, mask, g, v.detach(), w.detach()),
            ref.dcs_jvp(w.detach(), u, mask, g, v.detach(), w.detach()), atol=0, rtol=0)


def test_non_finite_values_select_exactly():
    w = torch.tensor([float("inf"), 1.0, 2.0, float("nan")])
    u = torch.tensor([1.0, 3.0, 4.0, 1.0])
    v = torch.tensor([5.0, float("inf"), 6.0, 7.0])
    mask = torch.tensor([False, False, True, False])
    # Where the mask is off, theta is exactly v: no 0 * inf = nan leaks in.
    assert torch.equal(symfast.dcs(w, u, v, mask), torch.tensor([5.0, float("inf"), 8.0, 7.0]))


# ------------------------------------------------------- autograd checks
GRAD_CASES = [((3, 4), "none", False), ((3, 4), "bool", True), ((3, 4), "broadcast-last", True),
              ((3, 4), "float", False), ((), "bool", True), ((0, 3), "bool", True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,mask_kind,with_v", GRAD_CASES)
def test_gradcheck_and_gradgradcheck(device, shape, mask_kind, with_v):
    w, u, v, mask = _inputs(shape, torch.float64, device, mask_kind, with_v, requires_grad=True)
    f = lambda w, u, v: symfast.dcs(w, u, v, mask)
    inp = (w, u, v)
    assert torch.autograd.gradcheck(f, inp, check_forward_ad=True, check_batched_grad=True,
                                    check_batched_forward_grad=True)
    assert torch.autograd.gradgradcheck(f, inp, check_fwd_over_rev=True, check_rev_over_rev=True,
                                        check_batched_grad=True)
    # The raw op is differentiable too (register_autograd), for users of torch.ops.
    assert torch.autograd.gradgradcheck(lambda w, u, v: ops.dcs(w, u, v, mask), inp)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_kind", ["none", "bool"])
def test_gradcheck_backward_and_jvp_ops(device, mask_kind):
    from symfast.ops.dcs import DCSBackwardFunction, DCSJvpFunction

    shape = (2, 5)
    w, u, _, mask = _inputs(shape, torch.float64, device, mask_kind, requires_grad=True)
    g, wd, ud, vd = (_randn(shape, torch.float64, device, s).requires_grad_() for s in (4, 5, 6, 7))
    nv = mask is not None
    bwd = lambda g, w, u: tuple(o for o in DCSBackwardFunction.apply(g, w, u, mask, True, True, nv) if o.numel())
    fwd = lambda w, u, wd, ud, vd: DCSJvpFunction.apply(w, u, mask, wd, ud, vd if nv else None)
    for f, inp in ((bwd, (g, w, u)), (fwd, (w, u, wd, ud, vd))):
        assert torch.autograd.gradcheck(f, inp, check_forward_ad=True, check_batched_grad=True,
                                        check_batched_forward_grad=True)
        assert torch.autograd.gradgradcheck(f, inp, check_fwd_over_rev=True)


# ---------------------------------------------------------------- opcheck
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,mask_kind,with_v", GRAD_CASES + [((7,), "broadcast-last", False)])
def test_opcheck(device, shape, mask_kind, with_v):
    w, u, v, mask = _inputs(shape, torch.float32, device, mask_kind, with_v, requires_grad=True)
    torch.library.opcheck(ops.dcs.default, (w, u, v, mask))
    g = _randn(shape, torch.float32, device, 9).requires_grad_()
    for flags in [(True, True, mask is not None), (True, False, False), (False, True, mask is not None)]:
        torch.library.opcheck(ops.dcs_backward.default, (g, w, u, mask, *flags))
    wd, ud, vd = (_randn(shape, torch.float32, device, s).requires_grad_() for s in (4, 5, 6))
    torch.library.opcheck(ops.dcs_jvp.default, (w, u, mask, wd, ud, vd if mask is not None else None))
    torch.library.opcheck(ops.dcs_jvp.default, (w, u, mask, wd, None, None))


# ---------------------------------------------------------- torch.compile
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "broadcast-last"])
def test_compile_fullgraph(device, dtype, mask_kind):
    torch._dynamo.reset()
    w, u, v, mask = _inputs((5, 9), dtype, device, mask_kind, requires_grad=True)

    def f(w, u, v, mask):
        return (symfast.dcs(w, u, v, mask).sin() * 2).sum()

    def f_ref(w, u, v, mask):
        return (ref.dcs(w, u, v, mask).sin() * 2).sum()

    cf = torch.compile(f, fullgraph=True, backend="inductor")
    got, want = cf(w, u, v, mask), f_ref(w, u, v, mask)
    torch.testing.assert_close(got, want)
    inputs = [t for t in (w, u, v) if t is not None]
    for a, b in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(want, inputs)):
        torch.testing.assert_close(a, b)


# -------------------------------------------------------------- torch.func
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "broadcast-col", "float"])
def test_func_jvp_vjp_hessian(device, mask_kind):
    w, u, v, mask = _inputs((3, 4), torch.float64, device, mask_kind)
    primals = (w, u) if v is None else (w, u, v)
    tangents = tuple(_randn((3, 4), torch.float64, device, 10 + i) for i in range(len(primals)))

    def f(*p):
        return symfast.dcs(*p[:2], p[2] if len(p) > 2 else None, mask)

    def f_ref(*p):
        return ref.dcs(*p[:2], p[2] if len(p) > 2 else None, mask)

    out, tan = tf.jvp(f, primals, tangents)
    out_r, tan_r = tf.jvp(f_ref, primals, tangents)
    torch.testing.assert_close(out, out_r)
    torch.testing.assert_close(tan, tan_r)

    # forward-over-forward (the curvature engine's path)
    def dir_deriv(fn):
        return lambda *p: tf.jvp(fn, p, tangents)[1].pow(2).sum()

    torch.testing.assert_close(tf.jvp(dir_deriv(f), primals, tangents), tf.jvp(dir_deriv(f_ref), primals, tangents))

    scalar = lambda *p: f(*p).tanh().sum()
    scalar_r = lambda *p: f_ref(*p).tanh().sum()
    argn = tuple(range(len(primals)))
    for got, want in zip(tf.grad(scalar, argn)(*primals), tf.grad(scalar_r, argn)(*primals)):
        torch.testing.assert_close(got, want)
    H, H_r = tf.hessian(scalar, argn)(*primals), tf.hessian(scalar_r, argn)(*primals)
    for row, row_r in zip(H, H_r):
        for a, b in zip(row, row_r):
            torch.testing.assert_close(a, b)
    # reverse-over-reverse Hessian too
    H2 = tf.jacrev(tf.jacrev(scalar, argn), argn)(*primals)
    for row, row_r in zip(H2, H_r):
        for a, b in zip(row, row_r):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("in_dims", [(0, 0, 0, None), (0, None, None, None), (None, 1, None, 0), (1, 0, 0, 1), (None, None, 0, None)])
def test_func_vmap(device, in_dims):
    B, shape = 3, (4, 5)

    def make(d, seed, dtype=torch.float64):
        if d is None:
            return _randn(shape, dtype, device, seed)
        s = list(shape)
        s.insert(d, B)
        return _randn(tuple(s), dtype, device, seed)

    w, u, v = make(in_dims[0], 1), make(in_dims[1], 2), make(in_dims[2], 3)
    md = in_dims[3]
    # batched masks are per-row masks (5,) with the batch dim inserted
    mask = (torch.rand(5, device=device) > 0.5) if md is None else (torch.rand(B, 5, device=device) > 0.5).movedim(0, md)
    got = tf.vmap(symfast.dcs, in_dims=in_dims)(w, u, v, mask)
    want = tf.vmap(ref.dcs, in_dims=in_dims)(w, u, v, mask)
    torch.testing.assert_close(got, want, atol=0, rtol=0)

    # per-sample gradients: vmap(grad)
    def loss(w, u, v, mask):
        return symfast.dcs(w, u, v, mask).sin().sum()

    def loss_ref(w, u, v, mask):
        return ref.dcs(w, u, v, mask).sin().sum()

    g = tf.vmap(tf.grad(loss, argnums=(0, 1, 2)), in_dims=in_dims)(w, u, v, mask)
    g_r = tf.vmap(tf.grad(loss_ref, argnums=(0, 1, 2)), in_dims=in_dims)(w, u, v, mask)
    for a, b in zip(g, g_r):
        torch.testing.assert_close(a, b)
    # vmap of jvp
    t = (_randn(shape, torch.float64, device, 7),) * 3
    jv = tf.vmap(lambda w, u, v, m: tf.jvp(lambda a, b, c: symfast.dcs(a, b, c, m), (w, u, v), t)[1], in_dims=in_dims)
    jv_r = tf.vmap(lambda w, u, v, m: tf.jvp(lambda a, b, c: ref.dcs(a, b, c, m), (w, u, v), t)[1], in_dims=in_dims)
    torch.testing.assert_close(jv(w, u, v, mask), jv_r(w, u, v, mask))


# ------------------------------------------------------------- bad input
def _bad_calls():
    w = torch.randn(3, 4)
    u = torch.randn(3, 4)
    m = torch.ones(3, 4, dtype=torch.bool)
    yield "u must have w's shape", (TypeError, ValueError), (w, torch.randn(4, 3)), {}
    yield "v must have w's shape", ValueError, (w, u, torch.randn(3)), {"mask": m}
    yield "mask must broadcast to w's shape", ValueError, (w, u), {"mask": torch.ones(5, dtype=torch.bool)}
    yield "mask must broadcast to w's shape", ValueError, (w, u), {"mask": torch.ones(2, 3, 4, dtype=torch.bool)}
    yield "u must have the dtype of w", TypeError, (w, u.double()), {}
    yield "v must have the dtype of w", TypeError, (w, u, torch.randn(3, 4).half()), {"mask": m}
    yield "u must be on w's device", ValueError, (w, torch.empty(3, 4, device="meta")), {}
    yield "mask must be on w's device", ValueError, (w, u), {"mask": torch.empty(3, 4, device="meta", dtype=torch.bool)}
    yield "w must be float32, float64, float16 or bfloat16, got torch.int64", TypeError, (torch.ones(3, 4, dtype=torch.long), u), {}
    yield "mask must be a bool or floating 0/1 tensor, got torch.int64", TypeError, (w, u), {"mask": torch.ones(3, 4, dtype=torch.long)}
    yield "v was given without a mask", ValueError, (w, u, torch.randn(3, 4)), {}
    yield "u must be a torch.Tensor", TypeError, (w, 3.0), {}
    yield "mask must not require grad", ValueError, (w, u), {"mask": torch.ones(3, 4, requires_grad=True)}


@pytest.mark.parametrize("message,exc,args,kwargs", list(_bad_calls()))
def test_bad_input_is_a_clear_error(message, exc, args, kwargs):
    with pytest.raises(exc, match=message.replace("(", r"\(").replace(")", r"\)")):
        symfast.dcs(*args, **kwargs)


def test_float_mask_with_other_values_is_an_error():
    w, u = torch.randn(3, 4), torch.randn(3, 4)
    mask = torch.full((3, 4), 0.5)
    with pytest.raises(RuntimeError, match="floating mask must hold only 0 and 1"):
        symfast.dcs(w, u, mask=mask)
    with pytest.raises(RuntimeError, match="floating mask must hold only 0 and 1"):
        ops.dcs_backward(w, w, u, mask, True, True, True)


def test_raw_op_rejects_bad_input_without_crashing():
    w = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match=r"symfast.dcs: u must have w's shape \[3, 4\], got \[4\]"):
        ops.dcs(w, torch.randn(4))
    with pytest.raises(RuntimeError, match="symfast.dcs: w must be float32"):
        ops.dcs(torch.ones(3, dtype=torch.int32), torch.ones(3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="mask must broadcast"):
        ops.dcs(w, w, None, torch.ones(5, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="v_needed=True requires a mask"):
        ops.dcs_backward(w, w, w, None, False, False, True)
    with pytest.raises(RuntimeError, match="v_dot was given without a mask"):
        ops.dcs_jvp(w, w, None, None, None, w)
    with pytest.raises(RuntimeError, match="symfast.dcs_jvp: w_dot must have the dtype of w"):
        ops.dcs_jvp(w, w, None, w.double(), None, None)


# --------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cpu_and_cuda_agree(dtype):
    shape = (1001, 37)
    w, u, v, mask = _inputs(shape, dtype, "cpu", "bool")
    g = _randn(shape, dtype, "cpu", 9)
    cuda = lambda t: None if t is None else t.cuda()
    torch.testing.assert_close(symfast.dcs(w, u, v, mask), symfast.dcs(*map(cuda, (w, u, v, mask))).cpu(), atol=0, rtol=0)
    for a, b in zip(ops.dcs_backward(g, w, u, mask, True, True, True),
                    ops.dcs_backward(*map(cuda, (g, w, u, mask)), True, True, True)):
        torch.testing.assert_close(a, b.cpu(), atol=0, rtol=0)


def test_forward_ad_over_first_order_backward_keeps_tangents():
    """Backward without create_graph takes a fast path below autograd; it must not
    drop forward-AD tangents that flow through the saved tensors."""
    import torch.autograd.forward_ad as fwAD

    w, u, wt = (_randn((4, 5), torch.float64, "cpu", s) for s in (1, 2, 3))
    mask = torch.rand(4, 5) > 0.5
    results = []
    for fn in (symfast.dcs, ref.dcs):
        uu = u.clone().requires_grad_()
        with fwAD.dual_level():
            wd = fwAD.make_dual(w, wt)
            (gu,) = torch.autograd.grad(fn(wd, uu, None, mask).sum(), uu)
            results.append((fwAD.unpack_dual(gu).primal.clone(), fwAD.unpack_dual(gu).tangent))
    (p, t), (p_ref, t_ref) = results
    assert t is not None and t_ref is not None
    torch.testing.assert_close(p, p_ref, atol=0, rtol=0)
    torch.testing.assert_close(t, t_ref, atol=0, rtol=0)


def test_first_order_backward_uses_no_nested_autograd_function():
    """The autograd.Function path (torch.func, forward AD) calls the backward kernel
    below autograd when nothing differentiates through it, and nests a Function
    only under create_graph."""
    from symfast.ops import dcs as dcs_module

    w, u = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    calls = []
    orig = dcs_module.DCSBackwardFunction.apply
    dcs_module.DCSBackwardFunction.apply = lambda *a: calls.append(1) or orig(*a)
    try:
        dcs_module.DCSFunction.apply(w, u, None, None).sum().backward()
        assert calls == []  # fast path
        (g,) = torch.autograd.grad(dcs_module.DCSFunction.apply(w, u, None, None).sum(), w, create_graph=True)
        assert calls == [1] and g.requires_grad  # double backward keeps the graph
    finally:
        dcs_module.DCSBackwardFunction.apply = orig


# ------------------------------------------- the C++ autograd training path
def _python_calls_in(fn):
    """Files of the Python functions called while fn runs (this thread; the CPU
    autograd engine runs backward on the calling thread)."""
    import sys

    files = []
    sys.setprofile(lambda frame, event, arg: files.append(frame.f_code.co_filename) if event == "call" else None)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return files


@pytest.mark.parametrize("mask_kind,with_v", [("none", False), ("bool", True), ("broadcast-last", True),
                                              ("float", False)])
def test_training_path_runs_no_python_in_backward(mask_kind, with_v):
    """Outside torch.func and forward AD, symfast.dcs records a C++ node
    (csrc/autograd.cpp): its backward runs no Python at all."""
    w, u, v, mask = _inputs((6, 5), torch.float32, "cpu", mask_kind, with_v, requires_grad=True)
    theta = symfast.dcs(w, u, v, mask)
    assert theta.grad_fn.name() == "torch::autograd::CppNode<symfast::DCSFunction>"
    g = _randn((6, 5), torch.float32, "cpu", 9)
    files = _python_calls_in(lambda: theta.backward(g))
    import os

    package = os.path.dirname(symfast.__file__)
    assert [f for f in files if f.startswith(package)] == [], files
    assert w.grad is not None and u.grad is not None and (v is None or v.grad is not None)


@pytest.mark.parametrize("op_name", ["_dcs_autograd", "_dcs_group_autograd"])
def test_training_path_forward_skips_the_python_autograd_kernel(op_name):
    """The C++ node's forward calls the raw op below autograd: it must not go through
    the raw op's registered (Python) autograd kernel, whose Python call costs per op call."""
    import os

    op = getattr(ops, op_name).default
    w, u = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    args = (w, u, None, None) if op_name == "_dcs_autograd" else (w, u[:, 0].detach().requires_grad_(), 0)
    op(*args)  # warm: resolves lazily created Python objects once
    files = _python_calls_in(lambda: op(*args))
    library = os.path.join(os.path.dirname(torch.__file__), "_library")
    package = os.path.dirname(symfast.__file__)
    assert [f for f in files if f.startswith(library) or f.startswith(package)] == [], files
    # ... and it still is the op's own call: the raw op's kernel under it did run.
    assert "CppNode" in op(*args).grad_fn.name()


def test_training_path_switches_to_the_function_under_transforms(monkeypatch):
    import torch.autograd.forward_ad as fwAD
    from symfast.ops import dcs as dcs_module

    w, u = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    with fwAD.dual_level():
        assert symfast.dcs(fwAD.make_dual(w, torch.ones(4)), u).grad_fn.name() == "DCSFunctionBackward"
    calls = []
    apply = dcs_module.DCSFunction.apply
    monkeypatch.setattr(dcs_module.DCSFunction, "apply", lambda *a: calls.append(1) or apply(*a))
    symfast.dcs(w, u).sum().backward()
    assert calls == []  # ordinary autograd: the C++ node
    g = tf.grad(lambda w: symfast.dcs(w, u).sum())(w.detach())
    assert calls  # under torch.func: the autograd.Function (torch.func may re-enter apply per level)
    torch.testing.assert_close(g, u.detach(), **EXACT)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mask_kind,with_v", [("none", False), ("bool", True), ("broadcast-col", True),
                                              ("float", True)])
def test_training_path_equals_the_function_path(device, dtype, mask_kind, with_v):
    """Values and all three gradients bit for bit, including non-contiguous factors."""
    from symfast.ops.dcs import DCSFunction

    w, u, v, mask = _inputs((5, 8), dtype, device, mask_kind, with_v, requires_grad=True)
    wt = _randn((8, 5), dtype, device, 4).t().requires_grad_()  # non-contiguous
    g = _randn((5, 8), dtype, device, 9)
    for a in (w, wt):
        inputs = [t for t in (a, u, v) if t is not None]
        fast = ops._dcs_autograd(a, u, v, mask)
        slow = DCSFunction.apply(a, u, v, mask)
        assert "CppNode" in fast.grad_fn.name() and slow.grad_fn.name() == "DCSFunctionBackward"
        torch.testing.assert_close(fast, slow, **EXACT)
        for x, y in zip(torch.autograd.grad(fast, inputs, g), torch.autograd.grad(slow, inputs, g)):
            torch.testing.assert_close(x, y, **EXACT)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,mask_kind,with_v", GRAD_CASES)
def test_training_path_gradcheck_gradgradcheck_opcheck(device, shape, mask_kind, with_v):
    w, u, v, mask = _inputs(shape, torch.float64, device, mask_kind, with_v, requires_grad=True)
    f = lambda w, u, v: ops._dcs_autograd(w, u, v, mask)
    assert torch.autograd.gradcheck(f, (w, u, v))
    assert torch.autograd.gradgradcheck(f, (w, u, v))
    torch.library.opcheck(ops._dcs_autograd.default, (w, u, v, mask))


def test_training_path_saves_only_the_factors_and_keeps_partial_grads():
    w, u = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4)  # u needs no gradient
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        theta = symfast.dcs(w, u)
    assert len(saved) == 2 and saved[0] is w and saved[1] is u  # theta is not saved
    theta.sum().backward()
    torch.testing.assert_close(w.grad, u, **EXACT)
    assert u.grad is None


def test_training_path_rejects_bad_input_like_the_public_op():
    w = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="u must have w's shape"):
        ops._dcs_autograd(w, torch.randn(4, 3))
    with pytest.raises(ValueError, match="u"):
        symfast.dcs(w, torch.randn(4, 3))


# ------------------------------------------------- vector instruction sets
_ISA_SCRIPT = r"""
import sys, torch, symfast
from symfast import reference as ref
torch.manual_seed(0)
out = {}
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    for shape in ((70001,), (257, 33), (5,)):
        w, u, v, g = (torch.randn(shape, dtype=torch.float64).to(dtype) for _ in range(4))
        mask = torch.rand(shape) > 0.5
        for m, vv in ((None, None), (mask, v)):
            key = f"{dtype}-{shape}-{m is not None}"
            out[key] = [symfast.dcs(w, u, vv, m),
                        *torch.ops.symfast.dcs_backward(g, w, u, m, True, True, m is not None)]
            want = [ref.dcs(w, u, vv, m), *ref.dcs_backward(g, w, u, m, True, True, m is not None)]
            for a, b in zip(out[key], want):
                assert torch.equal(a, b), key
torch.save(out, sys.argv[1])
"""


def test_every_instruction_set_gives_the_same_bits(tmp_path):
    """The contiguous loops run in AVX2 or the baseline ISA (csrc/cpu/isa.h,
    SYMFAST_CPU_ISA forces a level): each equals the reference bit for bit, in every dtype."""
    import os
    import subprocess
    import sys

    results, ran = {}, []
    for isa in ("default", "avx2"):
        path = tmp_path / f"{isa}.pt"
        env = dict(os.environ, SYMFAST_CPU_ISA=isa, OMP_NUM_THREADS="2")
        proc = subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(path)], env=env, capture_output=True,
                              text=True, timeout=300)
        if "this CPU supports at most" in proc.stderr:
            continue  # the CPU lacks this level
        assert proc.returncode == 0, proc.stderr[-2000:]
        results[isa] = torch.load(path)
        ran.append(isa)
    assert "default" in ran
    base = results["default"]
    for isa in ran[1:]:
        for key, tensors in results[isa].items():
            for a, b in zip(tensors, base[key]):
                assert torch.equal(a, b), (isa, key)


def test_bad_instruction_set_request_is_a_clear_error():
    import os
    import subprocess
    import sys

    env = dict(os.environ, SYMFAST_CPU_ISA="sse9")
    proc = subprocess.run([sys.executable, "-c", "import torch, symfast; symfast.dcs(torch.ones(3), torch.ones(3))"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "SYMFAST_CPU_ISA must be avx2 or default, got 'sse9'" in proc.stderr


# ------------------------------------------- compiled torch.func transforms; bool mask bytes
@pytest.mark.parametrize("op_name", ["dcs", "dcs_group"])
def test_compiled_torch_func_transforms_equal_the_reference(op_name):
    """Under torch.compile the raw op has no forward-mode or functorch rule, so a compiled
    transform traces the reference formula: it must agree with symfast's eager transforms (the
    fused kernels), and those with the reference."""
    torch.manual_seed(0)
    w, t = torch.randn(4, 5), torch.randn(4, 5)
    other = torch.randn(4, 5) if op_name == "dcs" else torch.randn(5)
    op = (lambda x, o: symfast.dcs(x, o)) if op_name == "dcs" else (lambda x, o: symfast.dcs_group(x, o, 1))
    rop = (lambda x, o: ref.dcs(x, o)) if op_name == "dcs" else (lambda x, o: ref.dcs_group(x, o, 1))
    transforms = {
        "jvp": lambda f: lambda a, o: tf.jvp(lambda x: f(x, o), (a,), (t,))[1],
        "jacfwd": lambda f: lambda a, o: tf.jacfwd(lambda x: f(x, o))(a),
        "grad": lambda f: lambda a, o: tf.grad(lambda x: f(x, o).pow(2).sum())(a),
        "jacrev": lambda f: lambda a, o: tf.jacrev(lambda x: f(x, o))(a),
        "vmap-grad": lambda f: lambda a, o: tf.vmap(tf.grad(lambda x: f(x, o).pow(2).sum()))(a.unsqueeze(0).repeat(3, 1, 1)),
    }
    for name, transform in transforms.items():
        torch._dynamo.reset()
        got = torch.compile(transform(op), fullgraph=True)(w, other)
        eager = transform(op)(w, other)  # symfast's fused kernels through its autograd.Function
        assert got.abs().sum() > 0, name
        torch.testing.assert_close(got, eager, msg=name)
        torch.testing.assert_close(eager, transform(rop)(w, other), msg=name)


def test_bool_mask_bytes_other_than_0_and_1_are_true():
    """torch reads any nonzero byte of a bool tensor as True (a uint8 tensor viewed as bool
    may hold 2 or 255); a bit select must not build a partial selector from such bytes."""
    mask = torch.tensor([0, 1, 2, 255, 4, 1, 3, 128], dtype=torch.uint8).view(torch.bool)
    torch.manual_seed(0)
    w, u, v, g = (torch.randn(8, dtype=torch.float64) for _ in range(4))
    on = mask.clone()  # normalized by torch: 0/1 bytes
    torch.testing.assert_close(symfast.dcs(w, u, v, mask), torch.where(on, w * u, v), **EXACT)
    gw, gu, gv = ops.dcs_backward(g, w, u, mask, True, True, True)
    for got, expected in ((gw, torch.where(on, u * g, 0)), (gu, torch.where(on, w * g, 0)), (gv, torch.where(on, 0, g))):
        torch.testing.assert_close(got, expected, **EXACT)
    torch.testing.assert_close(ops.dcs_jvp(w, u, mask, g, g, g), torch.where(on, g * u + w * g, g), **EXACT)


def test_compiled_bad_mask_gets_symfasts_message():
    w, u = torch.randn(4, 5), torch.randn(4, 5)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"symfast.dcs: mask must broadcast to w's shape \(4, 5\), got \(3,\)"):
        torch.compile(lambda w, u, m: symfast.dcs(w, u, None, m))(w, u, torch.ones(3, dtype=torch.bool))


# ------------------------------------------------------------- the autograd path table
def test_autograd_path_follows_the_table():
    import torch.autograd.forward_ad as fwAD
    from symfast.ops.autograd import AutogradPath, autograd_path

    assert autograd_path() is AutogradPath.CPP_NODE
    with fwAD.dual_level():
        assert autograd_path() is AutogradPath.FUNCTION
    seen = []
    tf.vmap(lambda x: seen.append(autograd_path()) or x)(torch.ones(2, 3))
    assert seen == [AutogradPath.FUNCTION]


@pytest.mark.parametrize("missing", ["_functorch_transforms_active", "_current_level", "_BelowAutograd"])
def test_missing_private_torch_api_falls_back_to_the_function_path(monkeypatch, missing):
    """Each private torch API that picks the path is guarded: without it the result is the same.

    forward_ad._current_level cannot be removed from torch itself (its dual_level needs it), so
    its absence is what the guarded lookup reports: None."""
    from symfast.ops import autograd as routing

    if missing == "_current_level":
        monkeypatch.setattr(routing, "_forward_ad_level", lambda: None)
    else:
        monkeypatch.setattr(routing, missing, None)
    torch.manual_seed(0)
    w, u, v = (torch.randn(5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.rand(5, 4) > 0.5
    g = torch.randn(5, 4, dtype=torch.float64)
    if missing == "_BelowAutograd":
        from symfast.ops.dcs import DCSFunction

        with torch.no_grad():
            assert not routing.first_order_only()  # the backward formula nests a Function instead
        theta = DCSFunction.apply(w, u, v, mask)
    else:
        theta = symfast.dcs(w, u, v, mask)
        assert routing.autograd_path() is routing.AutogradPath.FUNCTION
        assert theta.grad_fn.name() == "DCSFunctionBackward"
    grads = torch.autograd.grad(theta, (w, u, v), g)
    expected = torch.autograd.grad(ref.dcs(w, u, v, mask), (w, u, v), g)
    for got, exp in zip(grads, expected):
        torch.testing.assert_close(got, exp, rtol=0, atol=0)
    # forward mode and vmap still compose on the fallback path
    t = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(tf.jvp(lambda x: symfast.dcs(x, u.detach(), v.detach(), mask), (w.detach(),), (t,))[1],
                               torch.where(mask, t * u.detach(), 0))
