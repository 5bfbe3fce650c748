"""Argument checks shared by the public wrappers and the fake kernels.

One place decides what a valid call is, so eager calls, ``torch.compile``
tracing (fake tensors) and the compiled kernels (which repeat these checks in
C++ for direct ``torch.ops.symfast.*`` calls) agree. Messages name the
argument, what was expected and what was received.
"""

from __future__ import annotations

from typing import Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def require_tensor(op: str, name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")


def check_primal(op: str, w: torch.Tensor) -> None:
    require_tensor(op, "w", w)
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: w must be float32, float64, float16 or bfloat16, got {w.dtype}")


def check_dtype_device(op: str, name: str, t: torch.Tensor, w: torch.Tensor) -> None:
    """``t`` must be a tensor with ``w``'s dtype and device."""
    require_tensor(op, name, t)
    if t.dtype != w.dtype:
        raise TypeError(f"{op}: {name} must have the dtype of w ({w.dtype}), got {t.dtype}")
    if t.device != w.device:
        raise ValueError(f"{op}: {name} must be on w's device ({w.device}), got {t.device}")


def broadcasts_to(shape, target) -> bool:
    """True when ``shape`` broadcasts to exactly ``target``.

    Compared size by size (no try/except around torch.broadcast_shapes, which
    Dynamo cannot trace: under torch.compile a bad mask gave torch's internal
    broadcast error instead of symfast's message)."""
    shape, target = tuple(shape), tuple(target)
    if len(shape) > len(target):
        return False
    return all(s == 1 or s == t for s, t in zip(reversed(shape), reversed(target)))


def check_like(op: str, name: str, t: Optional[torch.Tensor], w: torch.Tensor) -> None:
    """``t`` must match ``w`` in dtype, device and shape (no broadcasting)."""
    if t is None:
        return
    check_dtype_device(op, name, t, w)
    if t.shape != w.shape:
        raise ValueError(f"{op}: {name} must have w's shape {tuple(w.shape)}, got {tuple(t.shape)}")


def check_mask(op: str, mask: Optional[torch.Tensor], w: torch.Tensor) -> None:
    """A mask is bool or floating 0/1 and broadcasts to ``w``'s shape.

    Whether a floating mask holds only 0 and 1 depends on its values, so the
    kernels check that (it is not visible to a fake tensor).
    """
    if mask is None:
        return
    require_tensor(op, "mask", mask)
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{op}: mask must be a bool or floating 0/1 tensor, got {mask.dtype}")
    if mask.device != w.device:
        raise ValueError(f"{op}: mask must be on w's device ({w.device}), got {mask.device}")
    if not broadcasts_to(mask.shape, w.shape):
        raise ValueError(
            f"{op}: mask must broadcast to w's shape {tuple(w.shape)}, got {tuple(mask.shape)}"
        )
    if mask.requires_grad:
        raise ValueError(
            f"{op}: mask must not require grad: it is a fixed 0/1 projection and dcs is not "
            "differentiated with respect to it"
        )


def check_dcs(
    w: torch.Tensor,
    u: torch.Tensor,
    v: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    op: str = "symfast.dcs",
) -> None:
    check_primal(op, w)
    require_tensor(op, "u", u)
    check_like(op, "u", u, w)
    check_like(op, "v", v, w)
    if v is not None and mask is None:
        raise ValueError(
            f"{op}: v was given without a mask; with mask=None, theta = w * u and v would have "
            "no effect (pass mask=... or drop v)"
        )
    check_mask(op, mask, w)
