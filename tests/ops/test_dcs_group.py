"""symfast.dcs_group (theta = w * s along dim) and its backward/forward-mode ops
against the pure-PyTorch reference.

theta and grad_w are one rounded product per element, so they must equal the
reference bit for bit in every dtype. grad_s is a per-group sum whose order
differs from torch.sum's, so it is held to the low-precision rule of STYLE.md:
its error against a float64 oracle is at most twice the error of the reference
run in the same dtype.
"""

import pytest
import torch
import torch.func as tf

import symfast
from symfast import reference as ref
from symfast.ops.dcs_group import DCSGroupBackwardFunction, DCSGroupJvpFunction, dcs_group

from matrix import DEVICES, FLOAT_DTYPES

ops = torch.ops.symfast
EXACT = dict(atol=0, rtol=0)

# (shape, dim). Odd sizes; 1-D; 2-D with dim 0/1/-1; conv weights grouped by
# output (dim 0) and input channel (dim 1, a short inner run of kh * kw);
# empty tensors with and without groups; and shapes large enough to take each
# path of the CPU reduction plan on several threads: many rows of few groups
# (rows folded together), a long inner run split across tasks, dot products
# over rows with outer > 1.
SHAPES = [
    ((7,), 0), ((1,), -1), ((5, 7), 0), ((5, 7), 1), ((5, 7), -1),
    ((6, 3, 3, 3), 0), ((4, 6, 3, 3), 1), ((2, 3, 4, 5), -2),
    ((0, 4), 1), ((4, 0), 1), ((3, 0, 2), 1),
    ((70001,), 0), ((301, 257), 0), ((257, 301), 1), ((5000, 3), 1), ((1000, 7, 5), 1),
    ((3, 70000), 0), ((2, 3, 2000), 1),
]
SMALL = [c for c in SHAPES if c[0] in [(7,), (5, 7), (4, 6, 3, 3), (0, 4), (3, 0, 2), (1000, 7, 5)]]


def _randn(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def _inputs(shape, dim, dtype, device, requires_grad=False):
    w = _randn(shape, dtype, device, 1).requires_grad_(requires_grad)
    s = _randn((shape[dim],), dtype, device, 2).requires_grad_(requires_grad)
    return w, s


def _up(t):
    return None if t is None else t.detach().double()


def _assert_gate_grad(got, grad, w, s, dim):
    """grad_s against a float64 oracle.

    Half types: the low-precision rule, strictly. float32: the same rule with a
    little slack, since torch.sum (the reference) is itself a good cascade sum.
    float64 has no higher-precision oracle here, so its error is bounded by a
    few roundings of the sum of |grad * w| over the group.
    """
    dtype = w.dtype
    exact = ref.dcs_group_backward(_up(grad), _up(w), _up(s), dim, False, True)[1]
    low = ref.dcs_group_backward(grad.detach(), w.detach(), s.detach(), dim, False, True)[1]
    assert got.shape == exact.shape and got.dtype == dtype
    if got.numel() == 0:
        return
    err = (got.double() - exact).abs().max().item()
    ref_err = (low.double() - exact).abs().max().item()
    if dtype in (torch.float16, torch.bfloat16):
        slack = 0.0
    else:
        mass = ref.dcs_group_backward(_up(grad).abs(), _up(w).abs(), _up(s), dim, False, True)[1]
        slack = 16 * torch.finfo(dtype).eps * mass.max().item()
    assert err <= 2 * ref_err + slack + 1e-300, (err, ref_err, slack)


# ------------------------------------------------------------------ values
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape,dim", SHAPES)
def test_forward_and_backward_match_reference(device, dtype, shape, dim):
    w, s = _inputs(shape, dim, dtype, device, requires_grad=True)
    out = dcs_group(w, s, dim)
    expected = ref.dcs_group(w, s, dim)
    assert out.shape == w.shape and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out, expected, **EXACT)
    g = _randn(shape, dtype, device, 9)
    gw, gs = torch.autograd.grad(out, (w, s), g)
    torch.testing.assert_close(gw, ref.dcs_group_backward(g, w, s, dim, True, False)[0], **EXACT)
    _assert_gate_grad(gs, g, w, s, dim)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape,dim", SMALL + [((257, 301), 1), ((3, 70000), 0)])
