// CUDA kernels of the dcs_group ops: theta = w * s broadcast along dim.
//
// Layout. As on the CPU (csrc/cpu/dcs_group.cpp), w is a contiguous
// [outer, G, inner] block and element p belongs to group (p / inner) % G.
// Operands that are not contiguous are copied to that layout first (one extra
// read and write of that operand; a transposed weight or the stride-0 grad of
// sum().backward()), so one flat 64-bit index addresses every operand.
//
// Elementwise ops (forward, grad_w alone, forward mode): grid-stride loops over
// at most one wave of blocks (grid_blocks in common.cuh), 16-byte vector loads and stores when every
// pointer is aligned for them (scalar otherwise). The group of the first
// element of a vector costs a division (32-bit whenever the tensor has fewer
// than 2^32 elements, 64-bit above); the next elements step through (i, g).
//
// The gate gradient grad_s[g] = sum over (o, i) of grad * w is a per-group
// reduction, fused with grad_w into one pass over grad and w:
// * inner < kRunMinInner (dim = last, or a conv weight grouped along dim 1):
//   column_reduce_kernel. Each thread owns one column c of the [outer, G*inner]
//   view, so a warp reads consecutive addresses of a row (coalesced), and sums
//   it over a chunk of rows; the block's row lanes are combined in shared
//   memory, in a fixed order, into a [row chunks, G*inner] partial buffer.
// * longer runs: run_reduce_kernel. A block sums one group over a slice of its
//   (o, i) positions (each warp reads runs of >= 32 consecutive elements), with
//   a deterministic warp-shuffle tree, into a [slices, G] buffer or straight
//   into grad_s.
// combine_kernel then sums the partials of each group in a fixed order. No
// atomics: the result is bitwise reproducible, and the split depends on the
// shape only (not on the GPU's SM count), so it is the same on every GPU. It
// is not bitwise equal to the CPU result, whose summation order differs; both
// sum in float for half types and float32 and in double for float64.
//
// theta, grad_w and theta_dot match the CPU kernels bit for bit: products
// and sums use explicitly rounded operations (mul_rn/add_rn in common.cuh),
// which neither FMA contraction nor fast-math flags change.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include "../common.h"
#include "../dcs_checks.h"
#include "../group_layout.h"
#include "../static_switch.h"
#include "common.cuh"

namespace symfast {
namespace {

constexpr int kWarp = 32;
// Inner runs at least this long are reduced by run_reduce_kernel (a warp
// reads a whole run or more); shorter ones by column_reduce_kernel.
constexpr int64_t kRunMinInner = 32;
// Blocks a reduction aims for: a few full waves on current GPUs (an H100 holds
// 132 SMs x 8 blocks of 256 threads). A constant, not the SM count, so that
// the summation order, and with it the result, depends on the shape only.
constexpr int64_t kReduceBlocks = 2048;
// Elements per thread a reduction block should have at least.
constexpr int64_t kMinPerThread = 8;

int64_t pow2_ceil(int64_t x) {
  int64_t p = 1;
  while (p < x) p *= 2;
  return p;
}

using namespace ::symfast::cuda;  // aligned_vector, load_vec, mul_rn, grid_blocks, ...

// ----------------------------------------------------------- element ops
// Each op is a struct of raw pointers with
//   apply<V>(p, g, i, G, inner): elements [p, p + V), p a multiple of V, the
//     first of which is at group g and inner position i;
//   aligned<V>(): whether every pointer allows V-element vector access.
// Pointers of operands an instantiation does not read stay null.

// Next element's (group, inner position).
template <typename index_t>
__device__ __forceinline__ void step(index_t& g, index_t& i, index_t G, index_t inner) {
  if (++i == inner) {
    i = 0;
    if (++g == G) g = 0;
  }
}

// out = x * s[g]: the forward (x = w) and grad_w alone (x = grad).
template <typename T>
struct ScaleOp {
  T* out;
  const T* x;
  const T* s;

  template <int V, typename index_t>
  __device__ __forceinline__ void apply(int64_t p, index_t g, index_t i, index_t G,
                                        index_t inner) const {
    using acc_t = at::opmath_type<T>;
    const auto xv = load_vec<V>(x, p);
    aligned_vector<T, V> o;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      o.val[k] = static_cast<T>(mul_rn(static_cast<acc_t>(xv.val[k]), static_cast<acc_t>(s[g])));
      step(g, i, G, inner);
    }
    store_vec<V>(out, p, o);
  }

