"""pytest configuration of the symfast benchmarks (pytest-benchmark).

Run with ``pytest benchmarks`` (``tests/`` is the default test path, so the
benchmarks only run when named), or through ``python benchmarks/report.py``,
which also prints the ratio / bandwidth table and writes a JSON record. The
helpers live in ``bench_utils.py``.
"""

from __future__ import annotations

import os
from typing import Optional

import pytest
import torch

from bench_utils import machine_description

# torch.compile(..., dynamic=False) specializes on shape and dtype and, for the
# training cases, on requires_grad: one graph per case. The default limit (8
# recompiles per code object) would make dynamo fall back to eager silently.
_dynamo_cfg = torch._dynamo.config
_limit_name = "recompile_limit" if hasattr(_dynamo_cfg, "recompile_limit") else "cache_size_limit"
setattr(_dynamo_cfg, _limit_name, max(getattr(_dynamo_cfg, _limit_name), 64))


_LOAD_AT_START: Optional[tuple] = None


def pytest_sessionstart(session):
    global _LOAD_AT_START
    if hasattr(os, "getloadavg"):
        _LOAD_AT_START = os.getloadavg()


def pytest_benchmark_update_machine_info(config, machine_info):
    # Stored in the --benchmark-json file, which report.py reads: the record
    # names the machine the numbers came from, not the one that formats them.
    info = machine_description()
    # Load averages bracket the run: a busy box (other jobs on 2 cores) shows here.
    info["loadavg_start"] = _LOAD_AT_START
    info["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    machine_info["symfast"] = info


@pytest.fixture(scope="session")
def compiled_dcs():
    """torch.compile of the pure-PyTorch reference, one specialization per case."""
    from symfast import reference

    return torch.compile(reference.dcs, dynamic=False, fullgraph=True)
