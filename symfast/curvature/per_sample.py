r"""The per-sample engine: how a batch splits into samples, and functions mapped over the samples.

Every per-sample computation of symfast goes through this module: the curvature API
(:mod:`symfast.curvature.api`), :func:`symfast.symmetry.stationary_report` and
:func:`symfast.symmetry.verify`, :func:`symfast.metrics.gradient_magnitude` and
:func:`symfast.collapse.weight_decay_threshold`.

Batch convention
----------------
``loss_fn(params, batch)`` returns the per-sample losses, a floating tensor of shape ``[B]``.
``batch`` is any pytree (a tensor, tuple, dict, ...). ``B`` is the leading dimension of its first
tensor leaf that has one, and ``loss_fn`` must return that many losses. Every tensor leaf whose
leading dimension is ``B`` is split per sample: sample ``i`` sees ``leaf[i:i + 1]``, so
``loss_fn`` is always called on a batch. Every other leaf (a shared table, a scalar tensor, a
non-tensor) is passed whole to every sample.

Paths
-----
:func:`map_samples` maps a function over the samples with ``torch.func.vmap``. When vmap cannot
batch an op of the model (torch reports a missing batching rule, ``.item()``, data-dependent
control flow or an ``autograd.Function`` without a vmap rule), it loops over the samples instead:
the same exact result, B calls instead of one. The path taken is returned, and the change of path
is a :class:`PerSamplePathWarning`. :func:`hvp` is forward over reverse (``jvp`` of ``grad``);
for a model with an op that has no forward-mode rule it is reverse over reverse (``vjp`` of
``grad``: H is symmetric), again returned as its path and warned. Any other error propagates.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.func as tf
from torch import Tensor
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

__all__ = ["Samples", "split_batch", "per_sample_losses", "single_sample_loss", "map_samples", "hvp",
           "PerSamplePathWarning"]


class PerSamplePathWarning(UserWarning):
    """The per-sample engine took its slower exact path (a loop over samples, or reverse over reverse)."""


@dataclass(frozen=True)
class Samples:
    """A batch split by the batch convention: its leaves, which of them are per sample, and ``B``."""

    leaves: List[Any]
    spec: TreeSpec
    dims: List[Optional[int]]  # 0 for a leaf split per sample, None for a shared leaf
    size: int

    def batch(self, leaves: Sequence[Any]) -> Any:
        """The batch pytree made of ``leaves`` (for example one sample's, or one chunk's)."""
        return tree_unflatten(list(leaves), self.spec)

    def sample_leaves(self, i: int) -> List[Any]:
        """Sample ``i``'s leaves without the batch dimension (as vmap passes them)."""
        return [leaf[i] if d == 0 else leaf for leaf, d in zip(self.leaves, self.dims)]

    def chunk(self, start: int, stop: int) -> "Samples":
        """Samples ``start:stop``."""
        leaves = [leaf[start:stop] if d == 0 else leaf for leaf, d in zip(self.leaves, self.dims)]
        return Samples(leaves, self.spec, self.dims, max(0, min(stop, self.size) - start))

    def chunks(self, chunk_size: Optional[int]) -> List["Samples"]:
        """Consecutive chunks of at most ``chunk_size`` samples (None: the whole batch)."""
        if chunk_size is None or chunk_size >= self.size:
            return [self]
        return [self.chunk(s, s + chunk_size) for s in range(0, self.size, chunk_size)]


def _leading_size(leaves: Sequence[Any]) -> Optional[int]:
    for leaf in leaves:
        if isinstance(leaf, Tensor) and leaf.dim() >= 1:
            return leaf.shape[0]
    return None


def split_batch(op: str, batch: Any, size: Optional[int] = None) -> Samples:
    """``batch`` split per sample (see the module doc); ``size`` overrides the inferred ``B``."""
    leaves, spec = tree_flatten(batch)
    B = _leading_size(leaves) if size is None else size
    if B is None:
        raise ValueError(f"{op}: batch must contain at least one tensor with a leading batch dimension, "
                         f"got {type(batch).__name__} with no such tensor")
    dims = [0 if isinstance(leaf, Tensor) and leaf.dim() >= 1 and leaf.shape[0] == B else None for leaf in leaves]
    return Samples(leaves, spec, dims, B)