  template <int V>
  bool aligned() const {
    return is_aligned<V>(out) && is_aligned<V>(x);
  }
};

// theta_dot = 0 + w_dot * s + w * s_dot, in this order, as the CPU kernel and
// reference.dcs_group_jvp (so even the sign of a zero result matches).
// w is read only with s_dot, s and w_dot only with w_dot.
template <typename T, bool HWD, bool HSD>
struct JvpOp {
  T* out;
  const T* w;
  const T* s;
  const T* wd;
  const T* sd;

  template <int V, typename index_t>
  __device__ __forceinline__ void apply(int64_t p, index_t g, index_t i, index_t G,
                                        index_t inner) const {
    using acc_t = at::opmath_type<T>;
    aligned_vector<T, V> wv{}, wdv{}, o;
    if constexpr (HSD) wv = load_vec<V>(w, p);
    if constexpr (HWD) wdv = load_vec<V>(wd, p);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      acc_t acc = 0;
      if constexpr (HWD) {
        acc = add_rn(acc, mul_rn(static_cast<acc_t>(wdv.val[k]), static_cast<acc_t>(s[g])));
      }
      if constexpr (HSD) {
        acc = add_rn(acc, mul_rn(static_cast<acc_t>(wv.val[k]), static_cast<acc_t>(sd[g])));
      }
      o.val[k] = static_cast<T>(acc);
      step(g, i, G, inner);
    }
    store_vec<V>(out, p, o);
  }

  template <int V>
  bool aligned() const {
    return is_aligned<V>(out) && is_aligned<V>(w) && is_aligned<V>(wd);
  }
};

// Grid-stride loop: whole V-element vectors, then the n % V tail one element
// at a time. Loop indices are 64-bit; index_t (32-bit when n < 2^32) is only
// used for the division that finds an element's group.
template <int V, typename index_t, typename Op>
__global__ void __launch_bounds__(kThreads)
    group_elementwise_kernel(const Op op, const int64_t n, const index_t G, const index_t inner) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n_vec = n / V;
  for (int64_t j = start; j < n_vec; j += stride) {
    const index_t p = static_cast<index_t>(j * V);
    const index_t q = p / inner;
    op.template apply<V, index_t>(j * V, q % G, p - q * inner, G, inner);
  }
  if constexpr (V > 1) {
    for (int64_t j = n_vec * V + start; j < n; j += stride) {
      const index_t p = static_cast<index_t>(j);
      const index_t q = p / inner;
      op.template apply<1, index_t>(j, q % G, p - q * inner, G, inner);
    }
  }
}


