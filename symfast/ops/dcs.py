"""Registration glue for the compiled ops: fake kernels, autograd, forward mode, vmap.

The ops themselves are declared in ``csrc/ops.cpp`` (``torch.ops.symfast.*``)
with CPU and CUDA kernels. This module makes them composable:

* ``register_fake`` for every op, so ``torch.compile(fullgraph=True)`` traces
  them without a graph break (fake kernels share ``symfast.ops.checks`` with the
  public wrappers, so compiled and eager calls reject the same inputs);
* thin ``torch.autograd.Function`` wrappers with ``setup_context``, ``backward``,
  ``jvp`` and ``vmap``: the path of the public ``symfast.dcs`` under torch.func
  transforms and forward-mode AD. In ordinary training it takes
  ``torch.ops.symfast._dcs_autograd`` instead, whose graph node is C++
  (``csrc/autograd.cpp``; see :func:`symfast.ops.autograd.autograd_path`), and under torch.compile the
  raw op;
* ``torch.library.register_autograd`` on the raw ops, reusing the same backward
  formulas, so ``torch.ops.symfast.dcs`` is differentiable too and
  ``torch.library.opcheck`` checks its gradients.

Why autograd.Function and not only ``register_autograd``: ``register_autograd``
gives backward (and double backward when the backward is differentiable) but
no forward-mode rule, so ``torch.func.jvp``, ``jacfwd`` and ``hessian``
(forward-over-reverse) would fail on the op. An autograd.Function with a
``jvp`` and a ``vmap`` staticmethod covers every transform: backward, double
backward, ``torch.func.grad/jvp/vmap/hessian``, and forward-over-forward.

The derivative formulas close over the three ops: every derivative of ``dcs``,
``dcs_backward`` and ``dcs_jvp`` is again a call of ``dcs_backward`` or
``dcs_jvp`` (they are multilinear in their float inputs), so derivatives of any
order run through the fused kernels.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _C  # noqa: F401  (loads the library: registers torch.ops.symfast.*)
from .. import reference
from .autograd import (
    AutogradPath,
    add_optional,
    autograd_path,
    batch_size,
    below_autograd,
    first_order_only,
    mask_to_front,
    to_front,
)
from .checks import check_dcs, check_like, check_mask, check_primal

Tensor = torch.Tensor
_lib_ops = torch.ops.symfast


# --------------------------------------------------------------- fake kernels
@torch.library.register_fake("symfast::dcs")
def _dcs_fake(w, u, v=None, mask=None):
    check_dcs(w, u, v, mask)
    return torch.empty_like(w, memory_format=torch.contiguous_format)


@torch.library.register_fake("symfast::dcs_backward")
def _dcs_backward_fake(grad, w, u, mask, w_needed, u_needed, v_needed):
    op = "symfast.dcs_backward"
    check_primal(op, w)
    check_like(op, "u", u, w)
    check_like(op, "grad", grad, w)
    check_mask(op, mask, w)
    if v_needed and mask is None:
        raise ValueError(f"{op}: v_needed=True requires a mask (without one, dcs has no v input)")

    def out(needed: bool) -> Tensor:
        if needed:
            return torch.empty_like(w, memory_format=torch.contiguous_format)
        return w.new_empty(0)

    return out(w_needed), out(u_needed), out(v_needed)


@torch.library.register_fake("symfast::dcs_jvp")
def _dcs_jvp_fake(w, u, mask, w_dot, u_dot, v_dot):
    op = "symfast.dcs_jvp"
    check_primal(op, w)
    check_like(op, "u", u, w)
    for name, t in (("w_dot", w_dot), ("u_dot", u_dot), ("v_dot", v_dot)):
        check_like(op, name, t, w)
    check_mask(op, mask, w)
    if v_dot is not None and mask is None:
        raise ValueError(f"{op}: v_dot was given without a mask; with mask=None dcs has no v input")
    return torch.empty_like(w, memory_format=torch.contiguous_format)


# ------------------------------------------------------ differentiable calls
def _shape_carrier(*ts: Optional[Tensor]) -> Tensor:
    for t in ts:
        if t is not None:
            return t
    raise AssertionError("no tensor to carry the shape")


def vjp(
    grad: Tensor,
    w: Optional[Tensor],
    u: Optional[Tensor],
    mask: Optional[Tensor],
    w_needed: bool,
    u_needed: bool,
    v_needed: bool,
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(m*u*grad, m*w*grad, (1-m)*grad), each only when needed, else None.

    ``w`` may be None when grad_u is not needed and ``u`` when grad_w is not
    (the kernel does not read them then). Differentiable to any order.
    """
    w_needed = bool(w_needed and u is not None)
    u_needed = bool(u_needed and w is not None)
    v_needed = bool(v_needed and mask is not None)
    if not (w_needed or u_needed or v_needed):
        return None, None, None
    carrier = _shape_carrier(w, u, grad)
    w = carrier if w is None else w
    u = carrier if u is None else u
    if first_order_only():
        with below_autograd():
            gw, gu, gv = _lib_ops.dcs_backward(grad, w, u, mask, w_needed, u_needed, v_needed)
    else:
        gw, gu, gv = DCSBackwardFunction.apply(grad, w, u, mask, w_needed, u_needed, v_needed)
    return (gw if w_needed else None, gu if u_needed else None, gv if v_needed else None)


