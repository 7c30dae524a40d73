// tanh_and_derivative: (tanh(x), 1 − tanh(x)²) in one pass, for the linearised networks of
// policies.py (every hidden layer's forward and the derivative its Jacobian-vector products need).
// The per-element math of the op.
#pragma once

#include <cmath>

#include "common.h"

namespace trpo_ext {
namespace tanh_and_derivative {

TRPO_HD float k_tanh(float x) { return ::tanhf(x); }
TRPO_HD double k_tanh(double x) { return ::tanh(x); }

// d tanh(x)/dx from y = tanh(x).
template <typename scalar_t>
TRPO_HD scalar_t tanh_derivative(scalar_t y) {
  return scalar_t(1) - y * y;
}

}  // namespace tanh_and_derivative
}  // namespace trpo_ext
