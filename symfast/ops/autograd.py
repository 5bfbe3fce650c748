"""Autograd glue shared by ``symfast.dcs`` and ``symfast.dcs_group``.

The vmap helpers put batched operands into the layout the ops expect; the
predicates say which autograd path a call takes (a C++ autograd node in plain
training, an ``autograd.Function`` under torch.func transforms and forward AD).
"""

from __future__ import annotations

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


# ------------------------------------------------------------- path choice
def first_order_only() -> bool:
    """True when nothing will differentiate through a backward formula.

    That is plain ``.backward()`` without ``create_graph`` (grad mode off), no
    forward-AD dual level open, and no torch.func transform active. Then the
    backward kernels are called directly, below autograd, skipping the nested
    autograd.Function (its Python overhead was about a third of the DCS cost
    of a small MLP's training step).
    """
    return (
        not torch.is_grad_enabled()
        and torch.autograd.forward_ad._current_level < 0
        and not torch._C._are_functorch_transforms_active()
    )


def transforms_active() -> bool:
    """A torch.func transform or a forward-mode AD level is active (also while Dynamo traces)."""
    return torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0


def plain_autograd() -> bool:
    """True when no torch.func transform and no forward-mode AD level is active.

    Then ``symfast.dcs`` and ``symfast.dcs_group`` use the ops with a C++
    autograd node (``torch.ops.symfast._dcs_autograd``, ``csrc/autograd.cpp``):
    same values and gradients, to any order of reverse mode, with no Python in
    the forward or the backward of a training step. The autograd.Functions
    remain the path under torch.func and forward AD, which a C++ node does not
    support.
    """
    return not transforms_active()


def add_optional(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    if a is None:
        return b
    if b is None:
        return a
    return a + b
