"""Registration of the pointwise jet ops: argument checks, fake kernels, autograd, wrappers.

A second-order jet of x along K directions is (x, x1, x2), x1 and x2 of shape
[K, *x.shape]; the ops ``torch.ops.symfast.jet_activation``, ``jet_dcs`` and
``jet_dcs_group`` (schemas in ``csrc/ops.cpp``, kernels in
``csrc/{cpu,cuda}/jet_pointwise.*``) map it to (y, y1, y2) with
y1 = f'(x) x1 and y2 = f'(x) x2 + f''(x)[x1, x1] in one pass. They are the
building blocks of the curvature engine, which propagates jets through a
network instead of nesting forward-mode AD.

This module gives them:

* one argument check per op (``check_jet_*``), shared by the wrappers below and
  the fake kernels, so eager calls and ``torch.compile`` reject the same input
  with the same message as the C++ checks (``csrc/jet_pointwise_checks.h``);
* fake kernels (``register_fake``), so ``torch.compile(fullgraph=True)`` traces
  them;
* reverse-mode autograd (``register_autograd``) whose backward is the
  vector-Jacobian product of the pure-PyTorch twin in ``symfast.reference``,
  taken with ``torch.func.vjp``: plain differentiable torch code, so gradients
  of any order (gradcheck, gradgradcheck) come out right. Backward is not on
  the hot path of the engine, which only runs the ops forward.

Importing ``symfast`` imports this module; the ops are reached as
``torch.ops.symfast.jet_*`` or through the wrappers here.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

from .. import _C  # noqa: F401  (loads the library: registers torch.ops.symfast.*)
from .. import reference
from .checks import FLOAT_DTYPES, DeviceMismatchError, check_mask, require_tensor

Tensor = torch.Tensor
Jet = Tuple[Tensor, Tensor, Tensor]
_lib_ops = torch.ops.symfast

ACTIVATION_KINDS = reference.ACTIVATION_KINDS


# -------------------------------------------------------------------- checks
def _tuple_str(shape: Sequence[int]) -> str:
    """Sizes as Python prints a tuple: "(3, 4)", "(5,)", "()"; as the C++ tuple_str."""
    shape = tuple(int(s) for s in shape)
    return str(shape)


def _jet_shape_str(shape: Sequence[int]) -> str:
    """The shape of a tangent of a primal of this shape: "(K, 3, 4)", "(K,)"."""
    return "(K" + "".join(f", {int(s)}" for s in shape) + ("," if len(shape) == 0 else "") + ")"


def _check_jet_primal(op: str, name: str, p: Tensor) -> None:
    require_tensor(op, name, p)
    if p.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float64, float16 or bfloat16, got {p.dtype}")


def _check_operand(op: str, name: str, t: Tensor, pname: str, p: Tensor) -> None:
    require_tensor(op, name, t)
    if t.dtype != p.dtype:
        raise TypeError(f"{op}: {name} must have the dtype of {pname} ({p.dtype}), got {t.dtype}")
    if t.device != p.device:
        raise DeviceMismatchError(f"{op}: {name} must be on {pname}'s device ({p.device}), got {t.device}")


class _Directions:
    """The number of directions K and the tangent that fixed it."""

    def __init__(self) -> None:
        self.k: Optional[int] = None
        self.source: Optional[str] = None

    def see(self, op: str, name: str, t: Tensor) -> None:
        if self.k is None:
            self.k, self.source = t.shape[0], name
        elif t.shape[0] != self.k:
            raise ValueError(
                f"{op}: {name} must have K = {self.k} directions like {self.source}, got shape {_tuple_str(t.shape)}"
            )

    def require(self, op: str, names: str) -> int:
        if self.k is None:
            raise ValueError(f"{op}: at least one of {names} must be given (a tangent fixes the number of directions K)")
        return self.k


def _check_tangents(op: str, pname: str, p: Tensor, tangents: Dict[str, Optional[Tensor]], dirs: _Directions) -> None:
    """Tangents of one primal: [K, *p.shape], p's dtype and device."""
    for name, t in tangents.items():
        if t is None:
            continue
        _check_operand(op, name, t, pname, p)
        if t.dim() != p.dim() + 1 or tuple(t.shape[1:]) != tuple(p.shape):
            raise ValueError(
                f"{op}: {name} must have shape (K, *{pname}.shape) = {_jet_shape_str(p.shape)}, got {_tuple_str(t.shape)}"
            )
        dirs.see(op, name, t)


