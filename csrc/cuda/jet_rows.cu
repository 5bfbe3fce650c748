// CUDA kernels of the jet row ops: jet_layer_norm, jet_rms_norm, jet_softmax,
// jet_cross_entropy (the math is in csrc/cpu/jet_rows.cpp and
// symfast/reference.py).
//
// One block per row, blocks striding over the rows (a grid of at most one full
// wave, so any row count runs with a bounded grid; indices are 64-bit). The
// block reads its row for the primal statistics, reduced across the block with
// warp shuffles, then, for each of the K directions, the tangent rows: their
// sums are reduced together (up to three per reduction) and the outputs
// written. x_hat and s are recomputed from the row rather than stored, which
// the cache serves. Rows are the last dims, contiguous: inputs that are not
// (a softmax dim that is not last, strided views) are copied into that layout
// first, and the softmax outputs copied back. Statistics are computed in
// float for half types (at::opmath_type) and rounded once; the reduction order
// differs from the CPU kernels', so results agree to rounding, not bit for bit.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "../common.h"
#include "../jet_rows_checks.h"
#include "common.cuh"

namespace symfast {
namespace {

using namespace ::symfast::cuda;  // wave_blocks

__device__ __forceinline__ float dev_exp(float x) { return expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return exp(x); }
__device__ __forceinline__ float dev_log(float x) { return logf(x); }
__device__ __forceinline__ double dev_log(double x) { return log(x); }
__device__ __forceinline__ float dev_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double dev_sqrt(double x) { return sqrt(x); }

constexpr int kWarp = 32;
constexpr int kMaxWarps = kThreads / kWarp;

// Sums v[0..N) over the block; every thread gets the totals. `shared` holds
// N * kMaxWarps values. The leading barrier lets a block call this back to back.
template <int N, typename acc_t>
__device__ __forceinline__ void block_sum(acc_t (&v)[N], acc_t* shared) {
#pragma unroll
  for (int n = 0; n < N; ++n) {
    for (int off = kWarp / 2; off > 0; off >>= 1) v[n] += __shfl_xor_sync(0xffffffffu, v[n], off);
  }
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  __syncthreads();
  if (lane == 0) {
#pragma unroll
    for (int n = 0; n < N; ++n) shared[n * kMaxWarps + warp] = v[n];
  }
  __syncthreads();
#pragma unroll
  for (int n = 0; n < N; ++n) {
    acc_t s = lane < warps ? shared[n * kMaxWarps + lane] : acc_t(0);
    for (int off = kWarp / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    v[n] = s;
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t block_max(acc_t v, acc_t* shared) {
  for (int off = kWarp / 2; off > 0; off >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, off));
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  acc_t m = lane < warps ? shared[lane] : shared[0];
  for (int off = kWarp / 2; off > 0; off >>= 1) m = fmax(m, __shfl_xor_sync(0xffffffffu, m, off));
  return m;
}

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

at::Tensor contiguous_or_undefined(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

template <typename Kernel>
int row_blocks(Kernel* kernel, int64_t rows, c10::DeviceIndex dev) {
  return static_cast<int>(std::min<int64_t>(rows, wave_blocks(reinterpret_cast<const void*>(kernel), dev)));
}

// ------------------------------------------------------------ normalization
template <typename T>
struct NormJet {
  const T *x, *x1, *x2, *w, *b, *w1, *b1, *w2, *b2;
  T *y, *y1, *y2;
  int64_t rows, d, k;
  double eps;
};

template <typename T, bool CENTER>
__global__ void __launch_bounds__(kThreads) norm_jet_kernel(const NormJet<T> a) {
  using acc_t = at::opmath_type<T>;
  __shared__ acc_t shared[3 * kMaxWarps];
  const int64_t d = a.d, n = a.rows;
  const acc_t inv_d = acc_t(1) / static_cast<acc_t>(d);
  auto ld = [](const T* p, int64_t i) { return static_cast<acc_t>(p[i]); };
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    const T* xr = a.x + r * d;
    acc_t mean = 0;
    if (CENTER) {
      acc_t v[1] = {0};
      for (int64_t i = threadIdx.x; i < d; i += blockDim.x) v[0] += ld(xr, i);
      block_sum(v, shared);
      mean = v[0] * inv_d;
    }
    acc_t var[1] = {0};
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
      const acc_t u = ld(xr, i) - mean;
      var[0] += u * u;
    }
    block_sum(var, shared);
    const acc_t sigma = dev_sqrt(var[0] * inv_d + static_cast<acc_t>(a.eps));
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
      const acc_t xh = (ld(xr, i) - mean) / sigma;
      acc_t v = a.w ? xh * ld(a.w, i) : xh;
      if (a.b) v += ld(a.b, i);
      a.y[r * d + i] = static_cast<T>(v);
    }
    for (int64_t k = 0; k < a.k; ++k) {
      const int64_t off = (k * n + r) * d;
      const T* t1 = a.x1 ? a.x1 + off : nullptr;
      const T* t2 = a.x2 ? a.x2 + off : nullptr;
      const T* w1 = a.w1 ? a.w1 + k * d : nullptr;
      const T* w2 = a.w2 ? a.w2 + k * d : nullptr;
      const T* b1 = a.b1 ? a.b1 + k * d : nullptr;
      const T* b2 = a.b2 ? a.b2 + k * d : nullptr;
      acc_t m[2] = {0, 0};
      if (CENTER && (t1 || t2)) {
        for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
          if (t1) m[0] += ld(t1, i);
          if (t2) m[1] += ld(t2, i);
        }
        block_sum(m, shared);
        m[0] *= inv_d;
        m[1] *= inv_d;
      }
      acc_t s[3] = {0, 0, 0};  // mean(x_hat u1), mean(u1^2), mean(x_hat u2)
      if (t1 || t2) {
        for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
          const acc_t xh = (ld(xr, i) - mean) / sigma;
          if (t1) {
            const acc_t u1 = ld(t1, i) - m[0];
            s[0] += xh * u1;
            s[1] += u1 * u1;
          }
          if (t2) s[2] += xh * (ld(t2, i) - m[1]);
        }
        block_sum(s, shared);
      }
      const acc_t d1 = s[0] * inv_d;
      const acc_t d2 = (s[1] * inv_d - d1 * d1) / sigma + s[2] * inv_d;
      for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
        const acc_t xh = (ld(xr, i) - mean) / sigma;
        const acc_t u1 = t1 ? ld(t1, i) - m[0] : acc_t(0);
        const acc_t u2 = t2 ? ld(t2, i) - m[1] : acc_t(0);
        const acc_t g1 = (u1 - xh * d1) / sigma;
        const acc_t g2 = (u2 - acc_t(2) * g1 * d1 - xh * d2) / sigma;
        acc_t v1 = a.w ? g1 * ld(a.w, i) : g1;
        acc_t v2 = a.w ? g2 * ld(a.w, i) : g2;
        if (w1) {
          v1 += xh * ld(w1, i);
          v2 += acc_t(2) * g1 * ld(w1, i);
        }
        if (w2) v2 += xh * ld(w2, i);
        if (b1) v1 += ld(b1, i);
        if (b2) v2 += ld(b2, i);
        a.y1[off + i] = static_cast<T>(v1);
        if (a.y2 != nullptr) a.y2[off + i] = static_cast<T>(v2);  // null: first order only
      }
    }
  }
}

