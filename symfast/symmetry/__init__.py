r"""Mirror symmetries of a loss, their stationary conditions, and their discovery in models.

The paper's Definition 2: a loss :math:`\ell_0(\theta, x)` has the *O-mirror symmetry* when

.. math:: \ell_0(\theta, x) = \ell_0(R\theta, x), \qquad R = I - 2OO^\top, \quad O^\top O = I,

for every sample :math:`x`. Theorem 4 then says, for the loss with weight decay
:math:`\ell_\gamma = \ell_0 + \gamma\|\theta\|^2`:

1. if :math:`O^\top\theta = 0` then :math:`O^\top\nabla_\theta\ell_\gamma(\theta, x) = 0` for every
   :math:`x`: the *stationary condition* :math:`O^\top\theta = 0` is never left by GD or SGD;
2. at such a point the Hessian has no block between :math:`\ker O^\top` and :math:`\operatorname{im} O`:
   :math:`m^\top H n = 0` for :math:`m \in \ker O^\top`, :math:`n \in \operatorname{im} O`, so a set of
   its eigenvectors spans :math:`\operatorname{im} O`.

This package provides

* :class:`Mirror` (:mod:`.mirror`), the object ``O`` (dense, from orthonormal columns or a projection, or sparse,
  from the constructors below), acting on flat parameter vectors and on dicts of parameter
  tensors;
* one constructor per symmetry of §2-3 (:mod:`.constructors`) (the corollaries of Theorem 4):
  :func:`rescaling_mirror` (Theorem 1), :func:`permutation_mirror` (eq. 5, Theorem 3),
  :func:`rotation_mirror` and :func:`double_rotation_mirror` (Theorem 2 and the double rotation),
  the hidden-unit conveniences :func:`unit_permutation_mirror` and :func:`unit_sign_mirror`, and
  :func:`dcs_mirrors` (:mod:`.dcs_probe`) for modules whose weight is a DCS factorization;
* :func:`verify` (:mod:`.verification`), a numerical check of :math:`\ell(\theta, x) = \ell(R\theta, x)`;
* :func:`find_symmetries` (:mod:`.discovery`), which proposes the mirrors of a model from its structure and reports
  only those that pass a numerical check, together with every check it made;
* :func:`stationary_report` (:mod:`.stationary`), the numbers of Theorem 4 at a given point, computed exactly with
  ``torch.func``.

**Flattening order.** A dict of parameters is flattened by concatenating ``p.reshape(-1)`` in the
dict's insertion order (for a module: ``model.named_parameters()`` order), see :func:`flatten`.
A mirror built from a dict or a module remembers that layout: a flat vector given to it must
follow the same order. When a dict is given, tensors are found by name, so the dict's own order
does not matter, and entries the mirror does not know are passed through unchanged (the mirror
acts as the identity on them). :mod:`.layout` holds the layout.

**Per-sample losses.** ``loss_fn(params, batch)`` returns the per-sample losses, shape ``[B]``.
``batch`` is any pytree (tensor, tuple, dict); every tensor in it whose leading dimension is ``B``
is split per sample, other leaves are shared by all samples.
"""

from .constructors import (
    double_rotation_mirror,
    permutation_mirror,
    rescaling_mirror,
    rotation_mirror,
    unit_permutation_mirror,
    unit_sign_mirror,
)
from .dcs_probe import ModuleMirror, dcs_mirrors
from .discovery import SymmetryCheck, SymmetryFinding, SymmetryReport, find_symmetries
from .layout import ParamLayout, flatten, unflatten
from .mirror import Mirror
from .stationary import StationaryReport, stationary_report
from .verification import Verification, verify

__all__ = [
    "Mirror",
    "ParamLayout",
    "flatten",
    "unflatten",
    "rescaling_mirror",
    "permutation_mirror",
    "rotation_mirror",
    "double_rotation_mirror",
    "unit_permutation_mirror",
    "unit_sign_mirror",
    "dcs_mirrors",
    "ModuleMirror",
    "verify",
    "Verification",
    "find_symmetries",
    "SymmetryReport",
    "SymmetryFinding",
    "SymmetryCheck",
    "stationary_report",
    "StationaryReport",
]
