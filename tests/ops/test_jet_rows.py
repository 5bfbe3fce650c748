"""The jet row ops (jet_layer_norm, jet_rms_norm, jet_softmax, jet_cross_entropy) against their
reference twins, and the twins against torch.func and finite differences.

A jet op returns (y, y1, y2) with y1 = f'(x) x1 and y2 = f'(x) x2 + f''(x)[x1, x1]: the first and
second t-derivatives of f along the path x + t x1 + t^2/2 x2 (parameters likewise). The kernels sum
their rows in another order than torch does, so values are held to the low-precision rule of
STYLE.md: the error against the float64 reference is at most twice the error of the reference run
in the same dtype (float32 with a little slack for the differing summation order).
"""

import pytest
import torch
import torch.func as tf
import torch.nn.functional as F

import symfast  # noqa: F401  (registers the ops' Python side)
from symfast import reference as ref
from symfast.ops.jet_rows import jet_cross_entropy, jet_layer_norm, jet_rms_norm, jet_softmax

from matrix import DEVICES, FLOAT_DTYPES

ops = torch.ops.symfast
F64 = torch.float64


def _randn(shape, dtype=F64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64).to(device=device, dtype=dtype)


def _up(ts):
    return [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in ts]


def _assert_jet_close(got, run_ref, args):
    """got against run_ref(*args): equal to rounding in float64, else the low-precision rule."""
    exact = run_ref(*_up(args))
    dtype = args[0].dtype
    if dtype == F64:
        for g, e in zip(got, exact):
            assert g.shape == e.shape and g.dtype == F64 and g.is_contiguous()
            torch.testing.assert_close(g, e)
        return
    low = run_ref(*args)
    for name, g, lo, e in zip(("y", "y1", "y2"), got, low, exact):
        assert g.shape == e.shape and g.dtype == dtype and g.is_contiguous(), name
        if e.numel() == 0:
            continue
        err = (g.double() - e).abs().max().item()
        ref_err = (lo.double() - e).abs().max().item()
        # float32: torch's cascade sums against the kernels' eight-lane sums, a few roundings of
        # the row's scale; for half types this is far below their rounding, so the rule is strict.
        slack = 32 * torch.finfo(torch.float32).eps * (e.abs().max().item() + 1)
        assert err <= 2 * ref_err + slack, (name, err, ref_err, slack)


# ------------------------------------------------------------------------ oracles
def _jet_oracle(f, primals, t1, t2):
    """(f, d/dt f, d^2/dt^2 f) at t = 0 along p + t p1 + t^2/2 p2, by nested torch.func.jvp in t,
    one direction at a time (None tangents are zero)."""
    k = next(t.shape[0] for t in list(t1) + list(t2) if t is not None)
    one = torch.ones((), dtype=F64)
    y1s, y2s = [], []
    for j in range(k):
        def g(t, j=j):
            return f(*[p + t * (0 if a is None else a[j]) + t * t / 2 * (0 if b is None else b[j])
                       for p, a, b in zip(primals, t1, t2)])

        y1, y2 = tf.jvp(lambda t: tf.jvp(g, (t,), (one,))[1], (torch.zeros((), dtype=F64),), (one,))
        y1s.append(y1)
        y2s.append(y2)
    return f(*primals), torch.stack(y1s), torch.stack(y2s)


def _layer_norm_formula(x, w, b, ns, eps):
    dims = tuple(range(-len(ns), 0))
    u = x - x.mean(dims, keepdim=True)
    return u / (u.pow(2).mean(dims, keepdim=True) + eps).sqrt() * w + b


