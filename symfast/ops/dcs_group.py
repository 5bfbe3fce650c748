r"""Registration glue for the group gate ops: ``theta = w * s`` along one dim.

The ops are declared in ``csrc/ops.cpp`` (``torch.ops.symfast.dcs_group``,
``dcs_group_backward``, ``dcs_group_jvp``) with CPU and CUDA kernels in
``csrc/cpu/dcs_group.cpp`` and ``csrc/cuda/dcs_group.cu``. This module mirrors
``symfast/ops/dcs.py`` (which does the same for ``dcs``), piece by piece:

* ``register_fake`` for every op, sharing :func:`check_dcs_group` with the
  public wrapper, so ``torch.compile(fullgraph=True)`` traces the ops and eager
  and compiled calls reject the same inputs (the kernels repeat the checks in
  C++, ``check_dcs_group_args`` in ``csrc/dcs_checks.h``, for direct
  ``torch.ops`` calls);
* ``torch.autograd.Function`` wrappers with ``setup_context``, ``backward``,
  ``jvp`` and ``vmap`` (the path of the public :func:`dcs_group`), because
  ``register_autograd`` alone gives no forward mode, so ``torch.func.jvp`` and
  ``hessian`` would fail;
* ``torch.library.register_autograd`` on the raw ops with the same formulas,
  so ``torch.ops.symfast.dcs_group*`` are differentiable too, ``opcheck``
  checks their gradients, and ``torch.compile`` (which calls the raw op, since
  Dynamo cannot trace an autograd.Function with a custom ``jvp``) gets its
  backward from them.

The derivative formulas close over the three ops. With
``theta = w * s``, ``gw = g * s``, ``gs = sum_other(g * w)`` and
``t = w_dot * s + w * s_dot`` (all products broadcast along dim):

* d theta = jvp(w, s; w_dot, s_dot);  backward: (g * s, sum(g * w)) = backward op;
* backward of the backward op: d g = jvp(w, s; ggw, ggs), d w = g * ggs
  (the forward op), d s = sum(ggw * g) (the backward op's gate output);
* backward of the jvp op: (d w_dot, d s_dot) = backward(g; w, s) and
  (d w, d s) = backward(g; w_dot, s_dot), two fused calls.

So derivatives of any order run through the fused kernels.

vmap: the ops take one gate vector, and a batched gate is a batch of gate
vectors. The rules fold the batch into the groups: with the batch dim moved
next to dim, ``(B, G)`` becomes one group dim of size ``B * G`` (a view when the
layout allows, a copy otherwise), the op runs once, and the result is unfolded.
When no per-group operand is batched, the batch simply becomes a leading dim of
w and dim shifts by one, which costs nothing.
"""

from __future__ import annotations

import operator
from typing import Optional, Tuple

import torch

from .. import _C  # noqa: F401  (loads the library: registers torch.ops.symfast.*)
from .. import reference
from .checks import require_tensor, check_dtype_device, check_like, check_primal
from .autograd import AutogradPath, add_optional, autograd_path, batch_size, to_front

Tensor = torch.Tensor
_lib_ops = torch.ops.symfast

__all__ = ["dcs_group", "check_dcs_group"]


# ------------------------------------------------------------------ checks
def _normalize_dim(op: str, dim: object, ndim: int) -> int:
    if isinstance(dim, bool):
        raise TypeError(f"{op}: dim must be an int, got bool")
    try:
        dim = operator.index(dim)
    except TypeError:
        raise TypeError(f"{op}: dim must be an int, got {type(dim).__name__}") from None
    if ndim < 1:
        raise ValueError(f"{op}: w must have at least one dimension (groups run along dim), got a 0-d tensor")
    if not -ndim <= dim < ndim:
        raise IndexError(
            f"{op}: dim must be in the range [{-ndim}, {ndim - 1}] for w with {ndim} "
            f"dimension{'' if ndim == 1 else 's'}, got {dim}"
        )
    return dim % ndim


