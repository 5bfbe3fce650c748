// CPU kernels of the pointwise jet ops: jet_activation, jet_dcs, jet_dcs_group.
//
// Each op reads (primal, first and second tangents) and writes (y, y1, y2) in
// one pass. The tangents have K directions, [K, *S], and are mostly what the
// pass moves, so the loops are blocked: for kBlock elements of the primal the
// per-element quantities (f, f', f'' of an activation; w, u, the mask; the
// gate of each element) are computed once into small arrays, then applied to
// the same kBlock elements of each of the K directions. Each of those inner
// loops is a flat, contiguous stream that the compiler vectorizes, and the
// arrays stay in L1. Which tangents are present is tested once per block and
// direction, outside the element loops, so no kernel is compiled per
// combination of present tangents.
//
// Operands are made contiguous first (.contiguous(): no copy when they already
// are; a strided view costs one extra read and write of that operand, and a
// mask that broadcasts is expanded to w's numel, one byte per element), so that
// one flat 64-bit index addresses all of them.
//
// Numerics: half types compute in float (at::opmath_type) and round once. jet_dcs and
// jet_dcs_group sum their products in the order of symfast/reference.py (from
// +0, term by term; setup.py's -ffp-contract=off forbids FMAs), so they equal
// the reference bit for bit. jet_activation evaluates the closed forms of
// jet_activation_math.h (the smooth kinds with ATen's vector math, see
// transcendentals), which differ from the reference only by the last bits
// of exp/erfc/tanh.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "../common.h"
#include "../jet_activation_math.h"
#include "../jet_pointwise_checks.h"
#include "loop_hints.h"
#include "output_cache.h"