def test_backward_op_matches_reference(device, dtype, shape, dim):
    w, s = _inputs(shape, dim, dtype, device)
    g = _randn(shape, dtype, device, 9)
    for flags in [(True, True), (True, False), (False, True), (False, False)]:
        gw, gs = ops.dcs_group_backward(g, w, s, dim, *flags)
        rw, rs = ref.dcs_group_backward(g, w, s, dim, *flags)
        assert gw.shape == (w.shape if flags[0] else (0,))
        assert gs.shape == ((w.shape[dim],) if flags[1] else (0,))
        torch.testing.assert_close(gw, rw, **EXACT)
        if flags[1]:
            _assert_gate_grad(gs, g, w, s, dim)
        # Outputs never alias each other, also when both are empty.
        assert gw.data_ptr() != gs.data_ptr() or gw.numel() == gs.numel() == 0
    # The fused pass writes the same grad_s as the grad_s-only pass.
    both = ops.dcs_group_backward(g, w, s, dim, True, True)[1]
    only = ops.dcs_group_backward(g, w, s, dim, False, True)[1]
    torch.testing.assert_close(both, only, **EXACT)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape,dim", SMALL + [((5000, 3), 1), ((3, 70000), 0)])
def test_jvp_op_matches_reference(device, dtype, shape, dim):
    w, s = _inputs(shape, dim, dtype, device)
    wd, sd = _randn(shape, dtype, device, 4), _randn((shape[dim],), dtype, device, 5)
    for tangents in [(wd, sd), (wd, None), (None, sd), (None, None)]:
        got = ops.dcs_group_jvp(w, s, dim, *tangents)
        want = ref.dcs_group_jvp(w, s, dim, *tangents)
        assert got.is_contiguous()
        torch.testing.assert_close(got, want, **EXACT)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,dim", [((512, 384), 0), ((512, 384), 1), ((64, 32, 3, 3), 1), ((4, 20000), 0)])
def test_low_precision_rule(dtype, shape, dim):
    """STYLE.md: error vs a float64 reference is at most twice the reference's own
    error, checked against a naive reference too: summing the products rounded to
    the half type (what w * s autograd does) is far worse than the fused kernel."""
    w, s = _inputs(shape, dim, dtype, "cpu")
    g = _randn(shape, dtype, "cpu", 9)
    wd, sd = _randn(shape, dtype, "cpu", 4), _randn((shape[dim],), dtype, "cpu", 5)
    gs = ops.dcs_group_backward(g, w, s, dim, False, True)[1]
    _assert_gate_grad(gs, g, w, s, dim)
    exact = ref.dcs_group_backward(_up(g), _up(w), _up(s), dim, False, True)[1]
    others = [d for d in range(w.dim()) if d != dim % w.dim()]
    naive = (g * w).sum(others)  # products rounded to the half type
    assert (gs.double() - exact).abs().max() <= (naive.double() - exact).abs().max()
    for got, low, high in [
        (dcs_group(w, s, dim), ref.dcs_group(w, s, dim), ref.dcs_group(_up(w), _up(s), dim)),
        (ops.dcs_group_jvp(w, s, dim, wd, sd), ref.dcs_group_jvp(w, s, dim, wd, sd),
         ref.dcs_group_jvp(_up(w), _up(s), dim, _up(wd), _up(sd))),
    ]:
        err = (got.double() - high).abs().max()
        ref_err = (low.double() - high).abs().max()
        assert err <= 2 * ref_err + 1e-12, (err, ref_err)


