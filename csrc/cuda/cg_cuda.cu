// Conjugate gradient passes on CUDA: three launches per iteration (curvature, residual, update),
// every scalar in the float64 state tensor, no host synchronisation.
//   host wrappers  init_cuda / step_cuda / finish_cuda — device guard, shared checks, outputs
//   launchers      launch_*<scalar_t>                  — dtype dispatch, grid from the device, stream
//   kernels        cg_init_kernel, cg_curvature_kernel, cg_residual_kernel, cg_update_kernel,
//                  cg_finish_kernel
// A reduction is one launch: each block writes its partial sum to the state, and the last block to
// finish (a ticket counter in the state) adds the partials in block order and runs the scalar step
// of cg.h, then resets the counter.  The order of the additions depends only on the grid, so results
// are deterministic, and the kernels are capturable in a CUDA graph.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "cg.h"
#include "cuda/cuda_utils.cuh"

namespace trpo_ext {
namespace cg {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block; the result is valid in thread 0.  `scratch` holds kWarps values.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* scratch) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = threadIdx.x < kWarps ? scratch[threadIdx.x] : acc_t(0);
  if (warp == 0) v = warp_sum(v);
  return v;
}

// Publishes this block's partial sums (thread 0's a and b) and returns, in every thread of the block,
// whether this block is the last of the grid to do so.  The last block then sees every partial.
__device__ __forceinline__ bool publish_partials(double* __restrict__ state, double a, double b) {
  __shared__ bool is_last;
  if (threadIdx.x == 0) {
    state[kPartials + 2 * blockIdx.x] = a;
    state[kPartials + 2 * blockIdx.x + 1] = b;
    __threadfence();
    unsigned int* counter = reinterpret_cast<unsigned int*>(state + kCounter);
    is_last = atomicAdd(counter, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  return is_last;
}

// In the last block: Σ partials over the grid, in block order within each thread's stride and a fixed
// tree across threads.  Reads through volatile: the partials were written by other blocks.
__device__ __forceinline__ void gather_partials(double* __restrict__ state, double* a, double* b) {
  __shared__ double scratch[kWarps];
  const volatile double* part = state + kPartials;
  double sa = 0.0, sb = 0.0;
  for (unsigned int i = threadIdx.x; i < gridDim.x; i += blockDim.x) {
    sa += part[2 * i];
    sb += part[2 * i + 1];
  }
  sa = block_sum(sa, scratch);
  sb = block_sum(sb, scratch);
  *a = sa;
  *b = sb;
}

__device__ __forceinline__ void reset_counter(double* __restrict__ state) {
  *reinterpret_cast<unsigned int*>(state + kCounter) = 0u;
}

// r = b − (A + damping·I)x0 (or b), p = r; rᵀr and bᵀb → finish_init.
template <typename scalar_t, typename acc_t>
__global__ void cg_init_kernel(const scalar_t* __restrict__ b,    // [n]
                               const scalar_t* __restrict__ x0,   // [n] or null
                               const scalar_t* __restrict__ Ax0,  // [n] or null
                               scalar_t* __restrict__ r,          // [n]
                               scalar_t* __restrict__ p,          // [n]
                               double* __restrict__ state,        // [kStateSize]
                               int64_t n, acc_t damping, double rtol, double atol) {
  __shared__ acc_t scratch[kWarps];
  acc_t rr = 0, bb = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const acc_t bi = static_cast<acc_t>(b[i]);
    const acc_t ri = x0 ? bi - damped<acc_t>(Ax0[i], x0[i], damping) : bi;
    r[i] = static_cast<scalar_t>(ri);
    p[i] = static_cast<scalar_t>(ri);
    rr += ri * ri;
    bb += bi * bi;
  }
  rr = block_sum(rr, scratch);
  bb = block_sum(bb, scratch);
  if (publish_partials(state, static_cast<double>(rr), static_cast<double>(bb))) {
    double srr, sbb;
    gather_partials(state, &srr, &sbb);
    if (threadIdx.x == 0) {
      finish_init(state, srr, sbb, rtol, atol);  // zeroes the scalars, counter included
      reset_counter(state);
    }
  }
}

// pᵀ(Ap + damping·p) → finish_curvature.  Also clears the apply flag of the previous iteration.
template <typename scalar_t, typename acc_t>
__global__ void cg_curvature_kernel(const scalar_t* __restrict__ p,   // [n]
                                    const scalar_t* __restrict__ Ap,  // [n]
                                    double* __restrict__ state,       // [kStateSize]
                                    int64_t n, acc_t damping) {
  __shared__ acc_t scratch[kWarps];
  // Nothing in this launch reads the flag; the update pass of this iteration reads it.
  if (blockIdx.x == 0 && threadIdx.x == 0) state[kApply] = 0.0;
  if (state[kStatus] != kRunning) return;  // the same value in every block: all return together
  acc_t sum = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const acc_t pi = static_cast<acc_t>(p[i]);
    sum += pi * damped<acc_t>(Ap[i], pi, damping);
  }
  sum = block_sum(sum, scratch);
  if (publish_partials(state, static_cast<double>(sum), 0.0)) {
    double pAp, unused;
    gather_partials(state, &pAp, &unused);
    if (threadIdx.x == 0) {
      finish_curvature(state, pAp);
      reset_counter(state);
    }
  }
}

