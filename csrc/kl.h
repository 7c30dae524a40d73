// KL(π_old ‖ π_new), the TRPO surrogate and the Fisher metric for diagonal-Gaussian and categorical
// policies: the per-element math that the CPU and CUDA kernels share (one formula per
// distribution), and the input checks both backends run.
//
// Diagonal Gaussian, per action dimension (μ means, ℓ = log σ):
//   KL = ℓ_new − ℓ_old + (σ_old² + (μ_old − μ_new)²) / (2 σ_new²) − ½
//      = ½ (eˣ − 1 − x) + ½ z²,   x = 2 (ℓ_old − ℓ_new),  z = (μ_old − μ_new) e^{−ℓ_new}
// The second form keeps the KL of nearby distributions (the line search's regime, KL ~ 1e-3) free of
// the cancellation in "var_ratio − 1 − log var_ratio".  The terms that depend on the log_stds only
// ("columns": ½ (eˣ − 1 − x), −expm1(x), e^{−ℓ_new}) are computed once per dimension when log_std
// is state-independent.
//   log π_new(a) = Σ_a [ −½ ((a − μ_new) e^{−ℓ_new})² − ℓ_new − ½ log 2π ]
// Categorical (logits ℓ, K classes), one row in two passes: the maxima m, then
//   s = Σ_k e^{ℓ_k − m} (old and new) and c = Σ_k e^{ℓ_old,k − m_old} (ℓ_old,k − ℓ_new,k), and
//   KL = c / s_old + (m_new − m_old) + (log s_new − log s_old),
// so large logits never overflow and identical rows give exactly 0.
//
// Batch sums (mean KL, surrogate) accumulate in double for both dtypes: with float32 and B = 1e6 a
// float32 running sum loses several digits.  Per-element math runs in at::opmath_type<scalar_t>.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>

#include "common.h"

