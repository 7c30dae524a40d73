// KL, surrogate and Fisher-metric ops on CUDA: one thread per row running kl.h's math, the same
// per-row loops as the CPU (so CPU tests exercise this math).
//   host wrappers  kl_*_cuda            — checks (shared with the CPU), device guard, outputs
//   launchers      reduce_rows / for_rows — grid from the device, current stream, launch checks
//   kernels        reduce_rows_kernel → finish_sums_kernel (forward: per-block partial sums in a
//                  fixed tree, then one block adds them in block order: deterministic for a given
//                  device, no host synchronisation), map_rows_kernel (backward and metric)
//
// Out-of-range class indices cannot be reported without a host synchronisation: the row's
// log-probability becomes NaN (no out-of-bounds read), which makes the surrogate and its gradient
// NaN.  The CPU raises instead.  A state-independent [A] log_std's gradient sums its [B, A] per-row
// terms over the batch with at::sum.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>

#include "cuda/cuda_utils.cuh"
#include "kl.h"

namespace trpo_ext {
namespace {

using kl::Sums;

constexpr int kThreads = 256;

// --- per-row functors (device side) ------------------------------------------------------------

template <typename scalar_t>
struct GaussRows {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* mean_old;     // [B, A]
  const scalar_t* log_std_old;  // [A] or [B, A] (row stride lo_stride)
  const scalar_t* mean_new;     // [B, A]
  const scalar_t* log_std_new;  // [A] or [B, A] (row stride ln_stride)
  const scalar_t* actions;      // [B, A], surrogate only (else null)
  const scalar_t* logp_old;     // [B], surrogate only
  const scalar_t* advantages;   // [B], surrogate only
  int64_t A, lo_stride, ln_stride;

  __device__ kl::GaussCol<acc_t> col(int64_t row, int64_t a) const {
    return kl::gauss_col(static_cast<acc_t>(log_std_old[row * lo_stride + a]),
                         static_cast<acc_t>(log_std_new[row * ln_stride + a]));
  }

  // log π_new(a_row).
  __device__ acc_t log_prob(int64_t row) const {
    acc_t lp = acc_t(-A * kl::kHalfLog2Pi);
    for (int64_t a = 0; a < A; ++a) {
      const int64_t i = row * A + a;
      lp += kl::gauss_log_prob(col(row, a), static_cast<acc_t>(actions[i]),
                               static_cast<acc_t>(mean_new[i]));
    }
    return lp;
  }

  __device__ Sums operator()(int64_t row) const {
    acc_t k = 0;
    for (int64_t a = 0; a < A; ++a) {
      const int64_t i = row * A + a;
      k += kl::gauss_kl(col(row, a), static_cast<acc_t>(mean_old[i]),
                        static_cast<acc_t>(mean_new[i]));
    }
    const double s = actions ? static_cast<double>(kl::surrogate_term<acc_t>(
                                   log_prob(row), static_cast<acc_t>(logp_old[row]),
                                   static_cast<acc_t>(advantages[row])))
                             : 0.0;
    return {static_cast<double>(k), s, static_cast<double>(k)};
  }
};

template <typename scalar_t>
GaussRows<scalar_t> gauss_rows(const kl::GaussianInputs& in) {
  return {in.mean_old.data_ptr<scalar_t>(),
          in.log_std_old.data_ptr<scalar_t>(),
          in.mean_new.data_ptr<scalar_t>(),
          in.log_std_new.data_ptr<scalar_t>(),
          in.surrogate ? in.actions.data_ptr<scalar_t>() : nullptr,
          in.surrogate ? in.logp_old.data_ptr<scalar_t>() : nullptr,
          in.surrogate ? in.advantages.data_ptr<scalar_t>() : nullptr,
          in.A,
          in.log_std_old_row_stride,
          in.log_std_new_row_stride};
}

template <typename scalar_t>
struct GaussGrad {
  using acc_t = at::opmath_type<scalar_t>;
  GaussRows<scalar_t> g;
  const scalar_t* grad_mean_kl;    // 0-d
  const scalar_t* grad_surrogate;  // 0-d, or null
  scalar_t* grad_mean;             // [B, A]
  scalar_t* grad_log_std;          // [B, A] per-row terms
  acc_t inv_B;

