// KL / surrogate row kernels for the CPU — categorical rows, and diagonal-Gaussian rows with a
// state-independent log_std — written so that GCC's auto-vectoriser turns every inner loop into
// SIMD code.  This file is included three times by kl_cpu.cpp: once plainly (the x86-64 baseline,
// SSE2), once under `#pragma GCC target("avx2,fma")` and once for AVX-512, the last two with
// TRPO_KL_AVX2_KERNELS defined (which adds a few AVX2 intrinsics), each time inside its own
// namespace, so that one source gives every instruction set and kl_cpu.cpp picks one at run time.
// It therefore has no include guard and includes nothing itself.
//
// Why these kernels (and vmath.h's exp/log, included just before this file) are CPU-only and not
// in kl.h: the GPU computes one element per lane with the accurate libdevice expf/logf, which costs
// it nothing next to the loads.  A CPU core instead needs the exponentials of 8 elements in one
// instruction stream, which the scalar libm functions (calls the vectoriser cannot look into)
// forbid.  The same formula for the KL as kl::cat_kl is used, rearranged (see cat_row_kl below).
//
// Categorical layout: for K <= kTileMaxK a tile of up to kTileRows rows is transposed into
// class-major scratch ([K][rows]), so that every loop runs across rows and is full-width whatever
// K is (K = 2 would otherwise give 2-wide loops).  Wider rows are walked along the row with kLanes
// partial sums.  Partial sums are combined in a fixed order, so results do not depend on the
// thread count.

constexpr int kTileRows = 64;
constexpr int64_t kTileMaxK = 32;
// Lanes of the partial sums: one vector of floats (16 in the AVX-512 build, which defines
// TRPO_KL_LANES; with 8 there GCC split and recombined the lane loops across 16-float vectors, and
// the Gaussian mean KL ran 2.4× slower).
#ifdef TRPO_KL_LANES
constexpr int kLanes = TRPO_KL_LANES;
#else
constexpr int kLanes = 8;
#endif

// --- per-row statistics -------------------------------------------------------------------------

// KL of a row from its statistics: with p_old = e_old / sum_old,
//   KL = Σ p_old (ℓ_old − ℓ_new) − LSE(ℓ_old) + LSE(ℓ_new)
//      = cross / sum_old + (max_new − max_old) + (log sum_new − log sum_old),
// kl::cat_kl's formula with the maxima taken out of the logs, so large logits cancel exactly first.
// Identical rows give exactly 0: cross = 0 and the other two terms are differences of equal values.
template <typename acc_t>
inline acc_t cat_row_kl(acc_t max_old, acc_t sum_old, acc_t cross, acc_t max_new, acc_t sum_new,
                        acc_t log_sum_old, acc_t log_sum_new) {
  return cross / sum_old + (max_new - max_old) + (log_sum_new - log_sum_old);
}

// Batch partial sums of one block, kept in kLanes lanes so that the row loop vectorises; folded
// in lane order at the end.  The maxima stay in acc_t: the max of acc_t values is one of them.
template <typename acc_t>
struct LaneSums {
  double kl[kLanes];
  double surrogate[kLanes];
  acc_t max_kl[kLanes];
};

template <typename acc_t>
inline void lanes_init(LaneSums<acc_t>& s) {
  for (int j = 0; j < kLanes; ++j) {
    s.kl[j] = 0.0;
    s.surrogate[j] = 0.0;
    s.max_kl[j] = kl::neg_inf<acc_t>();
  }
}

// Adds n per-row values (surrogate terms only when kSurrogate) to the lanes: row i goes to lane
// i % kLanes, counted from the start of the block (tiles hold a multiple of kLanes rows).  The
// lanes are copied into locals for the loop: through the struct GCC kept them in memory and
// converted one element at a time.
template <typename acc_t, bool kSurrogate>
inline void lanes_add(LaneSums<acc_t>& __restrict s, const acc_t* __restrict kl_rows,
                      const acc_t* __restrict surrogate_rows, int n) {
  double kl[kLanes], surrogate[kLanes];
  acc_t mx[kLanes];
  for (int j = 0; j < kLanes; ++j) {
    kl[j] = s.kl[j];
    surrogate[j] = s.surrogate[j];
    mx[j] = s.max_kl[j];
  }
  int i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) kl[j] += static_cast<double>(kl_rows[i + j]);
    for (int j = 0; j < kLanes; ++j) mx[j] = kl::nan_max(mx[j], kl_rows[i + j]);
    if (kSurrogate) {
      for (int j = 0; j < kLanes; ++j) surrogate[j] += static_cast<double>(surrogate_rows[i + j]);
    }
  }
  for (int j = 0; i + j < n; ++j) {
    kl[j] += static_cast<double>(kl_rows[i + j]);
    mx[j] = kl::nan_max(mx[j], kl_rows[i + j]);
    if (kSurrogate) surrogate[j] += static_cast<double>(surrogate_rows[i + j]);
  }
  for (int j = 0; j < kLanes; ++j) {
    s.kl[j] = kl[j];
    s.surrogate[j] = surrogate[j];
    s.max_kl[j] = mx[j];
  }
}

template <typename acc_t>
inline Sums lanes_fold(const LaneSums<acc_t>& s) {
  Sums t = kl::sums_empty();
  for (int j = 0; j < kLanes; ++j) {
    t = kl::sums_merge(t, {s.kl[j], s.surrogate[j], static_cast<double>(s.max_kl[j])});
  }
  return t;
}

// --- tiles of short rows (K <= kTileMaxK) --------------------------------------------------------

// Statistics of the n rows of a tile, class-major: x_old[k * kTileRows + i] is row i's class k.
template <typename acc_t>
struct Tile {
  acc_t max_old[kTileRows], sum_old[kTileRows], cross[kTileRows];
  acc_t max_new[kTileRows], sum_new[kTileRows];
  acc_t log_sum_old[kTileRows], log_sum_new[kTileRows];
};

