// Output buffers for the CPU kernels, without the cost of fresh memory.
//
// The dcs kernels are memory-bound, and on Linux a fresh large output is paid
// for twice: malloc hands back untouched mmap pages, and the kernel page-faults
// and zeroes every 4 KiB of it on first write. First-touching a fresh output
// costs several times more than overwriting a warm one, and more than the
// arithmetic of the op itself (docs/perf.md).
//
// So outputs of at least kMinCachedBytes come from a small size-keyed cache of
// blocks released by earlier outputs (a training step frees theta and the
// gradients it made, and the next step gets the same blocks back warm). New
// blocks are 2 MiB aligned and advised MADV_HUGEPAGE, so even a cold block
// faults 512x less often. The cache holds at most a configurable number of
// bytes (default 1 GiB; env SYMFAST_CPU_CACHE_MB, read at the first use, or
// symfast.set_cpu_cache_limit);
// a limit of 0 turns caching off. It never hands a block to two live tensors:
// a block returns to the cache only from its tensor's deleter.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace symfast {

// Uninitialized contiguous CPU tensor of the given sizes and options.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// {cached bytes, cached blocks, limit bytes, hits, misses}
std::vector<int64_t> cpu_cache_info();
void cpu_cache_set_limit(int64_t bytes);
void cpu_cache_empty();

}  // namespace symfast