@pytest.mark.parametrize("shape,dim", [((301, 257), 0), ((257, 301), 1), ((5000, 3), 1), ((3, 70000), 0)])
def test_gate_grad_independent_of_thread_count(shape, dim):
    """The reduction plan depends on the shape only: bitwise equal on any thread count."""
    w, s = _inputs(shape, dim, torch.float32, "cpu")
    g = _randn(shape, torch.float32, "cpu", 9)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(ops.dcs_group_backward(g, w, s, dim, True, True))
    finally:
        torch.set_num_threads(threads)
    for gw, gs in results[1:]:
        assert torch.equal(gw, results[0][0]) and torch.equal(gs, results[0][1])


# --------------------------------------------------------- memory layouts
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_non_contiguous_inputs(device, dtype, dim):
    """Strided views (copied to contiguous by the kernels) give the same results."""
    w = _randn((9, 6), dtype, device, 1).t()                              # (6, 9), transposed
    s = _randn((2 * w.shape[dim],), dtype, device, 2)[::2]                # strided gate
    gates = [s, s.clone()]
    grads = [_randn((6, 9), dtype, device, 3)[:, :].t().t(), _randn((9, 6), dtype, device, 4).t(),
             torch.ones((), dtype=dtype, device=device).expand(6, 9)]     # stride-0, as sum().backward()
    for s in gates:
        for g in grads:
            w.requires_grad_(True)
            s.requires_grad_(True)
            out = dcs_group(w, s, dim)
            torch.testing.assert_close(out, ref.dcs_group(w, s, dim), **EXACT)
            gw, gs = torch.autograd.grad(out, (w, s), g)
            torch.testing.assert_close(gw, ref.dcs_group_backward(g, w, s, dim, True, False)[0], **EXACT)
            _assert_gate_grad(gs, g, w, s, dim)
            wd, sd = w.detach().t().contiguous().t(), s.detach().flip(0)
            torch.testing.assert_close(ops.dcs_group_jvp(w.detach(), s.detach(), dim, wd, sd),
                                       ref.dcs_group_jvp(w.detach(), s.detach(), dim, wd, sd), **EXACT)


def test_non_finite_values_propagate():
    w = torch.tensor([[1.0, float("inf")], [2.0, 3.0]])
    s = torch.tensor([0.0, 2.0])
    out = dcs_group(w, s, 0)
    assert torch.isnan(out[0, 1]) and out[1, 1] == 6.0  # 0 * inf, as in w * s
    torch.testing.assert_close(out, ref.dcs_group(w, s, 0), equal_nan=True, **EXACT)