#ifdef TRPO_KL_AVX2_KERNELS
// 8×8 transpose in registers: r[j] element c becomes c[c] element j.  unpack: [r0_0 r1_0 r0_1 r1_1 |
// r0_4 r1_4 r0_5 r1_5] …; shuffle: columns c and c + 4 of four rows; permute2f128: the two row
// halves of one column.  24 shuffles.
inline void transpose8x8(const __m256 r[8], __m256 c[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  c[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  c[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  c[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  c[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  c[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  c[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  c[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  c[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// The class-major copy of 8 float rows by 8×8 in-register transposes: src holds the rows (row j at
// src + j·K), column c of the result goes to out[c · kTileRows], 8 consecutive rows.  Each row is
// read as 8-float vectors at column offsets 0, 8, … and a last one at K − 8 (overlapping; its
// columns are stored again with the same values).  For K < 8 the one vector reads 8 − K floats
// past the row: the caller guarantees they exist.  About 6 instructions per 8 elements, against
// ~2 per element for the scalar copy, which GCC cannot vectorise for a runtime K.
inline void tile_load_rows8(const float* __restrict src, int64_t K, float* __restrict out) {
  for (int64_t k = 0; k < K; k += 8) {
    const int64_t kk = K >= 8 ? std::min<int64_t>(k, K - 8) : 0;
    __m256 r[8], c[8];
    for (int j = 0; j < 8; ++j) r[j] = _mm256_loadu_ps(src + j * K + kk);
    transpose8x8(r, c);
    const int cols = K >= 8 ? 8 : static_cast<int>(K);
    for (int j = 0; j < cols; ++j) _mm256_storeu_ps(out + (kk + j) * kTileRows, c[j]);
  }
}

// The way back, for K >= 8 only: 8 rows of class-major scratch (class c of row j at
// in[c · kTileRows + j]) into row-major dst (row j at dst + j·K), the last 8 columns overlapping
// as in tile_load_rows8 (stored twice with the same values).  Each row's stores stay within it.
inline void tile_store_rows8(const float* __restrict in, int64_t K, float* __restrict dst) {
  for (int64_t k = 0; k < K; k += 8) {
    const int64_t kk = std::min<int64_t>(k, K - 8);
    __m256 c[8], r[8];
    for (int j = 0; j < 8; ++j) c[j] = _mm256_loadu_ps(in + (kk + j) * kTileRows);
    transpose8x8(c, r);
    for (int j = 0; j < 8; ++j) _mm256_storeu_ps(dst + j * K + kk, r[j]);
  }
}
#endif

// Copies rows [row0, row0 + n) of a [B, K] matrix into class-major scratch.  KC is K when it is a
// compile-time constant (the copy then vectorises as a de-interleave), else 0.
template <int KC, typename scalar_t, typename acc_t>
inline void tile_load(const scalar_t* x, int64_t K_runtime, int64_t B, int64_t row0, int n,
                      acc_t* out) {
  const int64_t K = KC > 0 ? KC : K_runtime;
  const scalar_t* src = x + row0 * K;
  int i = 0;
#ifdef TRPO_KL_AVX2_KERNELS
  if constexpr (KC == 0 && std::is_same<scalar_t, float>::value &&
                std::is_same<acc_t, float>::value) {
    // Groups of 8 rows; for K < 8, only while 8 more rows follow (the over-read of the last row).
    for (; i + 8 <= n && (K >= 8 || row0 + i + 16 <= B); i += 8) {
      tile_load_rows8(src + i * K, K, out + i);
    }
  }
#endif
  for (; i < n; ++i) {
    for (int64_t k = 0; k < K; ++k) out[k * kTileRows + i] = static_cast<acc_t>(src[i * K + k]);
  }
  // A short last tile: the rows past n are computed (full-width loops) but never used; zeros keep
  // that arithmetic on defined values.
  for (int64_t k = 0; k < K && n < kTileRows; ++k) {
    for (int i = n; i < kTileRows; ++i) out[k * kTileRows + i] = acc_t(0);
  }
}

// Software prefetch of the next tile's rows (both logit matrices), a few cache lines at each step
// of this tile's exponential pass.  Without it the tile copy found its rows in memory, not in the
// cache: the hardware prefetchers run only a little ahead of a stream and stop at page boundaries,
// while a tile's arithmetic leaves the memory idle, and K = 18 spent about as long waiting for the
// copies as computing (B = 10⁶ in 26 ns a row on one thread, against 14 ns in cache).  Spread over
// the steps rather than issued at once: a burst of prefetches fills the line-fill buffers and
// stalls the core as the loads themselves did.
struct RowPrefetch {
  const char* old_rows = nullptr;  // the first line of the rows in each matrix
  const char* new_rows = nullptr;
  int64_t lines = 0;     // lines per matrix (0: nothing to prefetch)
  int64_t per_step = 0;  // lines per matrix per step
};

inline uintptr_t line_floor(const void* x) {
  return reinterpret_cast<uintptr_t>(x) & ~uintptr_t(63);
}

// Rows [row, row + rows) of both matrices, spread over `steps` steps (none past row B).
template <typename scalar_t>
inline RowPrefetch rows_prefetch(const CategoricalPtrs<scalar_t>& p, int64_t row, int64_t rows,
                                 int64_t K, int64_t steps) {
  RowPrefetch f;
  if (row >= p.B) return f;
  const int64_t bytes = std::min<int64_t>(rows, p.B - row) * K *
                        static_cast<int64_t>(sizeof(scalar_t));
  const scalar_t* a = p.logits_old + row * K;
  const uintptr_t first = line_floor(a);
  f.old_rows = reinterpret_cast<const char*>(first);
  f.new_rows = reinterpret_cast<const char*>(line_floor(p.logits_new + row * K));
  // lines covering [a, a + bytes) (the two matrices may sit differently against the lines: the
  // new one's count is at most one more, and its last line is the next row's, harmless)
  f.lines = (static_cast<int64_t>(reinterpret_cast<uintptr_t>(a) - first) + bytes + 63) / 64 + 1;
  f.per_step = (f.lines + steps - 1) / steps;
  return f;
}

inline void prefetch_range(const void* x, int64_t bytes) {
  const uintptr_t end = reinterpret_cast<uintptr_t>(x) + static_cast<uintptr_t>(bytes);
  for (uintptr_t line = line_floor(x); line < end; line += 64) {
    __builtin_prefetch(reinterpret_cast<const void*>(line));
  }
}

inline void prefetch_step(const RowPrefetch& f, int64_t step) {
  const int64_t end = std::min(f.lines, (step + 1) * f.per_step);
  for (int64_t l = step * f.per_step; l < end; ++l) {
    __builtin_prefetch(f.old_rows + 64 * l);
    __builtin_prefetch(f.new_rows + 64 * l);
  }
}

// Steps of tile_stats' exponential pass, over which the next tile is prefetched: one per class
// here, one per class and 16-row vector in the AVX-512 float version.
template <typename acc_t>
inline int64_t tile_stats_steps(int64_t K) {
  return K;
}

// Row maxima, then Σ exp(ℓ − max) and Σ exp(ℓ_old − max_old)(ℓ_old − ℓ_new), then the logs of the
// sums.  Two passes over the (cache-resident) tile instead of an online log-sum-exp: no rescaling,
// no branches.  A class with p_old = 0 (a −inf old logit) adds nothing to the cross term, as in
// torch.distributions, rather than 0 · ∞ = NaN.
template <typename acc_t>
inline void tile_stats(const acc_t* __restrict lo, const acc_t* __restrict ln, int64_t K,
                       Tile<acc_t>& __restrict t, const RowPrefetch& f) {
  // Local copies and __restrict: without them GCC cannot rule out that the scratch and the
  // statistics overlap and falls back to scalar code for the maxima.
  acc_t mo[kTileRows], mn[kTileRows], so[kTileRows], cr[kTileRows], sn[kTileRows];
  for (int i = 0; i < kTileRows; ++i) {
    mo[i] = lo[i];
    mn[i] = ln[i];
  }
  for (int64_t k = 1; k < K; ++k) {
    const acc_t* __restrict a = lo + k * kTileRows;
    const acc_t* __restrict b = ln + k * kTileRows;
    for (int i = 0; i < kTileRows; ++i) {
      mo[i] = a[i] > mo[i] ? a[i] : mo[i];
      mn[i] = b[i] > mn[i] ? b[i] : mn[i];
    }
  }
  for (int i = 0; i < kTileRows; ++i) so[i] = cr[i] = sn[i] = acc_t(0);
  for (int64_t k = 0; k < K; ++k) {
    prefetch_step(f, k);
    const acc_t* __restrict a = lo + k * kTileRows;
    const acc_t* __restrict b = ln + k * kTileRows;
    for (int i = 0; i < kTileRows; ++i) {
      const acc_t e = vexp(a[i] - mo[i]);
      so[i] += e;
      cr[i] += e == acc_t(0) ? acc_t(0) : e * (a[i] - b[i]);
      sn[i] += vexp(b[i] - mn[i]);
    }
  }
  for (int i = 0; i < kTileRows; ++i) {
    t.max_old[i] = mo[i];
    t.max_new[i] = mn[i];
    t.sum_old[i] = so[i];
    t.cross[i] = cr[i];
    t.sum_new[i] = sn[i];
    t.log_sum_old[i] = vlog(so[i]);
    t.log_sum_new[i] = vlog(sn[i]);
  }
}

#ifdef TRPO_KL_AVX512_KERNELS
// The AVX-512 copy of tile_stats for float, written with intrinsics: GCC's vexp above costs ~22
// instructions (clamps and selects for both ends of the range), and the exponents here are of
// x = ℓ − max <= 0 only.  exp_scaled: Cody–Waite reduction by n = round(x / ln2) (rounded by
// adding 1.5·2²³ in one FMA, not by vrndscaleps: one instruction fewer), e^r by a degree-6
// polynomial fitted to it on |r| <= ln2/2 (relative error 1.9e-9 in exact arithmetic, about 1 ulp
// evaluated in float, as for vexp's degree-7 Taylor series), and 2ⁿ by vscalefps.
// exp_nonpositive: lanes with x < −87 (or a −inf logit) give 0, as vexp's do, NaN gives NaN;
// about 13 instructions for 16 elements.  A live lane's value is >= e^−87 ≈ 1.6e-38, a normal
// float, so flushing denormals (torch.set_flush_denormal) never turns it into a 0 that the cross
// term's mask would still multiply by an infinite ℓ_old − ℓ_new.
// (The all-lanes masked forms: GCC 12's _mm512_max_ps, _mm512_min_ps, _mm512_rcp14_ps and
// others pass an undefined vector through their mask argument and warn "may be used
// uninitialized" at every inlined use.)
constexpr __mmask16 kAll16 = 0xFFFF;

// a > b ? a : b (b where either is NaN), as vmaxps.
inline __m512 max16(__m512 a, __m512 b) { return _mm512_maskz_max_ps(kAll16, a, b); }

// e^x for x in [−104, 88.8] (or NaN), lanes outside `keep` 0.
inline __m512 exp_scaled(__m512 x, __mmask16 keep) {
  const __m512 shifter = _mm512_set1_ps(12582912.0f);  // 1.5·2²³
  const __m512 n = _mm512_sub_ps(
      _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), shifter), shifter);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(0.0013836846040167284f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.008374815899097145f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.04166822557445107f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.16666420168727178f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.49999992079768507f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0000000363234465f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0000000005541725f));
  return _mm512_maskz_scalef_ps(keep, p, n);
}

inline __m512 exp_nonpositive(__m512 x, __mmask16& live) {
  live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_NLT_UQ);  // NaN stays live
  return exp_scaled(max16(_mm512_set1_ps(-87.0f), x), live);  // NaN passes max16
}

// The same without the exact zeros: x < −87 gives e^−87 ≈ 1.6e-38, for sums that hold a 1.
inline __m512 exp_nonpositive_in_sum(__m512 x) {
  return exp_scaled(max16(_mm512_set1_ps(-87.0f), x), kAll16);
}

template <>
inline int64_t tile_stats_steps<float>(int64_t K) {
  return (kTileRows / 16) * K;
}

// tile_stats for float tiles: 16 rows a vector, the same two passes, the cross term only where
// p_old is not 0.
inline void tile_stats(const float* __restrict lo, const float* __restrict ln, int64_t K,
                       Tile<float>& __restrict t, const RowPrefetch& f) {
  for (int v = 0; v < kTileRows; v += 16) {
    __m512 mo = _mm512_loadu_ps(lo + v), mn = _mm512_loadu_ps(ln + v);
    for (int64_t k = 1; k < K; ++k) {
      mo = max16(_mm512_loadu_ps(lo + k * kTileRows + v), mo);
      mn = max16(_mm512_loadu_ps(ln + k * kTileRows + v), mn);
    }
    __m512 so = _mm512_setzero_ps(), cr = _mm512_setzero_ps(), sn = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
      prefetch_step(f, (v / 16) * K + k);
      const __m512 a = _mm512_loadu_ps(lo + k * kTileRows + v);
      const __m512 b = _mm512_loadu_ps(ln + k * kTileRows + v);
      __mmask16 live_old;
      const __m512 e = exp_nonpositive(_mm512_sub_ps(a, mo), live_old);
      so = _mm512_add_ps(so, e);
      cr = _mm512_mask3_fmadd_ps(e, _mm512_sub_ps(a, b), cr, live_old);
      sn = _mm512_add_ps(sn, exp_nonpositive_in_sum(_mm512_sub_ps(b, mn)));
    }
    _mm512_storeu_ps(t.max_old + v, mo);
    _mm512_storeu_ps(t.max_new + v, mn);
    _mm512_storeu_ps(t.sum_old + v, so);
    _mm512_storeu_ps(t.cross + v, cr);
    _mm512_storeu_ps(t.sum_new + v, sn);
  }
  for (int i = 0; i < kTileRows; ++i) {
    t.log_sum_old[i] = vlog(t.sum_old[i]);
    t.log_sum_new[i] = vlog(t.sum_new[i]);
  }
}
#elif defined(TRPO_KL_AVX2_KERNELS)
// The AVX2 copy (8 floats a vector; no masks or vscalefps): the same reduction and polynomial as
// exp_scaled above, 2ⁿ built in the exponent bits, which stay normal since the callers clamp x to
// [−87, 88] (n in [−126, 127]).  NaN gives NaN.
inline __m256 exp8_clamped(__m256 x) {
  const __m256 shifter = _mm256_set1_ps(12582912.0f);  // 1.5·2²³
  const __m256 kn = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), shifter);
  const __m256 n = _mm256_sub_ps(kn, shifter);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(0.0013836846040167284f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.008374815899097145f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.04166822557445107f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.16666420168727178f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.49999992079768507f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0000000363234465f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0000000005541725f));
  // kn holds n in its low mantissa bits (its ulp is 1): n = bits(kn) − bits(shifter)
  const __m256i ni = _mm256_sub_epi32(_mm256_castps_si256(kn), _mm256_castps_si256(shifter));
  const __m256 scale =
      _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(ni, _mm256_set1_epi32(127)), 23));
  return _mm256_mul_ps(p, scale);
}

