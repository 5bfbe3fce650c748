"""The pointwise jet ops (jet_activation, jet_dcs, jet_dcs_group) against their pure-PyTorch twins.

The twins in symfast.reference are themselves checked against torch.func: a jet is (f(x),
d/dt f(x(t)), d^2/dt^2 f(x(t))) at t = 0 for a curve with x'(0) = x1 and x''(0) = x2, which nested
jvps of the torch function compute independently of any closed form.
"""

import pytest
import torch
import torch.func as tf
import torch.nn.functional as F

import symfast  # noqa: F401  (registers the fake kernels and autograd of the jet ops)
from symfast import reference as ref
from symfast.ops import jet_pointwise as jp

from matrix import DEVICES, FLOAT_DTYPES

ops = torch.ops.symfast

KINDS = ref.ACTIVATION_KINDS
# Shapes: 0-d, empty, odd sizes, and one spanning several blocks (256 elements) and
# parallel_for tasks.
SHAPES = [(), (0,), (7,), (3, 5, 4), (3, 0, 2), (300, 37)]
# Which tangents are given: both, only the first, only the second.
PRESENT = [(True, True), (True, False), (False, True)]
EXACT = dict(atol=0, rtol=0)


def _randn(shape, dtype, device, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype)


def _softplus_args(kind):
    # beta and threshold chosen so that random inputs fall on both sides of the threshold
    return (2.0, 3.0) if kind == "softplus" else (1.0, 20.0)


def _tangents(shape, K, dtype, device, present, seed):
    x1 = _randn((K,) + shape, dtype, device, seed) if present[0] else None
    x2 = _randn((K,) + shape, dtype, device, seed + 1) if present[1] else None
    return x1, x2


def _jet_by_torch_func(f, primals, firsts, seconds):
    """(f, D f[x1], D f[x2] + D^2 f[x1, x1]) by nested torch.func.jvp, for one direction."""
    y, y1 = tf.jvp(f, primals, firsts)
    curvature = tf.jvp(lambda *p: tf.jvp(f, p, firsts)[1], primals, firsts)[1]
    return y, y1, tf.jvp(f, primals, seconds)[1] + curvature


def _assert_low_precision_rule(got, inputs64, ref_low, fn64):
    """flash-attention's rule: the kernel's error against the float64 twin is at most twice the
    error of the twin run in the low precision (plus one ulp of the output's scale)."""
    exact = fn64(*inputs64)
    for g, r, e in zip(got, ref_low, exact):
        if e.numel() == 0:
            assert g.shape == e.shape
            continue
        err = (g.double() - e).abs().max()
        ref_err = (r.double() - e).abs().max()
        assert err <= 2 * ref_err + torch.finfo(g.dtype).eps * e.abs().max(), (err, ref_err)


