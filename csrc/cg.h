// Conjugate gradient for (A + damping·I) x = b: the solver state, the scalar math that both backends
// run, the per-element math of the fused vector steps, and the input checks.
//
// One CG iteration, with p the search direction and Ap = matvec(p) supplied by the caller:
//   pAp   = pᵀ(Ap + damping·p)                      curvature pass  (reduction)
//   alpha = rᵀr / pAp
//   r'    = r − alpha·(Ap + damping·p),  r'ᵀr'       residual pass   (reduction; r' not stored)
//   beta  = r'ᵀr' / rᵀr
//   x += alpha·p,  r = r',  p = r' + beta·p          update pass     (elementwise)
// The residual pass only measures the candidate r'; the update pass recomputes it with the same
// inline function and commits x, r and p together.  So an iteration whose r'ᵀr' is not finite leaves
// x, r and p as they were: the solver stops with the last good x, and r stays b − (A + damping·I)x,
// which keeps xᵀ(b − r) equal to xᵀ(A + damping·I)x.
//
// Every scalar lives in a small float64 `state` tensor on the vectors' device, so a CUDA solve needs
// no host read inside its loop.  Each pass first reads the status from `state` and does nothing once
// the solve has stopped (converged or broken down): extra iterations leave x exactly as an exact stop
// would, which is what lets the host poll for convergence only every few iterations.
#pragma once

#include <cmath>
#include <tuple>

#include "common.h"

