// Conjugate gradient passes on the CPU.  Each pass is one sweep over the vectors; the scalar step
// between passes (cg.h) runs on the calling thread.  Reductions split the vectors into fixed chunks
// (independent of the thread count), sum each chunk in SIMD lanes (cg_cpu_kernels.h) and add the
// chunks' sums in order, so a solve gives the same bits with 1 or 16 threads, and with the SSE2 or
// the AVX2 build of the kernels.  Vectors up to kSerialMax elements are swept on the calling thread:
// below that, waking the thread pool (three times per iteration) costs more than it saves, and on a
// loaded machine a pool thread that is not running can stall the whole pass.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "cg.h"

namespace trpo_ext {
namespace cg {
namespace {

// The reduction unit: fixes the order of every sum, whatever the thread count.
constexpr int64_t kChunk = int64_t(1) << 14;
// Parallel only above this many elements (a multiple of kChunk; changes no result).
constexpr int64_t kSerialMax = int64_t(1) << 18;

// One instruction set's passes over a range of elements (cg_cpu_kernels.h).
template <typename scalar_t, typename acc_t>
struct PassTable {
  acc_t (*curvature)(const scalar_t*, const scalar_t*, acc_t, int64_t, int64_t);
  acc_t (*residual)(const scalar_t*, const scalar_t*, const scalar_t*, acc_t, acc_t, int64_t,
                    int64_t);
  void (*update)(scalar_t*, scalar_t*, scalar_t*, const scalar_t*, acc_t, acc_t, acc_t, int64_t,
                 int64_t);
  void (*init)(const scalar_t*, const scalar_t*, const scalar_t*, scalar_t*, scalar_t*, acc_t,
               int64_t, int64_t, acc_t*, acc_t*);
  acc_t (*finish)(const scalar_t*, const scalar_t*, const scalar_t*, int64_t, int64_t);
};

// The kernels compiled twice: for the x86-64 baseline and for AVX2 (without FMA, so that both give
// the same bits).  Each copy has internal linkage in its own namespace.
namespace isa_base {
#include "cg_cpu_kernels.h"
}  // namespace isa_base

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TRPO_CG_HAVE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2")
namespace isa_avx2 {
#include "cg_cpu_kernels.h"
}  // namespace isa_avx2
#pragma GCC pop_options
#endif

// AVX2 where the CPU has it, unless the environment variable TRPO_EXT_CPU_ISA=baseline asks for the
// SSE2 kernels (tests use it to compare the two builds).  Read once.
bool use_avx2() {
#ifdef TRPO_CG_HAVE_AVX2
  static const bool yes = [] {
    const char* want = std::getenv("TRPO_EXT_CPU_ISA");
    if (want != nullptr && std::strcmp(want, "baseline") == 0) return false;
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return yes;
#else
  return false;
#endif
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
const PassTable<scalar_t, acc_t>& passes() {
#ifdef TRPO_CG_HAVE_AVX2
  static const PassTable<scalar_t, acc_t> table =
      use_avx2() ? isa_avx2::pass_table<scalar_t, acc_t>() : isa_base::pass_table<scalar_t, acc_t>();
#else
  static const PassTable<scalar_t, acc_t> table = isa_base::pass_table<scalar_t, acc_t>();
#endif
  return table;
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
    const auto& k = passes<scalar_t>();
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    c10::SmallVector<double, 128> partial(2 * chunks);
    for_each_chunk(n, [&](int64_t c) {
      acc_t rr = 0, bb = 0;
      k.init(bp, xp, axp, rp, pp, d, c * kChunk, std::min(n, (c + 1) * kChunk), &rr, &bb);
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
    const auto& k = passes<scalar_t>();

    finish_curvature(s, chunked_sum(n, [&](int64_t begin, int64_t end) {
      return k.curvature(pp, ap, d, begin, end);
    }));
    if (s[kStatus] != kRunning) return;

    const acc_t alpha = static_cast<acc_t>(s[kAlpha]);
    finish_residual(s, chunked_sum(n, [&](int64_t begin, int64_t end) {
      return k.residual(rp, ap, pp, alpha, d, begin, end);
    }));
    if (s[kApply] == 0.0) return;

    const acc_t beta = static_cast<acc_t>(s[kBeta]);
    for_each_chunk(n, [&](int64_t c) {
      k.update(xp, rp, pp, ap, alpha, beta, d, c * kChunk, std::min(n, (c + 1) * kChunk));
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
    const auto& k = passes<scalar_t>();
    s[kXAx] = chunked_sum(n, [&](int64_t begin, int64_t end) {
      return k.finish(bp, xp, rp, begin, end);
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