def per_sample_losses(op: str, loss_fn: Callable, params: Any, batch: Any) -> Tuple[Tensor, Samples]:
    """Calls ``loss_fn(params, batch)`` once, checks that it returns ``[B]`` floating losses, and
    returns them with the batch split per sample."""
    if not callable(loss_fn):
        raise TypeError(f"{op}: loss_fn must be callable as loss_fn(params, batch), got {type(loss_fn).__name__}")
    leaves, _ = tree_flatten(batch)
    B_exp = _leading_size(leaves)
    out = loss_fn(params, batch)
    exp = f"[B] = [{B_exp}]" if B_exp is not None else "[B]"
    if not isinstance(out, Tensor):
        raise TypeError(f"{op}: loss_fn(params, batch) must return a tensor of per-sample losses of shape {exp}, "
                        f"got {type(out).__name__}")
    if out.dim() != 1:
        hint = (" (a scalar: compute the per-sample losses, e.g. reduction='none', instead of their mean)"
                if out.dim() == 0 else "")
        raise ValueError(f"{op}: loss_fn(params, batch) must return per-sample losses of shape {exp}, "
                         f"got shape {tuple(out.shape)}{hint}")
    if not out.is_floating_point():
        raise TypeError(f"{op}: loss_fn(params, batch) must return floating losses, got {out.dtype}")
    B = out.shape[0]
    if B_exp is not None and B != B_exp:
        raise ValueError(
            f"{op}: loss_fn(params, batch) must return one loss per sample, shape [B] = [{B_exp}] (the batch's leading "
            f"dim), got shape {tuple(out.shape)}"
        )
    samples = split_batch(op, batch, B)
    if not any(d == 0 for d in samples.dims):
        raise ValueError(f"{op}: loss_fn returned {B} losses but no tensor in batch has leading dimension {B}")
    return out, samples


def single_sample_loss(loss_fn: Callable, samples: Samples) -> Callable:
    """``f(params, *sample_leaves) -> scalar``: the loss of one sample, whose split leaves come
    without their batch dimension (as :func:`map_samples` passes them)."""
    def one(p, *leaves):
        leaves = [leaf.unsqueeze(0) if d == 0 else leaf for leaf, d in zip(leaves, samples.dims)]
        return loss_fn(p, samples.batch(leaves))[0]  # loss_fn returns [1] for one sample

    return one


# What torch says when vmap cannot batch a model: these, and only these, send map_samples to the loop.
_VMAP_UNSUPPORTED = ("vmap:", "Batching rule not implemented", "functorch transforms", "generate_vmap_rule",
                     "vmap staticmethod")
# What torch says when an op has no forward-mode rule: these send hvp to reverse over reverse.
_NO_FORWARD_RULE = ("forward AD", "forward-mode", "jvp")


def _known_failure(exc: BaseException, markers: Sequence[str]) -> str:
    """The first line of ``exc`` when its message is one of ``markers``; any other error propagates."""
    if not any(m in str(exc) for m in markers):
        raise exc
    return str(exc).splitlines()[0][:160]


def map_samples(op: str, fn: Callable, params: Any, samples: Samples,
                chunk_size: Optional[int] = None) -> Tuple[Any, str]:
    """``fn(params, *sample_leaves)`` for every sample, stacked along a leading ``B``; returns
    ``(result, path)`` with path ``"vmap"`` or ``"loop (vmap failed: <reason>)"``."""
    try:
        return tf.vmap(fn, in_dims=(None, *samples.dims), chunk_size=chunk_size)(params, *samples.leaves), "vmap"
    except (RuntimeError, NotImplementedError) as e:
        reason = _known_failure(e, _VMAP_UNSUPPORTED)
    warnings.warn(f"{op}: vmap cannot batch this model ({reason}); computing the {samples.size} samples one at a "
                  "time instead (exact, slower)", PerSamplePathWarning, stacklevel=3)
    outs = [fn(params, *samples.sample_leaves(i)) for i in range(samples.size)]
    flat, spec = tree_flatten(outs[0])
    stacked = [torch.stack([tree_flatten(o)[0][j] for o in outs]) for j in range(len(flat))]
    return tree_unflatten(stacked, spec), f"loop (vmap failed: {reason})"


def hvp(f: Callable, params: Any, v: Any, op: str = "hvp") -> Tuple[Any, str]:
    """Exact Hessian-vector product ``H v`` of the scalar ``f`` at ``params``; returns ``(Hv, path)``
    with path ``"jvp(grad)"`` (forward over reverse) or ``"vjp(grad)"`` (reverse over reverse, for
    a model with an op that has no forward-mode rule)."""
    try:
        return tf.jvp(tf.grad(f), (params,), (v,))[1], "jvp(grad)"
    except (RuntimeError, NotImplementedError) as e:
        reason = _known_failure(e, _NO_FORWARD_RULE)
    warnings.warn(f"{op}: an op of this model has no forward-mode rule ({reason}); Hessian-vector products run "
                  "reverse over reverse instead (exact)", PerSamplePathWarning, stacklevel=3)
    _, vjp_fn = tf.vjp(tf.grad(f), params)
    return vjp_fn(v)[0], "vjp(grad)"
