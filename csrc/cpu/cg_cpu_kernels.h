// Conjugate-gradient vector passes over one range of elements, written so that GCC's auto-vectoriser
// turns every loop into SIMD code.  This file is included twice by cg_cpu.cpp: once plainly (the
// x86-64 baseline, SSE2) and once under `#pragma GCC target("avx2")`, each time inside its own
// namespace, so that one source gives both instruction sets and cg_cpu.cpp picks one at run time.
// It therefore has no include guard and includes nothing itself (cg.h comes first).
//
// Sums: element i of a range is added into lane (i − begin) mod kLanes of kLanes independent
// accumulators, which are then folded in a fixed tree.  Each lane is a serial sum, so vectorising
// across lanes reassociates nothing: SSE2 and AVX2 run the same additions in the same order.  FMA is
// deliberately not enabled: contraction would make the two builds differ in the last bits and
// would let the compiler contract r − α·(Ap + d·p) differently in the residual and update passes,
// which must agree bit for bit.  The passes move memory; FMA would not make them faster.

// 128 bytes of accumulators: 32 floats or 16 doubles, four AVX2 registers (eight SSE2 registers),
// enough independent additions to hide the add latency when the data sit in L1/L2.
template <typename acc_t>
inline constexpr int kLanes = static_cast<int>(128 / sizeof(acc_t));

template <typename acc_t, int L>
inline acc_t fold_lanes(acc_t (&a)[L]) {
  for (int w = L / 2; w > 0; w /= 2) {
    for (int j = 0; j < w; ++j) a[j] += a[j + w];
  }
  return a[0];
}

// Σ term(i) over [begin, end) in kLanes lanes.
template <typename acc_t, typename Term>
inline acc_t lane_sum(int64_t begin, int64_t end, const Term& term) {
  constexpr int L = kLanes<acc_t>;
  acc_t a[L] = {};
  int64_t i = begin;
  for (; i + L <= end; i += L) {
    for (int j = 0; j < L; ++j) a[j] += term(i + j);
  }
  for (int j = 0; i < end; ++i, ++j) a[j] += term(i);
  return fold_lanes(a);
}

// pᵀ(Ap + d·p) over [begin, end).
template <typename scalar_t, typename acc_t>
acc_t curvature_range(const scalar_t* __restrict__ p,   // [n]
                      const scalar_t* __restrict__ Ap,  // [n]
                      acc_t d, int64_t begin, int64_t end) {
  return lane_sum<acc_t>(begin, end, [&](int64_t i) {
    const acc_t pi = static_cast<acc_t>(p[i]);
    return pi * damped<acc_t>(static_cast<acc_t>(Ap[i]), pi, d);
  });
}

// r'ᵀr' over [begin, end) with r' = r − α(Ap + d·p), r' not stored.
template <typename scalar_t, typename acc_t>
acc_t residual_range(const scalar_t* __restrict__ r,   // [n]
                     const scalar_t* __restrict__ Ap,  // [n]
                     const scalar_t* __restrict__ p,   // [n]
                     acc_t alpha, acc_t d, int64_t begin, int64_t end) {
  return lane_sum<acc_t>(begin, end, [&](int64_t i) {
    const acc_t ri = residual_candidate<acc_t>(static_cast<acc_t>(r[i]), static_cast<acc_t>(Ap[i]),
                                               static_cast<acc_t>(p[i]), alpha, d);
    return ri * ri;
  });
}

// x += αp, r = r', p = r' + βp over [begin, end): r' recomputed exactly as residual_range did.
template <typename scalar_t, typename acc_t>
void update_range(scalar_t* __restrict__ x,         // [n]
                  scalar_t* __restrict__ r,         // [n]
                  scalar_t* __restrict__ p,         // [n]
                  const scalar_t* __restrict__ Ap,  // [n]
                  acc_t alpha, acc_t beta, acc_t d, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const acc_t pi = static_cast<acc_t>(p[i]);
    const acc_t ri = residual_candidate<acc_t>(static_cast<acc_t>(r[i]), static_cast<acc_t>(Ap[i]),
                                               pi, alpha, d);
    x[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) + alpha * pi);
    r[i] = static_cast<scalar_t>(ri);
    p[i] = static_cast<scalar_t>(ri + beta * pi);
  }
}

// The start over [begin, end): r = p = b − (Ax0 + d·x0) (or b without x0); rᵀr and bᵀb.
template <bool kHasX0, typename scalar_t, typename acc_t>
void init_range_impl(const scalar_t* __restrict__ b,    // [n]
                     const scalar_t* __restrict__ x0,   // [n] (read only with kHasX0)
                     const scalar_t* __restrict__ Ax0,  // [n] (read only with kHasX0)
                     scalar_t* __restrict__ r,          // [n]
                     scalar_t* __restrict__ p,          // [n]
                     acc_t d, int64_t begin, int64_t end, acc_t* rr, acc_t* bb) {
  constexpr int L = kLanes<acc_t>;
  acc_t sr[L] = {}, sb[L] = {};
  auto element = [&](int64_t i, int j) {
    const acc_t bi = static_cast<acc_t>(b[i]);
    acc_t ri = bi;
    if constexpr (kHasX0) {
      ri = bi - damped<acc_t>(static_cast<acc_t>(Ax0[i]), static_cast<acc_t>(x0[i]), d);
    }
    r[i] = static_cast<scalar_t>(ri);
    p[i] = static_cast<scalar_t>(ri);
    sr[j] += ri * ri;
    sb[j] += bi * bi;
  };
  int64_t i = begin;
  for (; i + L <= end; i += L) {
    for (int j = 0; j < L; ++j) element(i + j, j);
  }
  for (int j = 0; i < end; ++i, ++j) element(i, j);
  *rr = fold_lanes(sr);
  *bb = fold_lanes(sb);
}

template <typename scalar_t, typename acc_t>
void init_range(const scalar_t* b, const scalar_t* x0, const scalar_t* Ax0, scalar_t* r,
                scalar_t* p, acc_t d, int64_t begin, int64_t end, acc_t* rr, acc_t* bb) {
  if (x0 != nullptr) {
    init_range_impl<true>(b, x0, Ax0, r, p, d, begin, end, rr, bb);
  } else {
    init_range_impl<false>(b, x0, Ax0, r, p, d, begin, end, rr, bb);
  }
}

// xᵀ(b − r) over [begin, end).
template <typename scalar_t, typename acc_t>
acc_t finish_range(const scalar_t* __restrict__ b,  // [n]
                   const scalar_t* __restrict__ x,  // [n]
                   const scalar_t* __restrict__ r,  // [n]
                   int64_t begin, int64_t end) {
  return lane_sum<acc_t>(begin, end, [&](int64_t i) {
    return static_cast<acc_t>(x[i]) * (static_cast<acc_t>(b[i]) - static_cast<acc_t>(r[i]));
  });
}

// This instruction set's passes, for cg_cpu.cpp's run-time choice.
template <typename scalar_t, typename acc_t>
PassTable<scalar_t, acc_t> pass_table() {
  return {&curvature_range<scalar_t, acc_t>, &residual_range<scalar_t, acc_t>,
          &update_range<scalar_t, acc_t>, &init_range<scalar_t, acc_t>,
          &finish_range<scalar_t, acc_t>};
}
