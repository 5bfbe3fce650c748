"""pytest configuration of the symfast benchmarks (pytest-benchmark).

Run with ``pytest benchmarks`` (``tests/`` is the default test path, so the
benchmarks only run when named), or through ``python benchmarks/report.py``,
which also prints the ratio / bandwidth table and writes a JSON record. The
helpers live in ``bench_utils.py``.
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch

from bench_utils import cpu_snapshot, foreign_cpu_fraction, machine_description

# torch.compile(..., dynamic=False) specializes on shape and dtype and, for the
# training cases, on requires_grad: one graph per case. The default limit (8
# recompiles per code object) would make dynamo fall back to eager silently.
_dynamo_cfg = torch._dynamo.config
_limit_name = "recompile_limit" if hasattr(_dynamo_cfg, "recompile_limit") else "cache_size_limit"
setattr(_dynamo_cfg, _limit_name, max(getattr(_dynamo_cfg, _limit_name), 64))


_CPU_AT_START: Optional[dict] = None


def pytest_sessionstart(session):
    global _CPU_AT_START
    _CPU_AT_START = cpu_snapshot()


def pytest_benchmark_update_machine_info(config, machine_info):
    # Stored in the --benchmark-json file, which report.py reads: the record
    # names the machine the numbers came from, not the one that formats them.
    info = machine_description()
    # CPU other processes took during the run, as a share of the machine: on a
    # shared 2-core box a few percent already moves the medians.
    fraction = foreign_cpu_fraction(_CPU_AT_START, cpu_snapshot(), info["cores"])
    info["foreign_cpu_fraction"] = None if fraction is None else round(fraction, 4)
    machine_info["symfast"] = info


@pytest.fixture(scope="session")
def compiled_dcs():
    """torch.compile of the pure-PyTorch reference, one specialization per case."""
    from symfast import reference

    return torch.compile(reference.dcs, dynamic=False, fullgraph=True)
