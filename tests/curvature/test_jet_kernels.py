"""symfast.curvature.jet_kernels: each compiled jet op, as the rules call it, against torch.func nested jvp
of the plain op (bad input is tested with the ops, in tests/ops/).

The oracle: for each direction k, y1 = jvp(f, x, x1_k) and y2 = jvp(jvp(f, ., x1_k), x, x1_k) +
jvp(f, x, x2_k), by PyTorch's own forward-mode rules on the op (float64), vmapped over K.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from symfast.curvature import jet_kernels as jk
from symfast.reference import dcs as dcs_ref

DT = torch.float64
K = 3


def _r(*shape, seed=0, dtype=DT):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT).to(dtype)


def nested(f, primals, t1, t2):
    """(y1, y2) [K, ...] of f at primals along tangents t1 (first order) and t2 (second order)."""
    def per(a1, a2):
        (_, d1), (_, s) = torch.func.jvp(lambda *xs: torch.func.jvp(f, xs, a1), primals, a1)
        return d1, s + torch.func.jvp(f, primals, a2)[1]

    return torch.func.vmap(per)(t1, t2)


def _check(got, f, primals, t1, t2, tol=1e-12):
    y, y1, y2 = got
    e1, e2 = nested(f, primals, t1, t2)
    torch.testing.assert_close(y, f(*primals), rtol=tol, atol=tol)
    torch.testing.assert_close(y1, e1, rtol=tol, atol=tol)
    torch.testing.assert_close(y2, e2, rtol=tol, atol=tol)


ACT = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "softplus": lambda x: F.softplus(x, 2.0, 3.0),
}


@pytest.mark.parametrize("kind", list(ACT))
def test_activation_matches_nested_jvp(kind):
    x = _r(4, 5) * 2  # softplus(beta=2, threshold=3): both the smooth and the linear branch
    x1, x2 = _r(K, 4, 5, seed=1), _r(K, 4, 5, seed=2)
    beta, threshold = (2.0, 3.0) if kind == "softplus" else (1.0, 20.0)
    _check(jk.jet_activation(x, x1, x2, kind, beta, threshold), ACT[kind], (x,), (x1,), (x2,))
    # a missing tangent is zero
    y, y1, y2 = jk.jet_activation(x, None, x2, kind, beta, threshold)
    _check((y, y1, y2), ACT[kind], (x,), (torch.zeros_like(x1),), (x2,))
    _check(jk.jet_activation(x, x1, None, kind, beta, threshold), ACT[kind], (x,), (x1,), (torch.zeros_like(x2),))


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float-broadcast"])
def test_dcs_matches_nested_jvp(mask_kind):
    w, u, v = _r(4, 5), _r(4, 5, seed=1), _r(4, 5, seed=2)
    mask = {"none": None, "bool": _r(4, 5, seed=3) > 0, "float-broadcast": (_r(5, seed=3) > 0).to(DT)}[mask_kind]
    t1 = tuple(_r(K, 4, 5, seed=10 + i) for i in range(3))
    t2 = tuple(_r(K, 4, 5, seed=20 + i) for i in range(3))
    if mask is None:
        f = lambda w, u: dcs_ref(w, u)  # noqa: E731
        got = jk.jet_dcs(w, u, None, None, t1[0], t1[1], None, t2[0], t2[1], None)
        _check(got, f, (w, u), t1[:2], t2[:2])
    else:
        f = lambda w, u, v: dcs_ref(w, u, v, mask)  # noqa: E731
        _check(jk.jet_dcs(w, u, v, mask, *t1, *t2), f, (w, u, v), t1, t2)
        # only u moves (w, v fixed)
        z = torch.zeros_like(t1[0])
        got = jk.jet_dcs(w, u, v, mask, None, t1[1], None, None, t2[1], None)
        _check(got, f, (w, u, v), (z, t1[1], z), (z, t2[1], z))


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_dcs_group_matches_nested_jvp(dim):
    w = _r(4, 5, 2)
    G = w.shape[dim]
    s = _r(G, seed=1)
    view = [1] * 3
    view[dim] = G
    f = lambda w, s: w * s.reshape(view)  # noqa: E731
    t1 = (_r(K, 4, 5, 2, seed=2), _r(K, G, seed=3))
    t2 = (_r(K, 4, 5, 2, seed=4), _r(K, G, seed=5))
    _check(jk.jet_dcs_group(w, s, dim, t1[0], t1[1], t2[0], t2[1]), f, (w, s), t1, t2)


def _layer_norm_ref(x, w, b, ns, eps):
    # explicit formula: PyTorch's forward-over-forward rule of layer_norm is wrong (see symfast.curvature)
    dims = tuple(range(-len(ns), 0))
    c = x - x.mean(dims, keepdim=True)
    out = c / torch.sqrt((c * c).mean(dims, keepdim=True) + eps)
    return out * w + b


@pytest.mark.parametrize("ns", [(6,), (3, 6)])
def test_layer_norm_matches_nested_jvp(ns):
    x = _r(2, 3, 6)
    w, b = _r(*ns, seed=1), _r(*ns, seed=2)
    t1 = (_r(K, 2, 3, 6, seed=3), _r(K, *ns, seed=4), _r(K, *ns, seed=5))
    t2 = (_r(K, 2, 3, 6, seed=6), _r(K, *ns, seed=7), _r(K, *ns, seed=8))
    f = lambda x, w, b: _layer_norm_ref(x, w, b, ns, 1e-3)  # noqa: E731
    got = jk.jet_layer_norm(x, t1[0], t2[0], ns, w, b, t1[1], t1[2], t2[1], t2[2], 1e-3)
    _check(got, f, (x, w, b), t1, t2)
    torch.testing.assert_close(got[0], F.layer_norm(x, ns, w, b, 1e-3))
    # no affine part
    got = jk.jet_layer_norm(x, t1[0], t2[0], ns, None, None, None, None, None, None, 1e-3)
    one, zero = torch.ones(ns, dtype=DT), torch.zeros(ns, dtype=DT)
    zk = torch.zeros(K, *ns, dtype=DT)
    _check(got, f, (x, one, zero), (t1[0], zk, zk), (t2[0], zk, zk))


def test_rms_norm_matches_nested_jvp():
    x, w = _r(2, 3, 6), _r(6, seed=1)
    t1 = (_r(K, 2, 3, 6, seed=3), _r(K, 6, seed=4))
    t2 = (_r(K, 2, 3, 6, seed=6), _r(K, 6, seed=7))
    f = lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-4) * w  # noqa: E731
    _check(jk.jet_rms_norm(x, t1[0], t2[0], (6,), w, t1[1], t2[1], 1e-4), f, (x, w), t1, t2)
    if hasattr(F, "rms_norm"):  # eps None is F.rms_norm's default, finfo(dtype).eps
        torch.testing.assert_close(jk.jet_rms_norm(x, t1[0], None, (6,), w, None, None, None)[0],
                                   F.rms_norm(x, (6,), w))


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_softmax_matches_nested_jvp(log, dim):
    x = _r(3, 4, 5)
    t1, t2 = _r(K, 3, 4, 5, seed=1), _r(K, 3, 4, 5, seed=2)
    f = (lambda x: torch.log_softmax(x, dim)) if log else (lambda x: torch.softmax(x, dim))
    _check(jk.jet_softmax(x, t1, t2, dim, log), f, (x,), (t1,), (t2,))
    _check(jk.jet_softmax(x, t1, None, dim, log), f, (x,), (t1,), (torch.zeros_like(t2),))


def test_cross_entropy_matches_nested_jvp_and_ignores_rows():
    z = _r(5, 4)
    t = torch.tensor([0, 3, -100, 1, 2])
    t1, t2 = _r(K, 5, 4, seed=1), _r(K, 5, 4, seed=2)
    f = lambda z: F.cross_entropy(z, t, reduction="none")  # noqa: E731
    got = jk.jet_cross_entropy(z, t1, t2, t)
    _check(got, f, (z,), (t1,), (t2,))
    assert (got[1][:, 2] == 0).all() and (got[2][:, 2] == 0).all() and got[0][2] == 0
    t7 = torch.tensor([0, 3, 7, 1, 7])
    f7 = lambda z: F.cross_entropy(z, t7, reduction="none", ignore_index=7)  # noqa: E731
    _check(jk.jet_cross_entropy(z, t1, None, t7, 7), f7, (z,), (t1,), (torch.zeros_like(t2),))


def test_float32_inputs_agree_with_float64():
    x = _r(4, 6)
    t1, t2 = _r(K, 4, 6, seed=1), _r(K, 4, 6, seed=2)
    for fn in (lambda x, a, b: jk.jet_layer_norm(x, a, b, (6,), None, None, None, None, None, None, 1e-5),
               lambda x, a, b: jk.jet_softmax(x, a, b, -1, False),
               lambda x, a, b: jk.jet_activation(x, a, b, "gelu")):
        lo = fn(x.float(), t1.float(), t2.float())
        hi = fn(x, t1, t2)
        for a, b in zip(lo, hi):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def _linear_jets(x, w, b, tangents, second=True):
    """(y, y1, y2) of F.linear(x, w, b) under JetMode, tangents = {tensor: (t1, t2)}."""
    from symfast.curvature.exact import ExactMode
    from symfast.curvature.jets import JetMode

    mode = JetMode(ExactMode("test", decompose_norms=False), K, second)
    leaves = {id(t): t.detach().requires_grad_(True) for t in (x, w, b) if t is not None}
    with torch.enable_grad(), mode:
        for t, (t1, t2) in tangents.items():
            mode.put(leaves[id(t)], t1, t2)
        y = F.linear(*(leaves[id(t)] if t is not None else None for t in (x, w, b)))
        y1, y2 = mode.tangents(y)
    return y.detach(), y1, y2


@pytest.mark.parametrize("lead", [(), (5,), (2, 3), (0,)], ids=["1d", "2d", "3d", "empty"])
@pytest.mark.parametrize("which", ["all", "input", "weight", "bias", "input_bias", "no_bias"])
def test_linear_rule_matches_nested_jvp(lead, which):
    """The batched-GEMM linear rule (one baddbmm per term) against nested jvp of F.linear."""
    x, w, b = _r(*lead, 4, seed=3), _r(6, 4, seed=4), (None if which == "no_bias" else _r(6, seed=5))
    t = {x: (_r(K, *lead, 4, seed=6), _r(K, *lead, 4, seed=7)), w: (_r(K, 6, 4, seed=8), _r(K, 6, 4, seed=9))}
    if b is not None:
        t[b] = (_r(K, 6, seed=10), _r(K, 6, seed=11))
    keep = {"all": (x, w, b), "input": (x,), "weight": (w,), "bias": (b,), "input_bias": (x, b),
            "no_bias": (x, w)}[which]
    t = {k: v for k, v in t.items() if any(k is q for q in keep)}
    got = _linear_jets(x, w, b, t)
    primals = tuple(p for p in (x, w, b) if p is not None)
    zeros = lambda p: torch.zeros(K, *p.shape, dtype=DT)  # noqa: E731
    t1 = tuple(next((v[0] for k, v in t.items() if k is p), zeros(p)) for p in primals)
    t2 = tuple(next((v[1] for k, v in t.items() if k is p), zeros(p)) for p in primals)
    _check(got, lambda *ps: F.linear(*ps), primals, t1, t2)
    # first order only: no second-order jet
    y, y1, y2 = _linear_jets(x, w, b, t, second=False)
    assert y2 is None
    torch.testing.assert_close(y1, got[1], rtol=1e-12, atol=1e-12)


class _JetOpCalls(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ``second`` flag of every symfast jet op the engine calls."""

    def __init__(self):
        super().__init__()
        self.seen = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name()
        if name.startswith("symfast::jet_"):
            schema_args = func._schema.arguments
            second = kwargs.get("second", args[len(schema_args) - 1] if len(args) == len(schema_args) else True)
            self.seen.setdefault(name.split("::")[1], set()).add(bool(second))
        return func(*args, **kwargs)


