"""Benchmarks of symfast.dcs: theta = (1 - m) * v + m * w * u.

Every case runs four implementations in the same pytest-benchmark group:

* ``symfast``  - ``symfast.dcs`` (fused C++/CUDA kernels, autograd.Function);
* ``eager``    - ``symfast.reference.dcs``, the pure-PyTorch twin;
* ``compiled`` - ``torch.compile(symfast.reference.dcs, dynamic=False)``,
  compiled and warmed up outside the timed region;
* ``copy``     - ``dst.copy_(src)`` between preallocated, pre-touched buffers
  of ``bytes_moved / 2`` bytes each, so the copy moves (reads + writes) exactly
  the bytes a fused implementation of the case must move: the bandwidth yard
  stick. ``bytes_moved / median`` of symfast against that of the copy is the
  fraction of attainable bandwidth (see ``bench_utils.bytes_moved``).

Training cases time ``theta = dcs(w, u, v, mask); theta.backward(g)`` with a
fixed upstream gradient g, producing w.grad, u.grad and v.grad (w.grad and
u.grad for mask=None); grads are reset to None between rounds, untimed.

Sizes: 1M and 16M elements on every device; on CUDA also the GPU targets,
masked forward+backward at 64M and 256M elements in float32 and bfloat16
(``GPU_CASES``; ``python benchmarks/report.py -k "cuda and (64M or 256M)"``
runs exactly those). CUDA inputs are drawn on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import symfast
from symfast import reference

from bench_utils import CPU_SIZES, CUDA_ONLY_SIZES, DEVICES, DTYPES, SIZES, bytes_moved, run_copy, run_pedantic, sizes_for


@dataclass(frozen=True)
class Case:
    op: str  # "forward" or "forward+backward"
    masked: bool  # bool mask with v, or mask=None (Hadamard: theta = w * u)
    size: str  # key of SIZES
    dtype: str  # key of DTYPES

    @property
    def id(self) -> str:
        op = "fwd" if self.op == "forward" else "fwdbwd"
        return f"{op}-{'mask' if self.masked else 'nomask'}-{self.size}-{self.dtype}"


CASES = [
    Case(op, True, size, dtype)
    for op in ("forward", "forward+backward")
    for size in CPU_SIZES
    for dtype in DTYPES
] + [Case("forward+backward", False, "16M", "float32")]

# The GPU targets: masked forward+backward at 64M and 256M elements,
# float32 and bfloat16, >= 80 % of the copy bandwidth and >= 1.1x compiled.
# Only these cases use the GPU-sized SIZES, so that
#     python benchmarks/report.py -k "cuda and (64M or 256M)"
# selects exactly the target cases.
GPU_CASES = [Case("forward+backward", True, size, dtype) for size in CUDA_ONLY_SIZES for dtype in DTYPES]

# (case, device) pairs: every case on every device, the GPU-sized ones on CUDA
# only. The ids are "<case.id>-<device>", as before the GPU cases existed.
CASE_DEVICES = [
    pytest.param(case, device, id=f"{case.id}-{device}")
    for case in CASES + GPU_CASES
    for device in DEVICES
    if case.size in sizes_for(device)
]

IMPLS = ["symfast", "eager", "compiled", "copy"]


def _inputs(case: Case, device: str):
    numel, dtype = SIZES[case.size], DTYPES[case.dtype]
    # A weight-matrix shape; the kernels see one contiguous run either way.
    shape = (numel // 1024, 1024)
    train = case.op == "forward+backward"
    if device.startswith("cuda"):
        # Drawn on the GPU: drawing 256M elements five times on one CPU thread
        # would take longer than the benchmark. Different numbers from the
        # CPU's, the same distribution.
        gen = torch.Generator(device=device).manual_seed(0)

        def draw(fn, dt=torch.float32):
            return fn(shape, generator=gen, device=device, dtype=dt)
    else:
        gen = torch.Generator(device="cpu").manual_seed(0)

        def draw(fn, dt=torch.float32):
            return fn(shape, generator=gen, dtype=dt).to(device)

    def randn():
        return draw(torch.randn).to(dtype=dtype).requires_grad_(train)

    w, u = randn(), randn()
    v = randn() if case.masked else None
    # Half the entries constrained, at random: no branch predictor shortcut.
    mask = (draw(torch.rand) < 0.5) if case.masked else None
    g = draw(torch.randn).to(dtype=dtype)
    return w, u, v, mask, g


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case,device", CASE_DEVICES)
def test_dcs(benchmark, case: Case, device: str, impl: str, compiled_dcs):
    numel, dtype = SIZES[case.size], DTYPES[case.dtype]
    moved = bytes_moved(case.op, case.masked, numel, dtype)
    benchmark.group = f"dcs {case.op} mask={'bool' if case.masked else 'none'} n={case.size} {case.dtype} {device}"
    benchmark.extra_info.update(
        op=case.op,
        mask="bool" if case.masked else "none",
        impl=impl,
        numel=numel,
        dtype=case.dtype,
        device=device,
        bytes_moved=moved,
    )
    if device == "cuda":
        benchmark.extra_info["device_name"] = torch.cuda.get_device_name(0)

    if impl == "copy":
        run_copy(benchmark, moved, device)
        return

    fn = {"symfast": symfast.dcs, "eager": reference.dcs, "compiled": compiled_dcs}[impl]
    w, u, v, mask, g = _inputs(case, device)

    cache_before = _cpu_cache_info() if impl == "symfast" and device == "cpu" else None
    try:
        _run_dcs(benchmark, case, fn, w, u, v, mask, g, device)
    finally:
        if cache_before is not None:
            # symfast recycles large CPU output blocks (no first-touch page
            # faults in steady state); eager and compiled use torch's allocator.
            # Recorded so the table can be read with that in mind.
            after = _cpu_cache_info()
            benchmark.extra_info["symfast_cpu_cache"] = {
                "hits": after["hits"] - cache_before["hits"],
                "misses": after["misses"] - cache_before["misses"],
                "limit_bytes": after["limit_bytes"],
            }


def _cpu_cache_info():
    info = getattr(symfast, "cpu_cache_info", None)
    return None if info is None else info()


def _run_dcs(benchmark, case: Case, fn, w, u, v, mask, g, device: str) -> None:
    if case.op == "forward":
        run_pedantic(benchmark, lambda: fn(w, u, v, mask), device)
        return

    leaves = [t for t in (w, u, v) if t is not None]

    def reset_grads():
        for t in leaves:
            t.grad = None

    def forward_backward():
        theta = fn(w, u, v, mask)
        theta.backward(g)
        return theta  # freed by pytest-benchmark after the next round, untimed

    run_pedantic(benchmark, forward_backward, device, setup=reset_grads)
    # The case measured what it claims: every leaf got a fresh gradient.
    assert all(t.grad is not None and t.grad.shape == t.shape for t in leaves)
