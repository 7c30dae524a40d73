// Branch-free float exp, log and tanh that GCC's auto-vectoriser can inline into SIMD loops (the
// scalar libm functions are calls it cannot look into), and their float64 counterparts (the
// accurate libm functions).  Shared by the CPU kernels of the KL ops (kl_cpu_kernels.h) and of
// tanh_and_derivative (act_cpu.cpp).  Like kl_cpu_kernels.h, this file is included inside a
// namespace, once per instruction set, after <algorithm>, <cmath>, <cstring> and <limits>; it has no
// include guard and includes nothing itself.

#ifndef TRPO_VMATH_INLINE
#if defined(__GNUC__)
#define TRPO_VMATH_INLINE inline __attribute__((always_inline))
#else
#define TRPO_VMATH_INLINE inline
#endif
#endif

// Bit casts between float and int32 (std::bit_cast is C++20, and torch builds extensions as C++17
// up to 2.11); a 4-byte memcpy compiles to a register move and vectorises like a cast.
TRPO_VMATH_INLINE int32_t float_as_int(float x) {
  int32_t i;
  std::memcpy(&i, &x, sizeof i);
  return i;
}

TRPO_VMATH_INLINE float int_as_float(int32_t i) {
  float x;
  std::memcpy(&x, &i, sizeof x);
  return x;
}

// --- exp and log for float, branch-free ---------------------------------------------------------
//
// (Always inlined, TRPO_VMATH_INLINE: a call inside a row loop keeps GCC from vectorising it, and
// GCC's own inlining heuristics gave up on them in the larger kernels.)
//
// vexp: Cody–Waite reduction x = n ln2 + r, |r| <= ln2/2, with ln2 split into a 9-bit head (n·head
// is exact for |n| < 2^15) and a tail; exp(r) by its Taylor series to r⁷ (truncation < 5e-9
// relative, below float's 6e-8 rounding); 2ⁿ built in the exponent bits.  Inputs below −87 give
// 0 (the true value is < 1.7e-38, at the bottom of float's normal range; it only ever enters sums
// that hold a 1), above 88 give +inf, NaN gives NaN.
TRPO_VMATH_INLINE float vexp(float x) {
  const float magic = 12582912.0f;  // 1.5·2²³: adding it rounds to an integer in the low bits
  const float xc = std::min(std::max(x, -87.0f), 88.0f);  // NaN passes through both
  const float kn = xc * 1.44269504088896341f + magic;
  const int32_t n = float_as_int(kn) - float_as_int(magic);
  const float fn = kn - magic;
  const float r = (xc - fn * 0.693359375f) + fn * 2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float scale = int_as_float((n + 127) << 23);
  const float y = p * scale;
  return x < -87.0f ? 0.0f : (x > 88.0f ? std::numeric_limits<float>::infinity() : y);
}

// vlog for positive normal floats (here: sums of exponentials, >= 1 in every row that holds a
// finite logit); NaN gives NaN.  x = 2ᵉ m with m in [√½, √2); log m = 2 atanh(s), s = (m−1)/(m+1),
// |s| <= 0.172, by its series to s¹¹ (truncation < 1e-9 relative).
TRPO_VMATH_INLINE float vlog(float x) {
  const int32_t bits = float_as_int(x);
  int32_t e = ((bits >> 23) & 0xff) - 127;
  float m = int_as_float((bits & 0x007fffff) | 0x3f800000);  // [1, 2)
  const bool big = m > 1.41421356f;
  m = big ? 0.5f * m : m;
  e = big ? e + 1 : e;
  const float f = m - 1.0f;  // exact (Sterbenz)
  const float s = f / (2.0f + f);
  const float s2 = s * s;
  float q = 2.0f / 11.0f;
  q = q * s2 + 2.0f / 9.0f;
  q = q * s2 + 2.0f / 7.0f;
  q = q * s2 + 2.0f / 5.0f;
  q = q * s2 + 2.0f / 3.0f;
  q = q * s2 + 2.0f;
  const float fe = static_cast<float>(e);
  // ln2 = 0.693359375 − 2.12194440e-4: the head times e is exact.
  const float y = fe * 0.693359375f + (s * q - fe * 2.12194440e-4f);
  return x != x ? x : y;
}

// float64 keeps the accurate libm functions: its results are held to 1e-10 relative.
TRPO_VMATH_INLINE double vexp(double x) { return std::exp(x); }
TRPO_VMATH_INLINE double vlog(double x) { return std::log(x); }

// vtanh: for |x| < 0.4 the odd Taylor series to x¹³ (truncation < 2e-9 relative); beyond,
// 1 − 2/(e^{2|x|} + 1) with vexp (the subtraction costs at most ~2 bits at |x| = 0.4, ~3e-7
// relative), |x| capped at 10, beyond which tanh rounds to 1 in float; the sign restored last.
// ±inf give ±1, NaN gives NaN.
TRPO_VMATH_INLINE float vtanh(float x) {
  const float t = std::min(std::fabs(x), 10.0f);  // NaN passes through
  const float t2 = t * t;
  float q = 21844.0f / 6081075.0f;
  q = q * t2 - 1382.0f / 155925.0f;
  q = q * t2 + 62.0f / 2835.0f;
  q = q * t2 - 17.0f / 315.0f;
  q = q * t2 + 2.0f / 15.0f;
  q = q * t2 - 1.0f / 3.0f;
  q = q * t2 + 1.0f;
  const float small = t * q;
  const float large = 1.0f - 2.0f / (vexp(2.0f * t) + 1.0f);
  return std::copysign(t < 0.4f ? small : large, x);
}

TRPO_VMATH_INLINE double vtanh(double x) { return std::tanh(x); }
