// Which build of a twice-compiled CPU kernel file to run (the x86-64 baseline, or AVX2 + FMA):
// AVX2 + FMA where the CPU has them, unless the environment variable TRPO_EXT_CPU_ISA=baseline asks
// for the baseline (tests use it to check both builds).  Read once per process.  (The CG solver's
// copy in cg_cpu.cpp asks for AVX2 without FMA and ships alone to CMake consumers.)
#pragma once

#include <cstdlib>
#include <cstring>

namespace trpo_ext {

inline bool cpu_avx2_fma_selected() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  static const bool yes = [] {
    const char* want = std::getenv("TRPO_EXT_CPU_ISA");
    if (want != nullptr && std::strcmp(want, "baseline") == 0) return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return yes;
#else
  return false;
#endif
}

}  // namespace trpo_ext
