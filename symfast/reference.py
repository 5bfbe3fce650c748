"""Pure-PyTorch twins of every symfast op: the oracle the kernels are tested against.

Each function has the signature of the op it mirrors and is written to be read,
not to be fast. Nothing here imports the compiled extension: an oracle must
not use what it checks.

The DCS parametrization (paper eq. 10, with the coordinate projection
P = diag(m)) is

    theta = (I - P) v + (P w) * (P u) = (1 - m) * v + m * w * u.

With a mask, weight decay alpha * (|w|^2 + |u|^2) on the factors is, at its
minimum over factorizations, the L1 penalty 2 * alpha * |m * theta|_1.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def _bool_mask(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def dcs(
    w: torch.Tensor,
    u: torch.Tensor,
    v: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """theta = (1 - m) * v + m * w * u; mask=None means m = 1, v=None means v = 0.

    Written as a select (where m: w * u, else: v) so that it is exact: the
    product form would give 0 * inf = nan where v or w * u is infinite.
    """
    if mask is None:
        if v is not None:
            raise ValueError("symfast.dcs: v was given without a mask; it would have no effect")
        return w * u
    other = v if v is not None else torch.zeros_like(w)
    return torch.where(_bool_mask(mask), w * u, other)


def dcs_backward(
    grad: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    mask: Optional[torch.Tensor],
    w_needed: bool,
    u_needed: bool,
    v_needed: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Vector-Jacobian product of dcs:
    grad_w = m * u * grad, grad_u = m * w * grad, grad_v = (1 - m) * grad.

    A gradient that is not needed comes back as an empty tensor of shape (0,).
    """
    m = torch.ones((), dtype=torch.bool, device=w.device) if mask is None else _bool_mask(mask)
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    none = w.new_empty(0)
    grad_w = torch.where(m, u * grad, zero).expand(w.shape).contiguous() if w_needed else none
    grad_u = torch.where(m, w * grad, zero).expand(w.shape).contiguous() if u_needed else none
    grad_v = torch.where(m, zero, grad).expand(w.shape).contiguous() if v_needed else none
    return grad_w, grad_u, grad_v


def dcs_jvp(
    w: torch.Tensor,
    u: torch.Tensor,
    mask: Optional[torch.Tensor],
    w_dot: Optional[torch.Tensor],
    u_dot: Optional[torch.Tensor],
    v_dot: Optional[torch.Tensor],
) -> torch.Tensor:
    """Jacobian-vector product of dcs:
    theta_dot = (1 - m) * v_dot + m * (w_dot * u + w * u_dot); a missing tangent is zero.

    The two products are summed in the accumulation type (float for half
    types) and rounded once, as the kernels do.
    """
    acc = torch.promote_types(w.dtype, torch.float32)
    on = torch.zeros(w.shape, dtype=acc, device=w.device)
    if w_dot is not None:
        on = on + w_dot.to(acc) * u.to(acc)
    if u_dot is not None:
        on = on + w.to(acc) * u_dot.to(acc)
    on = on.to(w.dtype)
    if mask is None:
        return on
    off = v_dot if v_dot is not None else torch.zeros_like(w)
    return torch.where(_bool_mask(mask), on, off)


# ----------------------------------------------------------------- dcs_group
# Group gate (group lasso): theta_g = s_g * w_g for the groups along one dim.
# With weight decay alpha * (|s|^2 + |w|^2), the minimum over factorizations of
# a given theta is the group lasso penalty 2 * alpha * sum_g |theta_g|_2.


