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

Samples that interact
---------------------
Training-mode batch norm (batch statistics) makes each loss depend on the whole batch. The
engine's convention is then the one ``loss_fn`` states: sample i's loss is
``loss_fn(params, batch)[i]``, a function of the parameters with the statistics of the whole
batch, which the curvature API's whole-batch paths (Taylor mode, nested forward mode) honour. A
function mapped over the samples one at a time cannot (it would normalize each sample by its own
statistics, or fail on a batch of one), so :func:`map_samples` refuses batch norm that uses batch
statistics with a :class:`~symfast.curvature.checks.CoupledSamplesError` that names it, on the
vmap path and on the loop alike, before any result is formed.

Paths
-----
:func:`map_samples` maps a function over the samples with ``torch.func.vmap``. When vmap cannot
batch an op of the model (torch reports a missing batching rule, ``.item()``, data-dependent
control flow or an ``autograd.Function`` without a vmap rule), it loops over the samples instead:
the same exact result, B calls instead of one. The path taken is returned, and the change of path
is a :class:`PerSamplePathWarning`. :func:`hvp` is forward over reverse (``jvp`` of ``grad``);
for a model with an op that has no forward-mode rule it is reverse over reverse (``vjp`` of
``grad``: H is symmetric), again returned as its path and warned. Any other error propagates.

``autograd.Function``\ s
------------------------
torch.func's compositions are silently wrong through some custom ``autograd.Function``\ s
(checked on torch 2.13, float64, against closed forms):

* through one whose ``backward`` is ``@once_differentiable``, every second-order composition but
  forward over forward: the decorator runs the backward under ``no_grad``, so reverse over
  reverse (``vjp`` of ``grad``) returns 0 for the Function's part of the Hessian (plain autograd
  raises "trying to differentiate twice"; torch.func does not), and forward over reverse
  (``jvp`` of ``grad``) loses the part that flows through the Function's saved input (exact only
  when nothing upstream of the Function depends on the parameters);
* forward over forward (``jvp`` of ``jvp``) through any Function with a ``jvp`` staticmethod,
  ``@once_differentiable`` or not: the outer ``jvp`` does not differentiate the inner ``jvp``
  rule, so the Function's second derivative is dropped.

