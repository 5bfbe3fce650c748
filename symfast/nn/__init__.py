"""symfast.nn: drop-in DCS layers and the structures they are built on.

Layers (subclasses of the torch layers they replace; ``.weight`` is theta):
:class:`DCSLinear`, :class:`DCSConv1d`, :class:`DCSConv2d`, :class:`DCSConv3d`,
:class:`DCSEmbedding`. Structures (exact parametrizations with a weight-decay
penalty): :class:`Elementwise`, :class:`Group`, :class:`LowRank`,
:class:`MirrorStructure`; :func:`permutation_basis` builds O for merging units.
"""

from .layers import DCSConv1d, DCSConv2d, DCSConv3d, DCSEmbedding, DCSLayer, DCSLinear
from .structures import STRUCTURES, Elementwise, Group, LowRank, MirrorStructure, Structure, permutation_basis

__all__ = [
    "DCSLinear",
    "DCSConv1d",
    "DCSConv2d",
    "DCSConv3d",
    "DCSEmbedding",
    "DCSLayer",
    "Structure",
    "Elementwise",
    "Group",
    "LowRank",
    "MirrorStructure",
    "permutation_basis",
    "STRUCTURES",
]

# Old names, kept for one release: symfast.nn.Mirror collided with symfast.Mirror (the O-mirror of
# symfast.symmetry), and nn.permutation_mirror (a Tensor) with symmetry.permutation_mirror (a Mirror).
_DEPRECATED = {"Mirror": "MirrorStructure", "permutation_mirror": "permutation_basis"}


def __getattr__(name: str):
    if name in _DEPRECATED:
        import warnings

        new = _DEPRECATED[name]
        warnings.warn(f"symfast.nn.{name} is deprecated; use symfast.nn.{new}", DeprecationWarning, stacklevel=2)
        return globals()[new]
    raise AttributeError(f"module 'symfast.nn' has no attribute {name!r}")
