"""symfast.nn: drop-in DCS layers and the structures they are built on.

Layers (subclasses of the torch layers they replace; ``.weight`` is theta):
:class:`DCSLinear`, :class:`DCSConv1d`, :class:`DCSConv2d`, :class:`DCSConv3d`,
:class:`DCSEmbedding`; :class:`DCSConv1D` for transformers' ``Conv1D`` (loaded
on first use, so that importing symfast never imports transformers).
Structures (exact parametrizations with a weight-decay penalty):
:class:`Elementwise`, :class:`Group`, :class:`LowRank`, :class:`Mirror`;
:func:`permutation_mirror` builds O for merging units. :class:`SparseLinear`:
an inference-only Linear with a torch sparse weight
(``symfast.export(..., sparse_format=...)``).
"""

from .layers import DCSConv1d, DCSConv2d, DCSConv3d, DCSEmbedding, DCSLayer, DCSLinear
from .sparse import SPARSE_FORMATS, SparseLinear
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
    "SparseLinear",
    "SPARSE_FORMATS",
]


def __getattr__(name: str):
    # DCSConv1D subclasses transformers' Conv1D: importing it imports transformers,
    # an optional dependency that takes seconds to load, so it is loaded on first use.
    if name == "DCSConv1D":
        try:
            from .hf_conv1d import DCSConv1D
        except ImportError as exc:
            raise ImportError(f"symfast.nn.DCSConv1D is the twin of transformers' Conv1D and needs transformers "
                              f"(pip install transformers): {exc}") from exc
        return DCSConv1D
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
