// KL, surrogate and Fisher-metric ops on the CPU: plain loops over kl.h's math that the compiler
// vectorises.  The batch is cut into tiles of rows whose size depends on the row width only;
// at::parallel_for spreads the tiles over threads, each tile's partial sums go to its own slot and
// the slots are added in tile order, so results are bitwise reproducible whatever the thread count.
// Inside a tile the SIMD lanes run along the rows: a Gaussian tile is one flat loop over its
// elements (a state-independent log_std's per-dimension terms repeated over the tile's rows), a
// categorical tile is copied transposed (class-major) so that every lane holds one row.
// The tile functions are compiled for AVX2 + FMA and for the baseline x86-64 (GCC's
// target_clones; the loader picks one per machine): the extension's only ISA selection.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "kl.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define TRPO_ISA_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define TRPO_ISA_CLONES
#endif

namespace trpo_ext {
namespace {

using kl::Sums;

// A categorical tile's two transposed copies stay within L1.
constexpr int64_t kTileElems = 2048;
constexpr int64_t kMaxTileRows = 256;
// The least work worth a thread, in elements.
constexpr int64_t kMinParallelElems = 32768;

int64_t tile_rows(int64_t width) {
  return std::clamp<int64_t>(kTileElems / std::max<int64_t>(width, 1), 1, kMaxTileRows);
}

// Calls tile(r0, r1) for every tile of rows of [0, B), in parallel.
template <typename F>
void for_tiles(int64_t B, int64_t width, const F& tile) {
  const int64_t R = tile_rows(width);
  const int64_t grain = std::max<int64_t>(1, kMinParallelElems / (R * width));
  at::parallel_for(0, (B + R - 1) / R, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) tile(t * R, std::min(B, (t + 1) * R));
  });
}

// Σ of tile(r0, r1) -> Sums over the tiles, added in tile order.
template <typename F>
Sums reduce_tiles(int64_t B, int64_t width, const F& tile) {
  const int64_t R = tile_rows(width);
  std::vector<Sums> partial((B + R - 1) / R, kl::sums_empty());
  for_tiles(B, width, [&](int64_t r0, int64_t r1) { partial[r0 / R] = tile(r0, r1); });
  Sums total = kl::sums_empty();
  for (const Sums& s : partial) total = kl::sums_merge(total, s);
  return total;
}

// The sums of a tile's n rows from their KLs and, with kSurrogate, their log π_new(a).
template <bool kSurrogate, typename scalar_t, typename acc_t>
TRPO_ISA_CLONES Sums tile_sums(const acc_t* kl_rows, const acc_t* logp_rows,
                               const scalar_t* logp_old, const scalar_t* advantages, int64_t n) {
  double kl_sum = 0.0, surrogate_sum = 0.0, max_kl = kl::neg_inf<double>();
#pragma omp simd reduction(+ : kl_sum, surrogate_sum) reduction(max : max_kl)
  for (int64_t j = 0; j < n; ++j) {
    const double k = static_cast<double>(kl_rows[j]);
    kl_sum += k;
    max_kl = k > max_kl ? k : max_kl;
    if (kSurrogate) {
      surrogate_sum += static_cast<double>(kl::surrogate_term<acc_t>(
          logp_rows[j], static_cast<acc_t>(logp_old[j]), static_cast<acc_t>(advantages[j])));
    }
  }
  // KLs are >= 0, so the sum is NaN exactly when some row's KL is (the max above skips NaN).
  if (kl_sum != kl_sum) max_kl = kl_sum;
  return {kl_sum, surrogate_sum, max_kl};
}

at::Tensor scalar_like(const at::Tensor& ref, double value) {
  return at::scalar_tensor(value, ref.options());
}

template <typename scalar_t>
double read_scalar(const at::Tensor& t) {
  return static_cast<double>(*t.data_ptr<scalar_t>());
}

// --- diagonal Gaussian -------------------------------------------------------------------------

