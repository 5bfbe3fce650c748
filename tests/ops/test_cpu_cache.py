"""The CPU output cache hands a block only to one live tensor, and reuses it after."""

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


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_bad_limit_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="limit_bytes must be an int >= 0"):
        symfast.set_cpu_cache_limit(bad)


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
