// Conjugate gradient passes on the CPU.  Each pass is one parallel sweep over the vectors; the scalar
// step between passes (cg.h) runs on the calling thread.  Reductions split the vectors into fixed
// chunks (independent of the thread count) and add the chunks' sums in order, so a solve gives the
// same bits with 1 or 16 threads.  A vector shorter than one chunk is swept on the calling thread:
// at TRPO's sizes (10⁴–10⁵ parameters) waking the pool costs more than the sweep.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cg.h"

namespace trpo_ext {
namespace cg {
namespace {

constexpr int64_t kChunk = int64_t(1) << 14;

// Σ term(i) over [begin, end) with 8 independent accumulators, so the compiler can keep several
// multiply-adds in flight (and vectorise) without reassociating one serial sum.
template <typename acc_t, typename Term>
acc_t chunk_sum(int64_t begin, int64_t end, const Term& term) {
  acc_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    for (int k = 0; k < 8; ++k) s[k] += term(i + k);
  }
  for (; i < end; ++i) s[0] += term(i);
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

// Σ term(i) over [0, n): chunk sums in acc_t, combined in float64 in chunk order.
template <typename acc_t, typename Term>
double parallel_sum(int64_t n, const Term& term) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  if (chunks <= 1) return n > 0 ? static_cast<double>(chunk_sum<acc_t>(0, n, term)) : 0.0;
  std::vector<double> partial(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      partial[c] = static_cast<double>(
          chunk_sum<acc_t>(c * kChunk, std::min(n, (c + 1) * kChunk), term));
    }
  });
  double total = 0.0;
  for (double v : partial) total += v;
  return total;
}

// Two sums in one sweep (the init pass needs rᵀr and bᵀb while it writes r).
template <typename acc_t, typename Body>
std::pair<double, double> parallel_sum2(int64_t n, const Body& body) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(2 * std::max<int64_t>(chunks, 1), 0.0);
  auto run = [&](int64_t c) {
    acc_t a = 0, b = 0;
    const int64_t end = std::min(n, (c + 1) * kChunk);
    for (int64_t i = c * kChunk; i < end; ++i) body(i, a, b);
    partial[2 * c] = static_cast<double>(a);
    partial[2 * c + 1] = static_cast<double>(b);
  };
  if (chunks <= 1) {
    if (n > 0) run(0);
  } else {
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) run(c);
    });
  }
  double a = 0.0, b = 0.0;
  for (int64_t c = 0; c < chunks; ++c) {
    a += partial[2 * c];
    b += partial[2 * c + 1];
  }
  return {a, b};
}

template <typename Body>
void parallel_sweep(int64_t n, const Body& body) {
  if (n <= kChunk) {
    if (n > 0) body(0, n);
  } else {
    at::parallel_for(0, n, kChunk, body);
  }
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
    const auto sums = parallel_sum2<acc_t>(n, [&](int64_t i, acc_t& rr, acc_t& bb) {
      const acc_t bi = static_cast<acc_t>(bp[i]);
      const acc_t ri = has_x0 ? bi - damped<acc_t>(axp[i], xp[i], d) : bi;
      rp[i] = static_cast<scalar_t>(ri);
      pp[i] = static_cast<scalar_t>(ri);
      rr += ri * ri;
      bb += bi * bi;
    });
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

    finish_curvature(s, parallel_sum<acc_t>(n, [&](int64_t i) {
      const acc_t pi = static_cast<acc_t>(pp[i]);
      return pi * damped<acc_t>(ap[i], pi, d);
    }));
    if (s[kStatus] != kRunning) return;

    const acc_t alpha = static_cast<acc_t>(s[kAlpha]);
    finish_residual(s, parallel_sum<acc_t>(n, [&](int64_t i) {
      const acc_t ri = residual_candidate<acc_t>(rp[i], ap[i], pp[i], alpha, d);
      return ri * ri;
    }));
    if (s[kApply] == 0.0) return;

    const acc_t beta = static_cast<acc_t>(s[kBeta]);
    parallel_sweep(n, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t pi = static_cast<acc_t>(pp[i]);
        const acc_t ri = residual_candidate<acc_t>(rp[i], ap[i], pi, alpha, d);
        xp[i] = static_cast<scalar_t>(static_cast<acc_t>(xp[i]) + alpha * pi);
        rp[i] = static_cast<scalar_t>(ri);
        pp[i] = static_cast<scalar_t>(ri + beta * pi);
      }
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
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* bp = bc.data_ptr<scalar_t>();  // [n]
    const scalar_t* xp = x.data_ptr<scalar_t>();   // [n]
    const scalar_t* rp = r.data_ptr<scalar_t>();   // [n]
    s[kXAx] = parallel_sum<acc_t>(n, [&](int64_t i) {
      return static_cast<acc_t>(xp[i]) * (static_cast<acc_t>(bp[i]) - static_cast<acc_t>(rp[i]));
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
