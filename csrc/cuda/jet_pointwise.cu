// CUDA kernels of the pointwise jet ops: jet_activation, jet_dcs, jet_dcs_group.
//
// One thread per primal element, in grid-stride loops over a grid of at most
// one wave (grid_blocks in common.cuh), 64-bit indices throughout. A thread
// computes what its element needs once (f, f', f'' of an activation; w, u and
// the mask; its group's gate) and applies it to the K directions in turn:
// direction k of the tangents is [k * n, (k + 1) * n), so at each step of
// that loop the threads of a warp read and write consecutive addresses.
// Which tangents are present is a kernel argument (a null pointer) that is
// uniform across the grid, so its branches never diverge.
//
// Operands are made contiguous first (.contiguous(): no copy when they already
// are; a strided view costs one extra read and write of that operand, and a
// mask that broadcasts is expanded to w's numel, one byte per element), so one
// flat index addresses all of them.
//
// Numerics match csrc/cpu/jet_pointwise.cpp: half types compute in float
// (at::opmath_type) and round once; jet_dcs and jet_dcs_group sum their
// products with explicitly rounded operations (mul_rn/add_rn) in the order of
// the CPU loops and of symfast/reference.py, so they equal both bit for bit;
// jet_activation evaluates the closed forms of jet_activation_math.h with
// CUDA's exp/erf/tanh, which differ from the CPU's in the last bits.
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
#include "../jet_activation_math.h"
#include "../jet_pointwise_checks.h"
#include "common.cuh"

