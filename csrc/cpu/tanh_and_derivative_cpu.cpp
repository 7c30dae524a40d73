// tanh_and_derivative on the CPU: y from ATen's vectorised tanh (the math library's tanhf, which a
// plain loop calls element by element, is much slower), then one pass for d = 1 − y² with
// tanh_and_derivative.h's math.  Elements are independent: no dependence on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "tanh_and_derivative.h"

namespace trpo_ext {
namespace {

std::tuple<at::Tensor, at::Tensor> tanh_and_derivative_cpu(const at::Tensor& x) {
  check_float_tensor(x, "x");
  at::Tensor y = at::tanh(x.contiguous());
  at::Tensor d = at::empty_like(y);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "tanh_and_derivative_cpu", [&] {
    const scalar_t* yp = y.data_ptr<scalar_t>();  // [n]
    scalar_t* dp = d.data_ptr<scalar_t>();         // [n]
    at::parallel_for(0, y.numel(), 32768, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) dp[i] = tanh_and_derivative::tanh_derivative(yp[i]);
    });
  });
  return {y, d};
}

}  // namespace

TORCH_LIBRARY_IMPL(trpo_ext, CPU, m) { m.impl("tanh_and_derivative", &tanh_and_derivative_cpu); }

}  // namespace trpo_ext
