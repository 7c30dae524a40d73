// KL and surrogate reductions on the CPU.  The batch is cut into fixed blocks of rows (their size
// depends on the row width only, never on the thread count); at::parallel_for spreads the blocks
// over threads, each block's partial sums go to its own slot, and the slots are added in block
// order — so results are bitwise reproducible whatever the number of threads.  With a
// state-independent log_std ([A]) the per-dimension terms (the variance-ratio part of the KL, 1/σ)
// are computed once before the batch loop, leaving a few multiply-adds per element.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#endif

#include "cpu/cpu_isa.h"
#include "kl.h"

namespace trpo_ext {
namespace {

using kl::Sums;

// Elements per block of rows, and the least work worth a thread.
constexpr int64_t kBlockElems = 8192;
constexpr int64_t kMinParallelElems = 32768;

struct Blocks {
  int64_t rows_per_block;
  int64_t count;
  int64_t grain;  // in blocks
};

Blocks blocks_for(int64_t B, int64_t width) {
  Blocks b;
  b.rows_per_block = std::max<int64_t>(1, kBlockElems / std::max<int64_t>(width, 1));
  b.count = (B + b.rows_per_block - 1) / b.rows_per_block;
  b.grain = std::max<int64_t>(1, kMinParallelElems / (b.rows_per_block * std::max<int64_t>(width, 1)));
  return b;
}

// Runs rows(r0, r1) -> Sums over the blocks in parallel and adds the partials in block order.
template <typename F>
Sums reduce_blocks(int64_t B, int64_t width, const F& rows) {
  const Blocks blk = blocks_for(B, width);
  std::vector<Sums> partial(blk.count, kl::sums_empty());
  at::parallel_for(0, blk.count, blk.grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * blk.rows_per_block;
      partial[b] = rows(r0, std::min(B, r0 + blk.rows_per_block));
    }
  });
  Sums total = kl::sums_empty();
  for (const Sums& s : partial) total = kl::sums_merge(total, s);
  return total;
}

template <typename F>
void for_blocks(int64_t B, int64_t width, const F& rows) {
  const Blocks blk = blocks_for(B, width);
  at::parallel_for(0, blk.count, blk.grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * blk.rows_per_block;
      rows(r0, std::min(B, r0 + blk.rows_per_block));
    }
  });
}

template <typename F>
void dispatch_index(at::ScalarType t, const F& f) {
  if (t == at::kInt) {
    f(int32_t{});
  } else {
    f(int64_t{});
  }
}

at::Tensor scalar_like(const at::Tensor& ref, double value) {
  at::Tensor out = at::empty({}, ref.options());
  AT_DISPATCH_FLOATING_TYPES(ref.scalar_type(), "kl_scalar", [&] {
    *out.data_ptr<scalar_t>() = static_cast<scalar_t>(value);
  });
  return out;
}

// --- diagonal Gaussian -------------------------------------------------------------------------

template <typename scalar_t>
struct GaussianPtrs {
  const scalar_t* mean_old;     // [B, A]
  const scalar_t* log_std_old;  // [A] or [B, A] (row stride lo_stride)
  const scalar_t* mean_new;     // [B, A]
  const scalar_t* log_std_new;  // [A] or [B, A] (row stride ln_stride)
  const scalar_t* actions;      // [B, A], surrogate only
  const scalar_t* logp_old;     // [B], surrogate only
  const scalar_t* advantages;   // [B], surrogate only
  int64_t A;
  int64_t lo_stride;
  int64_t ln_stride;
};

template <typename scalar_t>
GaussianPtrs<scalar_t> gaussian_ptrs(const kl::GaussianInputs& in) {
  return {in.mean_old.data_ptr<scalar_t>(),
          in.log_std_old.data_ptr<scalar_t>(),
          in.mean_new.data_ptr<scalar_t>(),
          in.log_std_new.data_ptr<scalar_t>(),
          in.surrogate ? in.actions.data_ptr<scalar_t>() : nullptr,
          in.surrogate ? in.logp_old.data_ptr<scalar_t>() : nullptr,
          in.surrogate ? in.advantages.data_ptr<scalar_t>() : nullptr,
          in.A,
          in.log_std_old_row_stride,
          in.log_std_new_row_stride};
}

