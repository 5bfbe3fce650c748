// Runtime choice of the vector instruction set for the contiguous CPU loops.
//
// The extension is compiled for the baseline of its target (x86-64: SSE2), so
// that one build runs on any CPU, while ATen's own elementwise kernels pick AVX2
// or AVX-512 at run time. AVX2 pays off mainly for the half types, whose float
// conversions vectorize only with it (docs/perf.md has the measurements).
//
// run_best<Kernel>(data, strides, n) calls Kernel::run compiled twice: inside a
// function with target("avx2") and for the baseline. Kernel::run and the loop
// it calls are always_inline, so each copy is vectorized for its target; nothing
// compiled for AVX2 is emitted as a shared (inline/template) symbol that
// baseline code could end up calling. The choice is made once, from CPUID
// (__builtin_cpu_supports), and can be forced down with SYMFAST_CPU_ISA=
// avx2|default (for tests and benchmarks; a level the CPU lacks is an error).
//
// No AVX-512 level: these loops are bound by memory, and on an AVX-512 CPU it
// gained nothing over AVX2 for the unmasked loops and lost on the masked
// backward (docs/perf.md).
//
// Only loops without additions go through here (products and bit selects), so
// every level rounds exactly like the baseline and the PyTorch reference (tested
// bit for bit); setup.py also passes -ffp-contract=off, so that no target that
// has FMA may fuse a*b + c into one rounding.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define SYMFAST_X86_DISPATCH 1
#endif

namespace symfast {

enum class CpuIsa : int { kDefault = 0, kAvx2 = 1 };

inline const char* isa_name(CpuIsa isa) { return isa == CpuIsa::kAvx2 ? "avx2" : "default"; }

inline CpuIsa detect_cpu_isa() {
  CpuIsa best = CpuIsa::kDefault;
#ifdef SYMFAST_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) best = CpuIsa::kAvx2;
#endif
  const char* env = std::getenv("SYMFAST_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  CpuIsa want;
  if (std::strcmp(env, "avx2") == 0) {
    want = CpuIsa::kAvx2;
  } else if (std::strcmp(env, "default") == 0) {
    want = CpuIsa::kDefault;
  } else {
    TORCH_CHECK(false, "SYMFAST_CPU_ISA must be avx2 or default, got '", env, "'");
  }
  TORCH_CHECK(static_cast<int>(want) <= static_cast<int>(best), "SYMFAST_CPU_ISA=", env,
              ": this CPU supports at most ", isa_name(best));
  return want;
}

// The instruction set the contiguous loops use in this process.
inline CpuIsa cpu_isa() {
  static const CpuIsa isa = detect_cpu_isa();
  return isa;
}

#ifdef SYMFAST_X86_DISPATCH
template <typename Kernel>
__attribute__((target("avx2"))) void run_avx2(char** data, const int64_t* strides, int64_t n) {
  Kernel::run(data, strides, n);
}
#endif

template <typename Kernel>
void run_best(char** data, const int64_t* strides, int64_t n) {
#ifdef SYMFAST_X86_DISPATCH
  switch (cpu_isa()) {
    case CpuIsa::kAvx2: return run_avx2<Kernel>(data, strides, n);
    case CpuIsa::kDefault: break;
  }
#endif
  Kernel::run(data, strides, n);
}

}  // namespace symfast