def jvp(
    w: Optional[Tensor],
    u: Optional[Tensor],
    mask: Optional[Tensor],
    w_dot: Optional[Tensor],
    u_dot: Optional[Tensor],
    v_dot: Optional[Tensor],
) -> Optional[Tensor]:
    """(1-m)*v_dot + m*(w_dot*u + w*u_dot); None when every term vanishes.

    ``u`` may be None when ``w_dot`` is, and ``w`` when ``u_dot`` is.
    Differentiable to any order.
    """
    if w_dot is None or u is None:
        w_dot = None
    if u_dot is None or w is None:
        u_dot = None
    if mask is None:
        v_dot = None
    if w_dot is None and u_dot is None and v_dot is None:
        return None
    carrier = _shape_carrier(w, u, w_dot, u_dot, v_dot)
    return DCSJvpFunction.apply(
        carrier if w is None else w, carrier if u is None else u, mask, w_dot, u_dot, v_dot
    )


# ------------------------------------------------------------------ formulas
# Shared by the autograd.Function wrappers and by register_autograd on the ops.
def _dcs_setup_context(ctx, inputs, output):
    w, u, v, mask = inputs
    ctx.save_for_backward(w, u, mask)
    ctx.save_for_forward(w, u, mask)


def _dcs_backward_rule(ctx, grad):
    w, u, mask = ctx.saved_tensors
    # Through the dispatcher (register_autograd) arguments left at their
    # defaults are dropped, so needs_input_grad may be shorter than 4.
    nw, nu, nv = (tuple(ctx.needs_input_grad) + (False, False))[:3]
    gw, gu, gv = vjp(grad, w, u, mask, nw, nu, nv)
    return gw, gu, gv, None


def _dcs_backward_setup_context(ctx, inputs, output):
    grad, w, u, mask, w_needed, u_needed, v_needed = inputs
    ctx.save_for_backward(grad, w, u, mask)
    ctx.save_for_forward(grad, w, u, mask)
    ctx.flags = (w_needed, u_needed, v_needed)
    if isinstance(output, tuple):  # only on the autograd.Function path
        ctx.mark_non_differentiable(*[o for o, f in zip(output, ctx.flags) if not f])


def _dcs_backward_backward_rule(ctx, ggw, ggu, ggv):
    # outputs: gw = m*u*g, gu = m*w*g, gv = (1-m)*g
    grad, w, u, mask = ctx.saved_tensors
    w_needed, u_needed, v_needed = ctx.flags
    ggw = ggw if w_needed else None
    ggu = ggu if u_needed else None
    ggv = ggv if v_needed else None
    need_g, need_w, need_u = ctx.needs_input_grad[:3]
    d_grad = jvp(w, u, mask, ggw, ggu, ggv) if need_g else None
    # d/dw of <ggu, m*w*g> = m*g*ggu, d/du of <ggw, m*u*g> = m*g*ggw
    d_w, d_u, _ = vjp(grad, ggw, ggu, mask, need_w, need_u, False)
    return d_grad, d_w, d_u, None, None, None, None