// The constants of the vectorised Gaussian kernels (kl_cpu_kernels.h) for a state-independent
// log_std: 1/σ_new repeated over a tile's rows, and the per-row sums of the per-dimension terms.
template <typename acc_t>
struct GaussTileConsts {
  const acc_t* inv_std_rep;  // [kTileRows · A]: element e of a tile has 1/σ_new of dimension e % A
  acc_t kl_const;            // Σ_a ½(e^{2(ℓ_old − ℓ_new)} − 1 − 2(ℓ_old − ℓ_new))
  acc_t logp_const;          // Σ_a ℓ_new + A · ½ log 2π
};

template <typename scalar_t>
struct CategoricalPtrs {
  const scalar_t* logits_old;  // [B, K]
  const scalar_t* logits_new;  // [B, K]
  const void* actions;         // [B] int64 or int32, surrogate only
  const scalar_t* logp_old;    // [B], surrogate only
  const scalar_t* advantages;  // [B], surrogate only
  int64_t B;
  int64_t K;
};

template <typename scalar_t>
CategoricalPtrs<scalar_t> categorical_ptrs(const kl::CategoricalInputs& in) {
  return {in.logits_old.data_ptr<scalar_t>(),
          in.logits_new.data_ptr<scalar_t>(),
          in.surrogate ? in.actions.data_ptr() : nullptr,
          in.surrogate ? in.logp_old.data_ptr<scalar_t>() : nullptr,
          in.surrogate ? in.advantages.data_ptr<scalar_t>() : nullptr,
          in.B,
          in.K};
}

// --- the vectorised row kernels -------------------------------------------------------------
//
// The row kernels (kl_cpu_kernels.h: categorical rows, and the Gaussian rows of a state-independent
// log_std), compiled three times: for the x86-64 baseline, for AVX2 + FMA and for AVX-512, chosen
// once at run time (cpu_isa.h).  Each copy lives in its own namespace and has internal linkage (we
// are inside an anonymous namespace), so the copies never meet at link time.  The AVX2 and
// AVX-512 copies also get a few hand-written intrinsics where GCC's vectoriser falls short
// (TRPO_KL_AVX2_KERNELS, and TRPO_KL_AVX512_KERNELS for the AVX-512 copy's categorical tiles
// and K = 2 rows).
// The builds may differ in the last bits (FMA contraction, summation order inside a row); on one
// machine and build, results are reproducible.
namespace isa_base {
#include "vmath.h"
#include "kl_cpu_kernels.h"
}  // namespace isa_base

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TRPO_KL_HAVE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define TRPO_KL_AVX2_KERNELS 1
namespace isa_avx2 {
#include "vmath.h"
#include "kl_cpu_kernels.h"
}  // namespace isa_avx2
#pragma GCC pop_options
// AVX-512 (F, VL, BW, DQ): the same source with 16-float vectors (GCC's generic tuning would keep
// 256-bit ones), and the AVX2 intrinsics above, which AVX-512 machines also run.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")
#define TRPO_KL_LANES 16
#define TRPO_KL_AVX512_KERNELS 1
namespace isa_avx512 {
#include "vmath.h"
#include "kl_cpu_kernels.h"
}  // namespace isa_avx512
#undef TRPO_KL_AVX512_KERNELS
#undef TRPO_KL_LANES
#undef TRPO_KL_AVX2_KERNELS
#pragma GCC pop_options
#endif


// Per-dimension terms of a state-independent pair of log_stds, hoisted out of the batch loop.
template <typename acc_t>
struct GaussianColumns {
  std::vector<acc_t> scale;       // ½ (eˣ − 1 − x) for the KL, or −expm1(x) for its gradient
  std::vector<acc_t> inv_std;     // 1/σ_new
  std::vector<acc_t> log_std;     // ℓ_new
};

template <typename scalar_t, typename acc_t>
GaussianColumns<acc_t> gaussian_columns(const GaussianPtrs<scalar_t>& p, bool for_grad) {
  GaussianColumns<acc_t> c;
  c.scale.resize(p.A);
  c.inv_std.resize(p.A);
  c.log_std.resize(p.A);
  for (int64_t a = 0; a < p.A; ++a) {
    const acc_t lo = static_cast<acc_t>(p.log_std_old[a]);
    const acc_t ln = static_cast<acc_t>(p.log_std_new[a]);
    c.scale[a] = for_grad ? kl::gaussian_kl_grad_scale_term<acc_t>(lo, ln)
                          : kl::gaussian_kl_scale_term<acc_t>(lo, ln);
    c.inv_std[a] = kl::k_exp(-ln);
    c.log_std[a] = ln;
  }
  return c;
}

