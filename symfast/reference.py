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