  __device__ void operator()(int64_t row) const {
    const acc_t gk = static_cast<acc_t>(*grad_mean_kl) * inv_B;
    acc_t coef = 0;
    if (grad_surrogate) {
      coef = static_cast<acc_t>(*grad_surrogate) * inv_B *
             kl::surrogate_term<acc_t>(g.log_prob(row), static_cast<acc_t>(g.logp_old[row]),
                                       static_cast<acc_t>(g.advantages[row]));
    }
    for (int64_t a = 0; a < g.A; ++a) {
      const int64_t i = row * g.A + a;
      const acc_t mean_new = static_cast<acc_t>(g.mean_new[i]);
      acc_t dm, dl;
      kl::gauss_grad(g.col(row, a), static_cast<acc_t>(g.mean_old[i]), mean_new,
                     g.actions ? static_cast<acc_t>(g.actions[i]) : mean_new, gk, coef, dm, dl);
      grad_mean[i] = static_cast<scalar_t>(dm);
      grad_log_std[i] = static_cast<scalar_t>(dl);
    }
  }
};

template <typename scalar_t, typename index_t>
struct CatRows {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* logits_old;  // [B, K]
  const scalar_t* logits_new;  // [B, K]
  const index_t* actions;      // [B], surrogate only (else null)
  const scalar_t* logp_old;    // [B], surrogate only
  const scalar_t* advantages;  // [B], surrogate only
  int64_t K;

  struct Row {
    acc_t max_old, max_new;
    kl::CatSums<acc_t> sums;
  };

  // kl.h's two passes over one row.
  __device__ Row stats(int64_t row) const {
    const scalar_t* lo = logits_old + row * K;
    const scalar_t* ln = logits_new + row * K;
    Row r{kl::neg_inf<acc_t>(), kl::neg_inf<acc_t>(), {acc_t(0), acc_t(0), acc_t(0)}};
    for (int64_t k = 0; k < K; ++k) {
      r.max_old = kl::cat_max(r.max_old, static_cast<acc_t>(lo[k]));
      r.max_new = kl::cat_max(r.max_new, static_cast<acc_t>(ln[k]));
    }
    for (int64_t k = 0; k < K; ++k) {
      kl::cat_push(r.sums, static_cast<acc_t>(lo[k]), static_cast<acc_t>(ln[k]), r.max_old,
                   r.max_new);
    }
    return r;
  }

  // log π_new(a_row) given the row's max and log Σ; NaN for an out-of-range action.
  __device__ acc_t log_prob(int64_t row, acc_t max_new, acc_t log_sum_new) const {
    const index_t a = actions[row];
    return kl::action_in_range(a, K)
               ? kl::cat_log_prob(static_cast<acc_t>(logits_new[row * K + a]), max_new, log_sum_new)
               : std::numeric_limits<acc_t>::quiet_NaN();
  }

  __device__ Sums operator()(int64_t row) const {
    const Row r = stats(row);
    const acc_t k = kl::cat_kl(r.sums, r.max_old, r.max_new);
    double s = 0.0;
    if (actions) {
      s = static_cast<double>(kl::surrogate_term<acc_t>(
          log_prob(row, r.max_new, kl::k_log(r.sums.sum_new)),
          static_cast<acc_t>(logp_old[row]), static_cast<acc_t>(advantages[row])));
    }
    return {static_cast<double>(k), s, static_cast<double>(k)};
  }
};

template <typename scalar_t, typename index_t>
struct CatGrad {
  using acc_t = at::opmath_type<scalar_t>;
  CatRows<scalar_t, index_t> c;
  const scalar_t* grad_mean_kl;    // 0-d
  const scalar_t* grad_surrogate;  // 0-d, or null
  scalar_t* grad_logits;           // [B, K]
  acc_t inv_B;