template <bool CENTER>
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_jet_cuda(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& x1_in,
    const c10::optional<at::Tensor>& x2_in, at::IntArrayRef ns, const c10::optional<at::Tensor>& w_in,
    const c10::optional<at::Tensor>& b_in, const c10::optional<at::Tensor>& w1_in,
    const c10::optional<at::Tensor>& b1_in, const c10::optional<at::Tensor>& w2_in,
    const c10::optional<at::Tensor>& b2_in, int64_t k, double eps, bool second) {
  TORCH_INTERNAL_ASSERT(x_in.is_cuda());
  const c10::cuda::CUDAGuard guard(x_in.device());
  int64_t d = 1;
  for (int64_t s : ns) d *= s;
  const at::Tensor x = x_in.contiguous(), x1 = contiguous_or_undefined(x1_in),
                   x2 = contiguous_or_undefined(x2_in), w = contiguous_or_undefined(w_in),
                   b = contiguous_or_undefined(b_in), w1 = contiguous_or_undefined(w1_in),
                   b1 = contiguous_or_undefined(b1_in), w2 = contiguous_or_undefined(w2_in),
                   b2 = contiguous_or_undefined(b2_in);
  std::vector<int64_t> jet_shape{k};
  jet_shape.insert(jet_shape.end(), x.sizes().begin(), x.sizes().end());
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor y1 = at::empty(jet_shape, x.options()),
             y2 = second_tangent_output(second, jet_shape, x.options());
  if (x.numel() == 0) return {y, y1, y2};
  const c10::DeviceIndex dev = x.device().index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  CENTER ? "symfast_jet_layer_norm_cuda" : "symfast_jet_rms_norm_cuda", [&] {
    const NormJet<scalar_t> a{x.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(x1),
                              data_or_null<scalar_t>(x2), data_or_null<scalar_t>(w),
                              data_or_null<scalar_t>(b), data_or_null<scalar_t>(w1),
                              data_or_null<scalar_t>(b1), data_or_null<scalar_t>(w2),
                              data_or_null<scalar_t>(b2), y.mutable_data_ptr<scalar_t>(),
                              y1.mutable_data_ptr<scalar_t>(),
                              second ? y2.mutable_data_ptr<scalar_t>() : nullptr,
                              x.numel() / d, d, k, eps};
    const int blocks = row_blocks(norm_jet_kernel<scalar_t, CENTER>, a.rows, dev);
    norm_jet_kernel<scalar_t, CENTER><<<blocks, kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, y1, y2};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> jet_layer_norm_cuda(
    const at::Tensor& x, const c10::optional<at::Tensor>& x1, const c10::optional<at::Tensor>& x2,
    at::IntArrayRef normalized_shape, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& weight1,
    const c10::optional<at::Tensor>& bias1, const c10::optional<at::Tensor>& weight2,
    const c10::optional<at::Tensor>& bias2, double eps, bool second) {
  const int64_t k = check_jet_layer_norm_args(x, x1, x2, normalized_shape, weight, bias, weight1,
                                              bias1, weight2, bias2);
  return norm_jet_cuda<true>(x, x1, x2, normalized_shape, weight, bias, weight1, bias1, weight2,
                             bias2, k, eps, second);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> jet_rms_norm_cuda(
    const at::Tensor& x, const c10::optional<at::Tensor>& x1, const c10::optional<at::Tensor>& x2,
    at::IntArrayRef normalized_shape, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& weight1, const c10::optional<at::Tensor>& weight2, double eps,
    bool second) {
  const int64_t k = check_jet_rms_norm_args(x, x1, x2, normalized_shape, weight, weight1, weight2);
  return norm_jet_cuda<false>(x, x1, x2, normalized_shape, weight, c10::nullopt, weight1,
                              c10::nullopt, weight2, c10::nullopt, k, eps, second);
}

// ------------------------------------------------------------------ softmax
// Row max and sum of exp(z - max) over the block.
template <typename T, typename acc_t>
__device__ __forceinline__ void softmax_stats(const T* z, int64_t d, acc_t* shared, acc_t& mx,
                                              acc_t& sum) {
  acc_t m = -INFINITY;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) m = fmax(m, static_cast<acc_t>(z[i]));
  mx = block_max(m, shared);
  acc_t s[1] = {0};
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) s[0] += dev_exp(static_cast<acc_t>(z[i]) - mx);
  block_sum(s, shared);
  sum = s[0];
}