// The three per-dimension terms, from the hoisted columns or from the row.
template <bool kShared, bool kForGrad, typename scalar_t, typename acc_t>
inline void gaussian_terms(const GaussianPtrs<scalar_t>& p, const GaussianColumns<acc_t>& cols,
                           int64_t row, int64_t a, acc_t& scale, acc_t& inv_std, acc_t& log_std) {
  if (kShared) {
    scale = cols.scale[a];
    inv_std = cols.inv_std[a];
    log_std = cols.log_std[a];
  } else {
    const acc_t lo = static_cast<acc_t>(p.log_std_old[row * p.lo_stride + a]);
    log_std = static_cast<acc_t>(p.log_std_new[row * p.ln_stride + a]);
    scale = kForGrad ? kl::gaussian_kl_grad_scale_term<acc_t>(lo, log_std)
                     : kl::gaussian_kl_scale_term<acc_t>(lo, log_std);
    inv_std = kl::k_exp(-log_std);
  }
}

template <typename scalar_t, typename acc_t, bool kSurrogate, bool kShared>
Sums gaussian_forward_rows(const GaussianPtrs<scalar_t>& p, const GaussianColumns<acc_t>& cols,
                           int64_t r0, int64_t r1) {
  Sums s = kl::sums_empty();
  const int64_t A = p.A;
  for (int64_t row = r0; row < r1; ++row) {
    const scalar_t* mo = p.mean_old + row * A;
    const scalar_t* mn = p.mean_new + row * A;
    acc_t kl_row = 0;
    acc_t logp = 0;
    for (int64_t a = 0; a < A; ++a) {
      acc_t scale, inv_std, log_std;
      gaussian_terms<kShared, false>(p, cols, row, a, scale, inv_std, log_std);
      const acc_t mean_new = static_cast<acc_t>(mn[a]);
      kl_row += kl::gaussian_kl_from_parts<acc_t>(scale, inv_std, static_cast<acc_t>(mo[a]),
                                                  mean_new);
      if (kSurrogate) {
        logp += kl::gaussian_log_prob_from_parts<acc_t>(static_cast<acc_t>(p.actions[row * A + a]),
                                                        mean_new, log_std, inv_std);
      }
    }
    s.kl += static_cast<double>(kl_row);
    s.max_kl = kl::nan_max(s.max_kl, static_cast<double>(kl_row));
    if (kSurrogate) {
      logp -= static_cast<acc_t>(A * kl::kHalfLog2Pi);
      s.surrogate += static_cast<double>(kl::surrogate_term<acc_t>(
          logp, static_cast<acc_t>(p.logp_old[row]), static_cast<acc_t>(p.advantages[row])));
    }
  }
  return s;
}

// The vectorised kernels for a state-independent log_std of up to kTileMaxK dimensions (the
// usual TRPO policy), on this machine's instruction set.
template <typename scalar_t, typename acc_t, bool kSurrogate>
Sums gaussian_forward_shared(const GaussianPtrs<scalar_t>& p, const GaussianColumns<acc_t>& cols,
                             int64_t B) {
  const int64_t A = p.A;
  std::vector<acc_t> inv_rep(isa_base::kTileRows * A);
  for (size_t e = 0; e < inv_rep.size(); ++e) inv_rep[e] = cols.inv_std[e % A];
  GaussTileConsts<acc_t> c{inv_rep.data(), acc_t(0), static_cast<acc_t>(A * kl::kHalfLog2Pi)};
  for (int64_t a = 0; a < A; ++a) {
    c.kl_const += cols.scale[a];
    c.logp_const += cols.log_std[a];
  }
  return reduce_blocks(B, A, [&](int64_t r0, int64_t r1) {
#ifdef TRPO_KL_HAVE_AVX2
    if (cpu_isa_selected() == CpuIsa::kAvx512) {
      return kSurrogate ? isa_avx512::gauss_surrogate_tiles<scalar_t, acc_t>(p, c, r0, r1)
                        : isa_avx512::gauss_kl_sum<scalar_t, acc_t>(p, c, r0, r1);
    }
    if (cpu_isa_selected() == CpuIsa::kAvx2) {
      return kSurrogate ? isa_avx2::gauss_surrogate_tiles<scalar_t, acc_t>(p, c, r0, r1)
                        : isa_avx2::gauss_kl_sum<scalar_t, acc_t>(p, c, r0, r1);
    }
#endif
    return kSurrogate ? isa_base::gauss_surrogate_tiles<scalar_t, acc_t>(p, c, r0, r1)
                      : isa_base::gauss_kl_sum<scalar_t, acc_t>(p, c, r0, r1);
  });
}

