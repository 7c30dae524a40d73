// Shared helpers for every trpo_ext op: host/device qualifiers and the input checks that both backends
// call, so that CPU and CUDA refuse the same inputs with the same messages.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define TRPO_HD __host__ __device__ __forceinline__
#else
#define TRPO_HD inline
#endif

namespace trpo_ext {

// Error messages: numbers are formatted here (snprintf), never streamed into c10::str: where the
// libstdc++ at run time differs from the one the extension was compiled against, the extension's
// own basic_ostream::_M_insert<long> has crashed while building a message with a number.  Strings,
// dtypes and devices still go through c10::str.
inline std::string format_number(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.6g", v);
  return buf;
}

template <typename T>
decltype(auto) message_arg(const T& v) {
  if constexpr (std::is_same_v<T, bool>) {
    return v ? "true" : "false";
  } else if constexpr (std::is_integral_v<T> && !std::is_same_v<T, char>) {
    return std::to_string(v);
  } else if constexpr (std::is_floating_point_v<T>) {
    return format_number(static_cast<double>(v));
  } else {
    return (v);  // a reference to the argument itself
  }
}

template <typename... Args>
std::string message(const Args&... args) {
  return c10::str(message_arg(args)...);
}

}  // namespace trpo_ext

// TORCH_CHECK_VALUE / _TYPE / TORCH_CHECK with the message built by trpo_ext::message (only when the
// check fails, as with torch's own macros).
#define TRPO_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, ::trpo_ext::message(__VA_ARGS__))
#define TRPO_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, ::trpo_ext::message(__VA_ARGS__))
#define TRPO_CHECK(cond, ...) TORCH_CHECK(cond, ::trpo_ext::message(__VA_ARGS__))

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
  TRPO_CHECK_TYPE(t.defined(), name, " must be a tensor");
  TRPO_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
                  " must be float32 or float64, got ", t.scalar_type());
}

inline void check_same_dtype(const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                             const char* name) {
  TRPO_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name,
                  " (", ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                              const char* name) {
  TRPO_CHECK_VALUE(t.device() == ref.device(), name, " must be on the device of ", ref_name, " (",
                   ref.device(), "), got ", t.device());
}

inline void check_same_shape(const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                             const char* name) {
  TRPO_CHECK_VALUE(t.sizes() == ref.sizes(), name, " must have the shape of ", ref_name, " ",
                   shape_str(ref), ", got ", shape_str(t));
}

}  // namespace trpo_ext