// The log_stds of one call, as flat per-tile arrays: a state-independent side repeated over a
// tile's rows; with both state-independent, kl.h's per-dimension columns precomputed likewise.
template <typename scalar_t, typename acc_t>
struct GaussTiles {
  const kl::GaussianInputs& in;
  const scalar_t* lo;                   // log_std_old, [A] or [B, A]
  const scalar_t* ln;                   // log_std_new, [A] or [B, A]
  bool shared;                          // both log_stds are [A]
  std::vector<acc_t> lo_rep, ln_rep;    // [R·A] repeated [A] log_stds
  std::vector<acc_t> kl_scale, grad_scale, inv_std, log_std;  // [R·A] columns when shared

  explicit GaussTiles(const kl::GaussianInputs& in_) : in(in_) {
    const int64_t A = in.A;
    const int64_t n = tile_rows(A) * A;
    shared = in.log_std_old_row_stride == 0 && in.log_std_new_row_stride == 0;
    lo = in.log_std_old.template data_ptr<scalar_t>();
    ln = in.log_std_new.template data_ptr<scalar_t>();
    lo_rep.resize(n);
    ln_rep.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      lo_rep[i] = static_cast<acc_t>(lo[i % A]);
      ln_rep[i] = static_cast<acc_t>(ln[i % A]);
    }
    if (!shared) return;
    kl_scale.resize(n), grad_scale.resize(n), inv_std.resize(n), log_std.resize(n);
    for (int64_t a = 0; a < A; ++a) {  // computed once per dimension, then repeated
      const kl::GaussCol<acc_t> c = kl::gauss_col(lo_rep[a], ln_rep[a]);
      for (int64_t i = a; i < n; i += A) {
        kl_scale[i] = c.kl_scale, grad_scale[i] = c.grad_scale;
        inv_std[i] = c.inv_std, log_std[i] = c.log_std;
      }
    }
  }

  // Row r0 of an input [B, A] (the start of a tile).
  const scalar_t* rows(const at::Tensor& t, int64_t r0) const {
    return t.template data_ptr<scalar_t>() + r0 * in.A;
  }

  // Element i of the tile starting at row r0.
  template <bool kShared>
  kl::GaussCol<acc_t> col(int64_t r0, int64_t i) const {
    if (kShared) return {kl_scale[i], grad_scale[i], inv_std[i], log_std[i]};
    const int64_t e = r0 * in.A + i;
    return kl::gauss_col(in.log_std_old_row_stride ? static_cast<acc_t>(lo[e]) : lo_rep[i],
                         in.log_std_new_row_stride ? static_cast<acc_t>(ln[e]) : ln_rep[i]);
  }
};

// Row sums of a tile's per-element terms e [n, A] into out [n].
template <typename acc_t>
void row_sums(const acc_t* e, int64_t n, int64_t A, acc_t* out) {
  if (A == 1) {  // a one-iteration inner loop per row stops the vectoriser
    std::copy(e, e + n, out);
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    acc_t s = 0;
    for (int64_t a = 0; a < A; ++a) s += e[j * A + a];
    out[j] = s;
  }
}

template <bool kSurrogate, bool kShared, typename scalar_t, typename acc_t>
TRPO_ISA_CLONES Sums gaussian_tile(const GaussTiles<scalar_t, acc_t>& g, int64_t r0, int64_t r1) {
  const kl::GaussianInputs& in = g.in;
  const int64_t A = in.A;
  const int64_t n = r1 - r0;
  const scalar_t* __restrict__ mo = g.rows(in.mean_old, r0);
  const scalar_t* __restrict__ mn = g.rows(in.mean_new, r0);
  const scalar_t* __restrict__ act = kSurrogate ? g.rows(in.actions, r0) : nullptr;
  thread_local std::vector<acc_t> e_kl_buf, e_lp_buf;
  e_kl_buf.resize(n * A), e_lp_buf.resize(kSurrogate ? n * A : 0);
  acc_t* __restrict__ e_kl = e_kl_buf.data();
  acc_t* __restrict__ e_lp = e_lp_buf.data();
  for (int64_t i = 0; i < n * A; ++i) {
    const kl::GaussCol<acc_t> c = g.template col<kShared>(r0, i);
    const acc_t mean_new = static_cast<acc_t>(mn[i]);
    e_kl[i] = kl::gauss_kl(c, static_cast<acc_t>(mo[i]), mean_new);
    if (kSurrogate) e_lp[i] = kl::gauss_log_prob(c, static_cast<acc_t>(act[i]), mean_new);
  }
  acc_t kl_rows[kMaxTileRows], lp_rows[kMaxTileRows];
  const acc_t* kl_r = e_kl;  // one dimension: the elements are the rows
  const acc_t* lp_r = e_lp;
  if (A > 1) {
    row_sums(e_kl, n, A, kl_rows);
    if (kSurrogate) row_sums(e_lp, n, A, lp_rows);
    kl_r = kl_rows, lp_r = lp_rows;
  }
  if (kSurrogate) {
    const acc_t c = static_cast<acc_t>(A * kl::kHalfLog2Pi);
    for (int64_t j = 0; j < n; ++j) lp_rows[j] = lp_r[j] - c;
    lp_r = lp_rows;
  }
  const scalar_t* lp_old = kSurrogate ? in.logp_old.template data_ptr<scalar_t>() + r0 : nullptr;
  const scalar_t* adv = kSurrogate ? in.advantages.template data_ptr<scalar_t>() + r0 : nullptr;
  return tile_sums<kSurrogate>(kl_r, lp_r, lp_old, adv, n);
}