def check_jet_activation(
    x: Tensor, x1: Optional[Tensor], x2: Optional[Tensor], kind: str, beta: float = 1.0
) -> int:
    """The checks of jet_activation; returns K."""
    op = "symfast.jet_activation"
    if kind not in ACTIVATION_KINDS:
        raise ValueError(f"{op}: kind must be one of {', '.join(ACTIVATION_KINDS)}, got {kind!r}")
    if kind == "softplus" and beta == 0:
        raise ValueError(f"{op}: beta must be nonzero for softplus (it divides), got {beta}")
    _check_jet_primal(op, "x", x)
    dirs = _Directions()
    _check_tangents(op, "x", x, {"x1": x1, "x2": x2}, dirs)
    return dirs.require(op, "x1, x2")


def check_jet_dcs(
    w: Tensor,
    u: Tensor,
    v: Optional[Tensor],
    mask: Optional[Tensor],
    w1: Optional[Tensor],
    u1: Optional[Tensor],
    v1: Optional[Tensor],
    w2: Optional[Tensor],
    u2: Optional[Tensor],
    v2: Optional[Tensor],
) -> int:
    """The checks of jet_dcs; returns K."""
    op = "symfast.jet_dcs"
    _check_jet_primal(op, "w", w)
    for name, t in (("u", u), ("v", v)):
        if t is None and name == "v":
            continue
        _check_operand(op, name, t, "w", w)
        if t.shape != w.shape:
            raise ValueError(f"{op}: {name} must have w's shape {_tuple_str(w.shape)}, got {_tuple_str(t.shape)}")
    if v is not None and mask is None:
        raise ValueError(
            f"{op}: v was given without a mask; with mask=None, theta = w * u and v would have no effect"
        )
    dirs = _Directions()
    _check_tangents(op, "w", w, {"w1": w1, "u1": u1, "v1": v1, "w2": w2, "u2": u2, "v2": v2}, dirs)
    k = dirs.require(op, "w1, u1, v1, w2, u2, v2")
    if (v1 is not None or v2 is not None) and mask is None:
        raise ValueError(f"{op}: v1/v2 were given without a mask; with mask=None dcs has no v input")
    check_mask(op, mask, w)
    return k


def check_jet_dcs_group(
    w: Tensor,
    s: Tensor,
    dim: int,
    w1: Optional[Tensor],
    s1: Optional[Tensor],
    w2: Optional[Tensor],
    s2: Optional[Tensor],
) -> int:
    """The checks of jet_dcs_group; returns K."""
    op = "symfast.jet_dcs_group"
    _check_jet_primal(op, "w", w)
    nd = w.dim()
    if nd < 1:
        raise ValueError(f"{op}: w must have at least one dimension (groups run along dim), got a 0-d tensor")
    if not -nd <= dim < nd:
        raise IndexError(
            f"{op}: dim must be in the range [{-nd}, {nd - 1}] for w with {nd} dimension{'' if nd == 1 else 's'}, got {dim}"
        )
    G = w.shape[dim]
    _check_operand(op, "s", s, "w", w)
    if s.dim() != 1 or s.shape[0] != G:
        raise ValueError(f"{op}: s must have shape (G,) = (w.shape[dim],) = ({G},), got {_tuple_str(s.shape)}")
    dirs = _Directions()
    _check_tangents(op, "w", w, {"w1": w1, "w2": w2}, dirs)
    for name, t in (("s1", s1), ("s2", s2)):
        if t is None:
            continue
        _check_operand(op, name, t, "w", w)
        if t.dim() != 2 or t.shape[1] != G:
            raise ValueError(f"{op}: {name} must have shape (K, G) = (K, w.shape[dim]) = (K, {G}), got {_tuple_str(t.shape)}")
        dirs.see(op, name, t)
    return dirs.require(op, "w1, s1, w2, s2")


# -------------------------------------------------------------- fake kernels
def _empty_jet(p: Tensor, k: int, second: bool) -> Jet:
    """y, y1 and y2, or with second=False an empty (0,) y2 (first order only)."""
    y = torch.empty_like(p, memory_format=torch.contiguous_format)
    return y, p.new_empty((k,) + tuple(p.shape)), p.new_empty((k,) + tuple(p.shape) if second else (0,))


@torch.library.register_fake("symfast::jet_activation")
def _jet_activation_fake(x, x1, x2, kind, beta=1.0, threshold=20.0, second=True):
    return _empty_jet(x, check_jet_activation(x, x1, x2, kind, beta), second)


@torch.library.register_fake("symfast::jet_dcs")
def _jet_dcs_fake(w, u, v, mask, w1, u1, v1, w2, u2, v2, second=True):
    return _empty_jet(w, check_jet_dcs(w, u, v, mask, w1, u1, v1, w2, u2, v2), second)


@torch.library.register_fake("symfast::jet_dcs_group")
def _jet_dcs_group_fake(w, s, dim, w1, s1, w2, s2, second=True):
    return _empty_jet(w, check_jet_dcs_group(w, s, dim, w1, s1, w2, s2), second)


