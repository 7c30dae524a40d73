// GAE on CUDA: a chunked scan of the linear recurrence, parallel over environments and time.
//   host wrapper  gae_cuda   — device guard, checks (shared with the CPU), outputs, chunking plan,
//                              dtype dispatch, launches on the current stream
//   kernels       short horizons: gae_fused_block_kernel, one launch — each block owns a few
//                 environments and all of their time steps, scanning chunk carries in shared memory;
//                 long horizons: gae_chunk_aggregate_kernel → gae_carry_scan_kernel → gae_apply_kernel.
// The per-element math is gae.h's, the same the CPU kernel runs and CI tests.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "cuda/cuda_utils.cuh"
#include "gae.h"

namespace trpo_ext {
namespace {

using gae::Affine;

constexpr int kThreads = 256;
constexpr int kScanThreads = 512;
constexpr int kFusedThreads = 1024;
// The one-launch path is taken while each of its threads walks at most this many steps per pass.
constexpr int64_t kFusedMaxChunk = 64;
// A lane (one environment over one chunk) shorter than this does too little to pay for the extra
// aggregate pass.
constexpr int64_t kMinChunk = 32;

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_step(const scalar_t* __restrict__ rewards,
                                          const scalar_t* __restrict__ values,
                                          const scalar_t* __restrict__ next_values,
                                          const bool* __restrict__ terminated,
                                          const bool* __restrict__ done, int64_t j, acc_t gamma,
                                          acc_t gamma_lam, acc_t& v, acc_t& d, acc_t& c) {
  v = static_cast<acc_t>(values[j]);
  d = gae::td_residual<acc_t>(static_cast<acc_t>(rewards[j]), v,
                              static_cast<acc_t>(next_values[j]), terminated[j], gamma);
  c = gae::trace_coef<acc_t>(done[j], gamma_lam);
}

// The composed map of rows [t0, t1) of environment n (the chunk's aggregate).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ Affine<acc_t> compose_chunk(
    const scalar_t* __restrict__ rewards, const scalar_t* __restrict__ values,
    const scalar_t* __restrict__ next_values, const bool* __restrict__ terminated,
    const bool* __restrict__ done, int64_t t0, int64_t t1, int64_t N, int64_t n, acc_t gamma,
    acc_t gamma_lam) {
  Affine<acc_t> f = gae::identity<acc_t>();
  for (int64_t t = t1 - 1; t >= t0; --t) {
    acc_t v, d, k;
    load_step(rewards, values, next_values, terminated, done, t * N + n, gamma, gamma_lam, v, d, k);
    f = gae::combine<acc_t>({d, k}, f);
  }
  return f;
}

// The recursion over rows [t0, t1) of environment n from carry-in a, writing both outputs.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void replay_chunk(
    const scalar_t* __restrict__ rewards, const scalar_t* __restrict__ values,
    const scalar_t* __restrict__ next_values, const bool* __restrict__ terminated,
    const bool* __restrict__ done, scalar_t* __restrict__ advantages,
    scalar_t* __restrict__ returns, int64_t t0, int64_t t1, int64_t N, int64_t n, acc_t a,
    acc_t gamma, acc_t gamma_lam) {
  for (int64_t t = t1 - 1; t >= t0; --t) {
    const int64_t j = t * N + n;
    acc_t v, d, k;
    load_step(rewards, values, next_values, terminated, done, j, gamma, gamma_lam, v, d, k);
    a = gae::step<acc_t>(d, k, a);
    advantages[j] = static_cast<scalar_t>(a);
    returns[j] = static_cast<scalar_t>(a + v);
  }
}

// One thread per lane (chunk c >= 1, environment n); n is fastest so that a warp reads one row.
template <typename scalar_t, typename acc_t>
__global__ void gae_chunk_aggregate_kernel(const scalar_t* __restrict__ rewards,      // [T, N]
                                           const scalar_t* __restrict__ values,       // [T, N]
                                           const scalar_t* __restrict__ next_values,  // [T, N]
                                           const bool* __restrict__ terminated,       // [T, N]
                                           const bool* __restrict__ done,             // [T, N]
                                           Affine<acc_t>* __restrict__ agg,           // [C, N]
                                           int64_t T, int64_t N, int64_t C, int64_t L,
                                           acc_t gamma, acc_t gamma_lam) {
  const int64_t lane = N + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (lane >= C * N) return;
  const int64_t c = lane / N;
  const int64_t n = lane - c * N;
  const int64_t t0 = c * L;
  const int64_t t1 = min(t0 + L, T);
  agg[lane] = compose_chunk(rewards, values, next_values, terminated, done, t0, t1, N, n, gamma,
                            gamma_lam);
}

