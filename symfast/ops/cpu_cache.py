"""Control of the cache of CPU output blocks used by symfast's kernels.

Fresh large CPU tensors are expensive on Linux: every 4 KiB page is faulted in
and zeroed on first write, which costs more than a dcs kernel's own work
(README, "CPU output cache", has the measurement). symfast's CPU kernels therefore take
outputs of 1 MiB or more from a cache of blocks that earlier outputs released,
and back new blocks with transparent huge pages. See csrc/cpu/output_cache.h.

The cache holds at most ``limit`` bytes of released blocks (default 1 GiB; env
``SYMFAST_CPU_CACHE_MB`` at import, or :func:`set_cpu_cache_limit`). A limit of
0 disables caching. Blocks held by live tensors are never counted or reused.
"""

from __future__ import annotations

from typing import Dict

import torch

from .. import _C  # noqa: F401  (loads the library: registers torch.ops.symfast.*)


def cpu_cache_info() -> Dict[str, int]:
    """Bytes and blocks held for reuse, the limit, and hit/miss counts."""
    cached, blocks, limit, hits, misses = torch.ops.symfast.cpu_cache_info()
    return {"cached_bytes": cached, "cached_blocks": blocks, "limit_bytes": limit,
            "hits": hits, "misses": misses}


def set_cpu_cache_limit(limit_bytes: int) -> None:
    """Caps the bytes held for reuse (frees blocks beyond it). 0 turns caching off."""
    if not isinstance(limit_bytes, int) or isinstance(limit_bytes, bool) or limit_bytes < 0:
        raise ValueError(f"set_cpu_cache_limit: limit_bytes must be an int >= 0, got {limit_bytes!r}")
    torch.ops.symfast.cpu_cache_set_limit(limit_bytes)


def empty_cpu_cache() -> None:
    """Returns every cached block to the system."""
    torch.ops.symfast.cpu_cache_empty()
