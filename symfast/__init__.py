"""symfast: structured constraints from symmetry, as fast PyTorch ops.

See README.md for the math. The fused ops are :func:`symfast.dcs` (coordinate
mask: lasso) and :func:`symfast.dcs_group` (group gates: group lasso); their
pure-PyTorch twins live in :mod:`symfast.reference`. Diagnostics live in
:mod:`symfast.symmetry` (mirrors, Theorem 4) and :mod:`symfast.metrics`
(collapse and plasticity).
"""

from . import metrics, nn, reference, symmetry
from ._ops import dcs
from ._ops_group import dcs_group
from .convert import ConversionReport, SparsityReport, convert, export, param_groups, penalty, sparsity_report
from .cpu_cache import cpu_cache_info, empty_cpu_cache, set_cpu_cache_limit
from .metrics import CollapseMonitor
from .symmetry import Mirror, find_symmetries, stationary_report, verify

__all__ = [
    "dcs",
    "dcs_group",
    "reference",
    "cpu_cache_info",
    "set_cpu_cache_limit",
    "empty_cpu_cache",
    "symmetry",
    "metrics",
    "Mirror",
    "find_symmetries",
    "stationary_report",
    "verify",
    "CollapseMonitor",
    "nn",
    "convert",
    "penalty",
    "param_groups",
    "export",
    "sparsity_report",
    "ConversionReport",
    "SparsityReport",
]
__version__ = "0.1.0"
