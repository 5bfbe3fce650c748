// CUDA kernels of the dcs ops: fused forward, backward and forward-mode.
//
// Each op is one pass over memory, and memory is all they cost (two flops per
// element at most), so the kernels are built for bandwidth:
//
// * Every operand is row-major contiguous with w's shape, so one flat 64-bit
//   index addresses the same element in all of them. Operands that are not
//   (strided views, a mask that broadcasts) are copied into that layout first;
//   see `dense` below for what that costs and why it is acceptable.
// * Each thread moves 16 bytes per operand per step (4 floats, 2 doubles,
//   8 halves) through `aligned_vector` loads and stores, plus as many mask
//   bytes (the mask is read as 1-byte bools, never widened). If any pointer is
//   not aligned for that (a view with an odd storage offset), the same kernel
//   is instantiated with 1-element "vectors" instead.
// * Grid-stride loops over a grid of at most one full wave of resident
//   blocks (grid_blocks in common.cuh), so any size, also above 2^31
//   elements, runs with a bounded grid.
//
// Numerics match csrc/cpu/dcs.cpp bit for bit: the mask acts as a select
// (m ? w*u : v), never as arithmetic (w*u + 0*v would be NaN where v is inf);
// half types compute in float (at::opmath_type) and round once; products and
// sums use explicitly rounded IEEE operations (see mul_rn/add_rn), so neither
// FMA contraction nor the flush-to-zero of --use_fast_math can change a result.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "../common.h"
#include "../dcs_checks.h"
#include "../static_switch.h"
#include "common.cuh"

namespace symfast {
namespace {

using namespace ::symfast::cuda;  // aligned_vector, load_vec, mul_rn, grid_blocks, ...

// Product of two storage values, computed in the accumulation type and rounded
// once to T, as the CPU kernels do.
template <typename T>
__device__ __forceinline__ T product(T a, T b) {
  using acc_t = at::opmath_type<T>;
  return static_cast<T>(mul_rn(static_cast<acc_t>(a), static_cast<acc_t>(b)));
}

// ----------------------------------------------------------- element ops
// Each op is a struct of raw pointers (pointers of operands an instantiation
// does not read stay null and are never dereferenced) with
//   apply<V>(i): compute elements [i, i + V), i a multiple of V;
//   aligned<V>(): whether every pointer allows V-element vector access.
// The mask is read as bytes (bool storage) and tested != 0.

// theta = m ? w * u : v   (v = 0 when absent; theta = w * u without a mask)
template <typename T, bool HAS_V, bool HAS_M>
struct ForwardOp {
  T* out;
  const T* w;
  const T* u;
  const T* v;
  const uint8_t* m;

  template <int V>
  __device__ __forceinline__ void apply(int64_t i) const {
    const auto wv = load_vec<V>(w, i), uv = load_vec<V>(u, i);
    aligned_vector<T, V> vv{}, o;
    aligned_vector<uint8_t, V> mv{};
    if constexpr (HAS_V) vv = load_vec<V>(v, i);
    if constexpr (HAS_M) mv = load_vec<V>(m, i);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const T prod = product(wv.val[k], uv.val[k]);
      if constexpr (HAS_M) {
        const T other = HAS_V ? vv.val[k] : T(0);
        o.val[k] = mv.val[k] ? prod : other;
      } else {
        o.val[k] = prod;
      }
    }
    store_vec<V>(out, i, o);
  }

  template <int V>
  bool aligned() const {
    return is_aligned<V>(out) && is_aligned<V>(w) && is_aligned<V>(u) && is_aligned<V>(v) &&
           is_aligned<V>(m);
  }
};

// grad_w = m ? u * g : 0,  grad_u = m ? w * g : 0,  grad_v = m ? 0 : g.
// w is read only for grad_u and u only for grad_w.
template <typename T, bool NW, bool NU, bool NV, bool HAS_M>
struct BackwardOp {
  T* gw;
  T* gu;
  T* gv;
  const T* g;
  const T* w;
  const T* u;
  const uint8_t* m;