def _gate_view(s: torch.Tensor, w: torch.Tensor, dim: int) -> torch.Tensor:
    """s, shape (G,), as a tensor that broadcasts along ``dim`` of w."""
    shape = [1] * w.dim()
    shape[dim] = -1
    return s.reshape(shape)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation type of the kernels: float for half types, else the dtype itself."""
    return torch.promote_types(dtype, torch.float32)


def dcs_group(w: torch.Tensor, s: torch.Tensor, dim: int) -> torch.Tensor:
    """theta = w * s broadcast along dim: theta[..., g, ...] = s[g] * w[..., g, ...]."""
    return w * _gate_view(s, w, dim)


def dcs_group_backward(
    grad: torch.Tensor,
    w: torch.Tensor,
    s: torch.Tensor,
    dim: int,
    w_needed: bool,
    s_needed: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Vector-Jacobian product of dcs_group:
    grad_w = grad * s (broadcast), grad_s[g] = sum of grad * w over every dim but ``dim``.

    The sum is accumulated in float for half types (in the dtype otherwise)
    and rounded once. A gradient that is not needed comes back as an empty
    tensor of shape (0,).
    """
    dim = dim % w.dim()
    grad_w = (grad * _gate_view(s, w, dim)).contiguous() if w_needed else w.new_empty(0)
    if s_needed:
        acc = _acc_dtype(w.dtype)
        prod = grad.to(acc) * w.to(acc)
        others = [d for d in range(w.dim()) if d != dim]
        # sum(dim=[]) would reduce over everything: a 1-D w has nothing to sum.
        grad_s = (prod.sum(dim=others) if others else prod).to(w.dtype)
    else:
        grad_s = s.new_empty(0)
    return grad_w, grad_s


def dcs_group_jvp(
    w: torch.Tensor,
    s: torch.Tensor,
    dim: int,
    w_dot: Optional[torch.Tensor],
    s_dot: Optional[torch.Tensor],
) -> torch.Tensor:
    """Jacobian-vector product of dcs_group: theta_dot = w_dot * s + w * s_dot
    (broadcast along dim); a missing tangent is zero.

    The two products are summed in the accumulation type (float for half
    types) and rounded once, as the kernels do.
    """
    acc = _acc_dtype(w.dtype)
    out = torch.zeros(w.shape, dtype=acc, device=w.device)
    if w_dot is not None:
        out = out + w_dot.to(acc) * _gate_view(s, w, dim).to(acc)
    if s_dot is not None:
        out = out + w.to(acc) * _gate_view(s_dot, w, dim).to(acc)
    return out.to(w.dtype)


# ------------------------------------------------- jet ops, pointwise family
# A second-order jet of x along K directions is (x, x1, x2): x1 and x2, of shape
# [K, *x.shape], are the first and second derivatives in t of x(theta + t n_k).
# A jet op maps it to (y, y1, y2) with y1 = f'(x) x1 and
# y2 = f'(x) x2 + f''(x)[x1, x1]. A missing tangent (None) counts as zero; at
# least one must be given, since it fixes K. Everything is computed in the
# accumulation type (float for half types) and rounded once, as the kernels do.

ACTIVATION_KINDS = ("gelu", "gelu_tanh", "silu", "tanh", "sigmoid", "relu", "softplus")

_SQRT1_2 = 0.7071067811865476  # 1/sqrt(2)
_INV_SQRT_2PI = 0.3989422804014327  # 1/sqrt(2 pi)
_GELU_TANH_C = 0.7978845608028654  # sqrt(2/pi)
_GELU_TANH_A = 0.044715


def _jet_directions(op: str, names_and_tangents) -> int:
    for _, t in names_and_tangents:
        if t is not None:
            return t.shape[0]
    names = ", ".join(name for name, _ in names_and_tangents)
    raise ValueError(f"{op}: at least one of {names} must be given (a tangent fixes the number of directions K)")


def _sech2(x: torch.Tensor) -> torch.Tensor:
    """1 - tanh(x)^2 as 4 sigma(2x) sigma(-2x), which keeps its relative accuracy where tanh(x)
    rounds to +-1 and 1 - tanh^2 would cancel to 0."""
    return 4 * torch.sigmoid(2 * x) * torch.sigmoid(-2 * x)