// ‖r − alpha·(Ap + damping·p)‖² of the candidate residual → finish_residual.
template <typename scalar_t, typename acc_t>
__global__ void cg_residual_kernel(const scalar_t* __restrict__ r,   // [n]
                                   const scalar_t* __restrict__ p,   // [n]
                                   const scalar_t* __restrict__ Ap,  // [n]
                                   double* __restrict__ state,       // [kStateSize]
                                   int64_t n, acc_t damping) {
  __shared__ acc_t scratch[kWarps];
  if (state[kStatus] != kRunning) return;
  const acc_t alpha = static_cast<acc_t>(state[kAlpha]);
  acc_t sum = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const acc_t ri = residual_candidate<acc_t>(r[i], Ap[i], p[i], alpha, damping);
    sum += ri * ri;
  }
  sum = block_sum(sum, scratch);
  if (publish_partials(state, static_cast<double>(sum), 0.0)) {
    double rr, unused;
    gather_partials(state, &rr, &unused);
    if (threadIdx.x == 0) {
      finish_residual(state, rr);
      reset_counter(state);
    }
  }
}

// Commits the iteration: x += alpha·p, r = r', p = r' + beta·p.
template <typename scalar_t, typename acc_t>
__global__ void cg_update_kernel(scalar_t* __restrict__ x,          // [n]
                                 scalar_t* __restrict__ r,          // [n]
                                 scalar_t* __restrict__ p,          // [n]
                                 const scalar_t* __restrict__ Ap,   // [n]
                                 const double* __restrict__ state,  // [kStateSize]
                                 int64_t n, acc_t damping) {
  if (state[kApply] == 0.0) return;
  const acc_t alpha = static_cast<acc_t>(state[kAlpha]);
  const acc_t beta = static_cast<acc_t>(state[kBeta]);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const acc_t pi = static_cast<acc_t>(p[i]);
    const acc_t ri = residual_candidate<acc_t>(r[i], Ap[i], pi, alpha, damping);
    x[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) + alpha * pi);
    r[i] = static_cast<scalar_t>(ri);
    p[i] = static_cast<scalar_t>(ri + beta * pi);
  }
}

// xᵀ(b − r) → state[kXAx] and the 0-d output.
template <typename scalar_t, typename acc_t>
__global__ void cg_finish_kernel(const scalar_t* __restrict__ b,  // [n]
                                 const scalar_t* __restrict__ x,  // [n]
                                 const scalar_t* __restrict__ r,  // [n]
                                 double* __restrict__ state,      // [kStateSize]
                                 scalar_t* __restrict__ xAx,      // []
                                 int64_t n) {
  __shared__ acc_t scratch[kWarps];
  acc_t sum = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    sum += static_cast<acc_t>(x[i]) * (static_cast<acc_t>(b[i]) - static_cast<acc_t>(r[i]));
  }
  sum = block_sum(sum, scratch);
  if (publish_partials(state, static_cast<double>(sum), 0.0)) {
    double total, unused;
    gather_partials(state, &total, &unused);
    if (threadIdx.x == 0) {
      state[kXAx] = total;
      *xAx = static_cast<scalar_t>(total);
      reset_counter(state);
    }
  }
}