// The gradient of gk · KL + gs · surrogate w.r.t. a tile's means and per-row log_stds: the rows'
// coefficients ∂(gs · surrogate)/∂ log π_new(a) first, then one flat loop over the elements.
template <bool kShared, typename scalar_t, typename acc_t>
TRPO_ISA_CLONES void gaussian_backward_tile(const GaussTiles<scalar_t, acc_t>& g, int64_t r0,
                                            int64_t r1, acc_t gk, acc_t gs, bool surrogate,
                                            scalar_t* grad_mean, scalar_t* grad_log_std) {
  const kl::GaussianInputs& in = g.in;
  const int64_t A = in.A;
  const int64_t n = r1 - r0;
  const scalar_t* __restrict__ mo = g.rows(in.mean_old, r0);
  const scalar_t* __restrict__ mn = g.rows(in.mean_new, r0);
  const scalar_t* __restrict__ act = surrogate ? g.rows(in.actions, r0) : mn;
  thread_local std::vector<acc_t> coef_buf, e_lp_buf;
  coef_buf.assign(n * A, acc_t(0));
  acc_t* __restrict__ coef = coef_buf.data();
  if (surrogate) {
    e_lp_buf.resize(n * A);
    acc_t* __restrict__ e_lp = e_lp_buf.data();
    for (int64_t i = 0; i < n * A; ++i) {
      e_lp[i] = kl::gauss_log_prob(g.template col<kShared>(r0, i), static_cast<acc_t>(act[i]),
                                   static_cast<acc_t>(mn[i]));
    }
    acc_t lp_rows[kMaxTileRows];
    row_sums(e_lp, n, A, lp_rows);
    const scalar_t* lp_old = in.logp_old.template data_ptr<scalar_t>() + r0;
    const scalar_t* adv = in.advantages.template data_ptr<scalar_t>() + r0;
    const acc_t c = static_cast<acc_t>(A * kl::kHalfLog2Pi);
    for (int64_t j = 0; j < n; ++j) {
      lp_rows[j] = gs * kl::surrogate_term<acc_t>(lp_rows[j] - c, static_cast<acc_t>(lp_old[j]),
                                                  static_cast<acc_t>(adv[j]));
    }
    if (A == 1) {
      std::copy(lp_rows, lp_rows + n, coef);
    } else {
      for (int64_t j = 0; j < n; ++j) {
        for (int64_t a = 0; a < A; ++a) coef[j * A + a] = lp_rows[j];
      }
    }
  }
  scalar_t* __restrict__ gm = grad_mean + r0 * A;
  scalar_t* __restrict__ gl = grad_log_std + r0 * A;
  for (int64_t i = 0; i < n * A; ++i) {
    acc_t dm, dl;
    kl::gauss_grad(g.template col<kShared>(r0, i), static_cast<acc_t>(mo[i]),
                   static_cast<acc_t>(mn[i]), static_cast<acc_t>(act[i]), gk, coef[i], dm, dl);
    gm[i] = static_cast<scalar_t>(dm);
    gl[i] = static_cast<scalar_t>(dl);
  }
}

