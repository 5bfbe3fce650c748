"""symfast: structured constraints from symmetry, as fast PyTorch ops.

See README.md for the math. The fused ops are :func:`symfast.dcs` (coordinate
mask: lasso) and :func:`symfast.dcs_group` (group gates: group lasso); their
pure-PyTorch twins live in :mod:`symfast.reference`. Diagnostics live in
:mod:`symfast.symmetry` (mirrors, Theorem 4) and :mod:`symfast.metrics`
(collapse and plasticity).
"""

from . import collapse, curvature, metrics, monitor, nn, reference, remedies, symmetry
from .ops.cpu_cache import cpu_cache_info, empty_cpu_cache, set_cpu_cache_limit
from .ops.checks import DeviceMismatchError
from .ops.dcs import dcs
from .ops.dcs_group import dcs_group
from .ops import jet_pointwise as _jet_pointwise  # noqa: F401  (registers the jet ops' fake kernels and autograd)
from .collapse import (
    approx_critical_learning_rate,
    critical_learning_rate,
    critical_weight_decay,
    lyapunov_exponent,
    weight_decay_threshold,
)
from .conversion import ConversionReport, convert, param_groups, penalty
from .exporting import SparsityReport, export, sparsity_report
from .curvature import (
    UnsupportedOpError,
    functional_loss,
    per_sample_curvatures,
    per_sample_directional_derivatives,
    per_sample_grad_norms,
    per_sample_hvp,
)
from .monitor import CollapseMonitor
from .symmetry import Mirror, find_symmetries, stationary_report, verify
from .ops import jet_rows as _jet_rows  # noqa: F401  (registers the jet row ops' fake kernels and autograd)

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
    "curvature",
    "collapse",
    "per_sample_directional_derivatives",
    "per_sample_curvatures",
    "per_sample_grad_norms",
    "per_sample_hvp",
    "functional_loss",
    "UnsupportedOpError",
    "DeviceMismatchError",
    "lyapunov_exponent",
    "critical_learning_rate",
    "approx_critical_learning_rate",
    "critical_weight_decay",
    "weight_decay_threshold",
]
__version__ = "0.1.0"
