// Generalized advantage estimation: the per-element math that the CPU and CUDA kernels share, and the
// input checks both backends run.
//
// Convention (time-major, t = 0..T-1, environments n = 0..N-1):
//   delta_t = r_t + gamma * (1 - terminated_t) * next_values_t - values_t
//   A_t     = delta_t + gamma * lam * (1 - done_t) * A_{t+1},   A_T = 0
//   returns = A + values
// Each step is the affine map x -> delta_t + coef_t * x applied to A_{t+1}.  Affine maps compose
// associatively, which is what lets both backends split the time axis into chunks, compute each
// chunk's composed map, scan those maps, and replay every chunk from its correct carry-in.
#pragma once

#include "common.h"

namespace trpo_ext {
namespace gae {

// The map x -> a + b * x.
template <typename acc_t>
struct Affine {
  acc_t a;
  acc_t b;
};

template <typename acc_t>
TRPO_HD Affine<acc_t> identity() {
  return {acc_t(0), acc_t(1)};
}

// The TD residual.  A terminated step never reads next_value, so whatever a caller stored there for
// a terminal state (a reset observation's value, NaN) cannot leak into the result.
template <typename acc_t>
TRPO_HD acc_t td_residual(acc_t reward, acc_t value, acc_t next_value, bool terminated,
                          acc_t gamma) {
  // Both arms computed, then selected: a select (not a branch) keeps the loops vectorisable, and a
  // select, unlike a multiplication by (1 - terminated), does not propagate a NaN next_value.
  const acc_t bootstrap = terminated ? acc_t(0) : gamma * next_value;
  return reward + bootstrap - value;
}

// How much of A_{t+1} flows into A_t: the recursion stops at any episode end.
template <typename acc_t>
TRPO_HD acc_t trace_coef(bool done, acc_t gamma_lam) {
  return done ? acc_t(0) : gamma_lam;
}

// One step of the backward recursion: A_t from A_{t+1}.
template <typename acc_t>
TRPO_HD acc_t step(acc_t delta, acc_t coef, acc_t next_advantage) {
  return delta + coef * next_advantage;
}

// earlier ∘ later: first apply `later` (the steps further in the future), then `earlier`.
template <typename acc_t>
TRPO_HD Affine<acc_t> combine(Affine<acc_t> earlier, Affine<acc_t> later) {
  return {earlier.a + earlier.b * later.a, earlier.b * later.b};
}

// Inputs checked once for both backends; masks are converted to bool here (only when they are not
// already bool), value tensors made contiguous (a no-op when they already are).
struct Inputs {
  at::Tensor rewards, values, next_values, terminated, done;
  int64_t T = 0;
  int64_t N = 0;
};

inline at::Tensor as_bool_mask(const at::Tensor& mask, const char* name) {
  TRPO_CHECK_TYPE(mask.scalar_type() == at::kBool || at::isIntegralType(mask.scalar_type(), false) ||
                       at::isFloatingType(mask.scalar_type()),
                  name, " must be bool or a 0/1 tensor of an integer or floating dtype, got ",
                  mask.scalar_type());
  return (mask.scalar_type() == at::kBool ? mask : mask.ne(0)).contiguous();
}

inline Inputs check_inputs(const at::Tensor& rewards, const at::Tensor& values,
                           const at::Tensor& next_values, const at::Tensor& terminated,
                           const at::Tensor& done, double gamma, double lam) {
  check_float_tensor(rewards, "rewards");
  TRPO_CHECK_VALUE(rewards.dim() == 1 || rewards.dim() == 2,
                   "rewards must be [T] or [T, N] (time-major), got shape ", shape_str(rewards));
  check_same_shape(rewards, "rewards", values, "values");
  check_same_shape(rewards, "rewards", next_values, "next_values");
  check_same_shape(rewards, "rewards", terminated, "terminated");
  check_same_shape(rewards, "rewards", done, "done");
  check_same_dtype(rewards, "rewards", values, "values");
  check_same_dtype(rewards, "rewards", next_values, "next_values");
  check_same_device(rewards, "rewards", values, "values");
  check_same_device(rewards, "rewards", next_values, "next_values");
  check_same_device(rewards, "rewards", terminated, "terminated");
  check_same_device(rewards, "rewards", done, "done");
  TRPO_CHECK_VALUE(gamma >= 0.0 && gamma <= 1.0, "gamma must be in [0, 1], got ", gamma);
  TRPO_CHECK_VALUE(lam >= 0.0 && lam <= 1.0, "lam must be in [0, 1], got ", lam);
  Inputs in;
  in.rewards = rewards.contiguous();
  in.values = values.contiguous();
  in.next_values = next_values.contiguous();
  in.terminated = as_bool_mask(terminated, "terminated");
  in.done = as_bool_mask(done, "done");
  in.T = rewards.size(0);
  in.N = rewards.dim() == 2 ? rewards.size(1) : 1;
  return in;
}

}  // namespace gae
}  // namespace trpo_ext