template <bool kSurrogate>
Sums gaussian_forward(const kl::GaussianInputs& in) {
  Sums total;
  AT_DISPATCH_FLOATING_TYPES(in.mean_old.scalar_type(), "kl_diag_gaussian_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const GaussTiles<scalar_t, acc_t> g(in);
    total = reduce_tiles(in.B, in.A, [&](int64_t r0, int64_t r1) {
      return g.shared ? gaussian_tile<kSurrogate, true>(g, r0, r1)
                      : gaussian_tile<kSurrogate, false>(g, r0, r1);
    });
  });
  return total;
}

at::Tensor kl_diag_gaussian_cpu(const at::Tensor& mean_old, const at::Tensor& log_std_old,
                                const at::Tensor& mean_new, const at::Tensor& log_std_new) {
  const std::optional<at::Tensor> none;
  const kl::GaussianInputs in =
      kl::check_gaussian(mean_old, log_std_old, mean_new, log_std_new, {none, none, none});
  return scalar_like(mean_old, gaussian_forward<false>(in).kl / static_cast<double>(in.B));
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
  at::Tensor grad_log_std = at::empty_like(in.mean_new);  // per row; summed below for an [A] one
  const int64_t A = in.A;
  AT_DISPATCH_FLOATING_TYPES(in.mean_old.scalar_type(), "kl_diag_gaussian_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const GaussTiles<scalar_t, acc_t> g(in);
    const acc_t gk = static_cast<acc_t>(read_scalar<scalar_t>(grad_mean_kl) / in.B);
    const acc_t gs = surrogate ? static_cast<acc_t>(read_scalar<scalar_t>(*grad_surrogate) / in.B)
                               : acc_t(0);
    scalar_t* gm = grad_mean.data_ptr<scalar_t>();
    scalar_t* gl = grad_log_std.data_ptr<scalar_t>();
    for_tiles(in.B, A, [&](int64_t r0, int64_t r1) {
      if (g.shared) {
        gaussian_backward_tile<true>(g, r0, r1, gk, gs, surrogate, gm, gl);
      } else {
        gaussian_backward_tile<false>(g, r0, r1, gk, gs, surrogate, gm, gl);
      }
    });
  });
  // A state-independent log_std's gradient sums the per-row terms over the batch.
  return {grad_mean, log_std_new.dim() == 1 ? grad_log_std.sum(0) : grad_log_std};
}

// --- categorical -------------------------------------------------------------------------------

template <typename F>
void dispatch_index(at::ScalarType t, const F& f) {
  if (t == at::kInt) {
    f(int32_t{});
  } else {
    f(int64_t{});
  }
}

// Every action is checked before any arithmetic reads the logit it names; the message names the
// first bad one.
void check_actions(const kl::CategoricalInputs& in) {
  dispatch_index(in.actions.scalar_type(), [&](auto tag) {
    using index_t = decltype(tag);
    const index_t* a = in.actions.data_ptr<index_t>();
    bool bad = false;
    for (int64_t i = 0; i < in.B; ++i) bad |= !kl::action_in_range(a[i], in.K);
    for (int64_t i = 0; bad && i < in.B; ++i) {
      TRPO_CHECK_VALUE(kl::action_in_range(a[i], in.K), "actions[", i, "] = ",
                       static_cast<int64_t>(a[i]), " is out of range for K = ", in.K,
                       " classes (valid: 0 to ", in.K - 1, ")");
    }
  });
}

// The class indices, int32 or int64 ([B]; empty without a surrogate).
struct Actions {
  const int32_t* i32 = nullptr;
  const int64_t* i64 = nullptr;
  explicit Actions(const kl::CategoricalInputs& in) {
    if (!in.surrogate) return;
    if (in.actions.scalar_type() == at::kInt) {
      i32 = in.actions.data_ptr<int32_t>();
    } else {
      i64 = in.actions.data_ptr<int64_t>();
    }
  }
  int64_t operator[](int64_t row) const { return i32 ? i32[row] : i64[row]; }
};