  template <int V>
  __device__ __forceinline__ void apply(int64_t i) const {
    const auto gvec = load_vec<V>(g, i);
    aligned_vector<T, V> wv{}, uv{}, ow, ou, ov;
    aligned_vector<uint8_t, V> mv{};
    if constexpr (NU) wv = load_vec<V>(w, i);
    if constexpr (NW) uv = load_vec<V>(u, i);
    if constexpr (HAS_M) mv = load_vec<V>(m, i);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const T gk = gvec.val[k];
      const bool on = HAS_M ? mv.val[k] != 0 : true;
      if constexpr (NW) ow.val[k] = on ? product(uv.val[k], gk) : T(0);
      if constexpr (NU) ou.val[k] = on ? product(wv.val[k], gk) : T(0);
      if constexpr (NV) ov.val[k] = on ? T(0) : gk;
    }
    if constexpr (NW) store_vec<V>(gw, i, ow);
    if constexpr (NU) store_vec<V>(gu, i, ou);
    if constexpr (NV) store_vec<V>(gv, i, ov);
  }

  template <int V>
  bool aligned() const {
    return is_aligned<V>(gw) && is_aligned<V>(gu) && is_aligned<V>(gv) && is_aligned<V>(g) &&
           is_aligned<V>(w) && is_aligned<V>(u) && is_aligned<V>(m);
  }
};

// theta_dot = m ? w_dot * u + w * u_dot : v_dot, missing tangents being 0.
// w is read only with u_dot, u only with w_dot. The sum starts from +0 and
// adds each product in turn, like the CPU loop, so even the sign of a zero
// result matches.
template <typename T, bool HWD, bool HUD, bool HVD, bool HAS_M>
struct JvpOp {
  T* out;
  const T* w;
  const T* u;
  const T* wd;
  const T* ud;
  const T* vd;
  const uint8_t* m;

  template <int V>
  __device__ __forceinline__ void apply(int64_t i) const {
    using acc_t = at::opmath_type<T>;
    aligned_vector<T, V> wv{}, uv{}, wdv{}, udv{}, vdv{}, o;
    aligned_vector<uint8_t, V> mv{};
    if constexpr (HUD) wv = load_vec<V>(w, i);
    if constexpr (HWD) uv = load_vec<V>(u, i);
    if constexpr (HWD) wdv = load_vec<V>(wd, i);
    if constexpr (HUD) udv = load_vec<V>(ud, i);
    if constexpr (HVD) vdv = load_vec<V>(vd, i);
    if constexpr (HAS_M) mv = load_vec<V>(m, i);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      acc_t acc = 0;
      if constexpr (HWD) {
        acc = add_rn(acc, mul_rn(static_cast<acc_t>(wdv.val[k]), static_cast<acc_t>(uv.val[k])));
      }
      if constexpr (HUD) {
        acc = add_rn(acc, mul_rn(static_cast<acc_t>(wv.val[k]), static_cast<acc_t>(udv.val[k])));
      }
      const T on_val = static_cast<T>(acc);
      if constexpr (HAS_M) {
        const T off_val = HVD ? vdv.val[k] : T(0);
        o.val[k] = mv.val[k] ? on_val : off_val;
      } else {
        o.val[k] = on_val;
      }
    }
    store_vec<V>(out, i, o);
  }

  template <int V>
  bool aligned() const {
    return is_aligned<V>(out) && is_aligned<V>(w) && is_aligned<V>(u) && is_aligned<V>(wd) &&
           is_aligned<V>(ud) && is_aligned<V>(vd) && is_aligned<V>(m);
  }
};

// ------------------------------------------------------------------ launch
// Grid-stride loop: whole V-element vectors first, then the n % V tail one
// element at a time. Indices are 64-bit throughout.
template <int V, typename Op>
__global__ void __launch_bounds__(kThreads) elementwise_kernel(const Op op, const int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n_vec = n / V;
  for (int64_t j = start; j < n_vec; j += stride) op.template apply<V>(j * V);
  if constexpr (V > 1) {
    for (int64_t i = n_vec * V + start; i < n; i += stride) op.template apply<1>(i);
  }
}

