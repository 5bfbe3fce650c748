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
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Jet of F.layer_norm(x, normalized_shape, weight, bias, eps) with u = x - mean(x)
    (see _jet_normalize), weight and bias carrying their own jets (see _jet_scale_shift)."""
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
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Jet of y = x * rsqrt(mean(x^2) + eps) * weight over the normalized dims
    (F.rms_norm): _jet_normalize with u = x (no centering)."""
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
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Jet of softmax(x, dim) (log=False) or log_softmax(x, dim) (log=True), see _softmax_jet."""
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
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Jet of the per-sample loss F.cross_entropy(z, target, reduction='none'), z (N, C):

        loss = logsumexp(z) - z[t],  l1 = <s, z1> - z1[t],
        l2 = <s, z2> - z2[t] + <s, z1^2> - <s, z1>^2        (s = softmax(z)),

    the last two terms being the variance of z1 under s. Rows whose target is
    ignore_index give 0, 0, 0."""
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