  __device__ void operator()(int64_t row) const {
    const auto r = c.stats(row);
    const acc_t lso = kl::k_log(r.sums.sum_old);
    const acc_t lsn = kl::k_log(r.sums.sum_new);
    const acc_t gk = static_cast<acc_t>(*grad_mean_kl) * inv_B;
    acc_t coef = 0;
    int64_t a = -1;
    if (grad_surrogate) {
      a = static_cast<int64_t>(c.actions[row]);
      coef = static_cast<acc_t>(*grad_surrogate) * inv_B *
             kl::surrogate_term<acc_t>(c.log_prob(row, r.max_new, lsn),
                                       static_cast<acc_t>(c.logp_old[row]),
                                       static_cast<acc_t>(c.advantages[row]));
    }
    for (int64_t k = 0; k < c.K; ++k) {
      const int64_t i = row * c.K + k;
      grad_logits[i] = static_cast<scalar_t>(kl::cat_grad<acc_t>(
          kl::k_exp(kl::cat_log_prob(static_cast<acc_t>(c.logits_old[i]), r.max_old, lso)),
          kl::k_exp(kl::cat_log_prob(static_cast<acc_t>(c.logits_new[i]), r.max_new, lsn)), gk,
          coef, k == a));
    }
  }
};

template <typename scalar_t>
struct GaussMetric {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* log_std;  // [A] or [B, A] (row stride ls_stride)
  const scalar_t* u;        // [B, A]
  scalar_t* out;            // [B, A]
  int64_t A, ls_stride;
  acc_t inv_B;

  __device__ void operator()(int64_t row) const {
    for (int64_t a = 0; a < A; ++a) {
      const int64_t i = row * A + a;
      out[i] = static_cast<scalar_t>(inv_B * kl::gauss_metric_mean<acc_t>(
                                                 static_cast<acc_t>(u[i]),
                                                 static_cast<acc_t>(log_std[row * ls_stride + a])));
    }
  }
};

template <typename scalar_t>
struct CatMetric {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* logits;  // [B, K]
  const scalar_t* u;       // [B, K]
  scalar_t* out;           // [B, K]
  int64_t K;
  acc_t inv_B;

  __device__ void operator()(int64_t row) const {
    const scalar_t* l = logits + row * K;
    const scalar_t* ur = u + row * K;
    acc_t mx = kl::neg_inf<acc_t>();
    for (int64_t k = 0; k < K; ++k) mx = kl::cat_max(mx, static_cast<acc_t>(l[k]));
    acc_t sum = 0, pu = 0;
    for (int64_t k = 0; k < K; ++k) {
      const acc_t e = kl::k_exp(static_cast<acc_t>(l[k]) - mx);
      sum += e;
      pu += e * static_cast<acc_t>(ur[k]);
    }
    pu /= sum;
    for (int64_t k = 0; k < K; ++k) {
      const acc_t e = kl::k_exp(static_cast<acc_t>(l[k]) - mx);
      out[row * K + k] = static_cast<scalar_t>(
          inv_B * kl::cat_metric<acc_t>(e / sum, static_cast<acc_t>(ur[k]), pu));
    }
  }
};

// --- kernels and launchers -------------------------------------------------------------------

// Each block reduces its rows' sums in a fixed tree into partial[blockIdx.x].
template <typename RowFn>
__global__ void __launch_bounds__(kThreads)
    reduce_rows_kernel(RowFn fn, int64_t B, Sums* __restrict__ partial /* [gridDim.x] */) {
  __shared__ Sums sh[kThreads];
  Sums s = kl::sums_empty();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; row < B;
       row += stride) {
    s = kl::sums_merge(s, fn(row));
  }
  sh[threadIdx.x] = s;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) sh[threadIdx.x] = kl::sums_merge(sh[threadIdx.x], sh[threadIdx.x + w]);
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = sh[0];
}

// One block adds the n partial sums in order of block and writes the outputs (any may be null).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    finish_sums_kernel(const Sums* __restrict__ partial,  // [n]
                       int n, double inv_B, scalar_t* __restrict__ surrogate,  // 0-d
                       scalar_t* __restrict__ mean_kl,                         // 0-d
                       scalar_t* __restrict__ max_kl) {                        // 0-d
  __shared__ Sums sh[kThreads];
  Sums s = kl::sums_empty();
  for (int i = threadIdx.x; i < n; i += kThreads) s = kl::sums_merge(s, partial[i]);
  sh[threadIdx.x] = s;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) sh[threadIdx.x] = kl::sums_merge(sh[threadIdx.x], sh[threadIdx.x + w]);
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    if (surrogate) *surrogate = static_cast<scalar_t>(sh[0].surrogate * inv_B);
    if (mean_kl) *mean_kl = static_cast<scalar_t>(sh[0].kl * inv_B);
    if (max_kl) *max_kl = static_cast<scalar_t>(sh[0].max_kl);
  }
}