// Runs op over n > 0 elements on the current stream of device dev, with
// 16-byte vectors when every pointer allows it.
template <typename T, typename Op>
void launch(const Op& op, int64_t n, c10::DeviceIndex dev) {
  TORCH_INTERNAL_ASSERT(n > 0);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev).stream();
  BOOL_SWITCH(op.template aligned<kVec<T>>(), VECTORIZED, [&] {
    constexpr int V = VECTORIZED ? kVec<T> : 1;
    // A partial tail counts as one more item.
    const int blocks = grid_blocks(elementwise_kernel<V, Op>, ceil_div(n, V), dev);
    elementwise_kernel<V><<<blocks, kThreads, 0, stream>>>(op, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ------------------------------------------------------------ host helpers
// The operand in the kernels' layout: row-major contiguous with w's shape.
// A no-op (no copy) for the common case of a contiguous operand of w's shape.
// Otherwise this materializes a copy: a strided view (transpose, slice, an
// expanded grad such as sum()'s backward produces) costs one extra read and
// write of that operand; a mask that broadcasts (e.g. one mask row shared by a
// batch) is expanded to w's numel, one byte per element. Indexing such
// operands in the kernel instead would need a per-element index computation;
// the copy keeps the hot loop a pure stream.
at::Tensor dense(const at::Tensor& t, const at::Tensor& w) {
  return t.expand(w.sizes()).contiguous();
}

const uint8_t* mask_ptr_or_null(const at::Tensor& m) {
  // bool storage is one byte per element holding 0 or 1.
  return m.defined() ? static_cast<const uint8_t*>(m.const_data_ptr()) : nullptr;
}

at::Tensor dense_or_undefined(const c10::optional<at::Tensor>& t, const at::Tensor& w) {
  return t.has_value() ? dense(*t, w) : at::Tensor();
}

// ------------------------------------------------------------------ forward
at::Tensor dcs_cuda(const at::Tensor& w, const at::Tensor& u, const c10::optional<at::Tensor>& v,
                    const c10::optional<at::Tensor>& mask_in) {
  const auto mask = check_dcs_args(w, u, v, mask_in);
  // The dispatcher chose CUDA, so some operand is on a GPU, and the checks
  // above put all of them on w's device.
  TORCH_INTERNAL_ASSERT(w.is_cuda());
  const c10::cuda::CUDAGuard guard(w.device());

  at::Tensor out = at::empty(w.sizes(), w.options());
  const int64_t n = w.numel();
  if (n == 0) return out;
  const at::Tensor wc = dense(w, w), uc = dense(u, w), vc = dense_or_undefined(v, w),
                   mc = dense_or_undefined(mask, w);
  const c10::DeviceIndex dev = w.device().index();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "symfast_dcs_cuda", [&] {
    BOOL_SWITCH(mask.has_value(), HM, [&] {
      BOOL_SWITCH(v.has_value(), HV, [&] {
        if constexpr (HM || !HV) {  // v without a mask was rejected above
          const ForwardOp<scalar_t, HV, HM> f{out.mutable_data_ptr<scalar_t>(),
                                              wc.const_data_ptr<scalar_t>(),
                                              uc.const_data_ptr<scalar_t>(),
                                              ptr_or_null<scalar_t>(vc), mask_ptr_or_null(mc)};
          launch<scalar_t>(f, n, dev);
        }
      });
    });
  });
  return out;
}

// ----------------------------------------------------------------- backward
std::tuple<at::Tensor, at::Tensor, at::Tensor> dcs_backward_cuda(
    const at::Tensor& grad, const at::Tensor& w, const at::Tensor& u,
    const c10::optional<at::Tensor>& mask_in, bool w_needed, bool u_needed, bool v_needed) {
  const auto mask = check_dcs_backward_args(grad, w, u, mask_in, v_needed);
  TORCH_INTERNAL_ASSERT(w.is_cuda());
  const c10::cuda::CUDAGuard guard(w.device());

  auto output = [&](bool needed) {
    return needed ? at::empty(w.sizes(), w.options()) : unneeded_gradient(w.options());
  };
  at::Tensor gw = output(w_needed), gu = output(u_needed), gv = output(v_needed);
  const int64_t n = w.numel();
  if (!(w_needed || u_needed || v_needed) || n == 0) return {gw, gu, gv};

  // Densify only what the needed gradients read.
  const at::Tensor gc = dense(grad, w);
  const at::Tensor wc = u_needed ? dense(w, w) : at::Tensor();
  const at::Tensor uc = w_needed ? dense(u, w) : at::Tensor();
  const at::Tensor mc = dense_or_undefined(mask, w);
  const c10::DeviceIndex dev = w.device().index();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "symfast_dcs_backward_cuda", [&] {
    BOOL_SWITCH(w_needed, NW, [&] {
      BOOL_SWITCH(u_needed, NU, [&] {
        BOOL_SWITCH(v_needed, NV, [&] {
          BOOL_SWITCH(mask.has_value(), HM, [&] {
            if constexpr (dcs_flags_occur(NW, NU, NV, HM)) {
              const BackwardOp<scalar_t, NW, NU, NV, HM> f{
                  NW ? gw.mutable_data_ptr<scalar_t>() : nullptr,
                  NU ? gu.mutable_data_ptr<scalar_t>() : nullptr,
                  NV ? gv.mutable_data_ptr<scalar_t>() : nullptr,
                  gc.const_data_ptr<scalar_t>(),
                  ptr_or_null<scalar_t>(wc),
                  ptr_or_null<scalar_t>(uc),
                  mask_ptr_or_null(mc)};
              launch<scalar_t>(f, n, dev);
            }
          });
        });
      });
    });
  });
  return {gw, gu, gv};
}

// ------------------------------------------------------------ forward mode
at::Tensor dcs_jvp_cuda(const at::Tensor& w, const at::Tensor& u,
                        const c10::optional<at::Tensor>& mask_in,
                        const c10::optional<at::Tensor>& w_dot,
                        const c10::optional<at::Tensor>& u_dot,
                        const c10::optional<at::Tensor>& v_dot) {
  const auto mask = check_dcs_jvp_args(w, u, mask_in, w_dot, u_dot, v_dot);
  TORCH_INTERNAL_ASSERT(w.is_cuda());
  const c10::cuda::CUDAGuard guard(w.device());

  const bool hwd = w_dot.has_value(), hud = u_dot.has_value(), hvd = v_dot.has_value();
  if (!(hwd || hud || hvd)) return at::zeros(w.sizes(), w.options());
  at::Tensor out = at::empty(w.sizes(), w.options());
  const int64_t n = w.numel();
  if (n == 0) return out;

  // Densify only what the given tangents read.
  const at::Tensor wc = hud ? dense(w, w) : at::Tensor();
  const at::Tensor uc = hwd ? dense(u, w) : at::Tensor();
  const at::Tensor wdc = dense_or_undefined(w_dot, w), udc = dense_or_undefined(u_dot, w),
                   vdc = dense_or_undefined(v_dot, w), mc = dense_or_undefined(mask, w);
  const c10::DeviceIndex dev = w.device().index();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "symfast_dcs_jvp_cuda", [&] {
    BOOL_SWITCH(hwd, HWD, [&] {
      BOOL_SWITCH(hud, HUD, [&] {
        BOOL_SWITCH(hvd, HVD, [&] {
          BOOL_SWITCH(mask.has_value(), HM, [&] {
            if constexpr (dcs_flags_occur(HWD, HUD, HVD, HM)) {
              const JvpOp<scalar_t, HWD, HUD, HVD, HM> f{out.mutable_data_ptr<scalar_t>(),
                                                         ptr_or_null<scalar_t>(wc),
                                                         ptr_or_null<scalar_t>(uc),
                                                         ptr_or_null<scalar_t>(wdc),
                                                         ptr_or_null<scalar_t>(udc),
                                                         ptr_or_null<scalar_t>(vdc),
                                                         mask_ptr_or_null(mc)};
              launch<scalar_t>(f, n, dev);
            }
          });
        });
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(symfast, CUDA, m) {
  m.impl("dcs", &dcs_cuda);
  m.impl("dcs_backward", &dcs_backward_cuda);
  m.impl("dcs_jvp", &dcs_jvp_cuda);
}

}  // namespace symfast
