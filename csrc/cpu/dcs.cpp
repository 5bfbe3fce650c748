// CPU kernels of the dcs ops: fused forward, backward and forward-mode.
//
// Each op is one pass over memory. at::TensorIterator does the broadcasting and
// stride bookkeeping (no copies for strided or broadcast inputs) and splits the
// work over threads with at::parallel_for. The inner loops are written once,
// templated on whether the operands are contiguous: in the contiguous case the
// strides are the compile-time constant 1 and the loop is a branchless select
// over restrict pointers, which the compiler vectorizes (check with
// -fopt-info-vec). The select is done on the bits (select_bits below): a
// `m ? a : b` on a bool loaded from memory compiles to a branch, and with a
// random mask that branch mispredicts half the time, which costs an order of
// magnitude more than the bit select. A select rather than (1-m)*v + m*w*u keeps
// the result exact (w*u, not w*u + 0*v, which is NaN when v is inf). Half
// types compute in float (at::opmath_type) and round once. Outputs come from
// empty_output (output_cache.h), which avoids paying for fresh pages. The
// contiguous forward and backward loops run in AVX2 where the CPU has it
// (isa.h); they hold only products and selects, so every ISA rounds alike.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <torch/library.h>

#include "../common.h"
#include "../dcs_checks.h"
#include "../static_switch.h"
#include "isa.h"
#include "loop_hints.h"
#include "output_cache.h"

#include <cstring>

