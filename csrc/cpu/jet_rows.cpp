// CPU kernels of the jet row ops: jet_layer_norm, jet_rms_norm, jet_softmax,
// jet_cross_entropy (schemas and the jet convention in csrc/ops.cpp, the
// formulas in symfast/reference.py).
//
// One row per task: at::parallel_for splits the rows, and each row is read
// once for its primal statistics (mean and variance, or max and sum of
// exponentials), which are then shared by its K tangent rows. The row is the
// last dims (normalized_shape) or the softmax dim, contiguous: inputs that are
// not are copied once into that layout (x.movedim(dim, -1).contiguous() for a
// softmax dim that is not last, and its outputs copied back), which keeps the
// hot loops unit-stride. Statistics are computed in two passes (the mean,
// then the centered sums), in float for half types (at::opmath_type) and in
// the dtype itself for float32/float64; each result is rounded once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../common.h"
#include "../jet_rows_checks.h"
#include "loop_hints.h"

namespace symfast {
namespace {

// Sum of f(0) .. f(n-1) in eight interleaved partial sums: they are
// independent, so the loop vectorizes without reassociation (-ffp-contract=off
// and no -ffast-math keep every sum IEEE), and the rounding error grows with
// n / 8 rather than n.
template <typename acc_t, typename F>
C10_ALWAYS_INLINE acc_t row_sum(int64_t n, const F& f) {
  acc_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) s[l] += f(i + l);
  }
  for (int l = 0; i < n; ++i, ++l) s[l] += f(i);
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

// Rows per task: about kGrainSize elements of work, a row of length d costing
// (1 + tangent rows) passes.
int64_t row_grain(int64_t d, int64_t tangent_rows) {
  return std::max<int64_t>(1, kGrainSize / std::max<int64_t>(1, d * (1 + tangent_rows)));
}

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

at::Tensor contiguous_or_undefined(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

// ------------------------------------------------------------ normalization
// x_hat = u / sigma, u = x - mean(x) (CENTER, layer norm) or x (RMS norm),
// sigma = sqrt(mean(u^2) + eps); then y = x_hat * w + b with w, b carrying
// their own jets. Per tangent row (u1, u2 the centered tangents):
//   sigma'  = mean(x_hat u1),  sigma'' = (mean(u1^2) - sigma'^2) / sigma + mean(x_hat u2)
//   x_hat'  = (u1 - x_hat sigma') / sigma
//   x_hat'' = (u2 - 2 x_hat' sigma' - x_hat sigma'') / sigma
//   y1 = x_hat' w + x_hat w1 + b1,  y2 = x_hat'' w + 2 x_hat' w1 + x_hat w2 + b2.
template <typename T>
struct NormJet {
  const T *x, *x1, *x2, *w, *b, *w1, *b1, *w2, *b2;
  T *y, *y1, *y2;
  int64_t rows, d, k;
  double eps;
};

template <typename T, bool CENTER>
void norm_jet_cpu(const NormJet<T>& a) {
  using acc_t = at::opmath_type<T>;
  const int64_t d = a.d, n = a.rows;
  const acc_t inv_d = acc_t(1) / static_cast<acc_t>(d);
  const bool want2 = a.y2 != nullptr;  // false: first order only (no y2 and none of its terms)
  const int64_t tangent_rows = a.k * ((a.x1 != nullptr) + (a.x2 != nullptr) + 1 + want2);
  at::parallel_for(0, n, row_grain(d, tangent_rows), [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> xh(d), g1(d), g2(d), v1(d), v2(d);
    auto at_ = [](const T* p, int64_t i) { return static_cast<acc_t>(p[i]); };
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = a.x + r * d;
      const acc_t mean = CENTER ? row_sum<acc_t>(d, [&](int64_t i) { return at_(xr, i); }) * inv_d : acc_t(0);
      const acc_t var = row_sum<acc_t>(d, [&](int64_t i) {
                          const acc_t u = at_(xr, i) - mean;
                          return u * u;
                        }) * inv_d;
      const acc_t sigma = std::sqrt(var + static_cast<acc_t>(a.eps));
      T* yr = a.y + r * d;
      for (int64_t i = 0; i < d; ++i) {
        xh[i] = (at_(xr, i) - mean) / sigma;
        acc_t v = a.w ? xh[i] * at_(a.w, i) : xh[i];
        if (a.b) v += at_(a.b, i);
        yr[i] = static_cast<T>(v);
      }
      for (int64_t k = 0; k < a.k; ++k) {
        const int64_t off = (k * n + r) * d;
        const T* t1 = a.x1 ? a.x1 + off : nullptr;
        const T* t2 = a.x2 ? a.x2 + off : nullptr;
        const T* w1 = a.w1 ? a.w1 + k * d : nullptr;
        const T* w2 = a.w2 ? a.w2 + k * d : nullptr;
        const T* b1 = a.b1 ? a.b1 + k * d : nullptr;
        const T* b2 = a.b2 ? a.b2 + k * d : nullptr;
        const acc_t m1 = CENTER && t1 ? row_sum<acc_t>(d, [&](int64_t i) { return at_(t1, i); }) * inv_d : acc_t(0);
        const acc_t m2 = CENTER && t2 ? row_sum<acc_t>(d, [&](int64_t i) { return at_(t2, i); }) * inv_d : acc_t(0);
        acc_t s1 = 0, q = 0, s2r = 0;
        if (t1) s1 = row_sum<acc_t>(d, [&](int64_t i) { return xh[i] * (at_(t1, i) - m1); }) * inv_d;
        if (t1 && want2) {
          q = row_sum<acc_t>(d, [&](int64_t i) {
                const acc_t u1 = at_(t1, i) - m1;
                return u1 * u1;
              }) * inv_d;
        }
        if (t2) s2r = row_sum<acc_t>(d, [&](int64_t i) { return xh[i] * (at_(t2, i) - m2); }) * inv_d;
        const acc_t s2 = (q - s1 * s1) / sigma + s2r;
        // The outputs term by term, each a branch-free pass over the row in L1
        // (the tests of which tangents are present stay outside the loops, so
        // every loop vectorizes); the sums keep the order of the closed forms
        // above, term for term.
        if (t1) {
          SYMFAST_NO_LOOP_DEPENDENCIES
          for (int64_t i = 0; i < d; ++i) g1[i] = ((at_(t1, i) - m1) - xh[i] * s1) / sigma;
        } else {
          SYMFAST_NO_LOOP_DEPENDENCIES
          for (int64_t i = 0; i < d; ++i) g1[i] = (acc_t(0) - xh[i] * s1) / sigma;
        }
        T* o1 = a.y1 + off;
        if (!want2) {
          // y1 = x_hat' w + x_hat w1 + b1, the terms in the order of the second-order branch
          if (a.w) {
            SYMFAST_NO_LOOP_DEPENDENCIES
            for (int64_t i = 0; i < d; ++i) v1[i] = g1[i] * at_(a.w, i);
          } else {
            std::copy(g1.begin(), g1.end(), v1.begin());
          }
          if (w1) {
            SYMFAST_NO_LOOP_DEPENDENCIES
            for (int64_t i = 0; i < d; ++i) v1[i] += xh[i] * at_(w1, i);
          }
          if (b1) {
            SYMFAST_NO_LOOP_DEPENDENCIES
            for (int64_t i = 0; i < d; ++i) v1[i] += at_(b1, i);
          }
          SYMFAST_NO_LOOP_DEPENDENCIES
          for (int64_t i = 0; i < d; ++i) o1[i] = static_cast<T>(v1[i]);
          continue;
        }
        if (t2) {
          SYMFAST_NO_LOOP_DEPENDENCIES
          for (int64_t i = 0; i < d; ++i) {
            g2[i] = (((at_(t2, i) - m2) - acc_t(2) * g1[i] * s1) - xh[i] * s2) / sigma;
          }
        } else {
          SYMFAST_NO_LOOP_DEPENDENCIES
          for (int64_t i = 0; i < d; ++i) g2[i] = ((acc_t(0) - acc_t(2) * g1[i] * s1) - xh[i] * s2) / sigma;
        }
        if (a.w) {
          SYMFAST_NO_LOOP_DEPENDENCIES
          for (int64_t i = 0; i < d; ++i) {
            v1[i] = g1[i] * at_(a.w, i);
            v2[i] = g2[i] * at_(a.w, i);
          }
        } else {
          std::copy(g1.begin(), g1.end(), v1.begin());
          std::copy(g2.begin(), g2.end(), v2.begin());
        }
        if (w1) {
          SYMFAST_NO_LOOP_DEPENDENCIES
          for (int64_t i = 0; i < d; ++i) {
            v1[i] += xh[i] * at_(w1, i);
            v2[i] += acc_t(2) * g1[i] * at_(w1, i);
          }
        }
        if (w2) {
          SYMFAST_NO_LOOP_DEPENDENCIES
          for (int64_t i = 0; i < d; ++i) v2[i] += xh[i] * at_(w2, i);
        }
        if (b1) {
          SYMFAST_NO_LOOP_DEPENDENCIES
          for (int64_t i = 0; i < d; ++i) v1[i] += at_(b1, i);
        }
        if (b2) {
          SYMFAST_NO_LOOP_DEPENDENCIES
          for (int64_t i = 0; i < d; ++i) v2[i] += at_(b2, i);
        }
        T* o2 = a.y2 + off;
        SYMFAST_NO_LOOP_DEPENDENCIES
        for (int64_t i = 0; i < d; ++i) {
          o1[i] = static_cast<T>(v1[i]);
          o2[i] = static_cast<T>(v2[i]);
        }
      }
    }
  });
}

template <bool CENTER>
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_jet_host(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& x1_in,
    const c10::optional<at::Tensor>& x2_in, at::IntArrayRef ns, const c10::optional<at::Tensor>& w_in,
    const c10::optional<at::Tensor>& b_in, const c10::optional<at::Tensor>& w1_in,
    const c10::optional<at::Tensor>& b1_in, const c10::optional<at::Tensor>& w2_in,
    const c10::optional<at::Tensor>& b2_in, int64_t k, double eps, bool second) {
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  CENTER ? "symfast_jet_layer_norm_cpu" : "symfast_jet_rms_norm_cpu", [&] {
    const NormJet<scalar_t> a{x.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(x1),
                              data_or_null<scalar_t>(x2), data_or_null<scalar_t>(w),
                              data_or_null<scalar_t>(b), data_or_null<scalar_t>(w1),
                              data_or_null<scalar_t>(b1), data_or_null<scalar_t>(w2),
                              data_or_null<scalar_t>(b2), y.mutable_data_ptr<scalar_t>(),
                              y1.mutable_data_ptr<scalar_t>(),
                              second ? y2.mutable_data_ptr<scalar_t>() : nullptr,
                              x.numel() / d, d, k, eps};
    norm_jet_cpu<scalar_t, CENTER>(a);
  });
  return {y, y1, y2};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> jet_layer_norm_cpu(
    const at::Tensor& x, const c10::optional<at::Tensor>& x1, const c10::optional<at::Tensor>& x2,
    at::IntArrayRef normalized_shape, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& weight1,
    const c10::optional<at::Tensor>& bias1, const c10::optional<at::Tensor>& weight2,
    const c10::optional<at::Tensor>& bias2, double eps, bool second) {
  const int64_t k = check_jet_layer_norm_args(x, x1, x2, normalized_shape, weight, bias, weight1,
                                              bias1, weight2, bias2);
  return norm_jet_host<true>(x, x1, x2, normalized_shape, weight, bias, weight1, bias1, weight2,
                             bias2, k, eps, second);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> jet_rms_norm_cpu(
    const at::Tensor& x, const c10::optional<at::Tensor>& x1, const c10::optional<at::Tensor>& x2,
    at::IntArrayRef normalized_shape, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& weight1, const c10::optional<at::Tensor>& weight2, double eps,
    bool second) {
  const int64_t k = check_jet_rms_norm_args(x, x1, x2, normalized_shape, weight, weight1, weight2);
  return norm_jet_host<false>(x, x1, x2, normalized_shape, weight, c10::nullopt, weight1,
                              c10::nullopt, weight2, c10::nullopt, k, eps, second);
}

// ------------------------------------------------------------------ softmax
// s = softmax(z); per tangent row, with a_j = z_j - <s, z_j> and e = <s, a1^2>:
//   softmax:      y1 = s a1,  y2 = s (a1^2 + a2 - e)
//   log_softmax:  y1 = a1,    y2 = a2 - e
// (s, z) are fine in the accumulation type: max-subtracted exponentials never overflow.
template <typename T>
struct SoftmaxJet {
  const T *x, *x1, *x2;
  T *y, *y1, *y2;
  int64_t rows, d, k;
};

// Writes s (softmax of the row, acc_t) and returns (max, sum of exp(z - max)).
template <typename T, typename acc_t>
std::pair<acc_t, acc_t> softmax_row(const T* z, int64_t d, acc_t* s) {
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  for (int64_t i = 0; i < d; ++i) mx = std::max(mx, static_cast<acc_t>(z[i]));
  for (int64_t i = 0; i < d; ++i) s[i] = std::exp(static_cast<acc_t>(z[i]) - mx);
  const acc_t sum = row_sum<acc_t>(d, [&](int64_t i) { return s[i]; });
  for (int64_t i = 0; i < d; ++i) s[i] = s[i] / sum;
  return {mx, sum};
}

template <typename T, bool LOG>
void softmax_jet_cpu(const SoftmaxJet<T>& a) {
  using acc_t = at::opmath_type<T>;
  const int64_t d = a.d, n = a.rows;
  const bool want2 = a.y2 != nullptr;  // false: first order only
  const int64_t tangent_rows = a.k * ((a.x1 != nullptr) + (a.x2 != nullptr) + 1 + want2);
  at::parallel_for(0, n, row_grain(d, tangent_rows), [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> s(d);
    for (int64_t r = r0; r < r1; ++r) {
      const T* z = a.x + r * d;
      const auto [mx, sum] = softmax_row<T, acc_t>(z, d, s.data());
      const acc_t log_sum = std::log(sum);
      T* yr = a.y + r * d;
      for (int64_t i = 0; i < d; ++i) {
        yr[i] = static_cast<T>(LOG ? (static_cast<acc_t>(z[i]) - mx) - log_sum : s[i]);
      }
      for (int64_t k = 0; k < a.k; ++k) {
        const int64_t off = (k * n + r) * d;
        const T* t1 = a.x1 ? a.x1 + off : nullptr;
        const T* t2 = a.x2 ? a.x2 + off : nullptr;
        const acc_t c1 = t1 ? row_sum<acc_t>(d, [&](int64_t i) { return s[i] * static_cast<acc_t>(t1[i]); }) : acc_t(0);
        T* o1 = a.y1 + off;
        if (!want2) {
          for (int64_t i = 0; i < d; ++i) {
            const acc_t a1 = t1 ? static_cast<acc_t>(t1[i]) - c1 : acc_t(0);
            o1[i] = static_cast<T>(LOG ? a1 : s[i] * a1);
          }
          continue;
        }
        const acc_t c2 = t2 ? row_sum<acc_t>(d, [&](int64_t i) { return s[i] * static_cast<acc_t>(t2[i]); }) : acc_t(0);
        const acc_t e = t1 ? row_sum<acc_t>(d, [&](int64_t i) {
                               const acc_t a1 = static_cast<acc_t>(t1[i]) - c1;
                               return s[i] * a1 * a1;
                             })
                           : acc_t(0);
        T* o2 = a.y2 + off;
        for (int64_t i = 0; i < d; ++i) {
          const acc_t a1 = t1 ? static_cast<acc_t>(t1[i]) - c1 : acc_t(0);
          const acc_t a2 = t2 ? static_cast<acc_t>(t2[i]) - c2 : acc_t(0);
          if (LOG) {
            o1[i] = static_cast<T>(a1);
            o2[i] = static_cast<T>(a2 - e);
          } else {
            o1[i] = static_cast<T>(s[i] * a1);
            o2[i] = static_cast<T>(s[i] * (a1 * a1 + a2 - e));
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> jet_softmax_cpu(const at::Tensor& x_in,
                                                               const c10::optional<at::Tensor>& x1_in,
                                                               const c10::optional<at::Tensor>& x2_in,
                                                               int64_t dim, bool log,
                                                               bool second) {
  const int64_t d0 = check_jet_softmax_args(x_in, x1_in, x2_in, dim);
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
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "symfast_jet_softmax_cpu", [&] {
      const SoftmaxJet<scalar_t> a{x.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(x1),
                                   data_or_null<scalar_t>(x2), y.mutable_data_ptr<scalar_t>(),
                                   y1.mutable_data_ptr<scalar_t>(),
                                   second ? y2.mutable_data_ptr<scalar_t>() : nullptr, x.numel() / d, d, k};
      log ? softmax_jet_cpu<scalar_t, true>(a) : softmax_jet_cpu<scalar_t, false>(a);
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
// loss = logsumexp(z) - z[t]; per tangent row, with s = softmax(z):
//   l1 = <s, z1> - z1[t],  l2 = <s, (z1 - <s, z1>)^2> + <s, z2> - z2[t].
// Rows whose target is ignore_index give 0, 0, 0.
template <typename T>
void cross_entropy_jet_cpu(const T* z, const T* z1, const T* z2, const int64_t* target, T* loss,
                           T* l1, T* l2, int64_t n, int64_t c, int64_t k, int64_t ignore_index) {
  using acc_t = at::opmath_type<T>;
  const bool want2 = l2 != nullptr;  // false: first order only
  const int64_t tangent_rows = k * ((z1 != nullptr) + (z2 != nullptr && want2) + 1);
  at::parallel_for(0, n, row_grain(c, tangent_rows), [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> s(c);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = target[r];
      if (t == ignore_index) {
        loss[r] = T(0);
        for (int64_t j = 0; j < k; ++j) l1[j * n + r] = T(0);
        if (want2) {
          for (int64_t j = 0; j < k; ++j) l2[j * n + r] = T(0);
        }
        continue;
      }
      const T* zr = z + r * c;
      const auto [mx, sum] = softmax_row<T, acc_t>(zr, c, s.data());
      loss[r] = static_cast<T>((std::log(sum) + mx) - static_cast<acc_t>(zr[t]));
      for (int64_t j = 0; j < k; ++j) {
        const int64_t off = (j * n + r) * c;
        const T* t1 = z1 ? z1 + off : nullptr;
        const T* t2 = z2 ? z2 + off : nullptr;
        acc_t v1 = 0, v2 = 0;
        if (t1) {
          const acc_t c1 = row_sum<acc_t>(c, [&](int64_t i) { return s[i] * static_cast<acc_t>(t1[i]); });
          v1 = c1 - static_cast<acc_t>(t1[t]);
          if (want2) {
            v2 = row_sum<acc_t>(c, [&](int64_t i) {
              const acc_t a1 = static_cast<acc_t>(t1[i]) - c1;
              return s[i] * a1 * a1;
            });
          }
        }
        l1[j * n + r] = static_cast<T>(v1);
        if (!want2) continue;
        if (t2) {
          const acc_t c2 = row_sum<acc_t>(c, [&](int64_t i) { return s[i] * static_cast<acc_t>(t2[i]); });
          v2 = v2 + (c2 - static_cast<acc_t>(t2[t]));
        }
        l2[j * n + r] = static_cast<T>(v2);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> jet_cross_entropy_cpu(
    const at::Tensor& z_in, const c10::optional<at::Tensor>& z1_in,
    const c10::optional<at::Tensor>& z2_in, const at::Tensor& target_in, int64_t ignore_index,
    bool second) {
  const int64_t k = check_jet_cross_entropy_args(z_in, z1_in, z2_in, target_in);
  const int64_t n = z_in.size(0), c = z_in.size(1);
  check_cross_entropy_targets(target_in, c, ignore_index);
  const at::Tensor z = z_in.contiguous(), z1 = contiguous_or_undefined(z1_in),
                   z2 = contiguous_or_undefined(z2_in), target = target_in.contiguous();
  at::Tensor loss = at::empty({n}, z.options());
  at::Tensor l1 = at::empty({k, n}, z.options()), l2 = second_tangent_output(second, {k, n}, z.options());
  if (n == 0) return {loss, l1, l2};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "symfast_jet_cross_entropy_cpu", [&] {
    cross_entropy_jet_cpu<scalar_t>(z.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(z1),
                                    data_or_null<scalar_t>(z2), target.const_data_ptr<int64_t>(),
                                    loss.mutable_data_ptr<scalar_t>(), l1.mutable_data_ptr<scalar_t>(),
                                    second ? l2.mutable_data_ptr<scalar_t>() : nullptr, n, c, k,
                                    ignore_index);
  });
  return {loss, l1, l2};
}

}  // namespace

TORCH_LIBRARY_IMPL(symfast, CPU, m) {
  m.impl("jet_layer_norm", &jet_layer_norm_cpu);
  m.impl("jet_rms_norm", &jet_rms_norm_cpu);
  m.impl("jet_softmax", &jet_softmax_cpu);
  m.impl("jet_cross_entropy", &jet_cross_entropy_cpu);
}

}  // namespace symfast
