"""The shared test matrix: the devices and dtypes every parametrized test draws from.

Device policy: a test over devices takes :data:`DEVICES`. CUDA cases are always collected and skip
cleanly without a GPU, so a machine without one shows them as skipped rather than silently testing
less, and a machine with one runs them.
"""

import pytest
import torch

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]
FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