namespace trpo_ext {
namespace kl {

constexpr double kHalfLog2Pi = 0.91893853320467274178;

template <typename T>
TRPO_HD T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// e^x for float on the host: Cody–Waite reduction x = n ln2 + r, |r| <= ln2/2, and Cephes' degree-5
// polynomial for e^r (about 1e-7 relative); 2ⁿ built in the exponent bits.  Written branch-free so
// that the compiler inlines and vectorises the categorical loops (libm's expf is an opaque call
// there, which measured about twice as slow per element).  Below −87 it gives 0, above 88 +inf,
// NaN stays NaN.  The device uses CUDA's expf.
#if defined(__GNUC__)
__attribute__((always_inline))  // an out-of-line call would stop the loop's vectorisation
#endif
inline float host_expf(float x) {
  const float magic = 12582912.0f;  // 1.5·2²³: adding it rounds to an integer in the low bits
  const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);  // NaN passes through
  const float kn = xc * 1.44269504088896341f + magic;
  int32_t ki, mi;
  std::memcpy(&ki, &kn, sizeof ki);
  std::memcpy(&mi, &magic, sizeof mi);
  const float fn = kn - magic;
  const float r = (xc - fn * 0.693359375f) + fn * 2.12194440e-4f;  // ln2 as head + tail
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (ki - mi + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  const float y = p * scale;
  return x < -87.0f ? 0.0f : (x > 88.0f ? std::numeric_limits<float>::infinity() : y);
}

// Overloads so the same expression picks the float or double function on both sides.
#if defined(__CUDA_ARCH__)
TRPO_HD float k_exp(float x) { return ::expf(x); }
#else
TRPO_HD float k_exp(float x) { return host_expf(x); }
#endif
TRPO_HD double k_exp(double x) { return ::exp(x); }
TRPO_HD float k_expm1(float x) { return ::expm1f(x); }
TRPO_HD double k_expm1(double x) { return ::expm1(x); }
TRPO_HD float k_log(float x) { return ::logf(x); }
TRPO_HD double k_log(double x) { return ::log(x); }
TRPO_HD float k_abs(float x) { return ::fabsf(x); }
TRPO_HD double k_abs(double x) { return ::fabs(x); }

// max that propagates NaN from either side, like torch.max.
template <typename T>
TRPO_HD T nan_max(T a, T b) {
  return (a > b || a != a) ? a : b;
}

// eˣ − 1 − x without cancellation near 0 (where it is ≈ x²/2): a Taylor series for |x| < 1/4,
// expm1 beyond.  Eleven terms put the truncation error below 1e-17 relative for double.
template <typename acc_t>
TRPO_HD acc_t expm1_minus_x(acc_t x) {
  if (k_abs(x) < acc_t(0.25)) {
    acc_t s = acc_t(1) / acc_t(479001600);  // x²/2! + ... + x¹²/12!, Horner from the top
    const acc_t inv_fact[] = {acc_t(1) / acc_t(39916800), acc_t(1) / acc_t(3628800),
                              acc_t(1) / acc_t(362880),   acc_t(1) / acc_t(40320),
                              acc_t(1) / acc_t(5040),     acc_t(1) / acc_t(720),
                              acc_t(1) / acc_t(120),      acc_t(1) / acc_t(24),
                              acc_t(1) / acc_t(6),        acc_t(1) / acc_t(2)};
    for (acc_t c : inv_fact) s = c + x * s;
    return x * x * s;
  }
  return k_expm1(x) - x;
}

// --- diagonal Gaussian -------------------------------------------------------------------------

// The terms of one dimension that depend on the log_stds only.
template <typename acc_t>
struct GaussCol {
  acc_t kl_scale;    // ½ (eˣ − 1 − x): the KL's variance part
  acc_t grad_scale;  // −expm1(x) = 1 − σ_old²/σ_new²: the variance part of ∂KL/∂ℓ_new
  acc_t inv_std;     // 1/σ_new
  acc_t log_std;     // ℓ_new
};

template <typename acc_t>
TRPO_HD GaussCol<acc_t> gauss_col(acc_t log_std_old, acc_t log_std_new) {
  const acc_t x = acc_t(2) * (log_std_old - log_std_new);
  return {acc_t(0.5) * expm1_minus_x(x), -k_expm1(x), k_exp(-log_std_new), log_std_new};
}

// KL of one dimension.  Scaling by 1/σ_new before squaring keeps z² finite for tiny σ_new.
template <typename acc_t>
TRPO_HD acc_t gauss_kl(const GaussCol<acc_t>& c, acc_t mean_old, acc_t mean_new) {
  const acc_t z = (mean_old - mean_new) * c.inv_std;
  return c.kl_scale + acc_t(0.5) * z * z;
}

// log N(a; μ_new, σ_new²) of one dimension without the −½ log 2π constant (added once per row).
template <typename acc_t>
TRPO_HD acc_t gauss_log_prob(const GaussCol<acc_t>& c, acc_t action, acc_t mean_new) {
  const acc_t z = (action - mean_new) * c.inv_std;
  return acc_t(-0.5) * z * z - c.log_std;
}

// ∂/∂μ_new and ∂/∂ℓ_new of grad_kl · KL + coef · log π_new(a), one dimension.
template <typename acc_t>
TRPO_HD void gauss_grad(const GaussCol<acc_t>& c, acc_t mean_old, acc_t mean_new, acc_t action,
                        acc_t grad_kl, acc_t coef, acc_t& d_mean, acc_t& d_log_std) {
  const acc_t z = (mean_old - mean_new) * c.inv_std;
  const acc_t za = (action - mean_new) * c.inv_std;
  d_mean = -grad_kl * z * c.inv_std + coef * za * c.inv_std;
  d_log_std = grad_kl * (c.grad_scale - z * z) + coef * (za * za - acc_t(1));
}

// --- categorical -------------------------------------------------------------------------------

// One row's running sums for the maxima m_old, m_new of its logits (the second pass).
template <typename acc_t>
struct CatSums {
  acc_t sum_old;  // Σ e^{ℓ_old − m_old}
  acc_t sum_new;  // Σ e^{ℓ_new − m_new}
  acc_t cross;    // Σ e^{ℓ_old − m_old} (ℓ_old − ℓ_new)
};

// First pass: m = max(m, ℓ).  A NaN logit is skipped here but makes the sums NaN.
template <typename acc_t>
TRPO_HD acc_t cat_max(acc_t m, acc_t logit) {
  return logit > m ? logit : m;
}

// Second pass, one class.  A class at −inf (masked) in the old policy adds nothing: not
// 0 · (−inf − ℓ_new) = NaN to the cross term (torch.distributions agrees).
template <typename acc_t>
TRPO_HD void cat_push(CatSums<acc_t>& s, acc_t logit_old, acc_t logit_new, acc_t max_old,
                      acc_t max_new) {
  const acc_t e = k_exp(logit_old - max_old);
  s.sum_old += e;
  s.sum_new += k_exp(logit_new - max_new);
  s.cross += e == acc_t(0) ? acc_t(0) : e * (logit_old - logit_new);
}

// KL of a finished row.  Identical rows give exactly 0 (the same operations on the same values).
template <typename acc_t>
TRPO_HD acc_t cat_kl(const CatSums<acc_t>& s, acc_t max_old, acc_t max_new) {
  return s.cross / s.sum_old + (max_new - max_old) + (k_log(s.sum_new) - k_log(s.sum_old));
}

// log p of a class from its logit and its row's maximum and log Σ e^{ℓ − max}: (ℓ − max) is exact
// for nearby logits, where ℓ − (max + log Σ) would round at the logits' scale.
template <typename acc_t>
TRPO_HD acc_t cat_log_prob(acc_t logit, acc_t max, acc_t log_sum) {
  return (logit - max) - log_sum;
}

// ∂/∂ℓ_new,k of grad_kl · KL + coef · log π_new(a), given p_old,k and p_new,k:
//   grad_kl (p_new,k − p_old,k) + coef ([k = a] − p_new,k).
template <typename acc_t>
TRPO_HD acc_t cat_grad(acc_t p_old, acc_t p_new, acc_t grad_kl, acc_t coef, bool is_action) {
  return grad_kl * (p_new - p_old) + coef * ((is_action ? acc_t(1) : acc_t(0)) - p_new);
}

// Class indices outside [0, K) are refused on the CPU; on the GPU (no host synchronisation) the
// row's log-probability becomes NaN instead, which poisons the surrogate and its gradient.
template <typename index_t>
TRPO_HD bool action_in_range(index_t a, int64_t K) {
  return a >= 0 && static_cast<int64_t>(a) < K;
}

// exp(log π_new(a) − logp_old) · A: one row's surrogate term.
template <typename acc_t>
TRPO_HD acc_t surrogate_term(acc_t logp_new, acc_t logp_old, acc_t advantage) {
  return k_exp(logp_new - logp_old) * advantage;
}

// Batch partial sums: Σ KL, Σ surrogate terms (double, see the file comment) and max KL.
struct Sums {
  double kl;
  double surrogate;
  double max_kl;
};

TRPO_HD Sums sums_empty() { return {0.0, 0.0, neg_inf<double>()}; }

TRPO_HD Sums sums_merge(const Sums& a, const Sums& b) {
  return {a.kl + b.kl, a.surrogate + b.surrogate, nan_max(a.max_kl, b.max_kl)};
}

// --- Fisher metric: the Hessian of the batch-mean KL(old ‖ new) at new = old ----------------------
// Per batch element (the batch mean adds a factor 1/B):
//   Gaussian:    ∂²KL/∂μ_new² = e^{−2ℓ} per dimension, ∂²KL/∂ℓ_new² = 2, no cross term;
//   categorical: ∂²KL/∂ℓ_new∂ℓ_newᵀ = diag(p) − p pᵀ (p = softmax of the logits), so
//                M u = p ⊙ (u − pᵀu).

template <typename acc_t>
TRPO_HD acc_t gauss_metric_mean(acc_t u, acc_t log_std) {
  return u * k_exp(acc_t(-2) * log_std);
}

constexpr double kGaussMetricLogStd = 2.0;

template <typename acc_t>
TRPO_HD acc_t cat_metric(acc_t p, acc_t u, acc_t p_dot_u) {
  return p * (u - p_dot_u);
}

// --- input checks (both backends) ---------------------------------------------------------------

// Optional surrogate inputs: actions, logp_old, advantages.
struct SurrogateArgs {
  const std::optional<at::Tensor>& actions;
  const std::optional<at::Tensor>& logp_old;
  const std::optional<at::Tensor>& advantages;
};

struct GaussianInputs {
  at::Tensor mean_old, log_std_old, mean_new, log_std_new;  // [B, A], [A] | [B, A], ...
  at::Tensor actions, logp_old, advantages;                 // [B, A], [B], [B] (surrogate only)
  int64_t B = 0;
  int64_t A = 0;
  int64_t log_std_old_row_stride = 0;  // 0 for a state-independent [A] log_std, else A
  int64_t log_std_new_row_stride = 0;
  bool surrogate = false;
};

struct CategoricalInputs {
  at::Tensor logits_old, logits_new;        // [B, K]
  at::Tensor actions, logp_old, advantages;  // [B] int64|int32, [B], [B] (surrogate only)
  int64_t B = 0;
  int64_t K = 0;
  bool surrogate = false;
};

inline void check_batch_nonempty(int64_t B, const at::Tensor& t, const char* name) {
  TRPO_CHECK_VALUE(B > 0, name, " has an empty batch (shape ", shape_str(t),
                   "): the batch mean of an empty batch is undefined");
}

inline void check_log_std(const at::Tensor& log_std, const char* name, const at::Tensor& mean,
                          const char* mean_name) {
  check_float_tensor(log_std, name);
  const int64_t B = mean.size(0);
  const int64_t A = mean.size(1);
  const bool state_independent = log_std.dim() == 1 && log_std.size(0) == A;
  const bool per_state = log_std.dim() == 2 && log_std.size(0) == B && log_std.size(1) == A;
  TRPO_CHECK_VALUE(state_independent || per_state, name, " must be [A] = [", A, "] or [B, A] = [",
                   B, ", ", A, "] to match ", mean_name, " ", shape_str(mean), ", got ",
                   shape_str(log_std));
  check_same_dtype(mean, mean_name, log_std, name);
  check_same_device(mean, mean_name, log_std, name);
}

inline void check_batch_vector(const at::Tensor& t, const char* name, const at::Tensor& ref,
                               const char* ref_name) {
  check_float_tensor(t, name);
  TRPO_CHECK_VALUE(t.dim() == 1 && t.size(0) == ref.size(0), name, " must be [B] = [",
                   ref.size(0), "] (the batch of ", ref_name, " ", shape_str(ref), "), got ",
                   shape_str(t));
  check_same_dtype(ref, ref_name, t, name);
  check_same_device(ref, ref_name, t, name);
}

inline bool check_surrogate_presence(const SurrogateArgs& s) {
  const int given = int(s.actions.has_value()) + int(s.logp_old.has_value()) +
                    int(s.advantages.has_value());
  TRPO_CHECK_VALUE(given == 0 || given == 3,
                   "actions, logp_old and advantages must be given together or not at all");
  return given == 3;
}

inline GaussianInputs check_gaussian(const at::Tensor& mean_old, const at::Tensor& log_std_old,
                                     const at::Tensor& mean_new, const at::Tensor& log_std_new,
                                     const SurrogateArgs& s) {
  check_float_tensor(mean_old, "mean_old");
  TRPO_CHECK_VALUE(mean_old.dim() == 2, "mean_old must be [B, A], got shape ", shape_str(mean_old));
  check_float_tensor(mean_new, "mean_new");
  check_same_shape(mean_old, "mean_old", mean_new, "mean_new");
  check_same_dtype(mean_old, "mean_old", mean_new, "mean_new");
  check_same_device(mean_old, "mean_old", mean_new, "mean_new");
  check_log_std(log_std_old, "log_std_old", mean_old, "mean_old");
  check_log_std(log_std_new, "log_std_new", mean_old, "mean_old");
  check_batch_nonempty(mean_old.size(0), mean_old, "mean_old");
  TRPO_CHECK_VALUE(mean_old.size(1) > 0, "mean_old has no action dimensions (shape ",
                   shape_str(mean_old), ")");
  GaussianInputs in;
  in.B = mean_old.size(0);
  in.A = mean_old.size(1);
  in.mean_old = mean_old.contiguous();
  in.mean_new = mean_new.contiguous();
  in.log_std_old = log_std_old.contiguous();
  in.log_std_new = log_std_new.contiguous();
  in.log_std_old_row_stride = log_std_old.dim() == 2 ? in.A : 0;
  in.log_std_new_row_stride = log_std_new.dim() == 2 ? in.A : 0;
  in.surrogate = check_surrogate_presence(s);
  if (in.surrogate) {
    const at::Tensor& actions = *s.actions;
    check_float_tensor(actions, "actions");
    check_same_shape(mean_old, "mean_old", actions, "actions");
    check_same_dtype(mean_old, "mean_old", actions, "actions");
    check_same_device(mean_old, "mean_old", actions, "actions");
    check_batch_vector(*s.logp_old, "logp_old", mean_old, "mean_old");
    check_batch_vector(*s.advantages, "advantages", mean_old, "mean_old");
    in.actions = actions.contiguous();
    in.logp_old = s.logp_old->contiguous();
    in.advantages = s.advantages->contiguous();
  }
  return in;
}

inline CategoricalInputs check_categorical(const at::Tensor& logits_old,
                                           const at::Tensor& logits_new, const SurrogateArgs& s) {
  check_float_tensor(logits_old, "logits_old");
  TRPO_CHECK_VALUE(logits_old.dim() == 2, "logits_old must be [B, K], got shape ",
                   shape_str(logits_old));
  check_float_tensor(logits_new, "logits_new");
  check_same_shape(logits_old, "logits_old", logits_new, "logits_new");
  check_same_dtype(logits_old, "logits_old", logits_new, "logits_new");
  check_same_device(logits_old, "logits_old", logits_new, "logits_new");
  check_batch_nonempty(logits_old.size(0), logits_old, "logits_old");
  TRPO_CHECK_VALUE(logits_old.size(1) > 0, "logits_old has no classes (shape ",
                   shape_str(logits_old), ")");
  CategoricalInputs in;
  in.B = logits_old.size(0);
  in.K = logits_old.size(1);
  in.logits_old = logits_old.contiguous();
  in.logits_new = logits_new.contiguous();
  in.surrogate = check_surrogate_presence(s);
  if (in.surrogate) {
    const at::Tensor& actions = *s.actions;
    TRPO_CHECK_TYPE(actions.defined(), "actions must be a tensor");
    TRPO_CHECK_TYPE(actions.scalar_type() == at::kLong || actions.scalar_type() == at::kInt,
                    "actions must be int64 or int32 class indices, got ", actions.scalar_type());
    TRPO_CHECK_VALUE(actions.dim() == 1 && actions.size(0) == in.B, "actions must be [B] = [",
                     in.B, "] (the batch of logits_old ", shape_str(logits_old), "), got ",
                     shape_str(actions));
    check_same_device(logits_old, "logits_old", actions, "actions");
    check_batch_vector(*s.logp_old, "logp_old", logits_old, "logits_old");
    check_batch_vector(*s.advantages, "advantages", logits_old, "logits_old");
    in.actions = actions.contiguous();
    in.logp_old = s.logp_old->contiguous();
    in.advantages = s.advantages->contiguous();
  }
  return in;
}

// The metric ops' inputs, checked and made contiguous once for both backends.
struct MetricGaussianInputs {
  at::Tensor log_std, u_mean, u_log_std;  // [A] or [B, A], [B, A], like log_std
  int64_t B = 0;
  int64_t A = 0;
  bool per_state = false;  // log_std is [B, A]
};

inline MetricGaussianInputs check_metric_gaussian(const at::Tensor& log_std,
                                                  const at::Tensor& u_mean,
                                                  const at::Tensor& u_log_std) {
  check_float_tensor(u_mean, "u_mean");
  TRPO_CHECK_VALUE(u_mean.dim() == 2, "u_mean must be [B, A], got shape ", shape_str(u_mean));
  check_batch_nonempty(u_mean.size(0), u_mean, "u_mean");
  check_log_std(log_std, "log_std", u_mean, "u_mean");
  check_float_tensor(u_log_std, "u_log_std");
  check_same_shape(log_std, "log_std", u_log_std, "u_log_std");
  check_same_dtype(log_std, "log_std", u_log_std, "u_log_std");
  check_same_device(log_std, "log_std", u_log_std, "u_log_std");
  MetricGaussianInputs in;
  in.log_std = log_std.contiguous();
  in.u_mean = u_mean.contiguous();
  in.u_log_std = u_log_std.contiguous();
  in.B = u_mean.size(0);
  in.A = u_mean.size(1);
  in.per_state = log_std.dim() == 2;
  return in;
}

struct MetricCategoricalInputs {
  at::Tensor logits, u;  // [B, K]
  int64_t B = 0;
  int64_t K = 0;
};

inline MetricCategoricalInputs check_metric_categorical(const at::Tensor& logits,
                                                        const at::Tensor& u) {
  check_float_tensor(logits, "logits");
  TRPO_CHECK_VALUE(logits.dim() == 2, "logits must be [B, K], got shape ", shape_str(logits));
  check_batch_nonempty(logits.size(0), logits, "logits");
  TRPO_CHECK_VALUE(logits.size(1) > 0, "logits has no classes (shape ", shape_str(logits), ")");
  check_float_tensor(u, "u");
  check_same_shape(logits, "logits", u, "u");
  check_same_dtype(logits, "logits", u, "u");
  check_same_device(logits, "logits", u, "u");
  MetricCategoricalInputs in;
  in.logits = logits.contiguous();
  in.u = u.contiguous();
  in.B = logits.size(0);
  in.K = logits.size(1);
  return in;
}

// Upstream gradients of the backward ops: 0-d tensors of the inputs' dtype and device, read by the
// kernels on the device (never copied to the host).
inline void check_grad_scalar(const at::Tensor& g, const char* name, const at::Tensor& ref,
                              const char* ref_name) {
  check_float_tensor(g, name);
  TRPO_CHECK_VALUE(g.numel() == 1, name, " must hold one value, got shape ", shape_str(g));
  check_same_dtype(ref, ref_name, g, name);
  check_same_device(ref, ref_name, g, name);
}

// The checks of the backward ops, shared by both backends: the forward's checks (with the surrogate
// inputs only when grad_surrogate is given) plus the upstream gradients.
inline GaussianInputs check_gaussian_backward(
    const at::Tensor& grad_mean_kl, const std::optional<at::Tensor>& grad_surrogate,
    const at::Tensor& mean_old, const at::Tensor& log_std_old, const at::Tensor& mean_new,
    const at::Tensor& log_std_new, const std::optional<at::Tensor>& actions,
    const std::optional<at::Tensor>& logp_old, const std::optional<at::Tensor>& advantages) {
  const std::optional<at::Tensor> none;
  const bool surrogate = grad_surrogate.has_value();
  GaussianInputs in =
      surrogate ? check_gaussian(mean_old, log_std_old, mean_new, log_std_new,
                                 {actions, logp_old, advantages})
                : check_gaussian(mean_old, log_std_old, mean_new, log_std_new, {none, none, none});
  TRPO_CHECK_VALUE(!surrogate || in.surrogate,
                   "grad_surrogate needs actions, logp_old and advantages");
  check_grad_scalar(grad_mean_kl, "grad_mean_kl", mean_old, "mean_old");
  if (surrogate) check_grad_scalar(*grad_surrogate, "grad_surrogate", mean_old, "mean_old");
  return in;
}

inline CategoricalInputs check_categorical_backward(
    const at::Tensor& grad_mean_kl, const std::optional<at::Tensor>& grad_surrogate,
    const at::Tensor& logits_old, const at::Tensor& logits_new,
    const std::optional<at::Tensor>& actions, const std::optional<at::Tensor>& logp_old,
    const std::optional<at::Tensor>& advantages) {
  const std::optional<at::Tensor> none;
  const bool surrogate = grad_surrogate.has_value();
  CategoricalInputs in =
      surrogate ? check_categorical(logits_old, logits_new, {actions, logp_old, advantages})
                : check_categorical(logits_old, logits_new, {none, none, none});
  TRPO_CHECK_VALUE(!surrogate || in.surrogate,
                   "grad_surrogate needs actions, logp_old and advantages");
  check_grad_scalar(grad_mean_kl, "grad_mean_kl", logits_old, "logits_old");
  if (surrogate) check_grad_scalar(*grad_surrogate, "grad_surrogate", logits_old, "logits_old");
  return in;
}

}  // namespace kl
}  // namespace trpo_ext
