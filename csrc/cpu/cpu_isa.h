// Which build of a multiply-compiled CPU kernel file to run: the x86-64 baseline, AVX2 + FMA, or
// AVX-512 (F, VL, BW, DQ; 512-bit vectors).  The best one the CPU has, unless the environment
// variable TRPO_EXT_CPU_ISA asks for a lower one: "baseline", "avx2" or "avx512" (a level the CPU
// lacks falls back to the best it has; any other value means the default).  Tests use it to check
// every build.  Read once per process.  (The CG solver's copy in cg_cpu.cpp asks for AVX2 without
// FMA and ships alone to CMake consumers; it knows only "baseline".)
#pragma once

#include <cstdlib>
#include <cstring>

namespace trpo_ext {

enum class CpuIsa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The best instruction set this CPU offers among those the kernels are compiled for.
inline CpuIsa cpu_isa_supported() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  static const CpuIsa best = [] {
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) {
      return CpuIsa::kBaseline;
    }
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
      return CpuIsa::kAvx512;
    }
    return CpuIsa::kAvx2;
  }();
  return best;
#else
  return CpuIsa::kBaseline;
#endif
}

inline CpuIsa cpu_isa_selected() {
  static const CpuIsa chosen = [] {
    const CpuIsa best = cpu_isa_supported();
    const char* want = std::getenv("TRPO_EXT_CPU_ISA");
    CpuIsa cap = CpuIsa::kAvx512;
    if (want != nullptr && std::strcmp(want, "baseline") == 0) cap = CpuIsa::kBaseline;
    if (want != nullptr && std::strcmp(want, "avx2") == 0) cap = CpuIsa::kAvx2;
    return static_cast<int>(cap) < static_cast<int>(best) ? cap : best;
  }();
  return chosen;
}

inline const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

}  // namespace trpo_ext
