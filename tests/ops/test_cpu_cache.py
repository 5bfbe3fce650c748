"""The CPU output cache hands a block only to one live tensor, and reuses it after."""

import os
import subprocess
import sys

import pytest
import torch

import symfast

N = 1 << 19  # 2 MiB of float32: above the 1 MiB caching threshold


@pytest.fixture
def fresh_cache():
    old = symfast.cpu_cache_info()["limit_bytes"]
    symfast.empty_cpu_cache()
    yield
    symfast.set_cpu_cache_limit(old)


def test_live_outputs_never_share_memory_and_freed_blocks_are_reused(fresh_cache):
    symfast.set_cpu_cache_limit(1 << 30)
    w, u = torch.randn(N), torch.randn(N)
    a = symfast.dcs(w, u)
    b = symfast.dcs(u, u)
    assert a.data_ptr() != b.data_ptr()
    ptr_a = a.data_ptr()
    del a
    info = symfast.cpu_cache_info()
    assert info["cached_blocks"] == 1 and info["cached_bytes"] >= N * 4
    hits = info["hits"]
    c = symfast.dcs(w, w)  # same size: gets the released block back
    assert c.data_ptr() == ptr_a
    assert symfast.cpu_cache_info()["hits"] == hits + 1
    torch.testing.assert_close(c, w * w, atol=0, rtol=0)
    torch.testing.assert_close(b, u * u, atol=0, rtol=0)


def test_limit_zero_disables_caching(fresh_cache):
    symfast.set_cpu_cache_limit(0)
    out = symfast.dcs(torch.randn(N), torch.randn(N))
    del out
    assert symfast.cpu_cache_info()["cached_bytes"] == 0


def test_small_outputs_bypass_the_cache(fresh_cache):
    symfast.set_cpu_cache_limit(1 << 30)
    out = symfast.dcs(torch.randn(1000), torch.randn(1000))
    del out
    assert symfast.cpu_cache_info()["cached_blocks"] == 0


def test_outputs_work_as_gradients_and_survive_training_steps(fresh_cache):
    symfast.set_cpu_cache_limit(1 << 30)
    w, u = torch.randn(N, requires_grad=True), torch.randn(N, requires_grad=True)
    for _ in range(3):
        w.grad = u.grad = None
        symfast.dcs(w, u).sum().backward()
        torch.testing.assert_close(w.grad, u.detach(), atol=0, rtol=0)
        torch.testing.assert_close(u.grad, w.detach(), atol=0, rtol=0)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1", 2**63, 2**80])
def test_bad_limit_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=r"limit_bytes must be an int in \[0, 2\*\*63 - 1\], got "):
        symfast.set_cpu_cache_limit(bad)


def test_largest_limit_is_accepted(fresh_cache):
    symfast.set_cpu_cache_limit(2**63 - 1)
    assert symfast.cpu_cache_info()["limit_bytes"] == 2**63 - 1


MAX_ENV_MB = (2**63 - 1) >> 20  # the largest limit in MiB whose byte count fits an int64


def _cache_limit_in_subprocess(env_value):
    """Runs a fresh interpreter with SYMFAST_CPU_CACHE_MB=env_value (the variable is read
    once per process) and returns it, after it printed the cache's limit or failed."""
    code = "import symfast; print(symfast.cpu_cache_info()['limit_bytes'])"
    env = {**os.environ, "SYMFAST_CPU_CACHE_MB": env_value}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("value", [str(MAX_ENV_MB + 1), "9000000000000", "99999999999999999999999"])
def test_out_of_range_env_limit_is_a_clear_error(value):
    proc = _cache_limit_in_subprocess(value)
    assert proc.returncode != 0, f"SYMFAST_CPU_CACHE_MB={value} was accepted: {proc.stdout}"
    assert (f"SYMFAST_CPU_CACHE_MB must be an integer number of MiB in [0, {MAX_ENV_MB}], "
            f"got '{value}'") in proc.stderr, proc.stderr


def test_largest_env_limit_is_accepted():
    proc = _cache_limit_in_subprocess(str(MAX_ENV_MB))
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.split()[-1]) == MAX_ENV_MB << 20


def test_cached_outputs_are_resizable():
    """Outputs from the block cache have a resizable storage, like at::empty's: code that
    resizes a tensor or frees its storage with resize_(0) (FSDP-style) works on them."""
    w = torch.randn(512, 1024, requires_grad=True)  # 2 MiB: from the cache
    u = torch.randn(512, 1024)
    theta = symfast.dcs(w, u)
    theta.backward(torch.ones_like(theta))
    for t in (theta.detach(), w.grad):
        t.resize_(600, 1024)
        assert t.shape == (600, 1024)
        t.untyped_storage().resize_(0)
        assert t.untyped_storage().nbytes() == 0