// One block per environment: carry[c, n] = A at the first row of chunk c + 1, i.e. the composition
// agg[c + 1] ∘ ... ∘ agg[C - 1] applied to 0.  Each thread composes a contiguous run of chunks, a
// suffix scan over the threads in shared memory combines the runs, and each thread then walks its
// run backward.
template <typename acc_t>
__global__ void gae_carry_scan_kernel(const Affine<acc_t>* __restrict__ agg,  // [C, N]
                                      acc_t* __restrict__ carry,              // [C, N]
                                      int64_t N, int64_t C) {
  __shared__ Affine<acc_t> runs[kScanThreads];
  const int64_t n = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t per = (C + kScanThreads - 1) / kScanThreads;
  const int64_t s = min(static_cast<int64_t>(tid) * per, C);
  const int64_t e = min(s + per, C);
  // Chunk 0's map never flows anywhere: runs cover chunks [max(s, 1), e).
  Affine<acc_t> f = gae::identity<acc_t>();
  for (int64_t c = e - 1; c >= max(s, int64_t(1)); --c) f = gae::combine<acc_t>(agg[c * N + n], f);
  runs[tid] = f;
  __syncthreads();
  for (int offset = 1; offset < kScanThreads; offset *= 2) {
    Affine<acc_t> x = runs[tid];
    if (tid + offset < kScanThreads) x = gae::combine<acc_t>(x, runs[tid + offset]);
    __syncthreads();
    runs[tid] = x;
    __syncthreads();
  }
  // Value flowing into the end of this thread's run: everything after it, applied to 0.
  acc_t value = tid + 1 < kScanThreads ? runs[tid + 1].a : acc_t(0);
  for (int64_t c = e - 1; c >= s; --c) {
    carry[c * N + n] = value;
    if (c >= 1) {
      const Affine<acc_t> g = agg[c * N + n];
      value = gae::step<acc_t>(g.a, g.b, value);
    }
  }
}

// One thread per lane (chunk c, environment n): the recursion from the chunk's carry-in, writing
// advantages and returns.  carry == nullptr means a single chunk (carry-in 0).
template <typename scalar_t, typename acc_t>
__global__ void gae_apply_kernel(const scalar_t* __restrict__ rewards,      // [T, N]
                                 const scalar_t* __restrict__ values,       // [T, N]
                                 const scalar_t* __restrict__ next_values,  // [T, N]
                                 const bool* __restrict__ terminated,       // [T, N]
                                 const bool* __restrict__ done,             // [T, N]
                                 const acc_t* __restrict__ carry,           // [C, N] or null
                                 scalar_t* __restrict__ advantages,         // [T, N]
                                 scalar_t* __restrict__ returns,            // [T, N]
                                 int64_t T, int64_t N, int64_t C, int64_t L, acc_t gamma,
                                 acc_t gamma_lam) {
  const int64_t lane = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (lane >= C * N) return;
  const int64_t c = lane / N;
  const int64_t n = lane - c * N;
  const int64_t t0 = c * L;
  const int64_t t1 = min(t0 + L, T);
  replay_chunk(rewards, values, next_values, terminated, done, advantages, returns, t0, t1, N, n,
               carry ? carry[lane] : acc_t(0), gamma, gamma_lam);
}

// Short horizons in one launch.  Block (E environments) × (Cb chunks): thread (x, y) owns environment
// blockIdx.x * E + x over chunk y of length L.  Pass 1 composes each chunk's map into shared memory,
// one thread per environment walks the Cb chunk maps backward to give every chunk its carry-in, and
// pass 2 replays each chunk from its carry.  Inputs are read twice, from L2 the second time.
template <typename scalar_t, typename acc_t>
__global__ void gae_fused_block_kernel(const scalar_t* __restrict__ rewards,      // [T, N]
                                       const scalar_t* __restrict__ values,       // [T, N]
                                       const scalar_t* __restrict__ next_values,  // [T, N]
                                       const bool* __restrict__ terminated,       // [T, N]
                                       const bool* __restrict__ done,             // [T, N]
                                       scalar_t* __restrict__ advantages,         // [T, N]
                                       scalar_t* __restrict__ returns,            // [T, N]
                                       int64_t T, int64_t N, int64_t L, acc_t gamma,
                                       acc_t gamma_lam) {
  __shared__ Affine<acc_t> maps[kFusedThreads];  // [Cb, E]
  __shared__ acc_t carries[kFusedThreads];       // [Cb, E]
  const int E = blockDim.x;
  const int Cb = blockDim.y;
  const int slot = threadIdx.y * E + threadIdx.x;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * E + threadIdx.x;
  const int64_t t0 = static_cast<int64_t>(threadIdx.y) * L;
  const int64_t t1 = min(t0 + L, T);
  const bool active = n < N;
  if (active && threadIdx.y > 0) {
    maps[slot] = compose_chunk(rewards, values, next_values, terminated, done, t0, t1, N, n,
                               gamma, gamma_lam);
  }
  __syncthreads();
  if (active && threadIdx.y == 0) {
    acc_t value = acc_t(0);
    for (int c = Cb - 1; c >= 0; --c) {
      carries[c * E + threadIdx.x] = value;
      if (c > 0) {
        const Affine<acc_t> f = maps[c * E + threadIdx.x];
        value = gae::step<acc_t>(f.a, f.b, value);
      }
    }
  }
  __syncthreads();
  if (!active) return;
  replay_chunk(rewards, values, next_values, terminated, done, advantages, returns, t0, t1, N, n,
               carries[slot], gamma, gamma_lam);
}

