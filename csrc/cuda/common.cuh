// Building blocks shared by the CUDA kernels (dcs.cu, dcs_group.cu).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

#include "../common.h"

namespace symfast {
namespace cuda {

// ------------------------------------------------------- memory primitives
// N elements that are loaded and stored as one access of sizeof(T) * N bytes.
template <typename T, int N>
struct alignas(sizeof(T) * N) aligned_vector {
  T val[N];
};

// Elements per 16-byte access: the widest global load a thread can issue.
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

template <int V, typename T>
__device__ __forceinline__ aligned_vector<T, V> load_vec(const T* p, int64_t i) {
  return *reinterpret_cast<const aligned_vector<T, V>*>(p + i);
}

template <int V, typename T>
__device__ __forceinline__ void store_vec(T* p, int64_t i, const aligned_vector<T, V>& x) {
  *reinterpret_cast<aligned_vector<T, V>*>(p + i) = x;
}

// True when p can be accessed as aligned_vector<T, V>. A null pointer (an
// operand the instantiation does not read) counts as aligned.
template <int V, typename T>
bool is_aligned(const T* p) {
  return reinterpret_cast<std::uintptr_t>(p) % alignof(aligned_vector<T, V>) == 0;
}

// ------------------------------------------------------------- arithmetic
// IEEE multiply and add with round-to-nearest, immune to compiler flags: nvcc
// contracts a*b + c into an FMA by default (one rounding instead of two), and
// --use_fast_math would flush float32 subnormals to zero. Either would make
// the GPU differ from the CPU kernels and from reference.py. PTX operations
// with an explicit rounding mode are never contracted, and without .ftz they
// keep subnormals. Doubles are never flushed, so the _rn intrinsics suffice.
__device__ __forceinline__ float mul_rn(float a, float b) {
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float add_rn(float a, float b) {
  float r;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

// ------------------------------------------------------------------ launch
// Blocks of `kernel` (kThreads threads each, no dynamic shared memory) that
// device dev runs at once: SMs x resident blocks per SM, as the occupancy
// calculator finds them for this kernel's registers and shared memory on this
// architecture. That is one full wave. The grid-stride kernels launch at most
// that many blocks: every block then has equal work, and a larger grid would
// only add a partial second wave that leaves most SMs idle at its end.
//
// Asked once per kernel and device, then cached. Must run with dev as the
// current device (the ops hold a CUDAGuard). Uses the runtime API rather than
// ATen/cuda/CUDAContext.h, whose cuBLAS and cuSPARSE headers a toolkit without
// those libraries lacks.
inline int64_t wave_blocks(const void* kernel, c10::DeviceIndex dev) {
  static std::mutex mu;
  static std::map<std::pair<const void*, c10::DeviceIndex>, int64_t> cache;
  const std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find({kernel, dev});
  if (it != cache.end()) return it->second;
  int sms = 0, per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads,
                                                               /*dynamicSMemSize=*/0));
  const int64_t blocks = std::max<int64_t>(1, int64_t(sms) * per_sm);
  cache.emplace(std::make_pair(kernel, dev), blocks);
  return blocks;
}

// Grid of a grid-stride kernel over `items` work items, one per thread and
// step: enough blocks to give every thread an item, at most one wave.
template <typename Kernel>
int grid_blocks(Kernel* kernel, int64_t items, c10::DeviceIndex dev) {
  const int64_t wanted = std::max<int64_t>(1, ceil_div(items, kThreads));
  return static_cast<int>(std::min(wanted, wave_blocks(reinterpret_cast<const void*>(kernel), dev)));
}

}  // namespace cuda
}  // namespace symfast