// kSurrogate: the line search's fused pass (Σ surrogate, Σ KL, max KL); else Σ KL only.
template <bool kSurrogate>
Sums gaussian_forward(const kl::GaussianInputs& in) {
  Sums total;
  AT_DISPATCH_FLOATING_TYPES(in.mean_old.scalar_type(), "kl_diag_gaussian_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const GaussianPtrs<scalar_t> p = gaussian_ptrs<scalar_t>(in);
    const bool shared = p.lo_stride == 0 && p.ln_stride == 0;
    const GaussianColumns<acc_t> cols =
        shared ? gaussian_columns<scalar_t, acc_t>(p, false) : GaussianColumns<acc_t>{};
    if (shared && p.A <= isa_base::kTileMaxK) {
      total = gaussian_forward_shared<scalar_t, acc_t, kSurrogate>(p, cols, in.B);
      return;
    }
    total = reduce_blocks(in.B, in.A, [&](int64_t r0, int64_t r1) {
      return shared ? gaussian_forward_rows<scalar_t, acc_t, kSurrogate, true>(p, cols, r0, r1)
                    : gaussian_forward_rows<scalar_t, acc_t, kSurrogate, false>(p, cols, r0, r1);
    });
  });
  return total;
}

at::Tensor kl_diag_gaussian_cpu(const at::Tensor& mean_old, const at::Tensor& log_std_old,
                                const at::Tensor& mean_new, const at::Tensor& log_std_new) {
  const std::optional<at::Tensor> none;
  const kl::GaussianInputs in =
      kl::check_gaussian(mean_old, log_std_old, mean_new, log_std_new, {none, none, none});
  const Sums s = gaussian_forward<false>(in);
  return scalar_like(mean_old, s.kl / static_cast<double>(in.B));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_surrogate_diag_gaussian_cpu(
    const at::Tensor& mean_old, const at::Tensor& log_std_old, const at::Tensor& mean_new,
    const at::Tensor& log_std_new, const at::Tensor& actions, const at::Tensor& logp_old,
    const at::Tensor& advantages) {
  const std::optional<at::Tensor> act(actions), lp(logp_old), adv(advantages);
  const kl::GaussianInputs in =
      kl::check_gaussian(mean_old, log_std_old, mean_new, log_std_new, {act, lp, adv});
  const Sums s = gaussian_forward<true>(in);
  const double B = static_cast<double>(in.B);
  return {scalar_like(mean_old, s.surrogate / B), scalar_like(mean_old, s.kl / B),
          scalar_like(mean_old, s.max_kl)};
}

template <typename scalar_t, typename acc_t, bool kSurrogate, bool kShared>
void gaussian_backward_rows(const GaussianPtrs<scalar_t>& p, const GaussianColumns<acc_t>& cols,
                            acc_t grad_kl, acc_t grad_surrogate, scalar_t* grad_mean,
                            scalar_t* grad_log_std, int64_t r0, int64_t r1) {
  // grad_mean, grad_log_std: [B, A]; grad_kl and grad_surrogate already carry the 1/B of the mean.
  const int64_t A = p.A;
  for (int64_t row = r0; row < r1; ++row) {
    const scalar_t* mo = p.mean_old + row * A;
    const scalar_t* mn = p.mean_new + row * A;
    acc_t c = 0;  // ∂(mean surrogate)/∂ log π_new(a_row), times the upstream gradient
    if (kSurrogate) {
      acc_t logp = 0;
      for (int64_t a = 0; a < A; ++a) {
        acc_t scale, inv_std, log_std;
        gaussian_terms<kShared, true>(p, cols, row, a, scale, inv_std, log_std);
        logp += kl::gaussian_log_prob_from_parts<acc_t>(
            static_cast<acc_t>(p.actions[row * A + a]), static_cast<acc_t>(mn[a]), log_std,
            inv_std);
      }
      logp -= static_cast<acc_t>(A * kl::kHalfLog2Pi);
      c = grad_surrogate * kl::surrogate_term<acc_t>(logp, static_cast<acc_t>(p.logp_old[row]),
                                                     static_cast<acc_t>(p.advantages[row]));
    }
    for (int64_t a = 0; a < A; ++a) {
      acc_t scale, inv_std, log_std;
      gaussian_terms<kShared, true>(p, cols, row, a, scale, inv_std, log_std);
      const acc_t mean_new = static_cast<acc_t>(mn[a]);
      acc_t dm, dl;
      kl::gaussian_kl_grad_from_parts<acc_t>(scale, inv_std, static_cast<acc_t>(mo[a]), mean_new,
                                             dm, dl);
      acc_t gm = grad_kl * dm;
      acc_t gl = grad_kl * dl;
      if (kSurrogate) {
        acc_t pm, pl;
        kl::gaussian_log_prob_grad<acc_t>(static_cast<acc_t>(p.actions[row * A + a]), mean_new,
                                          inv_std, pm, pl);
        gm += c * pm;
        gl += c * pl;
      }
      grad_mean[row * A + a] = static_cast<scalar_t>(gm);
      grad_log_std[row * A + a] = static_cast<scalar_t>(gl);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> kl_diag_gaussian_backward_cpu(
    const at::Tensor& grad_mean_kl, const std::optional<at::Tensor>& grad_surrogate,
    const at::Tensor& mean_old, const at::Tensor& log_std_old, const at::Tensor& mean_new,
    const at::Tensor& log_std_new, const std::optional<at::Tensor>& actions,
    const std::optional<at::Tensor>& logp_old, const std::optional<at::Tensor>& advantages) {
  const bool surrogate = grad_surrogate.has_value();
  const kl::GaussianInputs in =
      kl::check_gaussian_backward(grad_mean_kl, grad_surrogate, mean_old, log_std_old, mean_new,
                                  log_std_new, actions, logp_old, advantages);
  at::Tensor grad_mean = at::empty_like(in.mean_new);
  // A state-independent log_std's gradient sums the per-row terms over the batch.
  at::Tensor grad_log_std_rows = at::empty_like(in.mean_new);
  AT_DISPATCH_FLOATING_TYPES(in.mean_old.scalar_type(), "kl_diag_gaussian_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const GaussianPtrs<scalar_t> p = gaussian_ptrs<scalar_t>(in);
    const bool shared = p.lo_stride == 0 && p.ln_stride == 0;
    const GaussianColumns<acc_t> cols =
        shared ? gaussian_columns<scalar_t, acc_t>(p, true) : GaussianColumns<acc_t>{};
    const acc_t inv_B = acc_t(1) / static_cast<acc_t>(in.B);
    const acc_t gk = static_cast<acc_t>(*grad_mean_kl.data_ptr<scalar_t>()) * inv_B;
    const acc_t gs =
        surrogate ? static_cast<acc_t>(*grad_surrogate->data_ptr<scalar_t>()) * inv_B : acc_t(0);
    scalar_t* gm = grad_mean.data_ptr<scalar_t>();
    scalar_t* gl = grad_log_std_rows.data_ptr<scalar_t>();
    for_blocks(in.B, in.A, [&](int64_t r0, int64_t r1) {
      if (surrogate) {
        shared ? gaussian_backward_rows<scalar_t, acc_t, true, true>(p, cols, gk, gs, gm, gl, r0, r1)
               : gaussian_backward_rows<scalar_t, acc_t, true, false>(p, cols, gk, gs, gm, gl, r0,
                                                                      r1);
      } else {
        shared ? gaussian_backward_rows<scalar_t, acc_t, false, true>(p, cols, gk, gs, gm, gl, r0,
                                                                      r1)
               : gaussian_backward_rows<scalar_t, acc_t, false, false>(p, cols, gk, gs, gm, gl, r0,
                                                                       r1);
      }
    });
  });
  at::Tensor grad_log_std =
      log_std_new.dim() == 1 ? grad_log_std_rows.sum(0) : grad_log_std_rows;
  return {grad_mean, grad_log_std};
}

// --- categorical -------------------------------------------------------------------------------

// Every action is checked before the arithmetic of its block reads the logit it names: a
// branch-free scan of the block's actions (it vectorises; the per-element check with its message
// cost ~1 ns an action, a third of the fused K = 2 pass), which also brings them into the cache for
// the kernel.  It was a separate parallel pass over all the actions before the kernels, 0.2 ms of
// the fused K = 2 pass's 1.2 ms at B = 10⁶.  A block with an out-of-range action computes nothing;
// once all blocks are done, a serial search finds the first such action for the message.
template <typename index_t>
bool actions_in_range(const void* actions, int64_t K, int64_t r0, int64_t r1) {
  const index_t* a = static_cast<const index_t*>(actions);
  bool out = false;
  for (int64_t i = r0; i < r1; ++i) out |= !kl::action_in_range(a[i], K);
  return !out;
}

void throw_first_bad_action(const kl::CategoricalInputs& in) {
  dispatch_index(in.actions.scalar_type(), [&](auto tag) {
    using index_t = decltype(tag);
    const index_t* a = in.actions.data_ptr<index_t>();
    for (int64_t i = 0; i < in.B; ++i) {
      TRPO_CHECK_VALUE(kl::action_in_range(a[i], in.K), "actions[", i, "] = ",
                       static_cast<int64_t>(a[i]), " is out of range for K = ", in.K,
                       " classes (valid: 0 to ", in.K - 1, ")");
    }
  });
  // a block found one, so the search above threw; never return half-computed results
  TORCH_INTERNAL_ASSERT(false, "a block reported an out-of-range action the search did not find");
}

template <typename scalar_t, typename acc_t, typename index_t, bool kSurrogate>
Sums categorical_forward_rows(const CategoricalPtrs<scalar_t>& p, int64_t r0, int64_t r1) {
#ifdef TRPO_KL_HAVE_AVX2
  if (cpu_isa_selected() == CpuIsa::kAvx512) {
    return isa_avx512::cat_forward_rows<scalar_t, acc_t, index_t, kSurrogate>(p, r0, r1);
  }
  if (cpu_isa_selected() == CpuIsa::kAvx2) {
    return isa_avx2::cat_forward_rows<scalar_t, acc_t, index_t, kSurrogate>(p, r0, r1);
  }
#endif
  return isa_base::cat_forward_rows<scalar_t, acc_t, index_t, kSurrogate>(p, r0, r1);
}

template <typename scalar_t, typename acc_t, typename index_t, bool kSurrogate>
void categorical_backward_rows(const CategoricalPtrs<scalar_t>& p, acc_t grad_kl,
                               acc_t grad_surrogate, scalar_t* grad_logits, int64_t r0,
                               int64_t r1) {
  // grad_logits: [B, K]; grad_kl and grad_surrogate already carry the 1/B of the mean.
#ifdef TRPO_KL_HAVE_AVX2
  if (cpu_isa_selected() == CpuIsa::kAvx512) {
    isa_avx512::cat_backward_rows<scalar_t, acc_t, index_t, kSurrogate>(p, grad_kl, grad_surrogate,
                                                                        grad_logits, r0, r1);
    return;
  }
  if (cpu_isa_selected() == CpuIsa::kAvx2) {
    isa_avx2::cat_backward_rows<scalar_t, acc_t, index_t, kSurrogate>(p, grad_kl, grad_surrogate,
                                                                      grad_logits, r0, r1);
    return;
  }
#endif
  isa_base::cat_backward_rows<scalar_t, acc_t, index_t, kSurrogate>(p, grad_kl, grad_surrogate,
                                                                    grad_logits, r0, r1);
}

template <bool kSurrogate>
Sums categorical_forward(const kl::CategoricalInputs& in) {
  Sums total;
  std::atomic<bool> bad{false};
  const at::ScalarType index_type = kSurrogate ? in.actions.scalar_type() : at::kLong;
  AT_DISPATCH_FLOATING_TYPES(in.logits_old.scalar_type(), "kl_categorical_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const CategoricalPtrs<scalar_t> p = categorical_ptrs<scalar_t>(in);
    dispatch_index(index_type, [&](auto tag) {
      using index_t = decltype(tag);
      total = reduce_blocks(in.B, in.K, [&](int64_t r0, int64_t r1) {
        if (kSurrogate && !actions_in_range<index_t>(p.actions, p.K, r0, r1)) {
          bad.store(true, std::memory_order_relaxed);
          return kl::sums_empty();
        }
        return categorical_forward_rows<scalar_t, acc_t, index_t, kSurrogate>(p, r0, r1);
      });
    });
  });
  if (bad.load()) throw_first_bad_action(in);
  return total;
}

at::Tensor kl_categorical_cpu(const at::Tensor& logits_old, const at::Tensor& logits_new) {
  const std::optional<at::Tensor> none;
  const kl::CategoricalInputs in = kl::check_categorical(logits_old, logits_new, {none, none, none});
  const Sums s = categorical_forward<false>(in);
  return scalar_like(logits_old, s.kl / static_cast<double>(in.B));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_surrogate_categorical_cpu(
    const at::Tensor& logits_old, const at::Tensor& logits_new, const at::Tensor& actions,
    const at::Tensor& logp_old, const at::Tensor& advantages) {
  const std::optional<at::Tensor> act(actions), lp(logp_old), adv(advantages);
  const kl::CategoricalInputs in = kl::check_categorical(logits_old, logits_new, {act, lp, adv});
  const Sums s = categorical_forward<true>(in);
  const double B = static_cast<double>(in.B);
  return {scalar_like(logits_old, s.surrogate / B), scalar_like(logits_old, s.kl / B),
          scalar_like(logits_old, s.max_kl)};
}

at::Tensor kl_categorical_backward_cpu(const at::Tensor& grad_mean_kl,
                                       const std::optional<at::Tensor>& grad_surrogate,
                                       const at::Tensor& logits_old, const at::Tensor& logits_new,
                                       const std::optional<at::Tensor>& actions,
                                       const std::optional<at::Tensor>& logp_old,
                                       const std::optional<at::Tensor>& advantages) {
  const bool surrogate = grad_surrogate.has_value();
  const kl::CategoricalInputs in = kl::check_categorical_backward(
      grad_mean_kl, grad_surrogate, logits_old, logits_new, actions, logp_old, advantages);
  at::Tensor grad_logits = at::empty_like(in.logits_new);
  std::atomic<bool> bad{false};
  const at::ScalarType index_type = surrogate ? in.actions.scalar_type() : at::kLong;
  AT_DISPATCH_FLOATING_TYPES(in.logits_old.scalar_type(), "kl_categorical_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const CategoricalPtrs<scalar_t> p = categorical_ptrs<scalar_t>(in);
    const acc_t inv_B = acc_t(1) / static_cast<acc_t>(in.B);
    const acc_t gk = static_cast<acc_t>(*grad_mean_kl.data_ptr<scalar_t>()) * inv_B;
    const acc_t gs =
        surrogate ? static_cast<acc_t>(*grad_surrogate->data_ptr<scalar_t>()) * inv_B : acc_t(0);
    scalar_t* g = grad_logits.data_ptr<scalar_t>();
    dispatch_index(index_type, [&](auto tag) {
      using index_t = decltype(tag);
      for_blocks(in.B, in.K, [&](int64_t r0, int64_t r1) {
        if (surrogate && !actions_in_range<index_t>(p.actions, p.K, r0, r1)) {
          bad.store(true, std::memory_order_relaxed);
        } else if (surrogate) {
          categorical_backward_rows<scalar_t, acc_t, index_t, true>(p, gk, gs, g, r0, r1);
        } else {
          categorical_backward_rows<scalar_t, acc_t, index_t, false>(p, gk, gs, g, r0, r1);
        }
      });
    });
  });
  if (bad.load()) throw_first_bad_action(in);
  return grad_logits;
}

}  // namespace

// --- Fisher metric products ----------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> kl_metric_diag_gaussian_cpu(const at::Tensor& log_std,
                                                               const at::Tensor& u_mean,
                                                               const at::Tensor& u_log_std) {
  const kl::MetricGaussianInputs in = kl::check_metric_gaussian(log_std, u_mean, u_log_std);
  const at::Tensor& ls = in.log_std;
  const at::Tensor& um = in.u_mean;
  const at::Tensor& ul = in.u_log_std;
  at::Tensor m_mean = at::empty_like(um);
  at::Tensor m_log_std = at::empty_like(ul);
  const int64_t B = in.B;
  const int64_t A = in.A;
  const int64_t ls_stride = in.per_state ? A : 0;
  AT_DISPATCH_FLOATING_TYPES(um.scalar_type(), "kl_metric_diag_gaussian_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t inv_B = acc_t(1) / static_cast<acc_t>(B);
    const scalar_t* l = ls.data_ptr<scalar_t>();
    const scalar_t* u = um.data_ptr<scalar_t>();
    scalar_t* out = m_mean.data_ptr<scalar_t>();
    for_blocks(B, A, [&](int64_t r0, int64_t r1) {
      for (int64_t row = r0; row < r1; ++row) {
        for (int64_t a = 0; a < A; ++a) {
          out[row * A + a] = static_cast<scalar_t>(
              inv_B * kl::gaussian_metric_mean<acc_t>(static_cast<acc_t>(u[row * A + a]),
                                                      static_cast<acc_t>(l[row * ls_stride + a])));
        }
      }
    });
    // A state-independent log_std is shared by the B elements: B · (2 / B) = 2.
    const acc_t scale = static_cast<acc_t>(kl::kGaussianMetricLogStd) * (ls_stride ? inv_B : acc_t(1));
    const scalar_t* v = ul.data_ptr<scalar_t>();
    scalar_t* o = m_log_std.data_ptr<scalar_t>();
    for (int64_t i = 0; i < ul.numel(); ++i) o[i] = static_cast<scalar_t>(scale * static_cast<acc_t>(v[i]));
  });
  return {m_mean, m_log_std};
}