def _check_gate(op: str, name: str, s: Optional[Tensor], w: Tensor, dim: int) -> None:
    """A per-group operand: w's dtype and device, shape (w.shape[dim],)."""
    if s is None:
        return
    check_dtype_device(op, name, s, w)
    G = w.shape[dim]
    if s.dim() != 1 or s.shape[0] != G:
        raise ValueError(
            f"{op}: {name} must have shape (G,) = (w.shape[dim],) = ({G},), got {tuple(s.shape)}"
        )


def check_dcs_group(w: Tensor, s: Tensor, dim: int, op: str = "symfast.dcs_group") -> int:
    """Validates a dcs_group call; returns dim normalized to [0, w.dim())."""
    check_primal(op, w)
    dim = _normalize_dim(op, dim, w.dim())
    require_tensor(op, "s", s)
    _check_gate(op, "s", s, w, dim)
    return dim


# --------------------------------------------------------------- fake kernels
def _contiguous_like(w: Tensor) -> Tensor:
    return torch.empty_like(w, memory_format=torch.contiguous_format)


@torch.library.register_fake("symfast::dcs_group")
def _dcs_group_fake(w, s, dim):
    check_dcs_group(w, s, dim)
    return _contiguous_like(w)


@torch.library.register_fake("symfast::dcs_group_backward")
def _dcs_group_backward_fake(grad, w, s, dim, w_needed, s_needed):
    op = "symfast.dcs_group_backward"
    dim = check_dcs_group(w, s, dim, op)
    check_like(op, "grad", grad, w)
    gw = _contiguous_like(w) if w_needed else w.new_empty(0)
    gs = s.new_empty(w.shape[dim]) if s_needed else s.new_empty(0)
    return gw, gs


@torch.library.register_fake("symfast::dcs_group_jvp")
def _dcs_group_jvp_fake(w, s, dim, w_dot, s_dot):
    op = "symfast.dcs_group_jvp"
    dim = check_dcs_group(w, s, dim, op)
    check_like(op, "w_dot", w_dot, w)
    _check_gate(op, "s_dot", s_dot, w, dim)
    return _contiguous_like(w)


# ------------------------------------------------------ differentiable calls
# Each takes optional operands and returns None for a term that vanishes, so
# the formulas below read like the math. All are differentiable to any order.
def scale(x: Tensor, s: Tensor, dim: int) -> Tensor:
    """x * s along dim (the forward op with x in the place of w)."""
    return DCSGroupFunction.apply(x, s, dim)


