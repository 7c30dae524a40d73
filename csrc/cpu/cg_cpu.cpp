// Conjugate gradient passes on the CPU.  Each pass is one sweep over the vectors; the scalar step
// between passes (cg.h) runs on the calling thread.  Reductions split the vectors into fixed chunks
// (independent of the thread count), sum each chunk in SIMD lanes and add the chunks' sums in
// float64 in order, so a solve gives the same bits with 1 or 16 threads.  Vectors up to kSerialMax
// elements are swept on the calling thread: below that, waking the thread pool (three times per
// iteration) costs more than it saves, and on a loaded machine a pool thread that is not running can
// stall the whole pass.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>

#include "cg.h"

namespace trpo_ext {
namespace cg {
namespace {

// The reduction unit: fixes the order of every sum, whatever the thread count.
constexpr int64_t kChunk = int64_t(1) << 14;
// Parallel only above this many elements (a multiple of kChunk; changes no result).
constexpr int64_t kSerialMax = int64_t(1) << 18;

// Sums: element i of a range is added into lane (i − begin) mod kLanes of kLanes independent
// accumulators, folded in a fixed tree, so the compiler vectorises across lanes without
// reassociating anything.  No FMA contraction is asked for: the residual and update passes must
// compute r − α·(Ap + d·p) identically.
// 128 bytes of accumulators (32 floats or 16 doubles): enough independent additions to hide the add
// latency when the data sit in L1/L2.
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

// Runs chunk(c) for every chunk c of [0, n): on the calling thread up to kSerialMax elements, else
// on the pool.
template <typename Chunk>
void for_each_chunk(int64_t n, const Chunk& chunk) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  if (n <= kSerialMax) {
    for (int64_t c = 0; c < chunks; ++c) chunk(c);
  } else {
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) chunk(c);
    });
  }
}

// Σ over [0, n) of range_sum(begin, end) per chunk: chunk sums combined in float64 in chunk order.
template <typename RangeSum>
double chunked_sum(int64_t n, const RangeSum& range_sum) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  if (chunks <= 1) return n > 0 ? static_cast<double>(range_sum(int64_t(0), n)) : 0.0;
  c10::SmallVector<double, 64> partial(chunks);
  for_each_chunk(n, [&](int64_t c) {
    partial[c] = static_cast<double>(range_sum(c * kChunk, std::min(n, (c + 1) * kChunk)));
  });
  double total = 0.0;
  for (double v : partial) total += v;
  return total;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> init_cpu(const at::Tensor& b,
                                                        const c10::optional<at::Tensor>& x0,
                                                        const c10::optional<at::Tensor>& Ax0,
                                                        double damping, double rtol, double atol) {
  check_init(b, x0, Ax0, damping, rtol, atol);
  const at::Tensor bc = b.contiguous();
  at::Tensor r = at::empty_like(bc);
  at::Tensor p = at::empty_like(bc);
  at::Tensor state = at::zeros({kStateSize}, b.options().dtype(at::kDouble));
  const int64_t n = bc.numel();
  const bool has_x0 = x0.has_value();
  const at::Tensor xc = has_x0 ? x0->contiguous() : at::Tensor();
  const at::Tensor Axc = has_x0 ? Ax0->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(bc.scalar_type(), "cg_init_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* bp = bc.data_ptr<scalar_t>();       // [n]
    const scalar_t* xp = has_x0 ? xc.data_ptr<scalar_t>() : nullptr;   // [n] or null
    const scalar_t* axp = has_x0 ? Axc.data_ptr<scalar_t>() : nullptr;  // [n] or null
    scalar_t* rp = r.data_ptr<scalar_t>();              // [n]
    scalar_t* pp = p.data_ptr<scalar_t>();              // [n]
    const acc_t d = static_cast<acc_t>(damping);
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    c10::SmallVector<double, 128> partial(2 * chunks);
    for_each_chunk(n, [&](int64_t c) {
      acc_t rr = 0, bb = 0;
      init_range(bp, xp, axp, rp, pp, d, c * kChunk, std::min(n, (c + 1) * kChunk), &rr, &bb);
      partial[2 * c] = static_cast<double>(rr);
      partial[2 * c + 1] = static_cast<double>(bb);
    });
    std::pair<double, double> sums{0.0, 0.0};
    for (int64_t c = 0; c < chunks; ++c) {
      sums.first += partial[2 * c];
      sums.second += partial[2 * c + 1];
    }
    finish_init(state.data_ptr<double>(), sums.first, sums.second, rtol, atol);
  });
  return {r, p, state};
}

void step_cpu(const at::Tensor& x, const at::Tensor& r, const at::Tensor& p, const at::Tensor& Ap,
              const at::Tensor& state, double damping) {
  check_step(x, r, p, Ap, state, damping);
  double* s = state.data_ptr<double>();
  s[kApply] = 0.0;
  if (s[kStatus] != kRunning) return;
  const at::Tensor Apc = Ap.contiguous();
  const int64_t n = r.numel();
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "cg_step_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* xp = x.data_ptr<scalar_t>();           // [n]
    scalar_t* rp = r.data_ptr<scalar_t>();           // [n]
    scalar_t* pp = p.data_ptr<scalar_t>();           // [n]
    const scalar_t* ap = Apc.data_ptr<scalar_t>();   // [n]
    const acc_t d = static_cast<acc_t>(damping);

    finish_curvature(s, chunked_sum(n, [&](int64_t begin, int64_t end) {
      return curvature_range(pp, ap, d, begin, end);
    }));
    if (s[kStatus] != kRunning) return;

    const acc_t alpha = static_cast<acc_t>(s[kAlpha]);
    finish_residual(s, chunked_sum(n, [&](int64_t begin, int64_t end) {
      return residual_range(rp, ap, pp, alpha, d, begin, end);
    }));
    if (s[kApply] == 0.0) return;

    const acc_t beta = static_cast<acc_t>(s[kBeta]);
    for_each_chunk(n, [&](int64_t c) {
      update_range(xp, rp, pp, ap, alpha, beta, d, c * kChunk, std::min(n, (c + 1) * kChunk));
    });
  });
}

at::Tensor finish_cpu(const at::Tensor& b, const at::Tensor& x, const at::Tensor& r,
                      const at::Tensor& state) {
  check_finish(b, x, r, state);
  const at::Tensor bc = b.contiguous();
  at::Tensor xAx = at::empty({}, b.options());
  const int64_t n = bc.numel();
  double* s = state.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(bc.scalar_type(), "cg_finish_cpu", [&] {
    const scalar_t* bp = bc.data_ptr<scalar_t>();  // [n]
    const scalar_t* xp = x.data_ptr<scalar_t>();   // [n]
    const scalar_t* rp = r.data_ptr<scalar_t>();   // [n]
    using acc_t = at::opmath_type<scalar_t>;
    s[kXAx] = chunked_sum(n, [&](int64_t begin, int64_t end) {
      return finish_range<scalar_t, acc_t>(bp, xp, rp, begin, end);
    });
    *xAx.data_ptr<scalar_t>() = static_cast<scalar_t>(s[kXAx]);
  });
  return xAx;
}

#ifndef TRPO_EXT_NO_OP_REGISTRATION
TORCH_LIBRARY_IMPL(trpo_ext, CPU, m) {
  m.impl("cg_init", &init_cpu);
  m.impl("cg_step", &step_cpu);
  m.impl("cg_finish", &finish_cpu);
}
#endif

}  // namespace cg
}  // namespace trpo_ext
