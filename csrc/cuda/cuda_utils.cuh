// Small CUDA helpers shared by the kernels.  Deliberately avoids ATen/cuda/CUDAContext.h, which pulls
// in cuBLAS and cuSPARSE headers that a minimal CUDA toolkit does not ship.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace trpo_ext {
namespace cuda {

struct DeviceShape {
  int sm_count;
  int max_threads_per_sm;
};

// Launch shapes come from the device; attribute queries do not synchronise.
inline DeviceShape device_shape() {
  const int dev = c10::cuda::current_device();
  DeviceShape s{};
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&s.sm_count, cudaDevAttrMultiProcessorCount, dev));
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&s.max_threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, dev));
  return s;
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline unsigned int blocks_for(int64_t work, int threads) {
  return static_cast<unsigned int>((work + threads - 1) / threads);
}

}  // namespace cuda
}  // namespace trpo_ext
