// The C++ embedding of the CG solver (include/trpo_ext/cg.h): trpo_ext/cg.py's `_solve` written in
// C++ (a C++ matvec cannot be a Python callable), calling the same kernels in the same order — the
// cg_init / cg_step / cg_finish implementations the ops register — with the same stopping and
// polling rules.  This file is compiled into the Python extension (so CI builds it) and into the
// standalone CMake library, which has no op registry to dispatch through: that is why it picks the
// backend from b's device itself.
#include "trpo_ext/cg.h"

#include <c10/util/Exception.h>

#include "cg.h"

namespace trpo_ext {

const char* to_string(CGStatus status) {
  switch (status) {
    case CGStatus::kConverged:
      return "converged";
    case CGStatus::kMaxIter:
      return "maxiter";
    case CGStatus::kNonpositiveCurvature:
      return "nonpositive_curvature";
    case CGStatus::kNonfinite:
      return "nonfinite";
  }
  return "unknown";
}

namespace {

struct Backend {
  std::tuple<at::Tensor, at::Tensor, at::Tensor> (*init)(const at::Tensor&,
                                                         const c10::optional<at::Tensor>&,
                                                         const c10::optional<at::Tensor>&, double,
                                                         double, double);
  void (*step)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
               const at::Tensor&, double);
  at::Tensor (*finish)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);
};

Backend backend_for(const at::Tensor& b) {
  if (b.device().is_cpu()) return {&cg::init_cpu, &cg::step_cpu, &cg::finish_cpu};
#ifdef TRPO_EXT_WITH_CUDA
  if (b.device().is_cuda()) return {&cg::init_cuda, &cg::step_cuda, &cg::finish_cuda};
#endif
#ifdef TRPO_EXT_WITH_CUDA
  const char* other = " or a CUDA device";
#else
  const char* other = " (this build of trpo_ext has no CUDA kernels)";
#endif
  TRPO_CHECK_VALUE(false, "b must be on the CPU", other, ", got ", b.device());
}

at::Tensor call_matvec(const MatVec& matvec, const at::Tensor& v) {
  at::Tensor out = matvec(v);
  TRPO_CHECK_TYPE(out.defined(), "matvec returned an undefined tensor");
  return out;
}

}  // namespace

CGResult conjugate_gradient(const MatVec& matvec, const at::Tensor& b, const CGOptions& options,
                            const c10::optional<at::Tensor>& x0) {
  TRPO_CHECK_TYPE(static_cast<bool>(matvec), "matvec must be a callable, got an empty function");
  cg::check_rhs(b);
  TRPO_CHECK_VALUE(options.maxiter >= 0, "maxiter must be >= 0, got ", options.maxiter);
  TRPO_CHECK_VALUE(options.check_every >= 0, "check_every must be >= 0, got ",
                   options.check_every);
  cg::check_scalar(options.rtol, "rtol");
  cg::check_scalar(options.atol, "atol");
  cg::check_scalar(options.damping, "damping");
  if (x0.has_value()) cg::check_vector(b, *x0, "x0");
  const Backend be = backend_for(b);
  const double damping = options.damping;

  at::Tensor x, r, p, state;
  if (x0.has_value()) {
    x = x0->clone(at::MemoryFormat::Contiguous);
    std::tie(r, p, state) = be.init(b, x, call_matvec(matvec, x), damping, options.rtol, options.atol);
  } else {
    x = at::zeros(b.sizes(), b.options());
    std::tie(r, p, state) = be.init(b, c10::nullopt, c10::nullopt, damping, options.rtol,
                                    options.atol);
  }

  if (b.device().is_cpu()) {
    const double* s = state.data_ptr<double>();
    for (int64_t k = 0; k < options.maxiter && s[cg::kStatus] == cg::kRunning; ++k) {
      be.step(x, r, p, call_matvec(matvec, p), state, damping);
    }
  } else {
    // Without a tolerance the host never reads the device inside the loop.
    const bool poll = options.rtol > 0.0 || options.atol > 0.0;
    const int64_t every = options.check_every > 0 ? options.check_every : 5;
    for (int64_t k = 0; k < options.maxiter; ++k) {
      if (poll && k % every == 0 && state[cg::kStatus].item<double>() != cg::kRunning) break;
      be.step(x, r, p, call_matvec(matvec, p), state, damping);
    }
  }

  CGResult result;
  result.xAx = be.finish(b, x, r, state);
  result.x = x;
  const at::Tensor scalars = state.narrow(0, 0, cg::kNumScalars).cpu();
  const double* s = scalars.data_ptr<double>();
  result.iterations = static_cast<int64_t>(s[cg::kIters]);
  result.residual_norm = std::sqrt(s[cg::kRR]);
  switch (static_cast<int>(s[cg::kStatus])) {
    case cg::kConverged:
      result.status = CGStatus::kConverged;
      break;
    case cg::kNonpositiveCurvature:
      result.status = CGStatus::kNonpositiveCurvature;
      break;
    case cg::kNonfinite:
      result.status = CGStatus::kNonfinite;
      break;
    default:
      result.status = CGStatus::kMaxIter;
  }
  return result;
}

}  // namespace trpo_ext