template <typename T>
struct SoftmaxJet {
  const T *x, *x1, *x2;
  T *y, *y1, *y2;
  int64_t rows, d, k;
};

template <typename T, bool LOG>
__global__ void __launch_bounds__(kThreads) softmax_jet_kernel(const SoftmaxJet<T> a) {
  using acc_t = at::opmath_type<T>;
  __shared__ acc_t shared[2 * kMaxWarps];
  const int64_t d = a.d, n = a.rows;
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    const T* z = a.x + r * d;
    acc_t mx, sum;
    softmax_stats(z, d, shared, mx, sum);
    const acc_t log_sum = dev_log(sum);
    auto prob = [&](int64_t i) { return dev_exp(static_cast<acc_t>(z[i]) - mx) / sum; };
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
      a.y[r * d + i] = static_cast<T>(LOG ? (static_cast<acc_t>(z[i]) - mx) - log_sum : prob(i));
    }
    for (int64_t k = 0; k < a.k; ++k) {
      const int64_t off = (k * n + r) * d;
      const T* t1 = a.x1 ? a.x1 + off : nullptr;
      const T* t2 = a.x2 ? a.x2 + off : nullptr;
      acc_t c[2] = {0, 0};
      for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
        const acc_t s = prob(i);
        if (t1) c[0] += s * static_cast<acc_t>(t1[i]);
        if (t2) c[1] += s * static_cast<acc_t>(t2[i]);
      }
      block_sum(c, shared);
      const bool want2 = a.y2 != nullptr;  // false: first order only (the same for the whole block)
      acc_t e[1] = {0};
      if (t1 && want2) {
        for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
          const acc_t a1 = static_cast<acc_t>(t1[i]) - c[0];
          e[0] += prob(i) * a1 * a1;
        }
        block_sum(e, shared);
      }
      for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
        const acc_t a1 = t1 ? static_cast<acc_t>(t1[i]) - c[0] : acc_t(0);
        const acc_t a2 = t2 ? static_cast<acc_t>(t2[i]) - c[1] : acc_t(0);
        if (LOG) {
          a.y1[off + i] = static_cast<T>(a1);
          if (want2) a.y2[off + i] = static_cast<T>(a2 - e[0]);
        } else {
          const acc_t s = prob(i);
          a.y1[off + i] = static_cast<T>(s * a1);
          if (want2) a.y2[off + i] = static_cast<T>(s * (a1 * a1 + a2 - e[0]));
        }
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> jet_softmax_cuda(const at::Tensor& x_in,
                                                                const c10::optional<at::Tensor>& x1_in,
                                                                const c10::optional<at::Tensor>& x2_in,
                                                                int64_t dim, bool log,
                                                                bool second) {
  const int64_t d0 = check_jet_softmax_args(x_in, x1_in, x2_in, dim);
  TORCH_INTERNAL_ASSERT(x_in.is_cuda());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t k = x1_in.has_value() ? x1_in->size(0) : x2_in->size(0);
  // The softmax dim, made last and contiguous (a copy unless it already is; a 0-d x is one row of one).
  const at::Tensor xv = x_in.dim() == 0 ? x_in.reshape({1}) : x_in;
  auto rows_last = [&](const c10::optional<at::Tensor>& t) {
    if (!t.has_value()) return at::Tensor();
    const at::Tensor tv = x_in.dim() == 0 ? t->reshape({k, 1}) : *t;
    return tv.movedim(d0 + 1, -1).contiguous();
  };
  const at::Tensor x = xv.movedim(d0, -1).contiguous(), x1 = rows_last(x1_in), x2 = rows_last(x2_in);
  std::vector<int64_t> jet_shape{k};
  jet_shape.insert(jet_shape.end(), x.sizes().begin(), x.sizes().end());
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor y1 = at::empty(jet_shape, x.options()),
             y2 = second_tangent_output(second, jet_shape, x.options());
  const int64_t d = x.size(-1);
  if (x.numel() > 0) {
    const c10::DeviceIndex dev = x.device().index();
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev).stream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "symfast_jet_softmax_cuda", [&] {
      const SoftmaxJet<scalar_t> a{x.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(x1),
                                   data_or_null<scalar_t>(x2), y.mutable_data_ptr<scalar_t>(),
                                   y1.mutable_data_ptr<scalar_t>(),
                                   second ? y2.mutable_data_ptr<scalar_t>() : nullptr, x.numel() / d, d, k};
      if (log) {
        const int blocks = row_blocks(softmax_jet_kernel<scalar_t, true>, a.rows, dev);
        softmax_jet_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(a);
      } else {
        const int blocks = row_blocks(softmax_jet_kernel<scalar_t, false>, a.rows, dev);
        softmax_jet_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(a);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // Back to x's layout: a copy unless dim was already last.
  std::vector<int64_t> out_jet{k};
  out_jet.insert(out_jet.end(), x_in.sizes().begin(), x_in.sizes().end());
  return {y.movedim(-1, d0).contiguous().reshape(x_in.sizes()),
          y1.movedim(-1, d0 + 1).contiguous().reshape(out_jet),
          second ? y2.movedim(-1, d0 + 1).contiguous().reshape(out_jet) : y2};
}

// ------------------------------------------------------------ cross entropy
template <typename T>
__global__ void __launch_bounds__(kThreads) cross_entropy_jet_kernel(
    const T* z, const T* z1, const T* z2, const int64_t* target, T* loss, T* l1, T* l2, int64_t n,
    int64_t c, int64_t k, int64_t ignore_index) {
  using acc_t = at::opmath_type<T>;
  __shared__ acc_t shared[3 * kMaxWarps];
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    const int64_t t = target[r];
    if (t == ignore_index) {  // the same for the whole block
      for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
        l1[j * n + r] = T(0);
        if (l2 != nullptr) l2[j * n + r] = T(0);  // null: first order only
      }
      if (threadIdx.x == 0) loss[r] = T(0);
      continue;
    }
    const T* zr = z + r * c;
    acc_t mx, sum;
    softmax_stats(zr, c, shared, mx, sum);
    if (threadIdx.x == 0) loss[r] = static_cast<T>((dev_log(sum) + mx) - static_cast<acc_t>(zr[t]));
    auto prob = [&](int64_t i) { return dev_exp(static_cast<acc_t>(zr[i]) - mx) / sum; };
    for (int64_t j = 0; j < k; ++j) {
      const int64_t off = (j * n + r) * c;
      const T* t1 = z1 ? z1 + off : nullptr;
      const T* t2 = z2 ? z2 + off : nullptr;
      acc_t s[2] = {0, 0};  // <s, z1>, <s, z2>
      for (int64_t i = threadIdx.x; i < c; i += blockDim.x) {
        const acc_t p = prob(i);
        if (t1) s[0] += p * static_cast<acc_t>(t1[i]);
        if (t2) s[1] += p * static_cast<acc_t>(t2[i]);
      }
      block_sum(s, shared);
      acc_t e[1] = {0};
      if (t1 && l2 != nullptr) {  // the same for the whole block
        for (int64_t i = threadIdx.x; i < c; i += blockDim.x) {
          const acc_t a1 = static_cast<acc_t>(t1[i]) - s[0];
          e[0] += prob(i) * a1 * a1;
        }
        block_sum(e, shared);
      }
      if (threadIdx.x == 0) {
        const acc_t v1 = t1 ? s[0] - static_cast<acc_t>(t1[t]) : acc_t(0);
        acc_t v2 = e[0];
        if (t2) v2 = v2 + (s[1] - static_cast<acc_t>(t2[t]));
        l1[j * n + r] = static_cast<T>(v1);
        if (l2 != nullptr) l2[j * n + r] = static_cast<T>(v2);
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> jet_cross_entropy_cuda(
    const at::Tensor& z_in, const c10::optional<at::Tensor>& z1_in,
    const c10::optional<at::Tensor>& z2_in, const at::Tensor& target_in, int64_t ignore_index,
    bool second) {
  const int64_t k = check_jet_cross_entropy_args(z_in, z1_in, z2_in, target_in);
  TORCH_INTERNAL_ASSERT(z_in.is_cuda());
  const c10::cuda::CUDAGuard guard(z_in.device());
  const int64_t n = z_in.size(0), c = z_in.size(1);
  check_cross_entropy_targets(target_in, c, ignore_index);
  const at::Tensor z = z_in.contiguous(), z1 = contiguous_or_undefined(z1_in),
                   z2 = contiguous_or_undefined(z2_in), target = target_in.contiguous();
  at::Tensor loss = at::empty({n}, z.options());
  at::Tensor l1 = at::empty({k, n}, z.options()), l2 = second_tangent_output(second, {k, n}, z.options());
  if (n == 0) return {loss, l1, l2};
  const c10::DeviceIndex dev = z.device().index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "symfast_jet_cross_entropy_cuda", [&] {
    const int blocks = row_blocks(cross_entropy_jet_kernel<scalar_t>, n, dev);
    cross_entropy_jet_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        z.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(z1), data_or_null<scalar_t>(z2),
        target.const_data_ptr<int64_t>(), loss.mutable_data_ptr<scalar_t>(),
        l1.mutable_data_ptr<scalar_t>(), second ? l2.mutable_data_ptr<scalar_t>() : nullptr, n, c, k,
        ignore_index);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, l1, l2};
}

}  // namespace

TORCH_LIBRARY_IMPL(symfast, CUDA, m) {
  m.impl("jet_layer_norm", &jet_layer_norm_cuda);
  m.impl("jet_rms_norm", &jet_rms_norm_cuda);
  m.impl("jet_softmax", &jet_softmax_cuda);
  m.impl("jet_cross_entropy", &jet_cross_entropy_cuda);
}

}  // namespace symfast
