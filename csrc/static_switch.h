// Runtime booleans to compile-time constants, the one way the kernels turn a
// flag into a template argument.
//
//   BOOL_SWITCH(mask.has_value(), HAS_MASK, [&] { kernel<HAS_MASK>(...); });
//
// runs the lambda with HAS_MASK a constexpr bool equal to the condition, so a
// kernel is compiled once per value and its inner loop never tests the flag.
// Nested switches cover several flags; a combination the op's checks rule out
// can be left uncompiled with `if constexpr` in the innermost lambda. The same
// construction as flash-attention's static_switch.h.
#pragma once

#define BOOL_SWITCH(COND, CONST_NAME, ...)      \
  [&] {                                         \
    if (COND) {                                 \
      constexpr static bool CONST_NAME = true;  \
      return __VA_ARGS__();                     \
    } else {                                    \
      constexpr static bool CONST_NAME = false; \
      return __VA_ARGS__();                     \
    }                                           \
  }()
