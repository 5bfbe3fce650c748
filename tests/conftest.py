"""pytest hooks and fixtures shared by every test (the test matrix is in matrix.py)."""

import pytest
import torch


def pytest_configure(config):
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of tiny models: as fast, and immune to the
    oversubscription of a busy shared machine (spinning threads can slow a run
    tenfold). Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