template <typename RowFn>
__global__ void __launch_bounds__(kThreads) map_rows_kernel(RowFn fn, int64_t B) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; row < B;
       row += stride) {
    fn(row);
  }
}

// Blocks for B rows: enough to fill the device, at most one row per thread.
unsigned int grid_for(int64_t B) {
  const cuda::DeviceShape s = cuda::device_shape();
  const int64_t fill = static_cast<int64_t>(s.sm_count) * (s.max_threads_per_sm / kThreads);
  return static_cast<unsigned int>(
      std::max<int64_t>(1, std::min<int64_t>(cuda::blocks_for(B, kThreads), fill)));
}

struct Outputs {
  at::Tensor surrogate, mean_kl, max_kl;
};

template <typename scalar_t, typename RowFn>
Outputs reduce_rows(const RowFn& fn, int64_t B, const at::Tensor& ref, bool surrogate) {
  const at::TensorOptions opts = ref.options();
  Outputs out{surrogate ? at::empty({}, opts) : at::Tensor(), at::empty({}, opts),
              at::empty({}, opts)};
  const unsigned int blocks = grid_for(B);
  const at::Tensor partial =
      at::empty({static_cast<int64_t>(blocks) * static_cast<int64_t>(sizeof(Sums))},
                opts.dtype(at::kByte));
  Sums* p = reinterpret_cast<Sums*>(partial.data_ptr<uint8_t>());
  const cudaStream_t stream = cuda::current_stream();
  reduce_rows_kernel<<<blocks, kThreads, 0, stream>>>(fn, B, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finish_sums_kernel<scalar_t><<<1, kThreads, 0, stream>>>(
      p, static_cast<int>(blocks), 1.0 / static_cast<double>(B),
      surrogate ? out.surrogate.data_ptr<scalar_t>() : nullptr, out.mean_kl.data_ptr<scalar_t>(),
      out.max_kl.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

template <typename RowFn>
void for_rows(const RowFn& fn, int64_t B) {
  if (B == 0) return;
  map_rows_kernel<<<grid_for(B), kThreads, 0, cuda::current_stream()>>>(fn, B);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename F>
void dispatch_index(const at::Tensor& actions, bool surrogate, const F& f) {
  if (surrogate && actions.scalar_type() == at::kInt) {
    f(int32_t{});
  } else {
    f(int64_t{});
  }
}

// --- host wrappers ------------------------------------------------------------------------------

Outputs gaussian_forward(const kl::GaussianInputs& in) {
  Outputs out;
  AT_DISPATCH_FLOATING_TYPES(in.mean_old.scalar_type(), "kl_diag_gaussian_cuda", [&] {
    out = reduce_rows<scalar_t>(gauss_rows<scalar_t>(in), in.B, in.mean_old, in.surrogate);
  });
  return out;
}

// Checks first, then the guard, so a tensor on another device gets the checks' clear message.
at::Tensor kl_diag_gaussian_cuda(const at::Tensor& mean_old, const at::Tensor& log_std_old,
                                 const at::Tensor& mean_new, const at::Tensor& log_std_new) {
  const std::optional<at::Tensor> none;
  const kl::GaussianInputs in =
      kl::check_gaussian(mean_old, log_std_old, mean_new, log_std_new, {none, none, none});
  const c10::cuda::CUDAGuard device_guard(mean_old.device());
  return gaussian_forward(in).mean_kl;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_surrogate_diag_gaussian_cuda(
    const at::Tensor& mean_old, const at::Tensor& log_std_old, const at::Tensor& mean_new,
    const at::Tensor& log_std_new, const at::Tensor& actions, const at::Tensor& logp_old,
    const at::Tensor& advantages) {
  const std::optional<at::Tensor> act(actions), lp(logp_old), adv(advantages);
  const kl::GaussianInputs in =
      kl::check_gaussian(mean_old, log_std_old, mean_new, log_std_new, {act, lp, adv});
  const c10::cuda::CUDAGuard device_guard(mean_old.device());
  const Outputs out = gaussian_forward(in);
  return {out.surrogate, out.mean_kl, out.max_kl};
}

std::tuple<at::Tensor, at::Tensor> kl_diag_gaussian_backward_cuda(
    const at::Tensor& grad_mean_kl, const std::optional<at::Tensor>& grad_surrogate,
    const at::Tensor& mean_old, const at::Tensor& log_std_old, const at::Tensor& mean_new,
    const at::Tensor& log_std_new, const std::optional<at::Tensor>& actions,
    const std::optional<at::Tensor>& logp_old, const std::optional<at::Tensor>& advantages) {
  const bool surrogate = grad_surrogate.has_value();
  const kl::GaussianInputs in =
      kl::check_gaussian_backward(grad_mean_kl, grad_surrogate, mean_old, log_std_old, mean_new,
                                  log_std_new, actions, logp_old, advantages);
  const c10::cuda::CUDAGuard device_guard(mean_old.device());
  at::Tensor grad_mean = at::empty_like(in.mean_new);
  at::Tensor grad_log_std = at::empty_like(in.mean_new);
  const at::Tensor gk = grad_mean_kl.contiguous();
  const at::Tensor gs = surrogate ? grad_surrogate->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(in.mean_old.scalar_type(), "kl_diag_gaussian_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const GaussGrad<scalar_t> fn{gauss_rows<scalar_t>(in), gk.data_ptr<scalar_t>(),
                                 surrogate ? gs.data_ptr<scalar_t>() : nullptr,
                                 grad_mean.data_ptr<scalar_t>(), grad_log_std.data_ptr<scalar_t>(),
                                 acc_t(1) / static_cast<acc_t>(in.B)};
    for_rows(fn, in.B);
  });
  return {grad_mean, log_std_new.dim() == 1 ? grad_log_std.sum(0) : grad_log_std};
}

Outputs categorical_forward(const kl::CategoricalInputs& in) {
  Outputs out;
  AT_DISPATCH_FLOATING_TYPES(in.logits_old.scalar_type(), "kl_categorical_cuda", [&] {
    dispatch_index(in.actions, in.surrogate, [&](auto tag) {
      using index_t = decltype(tag);
      const CatRows<scalar_t, index_t> fn{
          in.logits_old.data_ptr<scalar_t>(), in.logits_new.data_ptr<scalar_t>(),
          in.surrogate ? in.actions.data_ptr<index_t>() : nullptr,
          in.surrogate ? in.logp_old.data_ptr<scalar_t>() : nullptr,
          in.surrogate ? in.advantages.data_ptr<scalar_t>() : nullptr, in.K};
      out = reduce_rows<scalar_t>(fn, in.B, in.logits_old, in.surrogate);
    });
  });
  return out;
}

at::Tensor kl_categorical_cuda(const at::Tensor& logits_old, const at::Tensor& logits_new) {
  const std::optional<at::Tensor> none;
  const kl::CategoricalInputs in =
      kl::check_categorical(logits_old, logits_new, {none, none, none});
  const c10::cuda::CUDAGuard device_guard(logits_old.device());
  return categorical_forward(in).mean_kl;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_surrogate_categorical_cuda(
    const at::Tensor& logits_old, const at::Tensor& logits_new, const at::Tensor& actions,
    const at::Tensor& logp_old, const at::Tensor& advantages) {
  const std::optional<at::Tensor> act(actions), lp(logp_old), adv(advantages);
  const kl::CategoricalInputs in = kl::check_categorical(logits_old, logits_new, {act, lp, adv});
  const c10::cuda::CUDAGuard device_guard(logits_old.device());
  const Outputs out = categorical_forward(in);
  return {out.surrogate, out.mean_kl, out.max_kl};
}

at::Tensor kl_categorical_backward_cuda(const at::Tensor& grad_mean_kl,
                                        const std::optional<at::Tensor>& grad_surrogate,
                                        const at::Tensor& logits_old, const at::Tensor& logits_new,
                                        const std::optional<at::Tensor>& actions,
                                        const std::optional<at::Tensor>& logp_old,
                                        const std::optional<at::Tensor>& advantages) {
  const bool surrogate = grad_surrogate.has_value();
  const kl::CategoricalInputs in = kl::check_categorical_backward(
      grad_mean_kl, grad_surrogate, logits_old, logits_new, actions, logp_old, advantages);
  const c10::cuda::CUDAGuard device_guard(logits_old.device());
  at::Tensor grad_logits = at::empty_like(in.logits_new);
  const at::Tensor gk = grad_mean_kl.contiguous();
  const at::Tensor gs = surrogate ? grad_surrogate->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(in.logits_old.scalar_type(), "kl_categorical_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_index(in.actions, surrogate, [&](auto tag) {
      using index_t = decltype(tag);
      const CatRows<scalar_t, index_t> rows{
          in.logits_old.data_ptr<scalar_t>(), in.logits_new.data_ptr<scalar_t>(),
          surrogate ? in.actions.data_ptr<index_t>() : nullptr,
          surrogate ? in.logp_old.data_ptr<scalar_t>() : nullptr,
          surrogate ? in.advantages.data_ptr<scalar_t>() : nullptr, in.K};
      const CatGrad<scalar_t, index_t> fn{rows, gk.data_ptr<scalar_t>(),
                                          surrogate ? gs.data_ptr<scalar_t>() : nullptr,
                                          grad_logits.data_ptr<scalar_t>(),
                                          acc_t(1) / static_cast<acc_t>(in.B)};
      for_rows(fn, in.B);
    });
  });
  return grad_logits;
}

std::tuple<at::Tensor, at::Tensor> kl_metric_diag_gaussian_cuda(const at::Tensor& log_std,
                                                                const at::Tensor& u_mean,
                                                                const at::Tensor& u_log_std) {
  const kl::MetricGaussianInputs in = kl::check_metric_gaussian(log_std, u_mean, u_log_std);
  const c10::cuda::CUDAGuard device_guard(u_mean.device());
  at::Tensor m_mean = at::empty_like(in.u_mean);
  AT_DISPATCH_FLOATING_TYPES(in.u_mean.scalar_type(), "kl_metric_diag_gaussian_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const GaussMetric<scalar_t> fn{in.log_std.data_ptr<scalar_t>(), in.u_mean.data_ptr<scalar_t>(),
                                   m_mean.data_ptr<scalar_t>(), in.A, in.per_state ? in.A : 0,
                                   acc_t(1) / static_cast<acc_t>(in.B)};
    for_rows(fn, in.B);
  });
  // A state-independent log_std is shared by the B elements: B · (2 / B) = 2.
  const double scale = kl::kGaussMetricLogStd / (in.per_state ? static_cast<double>(in.B) : 1.0);
  return {m_mean, in.u_log_std * scale};
}

