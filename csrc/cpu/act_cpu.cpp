// tanh_and_derivative on the CPU: one pass over x with act.h's math.  Elements are independent, so
// the result does not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "act.h"

namespace trpo_ext {
namespace {

std::tuple<at::Tensor, at::Tensor> tanh_and_derivative_cpu(const at::Tensor& x_in) {
  check_float_tensor(x_in, "x");
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x);
  at::Tensor d = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tanh_and_derivative_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();  // [n]
    scalar_t* yp = y.data_ptr<scalar_t>();         // [n]
    scalar_t* dp = d.data_ptr<scalar_t>();         // [n]
    at::parallel_for(0, x.numel(), 32768, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) act::tanh_and_derivative(xp[i], yp[i], dp[i]);
    });
  });
  return {y, d};
}

}  // namespace

TORCH_LIBRARY_IMPL(trpo_ext, CPU, m) { m.impl("tanh_and_derivative", &tanh_and_derivative_cpu); }

}  // namespace trpo_ext
