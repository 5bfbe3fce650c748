// Building blocks shared by the CUDA kernels (dcs.cu, dcs_group.cu).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>

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

// ------------------------------------------------------------ device facts
// A per-device value computed once (by `query`, with dev the current device)
// and cached. Concurrent first calls may both compute it and store the same
// value. Used instead of ATen/cuda/CUDAContext.h, whose cuBLAS and cuSPARSE
// headers the toolkit on the build machine lacks.
template <typename Query>
int cached_per_device(std::array<std::atomic<int>, C10_COMPILE_TIME_MAX_GPUS>& cache,
                      c10::DeviceIndex dev, const Query& query) {
  TORCH_INTERNAL_ASSERT(dev >= 0 && dev < C10_COMPILE_TIME_MAX_GPUS, "bad device index ",
                        static_cast<int>(dev));
  int value = cache[dev].load(std::memory_order_relaxed);  // 0: not asked yet
  if (value == 0) {
    value = std::max(1, query());
    cache[dev].store(value, std::memory_order_relaxed);
  }
  return value;
}

// Streaming multiprocessors of device dev.
inline int sm_count(c10::DeviceIndex dev) {
  static std::array<std::atomic<int>, C10_COMPILE_TIME_MAX_GPUS> cache{};
  return cached_per_device(cache, dev, [dev] {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    return sms;
  });
}

}  // namespace cuda
}  // namespace symfast