# ------------------------------------------------------------------ autograd
# Each op's backward is torch.func.vjp of its reference twin with respect to
# the floating tensor inputs that are present (a mask is a constant). The
# twin is plain torch code, so the backward is itself differentiable.
def _register_vjp_of_reference(name: str, twin, differentiable: Sequence[int]) -> None:
    """register_autograd for op ``name``: the positions in ``differentiable``
    are the float tensor arguments; every other argument is passed through."""

    def setup_context(ctx, inputs, output):
        ctx.inputs = tuple(inputs)
        ctx.save_for_backward(*[inputs[i] for i in differentiable])

    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        present = [i for i, t in zip(differentiable, saved) if t is not None]
        if not present:
            return (None,) * len(ctx.inputs)
        by_position = dict(zip(differentiable, saved))

        def f(*tensors):
            args = list(ctx.inputs)
            for i in differentiable:
                args[i] = by_position[i]
            for i, t in zip(present, tensors):
                args[i] = t
            return twin(*args)

        _, vjp_fn = torch.func.vjp(f, *[by_position[i] for i in present])
        grads_in = vjp_fn(tuple(grads))
        out = [None] * len(ctx.inputs)
        for i, g in zip(present, grads_in):
            out[i] = g
        return tuple(out)

    torch.library.register_autograd(f"symfast::{name}", backward, setup_context=setup_context)


_register_vjp_of_reference("jet_activation", reference.jet_activation, (0, 1, 2))
_register_vjp_of_reference("jet_dcs", reference.jet_dcs, (0, 1, 2, 4, 5, 6, 7, 8, 9))
_register_vjp_of_reference("jet_dcs_group", reference.jet_dcs_group, (0, 1, 3, 4, 5, 6))


# ------------------------------------------------------------------ wrappers
def jet_activation(
    x: Tensor,
    x1: Optional[Tensor],
    x2: Optional[Tensor],
    kind: str,
    beta: float = 1.0,
    threshold: float = 20.0,
    *,
    second: bool = True,
) -> Jet:
    """Jet of an activation: y = f(x), y1 = f'(x) x1, y2 = f'(x) x2 + f''(x) x1^2.

    Args:
        x: the primal, any shape S, float32/64, float16 or bfloat16.
        x1, x2: first and second tangents, [K, *S], x's dtype and device, or
            None (zero); at least one is given.
        kind: "gelu" (exact, erf), "gelu_tanh", "silu", "tanh", "sigmoid",
            "relu" (f'(0) = 0) or "softplus".
        beta, threshold: softplus's, as in torch.nn.functional.softplus
            (linear where beta * x > threshold); ignored by the other kinds.

        second: False computes the first-order jet only (y2 comes back empty,
            shape (0,)); the same keyword on every jet op.

    Returns (y, y1, y2), contiguous, y of shape S and y1, y2 of shape [K, *S].
    """
    check_jet_activation(x, x1, x2, kind, beta)
    return _lib_ops.jet_activation(x, x1, x2, kind, beta, threshold, second)


def jet_dcs(
    w: Tensor,
    u: Tensor,
    v: Optional[Tensor],
    mask: Optional[Tensor],
    w1: Optional[Tensor],
    u1: Optional[Tensor],
    v1: Optional[Tensor],
    w2: Optional[Tensor],
    u2: Optional[Tensor],
    v2: Optional[Tensor],
    *,
    second: bool = True,
) -> Jet:
    """Jet of :func:`symfast.dcs` (theta = m ? w u : v):
    y1 = m ? w1 u + w u1 : v1,  y2 = m ? w2 u + 2 w1 u1 + w u2 : v2.

    w, u, v, mask as for symfast.dcs (v, v1, v2 only with a mask); the tangents
    are [K, *w.shape] or None (zero), at least one given.
    """
    check_jet_dcs(w, u, v, mask, w1, u1, v1, w2, u2, v2)
    return _lib_ops.jet_dcs(w, u, v, mask, w1, u1, v1, w2, u2, v2, second)


def jet_dcs_group(
    w: Tensor,
    s: Tensor,
    dim: int,
    w1: Optional[Tensor],
    s1: Optional[Tensor],
    w2: Optional[Tensor],
    s2: Optional[Tensor],
    *,
    second: bool = True,
) -> Jet:
    """Jet of :func:`symfast.dcs_group` (theta = w * s broadcast along dim):
    y1 = w1 s + w s1,  y2 = w2 s + 2 w1 s1 + w s2.

    w1, w2 are [K, *w.shape] and s1, s2 are [K, w.shape[dim]], or None (zero),
    at least one given.
    """
    check_jet_dcs_group(w, s, dim, w1, s1, w2, s2)
    return _lib_ops.jet_dcs_group(w, s, dim, w1, s1, w2, s2, second)