std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                            const at::Tensor& next_values,
                                            const at::Tensor& terminated, const at::Tensor& done,
                                            double gamma, double lam) {
  const c10::cuda::CUDAGuard device_guard(rewards.device());
  const gae::Inputs in =
      gae::check_inputs(rewards, values, next_values, terminated, done, gamma, lam);
  at::Tensor advantages = at::empty_like(in.rewards);
  at::Tensor returns = at::empty_like(in.rewards);
  const int64_t T = in.T;
  const int64_t N = in.N;
  if (T == 0 || N == 0) return {advantages, returns};

  const cuda::DeviceShape dev = cuda::device_shape();
  // One-launch plan: E environments per block (8 adjacent floats fill a 32-byte sector), the rest of
  // the block's threads spread over time.
  const int fused_E = static_cast<int>(std::min<int64_t>(N, 8));
  const int fused_Cb = kFusedThreads / fused_E;
  const int64_t fused_L = (T + fused_Cb - 1) / fused_Cb;
  const bool fused = fused_L <= kFusedMaxChunk && (N + fused_E - 1) / fused_E < (int64_t(1) << 31);

  // Three-kernel plan: enough lanes to fill every SM, no chunk shorter than kMinChunk.
  const int64_t wanted_lanes = int64_t(dev.sm_count) * dev.max_threads_per_sm;
  int64_t C = 1;
  if (N < wanted_lanes && T >= 2 * kMinChunk) {
    C = std::min((wanted_lanes + N - 1) / N, T / kMinChunk);
  }
  const int64_t L = (T + C - 1) / C;
  C = (T + L - 1) / L;
  TRPO_CHECK(fused || C * N / kThreads + 1 < (int64_t(1) << 31),
             "gae: rollout too large for one launch, ", shape_str(rewards));
  const cudaStream_t stream = cuda::current_stream();

  AT_DISPATCH_FLOATING_TYPES(in.rewards.scalar_type(), "gae_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t g = static_cast<acc_t>(gamma);
    const acc_t gl = static_cast<acc_t>(gamma * lam);
    const scalar_t* r = in.rewards.data_ptr<scalar_t>();
    const scalar_t* v = in.values.data_ptr<scalar_t>();
    const scalar_t* nv = in.next_values.data_ptr<scalar_t>();
    const bool* term = in.terminated.data_ptr<bool>();
    const bool* dn = in.done.data_ptr<bool>();
    if (fused) {
      gae_fused_block_kernel<scalar_t, acc_t>
          <<<static_cast<unsigned int>((N + fused_E - 1) / fused_E), dim3(fused_E, fused_Cb), 0,
             stream>>>(r, v, nv, term, dn, advantages.data_ptr<scalar_t>(),
                       returns.data_ptr<scalar_t>(), T, N, fused_L, g, gl);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    at::Tensor carry;
    if (C > 1) {
      const auto acc_opts = in.rewards.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
      at::Tensor agg = at::empty({C, N, 2}, acc_opts);
      carry = at::empty({C, N}, acc_opts);
      auto* agg_ptr = reinterpret_cast<Affine<acc_t>*>(agg.data_ptr<acc_t>());
      gae_chunk_aggregate_kernel<scalar_t, acc_t>
          <<<cuda::blocks_for((C - 1) * N, kThreads), kThreads, 0, stream>>>(r, v, nv, term, dn, agg_ptr,
                                                                      T, N, C, L, g, gl);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      gae_carry_scan_kernel<acc_t><<<static_cast<unsigned int>(N), kScanThreads, 0, stream>>>(
          agg_ptr, carry.data_ptr<acc_t>(), N, C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    gae_apply_kernel<scalar_t, acc_t><<<cuda::blocks_for(C * N, kThreads), kThreads, 0, stream>>>(
        r, v, nv, term, dn, carry.defined() ? carry.data_ptr<acc_t>() : nullptr,
        advantages.data_ptr<scalar_t>(), returns.data_ptr<scalar_t>(), T, N, C, L, g, gl);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {advantages.view(rewards.sizes()), returns.view(rewards.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(trpo_ext, CUDA, m) { m.impl("gae", &gae_cuda); }

}  // namespace trpo_ext