@pytest.mark.parametrize("first_order", [True, False])
def test_first_order_quantities_call_every_jet_op_first_order_only(first_order):
    import symfast
    from symfast.curvature import per_sample_curvatures, per_sample_directional_derivatives

    params = {"W": _r(6, 4, seed=1), "g": _r(6, seed=2), "w": _r(5, 6, seed=3), "u": _r(5, 6, seed=4),
              "V": _r(3, 5, seed=5)}

    def loss_fn(p, batch):
        x, t = batch
        h = F.gelu(F.layer_norm(x @ p["W"].T, (6,), p["g"]))
        h = torch.tanh(h @ symfast.dcs(p["w"], p["u"]).T)
        return F.cross_entropy(torch.softmax(h, -1) @ p["V"].T, t, reduction="none")

    batch = (_r(7, 4, seed=6), torch.randint(0, 3, (7,), generator=torch.Generator().manual_seed(7)))
    dirs = {k: _r(K, *v.shape, seed=8 + i) for i, (k, v) in enumerate(params.items())}
    calls = _JetOpCalls()
    with calls:
        fn = per_sample_directional_derivatives if first_order else per_sample_curvatures
        fn(loss_fn, params, dirs, batch)
    assert set(calls.seen) == {"jet_activation", "jet_layer_norm", "jet_dcs", "jet_softmax", "jet_cross_entropy"}
    # g needs no second tangent: not one y2 is computed; h needs them all
    assert all(flags == {not first_order} for flags in calls.seen.values()), calls.seen
