"""Autograd glue shared by ``symfast.dcs`` and ``symfast.dcs_group``.

The vmap helpers put batched operands into the layout the ops expect; the
predicates say which autograd path a call takes (a C++ autograd node in plain
training, an ``autograd.Function`` under torch.func transforms and forward AD).
"""

from __future__ import annotations

import enum
from typing import Optional, Sequence

import torch

Tensor = torch.Tensor


# ------------------------------------------------------------------ vmap glue
def to_front(t: Optional[Tensor], bdim: Optional[int], batch: int) -> Optional[Tensor]:
    """Puts a vmapped operand into the layout the op expects: batch first.

    Operands that must have w's exact shape are expanded (a stride-0 view, no
    copy) when they are not batched. Masks only need to broadcast, so an
    unbatched mask is left alone and a batched one gets singleton dims between
    the batch dim and its own dims, to line up with w's dims.
    """
    if t is None:
        return None
    if bdim is None:
        return t.unsqueeze(0).expand(batch, *t.shape)
    return t.movedim(bdim, 0)


def mask_to_front(mask: Optional[Tensor], bdim: Optional[int], w: Tensor, w_bdim: Optional[int]) -> Optional[Tensor]:
    if mask is None or bdim is None:
        return mask
    mask = mask.movedim(bdim, 0)
    w_ndim = w.dim() - (w_bdim is not None)  # w's logical (per-sample) rank
    missing = w_ndim - (mask.dim() - 1)
    return mask.reshape(mask.shape[:1] + (1,) * missing + mask.shape[1:])


def batch_size(args: Sequence[Optional[Tensor]], in_dims: Sequence[Optional[int]]) -> int:
    for t, d in zip(args, in_dims):
        if t is not None and d is not None:
            return t.shape[d]
    raise AssertionError("vmap rule called with no batched input")


def add_optional(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    """a + b, where None stands for a zero tangent or gradient."""
    if a is None:
        return b
    if b is None:
        return a
    return a + b


# ------------------------------------------------------------- path choice
# Private torch APIs read here (present from torch 2.4 through 2.13). Each is looked up once and
# guarded: where one is missing, the answer that needs it falls back to the path that is correct
# in every context (the autograd.Function, or a nested Function in a backward formula).
_functorch_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", None)
_BelowAutograd = getattr(torch._C, "_AutoDispatchBelowAutograd", None)


def _forward_ad_level() -> Optional[int]:
    """The innermost open forward-AD level (-1: none), or None when this torch does not expose it."""
    level = getattr(torch.autograd.forward_ad, "_current_level", None)
    return level if isinstance(level, int) else None


def transforms_active() -> bool:
    """A torch.func transform or a forward-mode AD level is active (also while Dynamo traces).

    True as well when this torch lacks the private queries: then no context can be ruled out.
    """
    level = _forward_ad_level()
    if _functorch_transforms_active is None or level is None:
        return True
    return _functorch_transforms_active() or level >= 0


class AutogradPath(enum.Enum):
    CPP_NODE = "C++ autograd node"
    FUNCTION = "autograd.Function"
    RAW_OP = "raw op"
    REFERENCE = "reference formula"


def autograd_path() -> AutogradPath:
    """The path a call of ``symfast.dcs`` or ``symfast.dcs_group`` takes, from the calling context.

    ==========================  ===============================  =============================================
    context                     path                             why
    ==========================  ===============================  =============================================
    eager, no torch.func        ``CPP_NODE``: the op with a C++  no Python in the forward or backward of a
    transform, no forward AD    autograd node (``_dcs_autograd``, training step; any order of reverse mode
                                ``csrc/autograd.cpp``)
    eager, under a torch.func   ``FUNCTION``: the                a C++ node has no jvp or vmap rule; the
    transform or forward AD     ``torch.autograd.Function``      Function's ``jvp`` and ``vmap`` cover them
    torch.compile, no           ``RAW_OP``: ``torch.ops.symfast``  Dynamo cannot trace an autograd.Function
    transform                   op, autograd from                with a custom jvp; AOTAutograd traces the
                                ``register_autograd``            registered (same) formulas
    torch.compile under a       ``REFERENCE``: the formula of    the raw op has no forward-mode or functorch
    torch.func transform or     :mod:`symfast.reference`         rule; Dynamo and Inductor trace (and fuse)
    forward AD                                                   plain PyTorch
    ==========================  ===============================  =============================================

    Every path gives the same values and gradients (tested bitwise). Where this torch lacks a
    private query (see :func:`transforms_active`), eager calls take ``FUNCTION`` and compiled ones
    ``REFERENCE``, the paths that are correct in every context.
    """
    active = transforms_active()
    if torch.compiler.is_compiling():
        return AutogradPath.REFERENCE if active else AutogradPath.RAW_OP
    return AutogradPath.FUNCTION if active else AutogradPath.CPP_NODE


def first_order_only() -> bool:
    """True when nothing will differentiate through a backward formula, so that the formula may
    call the backward kernel directly, below autograd (inside :func:`below_autograd`).

    That is plain ``.backward()`` without ``create_graph`` (grad mode off), no forward-AD dual
    level open, and no torch.func transform active. Skipping the nested autograd.Function matters:
    its Python overhead is a large part of the DCS cost of a small model's training step. False
    where this torch lacks a private API it needs (then the nested Function runs: same result).
    """
    return not torch.is_grad_enabled() and _BelowAutograd is not None and not transforms_active()


def below_autograd():
    """Context in which ops dispatch below autograd (only where :func:`first_order_only` holds)."""
    return _BelowAutograd()