// e^x for x <= 0 (or NaN): 0 where x < −87 (live: all-ones lanes elsewhere, NaN included).
inline __m256 exp8_nonpositive(__m256 x, __m256& live) {
  live = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_NLT_UQ);
  // _mm256_max_ps returns its second operand where either is NaN: NaN passes
  return _mm256_and_ps(exp8_clamped(_mm256_max_ps(_mm256_set1_ps(-87.0f), x)), live);
}

// The same without the exact zeros, for sums that hold a 1.
inline __m256 exp8_nonpositive_in_sum(__m256 x) {
  return exp8_clamped(_mm256_max_ps(_mm256_set1_ps(-87.0f), x));
}

template <>
inline int64_t tile_stats_steps<float>(int64_t K) {
  return (kTileRows / 8) * K;
}

// tile_stats for float tiles, AVX2: 8 rows a vector, as the AVX-512 version.
inline void tile_stats(const float* __restrict lo, const float* __restrict ln, int64_t K,
                       Tile<float>& __restrict t, const RowPrefetch& f) {
  for (int v = 0; v < kTileRows; v += 8) {
    __m256 mo = _mm256_loadu_ps(lo + v), mn = _mm256_loadu_ps(ln + v);
    for (int64_t k = 1; k < K; ++k) {
      mo = _mm256_max_ps(_mm256_loadu_ps(lo + k * kTileRows + v), mo);
      mn = _mm256_max_ps(_mm256_loadu_ps(ln + k * kTileRows + v), mn);
    }
    __m256 so = _mm256_setzero_ps(), cr = _mm256_setzero_ps(), sn = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
      prefetch_step(f, (v / 8) * K + k);
      const __m256 a = _mm256_loadu_ps(lo + k * kTileRows + v);
      const __m256 b = _mm256_loadu_ps(ln + k * kTileRows + v);
      __m256 live_old;
      const __m256 e = exp8_nonpositive(_mm256_sub_ps(a, mo), live_old);
      so = _mm256_add_ps(so, e);
      cr = _mm256_blendv_ps(cr, _mm256_fmadd_ps(e, _mm256_sub_ps(a, b), cr), live_old);
      sn = _mm256_add_ps(sn, exp8_nonpositive_in_sum(_mm256_sub_ps(b, mn)));
    }
    _mm256_storeu_ps(t.max_old + v, mo);
    _mm256_storeu_ps(t.max_new + v, mn);
    _mm256_storeu_ps(t.sum_old + v, so);
    _mm256_storeu_ps(t.cross + v, cr);
    _mm256_storeu_ps(t.sum_new + v, sn);
  }
  for (int i = 0; i < kTileRows; ++i) {
    t.log_sum_old[i] = vlog(t.sum_old[i]);
    t.log_sum_new[i] = vlog(t.sum_new[i]);
  }
}
#endif

// Per-row surrogate inputs of a tile: ℓ_new of the taken action, logp_old, advantage.
template <typename scalar_t, typename acc_t, typename index_t>
inline void tile_surrogate_inputs(const CategoricalPtrs<scalar_t>& p, int64_t row0, int n,
                                  acc_t* logit_action, acc_t* logp_old, acc_t* advantage) {
  const index_t* actions = static_cast<const index_t*>(p.actions);
  for (int i = 0; i < n; ++i) {
    const int64_t row = row0 + i;
    logit_action[i] = static_cast<acc_t>(p.logits_new[row * p.K + actions[row]]);
    logp_old[i] = static_cast<acc_t>(p.logp_old[row]);
    advantage[i] = static_cast<acc_t>(p.advantages[row]);
  }
  // the next tile's surrogate inputs, a few lines each (its logits: RowPrefetch)
  const int64_t next = row0 + kTileRows;
  if (next < p.B) {
    const int64_t rows = std::min<int64_t>(kTileRows, p.B - next);
    prefetch_range(actions + next, rows * static_cast<int64_t>(sizeof(index_t)));
    prefetch_range(p.logp_old + next, rows * static_cast<int64_t>(sizeof(scalar_t)));
    prefetch_range(p.advantages + next, rows * static_cast<int64_t>(sizeof(scalar_t)));
  }
}

// Forward over rows [r0, r1) of one block.
template <int KC, typename scalar_t, typename acc_t, typename index_t, bool kSurrogate>
Sums cat_forward_tiles(const CategoricalPtrs<scalar_t>& p, int64_t r0, int64_t r1) {
  const int64_t K = KC > 0 ? KC : p.K;
  acc_t lo[kTileMaxK * kTileRows], ln[kTileMaxK * kTileRows];
  Tile<acc_t> t;
  acc_t kl_rows[kTileRows], surrogate_rows[kTileRows];
  acc_t logit_action[kTileRows], logp_old[kTileRows], advantage[kTileRows];
  LaneSums<acc_t> s;
  lanes_init(s);
  for (int64_t row0 = r0; row0 < r1; row0 += kTileRows) {
    const int n = static_cast<int>(std::min<int64_t>(kTileRows, r1 - row0));
    tile_load<KC>(p.logits_old, K, p.B, row0, n, lo);
    tile_load<KC>(p.logits_new, K, p.B, row0, n, ln);
    tile_stats(lo, ln, K, t,
               rows_prefetch(p, row0 + kTileRows, kTileRows, K, tile_stats_steps<acc_t>(K)));
    for (int i = 0; i < kTileRows; ++i) {
      kl_rows[i] = cat_row_kl(t.max_old[i], t.sum_old[i], t.cross[i], t.max_new[i], t.sum_new[i],
                              t.log_sum_old[i], t.log_sum_new[i]);
    }
    if (kSurrogate) {
      tile_surrogate_inputs<scalar_t, acc_t, index_t>(p, row0, n, logit_action, logp_old,
                                                      advantage);
      // exp(log π_new(a) − logp_old) · A, as kl::surrogate_term.
      for (int i = 0; i < n; ++i) {
        const acc_t logp = (logit_action[i] - t.max_new[i]) - t.log_sum_new[i];
        surrogate_rows[i] = vexp(logp - logp_old[i]) * advantage[i];
      }
    }
    lanes_add<acc_t, kSurrogate>(s, kl_rows, surrogate_rows, n);
  }
  return lanes_fold(s);
}

