// Helpers shared by the CPU and CUDA kernels of every op.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cstdint>

namespace symfast {

// Elements per at::parallel_for task of the CPU elementwise loops: large enough
// to amortize handing a task to a thread, small enough to split a 1M-element
// tensor over the cores.
constexpr int64_t kGrainSize = 32768;

// Threads per block of the CUDA kernels: a multiple of the warp size that lets
// several blocks share an SM, so the occupancy query (cuda/common.cuh) can fill
// it on every architecture.
constexpr int kThreads = 256;

C10_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The data of an optional operand: null when the tensor is undefined (an input
// this call does not read). Kernels never dereference a null operand.
template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// What an op returns for a gradient it was told not to compute: a fresh
// (0,)-shaped tensor. It costs no memory traffic, and being fresh it does not
// alias the op's other outputs, as the schema promises.
inline at::Tensor unneeded_gradient(const at::TensorOptions& options) {
  return at::empty({0}, options);
}

// The second tangent y2 of a jet op: [K, *S] (sizes) when second is true; for
// a first-order call (second=false) not computed, and returned like an
// unneeded gradient. Kernels get a null y2 pointer then and write nothing.
inline at::Tensor second_tangent_output(bool second, at::IntArrayRef sizes,
                                        const at::TensorOptions& options) {
  return second ? at::empty(sizes, options) : unneeded_gradient(options);
}

}  // namespace symfast