def test_reference_layer_norm_matches_torch_func_and_finite_differences():
    """torch.func on the composite formula, and central differences of F.layer_norm itself (whose
    own forward-over-forward derivative is not usable as an oracle: in torch 2.13 it disagrees with
    finite differences)."""
    k, ns = 3, (4, 5)
    x, w, b = _randn((3, 4, 5), seed=1), _randn(ns, seed=2), _randn(ns, seed=3)
    t1 = [_randn((k, 3, 4, 5), seed=4), _randn((k,) + ns, seed=5), _randn((k,) + ns, seed=6)]
    t2 = [_randn((k, 3, 4, 5), seed=7), _randn((k,) + ns, seed=8), _randn((k,) + ns, seed=9)]
    got = ref.jet_layer_norm(x, t1[0], t2[0], ns, w, b, t1[1], t1[2], t2[1], t2[2], 1e-5)
    want = _jet_oracle(lambda x, w, b: _layer_norm_formula(x, w, b, ns, 1e-5), (x, w, b), t1, t2)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)
    h = 1e-3
    for j in range(k):
        def path(t):
            p = [v + t * a[j] + t * t / 2 * c[j] for v, a, c in zip((x, w, b), t1, t2)]
            return F.layer_norm(p[0], ns, p[1], p[2], 1e-5)

        fd1 = (path(h) - path(-h)) / (2 * h)
        fd2 = (path(h) - 2 * path(0.0) + path(-h)) / h**2
        torch.testing.assert_close(got[1][j], fd1, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got[2][j], fd2, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tangents", ["both", "x1", "x2"])
def test_reference_rms_norm_softmax_cross_entropy_match_torch_func(tangents):
    k = 2
    x = _randn((3, 4, 6), seed=1)
    x1 = _randn((k, 3, 4, 6), seed=2) if tangents != "x2" else None
    x2 = _randn((k, 3, 4, 6), seed=3) if tangents != "x1" else None
    w, w1 = _randn((6,), seed=4), _randn((k, 6), seed=5)
    got = ref.jet_rms_norm(x, x1, x2, [6], w, w1, None, 1e-6)
    want = _jet_oracle(lambda x, w: F.rms_norm(x, (6,), w, 1e-6), (x, w), (x1, w1), (x2, None))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)
    for dim in (0, 1, -1):
        for log in (False, True):
            fn = F.log_softmax if log else F.softmax
            want = _jet_oracle(lambda x: fn(x, dim), (x,), (x1,), (x2,))
            for a, e in zip(ref.jet_softmax(x, x1, x2, dim, log), want):
                torch.testing.assert_close(a, e)
    z, z1, z2 = x[0], None if x1 is None else x1[:, 0], None if x2 is None else x2[:, 0]
    for ignore in (-100, 2):
        target = torch.tensor([0, 5, ignore, 2])
        want = _jet_oracle(lambda z: F.cross_entropy(z, target, reduction="none", ignore_index=ignore),
                           (z,), (z1,), (z2,))
        for a, e in zip(ref.jet_cross_entropy(z, z1, z2, target, ignore), want):
            torch.testing.assert_close(a, e)


# ------------------------------------------------------------------ layer / RMS norm
# (x shape, normalized_shape): odd sizes, two normalized dims, a row of one, empty batches
# and empty rows, and enough rows to split over threads.
NORM_SHAPES = [((5, 7), (7,)), ((2, 3, 4), (3, 4)), ((4, 1), (1,)), ((9,), (9,)), ((0, 6), (6,)),
               ((3, 0), (0,)), ((33, 65), (65,)), ((300, 130), (130,))]
NORM_PARAMS = ["none", "affine", "affine-jets", "weight-jet1"]


