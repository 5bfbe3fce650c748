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
# 1M: the whole working set (17-42 MB in float32) fits or nearly fits a large
# last-level cache (32 MB on the 2-core CI box), so its copy baseline measures
# cache bandwidth and per-call overhead shows; 16M (64 MB per float32 operand)
# is memory bound everywhere. 64M and 256M (0.25 and 1 GiB per float32 operand,
# 2.7 and 10.7 GiB per masked forward+backward) are the GPU-sized cases: far
# beyond any L2 (50-60 MB on an H100/H200) and long enough (milliseconds) that
# launch overhead does not show. They run on CUDA only (see ``sizes_for``): on
# the CPU they would take minutes and tens of GiB for no new information.
SIZES = {"1M": 1 << 20, "16M": 1 << 24, "64M": 1 << 26, "256M": 1 << 28}
CPU_SIZES = ("1M", "16M")
CUDA_ONLY_SIZES = ("64M", "256M")


def sizes_for(device: str) -> tuple:
    """The SIZES keys benchmarked on ``device``: the GPU-sized ones on CUDA only."""
    return CPU_SIZES + CUDA_ONLY_SIZES if device.startswith("cuda") else CPU_SIZES


# Seconds of timed work per benchmark; SYMFAST_BENCH_SECONDS overrides it (the
# GPU check script uses less: GPU medians are steady, and device time is short).
TARGET_SECONDS = float(os.environ.get("SYMFAST_BENCH_SECONDS", "1.5"))
MIN_ROUNDS = 7
MAX_ROUNDS = 200
WARMUP_CALLS = 2


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_copy(benchmark, nbytes: int, device: str) -> None:
    """The bandwidth baseline: a device copy that reads and writes ``nbytes`` in all (``nbytes // 2`` each way)."""
    src = torch.ones(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.zeros_like(src)  # both buffers touched: no page faults in the timing
    run_pedantic(benchmark, lambda: dst.copy_(src), device)


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
    min_rounds: int = 0,
) -> object:
    """Times ``fn`` with calibrated rounds (at least ``min_rounds``); ``setup`` runs untimed before each call."""

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
    rounds = max(min_rounds, int(min(MAX_ROUNDS, max(MIN_ROUNDS, TARGET_SECONDS / max(elapsed, 1e-6)))))
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
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["cuda_capability"] = f"{props.major}.{props.minor}"
        info["cuda_multiprocessors"] = props.multi_processor_count
        info["cuda_memory_gib"] = round(props.total_memory / 2**30, 1)
        l2 = getattr(props, "L2_cache_size", None)
        if l2:
            info["cuda_l2_mib"] = round(l2 / 2**20, 1)
    # Settings that change what is measured: thread count, allocator and huge
    # pages (torch's THP_MEM_ALLOC_ENABLE, symfast's output cache), preloads.
    info["env"] = {
        k: os.environ[k]
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "THP_MEM_ALLOC_ENABLE", "SYMFAST_CPU_CACHE_MB",
                  "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD", "CUDA_VISIBLE_DEVICES",
                  "SYMFAST_BENCH_SECONDS")
        if k in os.environ
    }
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            info["transparent_hugepage"] = f.read().strip()
    except OSError:
        info["transparent_hugepage"] = None
    try:
        import symfast

        info["symfast"] = getattr(symfast, "__version__", "unknown")
    except ImportError as exc:  # reported, not hidden: the run itself would fail
        info["symfast"] = f"import failed: {exc}"
    return info


def cpu_snapshot() -> Optional[dict]:
    """Busy CPU seconds of the whole machine and of this process tree, now.

    Two snapshots bracket a run; the difference of their differences is CPU
    time other processes took while we were timing: the noise on a shared box
    (the load average cannot tell our own threads from theirs). Linux only.
    """
    try:
        tick = os.sysconf("SC_CLK_TCK")
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        machine = (sum(fields[:8]) - idle) / tick  # user .. steal, without guest (counted in user)

        ppid, cpu = {}, {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            rest = stat[stat.rfind(")") + 2 :].split()  # fields after "(comm)"
            ppid[int(entry)] = int(rest[1])
            cpu[int(entry)] = (int(rest[11]) + int(rest[12])) / tick  # utime + stime
        tree, frontier = {os.getpid()}, [os.getpid()]
        while frontier:
            parent = frontier.pop()
            for pid, pp in ppid.items():
                if pp == parent and pid not in tree:
                    tree.add(pid)
                    frontier.append(pid)
        reaped = os.times()
        own = sum(cpu.get(pid, 0.0) for pid in tree) + reaped.children_user + reaped.children_system
    except (OSError, ValueError, IndexError):
        return None
    return {"machine_busy_s": machine, "own_s": own, "wall_s": time.perf_counter()}


def foreign_cpu_fraction(start: Optional[dict], end: Optional[dict], cores: int) -> Optional[float]:
    """Share of the machine's CPU capacity used by other processes between two snapshots."""
    if start is None or end is None or end["wall_s"] <= start["wall_s"]:
        return None
    foreign = (end["machine_busy_s"] - start["machine_busy_s"]) - (end["own_s"] - start["own_s"])
    return max(0.0, foreign) / ((end["wall_s"] - start["wall_s"]) * max(1, cores))


def bytes_moved_group(op: str, numel: int, groups: int, dtype: torch.dtype) -> int:
    """Minimal DRAM traffic of a fused dcs_group (theta = w * s along dim), in bytes.

    s = element size, n = numel of w, G = number of groups (the gate's length).

    forward            read w, s; write theta:                  2 n s + G s
    backward           read g, w, s; write grad_w, grad_s:      3 n s + 2 G s
    forward+backward   the sum (the fused backward re-reads w): 5 n s + 3 G s

    As in ``bytes_moved``, write-allocate traffic and page faults of fresh
    outputs are not counted.
    """
    s = torch.empty((), dtype=dtype).element_size()
    fwd = 2 * numel * s + groups * s
    bwd = 3 * numel * s + 2 * groups * s
    if op == "forward":
        return fwd
    if op == "forward+backward":
        return fwd + bwd
    raise ValueError(f"bytes_moved_group: unknown op {op!r}, expected 'forward' or 'forward+backward'")
