r"""Fused second-order jet ops: the bodies the Taylor-mode rules of :mod:`.jets` call.

A second-order jet of a tensor ``x`` along ``K`` directions is ``(x, x1, x2)``: ``x`` the primal
(shape ``S``), ``x1`` and ``x2`` the first and second derivatives along ``t`` of
``x(theta + t n_k)``, stacked with a leading ``K``: shape ``[K, *S]``. A missing tangent (None)
counts as zero. Every op reads ``(x, x1, x2)`` and returns ``(y, y1, y2)`` with
``y1 = f'(x) x1`` and ``y2 = f'(x) x2 + f''(x)[x1, x1]``; ``y1`` and ``y2`` always have the shape
``[K, *S_out]`` (zeros where both input tangents are None), so at least one tangent must be
given, else ``K`` is unknown.

The signatures are those of the compiled ``torch.ops.symfast.jet_*`` ops. The bodies here are
closed forms in plain torch (a few fused passes, no Python loops over elements or directions):
each can be swapped for its compiled op with the same results. Half types are computed in float
and rounded once, as the kernels do.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch

__all__ = ["jet_activation", "jet_dcs", "jet_dcs_group", "jet_layer_norm", "jet_rms_norm", "jet_softmax",
           "jet_cross_entropy", "ACTIVATIONS"]

Tensor = torch.Tensor
Jet = Tuple[Tensor, Tensor, Tensor]

ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "tanh", "sigmoid", "relu", "softplus")


def _acc(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _num_directions(op: str, pairs: Sequence[Tuple[str, Optional[Tensor]]]) -> int:
    given = [(n, t) for n, t in pairs if t is not None]
    if not given:
        names = ", ".join(n for n, _ in pairs)
        raise ValueError(f"{op}: at least one tangent ({names}) must be given: the number of directions K "
                         "is read from its leading dimension, got None for all")
    return given[0][1].shape[0]


def _check_tangent(op: str, name: str, t: Optional[Tensor], shape: Sequence[int], K: int) -> None:
    if t is not None and tuple(t.shape) != (K, *shape):
        raise ValueError(f"{op}: {name} must have shape [K, *x.shape] = {[K, *shape]}, got {list(t.shape)}")


def _zeros(x: Tensor, K: int) -> Tensor:
    return x.new_zeros((K, *x.shape))


def _out(y: Tensor, y1: Optional[Tensor], y2: Optional[Tensor], like: Tensor, K: int) -> Jet:
    dt = like.dtype
    y1 = _zeros(y, K).to(dt) if y1 is None else y1.to(dt)
    y2 = _zeros(y, K).to(dt) if y2 is None else y2.to(dt)
    return y.to(dt), y1, y2


# ------------------------------------------------------------------ pointwise
def _activation_derivs(x: Tensor, kind: str, beta: float, threshold: float):
    """(f(x), f'(x), f''(x)) in x's (accumulation) dtype."""
    if kind == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
        return x * cdf, cdf + x * pdf, pdf * (2.0 - x * x)
    if kind == "gelu_tanh":
        c, a = math.sqrt(2.0 / math.pi), 0.044715
        u1 = c * (1.0 + 3.0 * a * x * x)
        t = torch.tanh(c * (x + a * x * x * x))
        s = 1.0 - t * t
        return 0.5 * x * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * x * s * u1, \
            s * u1 + 0.5 * x * s * (6.0 * c * a * x - 2.0 * t * u1 * u1)
    if kind == "silu":
        sig = torch.sigmoid(x)
        d = sig * (1.0 - sig)
        return x * sig, sig + x * d, d * (2.0 + x * (1.0 - 2.0 * sig))
    if kind == "tanh":
        t = torch.tanh(x)
        d = 1.0 - t * t
        return t, d, -2.0 * t * d
    if kind == "sigmoid":
        sig = torch.sigmoid(x)
        d = sig * (1.0 - sig)
        return sig, d, d * (1.0 - 2.0 * sig)
    if kind == "relu":
        return torch.relu(x), (x > 0).to(x.dtype), None  # f'(0) = 0, as torch's relu
    if kind == "softplus":
        bx = beta * x
        linear = bx > threshold  # torch's softplus is the identity there, with derivative 1
        sig = torch.sigmoid(bx)
        y = torch.nn.functional.softplus(x, beta, threshold)
        d1 = torch.where(linear, torch.ones_like(x), sig)
        d2 = torch.where(linear, torch.zeros_like(x), beta * sig * (1.0 - sig))
        return y, d1, d2
    raise ValueError(f"symfast.jet_activation: kind must be one of {list(ACTIVATIONS)}, got {kind!r}")


def jet_activation(x: Tensor, x1: Optional[Tensor], x2: Optional[Tensor], kind: str, beta: float = 1.0,
                   threshold: float = 20.0) -> Jet:
    """Jet of an elementwise activation ``kind`` (see ``ACTIVATIONS``)."""
    op = "symfast.jet_activation"
    if kind not in ACTIVATIONS:
        raise ValueError(f"{op}: kind must be one of {list(ACTIVATIONS)}, got {kind!r}")
    K = _num_directions(op, (("x1", x1), ("x2", x2)))
    for n, t in (("x1", x1), ("x2", x2)):
        _check_tangent(op, n, t, x.shape, K)
    xa = _acc(x)
    y, d1, d2 = _activation_derivs(xa, kind, beta, threshold)
    y1 = None if x1 is None else d1 * _acc(x1)
    y2 = None if x2 is None else d1 * _acc(x2)
    if x1 is not None and d2 is not None:
        a1 = _acc(x1)
        y2 = d2 * a1 * a1 if y2 is None else y2 + d2 * a1 * a1
    return _out(y, y1, y2, x, K)


def _bool_mask(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _select(m: Optional[Tensor], on: Optional[Tensor], off: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    """where(m, on, off) with None as zero (a select, not m*on + (1-m)*off: exact with infinities)."""
    if m is None:
        return on
    if on is None and off is None:
        return None
    zero = like.new_zeros(())
    return torch.where(m, zero if on is None else on, zero if off is None else off)


def jet_dcs(w: Tensor, u: Tensor, v: Optional[Tensor], mask: Optional[Tensor], w1: Optional[Tensor],
            u1: Optional[Tensor], v1: Optional[Tensor], w2: Optional[Tensor], u2: Optional[Tensor],
            v2: Optional[Tensor]) -> Jet:
    """Jet of ``symfast.dcs``: theta = where(mask, w*u, v) (mask None: w*u)."""
    op = "symfast.jet_dcs"
    K = _num_directions(op, (("w1", w1), ("u1", u1), ("v1", v1), ("w2", w2), ("u2", u2), ("v2", v2)))
    for n, t in (("w1", w1), ("u1", u1), ("v1", v1), ("w2", w2), ("u2", u2), ("v2", v2)):
        _check_tangent(op, n, t, w.shape, K)
    if mask is None and (v is not None or v1 is not None or v2 is not None):
        raise ValueError(f"{op}: v, v1 or v2 was given without a mask; with mask=None dcs has no v input")
    wa, ua = _acc(w), _acc(u)
    w1, u1, v1, w2, u2, v2 = (None if t is None else _acc(t) for t in (w1, u1, v1, w2, u2, v2))
    m = None if mask is None else _bool_mask(mask)
    prod = wa * ua
    y = prod if m is None else torch.where(m, prod, wa.new_zeros(()) if v is None else _acc(v))
    on1 = _sum_terms(None if w1 is None else w1 * ua, None if u1 is None else wa * u1)
    cross = None if (w1 is None or u1 is None) else 2.0 * w1 * u1
    on2 = _sum_terms(None if w2 is None else w2 * ua, cross, None if u2 is None else wa * u2)
    return _out(y, _select(m, on1, v1, wa), _select(m, on2, v2, wa), w, K)


def _sum_terms(*terms: Optional[Tensor]) -> Optional[Tensor]:
    out = None
    for t in terms:
        if t is not None:
            out = t if out is None else out + t
    return out


def jet_dcs_group(w: Tensor, s: Tensor, dim: int, w1: Optional[Tensor], s1: Optional[Tensor],
                  w2: Optional[Tensor], s2: Optional[Tensor]) -> Jet:
    """Jet of ``symfast.dcs_group``: theta = w * s, s broadcast along ``dim`` of w."""
    op = "symfast.jet_dcs_group"
    K = _num_directions(op, (("w1", w1), ("s1", s1), ("w2", w2), ("s2", s2)))
    if not -w.dim() <= dim < max(w.dim(), 1):
        raise ValueError(f"{op}: dim must be in [{-w.dim()}, {w.dim()}) for w of shape {list(w.shape)}, got {dim}")
    dim = dim % w.dim()
    for n, t in (("w1", w1), ("w2", w2)):
        _check_tangent(op, n, t, w.shape, K)
    for n, t in (("s1", s1), ("s2", s2)):
        _check_tangent(op, n, t, (w.shape[dim],), K)
    view = [1] * w.dim()
    view[dim] = w.shape[dim]
    wa, sa = _acc(w), _acc(s).reshape(view)
    lift = lambda t: None if t is None else _acc(t).reshape([K] + view)  # noqa: E731
    s1, s2 = lift(s1), lift(s2)
    w1, w2 = (None if t is None else _acc(t) for t in (w1, w2))
    y1 = _sum_terms(None if w1 is None else w1 * sa, None if s1 is None else wa * s1)
    cross = None if (w1 is None or s1 is None) else 2.0 * w1 * s1
    y2 = _sum_terms(None if w2 is None else w2 * sa, cross, None if s2 is None else wa * s2)
    y1, y2 = (None if t is None else t.expand(K, *w.shape) for t in (y1, y2))
    return _out(wa * sa, y1, y2, w, K)


# ------------------------------------------------------------------ rows
def _normalized_jet(c: Tensor, c1: Optional[Tensor], c2: Optional[Tensor], dims: List[int], eps: float):
    r"""z = c * rsqrt(mean(c^2) + eps) over ``dims`` and its jet, for c's jet (c1, c2).

    With r = rsqrt(mean(c^2) + eps), p_i = c_i r and m1 = mean(z p1):
    z1 = p1 - z m1, z2 = p2 - 2 p1 m1 + z (3 m1^2 - mean(p1^2) - mean(z p2)).
    """
    r = torch.rsqrt((c * c).mean(dims, keepdim=True) + eps)
    z = c * r
    tdims = dims  # negative dims: the same ones for the [K, *S] tangents
    z1 = z2 = None
    if c1 is not None:
        p1 = c1 * r
        m1 = (z * p1).mean(tdims, keepdim=True)
        z1 = p1 - z * m1
        z2 = z * (3.0 * m1 * m1 - (p1 * p1).mean(tdims, keepdim=True)) - 2.0 * p1 * m1
    if c2 is not None:
        p2 = c2 * r
        t2 = p2 - z * (z * p2).mean(tdims, keepdim=True)
        z2 = t2 if z2 is None else z2 + t2
    return z, z1, z2


def _affine_jet(z, z1, z2, w, w1, w2, b, b1, b2):
    """(z w + b) and its jet, each of w, b, their jets optional (jets [K, *w.shape])."""
    # a parameter's jet [K, *ns] as [K, 1, ..., 1, *ns]: K stays in front when it meets z [..., *ns]
    def lift(t):
        return None if t is None else t.reshape(t.shape[:1] + (1,) * (z.dim() - t.dim() + 1) + t.shape[1:])

    w1, w2, b1, b2 = lift(w1), lift(w2), lift(b1), lift(b2)
    y, y1, y2 = z, z1, z2
    if w is not None:
        y = z * w
        y1 = None if z1 is None else z1 * w
        y2 = None if z2 is None else z2 * w
    if w1 is not None:
        y1 = _sum_terms(y1, z * w1)
        y2 = _sum_terms(y2, None if z1 is None else 2.0 * z1 * w1)
    if w2 is not None:
        y2 = _sum_terms(y2, z * w2)
    if b is not None:
        y = y + b
    y1 = _sum_terms(y1, b1)
    y2 = _sum_terms(y2, b2)
    return y, y1, y2


def _norm_checks(op, x, x1, x2, normalized_shape, params):
    K = _num_directions(op, (("x1", x1), ("x2", x2)) + tuple((n, t) for n, t in params if n.endswith(("1", "2"))))
    for n, t in (("x1", x1), ("x2", x2)):
        _check_tangent(op, n, t, x.shape, K)
    ns = tuple(normalized_shape)
    if tuple(x.shape[x.dim() - len(ns):]) != ns or len(ns) > x.dim():
        raise ValueError(f"{op}: x's trailing dims must equal normalized_shape {list(ns)}, got x of shape "
                         f"{list(x.shape)}")
    for n, t in params:
        if t is None:
            continue
        want = (K, *ns) if n.endswith(("1", "2")) else ns
        if tuple(t.shape) != tuple(want):
            raise ValueError(f"{op}: {n} must have shape {list(want)}, got {list(t.shape)}")
    return K, [-(i + 1) for i in range(len(ns))][::-1]


def jet_layer_norm(x: Tensor, x1: Optional[Tensor], x2: Optional[Tensor], normalized_shape: Sequence[int],
                   weight: Optional[Tensor], bias: Optional[Tensor], weight1: Optional[Tensor],
                   bias1: Optional[Tensor], weight2: Optional[Tensor], bias2: Optional[Tensor],
                   eps: float) -> Jet:
    """Jet of ``F.layer_norm`` with its affine part (weight and bias may carry jets)."""
    op = "symfast.jet_layer_norm"
    K, dims = _norm_checks(op, x, x1, x2, normalized_shape, (
        ("weight", weight), ("bias", bias), ("weight1", weight1), ("bias1", bias1), ("weight2", weight2),
        ("bias2", bias2)))
    xa = _acc(x)
    tdims = dims  # negative dims: the same ones for the [K, *S] tangents
    c = xa - xa.mean(dims, keepdim=True)
    c1 = None if x1 is None else _acc(x1) - _acc(x1).mean(tdims, keepdim=True)
    c2 = None if x2 is None else _acc(x2) - _acc(x2).mean(tdims, keepdim=True)
    z, z1, z2 = _normalized_jet(c, c1, c2, dims, eps)
    y, y1, y2 = _affine_jet(z, z1, z2, *(None if t is None else _acc(t) for t in (
        weight, weight1, weight2, bias, bias1, bias2)))
    y1, y2 = (None if t is None else t.expand(K, *x.shape) for t in (y1, y2))
    return _out(y, y1, y2, x, K)


def jet_rms_norm(x: Tensor, x1: Optional[Tensor], x2: Optional[Tensor], normalized_shape: Sequence[int],
                 weight: Optional[Tensor], weight1: Optional[Tensor], weight2: Optional[Tensor],
                 eps: Optional[float]) -> Jet:
    """Jet of y = x * rsqrt(mean(x^2) + eps) * weight (F.rms_norm; eps None: finfo(x.dtype).eps)."""
    op = "symfast.jet_rms_norm"
    K, dims = _norm_checks(op, x, x1, x2, normalized_shape, (
        ("weight", weight), ("weight1", weight1), ("weight2", weight2)))
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    z, z1, z2 = _normalized_jet(_acc(x), None if x1 is None else _acc(x1), None if x2 is None else _acc(x2),
                                dims, eps)
    y, y1, y2 = _affine_jet(z, z1, z2, *(None if t is None else _acc(t) for t in (weight, weight1, weight2)),
                            None, None, None)
    y1, y2 = (None if t is None else t.expand(K, *x.shape) for t in (y1, y2))
    return _out(y, y1, y2, x, K)


def jet_softmax(x: Tensor, x1: Optional[Tensor], x2: Optional[Tensor], dim: int, log: bool) -> Jet:
    r"""Jet of softmax (``log=False``) or log_softmax along ``dim``.

    With s = softmax(x) and u = x1 - <s, x1>: log_softmax has y1 = u,
    y2 = x2 - <s, x2> - <s, u^2>; softmax y1 = s u, y2 = s (u^2 - <s, u^2> + x2 - <s, x2>).
    """
    op = "symfast.jet_softmax"
    K = _num_directions(op, (("x1", x1), ("x2", x2)))
    for n, t in (("x1", x1), ("x2", x2)):
        _check_tangent(op, n, t, x.shape, K)
    if not -max(x.dim(), 1) <= dim < max(x.dim(), 1):
        raise ValueError(f"{op}: dim must be in [{-max(x.dim(), 1)}, {max(x.dim(), 1)}) for x of shape "
                         f"{list(x.shape)}, got {dim}")
    xa = _acc(x)
    d = dim % max(x.dim(), 1)
    td = d + 1
    ls = torch.log_softmax(xa, d)
    s = ls.exp()
    u = None if x1 is None else _acc(x1) - (s * _acc(x1)).sum(td, keepdim=True)
    inner = None  # the second derivative of -logsumexp's argument, centred
    if u is not None:
        inner = -(s * u * u).sum(td, keepdim=True)
    if x2 is not None:
        a2 = _acc(x2)
        t2 = a2 - (s * a2).sum(td, keepdim=True)
        inner = t2 if inner is None else inner + t2
    if log:
        return _out(ls, u, None if inner is None else inner.expand(K, *x.shape), x, K)
    y1 = None if u is None else s * u
    y2 = None
    if inner is not None:
        y2 = s * (inner if u is None else u * u + inner)
    return _out(s, y1, y2, x, K)


def jet_cross_entropy(z: Tensor, z1: Optional[Tensor], z2: Optional[Tensor], target: Tensor,
                      ignore_index: int = -100) -> Jet:
    r"""Per-sample cross-entropy of logits ``z`` [N, C] against class indices ``target`` [N], with jets.

    loss = logsumexp(z) - z[t]; l1 = <s, z1> - z1[t];
    l2 = <s, z2> - z2[t] + <s, z1^2> - <s, z1>^2 (s = softmax(z)); rows whose target is
    ``ignore_index`` give 0.
    """
    op = "symfast.jet_cross_entropy"
    K = _num_directions(op, (("z1", z1), ("z2", z2)))
    if z.dim() != 2:
        raise ValueError(f"{op}: z must have shape [N, C], got {list(z.shape)}")
    if target.dim() != 1 or target.shape[0] != z.shape[0] or target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{op}: target must be an integer tensor of shape [N] = [{z.shape[0]}], got "
                         f"{target.dtype} of shape {list(target.shape)}")
    for n, t in (("z1", z1), ("z2", z2)):
        _check_tangent(op, n, t, z.shape, K)
    za = _acc(z)
    valid = target != ignore_index
    t = torch.where(valid, target, torch.zeros_like(target)).long()
    ls = torch.log_softmax(za, 1)
    s = ls.exp()
    zero = za.new_zeros(())
    loss = torch.where(valid, -ls.gather(1, t[:, None])[:, 0], zero)
    tk = t[None, :, None].expand(K, -1, 1)
    l1 = l2 = None
    if z1 is not None:
        a1 = _acc(z1)
        m1 = (s * a1).sum(-1)
        l1 = torch.where(valid, m1 - a1.gather(2, tk)[..., 0], zero)
        l2 = (s * a1 * a1).sum(-1) - m1 * m1
    if z2 is not None:
        a2 = _acc(z2)
        t2 = (s * a2).sum(-1) - a2.gather(2, tk)[..., 0]
        l2 = t2 if l2 is None else l2 + t2
    if l2 is not None:
        l2 = torch.where(valid, l2, zero)
    return _out(loss, l1, l2, z, K)