def _norm_args(shape, ns, k, tangents, params, dtype, device, rms):
    x = _randn(shape, dtype, device, 1)
    x1 = _randn((k,) + shape, dtype, device, 2) if tangents in ("both", "x1") else None
    x2 = _randn((k,) + shape, dtype, device, 3) if tangents in ("both", "x2") else None
    p = {name: None for name in ("w", "b", "w1", "b1", "w2", "b2")}
    if params != "none":
        p["w"], p["b"] = _randn(ns, dtype, device, 4), _randn(ns, dtype, device, 5)
    if params == "affine-jets":
        p.update(w1=_randn((k,) + ns, dtype, device, 6), b1=_randn((k,) + ns, dtype, device, 7),
                 w2=_randn((k,) + ns, dtype, device, 8), b2=_randn((k,) + ns, dtype, device, 9))
    if params == "weight-jet1":
        p["w1"] = _randn((k,) + ns, dtype, device, 6)
    if rms:
        return (x, x1, x2, list(ns), p["w"], p["w1"], p["w2"], 1e-6)
    return (x, x1, x2, list(ns), p["w"], p["b"], p["w1"], p["b1"], p["w2"], p["b2"], 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape,ns", NORM_SHAPES)
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_norm_matches_reference(device, dtype, shape, ns, k, rms):
    op, twin = (ops.jet_rms_norm, ref.jet_rms_norm) if rms else (ops.jet_layer_norm, ref.jet_layer_norm)
    for tangents, params in [("both", "affine-jets"), ("x1", "none"), ("x2", "affine"), ("both", "weight-jet1"),
                             ("none", "affine-jets")]:
        if tangents == "none" and rms:
            args = _norm_args(shape, ns, k, "none", "weight-jet1", dtype, device, rms)
        else:
            args = _norm_args(shape, ns, k, tangents, params, dtype, device, rms)
        _assert_jet_close(op(*args), twin, args)


def test_norm_non_contiguous_inputs():
    k = 2
    x = _randn((6, 5), seed=1).t()                   # (5, 6), transposed
    x1 = _randn((k, 6, 5), seed=2).transpose(1, 2)   # (k, 5, 6)
    x2 = _randn((k, 5, 12), seed=3)[..., ::2]        # strided
    w = _randn((12,), seed=4)[::2]
    w1 = _randn((6, k), seed=5).t()
    args = (x, x1, x2, [6], w, w, w1, w1, w1, w1, 1e-5)
    _assert_jet_close(ops.jet_layer_norm(*args), ref.jet_layer_norm, args)
    args = (x, x1, x2, [6], w, w1, None, 1e-5)
    _assert_jet_close(ops.jet_rms_norm(*args), ref.jet_rms_norm, args)


def test_rms_norm_eps_defaults_to_the_dtype_epsilon_like_F_rms_norm():
    x, x1 = _randn((4, 8), torch.float32, seed=1) * 1e-4, _randn((1, 4, 8), torch.float32, seed=2)
    y, _, _ = jet_rms_norm(x, x1, None, [8])
    torch.testing.assert_close(y, F.rms_norm(x, (8,)))
    assert not torch.allclose(y, jet_rms_norm(x, x1, None, [8], eps=1e-5)[0])


# ----------------------------------------------------------------------- softmax
SOFTMAX_SHAPES = [((), 0), ((7,), 0), ((3, 5), 1), ((3, 5), 0), ((2, 3, 4), 1), ((2, 3, 4), -3), ((0, 4), 1),
                  ((4, 0), 1), ((64, 300), -1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape,dim", SOFTMAX_SHAPES)
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("log", [False, True])
def test_softmax_matches_reference(device, dtype, shape, dim, k, log):
    x = _randn(shape, dtype, device, 1) * 3
    x1, x2 = _randn((k,) + shape, dtype, device, 2), _randn((k,) + shape, dtype, device, 3)
    for t1, t2 in [(x1, x2), (x1, None), (None, x2)]:
        args = (x, t1, t2, dim, log)
        _assert_jet_close(ops.jet_softmax(*args), ref.jet_softmax, args)


def test_softmax_non_contiguous_and_large_logits():
    x = _randn((6, 5), seed=1).t() * 50  # exp overflows without the max subtraction
    x1, x2 = _randn((2, 6, 5), seed=2).transpose(1, 2), _randn((2, 5, 12), seed=3)[..., ::2]
    for dim in (0, 1):
        for log in (False, True):
            args = (x, x1, x2, dim, log)
            got = ops.jet_softmax(*args)
            assert all(torch.isfinite(t).all() for t in got)
            _assert_jet_close(got, ref.jet_softmax, args)


# ------------------------------------------------------------------ cross entropy
def _targets(n, c, device, seed, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, max(c, 1), (n,), generator=g)
    t[::3] = ignore_index  # every third row ignored
    return t.to(device)


CE_SHAPES = [(0, 5), (1, 1), (7, 5), (5, 33), (4, 0), (96, 1000)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n,c", CE_SHAPES)
@pytest.mark.parametrize("k", [1, 3])
def test_cross_entropy_matches_reference(device, dtype, n, c, k):
    z = _randn((n, c), dtype, device, 1) * 3
    z1, z2 = _randn((k, n, c), dtype, device, 2), _randn((k, n, c), dtype, device, 3)
    for ignore_index in (-100, 0):
        if c == 0 and ignore_index == 0:
            continue
        target = _targets(n, c, device, 4, ignore_index)
        if c == 0:
            target = torch.full((n,), ignore_index, device=device)
        for t1, t2 in [(z1, z2), (z1, None), (None, z2)]:
            args = (z, t1, t2, target, ignore_index)
            got = ops.jet_cross_entropy(*args)
            _assert_jet_close(got, ref.jet_cross_entropy, args)
            ignored = target == ignore_index
            assert (got[0][ignored] == 0).all() and (got[1][:, ignored] == 0).all() and (got[2][:, ignored] == 0).all()


def test_cross_entropy_non_contiguous_inputs():
    z = _randn((9, 6), seed=1).t()
    z1, z2 = _randn((2, 9, 6), seed=2).transpose(1, 2), _randn((2, 6, 18), seed=3)[..., ::2]
    target = torch.tensor([0, 8, -100, 3, 3, 7, 1, 2, 0, 5, 4, 6])[::2]
    args = (z, z1, z2, target, -100)
    _assert_jet_close(ops.jet_cross_entropy(*args), ref.jet_cross_entropy, args)


# ------------------------------------------------------- gradients, opcheck, compile
def _grad_cases(device):
    # Small: gradgradcheck differentiates the backward numerically in every input and output.
    k = 1
    r = lambda shape, seed: _randn(shape, F64, device, seed).requires_grad_()  # noqa: E731
    x, x1, x2 = r((2, 3), 1), r((k, 2, 3), 2), r((k, 2, 3), 3)
    w, b, w1, b2 = r((3,), 4), r((3,), 5), r((k, 3), 6), r((k, 3), 7)
    target = torch.tensor([1, -100], device=device)
    yield "layer_norm", ops.jet_layer_norm.default, (x, x1, x2, [3], w, b, w1, None, None, b2, 1e-5)
    yield "layer_norm-x2-only", ops.jet_layer_norm.default, (x, None, x2, [2, 3], None, None, None, None, None, None, 1e-5)
    yield "rms_norm", ops.jet_rms_norm.default, (x, x1, None, [3], w, w1, None, 1e-6)
    yield "softmax", ops.jet_softmax.default, (x, x1, x2, 0, False)
    yield "log_softmax", ops.jet_softmax.default, (x, None, x2, 1, True)
    yield "cross_entropy", ops.jet_cross_entropy.default, (x, x1, x2, target, -100)
    # first order only (second=False): y2 is an empty (0,) tensor
    yield "layer_norm-first-order", ops.jet_layer_norm.default, (x, x1, x2, [3], w, b, w1, None, None, b2, 1e-5,
                                                                 False)
    yield "softmax-first-order", ops.jet_softmax.default, (x, x1, None, 1, False, False)
    yield "cross_entropy-first-order", ops.jet_cross_entropy.default, (x, x1, None, target, -100, False)


def _grad_case_ids():
    return [name for name, _, _ in _grad_cases("cpu")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", _grad_case_ids())
def test_gradcheck_gradgradcheck_opcheck(device, case):
    _, op, args = next(c for c in _grad_cases(device) if c[0] == case)
    positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]

    def f(*diff):
        full = list(args)
        for i, t in zip(positions, diff):
            full[i] = t
        return op(*full)

    inputs = tuple(args[i] for i in positions)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)
    # The AOT-dispatch checks trace the backward (the vjp of the reference twin, one helper for all
    # four ops) and cost seconds each: they run fully on one norm and on cross-entropy.
    full = case in ("layer_norm", "cross_entropy")
    utils = None if full else ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(op, args, **({} if full else {"test_utils": utils}))


_TWINS = {"jet_layer_norm": ref.jet_layer_norm, "jet_rms_norm": ref.jet_rms_norm, "jet_softmax": ref.jet_softmax,
          "jet_cross_entropy": ref.jet_cross_entropy}  # the ops' positional signatures


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("case", [c for c in _grad_case_ids() if not c.endswith("first-order")])
def test_first_order_call_gives_y_and_y1_bit_for_bit_and_an_empty_y2(device, dtype, case):
    _, op, args = next(c for c in _grad_cases(device) if c[0] == case)
    args = [a.detach().to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    full, first = op(*args), op(*args, second=False)
    assert torch.equal(first[0], full[0]) and torch.equal(first[1], full[1])
    assert first[2].shape == (0,) and first[2].dtype == dtype and first[2].device == full[2].device
    twin = _TWINS[op.name().split("::")[1]](*args, second=False)
    assert twin[2].shape == (0,)
    torch.testing.assert_close(twin[1], first[1])


def test_compile_fullgraph():
    torch._dynamo.reset()
    k = 2
    x, x1, x2 = _randn((5, 8), torch.float32, seed=1), _randn((k, 5, 8), torch.float32, seed=2), None
    w, b, w1 = _randn((8,), torch.float32, seed=3), _randn((8,), torch.float32, seed=4), _randn((k, 8), torch.float32, seed=5)
    target = torch.tensor([0, 7, -100, 3, 1])

    def f(x, x1, w, b, w1, target):
        h = jet_layer_norm(x, x1, None, [8], w, b, w1)
        s = jet_softmax(h[0], h[1], h[2], -1, log=True)
        r = jet_rms_norm(s[0], s[1], s[2], [8], w, eps=1e-6)
        return jet_cross_entropy(r[0], r[1], r[2], target)

    got = torch.compile(f, fullgraph=True)(x, x1, w, b, w1, target)
    for a, e in zip(got, f(x, x1, w, b, w1, target)):
        torch.testing.assert_close(a, e)
    with pytest.raises(Exception, match=r"symfast.jet_softmax: dim must be in the range \[-2, 1\]"):
        torch.compile(lambda x, x1: jet_softmax(x, x1, None, 2), fullgraph=True)(x, x1)
    assert x2 is None


# ---------------------------------------------------------------------- bad input
def _bad_calls():
    x, x1 = torch.randn(3, 4), torch.randn(2, 3, 4)
    w, w1 = torch.randn(4), torch.randn(2, 4)
    none6 = (None,) * 6
    ln = ops.jet_layer_norm
    yield "x must be float32, float64, float16 or bfloat16", TypeError, ln, \
        (torch.ones(3, 4, dtype=torch.long), x1, None, [4], *none6, 1e-5)
    yield "normalized_shape must be non-empty and equal the trailing dims of x (3, 4), got (5,)", ValueError, ln, \
        (x, x1, None, [5], *none6, 1e-5)
    yield "normalized_shape must be non-empty and equal the trailing dims of x (3, 4), got (2, 3, 4)", ValueError, \
        ln, (x, x1, None, [2, 3, 4], *none6, 1e-5)
    yield "x1 must have shape (K, *x.shape) = (K, 3, 4), got (3, 4)", ValueError, ln, (x, x, None, [4], *none6, 1e-5)
    yield "x2 must have shape (K, *x.shape) = (2, 3, 4) (K from x1), got (3, 3, 4)", ValueError, ln, \
        (x, x1, torch.randn(3, 3, 4), [4], *none6, 1e-5)
    yield "x1 must have the dtype of x", TypeError, ln, (x, x1.double(), None, [4], *none6, 1e-5)
    yield "weight must have shape normalized_shape = (4,), got (3,)", ValueError, ln, \
        (x, x1, None, [4], torch.randn(3), None, None, None, None, None, 1e-5)
    yield "weight1 must have shape (K, *normalized_shape) = (2, 4) (K from x1), got (3, 4)", ValueError, ln, \
        (x, x1, None, [4], w, None, torch.randn(3, 4), None, None, None, 1e-5)
    yield "bias1 was given without bias", ValueError, ln, (x, x1, None, [4], w, None, None, w1, None, None, 1e-5)
    yield "at least one of x1, x2, weight1, bias1, weight2, bias2 must be given", ValueError, ln, \
        (x, None, None, [4], w, w, *(None,) * 4, 1e-5)
    rms = ops.jet_rms_norm
    yield "weight2 was given without weight", ValueError, rms, (x, x1, None, [4], None, None, w1, 1e-6)
    yield "at least one of x1, x2, weight1, weight2 must be given", ValueError, rms, (x, None, None, [4], w, None, None, 1e-6)
    sm = ops.jet_softmax
    yield "dim must be in the range [-2, 1] for x with 2 dimensions, got 2", IndexError, sm, (x, x1, None, 2, False)
    yield "dim must be in the range [-2, 1] for x with 2 dimensions, got -3", IndexError, sm, (x, x1, None, -3, True)
    yield "at least one of x1, x2 must be given", ValueError, sm, (x, None, None, 0, False)
    yield "x2 must have shape (K, *x.shape) = (K, 3, 4), got (2, 4, 3)", ValueError, sm, \
        (x, None, torch.randn(2, 4, 3), 0, False)
    ce = ops.jet_cross_entropy
    t = torch.tensor([0, 1, 2])
    yield "z must have shape (N, C), got (4,)", ValueError, ce, (w, w1, None, t, -100)
    yield "target must hold int64 class indices", TypeError, ce, (x, x1, None, t.float(), -100)
    yield "target must have shape (N,) = (3,), got (4,)", ValueError, ce, (x, x1, None, torch.tensor([0, 1, 2, 3]), -100)
    yield "target must have shape (N,) = (3,), got (3, 1)", ValueError, ce, (x, x1, None, t[:, None], -100)
    yield "z1 must have shape (K, *z.shape) = (K, 3, 4), got (2, 4)", ValueError, ce, (x, w1, None, t, -100)
    yield "at least one of z1, z2 must be given", ValueError, ce, (x, None, None, t, -100)
    yield "target must hold class indices in [0, C) = [0, 4) or ignore_index (-100), got 4", IndexError, ce, \
        (x, x1, None, torch.tensor([0, 4, -100]), -100)
    yield "target must hold class indices in [0, C) = [0, 4) or ignore_index (-1), got -100", IndexError, ce, \
        (x, x1, None, torch.tensor([-1, 3, -100]), -1)


_WRAPPERS = {
    "jet_layer_norm": lambda x, x1, x2, ns, w, b, w1, b1, w2, b2, eps: jet_layer_norm(x, x1, x2, ns, w, b, w1, b1, w2, b2, eps),
    "jet_rms_norm": lambda x, x1, x2, ns, w, w1, w2, eps: jet_rms_norm(x, x1, x2, ns, w, w1, w2, eps),
    "jet_softmax": lambda x, x1, x2, dim, log: jet_softmax(x, x1, x2, dim, log=log),
    "jet_cross_entropy": lambda z, z1, z2, t, ignore: jet_cross_entropy(z, z1, z2, t, ignore_index=ignore),
}


@pytest.mark.parametrize("message,exc,op,args", list(_bad_calls()))
def test_bad_input_is_a_clear_error_from_wrapper_fake_and_kernel(message, exc, op, args):
    """The wrapper (Python checks), the raw op (C++ checks) and, for shape errors, the fake kernel
    under torch.compile say the same thing."""
    name = op._qualified_op_name.split("::")[1]
    pattern = "symfast." + name + ": " + message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("*", r"\*")
    with pytest.raises(exc, match=pattern):
        _WRAPPERS[name](*args)
    with pytest.raises(exc, match=pattern):
        op(*args)
    if "class indices in" not in message and "dtype" not in message and "int64" not in message and "float32" not in message:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode() as mode:
            fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            with pytest.raises(exc, match=pattern):
                op(*fake)
