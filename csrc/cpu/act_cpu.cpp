// tanh_and_derivative on the CPU: y = tanh(x) and d = 1 − y² in one pass over x.  The networks'
// linearisation (trpo_ext/policies.py, Linearization) needs both for every hidden layer — for the
// critic's gradient per minibatch, the Fisher-vector products and the policy gradient — where
// torch.tanh followed by 1 − y² costs three passes and, on the project's VM, ~4.6 ns per element
// for tanh alone.  float uses vmath.h's branch-free vtanh (compiled for the x86-64 baseline, for
// AVX2 + FMA and for AVX-512, picked at run time as the KL kernels are); float64 uses std::tanh.
// Elements are independent, so the result does not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>

#include "common.h"
#include "cpu/cpu_isa.h"

namespace trpo_ext {
namespace {

namespace isa_base {
#include "vmath.h"
#include "act_cpu_kernels.h"
}  // namespace isa_base

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TRPO_ACT_HAVE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
#include "vmath.h"
#include "act_cpu_kernels.h"
}  // namespace isa_avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")
namespace isa_avx512 {
#include "vmath.h"
#include "act_cpu_kernels.h"
}  // namespace isa_avx512
#pragma GCC pop_options
#endif


std::tuple<at::Tensor, at::Tensor> tanh_and_derivative_cpu(const at::Tensor& x_in) {
  check_float_tensor(x_in, "x");
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x);
  at::Tensor d = at::empty_like(x);
  const int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tanh_and_derivative_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* dp = d.data_ptr<scalar_t>();
    at::parallel_for(0, n, 32768, [&](int64_t i0, int64_t i1) {
#ifdef TRPO_ACT_HAVE_AVX2
      if (cpu_isa_selected() == CpuIsa::kAvx512) {
        isa_avx512::tanh_deriv_range<scalar_t>(xp + i0, yp + i0, dp + i0, i1 - i0);
        return;
      }
      if (cpu_isa_selected() == CpuIsa::kAvx2) {
        isa_avx2::tanh_deriv_range<scalar_t>(xp + i0, yp + i0, dp + i0, i1 - i0);
        return;
      }
#endif
      isa_base::tanh_deriv_range<scalar_t>(xp + i0, yp + i0, dp + i0, i1 - i0);
    });
  });
  return {y, d};
}

}  // namespace

TORCH_LIBRARY_IMPL(trpo_ext, CPU, m) { m.impl("tanh_and_derivative", &tanh_and_derivative_cpu); }

}  // namespace trpo_ext