at::Tensor kl_metric_categorical_cpu(const at::Tensor& logits, const at::Tensor& u) {
  const kl::MetricCategoricalInputs in = kl::check_metric_categorical(logits, u);
  const at::Tensor& lg = in.logits;
  const at::Tensor& uc = in.u;
  at::Tensor out = at::empty_like(uc);
  const int64_t B = in.B;
  const int64_t K = in.K;
  AT_DISPATCH_FLOATING_TYPES(lg.scalar_type(), "kl_metric_categorical_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t inv_B = acc_t(1) / static_cast<acc_t>(B);
    const scalar_t* l = lg.data_ptr<scalar_t>();
    const scalar_t* uu = uc.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    for_blocks(B, K, [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> p(K);
      for (int64_t row = r0; row < r1; ++row) {
        const scalar_t* lr = l + row * K;
        const scalar_t* ur = uu + row * K;
        acc_t mx = kl::neg_inf<acc_t>();
        for (int64_t k = 0; k < K; ++k) mx = std::max(mx, static_cast<acc_t>(lr[k]));
        acc_t sum = 0;
        for (int64_t k = 0; k < K; ++k) {
          // A −inf logit has p = 0 (and a row of only −inf logits is no distribution: NaN).
          p[k] = std::exp(static_cast<acc_t>(lr[k]) - mx);
          sum += p[k];
        }
        const acc_t inv_sum = acc_t(1) / sum;
        acc_t pu = 0;
        for (int64_t k = 0; k < K; ++k) {
          p[k] *= inv_sum;
          pu += p[k] * static_cast<acc_t>(ur[k]);
        }
        for (int64_t k = 0; k < K; ++k) {
          o[row * K + k] =
              static_cast<scalar_t>(inv_B * kl::cat_metric<acc_t>(p[k], static_cast<acc_t>(ur[k]), pu));
        }
      }
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(trpo_ext, CPU, m) {
  m.impl("kl_diag_gaussian", &kl_diag_gaussian_cpu);
  m.impl("kl_surrogate_diag_gaussian", &kl_surrogate_diag_gaussian_cpu);
  m.impl("kl_diag_gaussian_backward", &kl_diag_gaussian_backward_cpu);
  m.impl("kl_categorical", &kl_categorical_cpu);
  m.impl("kl_surrogate_categorical", &kl_surrogate_categorical_cpu);
  m.impl("kl_categorical_backward", &kl_categorical_backward_cpu);
  m.impl("kl_metric_diag_gaussian", &kl_metric_diag_gaussian_cpu);
  m.impl("kl_metric_categorical", &kl_metric_categorical_cpu);
}

}  // namespace trpo_ext
