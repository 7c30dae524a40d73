// Shared helpers for every trpo_ext op: host/device qualifiers and the input checks that both backends
// call, so that CPU and CUDA refuse the same inputs with the same messages.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define TRPO_HD __host__ __device__ __forceinline__
#else
#define TRPO_HD inline
#endif

namespace trpo_ext {

// "[2048, 16]" — used in every message that reports a shape.
inline std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(t.size(i));
  }
  return s + "]";
}

// Floating-point tensors that the reductions accept: float32 and float64.
inline void check_float_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.defined(), name, " must be a tensor");
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
                   " must be float32 or float64, got ", t.scalar_type());
}

inline void check_same_dtype(const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                             const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name,
                   " (", ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                              const char* name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " must be on the device of ", ref_name, " (",
                    ref.device(), "), got ", t.device());
}

inline void check_same_shape(const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                             const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), name, " must have the shape of ", ref_name, " ",
                    shape_str(ref), ", got ", shape_str(t));
}

}  // namespace trpo_ext
