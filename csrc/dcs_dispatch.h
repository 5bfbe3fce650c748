// Runtime flags -> compile-time kernel instantiations, shared by the CPU and
// CUDA kernels of dcs_backward (which gradients) and dcs_jvp (which tangents).
#pragma once

#include <c10/util/Exception.h>

#include <type_traits>

namespace symfast {

// Calls run(std::bool_constant<a>, <b>, <c>, <has_mask>) for the flag
// combinations that can occur: at least one of a, b, c, and c only with a mask
// (the third output/tangent belongs to v, which exists only with a mask).
// Callers return early when a, b and c are all false.
template <typename Run>
void dispatch_flags(const char* op, bool a, bool b, bool c, bool has_mask, const Run& run) {
  using T_ = std::true_type;
  using F_ = std::false_type;
  const int code = (a << 3) | (b << 2) | (c << 1) | int(has_mask);
  switch (code) {
    case 0b1000: run(T_{}, F_{}, F_{}, F_{}); break;
    case 0b0100: run(F_{}, T_{}, F_{}, F_{}); break;
    case 0b1100: run(T_{}, T_{}, F_{}, F_{}); break;
    case 0b1001: run(T_{}, F_{}, F_{}, T_{}); break;
    case 0b0101: run(F_{}, T_{}, F_{}, T_{}); break;
    case 0b1101: run(T_{}, T_{}, F_{}, T_{}); break;
    case 0b0011: run(F_{}, F_{}, T_{}, T_{}); break;
    case 0b1011: run(T_{}, F_{}, T_{}, T_{}); break;
    case 0b0111: run(F_{}, T_{}, T_{}, T_{}); break;
    case 0b1111: run(T_{}, T_{}, T_{}, T_{}); break;
    default: TORCH_INTERNAL_ASSERT(false, op, ": unexpected flag combination ", code);
  }
}

}  // namespace symfast
