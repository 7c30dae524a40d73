// Small CUDA helpers shared by the kernels.  Deliberately avoids ATen/cuda/CUDAContext.h, which pulls
// in cuBLAS and cuSPARSE headers that a minimal CUDA toolkit does not ship.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

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

// Resident blocks per SM of `kernel` launched with `threads` threads and `smem_bytes` of dynamic
// shared memory on the current device.  The driver's occupancy query costs microseconds, a share
// of a small reduction's whole host time; its answer depends on nothing but these four, so each
// combination is asked once per process.  A handful of kernels and shapes: a short vector.
inline int blocks_per_sm(const void* kernel, int threads, size_t smem_bytes) {
  struct Entry {
    const void* kernel;
    int device, threads;
    size_t smem_bytes;
    int blocks;
  };
  static std::mutex mutex;
  static std::vector<Entry> cache;
  const int dev = c10::cuda::current_device();
  std::lock_guard<std::mutex> lock(mutex);
  for (const Entry& e : cache) {
    if (e.kernel == kernel && e.device == dev && e.threads == threads && e.smem_bytes == smem_bytes) {
      return e.blocks;
    }
  }
  int blocks = 0;
  C10_CUDA_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem_bytes));
  cache.push_back({kernel, dev, threads, smem_bytes, blocks});
  return blocks;
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline unsigned int blocks_for(int64_t work, int threads) {
  return static_cast<unsigned int>((work + threads - 1) / threads);
}

}  // namespace cuda
}  // namespace trpo_ext