// Backward over rows [r0, r1): grad[k] = g_kl (p_new,k − p_old,k) + c ([k = a] − p_new,k), the
// formula of kl::cat_grad, with c = g_surrogate · exp(log π_new(a) − logp_old) · A.
template <int KC, typename scalar_t, typename acc_t, typename index_t, bool kSurrogate>
void cat_backward_tiles(const CategoricalPtrs<scalar_t>& p, acc_t grad_kl, acc_t grad_surrogate,
                        scalar_t* grad_logits, int64_t r0, int64_t r1) {
  const int64_t K = KC > 0 ? KC : p.K;
  acc_t lo[kTileMaxK * kTileRows], ln[kTileMaxK * kTileRows];
  Tile<acc_t> t;
  acc_t inv_old[kTileRows], inv_new[kTileRows], c[kTileRows];
  acc_t logit_action[kTileRows], logp_old[kTileRows], advantage[kTileRows];
  const index_t* actions = static_cast<const index_t*>(p.actions);
  for (int64_t row0 = r0; row0 < r1; row0 += kTileRows) {
    const int n = static_cast<int>(std::min<int64_t>(kTileRows, r1 - row0));
    tile_load<KC>(p.logits_old, K, p.B, row0, n, lo);
    tile_load<KC>(p.logits_new, K, p.B, row0, n, ln);
    tile_stats(lo, ln, K, t,
               rows_prefetch(p, row0 + kTileRows, kTileRows, K, tile_stats_steps<acc_t>(K)));
    for (int i = 0; i < kTileRows; ++i) {
      inv_old[i] = acc_t(1) / t.sum_old[i];
      inv_new[i] = acc_t(1) / t.sum_new[i];
      c[i] = 0;
    }
    if (kSurrogate) {
      tile_surrogate_inputs<scalar_t, acc_t, index_t>(p, row0, n, logit_action, logp_old,
                                                      advantage);
      for (int i = 0; i < n; ++i) {
        const acc_t logp = (logit_action[i] - t.max_new[i]) - t.log_sum_new[i];
        c[i] = grad_surrogate * vexp(logp - logp_old[i]) * advantage[i];
      }
    }
    // The gradient, class-major, over the scratch of the old logits.
    for (int64_t k = 0; k < K; ++k) {
      acc_t* a = lo + k * kTileRows;
      const acc_t* b = ln + k * kTileRows;
      for (int i = 0; i < kTileRows; ++i) {
        const acc_t p_new = vexp(b[i] - t.max_new[i]) * inv_new[i];
        const acc_t p_old = vexp(a[i] - t.max_old[i]) * inv_old[i];
        a[i] = grad_kl * (p_new - p_old) - c[i] * p_new;
      }
    }
    if (kSurrogate) {
      for (int i = 0; i < n; ++i) lo[actions[row0 + i] * kTileRows + i] += c[i];
    }
    scalar_t* dst = grad_logits + row0 * K;
    int i = 0;
#ifdef TRPO_KL_AVX2_KERNELS
    if constexpr (std::is_same<scalar_t, float>::value && std::is_same<acc_t, float>::value) {
      if (K >= 8) {
        for (; i + 8 <= n; i += 8) tile_store_rows8(lo + i, K, dst + i * K);
      }
    }
#endif
    for (; i < n; ++i) {
      for (int64_t k = 0; k < K; ++k) dst[i * K + k] = static_cast<scalar_t>(lo[k * kTileRows + i]);
    }
  }
}

// --- two classes ---------------------------------------------------------------------------------
//
// With K = 2 everything follows from the logit differences d = ℓ₁ − ℓ₀:
//   log p₀ = −softplus(d), log p₁ = −softplus(−d),  softplus(x) = max(x, 0) + log(1 + e^{−|x|}),
// so a row costs two exponentials and one log (two with the surrogate) where the general tile
// path spends four and two, and the [B, 2] rows are read in place.  Terms with p_old = 0 add
// nothing (as in torch.distributions); identical rows give exactly 0.
//
// binary_rows: rows [r0, r1) into the lanes s (row r0 + i in lane i % kLanes).
template <typename scalar_t, typename acc_t, typename index_t, bool kSurrogate>
void binary_rows(const CategoricalPtrs<scalar_t>& p, int64_t r0, int64_t r1,
                 LaneSums<acc_t>& s) {
  acc_t kl_rows[kTileRows], surrogate_rows[kTileRows];
  for (int64_t row0 = r0; row0 < r1; row0 += kTileRows) {
    const int n = static_cast<int>(std::min<int64_t>(kTileRows, r1 - row0));
    const scalar_t* __restrict lo = p.logits_old + row0 * 2;
    const scalar_t* __restrict ln = p.logits_new + row0 * 2;
    // (surrogate only) the taken actions, already checked to be 0 or 1: the taken logit is a
    // select, not a gather, so that the loop vectorises
    const index_t* __restrict act = static_cast<const index_t*>(p.actions) + row0;
    const scalar_t* __restrict lp = p.logp_old + row0;
    const scalar_t* __restrict adv = p.advantages + row0;
    for (int i = 0; i < n; ++i) {
      const acc_t lo0 = static_cast<acc_t>(lo[2 * i]), lo1 = static_cast<acc_t>(lo[2 * i + 1]);
      const acc_t ln0 = static_cast<acc_t>(ln[2 * i]), ln1 = static_cast<acc_t>(ln[2 * i + 1]);
      const acc_t d_old = lo1 - lo0;
      const acc_t d_new = ln1 - ln0;
      const acc_t e_old = vexp(-std::abs(d_old));
      const acc_t e_new = vexp(-std::abs(d_new));
      const acc_t one_old = acc_t(1) + e_old;
      const acc_t one_new = acc_t(1) + e_new;
      const acc_t inv_old = acc_t(1) / one_old;
      const acc_t p1 = d_old >= acc_t(0) ? inv_old : e_old * inv_old;
      const acc_t p0 = d_old >= acc_t(0) ? e_old * inv_old : inv_old;
      // log p_k − log q_k = (max(±d_new, 0) − max(±d_old, 0)) + log((1 + e_new) / (1 + e_old))
      // (a quotient, not one_new · inv_old: equal rows must give exactly log 1 = 0)
      const acc_t log_ratio = vlog(one_new / one_old);
      const acc_t r0_ = (std::max(d_new, acc_t(0)) - std::max(d_old, acc_t(0))) + log_ratio;
      const acc_t r1_ = (std::max(-d_new, acc_t(0)) - std::max(-d_old, acc_t(0))) + log_ratio;
      kl_rows[i] = (p0 == acc_t(0) ? acc_t(0) : p0 * r0_) + (p1 == acc_t(0) ? acc_t(0) : p1 * r1_);
      if (kSurrogate) {
        // log π_new(a) = ℓ_new,a − max(ℓ_new) − log(1 + e_new)
        const acc_t logit_action = act[i] == 0 ? ln0 : ln1;
        const acc_t logp = (logit_action - std::max(ln0, ln1)) - vlog(one_new);
        surrogate_rows[i] =
            vexp(logp - static_cast<acc_t>(lp[i])) * static_cast<acc_t>(adv[i]);
      }
    }
    lanes_add<acc_t, kSurrogate>(s, kl_rows, surrogate_rows, n);
  }
}

#ifdef TRPO_KL_AVX512_KERNELS
// The AVX-512 copy of binary_rows for float, 16 rows a step, with intrinsics.  GCC's version of
// the loop above spent most of its ~35 ns per 16 rows (one thread) in three divisions (1 / (1 + e_old),
// the quotient, and vlog's own) and in a scalar fold of the lanes; here there is no division:
//   - 1 / (1 + e) by vrcp14ps and one Newton step (relative error ~1e-8);
//   - the log of the quotient as log1p_unit(e_new) − log1p_unit(e_old), each a polynomial in
//     s = e / (2 + e); the same function of equal inputs, so equal rows still give exactly 0;
//   - the lanes stay in vectors, kl and the surrogate in float64 as in lanes_add.
// Returns the first row it left (r1 less fewer than 16 rows) for binary_rows.

// log(1 + e) for e in [0, 1] (NaN gives NaN): 2 atanh(s), s = e / (2 + e) <= 1/3, with s·q(s²)
// fitted to it on [0, 1/3] (relative error 4e-9 in exact arithmetic, below float's rounding).
inline __m512 log1p_unit(__m512 e) {
  const __m512 den = _mm512_add_ps(e, _mm512_set1_ps(2.0f));
  __m512 y = _mm512_maskz_rcp14_ps(kAll16, den);
  y = _mm512_fmadd_ps(y, _mm512_fnmadd_ps(den, y, _mm512_set1_ps(1.0f)), y);
  const __m512 x = _mm512_mul_ps(e, y);
  const __m512 x2 = _mm512_mul_ps(x, x);
  __m512 q = _mm512_set1_ps(0.2818977641329567f);
  q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(0.2795788809675191f));
  q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(0.40025118993569475f));
  q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(0.6666630909811211f));
  q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(2.000000008250399f));
  // (a masked form: GCC compiles _mm512_mul_ps as a plain `*`, which it may contract with the
  // caller's subtraction into an FMA for one operand only, and equal rows lost their exact 0)
  return _mm512_maskz_mul_ps(kAll16, x, q);
}

