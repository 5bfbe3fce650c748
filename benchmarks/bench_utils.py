"""Helpers shared by the benchmark modules and report.py: sizes, the byte
counts a fused kernel must move, the timing loop, the machine description.

Timing rules, common to every implementation (see ``run_pedantic``):

* ``benchmark.pedantic`` with one call per round. A ``setup`` outside the timed
  region resets ``.grad`` to None (so backward never pays for accumulation) and
  synchronizes the device.
* The timed function returns its output. pytest-benchmark holds a round's result
  until the next round has been timed, so freeing outputs (an ``munmap`` for
  large CPU tensors) is never timed; *allocating* them is, as in real use.
* Rounds are calibrated per benchmark from two untimed warm-up calls (which also
  trigger ``torch.compile``): about ``TARGET_SECONDS`` of timed work, at least
  ``MIN_ROUNDS`` rounds. Read medians: they resist the noise of a shared box.
* On CUDA the timed function ends with ``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Callable, Optional

import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# 1M: fits in a large last-level cache on some CPUs; 16M (64 MB per float32
# operand): memory bound everywhere. GPU-sized cases (64M, 256M) come later.
SIZES = {"1M": 1 << 20, "16M": 1 << 24}

TARGET_SECONDS = 0.6
MIN_ROUNDS = 5
MAX_ROUNDS = 200
WARMUP_CALLS = 2


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bytes_moved(op: str, masked: bool, numel: int, dtype: torch.dtype) -> int:
    """Minimal DRAM traffic of a fused implementation, in bytes.

    s = element size, n = numel, the bool mask is 1 byte per element (a
    full-shape mask; a broadcast mask would cost less).

    forward, mask + v      read w, u, v, mask; write theta:        n * (4s + 1)
    forward, mask=None     read w, u; write theta:                 n * 3s
    backward, mask + v     read g, w, u, mask; write gw, gu, gv:   n * (6s + 1)
    backward, mask=None    read g, w, u; write gw, gu:             n * 5s
    forward+backward       the sum of the two (the fused backward re-reads w, u
                           and mask; nothing else is saved):
                           mask: n * (10s + 2)    mask=None: n * 8s

    Write-allocate traffic (a store that first reads the line) and page faults
    of fresh outputs are not counted: they are what an implementation may pay
    on top, and the copy baseline pays the write-allocate part too.
    """
    s = torch.empty((), dtype=dtype).element_size()
    fwd = numel * (4 * s + 1) if masked else numel * 3 * s
    bwd = numel * (6 * s + 1) if masked else numel * 5 * s
    if op == "forward":
        return fwd
    if op == "forward+backward":
        return fwd + bwd
    raise ValueError(f"bytes_moved: unknown op {op!r}, expected 'forward' or 'forward+backward'")


def run_pedantic(
    benchmark,
    fn: Callable[[], object],
    device: str,
    setup: Optional[Callable[[], None]] = None,
) -> object:
    """Times ``fn`` with calibrated rounds; ``setup`` runs untimed before each call."""

    def full_setup():
        if setup is not None:
            setup()
        sync(device)

    def timed():
        out = fn()
        sync(device)
        return out

    # Untimed warm-up: compiles, faults in caches and allocator pools, and
    # calibrates the number of rounds from the last call.
    elapsed = 0.0
    for _ in range(WARMUP_CALLS):
        full_setup()
        start = time.perf_counter()
        out = timed()
        elapsed = time.perf_counter() - start
        del out
    rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, TARGET_SECONDS / max(elapsed, 1e-6))))
    return benchmark.pedantic(timed, setup=full_setup, rounds=rounds, warmup_rounds=1, iterations=1)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> dict:
    """What the numbers depend on: CPU, cores torch may use, GPU, versions."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    info = {
        "cpu_model": _cpu_model(),
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cuda_version": torch.version.cuda,
    }
    try:
        import symfast

        info["symfast"] = getattr(symfast, "__version__", "unknown")
    except ImportError as exc:  # reported, not hidden: the run itself would fail
        info["symfast"] = f"import failed: {exc}"
    return info