# ------------------------------------------------------- autograd checks
GRAD_CASES = [((3, 4), 0), ((3, 4), -1), ((5,), 0), ((2, 3, 2, 2), 1), ((0, 3), 1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,dim", GRAD_CASES)
def test_gradcheck_and_gradgradcheck(device, shape, dim):
    w, s = _inputs(shape, dim, torch.float64, device, requires_grad=True)
    f = lambda w, s: dcs_group(w, s, dim)
    assert torch.autograd.gradcheck(f, (w, s), check_forward_ad=True, check_batched_grad=True,
                                    check_batched_forward_grad=True)
    assert torch.autograd.gradgradcheck(f, (w, s), check_fwd_over_rev=True, check_rev_over_rev=True,
                                        check_batched_grad=True)
    # The raw op is differentiable too (register_autograd), for users of torch.ops.
    assert torch.autograd.gradgradcheck(lambda w, s: ops.dcs_group(w, s, dim), (w, s))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,dim", [((3, 4), 1), ((2, 3, 2), 1)])
def test_gradcheck_backward_and_jvp_ops(device, shape, dim):
    w, s = _inputs(shape, dim, torch.float64, device, requires_grad=True)
    g, wd = (_randn(shape, torch.float64, device, k).requires_grad_() for k in (4, 5))
    sd = _randn((shape[dim],), torch.float64, device, 6).requires_grad_()
    bwd = lambda g, w, s: DCSGroupBackwardFunction.apply(g, w, s, dim, True, True)
    bwd_s = lambda g, w, s: DCSGroupBackwardFunction.apply(g, w, s, dim, False, True)[1]
    fwd = lambda w, s, wd, sd: DCSGroupJvpFunction.apply(w, s, dim, wd, sd)
    fwd_w = lambda w, s, wd: DCSGroupJvpFunction.apply(w, s, dim, wd, None)
    for f, inp in ((bwd, (g, w, s)), (bwd_s, (g, w, s)), (fwd, (w, s, wd, sd)), (fwd_w, (w, s, wd))):
        assert torch.autograd.gradcheck(f, inp, check_forward_ad=True, check_batched_grad=True,
                                        check_batched_forward_grad=True)
        assert torch.autograd.gradgradcheck(f, inp, check_fwd_over_rev=True)
    # Through the dispatcher (register_autograd on the raw ops).
    assert torch.autograd.gradgradcheck(lambda g, w, s: ops.dcs_group_backward(g, w, s, dim, True, True), (g, w, s))
    assert torch.autograd.gradgradcheck(lambda w, s, wd, sd: ops.dcs_group_jvp(w, s, dim, wd, sd), (w, s, wd, sd))


# ---------------------------------------------------------------- opcheck
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,dim", [((3, 4), 0), ((3, 4), -1), ((2, 3, 5), 1), ((7,), 0), ((0, 3), 1)])
def test_opcheck(device, shape, dim):
    w, s = _inputs(shape, dim, torch.float32, device, requires_grad=True)
    torch.library.opcheck(ops.dcs_group.default, (w, s, dim))
    g = _randn(shape, torch.float32, device, 9).requires_grad_()
    for flags in [(True, True), (True, False), (False, True)]:
        torch.library.opcheck(ops.dcs_group_backward.default, (g, w, s, dim, *flags))
    wd = _randn(shape, torch.float32, device, 4).requires_grad_()
    sd = _randn((shape[dim],), torch.float32, device, 5).requires_grad_()
    for tangents in [(wd, sd), (wd, None), (None, sd)]:
        torch.library.opcheck(ops.dcs_group_jvp.default, (w, s, dim, *tangents))


# ---------------------------------------------------------- torch.compile
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,dim", [((5, 9), 0), ((4, 6, 3, 3), -3)])
def test_compile_fullgraph(device, shape, dim):
    torch._dynamo.reset()
    w, s = _inputs(shape, dim, torch.float32, device, requires_grad=True)

    def f(w, s):
        return (dcs_group(w, s, dim).sin() * 2).sum()

    def f_ref(w, s):
        return (ref.dcs_group(w, s, dim).sin() * 2).sum()

    cf = torch.compile(f, fullgraph=True, backend="inductor")
    got, want = cf(w, s), f_ref(w, s)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, (w, s)), torch.autograd.grad(want, (w, s))):
        torch.testing.assert_close(a, b)


# -------------------------------------------------------------- torch.func
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,dim", [((3, 4), 0), ((3, 4), -1), ((2, 3, 2), 1)])
def test_func_jvp_grad_hessian(device, shape, dim):
    w, s = _inputs(shape, dim, torch.float64, device)
    tangents = (_randn(shape, torch.float64, device, 10), _randn((shape[dim],), torch.float64, device, 11))
    f = lambda w, s: dcs_group(w, s, dim)
    f_ref = lambda w, s: ref.dcs_group(w, s, dim)

    out, tan = tf.jvp(f, (w, s), tangents)
    out_r, tan_r = tf.jvp(f_ref, (w, s), tangents)
    torch.testing.assert_close(out, out_r)
    torch.testing.assert_close(tan, tan_r)

    # forward-over-forward
    def dir_deriv(fn):
        return lambda *p: tf.jvp(fn, p, tangents)[1].pow(2).sum()

    torch.testing.assert_close(tf.jvp(dir_deriv(f), (w, s), tangents), tf.jvp(dir_deriv(f_ref), (w, s), tangents))

    scalar = lambda w, s: f(w, s).tanh().sum()
    scalar_r = lambda w, s: f_ref(w, s).tanh().sum()
    for got, want in zip(tf.grad(scalar, (0, 1))(w, s), tf.grad(scalar_r, (0, 1))(w, s)):
        torch.testing.assert_close(got, want)
    H, H_r = tf.hessian(scalar, (0, 1))(w, s), tf.hessian(scalar_r, (0, 1))(w, s)
    H2 = tf.jacrev(tf.jacrev(scalar, (0, 1)), (0, 1))(w, s)  # reverse-over-reverse
    for row, row2, row_r in zip(H, H2, H_r):
        for a, b, c in zip(row, row2, row_r):
            torch.testing.assert_close(a, c)
            torch.testing.assert_close(b, c)