def _dcs_jvp_setup_context(ctx, inputs, output):
    w, u, mask, w_dot, u_dot, v_dot = inputs
    ctx.save_for_backward(w, u, mask, w_dot, u_dot, v_dot)
    ctx.save_for_forward(w, u, mask, w_dot, u_dot, v_dot)


def _dcs_jvp_backward_rule(ctx, g):
    # out = (1-m)*v_dot + m*(w_dot*u + w*u_dot)
    w, u, mask, w_dot, u_dot, v_dot = ctx.saved_tensors
    n_w, n_u, _, n_wd, n_ud, n_vd = ctx.needs_input_grad
    # d/dw = m*u_dot*g, d/du = m*w_dot*g, d/dv_dot = (1-m)*g
    d_w, d_u, d_vd = vjp(g, w_dot, u_dot, mask, n_w, n_u, n_vd and v_dot is not None)
    # d/dw_dot = m*u*g, d/du_dot = m*w*g
    d_wd, d_ud, _ = vjp(g, w, u, mask, n_wd and w_dot is not None, n_ud and u_dot is not None, False)
    return d_w, d_u, None, d_wd, d_ud, d_vd


# ------------------------------------------------------ autograd.Functions
class DCSFunction(torch.autograd.Function):
    """theta = (1-m)*v + m*w*u over ``torch.ops.symfast.dcs``."""

    @staticmethod
    def forward(w, u, v, mask):
        return _lib_ops.dcs(w, u, v, mask)

    setup_context = staticmethod(_dcs_setup_context)
    backward = staticmethod(_dcs_backward_rule)

    @staticmethod
    def jvp(ctx, w_dot, u_dot, v_dot, mask_dot):
        w, u, mask = ctx.saved_tensors
        out = jvp(w, u, mask, w_dot, u_dot, v_dot)
        return torch.zeros_like(w, memory_format=torch.contiguous_format) if out is None else out

    @staticmethod
    def vmap(info, in_dims, w, u, v, mask):
        wd, ud, vd, md = in_dims
        b = batch_size((w, u, v, mask), in_dims)
        out = DCSFunction.apply(
            to_front(w, wd, b), to_front(u, ud, b), to_front(v, vd, b),
            mask_to_front(mask, md, w, wd),
        )
        return out, 0


class DCSBackwardFunction(torch.autograd.Function):
    """(m*u*g, m*w*g, (1-m)*g) over ``torch.ops.symfast.dcs_backward``."""

    @staticmethod
    def forward(grad, w, u, mask, w_needed, u_needed, v_needed):
        return _lib_ops.dcs_backward(grad, w, u, mask, w_needed, u_needed, v_needed)

    setup_context = staticmethod(_dcs_backward_setup_context)
    backward = staticmethod(_dcs_backward_backward_rule)

    @staticmethod
    def jvp(ctx, g_dot, w_dot, u_dot, *_):
        # gw = m*u*g -> m*(u_dot*g + u*g_dot); gu likewise; gv = (1-m)*g_dot
        grad, w, u, mask = ctx.saved_tensors
        nw, nu, nv = ctx.flags
        a = vjp(g_dot, w, u, mask, nw, nu, nv) if g_dot is not None else (None, None, None)
        b = vjp(grad, w_dot, u_dot, mask, nw, nu, False)
        outs = []
        for needed, x, y in zip((nw, nu, nv), a, b):
            t = add_optional(x, y) if needed else None
            if needed and t is None:
                t = torch.zeros_like(w, memory_format=torch.contiguous_format)
            outs.append(t)
        return tuple(outs)

    @staticmethod
    def vmap(info, in_dims, grad, w, u, mask, w_needed, u_needed, v_needed):
        gd, wd, ud, md = in_dims[:4]
        b = batch_size((grad, w, u, mask), in_dims[:4])
        outs = DCSBackwardFunction.apply(
            to_front(grad, gd, b), to_front(w, wd, b), to_front(u, ud, b),
            mask_to_front(mask, md, w, wd), w_needed, u_needed, v_needed,
        )
        return outs, tuple(0 if f else None for f in (w_needed, u_needed, v_needed))


