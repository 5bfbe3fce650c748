// CPU kernels of the dcs_group ops: theta = w * s broadcast along dim.
//
// Layout. The kernels see w as a contiguous [outer, G, inner] block (G =
// w.shape[dim]); element p belongs to group (p / inner) % G. Inputs that are not
// contiguous (a transposed weight, the expanded grad of sum().backward()) are
// copied to that layout first: one extra read and write of that operand, paid
// so that every hot loop is a unit-stride stream over restrict pointers. For
// dim = last (inner == 1) a row of w is a run of consecutive groups, so the
// loops go along the row with s[g] as a second stream; otherwise each run of
// `inner` elements shares one s[g], a broadcast scalar. Both shapes of loop
// vectorize (check with -fopt-info-vec).
//
// Elementwise ops (forward, grad_w alone, forward mode) split the flat element
// range over threads with at::parallel_for. Half types compute in float
// (at::opmath_type) and round once, so theta and grad_w equal the reference
// bit for bit.
//
// The gate gradient grad_s[g] = sum over (o, i) of grad * w is a per-group
// reduction, and it is fused with grad_w: both come out of one pass over grad
// and w. The reduction is cut into tasks by a plan that depends on the shape
// only, never on the number of threads (see ReducePlan), and every partial sum
// is combined in a fixed order, so grad_s is bitwise the same on 1 or 64
// threads. Sums run in the accumulation type (float for half types and
// float32, double for float64): dot products over a fixed set of independent
// lanes (which vectorizes them without -ffast-math) and cascaded sums over
// rows and chunks, which keep the rounding error near that of torch.sum.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common.h"
#include "../dcs_checks.h"
#include "../group_layout.h"
#include "../static_switch.h"
#include "loop_hints.h"
#include "output_cache.h"

#include <algorithm>
#include <tuple>
#include <vector>