// exp of any float: exp_scaled on x clamped to [−104, 88.8]; vscalefps overflows to +inf
// (x > 88.72) and underflows to 0 by itself.  NaN gives NaN.
inline __m512 exp_any(__m512 x) {
  const __m512 xc = _mm512_maskz_min_ps(kAll16, _mm512_set1_ps(88.8f),
                                        max16(_mm512_set1_ps(-104.0f), x));  // NaN passes
  return exp_scaled(xc, kAll16);
}

// Adds the 16 floats of v to the float64 lanes lo (rows 0–7) and hi (rows 8–15).  (Masked forms
// with all lanes set, as in max16, for GCC 12's warnings.)
inline void add_lanes16(__m512d& lo, __m512d& hi, __m512 v) {
  lo = _mm512_add_pd(lo, _mm512_maskz_cvtps_pd(0xFF, _mm512_maskz_extractf32x8_ps(0xFF, v, 0)));
  hi = _mm512_add_pd(hi, _mm512_maskz_cvtps_pd(0xFF, _mm512_maskz_extractf32x8_ps(0xFF, v, 1)));
}

template <typename index_t, bool kSurrogate>
int64_t binary_rows16(const CategoricalPtrs<float>& p, int64_t r0, int64_t r1,
                      LaneSums<float>& s) {
  static_assert(kLanes == 16, "one lane per row of a 16-row step");
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
  const __m512 sign = _mm512_set1_ps(-0.0f);
  __m512d kl_lo = _mm512_loadu_pd(s.kl), kl_hi = _mm512_loadu_pd(s.kl + 8);
  __m512d su_lo = _mm512_loadu_pd(s.surrogate), su_hi = _mm512_loadu_pd(s.surrogate + 8);
  __m512 mx = _mm512_loadu_ps(s.max_kl);
  __mmask16 nan_seen = 0;  // max16 below keeps a NaN row only until the next row
  const index_t* actions = static_cast<const index_t*>(p.actions);
  int64_t row = r0;
  for (; row + 16 <= r1; row += 16) {
    const float* o = p.logits_old + 2 * row;
    const float* w = p.logits_new + 2 * row;
    const __m512 oa = _mm512_loadu_ps(o), ob = _mm512_loadu_ps(o + 16);
    const __m512 wa = _mm512_loadu_ps(w), wb = _mm512_loadu_ps(w + 16);
    const __m512 lo0 = _mm512_permutex2var_ps(oa, even, ob);
    const __m512 lo1 = _mm512_permutex2var_ps(oa, odd, ob);
    const __m512 ln0 = _mm512_permutex2var_ps(wa, even, wb);
    const __m512 ln1 = _mm512_permutex2var_ps(wa, odd, wb);
    const __m512 d_old = _mm512_sub_ps(lo1, lo0), d_new = _mm512_sub_ps(ln1, ln0);
    __mmask16 live_old, live_new;
    const __m512 e_old = exp_nonpositive(_mm512_or_ps(d_old, sign), live_old);  // e^{−|d|}
    const __m512 e_new = exp_nonpositive(_mm512_or_ps(d_new, sign), live_new);
    const __m512 den = _mm512_add_ps(one, e_old);
    __m512 inv_old = _mm512_maskz_rcp14_ps(kAll16, den);
    inv_old = _mm512_fmadd_ps(inv_old, _mm512_fnmadd_ps(den, inv_old, one), inv_old);
    const __m512 e_inv = _mm512_mul_ps(e_old, inv_old);
    const __mmask16 up = _mm512_cmp_ps_mask(d_old, zero, _CMP_GE_OQ);
    const __m512 p1 = _mm512_mask_blend_ps(up, e_inv, inv_old);
    const __m512 p0 = _mm512_mask_blend_ps(up, inv_old, e_inv);
    const __m512 log_one_new = log1p_unit(e_new);
    const __m512 log_ratio = _mm512_sub_ps(log_one_new, log1p_unit(e_old));
    const __m512 r0v = _mm512_add_ps(
        _mm512_sub_ps(max16(zero, d_new), max16(zero, d_old)), log_ratio);
    const __m512 r1v = _mm512_add_ps(
        _mm512_sub_ps(max16(zero, _mm512_xor_ps(d_new, sign)),
                      max16(zero, _mm512_xor_ps(d_old, sign))),
        log_ratio);
    const __mmask16 nz0 = _mm512_cmp_ps_mask(p0, zero, _CMP_NEQ_UQ);
    const __mmask16 nz1 = _mm512_cmp_ps_mask(p1, zero, _CMP_NEQ_UQ);
    const __m512 kl = _mm512_mask3_fmadd_ps(p1, r1v, _mm512_maskz_mul_ps(nz0, p0, r0v), nz1);
    add_lanes16(kl_lo, kl_hi, kl);
    mx = max16(mx, kl);
    nan_seen |= _mm512_cmp_ps_mask(kl, kl, _CMP_UNORD_Q);
    if (kSurrogate) {
      // the taken actions, already checked to be 0 or 1
      __mmask16 take1;
      if constexpr (sizeof(index_t) == 8) {
        const __m512i a0 = _mm512_loadu_si512(actions + row);
        const __m512i a1 = _mm512_loadu_si512(actions + row + 8);
        take1 = static_cast<__mmask16>(
            _mm512_test_epi64_mask(a0, a0) |
            (static_cast<unsigned>(_mm512_test_epi64_mask(a1, a1)) << 8));
      } else {
        const __m512i a = _mm512_loadu_si512(actions + row);
        take1 = _mm512_test_epi32_mask(a, a);
      }
      // log π_new(a) = ℓ_new,a − max(ℓ_new) − log(1 + e_new)
      const __m512 logp = _mm512_sub_ps(
          _mm512_sub_ps(_mm512_mask_blend_ps(take1, ln0, ln1), max16(ln0, ln1)),
          log_one_new);
      const __m512 ratio = exp_any(_mm512_sub_ps(logp, _mm512_loadu_ps(p.logp_old + row)));
      add_lanes16(su_lo, su_hi, _mm512_mul_ps(ratio, _mm512_loadu_ps(p.advantages + row)));
    }
  }
  const __m512 nan = _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN());
  mx = _mm512_mask_blend_ps(nan_seen, mx, nan);
  _mm512_storeu_pd(s.kl, kl_lo);
  _mm512_storeu_pd(s.kl + 8, kl_hi);
  _mm512_storeu_pd(s.surrogate, su_lo);
  _mm512_storeu_pd(s.surrogate + 8, su_hi);
  _mm512_storeu_ps(s.max_kl, mx);
  return row;
}
#endif

#if defined(TRPO_KL_AVX2_KERNELS) && !defined(TRPO_KL_AVX512_KERNELS)
// The AVX2 copy of binary_rows16, 8 rows a step (kLanes = 8 here): the same formulas, with
// vrcpps (12 bits) and one Newton step for the reciprocals, and all-ones lanes in place of masks.

// 1 / d for d in [1, 3], to ~2^-23 relative.
inline __m256 recip8(__m256 d) {
  const __m256 y = _mm256_rcp_ps(d);
  return _mm256_fmadd_ps(y, _mm256_fnmadd_ps(d, y, _mm256_set1_ps(1.0f)), y);
}

// log(1 + e) for e in [0, 1], as log1p_unit.  (The last product by an explicit FMA with 0: GCC
// may contract a plain `*` with the caller's subtraction for one operand only.)
inline __m256 log1p_unit8(__m256 e) {
  const __m256 x = _mm256_mul_ps(e, recip8(_mm256_add_ps(e, _mm256_set1_ps(2.0f))));
  const __m256 x2 = _mm256_mul_ps(x, x);
  __m256 q = _mm256_set1_ps(0.2818977641329567f);
  q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(0.2795788809675191f));
  q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(0.40025118993569475f));
  q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(0.6666630909811211f));
  q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(2.000000008250399f));
  return _mm256_fmadd_ps(x, q, _mm256_setzero_ps());
}

// e^x of any float as vexp: 0 below −87, +inf above 88, NaN gives NaN.
inline __m256 exp8_any(__m256 x) {
  const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_NLT_UQ);
  const __m256 over = _mm256_cmp_ps(x, _mm256_set1_ps(88.0f), _CMP_GT_OQ);
  const __m256 xc =
      _mm256_min_ps(_mm256_set1_ps(88.0f), _mm256_max_ps(_mm256_set1_ps(-87.0f), x));
  const __m256 y = _mm256_and_ps(exp8_clamped(xc), live);
  return _mm256_blendv_ps(y, _mm256_set1_ps(std::numeric_limits<float>::infinity()), over);
}