namespace symfast {
namespace {

// Primal elements per block: the per-element arrays (a few of them, 8 bytes
// per element at most) stay well inside L1.
constexpr int64_t kBlock = 256;

std::vector<int64_t> jet_sizes(int64_t k, at::IntArrayRef s) {
  std::vector<int64_t> out{k};
  out.insert(out.end(), s.begin(), s.end());
  return out;
}

// second_tangent_output (common.h) from the cache of CPU output blocks.
at::Tensor second_output(bool second, at::IntArrayRef sizes, const at::TensorOptions& options) {
  return second ? empty_output(sizes, options) : unneeded_gradient(options);
}

// Primal elements per at::parallel_for task: kGrainSize elements of output
// in all, each primal element carrying 1 + 2K of them.
int64_t jet_grain(int64_t k) { return std::max<int64_t>(kBlock, kGrainSize / (1 + 2 * k)); }

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

at::Tensor contiguous_or_undefined(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

// ------------------------------------------------------------ jet_activation
// The smooth activations need exp, erfc and tanh per element. This file is
// compiled for the baseline ISA (csrc/cpu/isa.h), where those are scalar libm
// calls (about 20 ns each: they cost more than all the tangent loops at K = 3),
// while ATen's own kernels evaluate them with AVX2/AVX-512 vector math chosen at
// run time. So for these kinds the task's f, f', f'' are computed first by ATen
// ops on the task's slice of x (in acc_t, a few KiB that stay in L2), with the
// closed forms and order of operations of jet_activation_math.h; the blocked
// tangent loops below then read them. ReLU and softplus (a select, a branch)
// stay on the scalar forms.
// Below this many elements a task's ATen calls (a few microseconds each) cost
// more than the scalar libm calls they replace.
constexpr int64_t kVectorMathMin = 1024;

template <Activation A>
constexpr bool kVectorMath = A == Activation::kGelu || A == Activation::kGeluTanh ||
                             A == Activation::kSilu || A == Activation::kTanh ||
                             A == Activation::kSigmoid;

// 4 sigma(2x) sigma(-2x) = 1 - tanh(x)^2, as sech2_of.
inline at::Tensor sech2_tensor(const at::Tensor& x) {
  return at::sigmoid(x * 2.0).mul_(at::sigmoid(x * -2.0)).mul_(4.0);
}

// Only the transcendental functions go through ATen (erfc, exp, tanh, sigmoid,
// each one op on the task's slice); the products and sums that make f, f', f''
// of them are done per element in the block loop below (combine_derivatives),
// which vectorizes, instead of as a dozen more ATen ops with a temporary each.
// The expressions and their order are those of jet_activation_math.h's
// closed forms, so every level of the instruction set rounds the same.
template <Activation A>
std::array<at::Tensor, 3> transcendentals(const at::Tensor& x) {
  constexpr double kSqrt1_2 = 0.7071067811865476;
  constexpr double kTanhC = 0.7978845608028654, kTanhA = 0.044715;
  if constexpr (A == Activation::kGelu) {
    // erfc(-x / sqrt 2), exp(-x^2 / 2)
    return {at::erfc(x * -kSqrt1_2), (x * x).mul_(-0.5).exp_(), at::Tensor()};
  } else if constexpr (A == Activation::kGeluTanh) {
    // f, f', f'' outright: the inner polynomial u(x) feeds three functions
    const at::Tensor x2 = x * x;
    const at::Tensor u = (x + (x2 * x) * kTanhA) * kTanhC;
    const at::Tensor half_1pt = at::sigmoid(u * 2.0), t = at::tanh(u), sech2 = sech2_tensor(u);
    const at::Tensor du = (x2 * (3 * kTanhA) + 1.0) * kTanhC;
    const at::Tensor ddu = x * (kTanhC * 6 * kTanhA);
    const at::Tensor half_x = x * 0.5;
    return {x * half_1pt, half_1pt + half_x * sech2 * du,
            sech2 * (du + half_x * (ddu - t * 2.0 * du * du))};
  } else if constexpr (A == Activation::kSilu || A == Activation::kSigmoid) {
    return {at::sigmoid(x), at::sigmoid(-x), at::Tensor()};
  } else {  // tanh: expm1(-2|x|), exp(-2|x|) (two functions where tanh and sigma(+-2x) took three)
    at::Tensor a = x.abs().mul_(-2.0);
    at::Tensor em1 = at::expm1(a);
    return {em1, a.exp_(), at::Tensor()};
  }
}

// f, f', f'' of one element from x and its transcendentals e0, e1, e2 (above).
template <Activation A, typename acc_t>
C10_ALWAYS_INLINE void combine_derivatives(acc_t x, acc_t e0, acc_t e1, acc_t e2, acc_t& f, acc_t& d1,
                                           acc_t& d2) {
  constexpr acc_t kInvSqrt2Pi = static_cast<acc_t>(0.3989422804014327);
  if constexpr (A == Activation::kGelu) {
    const acc_t cdf = e0 * acc_t(0.5), pdf = e1 * kInvSqrt2Pi;
    f = x * cdf;
    d1 = cdf + x * pdf;
    d2 = pdf * (acc_t(2) - x * x);
  } else if constexpr (A == Activation::kGeluTanh) {
    f = e0;
    d1 = e1;
    d2 = e2;
  } else if constexpr (A == Activation::kSigmoid) {
    f = e0;
    d1 = e0 * e1;
    d2 = d1 * (e1 - e0);
  } else if constexpr (A == Activation::kSilu) {
    f = x * e0;
    d1 = e0 * (x * e1 + acc_t(1));
    d2 = e0 * e1 * (x * (e1 - e0) + acc_t(2));
  } else {
    // tanh with e = exp(-2|x|): tanh|x| = (1 - e) / (1 + e), 1 - e from expm1 (no
    // cancellation near 0), and 1 - tanh(x)^2 = 4 e / (1 + e)^2, which keeps its
    // relative accuracy where it underflows (never 1 - t^2)
    const acc_t q = acc_t(2) + e0;
    const acc_t t = std::copysign(-e0 / q, x);
    const acc_t sech2 = acc_t(4) * e1 / (q * q);
    f = t;
    d1 = sech2;
    d2 = t * acc_t(-2) * sech2;
  }
}

template <typename T, Activation A>
void activation_range(const T* x, const T* x1, const T* x2, T* y, T* y1, T* y2, int64_t n,
                      int64_t k_dirs, int64_t begin, int64_t end, at::opmath_type<T> beta,
                      at::opmath_type<T> threshold) {
  using acc_t = at::opmath_type<T>;
  acc_t d1[kBlock], d2[kBlock];
  // transcendentals of the whole task (vector math, see above), or none (scalar forms)
  std::array<at::Tensor, 3> ve;
  const bool vector_math = kVectorMath<A> && end - begin >= kVectorMathMin;
  if (vector_math) {
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor xs = at::from_blob(const_cast<T*>(x + begin), {end - begin},
                                        at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value))
                              .to(acc);
    if constexpr (kVectorMath<A>) ve = transcendentals<A>(xs);
  }
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t len = std::min(kBlock, end - b);
    if (vector_math) {
      auto at_or_x = [&](const at::Tensor& e) {
        return e.defined() ? e.const_data_ptr<acc_t>() + (b - begin) : nullptr;
      };
      const acc_t* __restrict__ e0 = at_or_x(ve[0]);
      const acc_t* __restrict__ e1 = at_or_x(ve[1]);
      const acc_t* __restrict__ e2 = at_or_x(ve[2]);
      // an absent transcendental is read as e0 (never used by that kind)
      if (e1 == nullptr) e1 = e0;
      if (e2 == nullptr) e2 = e0;
      SYMFAST_NO_LOOP_DEPENDENCIES
      for (int64_t i = 0; i < len; ++i) {
        acc_t f;
        combine_derivatives<A, acc_t>(static_cast<acc_t>(x[b + i]), e0[i], e1[i], e2[i], f, d1[i], d2[i]);
        y[b + i] = static_cast<T>(f);
      }
    } else {
      for (int64_t i = 0; i < len; ++i) {
        const auto d = activation_derivatives<A, acc_t>(static_cast<acc_t>(x[b + i]), beta, threshold);
        y[b + i] = static_cast<T>(d.f);
        d1[i] = d.d1;
        d2[i] = d.d2;
      }
    }
    for (int64_t k = 0; k < k_dirs; ++k) {
      const int64_t off = k * n + b;
      const T* __restrict__ t1 = x1 ? x1 + off : nullptr;
      const T* __restrict__ t2 = x2 ? x2 + off : nullptr;
      T* __restrict__ o1 = y1 + off;
      T* __restrict__ o2 = y2 ? y2 + off : nullptr;  // null: first order only
      if constexpr (A == Activation::kRelu) {
        // A select, as in the reference: a non-finite tangent where relu is
        // flat gives 0, not 0 * inf.
        SYMFAST_NO_LOOP_DEPENDENCIES
        for (int64_t i = 0; i < len; ++i) o1[i] = (t1 && d1[i] != acc_t(0)) ? t1[i] : T(0);
        if (o2) {
          SYMFAST_NO_LOOP_DEPENDENCIES
          for (int64_t i = 0; i < len; ++i) o2[i] = (t2 && d1[i] != acc_t(0)) ? t2[i] : T(0);
        }
        continue;
      }
      if (t1) {
        SYMFAST_NO_LOOP_DEPENDENCIES
        for (int64_t i = 0; i < len; ++i) o1[i] = static_cast<T>(d1[i] * static_cast<acc_t>(t1[i]));
      } else {
        std::fill(o1, o1 + len, T(0));
      }
      if (!o2) continue;
      if (t1 && t2) {
        SYMFAST_NO_LOOP_DEPENDENCIES
        for (int64_t i = 0; i < len; ++i) {
          const acc_t a = static_cast<acc_t>(t1[i]);
          o2[i] = static_cast<T>(d1[i] * static_cast<acc_t>(t2[i]) + d2[i] * (a * a));
        }
      } else if (t2) {
        SYMFAST_NO_LOOP_DEPENDENCIES
        for (int64_t i = 0; i < len; ++i) o2[i] = static_cast<T>(d1[i] * static_cast<acc_t>(t2[i]));
      } else {
        SYMFAST_NO_LOOP_DEPENDENCIES
        for (int64_t i = 0; i < len; ++i) {
          const acc_t a = static_cast<acc_t>(t1[i]);
          o2[i] = static_cast<T>(d2[i] * (a * a));
        }
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> jet_activation_cpu(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& x1_in,
    const c10::optional<at::Tensor>& x2_in, c10::string_view kind, double beta, double threshold,
    bool second) {
  // Plain variables, not a structured binding: lambdas below capture them.
  const auto checked = check_jet_activation_args(x_in, x1_in, x2_in, kind, beta);
  const int64_t k_dirs = checked.first;
  const Activation act = checked.second;
  const at::Tensor x = x_in.contiguous(), x1 = contiguous_or_undefined(x1_in),
                   x2 = contiguous_or_undefined(x2_in);
  at::Tensor y = empty_output(x.sizes(), x.options());
  const auto js = jet_sizes(k_dirs, x.sizes());
  at::Tensor y1 = empty_output(js, x.options()), y2 = second_output(second, js, x.options());
  const int64_t n = x.numel();
  if (n == 0) return {y, y1, y2};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "symfast_jet_activation_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* x1p = data_or_null<scalar_t>(x1);
    const scalar_t* x2p = data_or_null<scalar_t>(x2);
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    scalar_t* y1p = y1.mutable_data_ptr<scalar_t>();
    scalar_t* y2p = second ? y2.mutable_data_ptr<scalar_t>() : nullptr;
    const acc_t b = static_cast<acc_t>(beta), th = static_cast<acc_t>(threshold);
    activation_switch(act, [&](auto tag) {
      constexpr Activation A = decltype(tag)::value;
      at::parallel_for(0, n, jet_grain(k_dirs), [&](int64_t begin, int64_t end) {
        activation_range<scalar_t, A>(xp, x1p, x2p, yp, y1p, y2p, n, k_dirs, begin, end, b, th);
      });
    });
  });
  return {y, y1, y2};
}

// ------------------------------------------------------------------ jet_dcs
// acc[i] += a[i] * b[i] (scaled by 2 when TWICE), skipped by the caller when a
// factor is missing. a or b may be a per-element primal (index i of the
// block) or a tangent row (the same index within direction k).
template <typename T, bool TWICE = false>
C10_ALWAYS_INLINE void add_products(at::opmath_type<T>* __restrict__ acc, const T* __restrict__ a,
                                    const T* __restrict__ b, int64_t len) {
  using acc_t = at::opmath_type<T>;
  SYMFAST_NO_LOOP_DEPENDENCIES
  for (int64_t i = 0; i < len; ++i) {
    const acc_t p = static_cast<acc_t>(a[i]) * static_cast<acc_t>(b[i]);
    acc[i] += TWICE ? acc_t(2) * p : p;
  }
}

// out[i] = m[i] ? acc[i] : other[i] (0 without other); out[i] = acc[i] without a mask.
template <typename T>
C10_ALWAYS_INLINE void store_selected(T* __restrict__ out, const at::opmath_type<T>* __restrict__ acc,
                                      const uint8_t* __restrict__ m, const T* __restrict__ other,
                                      int64_t len) {
  if (m == nullptr) {
    SYMFAST_NO_LOOP_DEPENDENCIES
    for (int64_t i = 0; i < len; ++i) out[i] = static_cast<T>(acc[i]);
  } else if (other == nullptr) {
    SYMFAST_NO_LOOP_DEPENDENCIES
    for (int64_t i = 0; i < len; ++i) out[i] = m[i] ? static_cast<T>(acc[i]) : T(0);
  } else {
    SYMFAST_NO_LOOP_DEPENDENCIES
    for (int64_t i = 0; i < len; ++i) out[i] = m[i] ? static_cast<T>(acc[i]) : other[i];
  }
}

struct DcsJetPtrs {
  const void *w, *u, *v, *w1, *u1, *v1, *w2, *u2, *v2;
  const uint8_t* m;
  void *y, *y1, *y2;
};

template <typename T>
void jet_dcs_range(const DcsJetPtrs& p, int64_t n, int64_t k_dirs, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<T>;
  auto in = [](const void* q) { return static_cast<const T*>(q); };
  const T *w = in(p.w), *u = in(p.u), *v = in(p.v), *w1 = in(p.w1), *u1 = in(p.u1),
          *v1 = in(p.v1), *w2 = in(p.w2), *u2 = in(p.u2), *v2 = in(p.v2);
  T* y = static_cast<T*>(p.y);
  T* y1 = static_cast<T*>(p.y1);
  T* y2 = static_cast<T*>(p.y2);
  acc_t acc[kBlock];
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t len = std::min(kBlock, end - b);
    const uint8_t* m = p.m ? p.m + b : nullptr;
    // theta = m ? w u : v
    SYMFAST_NO_LOOP_DEPENDENCIES
    for (int64_t i = 0; i < len; ++i) {
      acc[i] = static_cast<acc_t>(w[b + i]) * static_cast<acc_t>(u[b + i]);
    }
    store_selected<T>(y + b, acc, m, v ? v + b : nullptr, len);
    for (int64_t k = 0; k < k_dirs; ++k) {
      const int64_t off = k * n + b;
      // y1 = m ? w1 u + w u1 : v1
      std::fill(acc, acc + len, acc_t(0));
      if (w1) add_products<T>(acc, w1 + off, u + b, len);
      if (u1) add_products<T>(acc, w + b, u1 + off, len);
      store_selected<T>(y1 + off, acc, m, v1 ? v1 + off : nullptr, len);
      if (y2 == nullptr) continue;  // first order only
      // y2 = m ? w2 u + 2 w1 u1 + w u2 : v2
      std::fill(acc, acc + len, acc_t(0));
      if (w2) add_products<T>(acc, w2 + off, u + b, len);
      if (w1 && u1) add_products<T, true>(acc, w1 + off, u1 + off, len);
      if (u2) add_products<T>(acc, w + b, u2 + off, len);
      store_selected<T>(y2 + off, acc, m, v2 ? v2 + off : nullptr, len);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> jet_dcs_cpu(
    const at::Tensor& w_in, const at::Tensor& u_in, const c10::optional<at::Tensor>& v_in,
    const c10::optional<at::Tensor>& mask_in, const c10::optional<at::Tensor>& w1_in,
    const c10::optional<at::Tensor>& u1_in, const c10::optional<at::Tensor>& v1_in,
    const c10::optional<at::Tensor>& w2_in, const c10::optional<at::Tensor>& u2_in,
    const c10::optional<at::Tensor>& v2_in, bool second) {
  const auto checked =
      check_jet_dcs_args(w_in, u_in, v_in, mask_in, w1_in, u1_in, v1_in, w2_in, u2_in, v2_in);
  const int64_t k_dirs = checked.first;
  const c10::optional<at::Tensor>& mask = checked.second;
  const at::Tensor w = w_in.contiguous(), u = u_in.contiguous(), v = contiguous_or_undefined(v_in),
                   w1 = contiguous_or_undefined(w1_in), u1 = contiguous_or_undefined(u1_in),
                   v1 = contiguous_or_undefined(v1_in), w2 = contiguous_or_undefined(w2_in),
                   u2 = contiguous_or_undefined(u2_in), v2 = contiguous_or_undefined(v2_in);
  const at::Tensor m = mask.has_value() ? mask->expand(w.sizes()).contiguous() : at::Tensor();
  at::Tensor y = empty_output(w.sizes(), w.options());
  const auto js = jet_sizes(k_dirs, w.sizes());
  at::Tensor y1 = empty_output(js, w.options()), y2 = second_output(second, js, w.options());
  const int64_t n = w.numel();
  if (n == 0) return {y, y1, y2};

  auto ptr = [](const at::Tensor& t) -> const void* { return t.defined() ? t.const_data_ptr() : nullptr; };
  const DcsJetPtrs p{ptr(w), ptr(u), ptr(v), ptr(w1), ptr(u1), ptr(v1), ptr(w2), ptr(u2), ptr(v2),
                     m.defined() ? static_cast<const uint8_t*>(m.const_data_ptr()) : nullptr,
                     y.mutable_data_ptr(), y1.mutable_data_ptr(), second ? y2.mutable_data_ptr() : nullptr};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "symfast_jet_dcs_cpu", [&] {
    at::parallel_for(0, n, jet_grain(k_dirs), [&](int64_t begin, int64_t end) {
      jet_dcs_range<scalar_t>(p, n, k_dirs, begin, end);
    });
  });
  return {y, y1, y2};
}

// ------------------------------------------------------------ jet_dcs_group
// w is [outer, G, inner] (G = w.shape[dim]); element i has group
// (i / inner) % G. The gates of a block's elements are gathered once per
// block and direction into a contiguous array, so the arithmetic loops are
// the same flat streams as jet_dcs's.
template <typename T>
void jet_dcs_group_range(const T* w, const T* s, const T* w1, const T* s1, const T* w2,
                         const T* s2, T* y, T* y1, T* y2, int64_t n, int64_t groups, int64_t inner,
                         int64_t k_dirs, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<T>;
  int64_t g_of[kBlock];
  T gate[kBlock], gate1[kBlock], gate2[kBlock];
  acc_t acc[kBlock];
  auto gather = [&](T* dst, const T* src, int64_t len) {
    for (int64_t i = 0; i < len; ++i) dst[i] = src[g_of[i]];
  };
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t len = std::min(kBlock, end - b);
    // Group of each element, stepping (group, position in group) instead of dividing.
    int64_t g = (b / inner) % groups, j = b % inner;
    for (int64_t i = 0; i < len; ++i) {
      g_of[i] = g;
      if (++j == inner) {
        j = 0;
        if (++g == groups) g = 0;
      }
    }
    gather(gate, s, len);
    SYMFAST_NO_LOOP_DEPENDENCIES
    for (int64_t i = 0; i < len; ++i) {
      y[b + i] = static_cast<T>(static_cast<acc_t>(w[b + i]) * static_cast<acc_t>(gate[i]));
    }
    for (int64_t k = 0; k < k_dirs; ++k) {
      const int64_t off = k * n + b;
      if (s1) gather(gate1, s1 + k * groups, len);
      if (s2) gather(gate2, s2 + k * groups, len);
      // y1 = w1 s + w s1
      std::fill(acc, acc + len, acc_t(0));
      if (w1) add_products<T>(acc, w1 + off, gate, len);
      if (s1) add_products<T>(acc, w + b, gate1, len);
      SYMFAST_NO_LOOP_DEPENDENCIES
      for (int64_t i = 0; i < len; ++i) y1[off + i] = static_cast<T>(acc[i]);
      if (y2 == nullptr) continue;  // first order only
      // y2 = w2 s + 2 w1 s1 + w s2
      std::fill(acc, acc + len, acc_t(0));
      if (w2) add_products<T>(acc, w2 + off, gate, len);
      if (w1 && s1) add_products<T, true>(acc, w1 + off, gate1, len);
      if (s2) add_products<T>(acc, w + b, gate2, len);
      SYMFAST_NO_LOOP_DEPENDENCIES
      for (int64_t i = 0; i < len; ++i) y2[off + i] = static_cast<T>(acc[i]);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> jet_dcs_group_cpu(
    const at::Tensor& w_in, const at::Tensor& s_in, int64_t dim_in,
    const c10::optional<at::Tensor>& w1_in, const c10::optional<at::Tensor>& s1_in,
    const c10::optional<at::Tensor>& w2_in, const c10::optional<at::Tensor>& s2_in, bool second) {
  const auto checked = check_jet_dcs_group_args(w_in, s_in, dim_in, w1_in, s1_in, w2_in, s2_in);
  const int64_t k_dirs = checked.first, dim = checked.second;
  const at::Tensor w = w_in.contiguous(), s = s_in.contiguous(),
                   w1 = contiguous_or_undefined(w1_in), s1 = contiguous_or_undefined(s1_in),
                   w2 = contiguous_or_undefined(w2_in), s2 = contiguous_or_undefined(s2_in);
  at::Tensor y = empty_output(w.sizes(), w.options());
  const auto js = jet_sizes(k_dirs, w.sizes());
  at::Tensor y1 = empty_output(js, w.options()), y2 = second_output(second, js, w.options());
  const int64_t n = w.numel();
  if (n == 0) return {y, y1, y2};
  const int64_t groups = w.size(dim);
  int64_t inner = 1;
  for (int64_t d = dim + 1; d < w.dim(); ++d) inner *= w.size(d);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "symfast_jet_dcs_group_cpu", [&] {
    const scalar_t *wp = w.const_data_ptr<scalar_t>(), *sp = s.const_data_ptr<scalar_t>(),
                   *w1p = data_or_null<scalar_t>(w1), *s1p = data_or_null<scalar_t>(s1),
                   *w2p = data_or_null<scalar_t>(w2), *s2p = data_or_null<scalar_t>(s2);
    scalar_t *yp = y.mutable_data_ptr<scalar_t>(), *y1p = y1.mutable_data_ptr<scalar_t>(),
             *y2p = second ? y2.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, n, jet_grain(k_dirs), [&](int64_t begin, int64_t end) {
      jet_dcs_group_range<scalar_t>(wp, sp, w1p, s1p, w2p, s2p, yp, y1p, y2p, n, groups, inner,
                                    k_dirs, begin, end);
    });
  });
  return {y, y1, y2};
}

}  // namespace

TORCH_LIBRARY_IMPL(symfast, CPU, m) {
  m.impl("jet_activation", &jet_activation_cpu);
  m.impl("jet_dcs", &jet_dcs_cpu);
  m.impl("jet_dcs_group", &jet_dcs_group_cpu);
}

}  // namespace symfast
