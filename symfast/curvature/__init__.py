r"""Per-sample directional derivatives, curvatures and Hessian-vector products.

For a per-sample loss :math:`\ell(\theta, x_i)` and directions :math:`n_k` in
parameter space, the engine computes, for every sample of a batch at once,

.. math::

    g_{ik} = n_k^\top \nabla_\theta \ell(\theta, x_i), \qquad
    h_{ik} = n_k^\top H(x_i)\, n_k, \qquad H(x_i) = \nabla^2_\theta \ell(\theta, x_i),

and the per-sample Hessian-vector products :math:`H(x_i) n` or their
projections :math:`m_k^\top H(x_i) n`. These are the quantities of the paper's
stability analysis: :math:`h_{ik}` along a symmetry direction is the
:math:`h(x)` of eqs. (8), (9), (14) and (16), see :mod:`symfast.collapse`.

Modules: :mod:`.api` (the functions below), :mod:`.checks` (argument checks and errors),
:mod:`.exact` (exact mode: decompositions of ops whose forward-mode rules are wrong), :mod:`.jets`
(second-order Taylor mode), :mod:`.jet_kernels` (its fused jet ops), :mod:`.replay` (the jet
program traced once per key and replayed), :mod:`.grad_norms` (per-sample gradient norms in one
forward and backward) and :mod:`.linearization` (one kept forward and backward, from which each
direction's per-sample derivatives and Hessian-vector product come in one more backward: what
:func:`symfast.stationary_report` needs for a mirror's columns).

Conventions
-----------
``loss_fn(params, batch)`` returns the per-sample losses, a tensor of shape
``[B]``. ``params`` is a dict of tensors. ``directions`` is a dict with the
same keys whose tensors have a leading ``K`` dimension (``K`` directions:
``directions[name][k]`` has the shape of ``params[name]``). A direction is used
as given: it is not normalized, so ``h`` scales with its squared norm.

What ``loss_fn`` computes under ``torch.no_grad()`` (a bootstrapped target, a
running estimate) is a constant on every path, as it is to autograd, and the
same as ``.detach()``: no derivative of any order flows through it, so ``h``
is the curvature of the loss with those results frozen at their value.
Forward mode ignores ``no_grad`` by itself; the engine enforces this (the
whole call runs with grad mode on, so only ``no_grad`` inside ``loss_fn``
counts).

How it is computed
------------------
*Fast path* (``method="fast"``, the default). The directions are shared by all
samples, so derivatives along one are derivatives of the whole ``[B]`` loss
vector with respect to one scalar: ``t -> loss_fn(params + t n, batch)``.
Second-order Taylor mode (:func:`~symfast.curvature.jets.jet_derivatives`) carries, for every
activation, its first and second derivatives along t for ``K`` directions at once (tangents of
shape ``[K, *x.shape]``) through one pass of the batch: :math:`g_{ik}` from the first-order part
(the only part computed for :func:`per_sample_directional_derivatives`), :math:`h_{ik}` from the
second. Ops bilinear in two operands (Linear, matmul, bmm, addmm, conv, mul, and attention, which
is run as its own ops) use the closed form :math:`y_2 = f(a_2, b) + 2 f(a_1, b_1) + f(a, b_2)`;
activations, norms, softmax, cross-entropy and symfast's own ``dcs``/``dcs_group`` the fused jet
ops of :mod:`~symfast.curvature.jet_kernels`; every other op a nested jvp of that op alone. Where
the jets cannot follow (in-place ops on activations, ``autograd.Function``\ s, custom ops without
a jet rule) the engine says so with a
:class:`~symfast.curvature.per_sample.PerSamplePathWarning` naming the op, and computes the call
with nested forward mode on the batch (jvp of jvp of ``t -> loss_fn(params + t n)``), which
``method="forward"`` selects explicitly. Nested forward mode is never used through an
``autograd.Function``: torch.func's jvp of jvp drops the second derivative of a Function's
``jvp`` rule, silently. A model that runs one (found by one forward pass that records the graph)
is computed forward over reverse per sample, the reference recipe below, with a
:class:`~symfast.curvature.per_sample.PerSamplePathWarning` naming it; a Function without a
``jvp`` is refused with an :class:`UnsupportedOpError` naming it, and so is, on every
second-order path, a Function whose backward is ``@once_differentiable``: torch.func returns 0
for its part of the Hessian in reverse over reverse and loses the part through its input in
forward over reverse, silently (see :mod:`.per_sample`). No tensor of per-sample parameter size is ever formed:
the tangents are K times parameter-sized, the activations K times batch-sized.
``chunk_size`` directions go through one pass (None: all of them); in forward mode
``chunk_size`` at a time run under ``torch.func.vmap`` (None: one at a time). The batch may also
be split (``batch_chunk_size``) when samples do not interact. For a ``loss_fn`` whose state the
engine can key (made by :func:`functional_loss`, or wrapped in
:func:`~symfast.curvature.replay.replayable`), the jet program is traced with ``make_fx`` once per
key and its graph replayed on later calls (see :mod:`.replay`: when, and when never). :math:`m^\top H(x_i) n` (mixed
second derivative) comes from a nested jvp with two tangents.

Full per-sample HVPs :math:`H(x_i) n` (``per_sample_hvp`` without ``onto``)
are per-sample parameter-sized by definition; they are computed per sample,
reverse over forward (``vmap`` over samples of ``grad`` of the jvp), in
chunks of ``batch_chunk_size`` samples.

*Reference path* (``method="reference"``): ``torch.func.vmap`` over samples of
``jvp(grad(per-sample loss))``, the textbook torch.func recipe. It costs about
200 forward+backward passes of the batch on an MLP (see benchmarks) and is
kept as the oracle the fast path is tested against.

Exactness
---------
PyTorch's own forward-mode rules are wrong or missing for some ops. Checked on
torch 2.13 (CPU, float64, against central finite differences and reverse-mode
double backward):

* jvp of jvp is **silently wrong** through ``layer_norm`` (with and without
  affine), training-mode ``batch_norm``, ``instance_norm``, ``linalg.det``,
  ``slogdet``/``logdet``, ``linalg.solve`` and ``cholesky_inverse``;
* ``scaled_dot_product_attention`` (so ``nn.MultiheadAttention`` with
  ``need_weights=False`` and ``nn.TransformerEncoderLayer``) has no forward-mode
  rule, nor double backward on CPU; ``huber_loss``, ``glu`` and
  ``hardsigmoid`` have no second-order forward rule;
* ``vmap(jvp(grad))`` fails on ``F.mse_loss(..., reduction="mean")``.

Both paths therefore run under :class:`~symfast.curvature.exact.ExactMode`, a ``TorchFunctionMode``
that replaces ``F.layer_norm``, ``F.batch_norm``, ``F.instance_norm``,
``F.scaled_dot_product_attention``, ``F.mse_loss``, ``F.huber_loss``,
``F.glu`` and ``F.hardsigmoid`` with decompositions into primitive ops whose
rules are right, routes ``F.multi_head_attention_forward`` through its explicit
(bmm/softmax) branch, and refuses, with an error naming the op, the ops above
that are silently wrong and have no decomposition here, random ops (dropout in
training mode: the per-sample loss is then not a function of the parameters),
and PyTorch's fused attention kernels. The mode also disables the fused
"fast paths" of ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``
(they check for torch-function overrides), so those modules take the
decomposable route. The reference path keeps PyTorch's own ``layer_norm``
(its forward-over-reverse rule is right), so the two paths stay independent
where they can.

Samples that interact: training-mode batch norm makes :math:`\ell_i` depend on
the whole batch. The convention is then the one ``loss_fn`` states, since it takes the batch:
:math:`\ell_i(\theta)` is ``loss_fn(params, batch)[i]`` with the whole batch's statistics. The
fast and forward paths (and ``per_sample_hvp``, whose full products then take one reverse pass
per sample of the whole batch) differentiate exactly that; the reference path,
``batch_chunk_size`` and every function mapped over the samples
(:func:`~symfast.curvature.per_sample.map_samples`: ``metrics.gradient_magnitude``, the
per-sample fallbacks of ``stationary_report``) would change it (each sample alone is normalized
by its own statistics), so they refuse with a :class:`UnsupportedOpError` naming the op. The decomposed batch norm
does not update running statistics: computing curvatures has no side effects.
"""

from .api import functional_loss, per_sample_curvatures, per_sample_directional_derivatives, per_sample_hvp
from .checks import UnsupportedOpError
from .grad_norms import GradNorms, per_sample_grad_norms

__all__ = [
    "per_sample_directional_derivatives",
    "per_sample_grad_norms",
    "GradNorms",
    "per_sample_curvatures",
    "per_sample_hvp",
    "functional_loss",
    "UnsupportedOpError",
]
