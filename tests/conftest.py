"""Shared test matrix: one list of devices and dtypes for every op test."""

import os

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


# hypothesis profiles for the property tests (tests/test_op_properties.py). "suite", the default, is
# what `make test` runs: a bounded number of examples, derandomized so that every run (and every
# host) draws the same cases and the suite stays deterministic. "thorough" draws many more, afresh on
# each run, and keeps failing examples in .hypothesis/ to replay them: SYMFAST_HYPOTHESIS_PROFILE=thorough.
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the property tests then fail at import, naming the missing package
    pass
else:
    _slow_ok = [HealthCheck.too_slow, HealthCheck.data_too_large]
    settings.register_profile("suite", max_examples=40, deadline=None, derandomize=True, database=None,
                              suppress_health_check=_slow_ok)
    settings.register_profile("thorough", max_examples=3000, deadline=None, suppress_health_check=_slow_ok)
    _profile = os.environ.get("SYMFAST_HYPOTHESIS_PROFILE", "suite")
    if _profile not in ("suite", "thorough"):
        raise ValueError(f"SYMFAST_HYPOTHESIS_PROFILE must be 'suite' or 'thorough', got {_profile!r}")
    settings.load_profile(_profile)


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of tiny models: as fast, and immune to the
    oversubscription of a busy shared machine (spinning threads can slow a run
    tenfold). Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------- multi-process
import contextlib
import time

import torch.distributed as dist
import torch.multiprocessing as mp


@contextlib.contextmanager
def gloo_group(rank, init_file, world_size):
    """A gloo process group for a test worker, left without teardown on success.

    Tearing down DDP/gloo state can deadlock in torch itself (seen on torch
    2.13 CPU: the Reducer's destructor, holding the GIL, joins a gloo worker
    thread that waits for the GIL). So a worker that finished its checks
    leaves through a barrier and os._exit(0), before any destructor runs; a
    worker that failed raises, and spawn_workers reports it.
    """
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    yield
    dist.barrier()
    os._exit(0)


def spawn_workers(fn, args, nprocs=2, timeout=180):
    """Runs fn(rank, *args) in nprocs processes; fails, never hangs, past timeout."""
    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=2):  # raises if a worker raised or died
            if time.monotonic() > deadline:
                pytest.fail(f"{nprocs} workers did not finish within {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