def _compare(got, want, dtype, inputs, fn):
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == dtype and g.is_contiguous()
    if dtype in (torch.float16, torch.bfloat16):
        inputs64 = [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
        _assert_low_precision_rule(got, inputs64, want, fn)
    else:
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


# ------------------------------------------------------------ jet_activation
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_activation_matches_reference(device, dtype, kind):
    beta, threshold = _softplus_args(kind)
    for shape in SHAPES:
        x = _randn(shape, dtype, device, 1, scale=2.0)
        for K in (1, 3):
            for present in PRESENT:
                x1, x2 = _tangents(shape, K, dtype, device, present, 2)
                got = jp.jet_activation(x, x1, x2, kind, beta, threshold)
                want = ref.jet_activation(x, x1, x2, kind, beta, threshold)
                assert got[1].shape == got[2].shape == (K,) + shape
                fn = lambda x, x1, x2: ref.jet_activation(x, x1, x2, kind, beta, threshold)  # noqa: E731
                _compare(got, want, dtype, (x, x1, x2), fn)
                if not present[0]:
                    assert torch.all(got[1] == 0)


@pytest.mark.parametrize("kind", KINDS)
def test_activation_reference_is_the_jet_of_the_torch_function(kind):
    beta, threshold = _softplus_args(kind)
    torch_fn = {
        "gelu": lambda x: F.gelu(x),
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "silu": F.silu,
        "tanh": torch.tanh,
        "sigmoid": torch.sigmoid,
        "relu": torch.relu,
        "softplus": lambda x: F.softplus(x, beta=beta, threshold=threshold),
    }[kind]
    x = _randn((4, 6), torch.float64, "cpu", 1, scale=2.0)
    # tails too, where 1 - sigmoid would cancel
    x[0, :3] = torch.tensor([-30.0, 25.0, 8.0], dtype=torch.float64)
    K = 3
    x1, x2 = _randn((K, 4, 6), torch.float64, "cpu", 2), _randn((K, 4, 6), torch.float64, "cpu", 3)
    y, y1, y2 = ref.jet_activation(x, x1, x2, kind, beta, threshold)
    for k in range(K):
        e, e1, e2 = _jet_by_torch_func(torch_fn, (x,), (x1[k],), (x2[k],))
        torch.testing.assert_close(y, e, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(y1[k], e1, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(y2[k], e2, rtol=1e-10, atol=1e-13)
    # and the kernel agrees with the torch.func jet too, not only with its twin
    torch.testing.assert_close(ops.jet_activation(x, x1, x2, kind, beta, threshold)[2][0],
                               _jet_by_torch_func(torch_fn, (x,), (x1[0],), (x2[0],))[2], rtol=1e-10, atol=1e-13)


def test_relu_is_a_select_and_flat_at_zero():
    x = torch.tensor([-1.0, 0.0, 2.0, float("nan")])
    x1 = torch.tensor([[float("inf"), 5.0, 3.0, 1.0]])
    y, y1, y2 = ops.jet_activation(x, x1, x1, "relu")
    assert torch.equal(y[:3], torch.tensor([0.0, 0.0, 2.0])) and y[3].isnan()  # NaN passes, as torch.relu
    # f'(0) = 0 as torch's relu backward, and 0 where relu is flat even for an infinite tangent
    assert torch.equal(y1[0, :3], torch.tensor([0.0, 0.0, 3.0]))
    assert torch.equal(y2[0, :3], torch.tensor([0.0, 0.0, 3.0]))


def test_activation_tails_stay_finite_and_accurate():
    """sigma' as sigma(x) sigma(-x) and 1 - tanh^2 as 4 sigma(2x) sigma(-2x): no cancellation to 0
    (nor inf - inf = nan) far out, where float32 still represents the tiny derivatives."""
    x = torch.tensor([-100.0, -30.0, 30.0, 100.0])
    x1 = torch.ones(1, 4)
    for kind in ("silu", "sigmoid", "softplus", "gelu", "gelu_tanh", "tanh"):
        # x2 = None: y2 = f'' x1^2 alone (f' x2 + f'' x1^2 may cancel, as the exact values do)
        y, y1, y2 = ops.jet_activation(x, x1, None, kind)
        assert torch.isfinite(y).all() and torch.isfinite(y1).all() and torch.isfinite(y2).all(), kind
        want = ref.jet_activation(x.double(), x1.double(), None, kind)
        for a, b in zip((y, y1, y2), want):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-30, msg=kind)


# ------------------------------------------------------------------ jet_dcs
DCS_PRESENT = [  # w1, u1, v1, w2, u2, v2
    (True, True, True, True, True, True),
    (True, True, True, False, False, False),
    (False, False, False, True, False, False),
    (False, True, False, True, False, True),
    (True, False, False, False, True, False),
]


def _dcs_masks(shape, device):
    g = torch.Generator().manual_seed(7)
    yield None
    yield (torch.rand(shape, generator=g) > 0.5).to(device)
    yield (torch.rand(shape, generator=g) > 0.5).to(device=device, dtype=torch.float32)
    if len(shape) >= 1:
        yield (torch.rand(shape[-1:], generator=g) > 0.5).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dcs_matches_reference_exactly(device, dtype):
    # Kernel and twin sum the same products in the same order in the accumulation type and round
    # once, so they agree bit for bit in every dtype.
    for shape in SHAPES:
        w, u, v = (_randn(shape, dtype, device, s) for s in (1, 2, 3))
        for mask in _dcs_masks(shape, device):
            for K in (1, 3):
                for present in DCS_PRESENT:
                    tangents = [_randn((K,) + shape, dtype, device, 10 + i) if p and (mask is not None or i % 3 != 2)
                                else None for i, p in enumerate(present)]
                    args = (w, u, v if mask is not None else None, mask, *tangents)
                    got = jp.jet_dcs(*args)
                    want = ref.jet_dcs(*args)
                    for g, e in zip(got, want):
                        assert g.shape == e.shape and g.is_contiguous()
                        torch.testing.assert_close(g, e, **EXACT)


def test_dcs_reference_is_the_jet_of_dcs():
    shape, K = (3, 5), 2
    w, u, v = (_randn(shape, torch.float64, "cpu", s) for s in (1, 2, 3))
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.5
    t1 = [_randn((K,) + shape, torch.float64, "cpu", 10 + i) for i in range(3)]
    t2 = [_randn((K,) + shape, torch.float64, "cpu", 20 + i) for i in range(3)]
    y, y1, y2 = ref.jet_dcs(w, u, v, mask, *t1, *t2)
    f = lambda w, u, v: symfast.reference.dcs(w, u, v, mask)  # noqa: E731
    for k in range(K):
        e, e1, e2 = _jet_by_torch_func(f, (w, u, v), tuple(t[k] for t in t1), tuple(t[k] for t in t2))
        torch.testing.assert_close(y, e, **EXACT)
        torch.testing.assert_close(y1[k], e1, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(y2[k], e2, rtol=1e-14, atol=1e-14)


# ------------------------------------------------------------ jet_dcs_group
GROUP_CASES = [((5,), 0), ((3, 4, 5), 1), ((3, 4, 5), -1), ((3, 4, 5), 0), ((0, 4), 1), ((4, 0), 0),
               ((64, 33), 0), ((40, 7, 3), 1)]
GROUP_PRESENT = [(True, True, True, True), (True, False, False, False), (False, True, False, False),
                 (False, False, True, True), (True, True, False, False)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dcs_group_matches_reference_exactly(device, dtype):
    for shape, dim in GROUP_CASES:
        G = shape[dim]
        w, s = _randn(shape, dtype, device, 1), _randn((G,), dtype, device, 2)
        for K in (1, 3):
            for present in GROUP_PRESENT:
                shapes = [(K,) + shape, (K, G), (K,) + shape, (K, G)]
                tangents = [_randn(sh, dtype, device, 10 + i) if p else None
                            for i, (sh, p) in enumerate(zip(shapes, present))]
                got = jp.jet_dcs_group(w, s, dim, *tangents)
                want = ref.jet_dcs_group(w, s, dim, *tangents)
                for g, e in zip(got, want):
                    assert g.shape == e.shape and g.is_contiguous()
                    torch.testing.assert_close(g, e, **EXACT)


def test_dcs_group_reference_is_the_jet_of_dcs_group():
    shape, dim, K = (3, 4, 2), 1, 2
    w, s = _randn(shape, torch.float64, "cpu", 1), _randn((4,), torch.float64, "cpu", 2)
    w1, w2 = _randn((K,) + shape, torch.float64, "cpu", 3), _randn((K,) + shape, torch.float64, "cpu", 4)
    s1, s2 = _randn((K, 4), torch.float64, "cpu", 5), _randn((K, 4), torch.float64, "cpu", 6)
    y, y1, y2 = ref.jet_dcs_group(w, s, dim, w1, s1, w2, s2)
    f = lambda w, s: ref.dcs_group(w, s, dim)  # noqa: E731
    for k in range(K):
        e, e1, e2 = _jet_by_torch_func(f, (w, s), (w1[k], s1[k]), (w2[k], s2[k]))
        torch.testing.assert_close(y, e, **EXACT)
        torch.testing.assert_close(y1[k], e1, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(y2[k], e2, rtol=1e-14, atol=1e-14)


# --------------------------------------------------------- memory layouts
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    dt = torch.float32
    x = _randn((6, 10), dt, device, 1).t()                      # transposed
    x1 = _randn((10, 3, 6), dt, device, 2).permute(1, 2, 0)     # [K, 6, 10] viewed as [K, 10, 6]
    x1 = x1.transpose(1, 2)
    x2 = _randn((3, 10, 12), dt, device, 3)[:, :, ::2]          # strided last dim
    for kind in ("gelu", "softplus", "relu"):
        got, want = jp.jet_activation(x, x1, x2, kind), ref.jet_activation(x, x1, x2, kind)
        for g, e in zip(got, want):
            assert g.is_contiguous()
            torch.testing.assert_close(g, e)
    w, u = x, _randn((10, 6), dt, device, 4)
    mask = (torch.rand(20, 6, device=device) > 0.5)[::2]        # strided mask
    v = _randn((6, 10), dt, device, 5).t()
    args = (w, u, v, mask, x1, x2, x1, x2, x1, x2)
    for g, e in zip(jp.jet_dcs(*args), ref.jet_dcs(*args)):
        torch.testing.assert_close(g, e, **EXACT)
    s = _randn((12,), dt, device, 6)[::2]                       # strided gate
    s1 = _randn((6, 3), dt, device, 7).t()                      # [K, G] transposed
    for g, e in zip(jp.jet_dcs_group(w, s, 1, x1, s1, x2, s1), ref.jet_dcs_group(w, s, 1, x1, s1, x2, s1)):
        torch.testing.assert_close(g, e, **EXACT)


# ------------------------------------------------------- autograd checks
@pytest.mark.parametrize("kind", KINDS)
def test_activation_gradcheck_and_gradgradcheck(kind):
    beta, threshold = _softplus_args(kind)
    x = torch.tensor([-1.3, -0.4, 0.7, 1.9], dtype=torch.float64, requires_grad=True)
    if kind == "softplus":
        x = torch.tensor([-1.3, 0.4, 1.7, 2.2], dtype=torch.float64, requires_grad=True)  # both sides
    x1 = _randn((2, 4), torch.float64, "cpu", 2).requires_grad_()
    x2 = _randn((2, 4), torch.float64, "cpu", 3).requires_grad_()
    f = lambda x, x1, x2: ops.jet_activation(x, x1, x2, kind, beta, threshold)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, x1, x2))
    assert torch.autograd.gradgradcheck(f, (x, x1, x2))
    # with a tangent missing
    assert torch.autograd.gradcheck(lambda x, x1: ops.jet_activation(x, x1, None, kind, beta, threshold), (x, x1))


def test_dcs_and_dcs_group_gradcheck_and_gradgradcheck():
    sh, K = (2, 3), 2
    w, u, v = (_randn(sh, torch.float64, "cpu", s).requires_grad_() for s in (1, 2, 3))
    mask = torch.tensor([[True, False, True], [False, True, True]])
    t = [_randn((K,) + sh, torch.float64, "cpu", 10 + i).requires_grad_() for i in range(6)]
    f = lambda *a: ops.jet_dcs(a[0], a[1], a[2], mask, *a[3:])  # noqa: E731
    assert torch.autograd.gradcheck(f, (w, u, v, *t))
    assert torch.autograd.gradgradcheck(f, (w, u, v, *t))
    s = _randn((3,), torch.float64, "cpu", 4).requires_grad_()
    s1, s2 = (_randn((K, 3), torch.float64, "cpu", i).requires_grad_() for i in (5, 6))
    g = lambda w, s, w1, s1, w2, s2: ops.jet_dcs_group(w, s, -1, w1, s1, w2, s2)  # noqa: E731
    assert torch.autograd.gradcheck(g, (w, s, t[0], s1, t[3], s2))
    assert torch.autograd.gradgradcheck(g, (w, s, t[0], s1, t[3], s2))


# ---------------------------------------------------------------- opcheck
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    dt, K, sh = torch.float32, 2, (3, 4)
    x = _randn(sh, dt, device, 1).requires_grad_()
    x1, x2 = (_randn((K,) + sh, dt, device, s).requires_grad_() for s in (2, 3))
    torch.library.opcheck(ops.jet_activation.default, (x, x1, x2, "gelu_tanh", 1.0, 20.0))
    torch.library.opcheck(ops.jet_activation.default, (x, None, x2, "softplus", 2.0, 1.0))
    mask = torch.rand(sh, device=device) > 0.5
    u, v = (_randn(sh, dt, device, s).requires_grad_() for s in (6, 7))
    torch.library.opcheck(ops.jet_dcs.default, (x, u, v, mask, x1, None, x2, x2, x1, None))
    torch.library.opcheck(ops.jet_dcs.default, (x, u, None, None, None, x2, None, x1, None, None))
    s, s1 = _randn((4,), dt, device, 4).requires_grad_(), _randn((K, 4), dt, device, 5).requires_grad_()
    torch.library.opcheck(ops.jet_dcs_group.default, (x, s, 1, x1, s1, None, s1))
    # first order only (second=False): y2 is an empty (0,) tensor
    torch.library.opcheck(ops.jet_activation.default, (x, x1, None, "silu", 1.0, 20.0, False))
    torch.library.opcheck(ops.jet_dcs.default, (x, u, v, mask, x1, None, x2, None, None, None, False))
    torch.library.opcheck(ops.jet_dcs_group.default, (x, s, 1, x1, s1, None, None, False))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_first_order_calls_give_y_and_y1_bit_for_bit_and_an_empty_y2(device, dtype):
    K, sh = 3, (5, 7)
    x, u, v = (_randn(sh, dtype, device, s) for s in (1, 2, 3))
    x1, x2, v1 = (_randn((K,) + sh, dtype, device, s) for s in (4, 5, 6))
    s, s1 = _randn((7,), dtype, device, 7), _randn((K, 7), dtype, device, 8)
    mask = torch.rand(sh, device=device) > 0.5
    calls = [(ops.jet_activation, ref.jet_activation, (x, x1, x2, kind, 1.5, 2.0)) for kind in KINDS]
    calls += [(ops.jet_dcs, ref.jet_dcs, (x, u, v, mask, x1, x2, v1, x2, x1, None)),
              (ops.jet_dcs, ref.jet_dcs, (x, u, None, None, x1, None, None, None, None, None)),
              (ops.jet_dcs_group, ref.jet_dcs_group, (x, s, 1, x1, s1, x2, None))]
    for op, twin, args in calls:
        full, first = op(*args), op(*args, second=False)
        assert torch.equal(first[0], full[0]) and torch.equal(first[1], full[1]), op
        assert first[2].shape == (0,) and first[2].dtype == dtype and first[2].device == x.device, op
        mirrored = twin(*args, second=False)
        assert mirrored[2].shape == (0,), twin
        torch.testing.assert_close(mirrored[1], first[1])


# ---------------------------------------------------------- torch.compile
@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    torch._dynamo.reset()
    dt, K, sh = torch.float32, 2, (5, 6)
    w, u = _randn(sh, dt, device, 1), _randn(sh, dt, device, 2)
    w1, u1, w2 = (_randn((K,) + sh, dt, device, s) for s in (3, 4, 5))
    s, s1 = _randn((6,), dt, device, 6), _randn((K, 6), dt, device, 7)
    mask = torch.rand(sh, device=device) > 0.5

    # a chain of the three ops, as the curvature engine runs them (nothing else to compile: the
    # test is whether Dynamo traces the wrappers and fake kernels without a graph break)
    def chain(jet_dcs, jet_dcs_group, jet_activation):
        y, y1, y2 = jet_dcs(w, u, None, mask, w1, u1, None, w2, None, None)
        y, y1, y2 = jet_dcs_group(y, s, 1, y1, s1, y2, None)
        return jet_activation(y, y1, y2, "silu", 1.0, 20.0)

    compiled = torch.compile(lambda: chain(jp.jet_dcs, jp.jet_dcs_group, jp.jet_activation), fullgraph=True)
    for g, e in zip(compiled(), chain(ref.jet_dcs, ref.jet_dcs_group, ref.jet_activation)):
        torch.testing.assert_close(g, e)


# ------------------------------------------------------------- bad input
def _bad_calls():
    x = torch.randn(3, 4)
    t = torch.randn(2, 3, 4)
    s = torch.randn(4)
    m = torch.ones(3, 4, dtype=torch.bool)
    act, dcs, grp = "jet_activation", "jet_dcs", "jet_dcs_group"
    yield act, r"symfast.jet_activation: x1 must have shape \(K, \*x.shape\) = \(K, 3, 4\), got \(3, 4\)", \
        ValueError, (x, x, None, "gelu")
    yield act, r"x2 must have K = 2 directions like x1, got shape \(5, 3, 4\)", ValueError, \
        (x, t, torch.randn(5, 3, 4), "gelu")
    yield act, r"x2 must have the dtype of x \(torch.float32\), got torch.float64", TypeError, \
        (x, None, t.double(), "tanh")
    yield act, r"x1 must be on x's device \(cpu\), got meta", symfast.DeviceMismatchError, \
        (x, t.to("meta"), None, "tanh")
    yield act, "kind must be one of gelu, gelu_tanh, silu, tanh, sigmoid, relu, softplus, got 'elu'", \
        ValueError, (x, t, None, "elu")
    yield act, "at least one of x1, x2 must be given", ValueError, (x, None, None, "silu")
    yield act, "x must be float32, float64, float16 or bfloat16, got torch.int64", TypeError, \
        (torch.ones(3, 4, dtype=torch.long), t, None, "relu")
    yield act, "beta must be nonzero for softplus", ValueError, (x, t, None, "softplus", 0.0, 20.0)
    yield dcs, r"u must have w's shape \(3, 4\), got \(4, 3\)", ValueError, \
        (x, torch.randn(4, 3), None, None, t, None, None, None, None, None)
    yield dcs, r"u2 must have shape \(K, \*w.shape\) = \(K, 3, 4\), got \(2, 4, 3\)", ValueError, \
        (x, x, None, None, t, None, None, None, torch.randn(2, 4, 3), None)
    yield dcs, r"w2 must have K = 2 directions like w1, got shape \(1, 3, 4\)", ValueError, \
        (x, x, None, None, t, None, None, torch.randn(1, 3, 4), None, None)
    yield dcs, "at least one of w1, u1, v1, w2, u2, v2 must be given", ValueError, \
        (x, x, None, m) + (None,) * 6
    yield dcs, "v1/v2 were given without a mask", ValueError, (x, x, None, None, None, None, t, None, None, None)
    yield dcs, "v was given without a mask", ValueError, (x, x, x, None, t, None, None, None, None, None)
    yield dcs, r"mask must broadcast to w's shape \(3, 4\), got \(5,\)", ValueError, \
        (x, x, None, torch.ones(5, dtype=torch.bool), t, None, None, None, None, None)
    yield dcs, "mask must be a bool or floating 0/1 tensor, got torch.int64", TypeError, \
        (x, x, None, torch.ones(3, 4, dtype=torch.long), t, None, None, None, None, None)
    yield dcs, r"v1 must have the dtype of w \(torch.float32\), got torch.float16", TypeError, \
        (x, x, None, m, None, None, t.half(), None, None, None)
    yield grp, r"s1 must have shape \(K, G\) = \(K, w.shape\[dim\]\) = \(K, 4\), got \(2, 3\)", ValueError, \
        (x, s, 1, None, torch.randn(2, 3), None, None)
    yield grp, r"s2 must have K = 2 directions like w1, got shape \(3, 4\)", ValueError, \
        (x, s, 1, t, None, None, torch.randn(3, 4))
    yield grp, r"s must have shape \(G,\) = \(w.shape\[dim\],\) = \(3,\), got \(4,\)", ValueError, \
        (x, s, 0, t, None, None, None)
    yield grp, "at least one of w1, s1, w2, s2 must be given", ValueError, (x, s, 1, None, None, None, None)
    yield grp, r"dim must be in the range \[-2, 1\]", IndexError, (x, s, 2, t, None, None, None)


BAD = list(_bad_calls())


@pytest.mark.parametrize("op,message,exc,args", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_clear_error(op, message, exc, args):
    # the wrapper: Python exception types
    with pytest.raises(exc, match=message):
        getattr(jp, op)(*args)
    # the raw op (the C++ checks, or the fake kernel for meta tensors): the same message
    with pytest.raises(Exception, match=message):
        getattr(ops, op)(*args)
    # the fake kernel, as torch.compile sees it: meta tensors take it
    meta = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)
    if "device" not in message:
        with pytest.raises(exc, match=message):
            getattr(ops, op)(*meta)


def test_float_mask_with_other_values_is_an_error():
    # whether a float mask holds only 0 and 1 depends on its values: the kernels check it
    w, t = torch.randn(3, 4), torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match="symfast.jet_dcs: a floating mask must hold only 0 and 1"):
        jp.jet_dcs(w, w, None, torch.full((3, 4), 0.5), t, None, None, None, None, None)


# --------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cpu_and_cuda_agree(dtype):
    shape, K = (1001, 37), 3
    x = _randn(shape, dtype, "cpu", 1, scale=2.0)
    x1, x2 = _tangents(shape, K, dtype, "cpu", (True, True), 2)
    cuda = lambda *ts: [None if t is None else t.cuda() for t in ts]  # noqa: E731
    for kind in KINDS:
        got = ops.jet_activation(*cuda(x, x1, x2), kind, 2.0, 3.0)
        want = ops.jet_activation(x, x1, x2, kind, 2.0, 3.0)
        for g, e in zip(got, want):  # exp/erf/tanh differ in their last bits between the devices
            torch.testing.assert_close(g.cpu(), e, rtol=4 * torch.finfo(dtype).eps, atol=4 * torch.finfo(dtype).eps)
    mask = torch.rand(shape) > 0.5
    args = (x, x * 2, x * 3, mask, x1, x2, x1, x2, x1, x2)
    for g, e in zip(ops.jet_dcs(*cuda(*args[:3]), mask.cuda(), *cuda(*args[4:])), ops.jet_dcs(*args)):
        torch.testing.assert_close(g.cpu(), e, **EXACT)
    s, s1 = _randn((37,), dtype, "cpu", 3), _randn((K, 37), dtype, "cpu", 4)
    for g, e in zip(ops.jet_dcs_group(*cuda(x, s), 1, *cuda(x1, s1, x2, s1)), ops.jet_dcs_group(x, s, 1, x1, s1, x2, s1)):
        torch.testing.assert_close(g.cpu(), e, **EXACT)
