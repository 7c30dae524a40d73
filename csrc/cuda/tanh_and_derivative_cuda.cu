// tanh_and_derivative on CUDA: one thread per element (grid-stride) with tanh_and_derivative.h's
// math (the accurate tanhf / tanh: the loads and stores dominate on a GPU).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "tanh_and_derivative.h"
#include "cuda/cuda_utils.cuh"

namespace trpo_ext {
namespace {

template <typename scalar_t>
__global__ void tanh_and_derivative_kernel(const scalar_t* __restrict__ x,  // [n]
                                           scalar_t* __restrict__ y,        // [n]
                                           scalar_t* __restrict__ d,        // [n]
                                           int64_t n) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const scalar_t t = tanh_and_derivative::k_tanh(x[i]);
    y[i] = t;
    d[i] = tanh_and_derivative::tanh_derivative(t);
  }
}

std::tuple<at::Tensor, at::Tensor> tanh_and_derivative_cuda(const at::Tensor& x_in) {
  check_float_tensor(x_in, "x");
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x);
  at::Tensor d = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return {y, d};
  constexpr int kThreads = 256;
  const cuda::DeviceShape shape = cuda::device_shape();
  const int64_t max_blocks =
      static_cast<int64_t>(shape.sm_count) * (shape.max_threads_per_sm / kThreads);
  const unsigned int blocks = static_cast<unsigned int>(
      std::min<int64_t>(cuda::blocks_for(n, kThreads), std::max<int64_t>(max_blocks, 1)));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tanh_and_derivative_cuda", [&] {
    tanh_and_derivative_kernel<scalar_t><<<blocks, kThreads, 0, cuda::current_stream()>>>(
        x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), d.data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, d};
}

}  // namespace

TORCH_LIBRARY_IMPL(trpo_ext, CUDA, m) { m.impl("tanh_and_derivative", &tanh_and_derivative_cuda); }

}  // namespace trpo_ext