// Enough blocks to fill the device, at most one per kThreads elements, at most kMaxBlocks (the
// partials' room in the state), and at least one: the reductions' last block also runs the scalar
// step, which must happen even for an empty vector.
unsigned int grid_for(int64_t n) {
  const cuda::DeviceShape dev = cuda::device_shape();
  const int64_t fill = int64_t(dev.sm_count) * std::max(1, dev.max_threads_per_sm / kThreads);
  const int64_t need = std::max<int64_t>(1, (n + kThreads - 1) / kThreads);
  return static_cast<unsigned int>(std::min({fill, need, kMaxBlocks}));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> init_cuda(const at::Tensor& b,
                                                         const c10::optional<at::Tensor>& x0,
                                                         const c10::optional<at::Tensor>& Ax0,
                                                         double damping, double rtol, double atol) {
  const c10::cuda::CUDAGuard device_guard(b.device());
  check_init(b, x0, Ax0, damping, rtol, atol);
  const at::Tensor bc = b.contiguous();
  at::Tensor r = at::empty_like(bc);
  at::Tensor p = at::empty_like(bc);
  // Zeroed: the reductions' ticket counter must start at 0.
  at::Tensor state = at::zeros({kStateSize}, b.options().dtype(at::kDouble));
  const bool has_x0 = x0.has_value();
  const at::Tensor xc = has_x0 ? x0->contiguous() : at::Tensor();
  const at::Tensor Axc = has_x0 ? Ax0->contiguous() : at::Tensor();
  const int64_t n = bc.numel();
  const unsigned int grid = grid_for(n);
  const cudaStream_t stream = cuda::current_stream();
  AT_DISPATCH_FLOATING_TYPES(bc.scalar_type(), "cg_init_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cg_init_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        bc.data_ptr<scalar_t>(), has_x0 ? xc.data_ptr<scalar_t>() : nullptr,
        has_x0 ? Axc.data_ptr<scalar_t>() : nullptr, r.data_ptr<scalar_t>(),
        p.data_ptr<scalar_t>(), state.data_ptr<double>(), n, static_cast<acc_t>(damping), rtol,
        atol);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {r, p, state};
}

void step_cuda(const at::Tensor& x, const at::Tensor& r, const at::Tensor& p, const at::Tensor& Ap,
               const at::Tensor& state, double damping) {
  const c10::cuda::CUDAGuard device_guard(r.device());
  check_step(x, r, p, Ap, state, damping);
  const at::Tensor Apc = Ap.contiguous();
  const int64_t n = r.numel();
  const unsigned int grid = grid_for(n);
  const cudaStream_t stream = cuda::current_stream();
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "cg_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t d = static_cast<acc_t>(damping);
    scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* rp = r.data_ptr<scalar_t>();
    scalar_t* pp = p.data_ptr<scalar_t>();
    const scalar_t* ap = Apc.data_ptr<scalar_t>();
    double* s = state.data_ptr<double>();
    cg_curvature_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(pp, ap, s, n, d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    cg_residual_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(rp, pp, ap, s, n, d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    cg_update_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(xp, rp, pp, ap, s, n, d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor finish_cuda(const at::Tensor& b, const at::Tensor& x, const at::Tensor& r,
                       const at::Tensor& state) {
  const c10::cuda::CUDAGuard device_guard(b.device());
  check_finish(b, x, r, state);
  const at::Tensor bc = b.contiguous();
  at::Tensor xAx = at::empty({}, b.options());
  const int64_t n = bc.numel();
  const unsigned int grid = grid_for(n);
  const cudaStream_t stream = cuda::current_stream();
  AT_DISPATCH_FLOATING_TYPES(bc.scalar_type(), "cg_finish_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cg_finish_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        bc.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(),
        state.data_ptr<double>(), xAx.data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return xAx;
}

#ifndef TRPO_EXT_NO_OP_REGISTRATION
TORCH_LIBRARY_IMPL(trpo_ext, CUDA, m) {
  m.impl("cg_init", &init_cuda);
  m.impl("cg_step", &step_cuda);
  m.impl("cg_finish", &finish_cuda);
}
#endif

}  // namespace cg
}  // namespace trpo_ext