# in_dims of (w, s): batched weights with a shared gate, per-sample gates, both,
# batch dims not in front.
VMAP_DIMS = [(0, None), (None, 0), (0, 0), (2, 1), (1, None)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("in_dims", VMAP_DIMS)
@pytest.mark.parametrize("dim", [0, -1])
def test_func_vmap(device, in_dims, dim):
    B, shape = 3, (4, 5)

    def make(shape_, d, seed):
        if d is None:
            return _randn(shape_, torch.float64, device, seed)
        s_ = list(shape_)
        s_.insert(d, B)
        return _randn(tuple(s_), torch.float64, device, seed)

    w, s = make(shape, in_dims[0], 1), make((shape[dim],), in_dims[1], 2)
    fn = lambda w, s: dcs_group(w, s, dim)
    fn_r = lambda w, s: ref.dcs_group(w, s, dim)
    torch.testing.assert_close(tf.vmap(fn, in_dims=in_dims)(w, s), tf.vmap(fn_r, in_dims=in_dims)(w, s), **EXACT)

    # per-sample gradients: vmap(grad)
    loss = lambda w, s: fn(w, s).sin().sum()
    loss_r = lambda w, s: fn_r(w, s).sin().sum()
    g = tf.vmap(tf.grad(loss, argnums=(0, 1)), in_dims=in_dims)(w, s)
    g_r = tf.vmap(tf.grad(loss_r, argnums=(0, 1)), in_dims=in_dims)(w, s)
    for a, b in zip(g, g_r):
        torch.testing.assert_close(a, b)

    # vmap of jvp, with tangents that are not batched
    t = (_randn(shape, torch.float64, device, 7), _randn((shape[dim],), torch.float64, device, 8))
    jv = tf.vmap(lambda w, s: tf.jvp(fn, (w, s), t)[1], in_dims=in_dims)
    jv_r = tf.vmap(lambda w, s: tf.jvp(fn_r, (w, s), t)[1], in_dims=in_dims)
    torch.testing.assert_close(jv(w, s), jv_r(w, s))


@pytest.mark.parametrize("device", DEVICES)
def test_func_vmap_of_backward_and_jvp_ops(device):
    """The vmap rules of the backward and jvp ops on their own, every operand batched in turn."""
    shape, dim = (3, 4), 1
    for bd in range(4):
        args = [_randn(shape, torch.float64, device, 1), _randn(shape, torch.float64, device, 2),
                _randn((4,), torch.float64, device, 3), _randn((4,), torch.float64, device, 4)]
        args[bd] = torch.stack([args[bd], args[bd] * 2 + 1])
        in_dims = tuple(0 if k == bd else None for k in range(4))
        # backward op: (grad, w, s), with the 4th operand unused
        for flags in [(True, True), (False, True), (True, False)]:
            f = lambda g, w, s, _: DCSGroupBackwardFunction.apply(g, w, s, dim, *flags)
            f_r = lambda g, w, s, _: ref.dcs_group_backward(g, w, s, dim, *flags)
            for a, b in zip(tf.vmap(f, in_dims=in_dims)(*args), tf.vmap(f_r, in_dims=in_dims)(*args)):
                torch.testing.assert_close(a, b)
        # jvp op: (w, w_dot, s, s_dot)
        f = lambda w, wd, s, sd: DCSGroupJvpFunction.apply(w, s, dim, wd, sd)
        f_r = lambda w, wd, s, sd: ref.dcs_group_jvp(w, s, dim, wd, sd)
        torch.testing.assert_close(tf.vmap(f, in_dims=in_dims)(*args), tf.vmap(f_r, in_dims=in_dims)(*args))


# ------------------------------------------------------------- bad input
def _bad_calls():
    w, s = torch.randn(3, 5), torch.randn(5)
    yield r"s must have shape \(G,\) = \(w.shape\[dim\],\) = \(5,\), got \(4,\)", ValueError, (w, torch.randn(4), 1)
    yield r"s must have shape \(G,\) = \(w.shape\[dim\],\) = \(3,\), got \(5,\)", ValueError, (w, s, 0)
    yield r"s must have shape \(G,\) = \(w.shape\[dim\],\) = \(5,\), got \(1, 5\)", ValueError, (w, s[None], 1)
    yield r"dim must be in the range \[-2, 1\] for w with 2 dimensions, got 2", IndexError, (w, s, 2)
    yield r"dim must be in the range \[-2, 1\] for w with 2 dimensions, got -3", IndexError, (w, s, -3)
    yield r"dim must be an int, got bool", TypeError, (w, s, True)
    yield r"dim must be an int, got float", TypeError, (w, s, 1.0)
    yield r"w must have at least one dimension", ValueError, (torch.tensor(1.0), torch.randn(1), 0)
    yield r"s must have the dtype of w \(torch.float32\), got torch.float64", TypeError, (w, s.double(), 1)
    yield r"s must have the dtype of w \(torch.float32\), got torch.int64", TypeError, (w, torch.ones(5, dtype=torch.long), 1)
    yield r"s must be on w's device \(cpu\), got meta", ValueError, (w, torch.empty(5, device="meta"), 1)
    yield r"w must be float32, float64, float16 or bfloat16, got torch.int64", TypeError, (torch.ones(3, 5, dtype=torch.long), torch.ones(5, dtype=torch.long), 1)
    yield r"s must be a torch.Tensor, got float", TypeError, (w, 2.0, 1)


@pytest.mark.parametrize("message,exc,args", list(_bad_calls()))
def test_bad_input_is_a_clear_error(message, exc, args):
    with pytest.raises(exc, match="symfast.dcs_group: " + message):
        dcs_group(*args)


def test_raw_ops_reject_bad_input_without_crashing():
    w, s = torch.randn(3, 5), torch.randn(5)
    with pytest.raises(RuntimeError, match=r"symfast.dcs_group: s must have shape \(G,\) = \(w.shape\[dim\],\) = \(5,\), got \(4,\)"):
        ops.dcs_group(w, torch.randn(4), 1)
    with pytest.raises(IndexError, match=r"symfast.dcs_group: dim must be in the range \[-2, 1\] for w with 2 dimensions, got 2"):
        ops.dcs_group(w, s, 2)
    with pytest.raises(RuntimeError, match="symfast.dcs_group: w must have at least one dimension"):
        ops.dcs_group(torch.tensor(1.0), s, 0)
    with pytest.raises(RuntimeError, match="symfast.dcs_group: w must be float32"):
        ops.dcs_group(torch.ones(3, 5, dtype=torch.int32), torch.ones(5, dtype=torch.int32), 1)
    with pytest.raises(RuntimeError, match=r"symfast.dcs_group: s must have the dtype of w \(Float\), got Double"):
        ops.dcs_group(w, s.double(), 1)
    with pytest.raises(RuntimeError, match=r"symfast.dcs_group_backward: grad must have w's shape \[3, 5\], got \[5, 3\]"):
        ops.dcs_group_backward(w.t(), w, s, 1, True, True)
    with pytest.raises(RuntimeError, match=r"symfast.dcs_group_jvp: s_dot must have shape \(G,\) = \(w.shape\[dim\],\) = \(5,\), got \(3,\)"):
        ops.dcs_group_jvp(w, s, 1, None, torch.randn(3))
    with pytest.raises(RuntimeError, match=r"symfast.dcs_group_jvp: w_dot must have the dtype of w"):
        ops.dcs_group_jvp(w, s, 1, w.half(), None)


def test_public_api():
    """symfast.dcs_group is this op (exported from symfast/__init__.py)."""
    assert symfast.dcs_group is dcs_group
    assert symfast.reference.dcs_group is ref.dcs_group


# --------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape,dim", [((1001, 37), 0), ((1001, 37), 1), ((64, 48, 3, 3), 1), ((3, 100000), 0)])
def test_cpu_and_cuda_agree(dtype, shape, dim):
    w, s = _inputs(shape, dim, dtype, "cpu")
    g = _randn(shape, dtype, "cpu", 9)
    torch.testing.assert_close(dcs_group(w, s, dim), dcs_group(w.cuda(), s.cuda(), dim).cpu(), **EXACT)
    cw, cs = ops.dcs_group_backward(g.cuda(), w.cuda(), s.cuda(), dim, True, True)
    gw, _ = ops.dcs_group_backward(g, w, s, dim, True, False)
    torch.testing.assert_close(cw.cpu(), gw, **EXACT)
    _assert_gate_grad(cs.cpu(), g, w, s, dim)


# ------------------------------------------- the C++ autograd training path
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape,dim", [((5, 7), 0), ((5, 7), -1), ((4, 6, 3, 3), 1), ((0, 4), 1)])
def test_training_path_equals_the_function_path(device, dtype, shape, dim):
    """Outside torch.func and forward AD, dcs_group records a C++ node
    (csrc/autograd.cpp); values and gradients equal the autograd.Function path
    bit for bit, also for a non-contiguous w."""
    from symfast.ops.dcs_group import DCSGroupFunction

    w, s = _inputs(shape, dim, dtype, device, requires_grad=True)
    wt = _randn(shape[::-1], dtype, device, 5).permute(*range(len(shape) - 1, -1, -1)).requires_grad_()
    g = _randn(shape, dtype, device, 9)
    for a in (w, wt):
        fast, slow = dcs_group(a, s, dim), DCSGroupFunction.apply(a, s, dim)
        assert fast.grad_fn.name() == "torch::autograd::CppNode<symfast::DCSGroupFunction>"
        assert slow.grad_fn.name() == "DCSGroupFunctionBackward"
        torch.testing.assert_close(fast, slow, **EXACT)
        for x, y in zip(torch.autograd.grad(fast, (a, s), g), torch.autograd.grad(slow, (a, s), g)):
            torch.testing.assert_close(x, y, **EXACT)


def test_training_path_runs_no_python_in_backward():
    import os
    import sys

    w, s = _inputs((6, 5), 1, torch.float32, "cpu", requires_grad=True)
    theta = dcs_group(w, s, 1)
    files = []
    sys.setprofile(lambda frame, event, arg: files.append(frame.f_code.co_filename) if event == "call" else None)
    try:
        theta.sum().backward()
    finally:
        sys.setprofile(None)
    package = os.path.dirname(symfast.__file__)
    assert [f for f in files if f.startswith(package)] == []
    assert w.grad is not None and s.grad is not None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,dim", [((3, 4), 0), ((2, 3, 2), -2), ((0, 3), 1)])
def test_training_path_gradcheck_gradgradcheck_opcheck(device, shape, dim):
    w, s = _inputs(shape, dim, torch.float64, device, requires_grad=True)
    f = lambda w, s: ops._dcs_group_autograd(w, s, dim)
    assert torch.autograd.gradcheck(f, (w, s))
    assert torch.autograd.gradgradcheck(f, (w, s))
    torch.library.opcheck(ops._dcs_group_autograd.default, (w, s, dim))
    w.grad = s.grad = None
    theta = ops._dcs_group_autograd(w, s.detach(), dim)  # the gate needs no gradient
    theta.sum().backward()
    assert w.grad is not None and s.grad is None