// Rows 0–3 and 4–7 of 8 floats into float64 lanes.
inline void add_lanes8(__m256d& lo, __m256d& hi, __m256 v) {
  lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
  hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
}

// Classes 0 (elements 2i) and 1 (elements 2i + 1) of the 8 rows of 16 floats at x.
inline void deinterleave8(const float* x, __m256& c0, __m256& c1) {
  const __m256 a = _mm256_loadu_ps(x), b = _mm256_loadu_ps(x + 8);
  // per 128-bit lane: rows (0, 1, 4, 5 | 2, 3, 6, 7); then 64-bit pairs into order
  c0 = _mm256_castpd_ps(
      _mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), 0xD8));
  c1 = _mm256_castpd_ps(
      _mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xDD)), 0xD8));
}

template <typename index_t, bool kSurrogate>
int64_t binary_rows8(const CategoricalPtrs<float>& p, int64_t r0, int64_t r1,
                     LaneSums<float>& s) {
  static_assert(kLanes == 8, "one lane per row of an 8-row step");
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256d kl_lo = _mm256_loadu_pd(s.kl), kl_hi = _mm256_loadu_pd(s.kl + 4);
  __m256d su_lo = _mm256_loadu_pd(s.surrogate), su_hi = _mm256_loadu_pd(s.surrogate + 4);
  __m256 mx = _mm256_loadu_ps(s.max_kl);
  __m256 nan_seen = zero;  // all-ones lanes where a row was NaN (the max keeps one only briefly)
  const index_t* actions = static_cast<const index_t*>(p.actions);
  int64_t row = r0;
  for (; row + 8 <= r1; row += 8) {
    const float* o = p.logits_old + 2 * row;
    const float* w = p.logits_new + 2 * row;
    __m256 lo0, lo1, ln0, ln1;
    deinterleave8(o, lo0, lo1);
    deinterleave8(w, ln0, ln1);
    const __m256 d_old = _mm256_sub_ps(lo1, lo0), d_new = _mm256_sub_ps(ln1, ln0);
    __m256 live;
    const __m256 e_old = exp8_nonpositive(_mm256_or_ps(d_old, sign), live);  // e^{−|d|}
    const __m256 e_new = exp8_nonpositive(_mm256_or_ps(d_new, sign), live);
    const __m256 inv_old = recip8(_mm256_add_ps(one, e_old));
    const __m256 e_inv = _mm256_mul_ps(e_old, inv_old);
    const __m256 up = _mm256_cmp_ps(d_old, zero, _CMP_GE_OQ);
    const __m256 p1 = _mm256_blendv_ps(e_inv, inv_old, up);
    const __m256 p0 = _mm256_blendv_ps(inv_old, e_inv, up);
    const __m256 log_one_new = log1p_unit8(e_new);
    const __m256 log_ratio = _mm256_sub_ps(log_one_new, log1p_unit8(e_old));
    const __m256 r0v = _mm256_add_ps(
        _mm256_sub_ps(_mm256_max_ps(zero, d_new), _mm256_max_ps(zero, d_old)), log_ratio);
    const __m256 r1v = _mm256_add_ps(
        _mm256_sub_ps(_mm256_max_ps(zero, _mm256_xor_ps(d_new, sign)),
                      _mm256_max_ps(zero, _mm256_xor_ps(d_old, sign))),
        log_ratio);
    const __m256 nz0 = _mm256_cmp_ps(p0, zero, _CMP_NEQ_UQ);
    const __m256 nz1 = _mm256_cmp_ps(p1, zero, _CMP_NEQ_UQ);
    const __m256 kl = _mm256_add_ps(_mm256_and_ps(_mm256_mul_ps(p0, r0v), nz0),
                                    _mm256_and_ps(_mm256_mul_ps(p1, r1v), nz1));
    add_lanes8(kl_lo, kl_hi, kl);
    mx = _mm256_max_ps(mx, kl);
    nan_seen = _mm256_or_ps(nan_seen, _mm256_cmp_ps(kl, kl, _CMP_UNORD_Q));
    if (kSurrogate) {
      // the taken actions, already checked to be 0 or 1: lanes where the action is 0
      __m256 take0;
      if constexpr (sizeof(index_t) == 8) {
        const __m256 a = _mm256_castsi256_ps(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(actions + row)));
        const __m256 b = _mm256_castsi256_ps(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(actions + row + 4)));
        // the low 32 bits of each (0 or 1), in row order as in deinterleave8
        const __m256i low = _mm256_castpd_si256(_mm256_permute4x64_pd(
            _mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), 0xD8));
        take0 = _mm256_castsi256_ps(_mm256_cmpeq_epi32(low, _mm256_setzero_si256()));
      } else {
        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(actions + row));
        take0 = _mm256_castsi256_ps(_mm256_cmpeq_epi32(a, _mm256_setzero_si256()));
      }
      // log π_new(a) = ℓ_new,a − max(ℓ_new) − log(1 + e_new)
      const __m256 logp = _mm256_sub_ps(
          _mm256_sub_ps(_mm256_blendv_ps(ln1, ln0, take0), _mm256_max_ps(ln0, ln1)),
          log_one_new);
      const __m256 ratio = exp8_any(_mm256_sub_ps(logp, _mm256_loadu_ps(p.logp_old + row)));
      add_lanes8(su_lo, su_hi, _mm256_mul_ps(ratio, _mm256_loadu_ps(p.advantages + row)));
    }
  }
  const __m256 nan = _mm256_set1_ps(std::numeric_limits<float>::quiet_NaN());
  mx = _mm256_blendv_ps(mx, nan, nan_seen);
  _mm256_storeu_pd(s.kl, kl_lo);
  _mm256_storeu_pd(s.kl + 4, kl_hi);
  _mm256_storeu_pd(s.surrogate, su_lo);
  _mm256_storeu_pd(s.surrogate + 4, su_hi);
  _mm256_storeu_ps(s.max_kl, mx);
  return row;
}
#endif

template <typename scalar_t, typename acc_t, typename index_t, bool kSurrogate>
Sums cat_forward_binary(const CategoricalPtrs<scalar_t>& p, int64_t r0, int64_t r1) {
  LaneSums<acc_t> s;
  lanes_init(s);
  int64_t row = r0;
#if defined(TRPO_KL_AVX512_KERNELS)
  if constexpr (std::is_same<scalar_t, float>::value && std::is_same<acc_t, float>::value) {
    row = binary_rows16<index_t, kSurrogate>(p, r0, r1, s);
  }
#elif defined(TRPO_KL_AVX2_KERNELS)
  if constexpr (std::is_same<scalar_t, float>::value && std::is_same<acc_t, float>::value) {
    row = binary_rows8<index_t, kSurrogate>(p, r0, r1, s);
  }
#endif
  binary_rows<scalar_t, acc_t, index_t, kSurrogate>(p, row, r1, s);
  return lanes_fold(s);
}

// --- long rows (K > kTileMaxK) -------------------------------------------------------------------

template <typename acc_t>
struct RowStats {
  acc_t max_old, sum_old, cross, max_new, sum_new, log_sum_old, log_sum_new;
};

template <typename acc_t>
inline acc_t lanes_max(const acc_t* m) {
  acc_t r = m[0];
  for (int j = 1; j < kLanes; ++j) r = std::max(r, m[j]);
  return r;
}

template <typename acc_t>
inline acc_t lanes_sum(const acc_t* m) {
  acc_t r = m[0];
  for (int j = 1; j < kLanes; ++j) r += m[j];
  return r;
}

// The next row, spread over the exponential pass's steps of kLanes elements (a row of 4 KiB or
// more begins a page, where the hardware prefetchers stop).
template <typename scalar_t>
inline RowPrefetch next_row_prefetch(const CategoricalPtrs<scalar_t>& p, int64_t row) {
  return rows_prefetch(p, row + 1, 1, p.K, std::max<int64_t>(1, p.K / kLanes));
}

