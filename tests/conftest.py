"""pytest hooks and fixtures shared by every test (the test matrix is in matrix.py)."""

import os

import pytest
import torch


def pytest_configure(config):
    torch.manual_seed(0)
    # Under pytest-xdist (`make test` runs one worker per core) each worker gets its share of the
    # cores, and so do the processes its tests start: more intra-op threads than that would
    # oversubscribe the machine. A thread count the user set is kept.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        share = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ["OMP_NUM_THREADS"] = str(share)
        torch.set_num_threads(share)


# hypothesis profiles for the property tests (tests/ops/test_op_properties.py). "suite", the default, is
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