namespace trpo_ext {
namespace cg {

// Slots of the float64 state tensor.
enum Slot : int64_t {
  kRR = 0,        // rᵀr of the committed residual
  kPAP = 1,       // pᵀ(A + damping·I)p of the last accepted iteration
  kAlpha = 2,     // step length of the iteration in flight
  kBeta = 3,      // direction update of the iteration in flight
  kTol2 = 4,      // squared stopping threshold, max(rtol·‖b‖, atol)²
  kStatus = 5,    // Status below
  kIters = 6,     // iterations committed
  kApply = 7,     // 1 when the update pass must commit the iteration in flight
  kXAx = 8,       // xᵀ(b − r) = xᵀ(A + damping·I)x, written by the finish pass
  kBNorm2 = 9,    // bᵀb
  kCounter = 10,  // CUDA: blocks finished in the current reduction (an unsigned int in this slot)
  kNumScalars = 16,
};

// Per-block partial sums of the CUDA reductions follow the scalars (two per block).
constexpr int64_t kMaxBlocks = 1024;
constexpr int64_t kPartials = kNumScalars;
constexpr int64_t kStateSize = kNumScalars + 2 * kMaxBlocks;

// Values of state[kStatus].  A solve still running after maxiter iterations reports "maxiter".
// (Plain ints rather than an enum: they are compared with the float64 state.)
constexpr int kRunning = 0;
constexpr int kConverged = 1;
constexpr int kNonpositiveCurvature = 2;
constexpr int kNonfinite = 3;

// No std::isfinite on the device and no fast math anywhere: inf − inf and NaN − NaN are NaN.
TRPO_HD bool is_finite(double v) { return v - v == 0.0; }

// --- scalar steps, run once per pass (by the CPU thread, or by the last CUDA block to finish) -----

// After the start: rr = rᵀr with r = b − (A + damping·I)x0 (or b), bb = bᵀb.
TRPO_HD void finish_init(double* s, double rr, double bb, double rtol, double atol) {
  const double bnorm = sqrt(bb);
  const double tol = rtol * bnorm > atol ? rtol * bnorm : atol;
  for (int i = 0; i < kNumScalars; ++i) s[i] = 0.0;
  s[kRR] = rr;
  s[kBNorm2] = bb;
  s[kTol2] = tol * tol;
  // A zero residual is an exact solution even when both tolerances are zero.
  s[kStatus] = !is_finite(rr) ? kNonfinite : (rr <= tol * tol ? kConverged : kRunning);
}

// After the curvature pass.  Breakdown leaves the committed state (x, r, rᵀr) untouched.
TRPO_HD void finish_curvature(double* s, double pAp) {
  if (!is_finite(pAp)) {
    s[kStatus] = kNonfinite;
  } else if (pAp <= 0.0) {
    s[kStatus] = kNonpositiveCurvature;
  } else {
    const double alpha = s[kRR] / pAp;
    if (!is_finite(alpha)) {
      s[kStatus] = kNonfinite;
    } else {
      s[kPAP] = pAp;
      s[kAlpha] = alpha;
    }
  }
}

// After the residual pass: accept the candidate residual (the update pass then commits it) unless
// it is not finite.
TRPO_HD void finish_residual(double* s, double rr_new) {
  if (!is_finite(rr_new)) {
    s[kStatus] = kNonfinite;
    return;
  }
  s[kBeta] = rr_new / s[kRR];
  s[kRR] = rr_new;
  s[kIters] += 1.0;
  s[kApply] = 1.0;
  if (rr_new <= s[kTol2]) s[kStatus] = kConverged;
}

// --- per-element math, shared by the passes that must agree bit for bit ---------------------------

template <typename acc_t>
TRPO_HD acc_t damped(acc_t Ap, acc_t p, acc_t damping) {
  return Ap + damping * p;
}

template <typename acc_t>
TRPO_HD acc_t residual_candidate(acc_t r, acc_t Ap, acc_t p, acc_t alpha, acc_t damping) {
  return r - alpha * damped(Ap, p, damping);
}

// --- input checks, shared by both backends ---------------------------------------------------------

inline void check_rhs(const at::Tensor& b) {
  check_float_tensor(b, "b");
  TRPO_CHECK_VALUE(b.dim() == 1, "b must be a 1-D tensor, got shape ", shape_str(b));
}

// A vector that must match b in dtype, device and shape.
inline void check_vector(const at::Tensor& b, const at::Tensor& v, const char* name) {
  TRPO_CHECK_TYPE(v.defined(), name, " must be a tensor");
  check_same_dtype(b, "b", v, name);
  check_same_device(b, "b", v, name);
  check_same_shape(b, "b", v, name);
}

// A solver buffer that the passes update in place.
inline void check_buffer(const at::Tensor& b, const at::Tensor& v, const char* name) {
  check_vector(b, v, name);
  TRPO_CHECK_VALUE(v.is_contiguous(), name, " must be contiguous");
}

inline void check_state(const at::Tensor& b, const at::Tensor& state) {
  TRPO_CHECK_TYPE(state.defined() && state.scalar_type() == at::kDouble,
                  "state must be a float64 tensor made by cg_init");
  check_same_device(b, "b", state, "state");
  TRPO_CHECK_VALUE(state.dim() == 1 && state.size(0) == kStateSize && state.is_contiguous(),
                   "state must be a contiguous [", kStateSize, "] tensor made by cg_init, got ",
                   shape_str(state));
}

inline void check_scalar(double v, const char* name) {
  TRPO_CHECK_VALUE(v >= 0.0 && std::isfinite(v), name, " must be a finite number >= 0, got ", v);
}

inline void check_init(const at::Tensor& b, const c10::optional<at::Tensor>& x0,
                       const c10::optional<at::Tensor>& Ax0, double damping, double rtol,
                       double atol) {
  check_rhs(b);
  check_scalar(damping, "damping");
  check_scalar(rtol, "rtol");
  check_scalar(atol, "atol");
  TRPO_CHECK_VALUE(x0.has_value() == Ax0.has_value(),
                   "cg_init needs both x0 and matvec(x0), or neither");
  if (x0.has_value()) {
    check_vector(b, *x0, "x0");
    check_vector(b, *Ax0, "matvec(x0)");
  }
}

inline void check_step(const at::Tensor& x, const at::Tensor& r, const at::Tensor& p,
                       const at::Tensor& Ap, const at::Tensor& state, double damping) {
  check_rhs(r);
  check_buffer(r, x, "x");
  check_buffer(r, p, "p");
  check_vector(r, Ap, "matvec(p)");
  check_state(r, state);
  check_scalar(damping, "damping");
}

inline void check_finish(const at::Tensor& b, const at::Tensor& x, const at::Tensor& r,
                         const at::Tensor& state) {
  check_rhs(b);
  check_buffer(b, x, "x");
  check_buffer(b, r, "r");
  check_state(b, state);
}

// --- backend entry points ----------------------------------------------------------------------
// The ops registered with the dispatcher (csrc/ops.cpp) call these; the C++ embedding
// (include/trpo_ext/cg.h) calls them directly, since it is also built without the op registry.

// Returns (r, p, state) for the start x0 (zero when x0 is absent).
std::tuple<at::Tensor, at::Tensor, at::Tensor> init_cpu(const at::Tensor& b,
                                                        const c10::optional<at::Tensor>& x0,
                                                        const c10::optional<at::Tensor>& Ax0,
                                                        double damping, double rtol, double atol);
void step_cpu(const at::Tensor& x, const at::Tensor& r, const at::Tensor& p, const at::Tensor& Ap,
              const at::Tensor& state, double damping);
// Returns xᵀ(b − r) as a 0-d tensor of b's dtype, and stores it in state[kXAx].
at::Tensor finish_cpu(const at::Tensor& b, const at::Tensor& x, const at::Tensor& r,
                      const at::Tensor& state);

#ifdef TRPO_EXT_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> init_cuda(const at::Tensor& b,
                                                         const c10::optional<at::Tensor>& x0,
                                                         const c10::optional<at::Tensor>& Ax0,
                                                         double damping, double rtol, double atol);
void step_cuda(const at::Tensor& x, const at::Tensor& r, const at::Tensor& p, const at::Tensor& Ap,
               const at::Tensor& state, double damping);
at::Tensor finish_cuda(const at::Tensor& b, const at::Tensor& x, const at::Tensor& r,
                       const at::Tensor& state);
#endif

}  // namespace cg
}  // namespace trpo_ext