// One row's statistics, element k in lane k % kLanes, lanes folded in order.
template <typename scalar_t, typename acc_t>
inline RowStats<acc_t> long_row_stats(const scalar_t* lo, const scalar_t* ln, int64_t K,
                                      const RowPrefetch& f) {
  acc_t mo[kLanes], mn[kLanes];
  for (int j = 0; j < kLanes; ++j) mo[j] = mn[j] = kl::neg_inf<acc_t>();
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      mo[j] = std::max(mo[j], static_cast<acc_t>(lo[k + j]));
      mn[j] = std::max(mn[j], static_cast<acc_t>(ln[k + j]));
    }
  }
  for (int j = 0; k + j < K; ++j) {
    mo[j] = std::max(mo[j], static_cast<acc_t>(lo[k + j]));
    mn[j] = std::max(mn[j], static_cast<acc_t>(ln[k + j]));
  }
  RowStats<acc_t> r;
  r.max_old = lanes_max(mo);
  r.max_new = lanes_max(mn);
  acc_t so[kLanes], cr[kLanes], sn[kLanes];
  for (int j = 0; j < kLanes; ++j) so[j] = cr[j] = sn[j] = 0;
  k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    prefetch_step(f, k / kLanes);
    for (int j = 0; j < kLanes; ++j) {
      const acc_t a = static_cast<acc_t>(lo[k + j]);
      const acc_t b = static_cast<acc_t>(ln[k + j]);
      const acc_t e = vexp(a - r.max_old);
      so[j] += e;
      cr[j] += e == acc_t(0) ? acc_t(0) : e * (a - b);
      sn[j] += vexp(b - r.max_new);
    }
  }
  for (int j = 0; k + j < K; ++j) {
    const acc_t a = static_cast<acc_t>(lo[k + j]);
    const acc_t b = static_cast<acc_t>(ln[k + j]);
    const acc_t e = vexp(a - r.max_old);
    so[j] += e;
    cr[j] += e == acc_t(0) ? acc_t(0) : e * (a - b);
    sn[j] += vexp(b - r.max_new);
  }
  r.sum_old = lanes_sum(so);
  r.cross = lanes_sum(cr);
  r.sum_new = lanes_sum(sn);
  r.log_sum_old = vlog(r.sum_old);
  r.log_sum_new = vlog(r.sum_new);
  return r;
}

#ifdef TRPO_KL_AVX512_KERNELS
// The AVX-512 copy for float rows, with the tiles' intrinsic exponentials (GCC's vexp above costs
// ~22 instructions for 16 elements, exp_nonpositive 13): the same lanes (element k in lane k % 16,
// the last K % 16 elements by masked loads), the same folds, the cross term only where the old
// exp is not 0.
template <>
inline RowStats<float> long_row_stats<float, float>(const float* lo, const float* ln, int64_t K,
                                                    const RowPrefetch& f) {
  const int64_t kv = K - K % 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (K % 16)) - 1u);
  __m512 mo = _mm512_set1_ps(kl::neg_inf<float>()), mn = mo;
  for (int64_t k = 0; k < kv; k += 16) {
    mo = max16(_mm512_loadu_ps(lo + k), mo);  // a NaN element leaves the max (as std::max)
    mn = max16(_mm512_loadu_ps(ln + k), mn);
  }
  mo = _mm512_mask_max_ps(mo, tail, _mm512_maskz_loadu_ps(tail, lo + kv), mo);
  mn = _mm512_mask_max_ps(mn, tail, _mm512_maskz_loadu_ps(tail, ln + kv), mn);
  float lanes[3][16];
  RowStats<float> r;
  _mm512_storeu_ps(lanes[0], mo);
  _mm512_storeu_ps(lanes[1], mn);
  r.max_old = lanes_max(lanes[0]);
  r.max_new = lanes_max(lanes[1]);
  const __m512 max_old = _mm512_set1_ps(r.max_old), max_new = _mm512_set1_ps(r.max_new);
  __m512 so = _mm512_setzero_ps(), cr = so, sn = so;
  int64_t k = 0;
  for (; k < kv; k += 16) {
    prefetch_step(f, k / 16);
    const __m512 a = _mm512_loadu_ps(lo + k), b = _mm512_loadu_ps(ln + k);
    __mmask16 live;
    const __m512 e = exp_nonpositive(_mm512_sub_ps(a, max_old), live);
    so = _mm512_add_ps(so, e);
    cr = _mm512_mask3_fmadd_ps(e, _mm512_sub_ps(a, b), cr, live);
    sn = _mm512_add_ps(sn, exp_nonpositive_in_sum(_mm512_sub_ps(b, max_new)));
  }
  if (tail) {
    const __m512 a = _mm512_maskz_loadu_ps(tail, lo + k), b = _mm512_maskz_loadu_ps(tail, ln + k);
    __mmask16 live;
    const __m512 e = exp_nonpositive(_mm512_sub_ps(a, max_old), live);
    so = _mm512_mask_add_ps(so, tail, so, e);
    cr = _mm512_mask3_fmadd_ps(e, _mm512_sub_ps(a, b), cr, live & tail);
    sn = _mm512_mask_add_ps(sn, tail, sn, exp_nonpositive_in_sum(_mm512_sub_ps(b, max_new)));
  }
  _mm512_storeu_ps(lanes[0], so);
  _mm512_storeu_ps(lanes[1], cr);
  _mm512_storeu_ps(lanes[2], sn);
  r.sum_old = lanes_sum(lanes[0]);
  r.cross = lanes_sum(lanes[1]);
  r.sum_new = lanes_sum(lanes[2]);
  r.log_sum_old = vlog(r.sum_old);
  r.log_sum_new = vlog(r.sum_new);
  return r;
}
#endif

template <typename scalar_t, typename acc_t, typename index_t, bool kSurrogate>
Sums cat_forward_long(const CategoricalPtrs<scalar_t>& p, int64_t r0, int64_t r1) {
  const int64_t K = p.K;
  const index_t* actions = static_cast<const index_t*>(p.actions);
  Sums s = kl::sums_empty();
  for (int64_t row = r0; row < r1; ++row) {
    const scalar_t* ln = p.logits_new + row * K;
    const RowStats<acc_t> r = long_row_stats<scalar_t, acc_t>(p.logits_old + row * K, ln, K,
                                                               next_row_prefetch(p, row));
    const acc_t kl_row = cat_row_kl(r.max_old, r.sum_old, r.cross, r.max_new, r.sum_new,
                                    r.log_sum_old, r.log_sum_new);
    s.kl += static_cast<double>(kl_row);
    s.max_kl = kl::nan_max(s.max_kl, static_cast<double>(kl_row));
    if (kSurrogate) {
      const acc_t logp = (static_cast<acc_t>(ln[actions[row]]) - r.max_new) - r.log_sum_new;
      s.surrogate += static_cast<double>(
          vexp(logp - static_cast<acc_t>(p.logp_old[row])) * static_cast<acc_t>(p.advantages[row]));
    }
  }
  return s;
}

template <typename scalar_t, typename acc_t, typename index_t, bool kSurrogate>
void cat_backward_long(const CategoricalPtrs<scalar_t>& p, acc_t grad_kl, acc_t grad_surrogate,
                       scalar_t* grad_logits, int64_t r0, int64_t r1) {
  const int64_t K = p.K;
  const index_t* actions = static_cast<const index_t*>(p.actions);
  for (int64_t row = r0; row < r1; ++row) {
    const scalar_t* lo = p.logits_old + row * K;
    const scalar_t* ln = p.logits_new + row * K;
    const RowStats<acc_t> r = long_row_stats<scalar_t, acc_t>(lo, ln, K, next_row_prefetch(p, row));
    acc_t c = 0;
    if (kSurrogate) {
      const acc_t logp = (static_cast<acc_t>(ln[actions[row]]) - r.max_new) - r.log_sum_new;
      c = grad_surrogate * vexp(logp - static_cast<acc_t>(p.logp_old[row])) *
          static_cast<acc_t>(p.advantages[row]);
    }
    const acc_t inv_old = acc_t(1) / r.sum_old;
    const acc_t inv_new = acc_t(1) / r.sum_new;
    scalar_t* g = grad_logits + row * K;
    for (int64_t k = 0; k < K; ++k) {
      const acc_t p_new = vexp(static_cast<acc_t>(ln[k]) - r.max_new) * inv_new;
      const acc_t p_old = vexp(static_cast<acc_t>(lo[k]) - r.max_old) * inv_old;
      g[k] = static_cast<scalar_t>(grad_kl * (p_new - p_old) - c * p_new);
    }
    if (kSurrogate) {
      const int64_t a = static_cast<int64_t>(actions[row]);
      g[a] = static_cast<scalar_t>(static_cast<acc_t>(g[a]) + c);
    }
  }
}

// --- entry points ----------------------------------------------------------------------------

template <typename scalar_t, typename acc_t, typename index_t, bool kSurrogate>
Sums cat_forward_rows(const CategoricalPtrs<scalar_t>& p, int64_t r0, int64_t r1) {
  if (p.K == 2) return cat_forward_binary<scalar_t, acc_t, index_t, kSurrogate>(p, r0, r1);
  if (p.K <= kTileMaxK) return cat_forward_tiles<0, scalar_t, acc_t, index_t, kSurrogate>(p, r0, r1);
  return cat_forward_long<scalar_t, acc_t, index_t, kSurrogate>(p, r0, r1);
}

template <typename scalar_t, typename acc_t, typename index_t, bool kSurrogate>
void cat_backward_rows(const CategoricalPtrs<scalar_t>& p, acc_t grad_kl, acc_t grad_surrogate,
                       scalar_t* grad_logits, int64_t r0, int64_t r1) {
  if (p.K == 2) {
    cat_backward_tiles<2, scalar_t, acc_t, index_t, kSurrogate>(p, grad_kl, grad_surrogate,
                                                                grad_logits, r0, r1);
  } else if (p.K <= kTileMaxK) {
    cat_backward_tiles<0, scalar_t, acc_t, index_t, kSurrogate>(p, grad_kl, grad_surrogate,
                                                                grad_logits, r0, r1);
  } else {
    cat_backward_long<scalar_t, acc_t, index_t, kSurrogate>(p, grad_kl, grad_surrogate,
                                                            grad_logits, r0, r1);
  }
}

