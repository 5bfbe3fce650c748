"""symfast.nn: drop-in DCS layers and the structures they are built on.

Layers (subclasses of the torch layers they replace; ``.weight`` is theta):
:class:`DCSLinear`, :class:`DCSConv1d`, :class:`DCSConv2d`, :class:`DCSConv3d`,
:class:`DCSEmbedding`. Structures (exact parametrizations with a weight-decay
penalty): :class:`Elementwise`, :class:`Group`, :class:`LowRank`,
:class:`Mirror`; :func:`permutation_mirror` builds O for merging units.
"""

from .layers import DCSConv1d, DCSConv2d, DCSConv3d, DCSEmbedding, DCSLayer, DCSLinear
from .structures import STRUCTURES, Elementwise, Group, LowRank, Mirror, Structure, permutation_mirror

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
    "Mirror",
    "permutation_mirror",
    "STRUCTURES",
]