// Runs op over the n > 0 elements of v on the current stream of device dev,
// with 16-byte vectors when every pointer allows it.
template <typename T, typename Op>
void launch_elementwise(const Op& op, const GroupView& v, c10::DeviceIndex dev) {
  const int64_t n = v.numel();
  TORCH_INTERNAL_ASSERT(n > 0);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev).stream();
  const bool small = n <= static_cast<int64_t>(std::numeric_limits<uint32_t>::max());
  BOOL_SWITCH(op.template aligned<kVec<T>>(), VECTORIZED, [&] {
    BOOL_SWITCH(small, INDEX32, [&] {
      constexpr int V = VECTORIZED ? kVec<T> : 1;
      using index_t = std::conditional_t<INDEX32, uint32_t, uint64_t>;
      const int blocks = grid_blocks(group_elementwise_kernel<V, index_t, Op>, ceil_div(n, V), dev);
      group_elementwise_kernel<V, index_t><<<blocks, kThreads, 0, stream>>>(
          op, n, static_cast<index_t>(v.groups), static_cast<index_t>(v.inner));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// --------------------------------------------------------------- reduction
// Sum of v over the block (blockDim.x == kThreads), valid in thread 0. A
// fixed shuffle tree: the same order on every run.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v) {
  __shared__ acc_t warp_sums[kThreads / kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / kWarp ? warp_sums[lane] : acc_t(0);
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  }
  __syncthreads();  // warp_sums is reused by the caller's next iteration
  return v;
}

// Short inner runs. Block (bx, by): threadIdx.x picks column c of the
// [outer, C = G * inner] view, threadIdx.y strides over the rows of the
// block's chunk (blockIdx.y). Writes partial[blockIdx.y * C + c].
template <typename T, bool NW>
__global__ void __launch_bounds__(kThreads)
    column_reduce_kernel(T* __restrict__ gw, at::opmath_type<T>* __restrict__ partial,
                         const T* __restrict__ grad, const T* __restrict__ w,
                         const T* __restrict__ s, const int64_t outer, const int64_t C,
                         const int64_t inner, const int64_t rows_per_chunk) {
  using acc_t = at::opmath_type<T>;
  __shared__ acc_t lanes[kThreads];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t o1 = o0 + rows_per_chunk < outer ? o0 + rows_per_chunk : outer;
  acc_t acc = 0;
  if (c < C) {
    const acc_t sg = NW ? static_cast<acc_t>(s[c / inner]) : acc_t(0);
    for (int64_t o = o0 + threadIdx.y; o < o1; o += blockDim.y) {
      const int64_t p = o * C + c;
      const acc_t gv = static_cast<acc_t>(grad[p]);
      acc += gv * static_cast<acc_t>(w[p]);
      if constexpr (NW) gw[p] = static_cast<T>(mul_rn(gv, sg));
    }
  }
  lanes[threadIdx.y * blockDim.x + threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    acc_t t = lanes[threadIdx.x];
    for (unsigned y = 1; y < blockDim.y; ++y) t += lanes[y * blockDim.x + threadIdx.x];
    partial[static_cast<int64_t>(blockIdx.y) * C + c] = t;
  }
}

// Long inner runs. Work item (slice, g): the block sums group g over the
// slice's share of its outer * inner positions k (element ((o * G) + g) *
// inner + i with o = k / inner, i = k % inner). Writes gs[g] when there is one
// slice, partial[slice * G + g] otherwise.
template <typename T, typename index_t, bool NW>
__global__ void __launch_bounds__(kThreads)
    run_reduce_kernel(T* __restrict__ gw, at::opmath_type<T>* __restrict__ partial,
                      T* __restrict__ gs, const T* __restrict__ grad, const T* __restrict__ w,
                      const T* __restrict__ s, const int64_t outer, const int64_t G,
                      const index_t inner, const int64_t n_slices) {
  using acc_t = at::opmath_type<T>;
  const int64_t per_group = outer * static_cast<int64_t>(inner);
  const int64_t per_slice = ceil_div(per_group, n_slices);
  for (int64_t item = blockIdx.x; item < G * n_slices; item += gridDim.x) {
    const int64_t g = item % G, slice = item / G;
    const int64_t k0 = slice * per_slice;
    const int64_t k1 = k0 + per_slice < per_group ? k0 + per_slice : per_group;
    const acc_t sg = NW ? static_cast<acc_t>(s[g]) : acc_t(0);
    acc_t acc = 0;
    for (int64_t k = k0 + threadIdx.x; k < k1; k += kThreads) {
      const index_t kk = static_cast<index_t>(k);
      const index_t o = kk / inner;
      const int64_t p = (static_cast<int64_t>(o) * G + g) * inner + (kk - o * inner);
      const acc_t gv = static_cast<acc_t>(grad[p]);
      acc += gv * static_cast<acc_t>(w[p]);
      if constexpr (NW) gw[p] = static_cast<T>(mul_rn(gv, sg));
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) {
      if (gs != nullptr) {
        gs[g] = static_cast<T>(acc);
      } else {
        partial[slice * G + g] = acc;
      }
    }
  }
}

// gs[g] = sum over r < rows, i < inner of partial[(r * G + g) * inner + i],
// in that order.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    combine_kernel(T* __restrict__ gs, const at::opmath_type<T>* __restrict__ partial,
                   const int64_t rows, const int64_t G, const int64_t inner) {
  using acc_t = at::opmath_type<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < G; g += stride) {
    acc_t acc = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const acc_t* row = partial + (r * G + g) * inner;
      for (int64_t i = 0; i < inner; ++i) acc += row[i];
    }
    gs[g] = static_cast<T>(acc);
  }
}