namespace symfast {
namespace {

// Runs fn(data, strides, n, contiguous) over 1-D slices of the iterator, in
// parallel. `contiguous` is true when every operand's inner stride equals its
// element size, which is the common case and the fast path.
template <typename Fn>
void for_each_slice(at::TensorIteratorBase& iter, const Fn& fn) {
  constexpr int kMaxOperands = 8;  // the ops have at most 7
  const int nt = iter.ntensors();
  TORCH_INTERNAL_ASSERT(nt <= kMaxOperands);
  int64_t elsize[kMaxOperands];
  for (int k = 0; k < nt; ++k) elsize[k] = iter.element_size(k);
  iter.for_each(
      [&](char** base, const int64_t* strides, int64_t size0, int64_t size1) {
        char* data[kMaxOperands];
        std::copy(base, base + nt, data);
        bool contiguous = true;
        for (int k = 0; k < nt; ++k) contiguous &= strides[k] == elsize[k];
        for (int64_t j = 0; j < size1; ++j) {
          if (j > 0) {
            for (int k = 0; k < nt; ++k) data[k] += strides[nt + k];
          }
          fn(data, strides, size0, contiguous);
        }
      },
      kGrainSize);
}

template <size_t N> struct UIntOfSize;
template <> struct UIntOfSize<2> { using type = uint16_t; };
template <> struct UIntOfSize<4> { using type = uint32_t; };
template <> struct UIntOfSize<8> { using type = uint64_t; };

// on ? a : b, exact and branchless: an all-ones or all-zeros bit mask picks
// the bits of a or b. The compiler turns this into vector and/andnot/or.
// `on` is a mask byte: any nonzero byte is true, as torch reads a bool (a
// uint8 tensor viewed as bool may hold 2 or 255), so the selector is built
// from on != 0; U(0) - U(on) would have mixed the bits of a and b.
template <typename T>
C10_ALWAYS_INLINE T select_bits(uint8_t on, T a, T b) {
  using U = typename UIntOfSize<sizeof(T)>::type;
  const U sel = U(0) - U(on != 0);
  U ua, ub;
  std::memcpy(&ua, &a, sizeof(T));
  std::memcpy(&ub, &b, sizeof(T));
  const U r = (ua & sel) | (ub & ~sel);
  T out;
  std::memcpy(&out, &r, sizeof(T));
  return out;
}

// Strides in elements; a compile-time 1 in the contiguous instantiation.
template <bool CONTIG, typename T>
inline int64_t elem_stride(const int64_t* strides, int k) {
  return CONTIG ? 1 : strides[k] / static_cast<int64_t>(sizeof(T));
}

// ---------------------------------------------------------------- forward
// operands: out, w, u, [v], [mask]
template <bool CONTIG, typename T, bool HAS_V, bool HAS_M>
C10_ALWAYS_INLINE void forward_slice(char** data, const int64_t* st, int64_t n) {
  using acc_t = at::opmath_type<T>;
  constexpr int kV = 3, kM = HAS_V ? 4 : 3;
  T* __restrict__ out = reinterpret_cast<T*>(data[0]);
  const T* __restrict__ w = reinterpret_cast<const T*>(data[1]);
  const T* __restrict__ u = reinterpret_cast<const T*>(data[2]);
  const T* __restrict__ v = HAS_V ? reinterpret_cast<const T*>(data[kV]) : nullptr;
  const uint8_t* __restrict__ m = HAS_M ? reinterpret_cast<const uint8_t*>(data[kM]) : nullptr;
  const int64_t so = elem_stride<CONTIG, T>(st, 0), sw = elem_stride<CONTIG, T>(st, 1),
                su = elem_stride<CONTIG, T>(st, 2),
                sv = HAS_V ? elem_stride<CONTIG, T>(st, kV) : 0,
                sm = HAS_M ? elem_stride<CONTIG, uint8_t>(st, kM) : 0;
  SYMFAST_NO_LOOP_DEPENDENCIES
  for (int64_t i = 0; i < n; ++i) {
    const T prod = static_cast<T>(static_cast<acc_t>(w[i * sw]) * static_cast<acc_t>(u[i * su]));
    if constexpr (HAS_M) {
      const T other = HAS_V ? v[i * sv] : T(0);
      out[i * so] = select_bits(m[i * sm], prod, other);
    } else {
      out[i * so] = select_bits(1, prod, prod);  // GCC does not vectorize a plain BFloat16 store
    }
  }
}

// The contiguous loop, run for the best instruction set of this CPU (isa.h).
template <typename T, bool HAS_V, bool HAS_M>
struct ForwardContiguous {
  static C10_ALWAYS_INLINE void run(char** d, const int64_t* s, int64_t n) {
    forward_slice<true, T, HAS_V, HAS_M>(d, s, n);
  }
};

at::Tensor dcs_cpu(const at::Tensor& w, const at::Tensor& u, const c10::optional<at::Tensor>& v,
                   const c10::optional<at::Tensor>& mask_in) {
  const auto mask = check_dcs_args(w, u, v, mask_in);

  at::Tensor out = empty_output(w.sizes(), w.options());
  at::TensorIteratorConfig config;
  config.check_all_same_dtype(false).resize_outputs(false).add_output(out).add_const_input(w)
      .add_const_input(u);
  if (v.has_value()) config.add_const_input(*v);
  if (mask.has_value()) config.add_const_input(*mask);
  auto iter = config.build();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "symfast_dcs_cpu", [&] {
    BOOL_SWITCH(mask.has_value(), HM, [&] {
      BOOL_SWITCH(v.has_value(), HV, [&] {
        if constexpr (HM || !HV) {  // v without a mask was rejected above
          for_each_slice(iter, [](char** d, const int64_t* s, int64_t n, bool contiguous) {
            contiguous ? run_best<ForwardContiguous<scalar_t, HV, HM>>(d, s, n)
                       : forward_slice<false, scalar_t, HV, HM>(d, s, n);
          });
        }
      });
    });
  });
  return out;
}

// --------------------------------------------------------------- backward
// operands: [grad_w], [grad_u], [grad_v], grad, [w], [u], [mask]
// w is read only for grad_u and u only for grad_w.
template <bool CONTIG, typename T, bool NW, bool NU, bool NV, bool HAS_M>
C10_ALWAYS_INLINE void backward_slice(char** data, const int64_t* st, int64_t n) {
  using acc_t = at::opmath_type<T>;
  constexpr int kGW = 0, kGU = NW, kGV = NW + NU, kG = NW + NU + NV, kW = kG + 1,
                kU = kW + NU, kM = kU + NW;
  T* __restrict__ gw = NW ? reinterpret_cast<T*>(data[kGW]) : nullptr;
  T* __restrict__ gu = NU ? reinterpret_cast<T*>(data[kGU]) : nullptr;
  T* __restrict__ gv = NV ? reinterpret_cast<T*>(data[kGV]) : nullptr;
  const T* __restrict__ g = reinterpret_cast<const T*>(data[kG]);
  const T* __restrict__ w = NU ? reinterpret_cast<const T*>(data[kW]) : nullptr;
  const T* __restrict__ u = NW ? reinterpret_cast<const T*>(data[kU]) : nullptr;
  const uint8_t* __restrict__ m = HAS_M ? reinterpret_cast<const uint8_t*>(data[kM]) : nullptr;
  const int64_t sgw = NW ? elem_stride<CONTIG, T>(st, kGW) : 0,
                sgu = NU ? elem_stride<CONTIG, T>(st, kGU) : 0,
                sgv = NV ? elem_stride<CONTIG, T>(st, kGV) : 0, sg = elem_stride<CONTIG, T>(st, kG),
                sw = NU ? elem_stride<CONTIG, T>(st, kW) : 0,
                su = NW ? elem_stride<CONTIG, T>(st, kU) : 0,
                sm = HAS_M ? elem_stride<CONTIG, uint8_t>(st, kM) : 0;
  SYMFAST_NO_LOOP_DEPENDENCIES
  for (int64_t i = 0; i < n; ++i) {
    const T gi = g[i * sg];
    const uint8_t on = HAS_M ? m[i * sm] : 1;
    if constexpr (NW) {
      const T val = static_cast<T>(static_cast<acc_t>(u[i * su]) * static_cast<acc_t>(gi));
      gw[i * sgw] = select_bits(on, val, T(0));  // on = 1 without a mask
    }
    if constexpr (NU) {
      const T val = static_cast<T>(static_cast<acc_t>(w[i * sw]) * static_cast<acc_t>(gi));
      gu[i * sgu] = select_bits(on, val, T(0));
    }
    if constexpr (NV) gv[i * sgv] = select_bits(on, T(0), gi);
  }
}

template <typename T, bool NW, bool NU, bool NV, bool HAS_M>
struct BackwardContiguous {
  static C10_ALWAYS_INLINE void run(char** d, const int64_t* s, int64_t n) {
    backward_slice<true, T, NW, NU, NV, HAS_M>(d, s, n);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> dcs_backward_cpu(
    const at::Tensor& grad, const at::Tensor& w, const at::Tensor& u,
    const c10::optional<at::Tensor>& mask_in, bool w_needed, bool u_needed, bool v_needed) {
  const auto mask = check_dcs_backward_args(grad, w, u, mask_in, v_needed);
  auto output = [&](bool needed) {
    return needed ? empty_output(w.sizes(), w.options()) : unneeded_gradient(w.options());
  };
  at::Tensor gw = output(w_needed), gu = output(u_needed), gv = output(v_needed);
  if (!(w_needed || u_needed || v_needed)) return {gw, gu, gv};

  at::TensorIteratorConfig config;
  config.check_all_same_dtype(false).resize_outputs(false);
  if (w_needed) config.add_output(gw);
  if (u_needed) config.add_output(gu);
  if (v_needed) config.add_output(gv);
  config.add_const_input(grad);
  if (u_needed) config.add_const_input(w);
  if (w_needed) config.add_const_input(u);
  if (mask.has_value()) config.add_const_input(*mask);
  auto iter = config.build();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "symfast_dcs_backward_cpu", [&] {
    BOOL_SWITCH(w_needed, NW, [&] {
      BOOL_SWITCH(u_needed, NU, [&] {
        BOOL_SWITCH(v_needed, NV, [&] {
          BOOL_SWITCH(mask.has_value(), HM, [&] {
            if constexpr (dcs_flags_occur(NW, NU, NV, HM)) {
              for_each_slice(iter, [](char** d, const int64_t* s, int64_t n, bool contiguous) {
                contiguous ? run_best<BackwardContiguous<scalar_t, NW, NU, NV, HM>>(d, s, n)
                           : backward_slice<false, scalar_t, NW, NU, NV, HM>(d, s, n);
              });
            }
          });
        });
      });
    });
  });
  return {gw, gu, gv};
}

// ----------------------------------------------------------- forward mode
// operands: out, [w], [u], [w_dot], [u_dot], [v_dot], [mask]
// w is read only with u_dot, u only with w_dot.
template <bool CONTIG, typename T, bool HWD, bool HUD, bool HVD, bool HAS_M>
void jvp_slice(char** data, const int64_t* st, int64_t n) {
  using acc_t = at::opmath_type<T>;
  constexpr int kO = 0, kW = 1, kU = kW + HUD, kWD = kU + HWD, kUD = kWD + HWD, kVD = kUD + HUD,
                kM = kVD + HVD;
  T* __restrict__ out = reinterpret_cast<T*>(data[kO]);
  const T* __restrict__ w = HUD ? reinterpret_cast<const T*>(data[kW]) : nullptr;
  const T* __restrict__ u = HWD ? reinterpret_cast<const T*>(data[kU]) : nullptr;
  const T* __restrict__ wd = HWD ? reinterpret_cast<const T*>(data[kWD]) : nullptr;
  const T* __restrict__ ud = HUD ? reinterpret_cast<const T*>(data[kUD]) : nullptr;
  const T* __restrict__ vd = HVD ? reinterpret_cast<const T*>(data[kVD]) : nullptr;
  const uint8_t* __restrict__ m = HAS_M ? reinterpret_cast<const uint8_t*>(data[kM]) : nullptr;
  const int64_t so = elem_stride<CONTIG, T>(st, kO), sw = HUD ? elem_stride<CONTIG, T>(st, kW) : 0,
                su = HWD ? elem_stride<CONTIG, T>(st, kU) : 0,
                swd = HWD ? elem_stride<CONTIG, T>(st, kWD) : 0,
                sud = HUD ? elem_stride<CONTIG, T>(st, kUD) : 0,
                svd = HVD ? elem_stride<CONTIG, T>(st, kVD) : 0,
                sm = HAS_M ? elem_stride<CONTIG, uint8_t>(st, kM) : 0;
  SYMFAST_NO_LOOP_DEPENDENCIES
  for (int64_t i = 0; i < n; ++i) {
    acc_t acc = 0;
    if constexpr (HWD) acc += static_cast<acc_t>(wd[i * swd]) * static_cast<acc_t>(u[i * su]);
    if constexpr (HUD) acc += static_cast<acc_t>(w[i * sw]) * static_cast<acc_t>(ud[i * sud]);
    const T on_val = static_cast<T>(acc);
    if constexpr (HAS_M) {
      const T off_val = HVD ? vd[i * svd] : T(0);
      out[i * so] = select_bits(m[i * sm], on_val, off_val);
    } else {
      out[i * so] = on_val;
    }
  }
}

at::Tensor dcs_jvp_cpu(const at::Tensor& w, const at::Tensor& u,
                       const c10::optional<at::Tensor>& mask_in,
                       const c10::optional<at::Tensor>& w_dot,
                       const c10::optional<at::Tensor>& u_dot,
                       const c10::optional<at::Tensor>& v_dot) {
  const auto mask = check_dcs_jvp_args(w, u, mask_in, w_dot, u_dot, v_dot);
  const bool hwd = w_dot.has_value(), hud = u_dot.has_value(), hvd = v_dot.has_value();
  if (!(hwd || hud || hvd)) return at::zeros(w.sizes(), w.options());

  at::Tensor out = empty_output(w.sizes(), w.options());
  at::TensorIteratorConfig config;
  config.check_all_same_dtype(false).resize_outputs(false).add_output(out);
  if (hud) config.add_const_input(w);
  if (hwd) config.add_const_input(u);
  if (hwd) config.add_const_input(*w_dot);
  if (hud) config.add_const_input(*u_dot);
  if (hvd) config.add_const_input(*v_dot);
  if (mask.has_value()) config.add_const_input(*mask);
  auto iter = config.build();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "symfast_dcs_jvp_cpu", [&] {
    BOOL_SWITCH(hwd, HWD, [&] {
      BOOL_SWITCH(hud, HUD, [&] {
        BOOL_SWITCH(hvd, HVD, [&] {
          BOOL_SWITCH(mask.has_value(), HM, [&] {
            if constexpr (dcs_flags_occur(HWD, HUD, HVD, HM)) {
              for_each_slice(iter, [](char** d, const int64_t* s, int64_t n, bool contiguous) {
                contiguous ? jvp_slice<true, scalar_t, HWD, HUD, HVD, HM>(d, s, n)
                           : jvp_slice<false, scalar_t, HWD, HUD, HVD, HM>(d, s, n);
              });
            }
          });
        });
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(symfast, CPU, m) {
  m.impl("dcs", &dcs_cpu);
  m.impl("dcs_backward", &dcs_backward_cpu);
  m.impl("dcs_jvp", &dcs_jvp_cpu);
}

}  // namespace symfast