namespace symfast {
namespace {

// Reduction plan constants (see plan_reduction).
constexpr int64_t kTaskElems = 65536;    // elements per reduction task, at least
constexpr int64_t kMaxTasks = 256;       // tasks per reduction, at most
constexpr int64_t kMinRunBytes = 2048;    // contiguous bytes a task reads per row, at least
constexpr int kLanes = 16;               // independent accumulators of a dot product
constexpr int64_t kDotMinInner = 64;     // inner runs at least this long: dot products
constexpr int64_t kMinWidth = 512;       // elements per step of the per-element path

// [begin, end) of chunk c when len items are cut into n balanced chunks.
inline std::pair<int64_t, int64_t> chunk(int64_t len, int64_t n, int64_t c) {
  return {len * c / n, len * (c + 1) / n};
}

// ------------------------------------------------------------ elementwise
// Two loop shapes, picked by gate_per_element():
//
// * per element: element k of a row (G * inner elements) has its own gate
//   value gate[k]. With inner == 1 (dim = last) that is s itself. With a short
//   inner (a conv weight grouped along dim 1 has inner = kh * kw) runs of one
//   group would be all loop overhead, so s is expanded once into one value per
//   element of a row (expand_gate) and rows stream against it.
// * per run: each run of `inner` elements shares the scalar s[g].
inline bool gate_per_element(const GroupView& v) {
  return v.inner == 1 || (v.inner < kDotMinInner && v.outer > 1);
}

// One gate value per element of a row, in acc_t: s[k / inner].
template <typename T>
std::vector<at::opmath_type<T>> expand_gate(const T* s, const GroupView& v) {
  std::vector<at::opmath_type<T>> gate(v.groups * v.inner);
  for (int64_t g = 0; g < v.groups; ++g) {
    std::fill_n(gate.begin() + g * v.inner, v.inner, static_cast<at::opmath_type<T>>(s[g]));
  }
  return gate;
}

// Runs fn(p, len, k) over [b, e) cut into pieces within one row: elements
// [p, p + len) are elements [k, k + len) of their row.
template <typename Fn>
void for_each_row_piece(int64_t row, int64_t b, int64_t e, const Fn& fn) {
  for (int64_t p = b; p < e;) {
    const int64_t k = p % row;
    const int64_t len = std::min(e - p, row - k);
    fn(p, len, k);
    p += len;
  }
}

// Runs fn(p, len, g) over [b, e) cut into pieces within one run of group g.
template <typename Fn>
void for_each_run(const GroupView& v, int64_t b, int64_t e, const Fn& fn) {
  for (int64_t p = b; p < e;) {
    const int64_t i = p % v.inner;
    const int64_t g = (p / v.inner) % v.groups;
    const int64_t len = std::min(e - p, v.inner - i);
    fn(p, len, g);
    p += len;
  }
}

// Calls body(gate) with the per-element gate of s (s itself or its expansion)
// when gate_per_element(v); the caller handles the per-run case.
template <typename T, typename Body>
void with_element_gate(const T* s, const GroupView& v, const Body& body) {
  if (v.inner == 1) {
    body(s);
  } else {
    const auto gate = expand_gate(s, v);
    body(gate.data());
  }
}

// out = x * gate, each product in acc_t, rounded once to T.
template <typename T, typename GateT>
C10_ALWAYS_INLINE void scale_elems(T* __restrict__ out, const T* __restrict__ x,
                                   const GateT* __restrict__ gate, int64_t n) {
  using acc_t = at::opmath_type<T>;
  SYMFAST_NO_LOOP_DEPENDENCIES
  for (int64_t k = 0; k < n; ++k) {
    out[k] = static_cast<T>(static_cast<acc_t>(x[k]) * static_cast<acc_t>(gate[k]));
  }
}

template <typename T>
C10_ALWAYS_INLINE void scale_run(T* __restrict__ out, const T* __restrict__ x,
                                 at::opmath_type<T> sg, int64_t n) {
  using acc_t = at::opmath_type<T>;
  SYMFAST_NO_LOOP_DEPENDENCIES
  for (int64_t k = 0; k < n; ++k) out[k] = static_cast<T>(static_cast<acc_t>(x[k]) * sg);
}

// out = x * s along the groups, over the whole tensor, in parallel: the
// forward (x = w), and grad_w when grad_s is not needed (x = grad).
template <typename T>
void scale_all(T* out, const T* x, const T* s, const GroupView& v) {
  using acc_t = at::opmath_type<T>;
  if (gate_per_element(v)) {
    with_element_gate(s, v, [&](const auto* gate) {
      at::parallel_for(0, v.numel(), kGrainSize, [&](int64_t b, int64_t e) {
        for_each_row_piece(v.groups * v.inner, b, e, [&](int64_t p, int64_t len, int64_t k) {
          scale_elems(out + p, x + p, gate + k, len);
        });
      });
    });
    return;
  }
  at::parallel_for(0, v.numel(), kGrainSize, [&](int64_t b, int64_t e) {
    for_each_run(v, b, e, [&](int64_t p, int64_t len, int64_t g) {
      scale_run(out + p, x + p, static_cast<acc_t>(s[g]), len);
    });
  });
}

// theta_dot = 0 + w_dot * s + w * s_dot, each product and the sum in acc_t,
// one rounding at the end. Starting from +0 and adding in this order is what
// reference.dcs_group_jvp does, so even the sign of a zero result matches.
template <typename T, bool HWD, bool HSD, typename GateA, typename GateB>
C10_ALWAYS_INLINE void jvp_elems(T* __restrict__ out, const T* __restrict__ w,
                                 const T* __restrict__ wd, const GateA* __restrict__ s,
                                 const GateB* __restrict__ sd, int64_t n) {
  using acc_t = at::opmath_type<T>;
  SYMFAST_NO_LOOP_DEPENDENCIES
  for (int64_t k = 0; k < n; ++k) {
    acc_t acc = 0;
    if constexpr (HWD) acc += static_cast<acc_t>(wd[k]) * static_cast<acc_t>(s[k]);
    if constexpr (HSD) acc += static_cast<acc_t>(w[k]) * static_cast<acc_t>(sd[k]);
    out[k] = static_cast<T>(acc);
  }
}

template <typename T, bool HWD, bool HSD>
C10_ALWAYS_INLINE void jvp_run(T* __restrict__ out, const T* __restrict__ w,
                               const T* __restrict__ wd, at::opmath_type<T> sg,
                               at::opmath_type<T> sdg, int64_t n) {
  using acc_t = at::opmath_type<T>;
  SYMFAST_NO_LOOP_DEPENDENCIES
  for (int64_t k = 0; k < n; ++k) {
    acc_t acc = 0;
    if constexpr (HWD) acc += static_cast<acc_t>(wd[k]) * sg;
    if constexpr (HSD) acc += static_cast<acc_t>(w[k]) * sdg;
    out[k] = static_cast<T>(acc);
  }
}

// w is read only with s_dot (HSD), s and w_dot only with w_dot (HWD).
template <typename T, bool HWD, bool HSD>
void jvp_all(T* out, const T* w, const T* s, const T* wd, const T* sd, const GroupView& v) {
  using acc_t = at::opmath_type<T>;
  if (gate_per_element(v)) {
    auto by_rows = [&](const auto* s_gate, const auto* sd_gate) {
      at::parallel_for(0, v.numel(), kGrainSize, [&](int64_t b, int64_t e) {
        for_each_row_piece(v.groups * v.inner, b, e, [&](int64_t p, int64_t len, int64_t k) {
          jvp_elems<T, HWD, HSD>(out + p, HSD ? w + p : nullptr, HWD ? wd + p : nullptr,
                                 HWD ? s_gate + k : nullptr, HSD ? sd_gate + k : nullptr, len);
        });
      });
    };
    // An absent gate is never read: the present one stands in for its pointer.
    with_element_gate(HWD ? s : sd, v, [&](const auto* a) {
      if constexpr (HWD && HSD) {
        with_element_gate(sd, v, [&](const auto* b) { by_rows(a, b); });
      } else {
        by_rows(a, a);
      }
    });
    return;
  }
  at::parallel_for(0, v.numel(), kGrainSize, [&](int64_t b, int64_t e) {
    for_each_run(v, b, e, [&](int64_t p, int64_t len, int64_t g) {
      jvp_run<T, HWD, HSD>(out + p, HSD ? w + p : nullptr, HWD ? wd + p : nullptr,
                           HWD ? static_cast<acc_t>(s[g]) : acc_t(0),
                           HSD ? static_cast<acc_t>(sd[g]) : acc_t(0), len);
    });
  });
}

// -------------------------------------------------------------- reduction
// How the gate reduction is cut into tasks: n_o chunks of the outer rows x n_g
// chunks of the groups x n_i chunks of the inner positions. Task (oc, gc, ic)
// sums its block into row oc * n_i + ic of a [n_o * n_i, G] partial buffer (or
// straight into grad_s when n_o * n_i == 1). A function of the shape only.
//
// Groups are split first: each group's sum then stays inside one task, and no
// partial buffer is needed. But a task must still read runs of at least
// kMinRunBytes per row (g-chunk * inner elements), or prefetching suffers and
// threads would share cache lines; with dim = last (inner == 1) that allows
// only a few g-chunks, and the rows are split next. Inner positions are split
// last, for shapes like (G small, inner huge). With at most kMaxTasks tasks and
// runs of >= kMinRunBytes, the partial buffer is at most kMaxTasks *
// kMinRunBytes / sizeof(T) accumulators (about 0.5 MiB), usually far less.
//
// Why not longer runs: with dim = last a task keeps kLevels + 1 accumulator
// and gate values per element of its run, which must stay in L1; longer runs
// spill out of it and make the dim = last backward slower (docs/perf.md),
// while other dims do not care.
struct ReducePlan {
  int64_t n_o, n_g, n_i;
  int64_t tasks() const { return n_o * n_g * n_i; }
  int64_t partial_rows() const { return n_o * n_i; }
};

ReducePlan plan_reduction(const GroupView& v, int64_t elem_size) {
  const int64_t min_run = std::max<int64_t>(1, kMinRunBytes / elem_size);
  const int64_t tasks = std::clamp<int64_t>(ceil_div(v.numel(), kTaskElems), 1, kMaxTasks);
  const int64_t n_g =
      std::min({v.groups, std::max<int64_t>(1, v.groups * v.inner / min_run), tasks});
  int64_t rest = ceil_div(tasks, n_g);
  const int64_t n_o = std::min(v.outer, rest);
  rest = ceil_div(rest, n_o);
  const int64_t n_i = std::min(rest, std::max<int64_t>(1, v.inner / min_run));
  return {n_o, n_g, n_i};
}

// Cascade summation. A long running sum loses about one rounding per add, so
// its error grows with the number of terms; these sums fold a level into the
// next after every kFanIn adds, so no sum ever takes more than kFanIn adds per
// level (error ~ kFanIn * levels * eps rather than n * eps, about what
// torch.sum's cascade achieves). The folding points depend on the position of
// a term only, so the result is still a function of the data alone.
constexpr int kFanIn = 64;
constexpr int kLevels = 3;

// sum_k acc(g[k]) * acc(w[k]) over n contiguous elements, and (NW) gw = g * sg.
// kLanes independent partial sums over chunks of kFanIn * kLanes elements,
// chunk sums cascaded into two more levels, then the lanes combined pairwise.
// Independent lanes are what lets the compiler vectorize the loop (one running
// sum is a serial dependency it may not reorder without -ffast-math).
//
// The lanes live in a local array, and the lane loop carries
// SYMFAST_NO_LOOP_DEPENDENCIES (loop_hints.h): without it GCC checked gw
// against g and w for overlap on every 16 elements.
template <typename T, bool NW>
C10_ALWAYS_INLINE int64_t dot_lanes(at::opmath_type<T>* __restrict__ lanes_out, T* __restrict__ gw,
                                     const T* __restrict__ g, const T* __restrict__ w,
                                     at::opmath_type<T> sg, int64_t k, int64_t end) {
  using acc_t = at::opmath_type<T>;
  acc_t lanes[kLanes];
  for (int j = 0; j < kLanes; ++j) lanes[j] = lanes_out[j];
  for (; k + kLanes <= end; k += kLanes) {
    SYMFAST_NO_LOOP_DEPENDENCIES
    for (int j = 0; j < kLanes; ++j) {
      const acc_t gk = static_cast<acc_t>(g[k + j]);
      lanes[j] += gk * static_cast<acc_t>(w[k + j]);
      if constexpr (NW) gw[k + j] = static_cast<T>(gk * sg);
    }
  }
  for (int j = 0; j < kLanes; ++j) lanes_out[j] = lanes[j];
  return k;
}

template <typename T, bool NW>
C10_ALWAYS_INLINE at::opmath_type<T> dot_run(T* __restrict__ gw, const T* __restrict__ g,
                                             const T* __restrict__ w, at::opmath_type<T> sg,
                                             int64_t n) {
  using acc_t = at::opmath_type<T>;
  constexpr int64_t kChunk = int64_t(kFanIn) * kLanes;
  acc_t l1[kLanes] = {}, l2[kLanes] = {};
  int64_t k = 0, chunks = 0;
  for (; k + kChunk <= n;) {
    acc_t l0[kLanes] = {};
    k = dot_lanes<T, NW>(l0, gw, g, w, sg, k, k + kChunk);
    for (int j = 0; j < kLanes; ++j) l1[j] += l0[j];
    if (++chunks % kFanIn == 0) {
      for (int j = 0; j < kLanes; ++j) {
        l2[j] += l1[j];
        l1[j] = 0;
      }
    }
  }
  acc_t l0[kLanes] = {};
  k = dot_lanes<T, NW>(l0, gw, g, w, sg, k, n);
  acc_t tail = 0;
  for (; k < n; ++k) {
    const acc_t gk = static_cast<acc_t>(g[k]);
    tail += gk * static_cast<acc_t>(w[k]);
    if constexpr (NW) gw[k] = static_cast<T>(gk * sg);
  }
  for (int j = 0; j < kLanes; ++j) l0[j] = l2[j] + l1[j] + l0[j];
  for (int h = kLanes / 2; h > 0; h /= 2) {
    for (int j = 0; j < h; ++j) l0[j] += l0[j + h];
  }
  return l0[0] + tail;
}

// acc[k] += g[k] * w[k] and (NW) gw[k] = g[k] * s[k] over a contiguous run
// in which every element has its own accumulator (and its own gate value).
template <typename T, bool NW>
C10_ALWAYS_INLINE void accumulate_run(at::opmath_type<T>* __restrict__ acc, T* __restrict__ gw,
                                      const T* __restrict__ g, const T* __restrict__ w,
                                      const at::opmath_type<T>* __restrict__ s, int64_t n) {
  using acc_t = at::opmath_type<T>;
  SYMFAST_NO_LOOP_DEPENDENCIES
  for (int64_t k = 0; k < n; ++k) {
    const acc_t gk = static_cast<acc_t>(g[k]);
    acc[k] += gk * static_cast<acc_t>(w[k]);
    if constexpr (NW) gw[k] = static_cast<T>(gk * s[k]);
  }
}

// accumulate_run over four runs at once, r = 0..3 at p + r * stride (four
// rows, or four blocks of rows): acc[k] += (t0 + t1) + (t2 + t3). One load and
// store of the accumulator and one load of the gate serve four elements, which
// matters here: at SSE width the single-run loop is limited by loads and
// stores, not by memory.
template <typename T, bool NW>
C10_ALWAYS_INLINE void accumulate_run4(at::opmath_type<T>* __restrict__ acc, T* __restrict__ gw0,
                                       T* __restrict__ gw1, T* __restrict__ gw2,
                                       T* __restrict__ gw3, const T* __restrict__ g0,
                                       const T* __restrict__ g1, const T* __restrict__ g2,
                                       const T* __restrict__ g3, const T* __restrict__ w0,
                                       const T* __restrict__ w1, const T* __restrict__ w2,
                                       const T* __restrict__ w3,
                                       const at::opmath_type<T>* __restrict__ s, int64_t n) {
  using acc_t = at::opmath_type<T>;
  SYMFAST_NO_LOOP_DEPENDENCIES
  for (int64_t k = 0; k < n; ++k) {
    const acc_t a0 = static_cast<acc_t>(g0[k]), a1 = static_cast<acc_t>(g1[k]),
                a2 = static_cast<acc_t>(g2[k]), a3 = static_cast<acc_t>(g3[k]);
    acc[k] += (a0 * static_cast<acc_t>(w0[k]) + a1 * static_cast<acc_t>(w1[k])) +
              (a2 * static_cast<acc_t>(w2[k]) + a3 * static_cast<acc_t>(w3[k]));
    if constexpr (NW) {
      const acc_t sk = s[k];
      gw0[k] = static_cast<T>(a0 * sk);
      gw1[k] = static_cast<T>(a1 * sk);
      gw2[k] = static_cast<T>(a2 * sk);
      gw3[k] = static_cast<T>(a3 * sk);
    }
  }
}

// Pairwise sum of x[0, n), in a fixed order.
template <typename acc_t>
acc_t pairwise_sum(const acc_t* x, int64_t n) {
  if (n <= 8) {
    acc_t t = 0;
    for (int64_t k = 0; k < n; ++k) t += x[k];
    return t;
  }
  const int64_t h = n / 2;
  return pairwise_sum(x, h) + pairwise_sum(x + h, n - h);
}

// Per-group running sums over rows, cascaded: each row adds into level 0
// (through row()), and after every kFanIn rows a level is folded into the next.
template <typename acc_t>
class RowCascade {
 public:
  explicit RowCascade(int64_t width) : width_(width), sums_(kLevels * width, acc_t(0)) {}

