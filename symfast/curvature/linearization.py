r"""One forward and backward of a batch, kept for a second differentiation.

From that one pass come the per-sample losses, the per-sample gradient norms
(:class:`~symfast.curvature.grad_norms.WatchedForward`'s closed forms) and the mean gradient; then,
for each direction :math:`v`, one more backward gives both the per-sample directional derivatives
:math:`\nabla \ell_i^\top v` and the mean loss's Hessian-vector product :math:`H v`.

Why both from one backward: the first backward is that of :math:`\sum_i u_i \ell_i` at
:math:`u = 1`, run with ``create_graph`` and with ``u`` a leaf that requires grad, so it returns
:math:`g(u, \theta) = J^\top u` (J the ``[B, D]`` Jacobian of the losses) as a differentiable
function of both. For :math:`s = g^\top v`, :math:`\partial s / \partial u = J v` (the B directional
derivatives) and :math:`\partial s / \partial \theta = (\sum_i \nabla^2 \ell_i) v`; a backward of
``s`` returns both at once (the "double-backward trick"). :func:`symfast.stationary_report` needs
exactly these for the k columns of a mirror's O, so a separate Taylor-mode pass for the
directional derivatives would repeat work the Hessian-vector products already do.

The derivatives are those of ``loss_fn(params, batch)[i]`` as a function of the parameters, the
engine's batch convention: samples coupled by the batch (batch statistics) stay coupled.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .grad_norms import GradNorms, WatchedForward, jacobian_rows
from .per_sample import Samples, _known_failure, autograd_functions, refuse_once_differentiable

__all__ = ["Linearization", "NoDoubleBackward"]

# What torch says when an op of the model has no double backward (a backward formula that is not
# itself differentiable, or an ``autograd.Function`` marked ``@once_differentiable``).
_NO_DOUBLE_BACKWARD = ("is not implemented", "double backward", "does not support higher order",
                       "once_differentiable")


class NoDoubleBackward(RuntimeError):
    """An op of the model cannot be differentiated twice in reverse mode; the message says which."""


class Linearization:
    """The per-sample losses of ``loss_fn(params, batch)`` and their gradient, with the graph kept.

    Attributes:
        losses: ``[B]`` per-sample losses (detached).
        samples: the batch split by the engine's batch convention.
        grad_norms: :class:`~symfast.curvature.grad_norms.GradNorms`, from the same backward.

    :meth:`directions` then costs one backward per direction. The graph lives as long as this
    object: drop it when done.
    """

    def __init__(self, op: str, loss_fn: Callable[[Any, Any], Tensor], params: Any, batch: Any, *,
                 chunk_size: Optional[int] = 64):
        self.op = op
        self._flat = isinstance(params, Tensor)
        fw = WatchedForward(op, loss_fn, params, batch)
        self.samples: Samples = fw.samples
        self.losses = fw.losses.detach()
        B = fw.samples.size
        self._leaves = fw.leaves
        self._diff = [n for n, v in fw.leaves.items() if v.requires_grad]
        self._u = torch.ones(B, dtype=fw.losses.dtype, device=fw.losses.device, requires_grad=True)
        inputs = [fw.leaves[n] for n in self._diff] + fw.outputs
        if B and fw.losses.requires_grad:
            grads = torch.autograd.grad(fw.losses, inputs, grad_outputs=self._u, create_graph=True,
                                        allow_unused=True)
        else:
            grads = [None] * len(inputs)
        # g = J^T u, the summed loss's gradient, differentiable in u and the parameters
        self._g: Dict[str, Optional[Tensor]] = dict(zip(self._diff, grads[:len(self._diff)]))
        # a @once_differentiable Function's backward, run with create_graph, returns its gradient
        # behind a DelayedError node whose input is a detached copy: a second backward never
        # reaches the parameters through it, so its part of H v and J v would be a silent zero
        self._functions = autograd_functions(fw.losses)
        self.grad_norms: GradNorms = fw.norms(grads[len(self._diff):] if fw.outputs else None,
                                              chunk_size=chunk_size, op=op)
        self._fw = fw

    @property
    def coupled(self) -> bool:
        """Did a layer's output rows fail to be the samples (batch statistics, say)? Then a
        sample evaluated alone may have another loss than ``loss_fn(params, batch)[i]``, and
        per-sample quantities must come from the batch's Jacobian (:meth:`jacobian_rows`)."""
        return self._fw.coupled

    def jacobian_rows(self, names: Sequence[str], chunk_size: Optional[int]):
        """Yields ``(start, {name: [c, *shape]})``: rows ``start:start + c`` of the batch's
        Jacobian, the per-sample gradients of ``names`` under the batch convention (zeros where
        the losses do not reach a parameter), ``chunk_size`` rows at a time from the kept graph."""
        names = ["theta"] if self._flat else list(names)
        leaves = [self._leaves[n] for n in names]
        for s, gs in jacobian_rows(self.op, self._fw.losses, leaves, chunk_size):
            c = min(self.samples.size - s, self.samples.size if chunk_size is None else chunk_size)
            yield s, {n: (g if g is not None else leaf.new_zeros(c, *leaf.shape))
                      for n, g, leaf in zip(names, gs, leaves)}

    def mean_grad(self, names: Optional[Sequence[str]] = None) -> Any:
        """The gradient of the mean loss, shaped like ``params``, or for a dict ``params`` only the
        parameters in ``names`` (a caller that needs a few of them skips a pass over the rest)."""
        B = self.samples.size
        keep = self._leaves if names is None or self._flat else names
        return self._shaped({n: (self._g[n].detach() / B if self._g.get(n) is not None and B else None)
                             for n in keep}, only=None if names is None or self._flat else names)

    def directions(self, vs: Sequence[Any]) -> Tuple[Tensor, List[Any]]:
        """``(J V, [H v for v in vs])``: ``[B, len(vs)]`` per-sample directional derivatives
        :math:`\\nabla \\ell_i^\\top v`, and the mean loss's Hessian-vector products, shaped like
        ``params``. Each ``v`` is shaped like ``params``; a dict may leave out parameters where it
        is zero. One backward per direction; raises :class:`NoDoubleBackward` when an op of the
        model has no double backward, and :class:`~symfast.curvature.checks.UnsupportedOpError`
        for an ``@once_differentiable`` Function (no exact second derivative exists through it)."""
        refuse_once_differentiable(self.op, self._functions, "reverse-over-reverse Hessian-vector products")
        B = self.samples.size
        jv = torch.zeros(B, len(vs), dtype=self.losses.dtype, device=self.losses.device)
        hvs: List[Any] = []
        inputs = [self._leaves[n] for n in self._diff] + [self._u]
        for j, v in enumerate(vs):
            v = {"theta": v} if self._flat else v
            terms = [(self._g[n] * v[n].to(self._g[n].dtype)).sum() for n in v
                     if self._g.get(n) is not None and self._g[n].requires_grad]
            if not terms:  # the direction touches no parameter the losses depend on
                hvs.append(self._shaped({}))
                continue
            try:
                out = torch.autograd.grad(sum(terms), inputs, retain_graph=True, allow_unused=True)
            except (RuntimeError, NotImplementedError) as e:
                raise NoDoubleBackward(f"{self.op}: {_known_failure(e, _NO_DOUBLE_BACKWARD)}") from e
            if out[-1] is not None:
                jv[:, j] = out[-1]
            hvs.append(self._shaped({n: (h / B if h is not None else None) for n, h in zip(self._diff, out)}))
        return jv, hvs

    def _shaped(self, parts: Mapping[str, Optional[Tensor]], only: Optional[Sequence[str]] = None) -> Any:
        """A dict (or the flat tensor) with zeros where ``parts`` has no value; with ``only``, just
        those parameters."""
        full = {n: (parts.get(n) if parts.get(n) is not None else torch.zeros_like(self._leaves[n]))
                for n in (self._leaves if only is None else only)}
        return full["theta"] if self._flat else full
