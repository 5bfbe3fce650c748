r"""Per-sample losses, gradients and Hessian-vector products with ``torch.func``.

``loss_fn(params, batch)`` returns the per-sample losses, shape ``[B]``. ``batch`` is any pytree
(tensor, tuple, dict); every tensor in it whose leading dimension is ``B`` is split per sample,
other leaves are shared by all samples.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.func as tf
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from .layout import Params


def batch_leaves(batch: Any):
    leaves, spec = tree_flatten(batch)
    return leaves, spec


def _expected_batch_size(leaves: Sequence[Any]) -> Optional[int]:
    for leaf in leaves:
        if isinstance(leaf, Tensor) and leaf.dim() >= 1:
            return leaf.shape[0]
    return None


def check_per_sample(op: str, loss_fn: Callable, params: Params, batch: Any) -> Tuple[Tensor, List[Optional[int]]]:
    """Calls loss_fn once, checks it returns [B], and returns (losses, in_dims of the batch leaves)."""
    if not callable(loss_fn):
        raise TypeError(f"{op}: loss_fn must be callable as loss_fn(params, batch), got {type(loss_fn).__name__}")
    leaves, _ = batch_leaves(batch)
    B_exp = _expected_batch_size(leaves)
    out = loss_fn(params, batch)
    exp = f"[B] = [{B_exp}]" if B_exp is not None else "[B]"
    if not isinstance(out, Tensor):
        raise TypeError(f"{op}: loss_fn(params, batch) must return a tensor of per-sample losses of shape {exp}, got {type(out).__name__}")
    if out.dim() != 1:
        hint = " (a scalar: compute the per-sample losses, e.g. reduction='none', instead of their mean)" if out.dim() == 0 else ""
        raise ValueError(f"{op}: loss_fn(params, batch) must return per-sample losses of shape {exp}, got shape {tuple(out.shape)}{hint}")
    if not out.is_floating_point():
        raise TypeError(f"{op}: loss_fn(params, batch) must return floating losses, got {out.dtype}")
    B = out.shape[0]
    dims = [0 if isinstance(l, Tensor) and l.dim() >= 1 and l.shape[0] == B else None for l in leaves]
    if B_exp is not None and B != B_exp:
        raise ValueError(
            f"{op}: loss_fn(params, batch) must return one loss per sample, shape [B] = [{B_exp}] (the batch's leading "
            f"dim), got shape {tuple(out.shape)}"
        )
    if not any(d == 0 for d in dims):
        raise ValueError(f"{op}: loss_fn returned {B} losses but no tensor in batch has leading dimension {B}")
    return out, dims


def single_sample_fn(loss_fn: Callable, spec, dims: Sequence[Optional[int]]) -> Callable:
    def one(p, *leaves):
        leaves = [l.unsqueeze(0) if d == 0 else l for l, d in zip(leaves, dims)]
        out = loss_fn(p, tree_unflatten(list(leaves), spec))
        return out.reshape(-1)[0]

    return one


def per_sample_map(fn: Callable, params: Params, batch: Any, dims: Sequence[Optional[int]], B: int,
                chunk_size: Optional[int]) -> Tuple[Any, str]:
    """vmap of fn(params, *sample_leaves) over the samples, with an exact per-sample loop as fallback
    for ops that have no batching rule. Returns (result with leading B, method used)."""
    leaves, _ = batch_leaves(batch)
    try:
        return tf.vmap(fn, in_dims=(None, *dims), chunk_size=chunk_size)(params, *leaves), "vmap"
    except (RuntimeError, NotImplementedError) as e:
        reason = str(e).splitlines()[0][:160]
    outs = [fn(params, *[l[i] if d == 0 else l for l, d in zip(leaves, dims)]) for i in range(B)]
    flat, spec = tree_flatten(outs[0])
    stacked = [torch.stack([tree_flatten(o)[0][j] for o in outs]) for j in range(len(flat))]
    return tree_unflatten(stacked, spec), f"loop (vmap failed: {reason})"


def hvp(f: Callable, params: Params, v: Params) -> Tuple[Params, str]:
    """Exact Hessian-vector product: forward-over-reverse (jvp of grad), or reverse-over-reverse
    (vjp of grad; H is symmetric) for ops without a forward-mode rule."""
    try:
        return tf.jvp(tf.grad(f), (params,), (v,))[1], "jvp(grad)"
    except (RuntimeError, NotImplementedError):
        _, vjp_fn = tf.vjp(tf.grad(f), params)
        return vjp_fn(v)[0], "vjp(grad)"


def tree_dot(a: Params, b: Params) -> Tensor:
    if isinstance(a, Tensor):
        return (a * b).sum()
    return sum((a[k] * b[k]).sum() for k in a)


def tree_norm(a: Params) -> Tensor:
    return tree_dot(a, a).sqrt()


def tree_scale(a: Params, s) -> Params:
    if isinstance(a, Tensor):
        return a * s
    return {k: v * s for k, v in a.items()}


def tree_randn_like(params: Params, g: torch.Generator) -> Params:
    if isinstance(params, Tensor):
        return torch.randn(params.shape, generator=g, dtype=torch.float64).to(params)
    return {k: torch.randn(v.shape, generator=g, dtype=torch.float64).to(v) for k, v in params.items()}


def flat_values(params: Params) -> Tensor:
    return params.reshape(-1) if isinstance(params, Tensor) else torch.cat([v.reshape(-1) for v in params.values()])