  acc_t* row() { return sums_.data(); }

  // Call after each row added into row().
  void next() {
    for (int l = 0; l + 1 < kLevels && ++count_[l] == kFanIn; ++l) {
      acc_t* __restrict__ lo = sums_.data() + l * width_;
      acc_t* __restrict__ hi = lo + width_;
      for (int64_t k = 0; k < width_; ++k) {
        hi[k] += lo[k];
        lo[k] = 0;
      }
      count_[l] = 0;
    }
  }

  acc_t total(int64_t k) const {
    acc_t t = sums_[(kLevels - 1) * width_ + k];
    for (int l = kLevels - 2; l >= 0; --l) t += sums_[l * width_ + k];
    return t;
  }

 private:
  int64_t width_;
  std::vector<acc_t> sums_;
  int count_[kLevels] = {};
};

// One task of the plan: rows [o0, o1) x groups [g0, g1) x inner [i0, i1);
// writes the group sums to total[0, g1 - g0). Two loop shapes:
//
// * inner >= kDotMinInner: each (row, group) run is long, and is one dot_run.
// * otherwise (dim = last, or a conv weight grouped along dim 1 with inner =
//   kh * kw): a short run per group would be all loop overhead, so the row
//   segment [g0, g1) x [0, inner), which is contiguous, is streamed with one
//   accumulator per element. When the task holds whole rows, R consecutive
//   rows are streamed as one run of at least kMinWidth elements. The per
//   element sums are folded into group sums (pairwise) at the end.
template <typename T, bool NW>
void reduce_task(const GroupView& v, T* gw, const T* g, const T* w, const T* s, int64_t o0,
                 int64_t o1, int64_t g0, int64_t g1, int64_t i0, int64_t i1,
                 at::opmath_type<T>* total) {
  using acc_t = at::opmath_type<T>;
  const int64_t ng = g1 - g0, G = v.groups, inner = v.inner;
  if (inner >= kDotMinInner) {
    RowCascade<acc_t> sums(ng);
    for (int64_t o = o0; o < o1; ++o) {
      acc_t* acc = sums.row();
      for (int64_t gi = g0; gi < g1; ++gi) {
        const int64_t p = (o * G + gi) * inner + i0;
        acc[gi - g0] += dot_run<T, NW>(NW ? gw + p : nullptr, g + p, w + p,
                                       NW ? static_cast<acc_t>(s[gi]) : acc_t(0), i1 - i0);
      }
      sums.next();
    }
    for (int64_t k = 0; k < ng; ++k) total[k] = sums.total(k);
    return;
  }
  TORCH_INTERNAL_ASSERT(i0 == 0 && i1 == inner);  // the plan splits only long inner runs
  const int64_t seg = ng * inner;
  const int64_t R = ng == G ? std::max<int64_t>(1, kMinWidth / seg) : 1;
  const int64_t width = R * seg;
  // The gate of each accumulator: element k of a run is in group g0 + (k / inner) % ng.
  // Filled run by run, because a division per element costs as much as the
  // whole reduction.
  std::vector<acc_t> gate(NW ? width : 0);
  if constexpr (NW) {
    acc_t* out = gate.data();
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t k = 0; k < ng; ++k, out += inner) std::fill_n(out, inner, static_cast<acc_t>(s[g0 + k]));
    }
  }
  RowCascade<acc_t> sums(width);
  const int64_t stride = R * G * inner;  // from one step of R rows to the next
  int64_t o = o0;
  for (; o + 4 * R <= o1; o += 4 * R) {
    const int64_t p = (o * G + g0) * inner;
    auto at = [&](auto* base, int r) { return base + p + r * stride; };
    T* gwb = NW ? gw : nullptr;
    accumulate_run4<T, NW>(sums.row(), NW ? at(gwb, 0) : nullptr, NW ? at(gwb, 1) : nullptr,
                           NW ? at(gwb, 2) : nullptr, NW ? at(gwb, 3) : nullptr, at(g, 0),
                           at(g, 1), at(g, 2), at(g, 3), at(w, 0), at(w, 1), at(w, 2), at(w, 3),
                           gate.data(), width);
    sums.next();
  }
  for (; o + R <= o1; o += R) {
    const int64_t p = (o * G + g0) * inner;
    accumulate_run<T, NW>(sums.row(), NW ? gw + p : nullptr, g + p, w + p, gate.data(), width);
    sums.next();
  }
  for (; o < o1; ++o) {  // fewer than R rows left: one row into the first seg accumulators
    const int64_t p = (o * G + g0) * inner;
    accumulate_run<T, NW>(sums.row(), NW ? gw + p : nullptr, g + p, w + p, gate.data(), seg);
    sums.next();
  }
  // Accumulator (r * ng + k) * inner + i belongs to group g0 + k.
  std::vector<acc_t> per_elem(width);
  for (int64_t k = 0; k < width; ++k) per_elem[k] = sums.total(k);
  std::vector<acc_t> terms(R * inner);
  for (int64_t k = 0; k < ng; ++k) {
    for (int64_t r = 0; r < R; ++r) {
      std::copy_n(per_elem.data() + (r * ng + k) * inner, inner, terms.data() + r * inner);
    }
    total[k] = pairwise_sum(terms.data(), R * inner);
  }
}