// grad_s (and with NW grad_w) of the n > 0 elements of v, in one pass.
template <typename T, bool NW>
void launch_reduce(T* gw, T* gs, const T* grad, const T* w, const T* s, const GroupView& v,
                   const at::TensorOptions& w_options, c10::DeviceIndex dev) {
  using acc_t = at::opmath_type<T>;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev).stream();
  const auto acc_options = w_options.dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t G = v.groups;
  const int combine_blocks = grid_blocks(combine_kernel<T>, G, dev);

  if (v.inner < kRunMinInner) {
    const int64_t C = G * v.inner;
    // Columns along x (at most a warp: more would not coalesce better), rows
    // along y; with few rows the spare threads widen the block along x.
    const int64_t by = std::min<int64_t>(kThreads / std::min<int64_t>(kWarp, pow2_ceil(C)),
                                         pow2_ceil(v.outer));
    const int64_t bx = kThreads / by;
    const int64_t col_blocks = ceil_div(C, bx);
    const int64_t max_chunks = std::min<int64_t>(65535, ceil_div(v.outer, by * kMinPerThread));
    const int64_t chunks = std::clamp<int64_t>(ceil_div(kReduceBlocks, col_blocks), 1, max_chunks);
    const int64_t rows_per_chunk = ceil_div(v.outer, chunks);
    const int64_t n_chunks = ceil_div(v.outer, rows_per_chunk);
    TORCH_CHECK(col_blocks <= std::numeric_limits<int>::max(), "symfast.dcs_group_backward: ",
                "too many columns for one launch: ", C);
    at::Tensor partial = at::empty({n_chunks * C}, acc_options);
    const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(n_chunks));
    const dim3 block(static_cast<unsigned>(bx), static_cast<unsigned>(by));
    column_reduce_kernel<T, NW><<<grid, block, 0, stream>>>(
        gw, partial.mutable_data_ptr<acc_t>(), grad, w, s, v.outer, C, v.inner, rows_per_chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    combine_kernel<T><<<combine_blocks, kThreads, 0, stream>>>(
        gs, partial.const_data_ptr<acc_t>(), n_chunks, G, v.inner);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }

  const int64_t per_group = v.outer * v.inner;
  const int64_t n_slices = std::clamp<int64_t>(ceil_div(kReduceBlocks, G), 1,
                                               std::max<int64_t>(1, per_group / (kThreads * kMinPerThread)));
  const int blocks = static_cast<int>(std::min<int64_t>(G * n_slices, int64_t(1) << 20));
  at::Tensor partial = n_slices > 1 ? at::empty({n_slices * G}, acc_options) : at::Tensor();
  acc_t* partial_ptr = n_slices > 1 ? partial.mutable_data_ptr<acc_t>() : nullptr;
  T* direct = n_slices > 1 ? nullptr : gs;
  // k < outer * inner, so 32-bit division suffices below 2^32 of those.
  BOOL_SWITCH(per_group <= static_cast<int64_t>(std::numeric_limits<uint32_t>::max()), INDEX32, [&] {
    using index_t = std::conditional_t<INDEX32, uint32_t, uint64_t>;
    run_reduce_kernel<T, index_t, NW><<<blocks, kThreads, 0, stream>>>(
        gw, partial_ptr, direct, grad, w, s, v.outer, G, static_cast<index_t>(v.inner), n_slices);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (n_slices > 1) {
    combine_kernel<T><<<combine_blocks, kThreads, 0, stream>>>(
        gs, partial.const_data_ptr<acc_t>(), n_slices, G, 1);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// ------------------------------------------------------------------- ops
at::Tensor dcs_group_cuda(const at::Tensor& w_in, const at::Tensor& s_in, int64_t dim_in) {
  const int64_t dim = check_dcs_group_args(w_in, s_in, dim_in);
  // The dispatcher chose CUDA, so some operand is on a GPU, and the checks
  // above put both on w's device.
  TORCH_INTERNAL_ASSERT(w_in.is_cuda());
  const c10::cuda::CUDAGuard guard(w_in.device());
  at::Tensor out = at::empty(w_in.sizes(), w_in.options());
  if (w_in.numel() == 0) return out;
  const at::Tensor w = w_in.contiguous(), s = s_in.contiguous();  // no-ops when already so
  const GroupView v = group_view(w.sizes(), dim);
  const c10::DeviceIndex dev = w.device().index();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "symfast_dcs_group_cuda", [&] {
    const ScaleOp<scalar_t> op{out.mutable_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                               s.const_data_ptr<scalar_t>()};
    launch_elementwise<scalar_t>(op, v, dev);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> dcs_group_backward_cuda(const at::Tensor& grad_in,
                                                           const at::Tensor& w_in,
                                                           const at::Tensor& s_in, int64_t dim_in,
                                                           bool w_needed, bool s_needed) {
  const int64_t dim = check_dcs_group_backward_args(grad_in, w_in, s_in, dim_in);
  TORCH_INTERNAL_ASSERT(w_in.is_cuda());
  const c10::cuda::CUDAGuard guard(w_in.device());
  at::Tensor gw = w_needed ? at::empty(w_in.sizes(), w_in.options()) : unneeded_gradient(w_in.options());
  at::Tensor gs = s_needed ? at::empty({s_in.size(0)}, s_in.options()) : unneeded_gradient(s_in.options());
  if (!(w_needed || s_needed)) return {gw, gs};
  if (w_in.numel() == 0) {
    if (s_needed) gs.zero_();  // an empty sum for each of the G groups
    return {gw, gs};
  }
  // Copies only what this call reads, and only when it is not contiguous.
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor s = w_needed ? s_in.contiguous() : at::Tensor();
  const at::Tensor w = s_needed ? w_in.contiguous() : at::Tensor();
  const GroupView v = group_view(w_in.sizes(), dim);
  const c10::DeviceIndex dev = w_in.device().index();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w_in.scalar_type(), "symfast_dcs_group_backward_cuda", [&] {
    using T = scalar_t;
    const T* gp = grad.const_data_ptr<T>();
    if (!s_needed) {
      launch_elementwise<T>(ScaleOp<T>{gw.mutable_data_ptr<T>(), gp, s.const_data_ptr<T>()}, v, dev);
      return;
    }
    BOOL_SWITCH(w_needed, NW, [&] {
      launch_reduce<T, NW>(NW ? gw.mutable_data_ptr<T>() : nullptr, gs.mutable_data_ptr<T>(), gp,
                           w.const_data_ptr<T>(), ptr_or_null<T>(s), v, w_in.options(), dev);
    });
  });
  return {gw, gs};
}

at::Tensor dcs_group_jvp_cuda(const at::Tensor& w_in, const at::Tensor& s_in, int64_t dim_in,
                              const c10::optional<at::Tensor>& w_dot,
                              const c10::optional<at::Tensor>& s_dot) {
  const int64_t dim = check_dcs_group_jvp_args(w_in, s_in, dim_in, w_dot, s_dot);
  TORCH_INTERNAL_ASSERT(w_in.is_cuda());
  const c10::cuda::CUDAGuard guard(w_in.device());
  const bool hwd = w_dot.has_value(), hsd = s_dot.has_value();
  if (!(hwd || hsd)) return at::zeros(w_in.sizes(), w_in.options());
  at::Tensor out = at::empty(w_in.sizes(), w_in.options());
  if (w_in.numel() == 0) return out;
  // w is read only with s_dot, s only with w_dot.
  const at::Tensor w = hsd ? w_in.contiguous() : at::Tensor();
  const at::Tensor s = hwd ? s_in.contiguous() : at::Tensor();
  const at::Tensor wd = hwd ? w_dot->contiguous() : at::Tensor();
  const at::Tensor sd = hsd ? s_dot->contiguous() : at::Tensor();
  const GroupView v = group_view(w_in.sizes(), dim);
  const c10::DeviceIndex dev = w_in.device().index();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w_in.scalar_type(), "symfast_dcs_group_jvp_cuda", [&] {
    using T = scalar_t;
    BOOL_SWITCH(hwd, HWD, [&] {
      BOOL_SWITCH(hsd, HSD, [&] {
        if constexpr (HWD || HSD) {  // no tangent at all returned above
          const JvpOp<T, HWD, HSD> op{out.mutable_data_ptr<T>(), ptr_or_null<T>(w),
                                      ptr_or_null<T>(s), ptr_or_null<T>(wd), ptr_or_null<T>(sd)};
          launch_elementwise<T>(op, v, dev);
        }
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(symfast, CUDA, m) {
  m.impl("dcs_group", &dcs_group_cuda);
  m.impl("dcs_group_backward", &dcs_group_backward_cuda);
  m.impl("dcs_group_jvp", &dcs_group_jvp_cuda);
}

}  // namespace symfast