// One tile's per-row maxima and sums (kl.h's two passes), lanes along the rows: the tile's logits
// are copied class-major first (kept in ``to``/``tn`` for the backward).  Rows r0 .. r0 + n,
// n <= R.
template <typename acc_t>
struct CatTile {
  int64_t n = 0;
  const acc_t* to = nullptr;  // [K, R] old logits, class-major
  const acc_t* tn = nullptr;  // [K, R] new logits
  acc_t max_old[kMaxTileRows], max_new[kMaxTileRows];
  acc_t sum_old[kMaxTileRows], sum_new[kMaxTileRows], cross[kMaxTileRows];

  acc_t kl(int64_t j) const {
    return kl::cat_kl(kl::CatSums<acc_t>{sum_old[j], sum_new[j], cross[j]}, max_old[j],
                      max_new[j]);
  }
  // log Σ e^{ℓ − max} of row j.
  acc_t log_sum_old(int64_t j) const { return kl::k_log(sum_old[j]); }
  acc_t log_sum_new(int64_t j) const { return kl::k_log(sum_new[j]); }
};

template <typename scalar_t, typename acc_t>
TRPO_ISA_CLONES void cat_tile(CatTile<acc_t>& t, const scalar_t* lo, const scalar_t* ln,
                              int64_t r0, int64_t r1, int64_t K, int64_t R,
                              std::vector<acc_t>& buf) {
  const int64_t n = t.n = r1 - r0;
  buf.resize(2 * K * R);
  acc_t* to = buf.data();
  acc_t* tn = to + K * R;
  t.to = to, t.tn = tn;
  for (int64_t k = 0; k < K; ++k) {  // contiguous stores, strided loads
    for (int64_t j = 0; j < n; ++j) {
      to[k * R + j] = static_cast<acc_t>(lo[(r0 + j) * K + k]);
      tn[k * R + j] = static_cast<acc_t>(ln[(r0 + j) * K + k]);
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    t.max_old[j] = t.max_new[j] = kl::neg_inf<acc_t>();
    t.sum_old[j] = t.sum_new[j] = t.cross[j] = acc_t(0);
  }
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t j = 0; j < n; ++j) {
      t.max_old[j] = kl::cat_max(t.max_old[j], to[k * R + j]);
      t.max_new[j] = kl::cat_max(t.max_new[j], tn[k * R + j]);
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t j = 0; j < n; ++j) {
      kl::CatSums<acc_t> s{t.sum_old[j], t.sum_new[j], t.cross[j]};
      kl::cat_push(s, to[k * R + j], tn[k * R + j], t.max_old[j], t.max_new[j]);
      t.sum_old[j] = s.sum_old, t.sum_new[j] = s.sum_new, t.cross[j] = s.cross;
    }
  }
}

// The gradient of gk · KL + per-row coef · log π_new(a) w.r.t. a tile's new logits, lanes along
// the rows (class-major), then copied back row-major into g.  action[j] = −1: no surrogate.
template <typename scalar_t, typename acc_t>
TRPO_ISA_CLONES void cat_backward_tile(const CatTile<acc_t>& t, const acc_t* coef,
                                       const int64_t* action, acc_t gk, int64_t K, int64_t R,
                                       std::vector<acc_t>& buf, scalar_t* g) {
  const int64_t n = t.n;
  acc_t lso[kMaxTileRows], lsn[kMaxTileRows];
  for (int64_t j = 0; j < n; ++j) lso[j] = t.log_sum_old(j), lsn[j] = t.log_sum_new(j);
  buf.resize(K * R);
  acc_t* gt = buf.data();
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t j = 0; j < n; ++j) {
      gt[k * R + j] = kl::cat_grad<acc_t>(
          kl::k_exp(kl::cat_log_prob(t.to[k * R + j], t.max_old[j], lso[j])),
          kl::k_exp(kl::cat_log_prob(t.tn[k * R + j], t.max_new[j], lsn[j])), gk, coef[j],
          action[j] == k);
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t k = 0; k < K; ++k) g[j * K + k] = static_cast<scalar_t>(gt[k * R + j]);
  }
}