// grad_s (and, with NW, grad_w) in one pass over grad and w.
template <typename T, bool NW>
void group_reduce(T* gw, T* gs, const T* g, const T* w, const T* s, const GroupView& v) {
  using acc_t = at::opmath_type<T>;
  const ReducePlan plan = plan_reduction(v, sizeof(T));
  const int64_t G = v.groups;
  const bool direct = plan.partial_rows() == 1;
  std::vector<acc_t> partial(direct ? 0 : plan.partial_rows() * G);

  at::parallel_for(0, plan.tasks(), 1, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) {
      const int64_t gc = t % plan.n_g, row = t / plan.n_g;  // row = oc * n_i + ic
      const int64_t oc = row / plan.n_i, ic = row % plan.n_i;
      const auto [g0, g1] = chunk(G, plan.n_g, gc);
      const auto [o0, o1] = chunk(v.outer, plan.n_o, oc);
      const auto [i0, i1] = chunk(v.inner, plan.n_i, ic);
      if (direct) {
        std::vector<acc_t> total(g1 - g0);
        reduce_task<T, NW>(v, gw, g, w, s, o0, o1, g0, g1, i0, i1, total.data());
        for (int64_t k = 0; k < g1 - g0; ++k) gs[g0 + k] = static_cast<T>(total[k]);
      } else {
        reduce_task<T, NW>(v, gw, g, w, s, o0, o1, g0, g1, i0, i1, partial.data() + row * G + g0);
      }
    }
  });
  if (direct) return;

  // Combine the (at most kMaxTasks) partial rows in row order, in runs of 16
  // summed separately and then together: the same sum on any thread count.
  const int64_t rows = plan.partial_rows();
  at::parallel_for(0, G, 4096, [&](int64_t b, int64_t e) {
    const int64_t n = e - b;
    std::vector<acc_t> acc(n, acc_t(0)), run(n);
    for (int64_t r0 = 0; r0 < rows; r0 += 16) {
      std::copy_n(partial.data() + r0 * G + b, n, run.data());
      for (int64_t r = r0 + 1; r < std::min(rows, r0 + 16); ++r) {
        const acc_t* __restrict__ src = partial.data() + r * G + b;
        for (int64_t k = 0; k < n; ++k) run[k] += src[k];
      }
      for (int64_t k = 0; k < n; ++k) acc[k] += run[k];
    }
    for (int64_t k = 0; k < n; ++k) gs[b + k] = static_cast<T>(acc[k]);
  });
}