Forward over reverse (``jvp`` of ``grad``) and reverse over forward (``grad`` of ``jvp``) are
exact through a Function with a ``jvp`` and a differentiable backward. :func:`hvp` and
:func:`vjp_of_grad` therefore refuse, with an :class:`~symfast.curvature.checks.UnsupportedOpError`
naming the Function (:func:`refuse_once_differentiable`), a ``@once_differentiable`` backward on
the graph, and the curvature API routes forward over forward away from Functions (see
:func:`autograd_functions_of`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.func as tf
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from torch.overrides import TorchFunctionMode

from .checks import CoupledSamplesError, UnsupportedOpError

__all__ = ["Samples", "split_batch", "per_sample_losses", "single_sample_loss", "map_samples", "hvp",
           "vjp_of_grad", "autograd_functions", "autograd_functions_of", "function_names", "has_jvp",
           "is_once_differentiable", "refuse_once_differentiable", "watching_functions", "PerSamplePathWarning",
           "SamplesApart"]


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


class SamplesApart(TorchFunctionMode):
    """Refuses, naming the op, what couples the samples of a batch while a function runs on one
    sample at a time: batch norm with batch statistics (training mode, or no running statistics)."""

    def __init__(self, op: str, how: str):
        super().__init__()
        self.op = op
        self.how = how

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        spec = _BATCH_NORMS.get(func)
        if spec is not None:
            name, positions = spec
            mean, var, training = (kwargs.get(k, args[i] if len(args) > i else d) for k, i, d in positions)
            if training or mean is None or var is None:
                raise CoupledSamplesError(
                    f"{self.op}: {name} with batch statistics (training mode) couples the samples of a batch: "
                    f"sample i's loss is loss_fn(params, batch)[i], normalized by the whole batch's statistics, "
                    f"but {self.how} evaluates one sample at a time, which would normalize each sample by its own "
                    "statistics. Put the model in eval mode, or use the curvature API's whole-batch paths "
                    "(symfast.per_sample_directional_derivatives / per_sample_curvatures / per_sample_hvp, "
                    "method='fast' or 'forward', without batch_chunk_size)")
        return func(*args, **kwargs)


# batch norm entry points: (name, ((running_mean key, position, default), (running_var ...), (training ...)))
_BATCH_NORMS = {
    torch.nn.functional.batch_norm: ("F.batch_norm", (("running_mean", 1, None), ("running_var", 2, None),
                                                      ("training", 5, False))),
    torch.batch_norm: ("torch.batch_norm", (("running_mean", 3, None), ("running_var", 4, None),
                                            ("training", 5, False))),
    torch.native_batch_norm: ("torch.native_batch_norm", (("running_mean", 3, None), ("running_var", 4, None),
                                                          ("training", 5, False))),
}


def map_samples(op: str, fn: Callable, params: Any, samples: Samples,
                chunk_size: Optional[int] = None) -> Tuple[Any, str]:
    """``fn(params, *sample_leaves)`` for every sample, stacked along a leading ``B``; returns
    ``(result, path)`` with path ``"vmap"`` or ``"loop (vmap failed: <reason>)"``. Raises
    :class:`~symfast.curvature.checks.CoupledSamplesError` for a model whose samples are coupled
    by batch statistics (see the module doc)."""
    apart = SamplesApart(op, "a function mapped over the samples (vmap, or a loop)")
    try:
        with apart:
            return (tf.vmap(fn, in_dims=(None, *samples.dims), chunk_size=chunk_size)(params, *samples.leaves),
                    "vmap")
    except CoupledSamplesError:
        raise
    except (RuntimeError, NotImplementedError) as e:
        reason = _known_failure(e, _VMAP_UNSUPPORTED)
    warnings.warn(f"{op}: vmap cannot batch this model ({reason}); computing the {samples.size} samples one at a "
                  "time instead (exact, slower)", PerSamplePathWarning, stacklevel=3)
    with apart:
        outs = [fn(params, *samples.sample_leaves(i)) for i in range(samples.size)]
    flat, spec = tree_flatten(outs[0])
    stacked = [torch.stack([tree_flatten(o)[0][j] for o in outs]) for j in range(len(flat))]
    return tree_unflatten(stacked, spec), f"loop (vmap failed: {reason})"


def hvp(f: Callable, params: Any, v: Any, op: str = "hvp") -> Tuple[Any, str]:
    """Exact Hessian-vector product ``H v`` of the scalar ``f`` at ``params``; returns ``(Hv, path)``
    with path ``"jvp(grad)"`` (forward over reverse) or ``"vjp(grad)"`` (reverse over reverse, for
    a model with an op that has no forward-mode rule). Both refuse a model with a
    ``@once_differentiable`` Function (see the module doc) instead of returning a wrong number."""
    watched, found = watching_functions(f)
    try:
        hv = tf.jvp(tf.grad(watched), (params,), (v,))[1]
    except (RuntimeError, NotImplementedError) as e:
        reason = _known_failure(e, _NO_FORWARD_RULE)
    else:
        refuse_once_differentiable(op, found, "forward-over-reverse Hessian-vector products")
        return hv, "jvp(grad)"
    _, vjp_fn = vjp_of_grad(f, params, op, why=f"forward over reverse failed ({reason})")
    warnings.warn(f"{op}: an op of this model has no forward-mode rule ({reason}); Hessian-vector products run "
                  "reverse over reverse instead (exact)", PerSamplePathWarning, stacklevel=3)
    return vjp_fn(v)[0], "vjp(grad)"


def vjp_of_grad(f: Callable, params: Any, op: str = "hvp", why: str = "") -> Tuple[Any, Callable]:
    """``torch.func.vjp(torch.func.grad(f), params)``: the gradient and its pullback, whose
    value at ``v`` is ``H v`` (reverse over reverse, H symmetric), checked to be exact.

    The autograd graph of ``f`` under ``grad`` is walked once (the forward pass this linearization
    runs anyway); a ``@once_differentiable`` Function on it would make every ``H v`` silently miss
    that Function's part, so it raises :class:`~symfast.curvature.checks.UnsupportedOpError`
    naming the Function(s) before any product is formed. ``why``: the caller's reason for this path.
    """
    watched, found = watching_functions(f)
    g, vjp_fn = tf.vjp(tf.grad(watched), params)
    refuse_once_differentiable(op, found, "reverse-over-reverse Hessian-vector products" +
                               (f" ({why})" if why else ""))
    return g, vjp_fn


def watching_functions(f: Callable) -> Tuple[Callable, List[type]]:
    """``f`` that also records the autograd.Functions on its output's graph (works inside
    torch.func's grad, whose graph is a real one), and the list they go to."""
    found: List[type] = []

    def watched(*args):
        out = f(*args)
        if isinstance(out, Tensor):
            found.extend(autograd_functions(out))
        return out

    return watched, found


def refuse_once_differentiable(op: str, found: Sequence[type], what: str) -> None:
    """Raises :class:`~symfast.curvature.checks.UnsupportedOpError` naming the ``@once_differentiable``
    Functions among ``found``: ``what`` (a second-order path) cannot differentiate their backward."""
    once = list(dict.fromkeys(c for c in found if is_once_differentiable(c)))  # each once, in the order met
    if once:
        raise UnsupportedOpError(
            f"{op}: {what} cannot differentiate {function_names(once)}: its backward is marked "
            "@once_differentiable, so torch runs it under no_grad, and a second derivative through it would be "
            "silently wrong (reverse over reverse returns 0 for its part, forward over reverse loses the part "
            "through its input). To fix: drop the decorator (write the backward in differentiable torch ops)")


# =================================================== autograd.Functions on a graph
# once_differentiable wraps every backward in the same inner function: its code object marks one.
_ONCE_DIFFERENTIABLE_CODE = once_differentiable(lambda ctx: None).__code__
_FUNCTION_JVP = torch.autograd.Function.jvp


def _user_function(cls: type) -> type:
    """The user's Function behind a node class: under torch.func's grad/vjp, a node's class is a
    per-level ``<Name>Generated`` wrapper whose backward closes over the user's class."""
    fn = cls.__dict__.get("backward")
    fn = getattr(fn, "__func__", fn)
    code = getattr(fn, "__code__", None)
    if code is not None and "autograd_function" in code.co_freevars and fn.__closure__:
        inner = fn.__closure__[code.co_freevars.index("autograd_function")].cell_contents
        if isinstance(inner, type):
            return inner
    return cls


def autograd_functions(out: Tensor) -> List[type]:
    """The ``autograd.Function`` classes on ``out``'s autograd graph (each once, in the order met),
    resolved to the user's classes. Works inside torch.func's grad/vjp (their graph is a real one)."""
    found: List[type] = []
    seen = set()
    todo = [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        cls = getattr(node, "_forward_cls", None)  # only Python Function nodes (BackwardCFunction) have it
        if cls is not None:
            cls = _user_function(cls)
            if cls not in found:
                found.append(cls)
        todo.extend(nxt for nxt, _ in node.next_functions)
    return found


def _drop(_x: Any) -> None:
    return None


def autograd_functions_of(f: Callable[[Any], Tensor], params: Dict[str, Tensor]) -> List[type]:
    """The Functions that ``f(params)`` runs on a path from ``params``, by one forward pass that
    records the autograd graph (never run backward).

    Outside torch.func transforms the graph keeps none of its tensors (fresh leaves, saved tensors
    dropped). Inside one, where fresh leaves that require grad cannot be made, the pass runs under
    ``torch.func.vjp`` (whose graph is walked the same way; it holds the activations until it
    returns).
    """
    if torch._C._are_functorch_transforms_active():
        watched, found = watching_functions(f)
        tf.vjp(watched, params)
        return found
    leaves = {k: p.detach().requires_grad_(True) for k, p in params.items()}
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_drop, _drop):
        out = f(leaves)
    return autograd_functions(out) if isinstance(out, Tensor) else []


def is_once_differentiable(cls: type) -> bool:
    """Whether the Function's backward is wrapped by ``@once_differentiable``."""
    fn = getattr(cls, "backward", None)
    return getattr(fn, "__code__", None) is _ONCE_DIFFERENTIABLE_CODE


def has_jvp(cls: type) -> bool:
    """Whether the Function defines a forward-mode rule (a ``jvp`` staticmethod of its own)."""
    return getattr(cls, "jvp", _FUNCTION_JVP) is not _FUNCTION_JVP


def function_names(classes: Sequence[type]) -> str:
    """``autograd.Function 'A'`` / ``autograd.Functions 'A', 'B'``, for messages."""
    names = ", ".join(repr(getattr(c, "__qualname__", c.__name__)) for c in classes)
    return f"autograd.Function{'s' if len(classes) > 1 else ''} {names}"
