// Loop hints shared by the CPU kernels.
#pragma once

// The kernels' outputs are always fresh tensors (or local accumulators), never
// overlapping an input, so no iteration of their loops depends on another.
// Saying so lets the compiler vectorize loops with many streams and short
// trip counts. Without it GCC needs a run-time overlap check for every
// output/operand pair: it gives up past its limit (10 checks), so the masked
// dcs backward with all three gradients (3 outputs, 4 inputs) ran scalar, 4x
// slower than the two-gradient one; and where it does check, a check on every
// 16-element lane pass of the group gate reduction made that backward 3.6x
// slower (94 against 26 us on a 256 x 784 float32 weight, one thread).
#if defined(__clang__)
#define SYMFAST_NO_LOOP_DEPENDENCIES _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define SYMFAST_NO_LOOP_DEPENDENCIES _Pragma("GCC ivdep")
#else
#define SYMFAST_NO_LOOP_DEPENDENCIES
#endif