at::Tensor kl_metric_categorical_cuda(const at::Tensor& logits, const at::Tensor& u) {
  const kl::MetricCategoricalInputs in = kl::check_metric_categorical(logits, u);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  at::Tensor out = at::empty_like(in.u);
  AT_DISPATCH_FLOATING_TYPES(in.logits.scalar_type(), "kl_metric_categorical_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const CatMetric<scalar_t> fn{in.logits.data_ptr<scalar_t>(), in.u.data_ptr<scalar_t>(),
                                 out.data_ptr<scalar_t>(), in.K,
                                 acc_t(1) / static_cast<acc_t>(in.B)};
    for_rows(fn, in.B);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(trpo_ext, CUDA, m) {
  m.impl("kl_diag_gaussian", &kl_diag_gaussian_cuda);
  m.impl("kl_surrogate_diag_gaussian", &kl_surrogate_diag_gaussian_cuda);
  m.impl("kl_diag_gaussian_backward", &kl_diag_gaussian_backward_cuda);
  m.impl("kl_categorical", &kl_categorical_cuda);
  m.impl("kl_surrogate_categorical", &kl_surrogate_categorical_cuda);
  m.impl("kl_categorical_backward", &kl_categorical_backward_cuda);
  m.impl("kl_metric_diag_gaussian", &kl_metric_diag_gaussian_cuda);
  m.impl("kl_metric_categorical", &kl_metric_categorical_cuda);
}

}  // namespace trpo_ext
