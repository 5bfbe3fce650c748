// Loop hints shared by the CPU kernels.
#pragma once

// The kernels' outputs are always fresh tensors (or local accumulators), never
// overlapping an input, so no iteration of their loops depends on another.
// Saying so lets the compiler vectorize loops with many streams and short
// trip counts. Without it GCC needs a run-time overlap check for every
// output/operand pair and gives up past its limit (10 checks): the masked dcs
// backward with all three gradients (3 outputs, 4 inputs) would run scalar.
// Where it does emit the checks, they run on every 16-element lane pass of the
// group gate reduction, which costs more than the arithmetic (docs/perf.md).
#if defined(__clang__)
#define SYMFAST_NO_LOOP_DEPENDENCIES _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define SYMFAST_NO_LOOP_DEPENDENCIES _Pragma("GCC ivdep")
#else
#define SYMFAST_NO_LOOP_DEPENDENCIES
#endif