template <bool kSurrogate>
Sums categorical_forward(const kl::CategoricalInputs& in) {
  if (kSurrogate) check_actions(in);
  Sums total;
  AT_DISPATCH_FLOATING_TYPES(in.logits_old.scalar_type(), "kl_categorical_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* lo = in.logits_old.data_ptr<scalar_t>();
    const scalar_t* ln = in.logits_new.data_ptr<scalar_t>();
    const Actions actions(in);
    const int64_t K = in.K;
    const int64_t R = tile_rows(K);
    total = reduce_tiles(in.B, K, [&](int64_t r0, int64_t r1) {
      thread_local std::vector<acc_t> buf;
      CatTile<acc_t> t;
      cat_tile(t, lo, ln, r0, r1, K, R, buf);
      acc_t kl_rows[kMaxTileRows], lp_rows[kMaxTileRows];
      for (int64_t j = 0; j < t.n; ++j) kl_rows[j] = t.kl(j);
      if (kSurrogate) {
        for (int64_t j = 0; j < t.n; ++j) {
          const int64_t row = r0 + j;
          lp_rows[j] = kl::cat_log_prob(static_cast<acc_t>(ln[row * K + actions[row]]),
                                        t.max_new[j], t.log_sum_new(j));
        }
      }
      return tile_sums<kSurrogate>(
          kl_rows, lp_rows, kSurrogate ? in.logp_old.data_ptr<scalar_t>() + r0 : nullptr,
          kSurrogate ? in.advantages.data_ptr<scalar_t>() + r0 : nullptr, t.n);
    });
  });
  return total;
}

at::Tensor kl_categorical_cpu(const at::Tensor& logits_old, const at::Tensor& logits_new) {
  const std::optional<at::Tensor> none;
  const kl::CategoricalInputs in =
      kl::check_categorical(logits_old, logits_new, {none, none, none});
  return scalar_like(logits_old, categorical_forward<false>(in).kl / static_cast<double>(in.B));
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
  if (surrogate) check_actions(in);
  at::Tensor grad_logits = at::empty_like(in.logits_new);
  AT_DISPATCH_FLOATING_TYPES(in.logits_old.scalar_type(), "kl_categorical_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t gk = static_cast<acc_t>(read_scalar<scalar_t>(grad_mean_kl) / in.B);
    const acc_t gs = surrogate ? static_cast<acc_t>(read_scalar<scalar_t>(*grad_surrogate) / in.B)
                               : acc_t(0);
    const scalar_t* lo = in.logits_old.data_ptr<scalar_t>();
    const scalar_t* ln = in.logits_new.data_ptr<scalar_t>();
    scalar_t* g = grad_logits.data_ptr<scalar_t>();
    const Actions actions(in);
    const scalar_t* lp_old = surrogate ? in.logp_old.data_ptr<scalar_t>() : nullptr;
    const scalar_t* adv = surrogate ? in.advantages.data_ptr<scalar_t>() : nullptr;
    const int64_t K = in.K;
    const int64_t R = tile_rows(K);
    for_tiles(in.B, K, [&](int64_t r0, int64_t r1) {
      thread_local std::vector<acc_t> buf, grad_buf;
      CatTile<acc_t> t;
      cat_tile(t, lo, ln, r0, r1, K, R, buf);
      acc_t coef[kMaxTileRows];  // ∂(gs · surrogate)/∂ log π_new(a) per row
      int64_t action[kMaxTileRows];
      for (int64_t j = 0; j < t.n; ++j) {
        const int64_t row = r0 + j;
        action[j] = -1, coef[j] = 0;
        if (surrogate) {
          action[j] = actions[row];
          coef[j] = gs * kl::surrogate_term<acc_t>(
                             kl::cat_log_prob(static_cast<acc_t>(ln[row * K + action[j]]),
                                              t.max_new[j], t.log_sum_new(j)),
                             lp_old[row], adv[row]);
        }
      }
      cat_backward_tile(t, coef, action, gk, K, R, grad_buf, g + r0 * K);
    });
  });
  return grad_logits;
}

