"""symfast: structured constraints from symmetry, as fast PyTorch ops.

See README.md for the math. The public op is :func:`symfast.dcs`; its
pure-PyTorch twin is :func:`symfast.reference.dcs`.
"""

from . import reference
from ._ops import dcs
from .cpu_cache import cpu_cache_info, empty_cpu_cache, set_cpu_cache_limit

__all__ = ["dcs", "reference", "cpu_cache_info", "set_cpu_cache_limit", "empty_cpu_cache"]
__version__ = "0.1.0"