class DCSJvpFunction(torch.autograd.Function):
    """(1-m)*v_dot + m*(w_dot*u + w*u_dot) over ``torch.ops.symfast.dcs_jvp``."""

    @staticmethod
    def forward(w, u, mask, w_dot, u_dot, v_dot):
        return _lib_ops.dcs_jvp(w, u, mask, w_dot, u_dot, v_dot)

    setup_context = staticmethod(_dcs_jvp_setup_context)
    backward = staticmethod(_dcs_jvp_backward_rule)

    @staticmethod
    def jvp(ctx, w_t, u_t, mask_t, wd_t, ud_t, vd_t):
        # The op is bilinear in (w_dot, u) and (w, u_dot) and linear in v_dot:
        # d out = J(w, u; wd_t, ud_t, vd_t) + m*(w_dot*u_t + w_t*u_dot)
        w, u, mask, w_dot, u_dot, v_dot = ctx.saved_tensors
        first = jvp(w, u, mask, wd_t, ud_t, vd_t if v_dot is not None else None)
        second = jvp(w_dot, u_dot, mask, w_t, u_t, None)
        out = add_optional(first, second)
        return torch.zeros_like(w, memory_format=torch.contiguous_format) if out is None else out

    @staticmethod
    def vmap(info, in_dims, w, u, mask, w_dot, u_dot, v_dot):
        wd, ud, md, wdd, udd, vdd = in_dims
        args = (w, u, mask, w_dot, u_dot, v_dot)
        b = batch_size(args, in_dims)
        out = DCSJvpFunction.apply(
            to_front(w, wd, b), to_front(u, ud, b), mask_to_front(mask, md, w, wd),
            to_front(w_dot, wdd, b), to_front(u_dot, udd, b),
            to_front(v_dot, vdd, b),
        )
        return out, 0


# ------------------------------------- autograd on the raw ops (dispatcher)
torch.library.register_autograd(
    "symfast::dcs", _dcs_backward_rule, setup_context=_dcs_setup_context
)
torch.library.register_autograd(
    "symfast::dcs_backward", _dcs_backward_backward_rule, setup_context=_dcs_backward_setup_context
)
torch.library.register_autograd(
    "symfast::dcs_jvp", _dcs_jvp_backward_rule, setup_context=_dcs_jvp_setup_context
)


# ------------------------------------------------------------- public API
def dcs(
    w: Tensor,
    u: Tensor,
    v: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
) -> Tensor:
    r"""Differentiable constraint by symmetry, paper eq. 10 with P = diag(mask).

    .. math:: \theta = (1 - m) \odot v + m \odot w \odot u

    Args:
        w, u: the factors, floating tensors of the same shape, dtype and device.
        v: the free (unconstrained) part; ``None`` means 0. Only meaningful with
            a mask: passing ``v`` with ``mask=None`` is an error.
        mask: bool (fast) or floating 0/1 tensor broadcastable to ``w``'s
            shape; ``None`` means all ones (``theta = w * u``, the Hadamard
            reparametrization). The mask is a constant: it gets no gradient.

    Gradients: d theta/dw = m*u, d theta/du = m*w, d theta/dv = 1 - m. Works
    under autograd (any order), ``torch.compile(fullgraph=True)`` and
    ``torch.func`` (grad, jvp, vmap, hessian). With a mask, weight decay
    ``alpha*(|w|^2 + |u|^2)`` equals ``2*alpha*|m*theta|_1`` at its minimum.
    """
    check_dcs(w, u, v, mask)
    path = autograd_path()  # the table is in symfast.ops.autograd.autograd_path
    if path is AutogradPath.CPP_NODE:
        return _lib_ops._dcs_autograd(w, u, v, mask)
    if path is AutogradPath.FUNCTION:
        return DCSFunction.apply(w, u, v, mask)
    if path is AutogradPath.RAW_OP:
        return _lib_ops.dcs(w, u, v, mask)
    return reference.dcs(w, u, v, mask)