// --- Fisher metric products ----------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> kl_metric_diag_gaussian_cpu(const at::Tensor& log_std,
                                                               const at::Tensor& u_mean,
                                                               const at::Tensor& u_log_std) {
  const kl::MetricGaussianInputs in = kl::check_metric_gaussian(log_std, u_mean, u_log_std);
  at::Tensor m_mean = at::empty_like(in.u_mean);
  const int64_t A = in.A;
  AT_DISPATCH_FLOATING_TYPES(in.u_mean.scalar_type(), "kl_metric_diag_gaussian_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t inv_B = acc_t(1) / static_cast<acc_t>(in.B);
    const scalar_t* l = in.log_std.data_ptr<scalar_t>();
    const scalar_t* u = in.u_mean.data_ptr<scalar_t>();
    scalar_t* out = m_mean.data_ptr<scalar_t>();
    // e^{−2ℓ} / B per dimension, computed once for a state-independent log_std.
    std::vector<acc_t> w(in.per_state ? 0 : A);
    for (int64_t a = 0; a < static_cast<int64_t>(w.size()); ++a) {
      w[a] = inv_B * kl::gauss_metric_mean<acc_t>(acc_t(1), static_cast<acc_t>(l[a]));
    }
    for_tiles(in.B, A, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0 * A; i < r1 * A; ++i) {
        const acc_t ui = static_cast<acc_t>(u[i]);
        out[i] = static_cast<scalar_t>(
            in.per_state ? inv_B * kl::gauss_metric_mean<acc_t>(ui, static_cast<acc_t>(l[i]))
                         : ui * w[i % A]);
      }
    });
  });
  // A state-independent log_std is shared by the B elements: B · (2 / B) = 2.
  const double scale = kl::kGaussMetricLogStd / (in.per_state ? static_cast<double>(in.B) : 1.0);
  return {m_mean, in.u_log_std * scale};
}

// Rows [r0, r1) of M u = p ⊙ (u − pᵀu) / B; e: scratch for one row's e^{ℓ − max}.
template <typename scalar_t, typename acc_t>
TRPO_ISA_CLONES void cat_metric_rows(const scalar_t* l, const scalar_t* u, scalar_t* out,
                                     int64_t r0, int64_t r1, int64_t K, acc_t inv_B, acc_t* e) {
  for (int64_t row = r0; row < r1; ++row) {
    const scalar_t* lr = l + row * K;
    const scalar_t* ur = u + row * K;
    acc_t mx = kl::neg_inf<acc_t>();
    for (int64_t k = 0; k < K; ++k) mx = kl::cat_max(mx, static_cast<acc_t>(lr[k]));
    // A −inf logit has p = 0 (and a row of only −inf logits is no distribution: NaN).
    acc_t sum = 0, pu = 0;
#pragma omp simd reduction(+ : sum, pu)
    for (int64_t k = 0; k < K; ++k) {
      e[k] = kl::k_exp(static_cast<acc_t>(lr[k]) - mx);
      sum += e[k];
      pu += e[k] * static_cast<acc_t>(ur[k]);
    }
    pu /= sum;
    for (int64_t k = 0; k < K; ++k) {
      out[row * K + k] = static_cast<scalar_t>(
          inv_B * kl::cat_metric<acc_t>(e[k] / sum, static_cast<acc_t>(ur[k]), pu));
    }
  }
}

at::Tensor kl_metric_categorical_cpu(const at::Tensor& logits, const at::Tensor& u) {
  const kl::MetricCategoricalInputs in = kl::check_metric_categorical(logits, u);
  at::Tensor out = at::empty_like(in.u);
  AT_DISPATCH_FLOATING_TYPES(in.logits.scalar_type(), "kl_metric_categorical_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t inv_B = acc_t(1) / static_cast<acc_t>(in.B);
    for_tiles(in.B, in.K, [&](int64_t r0, int64_t r1) {
      thread_local std::vector<acc_t> e;
      e.resize(in.K);
      cat_metric_rows(in.logits.data_ptr<scalar_t>(), in.u.data_ptr<scalar_t>(),
                      out.data_ptr<scalar_t>(), r0, r1, in.K, inv_B, e.data());
    });
  });
  return out;
}

}  // namespace

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