// ------------------------------------------------------------------- ops
at::Tensor dcs_group_cpu(const at::Tensor& w_in, const at::Tensor& s_in, int64_t dim_in) {
  const int64_t dim = check_dcs_group_args(w_in, s_in, dim_in);
  at::Tensor out = empty_output(w_in.sizes(), w_in.options());
  if (w_in.numel() == 0) return out;
  const at::Tensor w = w_in.contiguous(), s = s_in.contiguous();  // no-ops when already so
  const GroupView v = group_view(w.sizes(), dim);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "symfast_dcs_group_cpu", [&] {
    scale_all<scalar_t>(out.mutable_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                        s.const_data_ptr<scalar_t>(), v);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> dcs_group_backward_cpu(const at::Tensor& grad_in,
                                                          const at::Tensor& w_in,
                                                          const at::Tensor& s_in, int64_t dim_in,
                                                          bool w_needed, bool s_needed) {
  const int64_t dim = check_dcs_group_backward_args(grad_in, w_in, s_in, dim_in);
  at::Tensor gw = w_needed ? empty_output(w_in.sizes(), w_in.options()) : unneeded_gradient(w_in.options());
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

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w_in.scalar_type(), "symfast_dcs_group_backward_cpu", [&] {
    using T = scalar_t;
    const T* gp = grad.const_data_ptr<T>();
    const T* sp = w_needed ? s.const_data_ptr<T>() : nullptr;
    if (!s_needed) {
      scale_all<T>(gw.mutable_data_ptr<T>(), gp, sp, v);
      return;
    }
    BOOL_SWITCH(w_needed, NW, [&] {
      group_reduce<T, NW>(NW ? gw.mutable_data_ptr<T>() : nullptr, gs.mutable_data_ptr<T>(), gp,
                          w.const_data_ptr<T>(), sp, v);
    });
  });
  return {gw, gs};
}

at::Tensor dcs_group_jvp_cpu(const at::Tensor& w_in, const at::Tensor& s_in, int64_t dim_in,
                             const c10::optional<at::Tensor>& w_dot,
                             const c10::optional<at::Tensor>& s_dot) {
  const int64_t dim = check_dcs_group_jvp_args(w_in, s_in, dim_in, w_dot, s_dot);
  const bool hwd = w_dot.has_value(), hsd = s_dot.has_value();
  if (!(hwd || hsd)) return at::zeros(w_in.sizes(), w_in.options());
  at::Tensor out = empty_output(w_in.sizes(), w_in.options());
  if (w_in.numel() == 0) return out;
  // w is read only with s_dot, s only with w_dot.
  const at::Tensor w = hsd ? w_in.contiguous() : at::Tensor();
  const at::Tensor s = hwd ? s_in.contiguous() : at::Tensor();
  const at::Tensor wd = hwd ? w_dot->contiguous() : at::Tensor();
  const at::Tensor sd = hsd ? s_dot->contiguous() : at::Tensor();
  const GroupView v = group_view(w_in.sizes(), dim);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w_in.scalar_type(), "symfast_dcs_group_jvp_cpu", [&] {
    using T = scalar_t;
    BOOL_SWITCH(hwd, HWD, [&] {
      BOOL_SWITCH(hsd, HSD, [&] {
        if constexpr (HWD || HSD) {  // no tangent at all returned above
          jvp_all<T, HWD, HSD>(out.mutable_data_ptr<T>(), ptr_or_null<T>(w), ptr_or_null<T>(s),
                               ptr_or_null<T>(wd), ptr_or_null<T>(sd), v);
        }
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(symfast, CPU, m) {
  m.impl("dcs_group", &dcs_group_cpu);
  m.impl("dcs_group_backward", &dcs_group_backward_cpu);
  m.impl("dcs_group_jvp", &dcs_group_jvp_cpu);
}

}  // namespace symfast