namespace symfast {
namespace {

using namespace ::symfast::cuda;  // mul_rn, add_rn, grid_blocks

std::vector<int64_t> jet_sizes(int64_t k, at::IntArrayRef s) {
  std::vector<int64_t> out{k};
  out.insert(out.end(), s.begin(), s.end());
  return out;
}

at::Tensor contiguous_or_undefined(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

template <typename Kernel, typename... Args>
void launch(Kernel* kernel, int64_t n, c10::DeviceIndex dev, Args... args) {
  TORCH_INTERNAL_ASSERT(n > 0);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev).stream();
  const int blocks = grid_blocks(kernel, n, dev);
  kernel<<<blocks, kThreads, 0, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ------------------------------------------------------------ jet_activation
template <typename T, Activation A>
__global__ void __launch_bounds__(kThreads)
    jet_activation_kernel(const T* __restrict__ x, const T* __restrict__ x1,
                          const T* __restrict__ x2, T* __restrict__ y, T* __restrict__ y1,
                          T* __restrict__ y2, int64_t n, int64_t k_dirs,
                          at::opmath_type<T> beta, at::opmath_type<T> threshold) {
  using acc_t = at::opmath_type<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const auto d = activation_derivatives<A, acc_t>(static_cast<acc_t>(x[i]), beta, threshold);
    y[i] = static_cast<T>(d.f);
    for (int64_t k = 0; k < k_dirs; ++k) {
      const int64_t j = k * n + i;
      if constexpr (A == Activation::kRelu) {
        // A select, as on the CPU and in the reference: 0, not 0 * inf.
        const bool on = d.d1 != acc_t(0);
        y1[j] = (x1 != nullptr && on) ? x1[j] : T(0);
        if (y2 != nullptr) y2[j] = (x2 != nullptr && on) ? x2[j] : T(0);
      } else {
        const acc_t a = x1 != nullptr ? static_cast<acc_t>(x1[j]) : acc_t(0);
        y1[j] = x1 != nullptr ? static_cast<T>(mul_rn(d.d1, a)) : T(0);
        if (y2 == nullptr) continue;  // first order only
        const acc_t curv = mul_rn(d.d2, mul_rn(a, a));
        if (x2 != nullptr) {
          const acc_t lin = mul_rn(d.d1, static_cast<acc_t>(x2[j]));
          y2[j] = static_cast<T>(x1 != nullptr ? add_rn(lin, curv) : lin);
        } else {
          y2[j] = static_cast<T>(curv);
        }
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> jet_activation_cuda(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& x1_in,
    const c10::optional<at::Tensor>& x2_in, c10::string_view kind, double beta, double threshold,
    bool second) {
  const auto checked = check_jet_activation_args(x_in, x1_in, x2_in, kind, beta);
  const int64_t k_dirs = checked.first;
  const Activation act = checked.second;
  // The dispatcher chose CUDA, so some operand is on a GPU, and the checks
  // above put all of them on x's device.
  TORCH_INTERNAL_ASSERT(x_in.is_cuda());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), x1 = contiguous_or_undefined(x1_in),
                   x2 = contiguous_or_undefined(x2_in);
  at::Tensor y = at::empty(x.sizes(), x.options());
  const auto js = jet_sizes(k_dirs, x.sizes());
  at::Tensor y1 = at::empty(js, x.options()), y2 = second_tangent_output(second, js, x.options());
  const int64_t n = x.numel();
  if (n == 0) return {y, y1, y2};
  const c10::DeviceIndex dev = x.device().index();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "symfast_jet_activation_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    activation_switch(act, [&](auto tag) {
      constexpr Activation A = decltype(tag)::value;
      launch(jet_activation_kernel<scalar_t, A>, n, dev, x.const_data_ptr<scalar_t>(),
             ptr_or_null<scalar_t>(x1), ptr_or_null<scalar_t>(x2), y.mutable_data_ptr<scalar_t>(),
             y1.mutable_data_ptr<scalar_t>(), second ? y2.mutable_data_ptr<scalar_t>() : nullptr, n,
             k_dirs, static_cast<acc_t>(beta), static_cast<acc_t>(threshold));
    });
  });
  return {y, y1, y2};
}

// ------------------------------------------------------------------ jet_dcs
template <typename T>
struct DcsJetArgs {
  const T *w, *u, *v, *w1, *u1, *v1, *w2, *u2, *v2;
  const uint8_t* m;
  T *y, *y1, *y2;
};

// acc + a * b in the accumulation type (a missing factor adds nothing).
template <typename T>
__device__ __forceinline__ at::opmath_type<T> add_product(at::opmath_type<T> acc, const T* a,
                                                          int64_t ia, const T* b, int64_t ib) {
  using acc_t = at::opmath_type<T>;
  if (a == nullptr || b == nullptr) return acc;
  return add_rn(acc, mul_rn(static_cast<acc_t>(a[ia]), static_cast<acc_t>(b[ib])));
}

template <typename T>
__global__ void __launch_bounds__(kThreads) jet_dcs_kernel(const DcsJetArgs<T> p, int64_t n,
                                                           int64_t k_dirs) {
  using acc_t = at::opmath_type<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const bool on = p.m == nullptr || p.m[i] != 0;
    const T prod = static_cast<T>(mul_rn(static_cast<acc_t>(p.w[i]), static_cast<acc_t>(p.u[i])));
    p.y[i] = on ? prod : (p.v != nullptr ? p.v[i] : T(0));
    for (int64_t k = 0; k < k_dirs; ++k) {
      const int64_t j = k * n + i;
      // y1 = m ? w1 u + w u1 : v1
      acc_t a1 = 0;
      a1 = add_product(a1, p.w1, j, p.u, i);
      a1 = add_product(a1, p.w, i, p.u1, j);
      p.y1[j] = on ? static_cast<T>(a1) : (p.v1 != nullptr ? p.v1[j] : T(0));
      if (p.y2 == nullptr) continue;  // first order only
      // y2 = m ? w2 u + 2 w1 u1 + w u2 : v2
      acc_t a2 = 0;
      a2 = add_product(a2, p.w2, j, p.u, i);
      if (p.w1 != nullptr && p.u1 != nullptr) {
        a2 = add_rn(a2, mul_rn(acc_t(2), mul_rn(static_cast<acc_t>(p.w1[j]),
                                                static_cast<acc_t>(p.u1[j]))));
      }
      a2 = add_product(a2, p.w, i, p.u2, j);
      p.y2[j] = on ? static_cast<T>(a2) : (p.v2 != nullptr ? p.v2[j] : T(0));
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> jet_dcs_cuda(
    const at::Tensor& w_in, const at::Tensor& u_in, const c10::optional<at::Tensor>& v_in,
    const c10::optional<at::Tensor>& mask_in, const c10::optional<at::Tensor>& w1_in,
    const c10::optional<at::Tensor>& u1_in, const c10::optional<at::Tensor>& v1_in,
    const c10::optional<at::Tensor>& w2_in, const c10::optional<at::Tensor>& u2_in,
    const c10::optional<at::Tensor>& v2_in, bool second) {
  const auto checked =
      check_jet_dcs_args(w_in, u_in, v_in, mask_in, w1_in, u1_in, v1_in, w2_in, u2_in, v2_in);
  const int64_t k_dirs = checked.first;
  const c10::optional<at::Tensor>& mask = checked.second;
  TORCH_INTERNAL_ASSERT(w_in.is_cuda());
  const c10::cuda::CUDAGuard guard(w_in.device());
  const at::Tensor w = w_in.contiguous(), u = u_in.contiguous(), v = contiguous_or_undefined(v_in),
                   w1 = contiguous_or_undefined(w1_in), u1 = contiguous_or_undefined(u1_in),
                   v1 = contiguous_or_undefined(v1_in), w2 = contiguous_or_undefined(w2_in),
                   u2 = contiguous_or_undefined(u2_in), v2 = contiguous_or_undefined(v2_in);
  const at::Tensor m = mask.has_value() ? mask->expand(w.sizes()).contiguous() : at::Tensor();
  at::Tensor y = at::empty(w.sizes(), w.options());
  const auto js = jet_sizes(k_dirs, w.sizes());
  at::Tensor y1 = at::empty(js, w.options()), y2 = second_tangent_output(second, js, w.options());
  const int64_t n = w.numel();
  if (n == 0) return {y, y1, y2};
  const c10::DeviceIndex dev = w.device().index();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "symfast_jet_dcs_cuda", [&] {
    const DcsJetArgs<scalar_t> p{
        w.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(v),
        ptr_or_null<scalar_t>(w1), ptr_or_null<scalar_t>(u1), ptr_or_null<scalar_t>(v1),
        ptr_or_null<scalar_t>(w2), ptr_or_null<scalar_t>(u2), ptr_or_null<scalar_t>(v2),
        m.defined() ? static_cast<const uint8_t*>(m.const_data_ptr()) : nullptr,
        y.mutable_data_ptr<scalar_t>(), y1.mutable_data_ptr<scalar_t>(),
        second ? y2.mutable_data_ptr<scalar_t>() : nullptr};
    launch(jet_dcs_kernel<scalar_t>, n, dev, p, n, k_dirs);
  });
  return {y, y1, y2};
}

// ------------------------------------------------------------ jet_dcs_group
// w is [outer, G, inner] (G = w.shape[dim]); element i has group (i / inner) % G.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    jet_dcs_group_kernel(const T* __restrict__ w, const T* __restrict__ s,
                         const T* __restrict__ w1, const T* __restrict__ s1,
                         const T* __restrict__ w2, const T* __restrict__ s2, T* __restrict__ y,
                         T* __restrict__ y1, T* __restrict__ y2, int64_t n, int64_t groups,
                         int64_t inner, int64_t k_dirs) {
  using acc_t = at::opmath_type<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const int64_t g = (i / inner) % groups;
    y[i] = static_cast<T>(mul_rn(static_cast<acc_t>(w[i]), static_cast<acc_t>(s[g])));
    for (int64_t k = 0; k < k_dirs; ++k) {
      const int64_t j = k * n + i, jg = k * groups + g;
      // y1 = w1 s + w s1
      acc_t a1 = 0;
      a1 = add_product(a1, w1, j, s, g);
      a1 = add_product(a1, w, i, s1, jg);
      y1[j] = static_cast<T>(a1);
      if (y2 == nullptr) continue;  // first order only
      // y2 = w2 s + 2 w1 s1 + w s2
      acc_t a2 = 0;
      a2 = add_product(a2, w2, j, s, g);
      if (w1 != nullptr && s1 != nullptr) {
        a2 = add_rn(a2, mul_rn(acc_t(2), mul_rn(static_cast<acc_t>(w1[j]),
                                                static_cast<acc_t>(s1[jg]))));
      }
      a2 = add_product(a2, w, i, s2, jg);
      y2[j] = static_cast<T>(a2);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> jet_dcs_group_cuda(
    const at::Tensor& w_in, const at::Tensor& s_in, int64_t dim_in,
    const c10::optional<at::Tensor>& w1_in, const c10::optional<at::Tensor>& s1_in,
    const c10::optional<at::Tensor>& w2_in, const c10::optional<at::Tensor>& s2_in, bool second) {
  const auto checked = check_jet_dcs_group_args(w_in, s_in, dim_in, w1_in, s1_in, w2_in, s2_in);
  const int64_t k_dirs = checked.first, dim = checked.second;
  TORCH_INTERNAL_ASSERT(w_in.is_cuda());
  const c10::cuda::CUDAGuard guard(w_in.device());
  const at::Tensor w = w_in.contiguous(), s = s_in.contiguous(),
                   w1 = contiguous_or_undefined(w1_in), s1 = contiguous_or_undefined(s1_in),
                   w2 = contiguous_or_undefined(w2_in), s2 = contiguous_or_undefined(s2_in);
  at::Tensor y = at::empty(w.sizes(), w.options());
  const auto js = jet_sizes(k_dirs, w.sizes());
  at::Tensor y1 = at::empty(js, w.options()), y2 = second_tangent_output(second, js, w.options());
  const int64_t n = w.numel();
  if (n == 0) return {y, y1, y2};
  const int64_t groups = w.size(dim);
  int64_t inner = 1;
  for (int64_t d = dim + 1; d < w.dim(); ++d) inner *= w.size(d);
  const c10::DeviceIndex dev = w.device().index();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "symfast_jet_dcs_group_cuda", [&] {
    launch(jet_dcs_group_kernel<scalar_t>, n, dev, w.const_data_ptr<scalar_t>(),
           s.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(w1), ptr_or_null<scalar_t>(s1),
           ptr_or_null<scalar_t>(w2), ptr_or_null<scalar_t>(s2), y.mutable_data_ptr<scalar_t>(),
           y1.mutable_data_ptr<scalar_t>(), second ? y2.mutable_data_ptr<scalar_t>() : nullptr, n,
           groups, inner, k_dirs);
  });
  return {y, y1, y2};
}

}  // namespace

TORCH_LIBRARY_IMPL(symfast, CUDA, m) {
  m.impl("jet_activation", &jet_activation_cuda);
  m.impl("jet_dcs", &jet_dcs_cuda);
  m.impl("jet_dcs_group", &jet_dcs_group_cuda);
}

}  // namespace symfast