def _activation_derivatives(
    x: torch.Tensor, kind: str, beta: float, threshold: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """f(x), f'(x) and f''(x) in closed form, for x in the accumulation type.

    Sigmoids are written as the pair sigma(x), sigma(-x) rather than sigma and
    1 - sigma, which keeps sigma' = sigma(x) sigma(-x) accurate in both tails;
    likewise 1 - tanh^2 (_sech2).
    """
    if kind == "gelu":  # x Phi(x)
        cdf = 0.5 * torch.erfc(-x * _SQRT1_2)  # not 1 + erf: it cancels for x << 0
        pdf = torch.exp(-0.5 * (x * x)) * _INV_SQRT_2PI
        return x * cdf, cdf + x * pdf, pdf * (2 - x * x)
    if kind == "gelu_tanh":  # x (1 + tanh(c (x + a x^3))) / 2
        # (1 + tanh(u)) / 2 = sigma(2u), which does not cancel for x << 0
        u = _GELU_TANH_C * (x + _GELU_TANH_A * (x * x * x))
        half_1pt, t, sech2 = torch.sigmoid(2 * u), torch.tanh(u), _sech2(u)
        du = _GELU_TANH_C * (1 + 3 * _GELU_TANH_A * (x * x))
        ddu = (_GELU_TANH_C * 6 * _GELU_TANH_A) * x
        half_x = 0.5 * x
        return x * half_1pt, half_1pt + half_x * sech2 * du, sech2 * (du + half_x * (ddu - 2 * t * du * du))
    if kind in ("silu", "sigmoid"):
        sp, sm = torch.sigmoid(x), torch.sigmoid(-x)
        if kind == "sigmoid":
            return sp, sp * sm, sp * sm * (sm - sp)
        return x * sp, sp * (1 + x * sm), sp * sm * (2 + x * (sm - sp))
    if kind == "tanh":
        t, sech2 = torch.tanh(x), _sech2(x)
        return t, sech2, -2 * t * sech2
    if kind == "relu":  # f'(0) = 0, as torch's relu backward has it
        on = x > 0
        return torch.relu(x), on.to(x.dtype), torch.zeros_like(x)
    if kind == "softplus":  # log(1 + exp(beta x)) / beta, linear where beta x > threshold
        bx = x * beta
        linear = bx > threshold
        sp, sm = torch.sigmoid(bx), torch.sigmoid(-bx)
        f = torch.where(linear, x, torch.log1p(torch.exp(bx)) / beta)
        d1 = torch.where(linear, torch.ones_like(x), sp)
        d2 = torch.where(linear, torch.zeros_like(x), beta * sp * sm)
        return f, d1, d2
    raise ValueError(f"symfast.jet_activation: kind must be one of {', '.join(ACTIVATION_KINDS)}, got {kind!r}")


def jet_activation(
    x: torch.Tensor,
    x1: Optional[torch.Tensor],
    x2: Optional[torch.Tensor],
    kind: str,
    beta: float = 1.0,
    threshold: float = 20.0,
    second: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Jet of an activation: y = f(x), y1 = f'(x) x1, y2 = f'(x) x2 + f''(x) x1^2.

    relu is a select (y1 = x1 where x > 0, else 0; y2 likewise from x2), so a
    non-finite tangent where relu is flat gives 0, not 0 * inf = nan.
    ``second=False``: first order only, y2 is an empty (0,) tensor (every jet op).
    """
    if not second:
        return _first_order(jet_activation(x, x1, x2, kind, beta, threshold))
    K = _jet_directions("symfast.jet_activation", (("x1", x1), ("x2", x2)))
    acc = _acc_dtype(x.dtype)
    f, d1, d2 = _activation_derivatives(x.to(acc), kind, beta, threshold)
    shape = (K,) + tuple(x.shape)
    zeros = torch.zeros(shape, dtype=x.dtype, device=x.device)
    if kind == "relu":
        on = x > 0
        y1 = torch.where(on, x1, 0) if x1 is not None else zeros
        y2 = torch.where(on, x2, 0) if x2 is not None else zeros
        return torch.relu(x), y1.expand(shape).contiguous(), y2.expand(shape).contiguous()
    y1 = (d1 * x1.to(acc)).to(x.dtype) if x1 is not None else zeros
    if x2 is not None and x1 is not None:
        y2 = d1 * x2.to(acc) + d2 * (x1.to(acc) * x1.to(acc))
    elif x2 is not None:
        y2 = d1 * x2.to(acc)
    else:
        y2 = d2 * (x1.to(acc) * x1.to(acc))
    return f.to(x.dtype), y1, y2.to(x.dtype)


def _first_order(jet: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, y1, empty (0,)): what a jet op returns with ``second=False`` (y and y1 as with True)."""
    y, y1, _ = jet
    return y, y1, y1.new_empty((0,))


def _sum_of_products(shape, acc: torch.dtype, device, terms) -> torch.Tensor:
    """0 + a_1 b_1 + a_2 b_2 + ... in the accumulation type, skipping terms with
    a missing factor; the same order of additions as the kernels."""
    out = torch.zeros(shape, dtype=acc, device=device)
    for scale, a, b in terms:
        if a is None or b is None:
            continue
        prod = a.to(acc) * b.to(acc)
        out = out + (prod * scale if scale != 1 else prod)
    return out


def jet_dcs(
    w: torch.Tensor,
    u: torch.Tensor,
    v: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    w1: Optional[torch.Tensor],
    u1: Optional[torch.Tensor],
    v1: Optional[torch.Tensor],
    w2: Optional[torch.Tensor],
    u2: Optional[torch.Tensor],
    v2: Optional[torch.Tensor],
    second: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Jet of dcs: theta = m ? w u : v, and
    y1 = m ? w1 u + w u1 : v1,  y2 = m ? w2 u + 2 w1 u1 + w u2 : v2.

    v, v1 and v2 exist only with a mask (mask=None means theta = w u).
    """
    if not second:
        return _first_order(jet_dcs(w, u, v, mask, w1, u1, v1, w2, u2, v2))
    op = "symfast.jet_dcs"
    K = _jet_directions(op, (("w1", w1), ("u1", u1), ("v1", v1), ("w2", w2), ("u2", u2), ("v2", v2)))
    if mask is None and (v1 is not None or v2 is not None):
        raise ValueError(f"{op}: v1/v2 were given without a mask; with mask=None dcs has no v input")
    acc, shape = _acc_dtype(w.dtype), (K,) + tuple(w.shape)
    y = dcs(w, u, v, mask)
    on1 = _sum_of_products(shape, acc, w.device, [(1, w1, u), (1, w, u1)]).to(w.dtype)
    on2 = _sum_of_products(shape, acc, w.device, [(1, w2, u), (2, w1, u1), (1, w, u2)]).to(w.dtype)
    if mask is None:
        return y, on1, on2
    m = _bool_mask(mask)
    y1 = torch.where(m, on1, v1 if v1 is not None else torch.zeros((), dtype=w.dtype, device=w.device))
    y2 = torch.where(m, on2, v2 if v2 is not None else torch.zeros((), dtype=w.dtype, device=w.device))
    return y, y1, y2


def jet_dcs_group(
    w: torch.Tensor,
    s: torch.Tensor,
    dim: int,
    w1: Optional[torch.Tensor],
    s1: Optional[torch.Tensor],
    w2: Optional[torch.Tensor],
    s2: Optional[torch.Tensor],
    second: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Jet of dcs_group: theta = w * s (s broadcast along dim), and
    y1 = w1 s + w s1,  y2 = w2 s + 2 w1 s1 + w s2, with s1, s2 of shape [K, G]."""
    if not second:
        return _first_order(jet_dcs_group(w, s, dim, w1, s1, w2, s2))
    K = _jet_directions("symfast.jet_dcs_group", (("w1", w1), ("s1", s1), ("w2", w2), ("s2", s2)))
    dim = dim % w.dim()
    acc, shape = _acc_dtype(w.dtype), (K,) + tuple(w.shape)

    def gates(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """[K, G] as a tensor that broadcasts along dim + 1 of [K, *w.shape]."""
        if t is None:
            return None
        view = [K] + [1] * w.dim()
        view[dim + 1] = -1
        return t.reshape(view)

    sv = _gate_view(s, w, dim)
    y1 = _sum_of_products(shape, acc, w.device, [(1, w1, sv), (1, w, gates(s1))])
    y2 = _sum_of_products(shape, acc, w.device, [(1, w2, sv), (2, w1, gates(s1)), (1, w, gates(s2))])
    return dcs_group(w, s, dim), y1.to(w.dtype), y2.to(w.dtype)

# ------------------------------------------------------------ jet row ops
# Second-order jets (x, x1, x2) along K directions: x1 and x2 are the first and
# second t-derivatives of x(theta + t n_k), stacked with a leading K. A jet op
# returns (y, y1, y2) with y1 = f'(x) x1 and y2 = f'(x) x2 + f''(x)[x1, x1];
# a missing tangent counts as zero. The row ops act on rows (the normalized
# dims, or the softmax dim), compute in float for half types (_acc_dtype) and
# round once, as the kernels do. The argument checks live in
# symfast.ops.jet_rows (shared with the fake kernels); these twins assume
# valid input.


def _jet_k(*tangents: Optional[torch.Tensor]) -> int:
    """K, the number of directions: the leading size of the first given tangent."""
    for t in tangents:
        if t is not None:
            return t.shape[0]
    raise ValueError("a jet op needs at least one tangent: K, the number of directions, is read from it")


def _up(t: Optional[torch.Tensor], acc: torch.dtype) -> Optional[torch.Tensor]:
    return None if t is None else t.to(acc)


def _jet_normalize(x, x1, x2, nd: int, eps: float, center: bool):
    """Jet of x_hat = u / sigma over the last nd dims, where u = x - mean(x)
    (center) or u = x, and sigma = sqrt(mean(u^2) + eps).

    Differentiating u = x_hat * sigma and sigma^2 = mean(u^2) + eps twice along t,
    with u1, u2 the tangents of u (x1, x2, centered when center):

        sigma'  = mean(x_hat u1)
        sigma'' = (mean(u1^2) - sigma'^2) / sigma + mean(x_hat u2)
        x_hat'  = (u1 - x_hat sigma') / sigma
        x_hat'' = (u2 - 2 x_hat' sigma' - x_hat sigma'') / sigma

    x is (*S) and x1, x2 are (K, *S) or None (zero). Returns x_hat, x_hat', x_hat''.
    """
    dims = tuple(range(-nd, 0))

    def mean(t):
        return t.mean(dim=dims, keepdim=True)

    def tangent(t):
        if t is None:
            return torch.zeros_like(x).unsqueeze(0)
        return t - mean(t) if center else t

    u = x - mean(x) if center else x
    sigma = (mean(u * u) + eps).sqrt()
    xh = u / sigma
    u1, u2 = tangent(x1), tangent(x2)
    d1 = mean(xh * u1)
    d2 = (mean(u1 * u1) - d1 * d1) / sigma + mean(xh * u2)
    xh1 = (u1 - xh * d1) / sigma
    xh2 = (u2 - 2 * xh1 * d1 - xh * d2) / sigma
    return xh, xh1, xh2


def _jet_scale_shift(xh, xh1, xh2, k, weight, bias, weight1, bias1, weight2, bias2):
    """y = x_hat * weight + bias with weight and bias carrying their own jets:
    y1 = x_hat1 w + x_hat w1 + b1,  y2 = x_hat2 w + 2 x_hat1 w1 + x_hat w2 + b2.
    weight/bias are (*normalized_shape), their jets (K, 1, ..., 1, *normalized_shape)."""
    y = xh if weight is None else xh * weight
    y1 = xh1 if weight is None else xh1 * weight
    y2 = xh2 if weight is None else xh2 * weight
    if weight1 is not None:
        y1 = y1 + xh * weight1
        y2 = y2 + 2 * xh1 * weight1
    if weight2 is not None:
        y2 = y2 + xh * weight2
    if bias is not None:
        y = y + bias
    if bias1 is not None:
        y1 = y1 + bias1
    if bias2 is not None:
        y2 = y2 + bias2
    shape = (k,) + tuple(xh.shape)
    return y, y1.expand(shape), y2.expand(shape)


def _per_direction(t: Optional[torch.Tensor], acc: torch.dtype, lead: int) -> Optional[torch.Tensor]:
    """A weight jet (K, *normalized_shape) as (K, 1, ..., 1, *normalized_shape): broadcasts against (K, *x.shape)."""
    if t is None:
        return None
    return t.to(acc).reshape(t.shape[:1] + (1,) * lead + t.shape[1:])


def jet_layer_norm(
    x: torch.Tensor,
    x1: Optional[torch.Tensor],
    x2: Optional[torch.Tensor],
    normalized_shape,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    weight1: Optional[torch.Tensor],
    bias1: Optional[torch.Tensor],
    weight2: Optional[torch.Tensor],
    bias2: Optional[torch.Tensor],
    eps: float,
    second: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Jet of F.layer_norm(x, normalized_shape, weight, bias, eps) with u = x - mean(x)
    (see _jet_normalize), weight and bias carrying their own jets (see _jet_scale_shift)."""
    if not second:
        return _first_order(jet_layer_norm(x, x1, x2, normalized_shape, weight, bias, weight1, bias1, weight2,
                                           bias2, eps))
    k = _jet_k(x1, x2, weight1, weight2, bias1, bias2)
    acc = _acc_dtype(x.dtype)
    nd = len(normalized_shape)
    lead = x.dim() - nd
    xh, xh1, xh2 = _jet_normalize(x.to(acc), _up(x1, acc), _up(x2, acc), nd, eps, center=True)
    ys = _jet_scale_shift(xh, xh1, xh2, k, _up(weight, acc), _up(bias, acc),
                          _per_direction(weight1, acc, lead), _per_direction(bias1, acc, lead),
                          _per_direction(weight2, acc, lead), _per_direction(bias2, acc, lead))
    return tuple(y.to(x.dtype).contiguous() for y in ys)


def jet_rms_norm(
    x: torch.Tensor,
    x1: Optional[torch.Tensor],
    x2: Optional[torch.Tensor],
    normalized_shape,
    weight: Optional[torch.Tensor],
    weight1: Optional[torch.Tensor],
    weight2: Optional[torch.Tensor],
    eps: float,
    second: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Jet of y = x * rsqrt(mean(x^2) + eps) * weight over the normalized dims
    (F.rms_norm): _jet_normalize with u = x (no centering)."""
    if not second:
        return _first_order(jet_rms_norm(x, x1, x2, normalized_shape, weight, weight1, weight2, eps))
    k = _jet_k(x1, x2, weight1, weight2)
    acc = _acc_dtype(x.dtype)
    nd = len(normalized_shape)
    lead = x.dim() - nd
    xh, xh1, xh2 = _jet_normalize(x.to(acc), _up(x1, acc), _up(x2, acc), nd, eps, center=False)
    ys = _jet_scale_shift(xh, xh1, xh2, k, _up(weight, acc), None, _per_direction(weight1, acc, lead), None,
                          _per_direction(weight2, acc, lead), None)
    return tuple(y.to(x.dtype).contiguous() for y in ys)


def _softmax_jet(z, z1, z2, dim: int):
    """s = softmax(z) and the centered tangents a_j = z_j - <s, z_j> (zero where z_j is None),
    with e = <s, a1^2>, the variance of z1 under s: s' = s a1, (log s)' = a1 and
    s'' = s (a1^2 + a2 - e), (log s)'' = a2 - e."""
    s = torch.softmax(z, dim)
    d = dim % z.dim() + 1  # dim in the (K, *S) tangents

    def centered(t):
        if t is None:
            return torch.zeros_like(z).unsqueeze(0)
        return t - (s * t).sum(d, keepdim=True)

    a1, a2 = centered(z1), centered(z2)
    e = (s * a1 * a1).sum(d, keepdim=True)
    return s, a1, a2, e


def jet_softmax(
    x: torch.Tensor,
    x1: Optional[torch.Tensor],
    x2: Optional[torch.Tensor],
    dim: int,
    log: bool,
    second: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Jet of softmax(x, dim) (log=False) or log_softmax(x, dim) (log=True), see _softmax_jet."""
    if not second:
        return _first_order(jet_softmax(x, x1, x2, dim, log))
    k = _jet_k(x1, x2)
    acc = _acc_dtype(x.dtype)
    z = x.to(acc)
    if z.dim() == 0:  # torch treats a 0-d tensor as one row of one element
        ys = jet_softmax(x.reshape(1), None if x1 is None else x1.reshape(k, 1),
                         None if x2 is None else x2.reshape(k, 1), 0, log)
        return ys[0].reshape(()), ys[1].reshape(k), ys[2].reshape(k)
    s, a1, a2, e = _softmax_jet(z, _up(x1, acc), _up(x2, acc), dim % z.dim())
    if log:
        ys = (torch.log_softmax(z, dim), a1, a2 - e)
    else:
        ys = (s, s * a1, s * (a1 * a1 + a2 - e))
    shape = (k,) + tuple(x.shape)
    return ys[0].to(x.dtype).contiguous(), ys[1].expand(shape).to(x.dtype).contiguous(), \
        ys[2].expand(shape).to(x.dtype).contiguous()


def jet_cross_entropy(
    z: torch.Tensor,
    z1: Optional[torch.Tensor],
    z2: Optional[torch.Tensor],
    target: torch.Tensor,
    ignore_index: int = -100,
    second: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Jet of the per-sample loss F.cross_entropy(z, target, reduction='none'), z (N, C):

        loss = logsumexp(z) - z[t],  l1 = <s, z1> - z1[t],
        l2 = <s, z2> - z2[t] + <s, z1^2> - <s, z1>^2        (s = softmax(z)),

    the last two terms being the variance of z1 under s. Rows whose target is
    ignore_index give 0, 0, 0."""
    if not second:
        return _first_order(jet_cross_entropy(z, z1, z2, target, ignore_index))
    k = _jet_k(z1, z2)
    acc = _acc_dtype(z.dtype)
    zz = z.to(acc)
    keep = target != ignore_index
    t = torch.where(keep, target, torch.zeros_like(target)).unsqueeze(-1)  # any valid index where ignored

    def pick(v):  # v[..., n, t_n]; with C = 0 every row is ignored
        if v.shape[-1] == 0:
            return v.sum(-1)
        return v.gather(-1, t.expand(v.shape[:-1] + (1,))).squeeze(-1)

    s, a1, a2, e = _softmax_jet(zz, _up(z1, acc), _up(z2, acc), 1)
    loss = torch.logsumexp(zz, 1) - pick(zz)
    zero = torch.zeros((k,) + tuple(zz.shape), dtype=acc, device=z.device)
    s_dot = lambda v: (s * v).sum(-1)  # noqa: E731
    l1 = zero.sum(-1) if z1 is None else s_dot(z1.to(acc)) - pick(z1.to(acc))
    l2 = e.squeeze(-1).expand(k, zz.shape[0])
    if z2 is not None:
        l2 = l2 + s_dot(z2.to(acc)) - pick(z2.to(acc))
    outs = (torch.where(keep, loss, 0), torch.where(keep, l1, 0), torch.where(keep, l2, 0))
    return tuple(o.to(z.dtype).contiguous() for o in outs)