// --- diagonal Gaussian, state-independent log_std (A <= kTileMaxK) -------------------------------
//
// With σ_new shared by the rows, a row's KL and log-probability are sums of squares plus per-row
// constants (GaussTileConsts, kl_cpu.cpp):
//   KL_row = kl_const + ½ Σ_a z_a²,  z = (μ_old − μ_new)/σ_new,
//   log π_new(a_row) = −½ Σ_a y_a² − logp_const,  y = (a − μ_new)/σ_new,
// the per-dimension formulas of kl::gaussian_kl_from_parts / gaussian_log_prob_from_parts summed
// over the row.  The squares are formed over the flat [rows · A] slice of a tile, full-width
// whatever A is (element e of a tile is dimension e % A: tiles start on a row), then summed per
// row; the surrogate's exponentials run across rows.

// Σ_rows KL over rows [r0, r1) for the mean KL alone (no per-row values, so no max): the squares
// summed in kLanes float lanes per tile, the tiles' lanes in double.
template <typename scalar_t, typename acc_t>
Sums gauss_kl_sum(const GaussianPtrs<scalar_t>& p, const GaussTileConsts<acc_t>& c, int64_t r0,
                  int64_t r1) {
  const int64_t A = p.A;
  const acc_t* __restrict inv = c.inv_std_rep;
  double lanes[kLanes] = {};
  for (int64_t row0 = r0; row0 < r1; row0 += kTileRows) {
    const int64_t m = std::min<int64_t>(kTileRows, r1 - row0) * A;
    const scalar_t* __restrict mo = p.mean_old + row0 * A;
    const scalar_t* __restrict mn = p.mean_new + row0 * A;
    acc_t part[kLanes] = {};
    int64_t e = 0;
    for (; e + kLanes <= m; e += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        const acc_t z = (static_cast<acc_t>(mo[e + j]) - static_cast<acc_t>(mn[e + j])) * inv[e + j];
        part[j] += z * z;
      }
    }
    for (int j = 0; e + j < m; ++j) {
      const acc_t z = (static_cast<acc_t>(mo[e + j]) - static_cast<acc_t>(mn[e + j])) * inv[e + j];
      part[j] += z * z;
    }
    for (int j = 0; j < kLanes; ++j) lanes[j] += static_cast<double>(part[j]);
  }
  double squares = 0.0;
  for (int j = 0; j < kLanes; ++j) squares += lanes[j];
  Sums s = kl::sums_empty();
  s.kl = static_cast<double>(r1 - r0) * static_cast<double>(c.kl_const) + 0.5 * squares;
  return s;
}

// Row sums of a tile's squares: out[i] = Σ_a sq[i·A + a].  Eight rows at a time, so that eight
// independent sums are in flight (one row's sum alone is a chain of dependent adds).
template <typename acc_t>
inline void gauss_row_sums(const acc_t* __restrict sq, int64_t A, int n, acc_t* __restrict out) {
  int i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    acc_t t[kLanes] = {};
    for (int64_t a = 0; a < A; ++a) {
      for (int j = 0; j < kLanes; ++j) t[j] += sq[(i + j) * A + a];
    }
    for (int j = 0; j < kLanes; ++j) out[i + j] = t[j];
  }
  for (; i < n; ++i) {
    acc_t t = 0;
    for (int64_t a = 0; a < A; ++a) t += sq[i * A + a];
    out[i] = t;
  }
}

#ifdef TRPO_KL_AVX2_KERNELS
// The AVX2 copy for float: GCC builds the loop above from single-element loads and inserts (it
// cannot vectorise a runtime stride better), ~2 instructions per element.  Here each row is read
// as up to four unaligned 8-float vectors (the last masked to the row; the scratch has kLanes
// floats of slack past the tile), and the eight row vectors of eight rows are reduced together by
// a horizontal-add tree: about 3 instructions per row for A <= 8.
inline void gauss_row_sums(const float* __restrict sq, int64_t A, int n, float* __restrict out) {
  const int64_t nv = (A + 7) / 8;  // vectors per row
  const int64_t last = 8 * (nv - 1);
  alignas(32) int32_t keep[8];
  for (int l = 0; l < 8; ++l) keep[l] = l < A - last ? -1 : 0;
  const __m256 mask = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(keep)));
  const auto row_vector = [&](int64_t row) {
    const float* x = sq + row * A;
    __m256 acc = _mm256_and_ps(_mm256_loadu_ps(x + last), mask);
    for (int64_t v = 0; v < last; v += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(x + v));
    return acc;
  };
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 r[8] = {row_vector(i), row_vector(i + 1), row_vector(i + 2), row_vector(i + 3),
                         row_vector(i + 4), row_vector(i + 5), row_vector(i + 6), row_vector(i + 7)};
    // hadd(a, b) = [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7]: two levels give
    // [Σ r0..r3 over lanes 0–3 | Σ r0..r3 over lanes 4–7], the halves are then added across.
    const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(r[0], r[1]), _mm256_hadd_ps(r[2], r[3]));
    const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(r[4], r[5]), _mm256_hadd_ps(r[6], r[7]));
    const __m256 lo = _mm256_permute2f128_ps(s0123, s4567, 0x20);
    const __m256 hi = _mm256_permute2f128_ps(s0123, s4567, 0x31);
    _mm256_storeu_ps(out + i, _mm256_add_ps(lo, hi));
  }
  for (; i < n; ++i) {
    float t = 0;
    for (int64_t a = 0; a < A; ++a) t += sq[i * A + a];
    out[i] = t;
  }
}
#endif

// The line search's sums over rows [r0, r1): Σ KL, max KL and Σ exp(log π_new(a) − logp_old)·A.
template <typename scalar_t, typename acc_t>
Sums gauss_surrogate_tiles(const GaussianPtrs<scalar_t>& p, const GaussTileConsts<acc_t>& c,
                           int64_t r0, int64_t r1) {
  const int64_t A = p.A;
  const acc_t* __restrict inv = c.inv_std_rep;
  // (kLanes of slack: the AVX2 row sums read whole 8-float vectors)
  acc_t zz[kTileMaxK * kTileRows + kLanes], yy[kTileMaxK * kTileRows + kLanes];
  acc_t kl_rows[kTileRows], surrogate_rows[kTileRows], y_rows[kTileRows];
  LaneSums<acc_t> s;
  lanes_init(s);
  for (int64_t row0 = r0; row0 < r1; row0 += kTileRows) {
    const int n = static_cast<int>(std::min<int64_t>(kTileRows, r1 - row0));
    const int64_t m = n * A;
    const scalar_t* __restrict mo = p.mean_old + row0 * A;
    const scalar_t* __restrict mn = p.mean_new + row0 * A;
    if (A == 1) {  // a row is one element: no squares to keep, no row sums
      const acc_t inv0 = inv[0];
      for (int i = 0; i < n; ++i) {
        const acc_t z = (static_cast<acc_t>(mo[i]) - static_cast<acc_t>(mn[i])) * inv0;
        kl_rows[i] = c.kl_const + acc_t(0.5) * (z * z);
      }
      const scalar_t* __restrict x = p.actions + row0;
      const scalar_t* __restrict lp = p.logp_old + row0;
      const scalar_t* __restrict adv = p.advantages + row0;
      for (int i = 0; i < n; ++i) {
        const acc_t y = (static_cast<acc_t>(x[i]) - static_cast<acc_t>(mn[i])) * inv0;
        const acc_t logp = acc_t(-0.5) * (y * y) - c.logp_const;
        surrogate_rows[i] = vexp(logp - static_cast<acc_t>(lp[i])) * static_cast<acc_t>(adv[i]);
      }
      lanes_add<acc_t, true>(s, kl_rows, surrogate_rows, n);
      continue;
    }
    const scalar_t* __restrict x = p.actions + row0 * A;
    for (int64_t e = 0; e < m; ++e) {
      const acc_t mean_new = static_cast<acc_t>(mn[e]);
      const acc_t z = (static_cast<acc_t>(mo[e]) - mean_new) * inv[e];
      const acc_t y = (static_cast<acc_t>(x[e]) - mean_new) * inv[e];
      zz[e] = z * z;
      yy[e] = y * y;
    }
    gauss_row_sums(zz, A, n, kl_rows);
    gauss_row_sums(yy, A, n, y_rows);
    const scalar_t* __restrict lp = p.logp_old + row0;
    const scalar_t* __restrict adv = p.advantages + row0;
    for (int i = 0; i < n; ++i) {
      kl_rows[i] = c.kl_const + acc_t(0.5) * kl_rows[i];
      const acc_t logp = acc_t(-0.5) * y_rows[i] - c.logp_const;
      surrogate_rows[i] = vexp(logp - static_cast<acc_t>(lp[i])) * static_cast<acc_t>(adv[i]);
    }
    lanes_add<acc_t, true>(s, kl_rows, surrogate_rows, n);
  }
  return lanes_fold(s);
}
