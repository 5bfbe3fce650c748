"""Benchmarks of symfast.dcs_group: theta = w * s along one dim (group lasso gate).

A [4096, 4096] float32 weight (DRAM-bound) and a [256, 784] one (the first
layer of the training-step MLP, cache-resident, where per-call and per-loop
overheads show), forward + backward, grouped along dim 0 (one gate per row:
output units of a Linear weight) and dim 1 (one gate per column: input
features). The two dims stress different loops: along dim 0 the gate
gradient is one long dot product per row; along dim 1 it is a sum over rows,
column by column.

Every case runs four implementations in the same pytest-benchmark group, with
the conventions of ``test_dcs.py``:

* ``symfast``  - ``symfast.dcs_group`` (fused C++/CUDA kernels);
* ``eager``    - ``symfast.reference.dcs_group``, the pure-PyTorch twin, whose
  autograd computes grad_s as ``(g * w).sum(other dims)``;
* ``compiled`` - ``torch.compile(symfast.reference.dcs_group, dynamic=False)``,
  compiled and warmed up outside the timed region;
* ``copy``     - a device copy moving ``bytes_moved_group`` bytes: the
  bandwidth yard stick.

Each round times ``theta = dcs_group(w, s, dim); theta.backward(g)`` with a
fixed upstream gradient, producing w.grad and s.grad; grads are reset to None
between rounds, untimed.
"""

from __future__ import annotations

import pytest
import torch

from symfast import reference
from symfast.ops.dcs_group import dcs_group

from bench_utils import DEVICES, bytes_moved_group, run_copy, run_pedantic

SHAPES = [(4096, 4096), (256, 784)]
DTYPE = torch.float32
DIMS = [0, 1]
IMPLS = ["symfast", "eager", "compiled", "copy"]
OP = "forward+backward"


@pytest.fixture(scope="module")
def compiled_dcs_group():
    """torch.compile of the pure-PyTorch reference, one specialization per case."""
    return torch.compile(reference.dcs_group, dynamic=False, fullgraph=True)


def _inputs(shape, dim: int, device: str):
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(shape, requires_grad):
        t = torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=DTYPE)
        return t.requires_grad_(requires_grad)

    w = randn(shape, True)
    s = randn((shape[dim],), True)
    g = randn(shape, False)
    return w, s, g


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim", DIMS, ids=lambda d: f"dim{d}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_dcs_group(benchmark, shape, dim: int, device: str, impl: str, compiled_dcs_group):
    numel = shape[0] * shape[1]
    moved = bytes_moved_group(OP, numel, shape[dim], DTYPE)
    benchmark.group = f"dcs_group {OP} dim={dim} {shape[0]}x{shape[1]} float32 {device}"
    benchmark.extra_info.update(
        op=f"dcs_group {OP}", dim=dim, shape=list(shape), impl=impl, numel=numel, dtype="float32",
        device=device, bytes_moved=moved,
    )
    if device == "cuda":
        benchmark.extra_info["device_name"] = torch.cuda.get_device_name(0)

    if impl == "copy":
        run_copy(benchmark, moved, device)
        return

    fn = {"symfast": dcs_group, "eager": reference.dcs_group, "compiled": compiled_dcs_group}[impl]
    w, s, g = _inputs(shape, dim, device)

    def reset_grads():
        w.grad = None
        s.grad = None

    def forward_backward():
        theta = fn(w, s, dim)
        theta.backward(g)
        return theta  # freed by pytest-benchmark after the next round, untimed

    run_pedantic(benchmark, forward_backward, device, setup=reset_grads)
    # The case measured what it claims: both leaves got a fresh gradient.
    assert w.grad is not None and w.grad.shape == w.shape
    assert s.grad is not None and s.grad.shape == s.shape
