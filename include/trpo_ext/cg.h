// trpo_ext's conjugate-gradient solver for C++ programs (libtorch).
//
//   #include <trpo_ext/cg.h>
//   auto result = trpo_ext::conjugate_gradient(
//       [&](const at::Tensor& v) { return at::mv(A, v); }, b, {/*maxiter=*/50, /*rtol=*/1e-8});
//
// Solves (A + damping·I) x = b for symmetric positive definite A, with the same fused CPU/CUDA
// vector steps and the same stopping rule as the Python `trpo_ext.conjugate_gradient`:
// stop after `maxiter` iterations, or when ‖r‖ ≤ max(rtol·‖b‖, atol), or on curvature
// pᵀ(A + damping·I)p ≤ 0, or on a non-finite value (then x is the last good iterate).
// Link with the CMake target trpo_ext::trpo_ext (find_package(trpo_ext)).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>

namespace trpo_ext {

// v -> A v: takes and returns a 1-D tensor of b's shape, dtype and device; must not modify v.
using MatVec = std::function<at::Tensor(const at::Tensor&)>;

enum class CGStatus { kConverged, kMaxIter, kNonpositiveCurvature, kNonfinite };

// "converged", "maxiter", "nonpositive_curvature", "nonfinite" — the Python API's names.
const char* to_string(CGStatus status);

struct CGOptions {
  int64_t maxiter = 10;  // iterations at most, >= 0
  double rtol = 1e-10;   // relative tolerance, >= 0
  double atol = 0.0;     // absolute tolerance, >= 0
  double damping = 0.0;  // added to A's diagonal, >= 0
  // With a tolerance on CUDA: read the status from the host every `check_every` iterations
  // (iterations after convergence change nothing on the device). 0 means 5. The CPU stops exactly.
  int64_t check_every = 0;
};

struct CGResult {
  at::Tensor x;              // the solution, b's shape, dtype and device
  int64_t iterations = 0;    // iterations committed
  double residual_norm = 0;  // ‖b − (A + damping·I)x‖ as tracked by the recurrence
  CGStatus status = CGStatus::kMaxIter;
  at::Tensor xAx;            // 0-d, b's dtype and device: xᵀ(A + damping·I)x = xᵀ(b − r)
};

// `matvec` is called exactly once per iteration (once more at the start when x0 is given);
// exceptions it throws propagate unchanged.  Bad input throws c10::ValueError / c10::TypeError
// naming the argument.
CGResult conjugate_gradient(const MatVec& matvec, const at::Tensor& b, const CGOptions& options = {},
                            const c10::optional<at::Tensor>& x0 = c10::nullopt);

}  // namespace trpo_ext
