"""Shared test matrix: one list of devices and dtypes for every op test."""

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# CUDA cases are always collected, so a machine without a GPU shows them as
# skipped rather than silently testing less.
ALL_DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]
FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def pytest_configure(config):
    torch.manual_seed(0)