def vjp(
    grad: Tensor,
    w: Optional[Tensor],
    s: Optional[Tensor],
    dim: int,
    w_needed: bool,
    s_needed: bool,
    s_like: Optional[Tensor] = None,
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(grad * s, sum_other(grad * w)), each only when needed, else None.

    ``s`` may be None when grad_w is not needed and ``w`` when grad_s is not
    (the kernel does not read them then); ``s_like`` is any (G,) tensor that
    stands in for a missing ``s`` (grad stands in for a missing ``w``).
    """
    w_needed = bool(w_needed and s is not None)
    s_needed = bool(s_needed and w is not None)
    if not (w_needed or s_needed):
        return None, None
    gate = s if s is not None else s_like
    assert gate is not None, "vjp: no (G,) tensor to carry the gate's shape"
    gw, gs = DCSGroupBackwardFunction.apply(
        grad, grad if w is None else w, gate, dim, w_needed, s_needed
    )
    return (gw if w_needed else None, gs if s_needed else None)


def group_sum(x: Optional[Tensor], y: Optional[Tensor], s_like: Tensor, dim: int) -> Optional[Tensor]:
    """sum over every dim but ``dim`` of x * y; None when either is None."""
    if x is None or y is None:
        return None
    return vjp(x, y, None, dim, False, True, s_like=s_like)[1]


def jvp(
    w: Optional[Tensor],
    s: Optional[Tensor],
    dim: int,
    w_dot: Optional[Tensor],
    s_dot: Optional[Tensor],
    w_like: Optional[Tensor] = None,
    s_like: Optional[Tensor] = None,
) -> Optional[Tensor]:
    """w_dot * s + w * s_dot; None when both terms vanish.

    A term with a missing factor vanishes; ``w_like``/``s_like`` stand in for
    a missing ``w``/``s`` (shape carriers only, never read).
    """
    if s is None:
        w_dot = None
    if w is None:
        s_dot = None
    if w_dot is None and s_dot is None:
        return None
    w = next(t for t in (w, w_dot, w_like) if t is not None)
    s = next(t for t in (s, s_dot, s_like) if t is not None)
    return DCSGroupJvpFunction.apply(w, s, dim, w_dot, s_dot)


def _zeros_like(t: Tensor) -> Tensor:
    return torch.zeros_like(t, memory_format=torch.contiguous_format)


# ------------------------------------------------------------------ formulas
# Shared by the autograd.Function wrappers and by register_autograd on the ops.
def _group_setup_context(ctx, inputs, output):
    w, s, dim = inputs
    ctx.save_for_backward(w, s)
    ctx.save_for_forward(w, s)
    ctx.dim = dim


def _group_backward_rule(ctx, grad):
    w, s = ctx.saved_tensors
    nw, ns = ctx.needs_input_grad[:2]
    gw, gs = vjp(grad, w, s, ctx.dim, nw, ns)
    return gw, gs, None


def _group_backward_setup_context(ctx, inputs, output):
    grad, w, s, dim, w_needed, s_needed = inputs
    ctx.save_for_backward(grad, w, s)
    ctx.save_for_forward(grad, w, s)
    ctx.dim = dim
    ctx.flags = (w_needed, s_needed)
    if isinstance(output, tuple):  # only on the autograd.Function path
        ctx.mark_non_differentiable(*[o for o, f in zip(output, ctx.flags) if not f])


def _group_backward_backward_rule(ctx, ggw, ggs):
    # outputs: gw = g * s, gs = sum_other(g * w)
    grad, w, s = ctx.saved_tensors
    w_needed, s_needed = ctx.flags
    ggw = ggw if w_needed else None
    ggs = ggs if s_needed else None
    need_g, need_w, need_s = ctx.needs_input_grad[:3]
    # d/dg <ggw, g*s> + <ggs, sum(g*w)> = ggw * s + w * ggs
    d_grad = jvp(w, s, ctx.dim, ggw, ggs) if need_g else None
    # d/dw <ggs, sum(g*w)> = g * ggs;  d/ds <ggw, g*s> = sum(ggw * g)
    d_w = scale(grad, ggs, ctx.dim) if need_w and ggs is not None else None
    d_s = group_sum(ggw, grad, s, ctx.dim) if need_s else None
    return d_grad, d_w, d_s, None, None, None


def _group_jvp_setup_context(ctx, inputs, output):
    w, s, dim, w_dot, s_dot = inputs
    ctx.save_for_backward(w, s, w_dot, s_dot)
    ctx.save_for_forward(w, s, w_dot, s_dot)
    ctx.dim = dim


def _group_jvp_backward_rule(ctx, g):
    # out = w_dot * s + w * s_dot
    w, s, w_dot, s_dot = ctx.saved_tensors
    n_w, n_s, _, n_wd, n_sd = ctx.needs_input_grad
    # d/dw = g * s_dot, d/ds = sum(g * w_dot): the backward op at (w_dot, s_dot)
    d_w, d_s = vjp(g, w_dot, s_dot, ctx.dim, n_w, n_s, s_like=s)
    # d/dw_dot = g * s, d/ds_dot = sum(g * w): the backward op at (w, s)
    d_wd, d_sd = vjp(g, w, s, ctx.dim, n_wd and w_dot is not None, n_sd and s_dot is not None)
    return d_w, d_s, None, d_wd, d_sd


# ------------------------------------------------------------------ vmap glue
def _fold_w(t: Optional[Tensor], bdim: Optional[int], batch: int, dim: int) -> Optional[Tensor]:
    """[B, ..., G at dim, ...] -> [B * G, rest]: group b * G + g is sample b's group g."""
    t = to_front(t, bdim, batch)
    if t is None:
        return None
    t = t.movedim(dim + 1, 1)
    return t.reshape((t.shape[0] * t.shape[1],) + tuple(t.shape[2:]))


def _fold_s(t: Optional[Tensor], bdim: Optional[int], batch: int) -> Optional[Tensor]:
    t = to_front(t, bdim, batch)
    return None if t is None else t.reshape(-1)


def _unfold_w(t: Tensor, batch: int, groups: int, dim: int) -> Tensor:
    return t.reshape((batch, groups) + tuple(t.shape[1:])).movedim(1, dim + 1)


def _logical_shape(w: Tensor, w_bdim: Optional[int]) -> Tuple[int, ...]:
    """w's per-sample shape (vmap hides the batch dim)."""
    shape = list(w.shape)
    if w_bdim is not None:
        del shape[w_bdim]
    return tuple(shape)


# ------------------------------------------------------ autograd.Functions
class DCSGroupFunction(torch.autograd.Function):
    """theta = w * s along dim, over ``torch.ops.symfast.dcs_group``."""

    @staticmethod
    def forward(w, s, dim):
        return _lib_ops.dcs_group(w, s, dim)

    setup_context = staticmethod(_group_setup_context)
    backward = staticmethod(_group_backward_rule)

    @staticmethod
    def jvp(ctx, w_t, s_t, _dim_t):
        w, s = ctx.saved_tensors
        out = jvp(w, s, ctx.dim, w_t, s_t)
        return _zeros_like(w) if out is None else out

    @staticmethod
    def vmap(info, in_dims, w, s, dim):
        wd, sd, _ = in_dims
        b = batch_size((w, s), (wd, sd))
        shape = _logical_shape(w, wd)
        d = dim % len(shape)
        if sd is None:  # one gate for the whole batch: a leading dim of w
            return DCSGroupFunction.apply(to_front(w, wd, b), s, d + 1), 0
        out = DCSGroupFunction.apply(_fold_w(w, wd, b, d), _fold_s(s, sd, b), 0)
        return _unfold_w(out, b, shape[d], d), 0


class DCSGroupBackwardFunction(torch.autograd.Function):
    """(g * s, sum_other(g * w)) over ``torch.ops.symfast.dcs_group_backward``."""

    @staticmethod
    def forward(grad, w, s, dim, w_needed, s_needed):
        return _lib_ops.dcs_group_backward(grad, w, s, dim, w_needed, s_needed)

    setup_context = staticmethod(_group_backward_setup_context)
    backward = staticmethod(_group_backward_backward_rule)

    @staticmethod
    def jvp(ctx, g_t, w_t, s_t, *_):
        # gw = g * s -> g_t * s + g * s_t;  gs = sum(g * w) -> sum(g_t * w) + sum(g * w_t)
        grad, w, s = ctx.saved_tensors
        nw, ns = ctx.flags
        gw_t = jvp(grad, s, ctx.dim, g_t, s_t) if nw else None
        gs_t = add_optional(group_sum(g_t, w, s, ctx.dim), group_sum(grad, w_t, s, ctx.dim)) if ns else None
        if nw and gw_t is None:
            gw_t = _zeros_like(w)
        if ns and gs_t is None:
            gs_t = _zeros_like(s)
        return gw_t, gs_t

    @staticmethod
    def vmap(info, in_dims, grad, w, s, dim, w_needed, s_needed):
        gd, wd, sd = in_dims[:3]
        b = batch_size((grad, w, s), (gd, wd, sd))
        shape = _logical_shape(w, wd)
        d = dim % len(shape)
        out_dims = (0 if w_needed else None, 0 if s_needed else None)
        if sd is None and not s_needed:  # grad_w only, one gate: a leading dim
            outs = DCSGroupBackwardFunction.apply(
                to_front(grad, gd, b), to_front(w, wd, b), s, d + 1, w_needed, False
            )
            return outs, out_dims
        # grad_s is per sample: fold the batch into the groups.
        gw, gs = DCSGroupBackwardFunction.apply(
            _fold_w(grad, gd, b, d), _fold_w(w, wd, b, d), _fold_s(s, sd, b), 0, w_needed, s_needed
        )
        gw = _unfold_w(gw, b, shape[d], d) if w_needed else gw
        gs = gs.reshape(b, shape[d]) if s_needed else gs
        return (gw, gs), out_dims


class DCSGroupJvpFunction(torch.autograd.Function):
    """w_dot * s + w * s_dot over ``torch.ops.symfast.dcs_group_jvp``."""

    @staticmethod
    def forward(w, s, dim, w_dot, s_dot):
        return _lib_ops.dcs_group_jvp(w, s, dim, w_dot, s_dot)

    setup_context = staticmethod(_group_jvp_setup_context)
    backward = staticmethod(_group_jvp_backward_rule)

    @staticmethod
    def jvp(ctx, w_t, s_t, _dim_t, wd_t, sd_t):
        # Bilinear in (w_dot, s) and (w, s_dot):
        # d out = wd_t * s + w * sd_t + w_dot * s_t + w_t * s_dot
        w, s, w_dot, s_dot = ctx.saved_tensors
        first = jvp(w, s, ctx.dim, wd_t, sd_t)
        second = jvp(w_dot, s_dot, ctx.dim, w_t, s_t, w_like=w, s_like=s)
        out = add_optional(first, second)
        return _zeros_like(w) if out is None else out

    @staticmethod
    def vmap(info, in_dims, w, s, dim, w_dot, s_dot):
        wd, sd, _, wdd, sdd = in_dims
        b = batch_size((w, s, w_dot, s_dot), (wd, sd, wdd, sdd))
        shape = _logical_shape(w, wd)
        d = dim % len(shape)
        if sd is None and sdd is None:  # unbatched gates: a leading dim of w
            out = DCSGroupJvpFunction.apply(to_front(w, wd, b), s, d + 1, to_front(w_dot, wdd, b), s_dot)
            return out, 0
        out = DCSGroupJvpFunction.apply(
            _fold_w(w, wd, b, d), _fold_s(s, sd, b), 0, _fold_w(w_dot, wdd, b, d), _fold_s(s_dot, sdd, b)
        )
        return _unfold_w(out, b, shape[d], d), 0


# ------------------------------------- autograd on the raw ops (dispatcher)
torch.library.register_autograd(
    "symfast::dcs_group", _group_backward_rule, setup_context=_group_setup_context
)
torch.library.register_autograd(
    "symfast::dcs_group_backward",
    _group_backward_backward_rule,
    setup_context=_group_backward_setup_context,
)
torch.library.register_autograd(
    "symfast::dcs_group_jvp", _group_jvp_backward_rule, setup_context=_group_jvp_setup_context
)


# ------------------------------------------------------------- public API
def dcs_group(w: Tensor, s: Tensor, dim: int) -> Tensor:
    r"""Group gate: ``w`` scaled by one gate per group along ``dim``.

    .. math:: \theta_{\dots, g, \dots} = s_g \, w_{\dots, g, \dots}, \qquad g = 0, \dots, G - 1

    With weight decay :math:`\alpha(\|s\|^2 + \|w\|^2)` on the factors, the
    minimum over factorizations of a given :math:`\theta` is the group lasso
    penalty :math:`2\alpha \sum_g \|\theta_g\|_2`.

    Args:
        w: floating tensor (float32, float64, float16 or bfloat16) of rank >= 1.
        s: the gates, shape ``(w.shape[dim],)``, w's dtype and device.
        dim: the dim the groups run along; negative counts from the end. For a
            Linear weight ``(out, in)``, ``dim=0`` gates output units and
            ``dim=1`` input features; for a conv weight, ``dim=0`` gates output
            channels.

    Gradients: ``grad_w = grad * s`` (broadcast) and ``grad_s[g]`` = the sum of
    ``grad * w`` over group g, computed in one fused pass (accumulated in
    float for half types). Works under autograd (any order),
    ``torch.compile(fullgraph=True)`` and ``torch.func`` (grad, jvp, vmap,
    hessian). The result is a new contiguous tensor.
    """
    check_dcs_group(w, s, dim)
    path = autograd_path()  # the table is in symfast.ops.autograd.autograd_path
    if path is AutogradPath.CPP_NODE:
        return _lib_ops._dcs_group_autograd(w, s, dim)
    if path is AutogradPath.FUNCTION:
        return DCSGroupFunction.apply(w, s, dim)
    if path is AutogradPath.RAW_OP:
        return _lib_ops.dcs_group(w, s, dim)
    return reference.dcs_group(w, s, dim)
