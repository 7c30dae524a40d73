// KL and surrogate reductions on CUDA.
//   host wrappers  kl_*_cuda            — device guard, checks (shared with the CPU), outputs
//   launchers      launch_*<scalar_t>   — dtype dispatch, lanes per row, grid from the device
//   kernels        kl_diag_gaussian_reduce_kernel, kl_categorical_reduce_kernel (forward),
//                  kl_diag_gaussian_tiled_reduce_kernel, kl_categorical_tiled_reduce_kernel
//                  (forward, rows of at most 32 elements),
//                  kl_diag_gaussian_backward_kernel, kl_categorical_backward_kernel
//
// Forward: ONE kernel launch per call (plus a 4-byte cudaMemsetAsync of the completion counter, a
// copy-engine operation rather than a kernel).  Each row of the batch is handled by a group of G
// lanes of one warp (G = 1 for rows of 1-2 elements, up to 32 for wide rows such as K = 1000), so
// that the loads of a warp are contiguous whatever the row width; a group's partial row results
// merge by shuffles (for the categorical, the online log-sum-exp pairs of kl.h).  Rows are visited
// by a grid-stride loop whose trip count is uniform across each warp, so every shuffle has all 32
// lanes present.  Each block reduces its rows' (Σ KL, Σ surrogate, max KL) in a fixed tree, writes
// them to its slot of a workspace, and the last block to finish (a __threadfence + atomic counter)
// adds the slots in slot order and writes the three outputs: single pass, deterministic for a
// given device, no host synchronisation.  Batch sums are in double (see kl.h).
//
// Rows of at most 32 elements (a state-independent [A] log_std with A ≤ 32, or K ≤ 32 classes) take
// the tiled path instead, kl_diag_gaussian_tiled_reduce_kernel and kl_categorical_tiled_reduce_kernel:
// a block copies a tile of consecutive rows into shared memory with coalesced loads, then each
// thread reduces one row with a sequential loop (same kl.h helpers, same reduction and finish; the
// two paths agree to rounding).  Per-state [B, A] log_stds and wider rows keep the G-lane kernels.
// The environment variable TRPO_EXT_KL_CUDA_TILES=0 (read once per process) sends every forward
// reduction down the G-lane path, to compare the two or to fall back;
// TRPO_EXT_KL_CUDA_CAT_TWO_PASS=1 gives the tiled categorical kernel a two-pass row
// (cat_row_two_pass), to measure the two rows.
//
// Out-of-range class indices cannot be reported without a host synchronisation: the row's
// log-probability becomes NaN (no out-of-bounds read), which makes the surrogate and its gradient
// NaN.  The CPU raises instead.
//
// Backward: one launch writing per-element gradients; a state-independent [A] log_std then sums
// its [B, A] per-row terms over the batch with at::sum (a second, reduction launch).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <optional>
#include <type_traits>

#include "cuda/cuda_utils.cuh"
#include "kl.h"

namespace trpo_ext {
namespace {

using kl::CatRow;
using kl::Sums;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Lanes per row: enough that a warp's loads cover contiguous memory, few enough that lanes are
// not mostly idle.
template <typename F>
void with_group_lanes(int64_t width, const F& f) {
  if (width <= 2) {
    f(std::integral_constant<int, 1>{});
  } else if (width <= 4) {
    f(std::integral_constant<int, 4>{});
  } else if (width <= 8) {
    f(std::integral_constant<int, 8>{});
  } else {
    f(std::integral_constant<int, 32>{});
  }
}

template <typename F>
void dispatch_index(at::ScalarType t, const F& f) {
  if (t == at::kInt) {
    f(int32_t{});
  } else {
    f(int64_t{});
  }
}

// Visits the rows of the batch, G lanes per row, with a loop whose trip count is the same for all
// lanes of a warp.  body(row, valid, sub) runs on every lane; `sub` is the lane's index in its group.
template <int G, typename Body>
__device__ __forceinline__ void for_rows(int64_t B, const Body& body) {
  constexpr int kRowsPerWarp = 32 / G;
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t base = warp * kRowsPerWarp; base < B; base += warps * kRowsPerWarp) {
    const int64_t row = base + lane / G;
    body(row, row < B, lane % G);
  }
}

// Sum over the G lanes of a group; every lane of the group gets the total.
template <int G, typename T>
__device__ __forceinline__ T group_sum(T v) {
#pragma unroll
  for (int off = G / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

template <typename acc_t>
__device__ __forceinline__ CatRow<acc_t> shfl_xor_row(const CatRow<acc_t>& r, int off) {
  return {__shfl_xor_sync(kFullMask, r.max_old, off), __shfl_xor_sync(kFullMask, r.sum_old, off),
          __shfl_xor_sync(kFullMask, r.cross, off), __shfl_xor_sync(kFullMask, r.max_new, off),
          __shfl_xor_sync(kFullMask, r.sum_new, off)};
}

template <int G, typename acc_t>
__device__ __forceinline__ CatRow<acc_t> group_merge(CatRow<acc_t> r) {
#pragma unroll
  for (int off = G / 2; off > 0; off >>= 1) r = kl::cat_merge(r, shfl_xor_row(r, off));
  return r;
}

__device__ __forceinline__ Sums warp_reduce(Sums s) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    s.kl += __shfl_xor_sync(kFullMask, s.kl, off);
    s.surrogate += __shfl_xor_sync(kFullMask, s.surrogate, off);
    s.max_kl = kl::nan_max(s.max_kl, __shfl_xor_sync(kFullMask, s.max_kl, off));
  }
  return s;
}

// Fixed-order block reduction; the result is valid on thread 0.  blockDim.x is a multiple of 32,
// at most kThreads (the tiled kernels run blocks of fewer threads).
__device__ __forceinline__ Sums block_reduce(Sums s, Sums* scratch /* [kWarps] shared */) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  s = warp_reduce(s);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < static_cast<int>(blockDim.x >> 5) ? scratch[lane] : kl::sums_empty();
    s = warp_reduce(s);
  }
  return s;
}

// Publishes this block's partial sums; the last block to finish adds all partials in slot order
// and writes the outputs.
template <typename scalar_t>
__device__ __forceinline__ void finish_reduction(Sums block_sums, Sums* __restrict__ partials,
                                                 unsigned int* __restrict__ blocks_done, int64_t B,
                                                 scalar_t* __restrict__ out_surrogate,
                                                 scalar_t* __restrict__ out_mean_kl,
                                                 scalar_t* __restrict__ out_max_kl) {
  __shared__ Sums scratch[kWarps];
  __shared__ bool is_last;
  block_sums = block_reduce(block_sums, scratch);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = block_sums;
    __threadfence();  // the partial is visible device-wide before the counter says so
    is_last = atomicAdd(blocks_done, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  Sums s = kl::sums_empty();
  for (int64_t i = threadIdx.x; i < gridDim.x; i += blockDim.x) {
    // __ldcg: read through L2, never a stale L1 line of another block's slot.
    const Sums p{__ldcg(&partials[i].kl), __ldcg(&partials[i].surrogate),
                 __ldcg(&partials[i].max_kl)};
    s = kl::sums_merge(s, p);
  }
  s = block_reduce(s, scratch);
  if (threadIdx.x == 0) {
    const double inv_B = 1.0 / static_cast<double>(B);
    *out_mean_kl = static_cast<scalar_t>(s.kl * inv_B);
    if (out_surrogate != nullptr) *out_surrogate = static_cast<scalar_t>(s.surrogate * inv_B);
    if (out_max_kl != nullptr) *out_max_kl = static_cast<scalar_t>(s.max_kl);
  }
}

// --- diagonal Gaussian -------------------------------------------------------------------------

template <typename scalar_t, typename acc_t, int G, bool kSurrogate>
__global__ void __launch_bounds__(kThreads) kl_diag_gaussian_reduce_kernel(
    const scalar_t* __restrict__ mean_old,     // [B, A]
    const scalar_t* __restrict__ log_std_old,  // [A] or [B, A] (row stride lo_stride)
    const scalar_t* __restrict__ mean_new,     // [B, A]
    const scalar_t* __restrict__ log_std_new,  // [A] or [B, A] (row stride ln_stride)
    const scalar_t* __restrict__ actions,      // [B, A], surrogate only
    const scalar_t* __restrict__ logp_old,     // [B], surrogate only
    const scalar_t* __restrict__ advantages,   // [B], surrogate only
    int64_t B, int64_t A, int64_t lo_stride, int64_t ln_stride,
    Sums* __restrict__ partials,              // [gridDim.x]
    unsigned int* __restrict__ blocks_done,   // [1], zero on entry
    scalar_t* __restrict__ out_surrogate,     // [] or null
    scalar_t* __restrict__ out_mean_kl,       // []
    scalar_t* __restrict__ out_max_kl) {      // [] or null
  Sums sums = kl::sums_empty();
  for_rows<G>(B, [&](int64_t row, bool valid, int sub) {
    acc_t kl_part = 0;
    acc_t logp_part = 0;
    if (valid) {
      for (int64_t a = sub; a < A; a += G) {
        const int64_t j = row * A + a;
        const acc_t ln = static_cast<acc_t>(log_std_new[row * ln_stride + a]);
        const acc_t lo = static_cast<acc_t>(log_std_old[row * lo_stride + a]);
        const acc_t inv_std = kl::k_exp(-ln);
        const acc_t mn = static_cast<acc_t>(mean_new[j]);
        kl_part += kl::gaussian_kl_from_parts<acc_t>(kl::gaussian_kl_scale_term<acc_t>(lo, ln),
                                                     inv_std, static_cast<acc_t>(mean_old[j]), mn);
        if (kSurrogate) {
          logp_part += kl::gaussian_log_prob_from_parts<acc_t>(static_cast<acc_t>(actions[j]), mn,
                                                               ln, inv_std);
        }
      }
    }
    const acc_t kl_row = group_sum<G>(kl_part);
    const acc_t logp = kSurrogate ? group_sum<G>(logp_part) : acc_t(0);
    if (valid && sub == 0) {
      sums.kl += static_cast<double>(kl_row);
      sums.max_kl = kl::nan_max(sums.max_kl, static_cast<double>(kl_row));
      if (kSurrogate) {
        sums.surrogate += static_cast<double>(kl::surrogate_term<acc_t>(
            logp - static_cast<acc_t>(A * kl::kHalfLog2Pi), static_cast<acc_t>(logp_old[row]),
            static_cast<acc_t>(advantages[row])));
      }
    }
  });
  finish_reduction<scalar_t>(sums, partials, blocks_done, B, out_surrogate, out_mean_kl,
                             out_max_kl);
}

template <typename scalar_t, typename acc_t, int G, bool kSurrogate>
__global__ void __launch_bounds__(kThreads) kl_diag_gaussian_backward_kernel(
    const scalar_t* __restrict__ grad_mean_kl,    // []
    const scalar_t* __restrict__ grad_surrogate,  // [], surrogate only
    const scalar_t* __restrict__ mean_old,        // [B, A]
    const scalar_t* __restrict__ log_std_old,     // [A] or [B, A] (row stride lo_stride)
    const scalar_t* __restrict__ mean_new,        // [B, A]
    const scalar_t* __restrict__ log_std_new,     // [A] or [B, A] (row stride ln_stride)
    const scalar_t* __restrict__ actions,         // [B, A], surrogate only
    const scalar_t* __restrict__ logp_old,        // [B], surrogate only
    const scalar_t* __restrict__ advantages,      // [B], surrogate only
    scalar_t* __restrict__ grad_mean,             // [B, A]
    scalar_t* __restrict__ grad_log_std,          // [B, A] (per-row terms)
    int64_t B, int64_t A, int64_t lo_stride, int64_t ln_stride) {
  const acc_t inv_B = acc_t(1) / static_cast<acc_t>(B);
  const acc_t gk = static_cast<acc_t>(*grad_mean_kl) * inv_B;
  const acc_t gs = kSurrogate ? static_cast<acc_t>(*grad_surrogate) * inv_B : acc_t(0);
  for_rows<G>(B, [&](int64_t row, bool valid, int sub) {
    acc_t c = 0;
    if (kSurrogate) {
      acc_t logp_part = 0;
      if (valid) {
        for (int64_t a = sub; a < A; a += G) {
          logp_part += kl::gaussian_log_prob_core<acc_t>(
              static_cast<acc_t>(actions[row * A + a]), static_cast<acc_t>(mean_new[row * A + a]),
              static_cast<acc_t>(log_std_new[row * ln_stride + a]));
        }
      }
      const acc_t logp = group_sum<G>(logp_part) - static_cast<acc_t>(A * kl::kHalfLog2Pi);
      if (valid) {
        c = gs * kl::surrogate_term<acc_t>(logp, static_cast<acc_t>(logp_old[row]),
                                           static_cast<acc_t>(advantages[row]));
      }
    }
    if (!valid) return;
    for (int64_t a = sub; a < A; a += G) {
      const int64_t j = row * A + a;
      const acc_t ln = static_cast<acc_t>(log_std_new[row * ln_stride + a]);
      const acc_t lo = static_cast<acc_t>(log_std_old[row * lo_stride + a]);
      const acc_t inv_std = kl::k_exp(-ln);
      const acc_t mn = static_cast<acc_t>(mean_new[j]);
      acc_t dm, dl;
      kl::gaussian_kl_grad_from_parts<acc_t>(kl::gaussian_kl_grad_scale_term<acc_t>(lo, ln),
                                             inv_std, static_cast<acc_t>(mean_old[j]), mn, dm, dl);
      acc_t gm = gk * dm;
      acc_t gl = gk * dl;
      if (kSurrogate) {
        acc_t pm, pl;
        kl::gaussian_log_prob_grad<acc_t>(static_cast<acc_t>(actions[j]), mn, inv_std, pm, pl);
        gm += c * pm;
        gl += c * pl;
      }
      grad_mean[j] = static_cast<scalar_t>(gm);
      grad_log_std[j] = static_cast<scalar_t>(gl);
    }
  });
}

// --- categorical -------------------------------------------------------------------------------

// p = exp(logit − max) · (1 / Σ exp(ℓ − max)) in acc_t.
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t softmax_p(scalar_t logit, acc_t max, acc_t inv_sum) {
  return kl::k_exp(static_cast<acc_t>(logit) - max) * inv_sum;
}

// The lanes of a group build partial rows over classes sub, sub + G, ...; every lane of the group
// ends with the merged row.
template <int G, typename scalar_t, typename acc_t>
__device__ __forceinline__ CatRow<acc_t> categorical_row(const scalar_t* __restrict__ logits_old,
                                                         const scalar_t* __restrict__ logits_new,
                                                         int64_t row, bool valid, int sub,
                                                         int64_t K) {
  CatRow<acc_t> r = kl::cat_empty<acc_t>();
  if (valid) {
    for (int64_t k = sub; k < K; k += G) {
      kl::cat_push<acc_t>(r, static_cast<acc_t>(logits_old[row * K + k]),
                          static_cast<acc_t>(logits_new[row * K + k]));
    }
  }
  return group_merge<G>(r);
}

template <typename scalar_t, typename acc_t, typename index_t, int G, bool kSurrogate>
__global__ void __launch_bounds__(kThreads) kl_categorical_reduce_kernel(
    const scalar_t* __restrict__ logits_old,  // [B, K]
    const scalar_t* __restrict__ logits_new,  // [B, K]
    const index_t* __restrict__ actions,      // [B], surrogate only
    const scalar_t* __restrict__ logp_old,    // [B], surrogate only
    const scalar_t* __restrict__ advantages,  // [B], surrogate only
    int64_t B, int64_t K,
    Sums* __restrict__ partials,             // [gridDim.x]
    unsigned int* __restrict__ blocks_done,  // [1], zero on entry
    scalar_t* __restrict__ out_surrogate,    // [] or null
    scalar_t* __restrict__ out_mean_kl,      // []
    scalar_t* __restrict__ out_max_kl) {     // [] or null
  Sums sums = kl::sums_empty();
  for_rows<G>(B, [&](int64_t row, bool valid, int sub) {
    const CatRow<acc_t> r =
        categorical_row<G, scalar_t, acc_t>(logits_old, logits_new, row, valid, sub, K);
    if (!valid || sub != 0) return;
    const acc_t kl_row = kl::cat_kl(r);
    sums.kl += static_cast<double>(kl_row);
    sums.max_kl = kl::nan_max(sums.max_kl, static_cast<double>(kl_row));
    if (kSurrogate) {
      const index_t a = actions[row];
      const acc_t logp = kl::action_in_range(a, K)
                             ? static_cast<acc_t>(logits_new[row * K + a]) - kl::cat_lse_new(r)
                             : std::numeric_limits<acc_t>::quiet_NaN();
      sums.surrogate += static_cast<double>(kl::surrogate_term<acc_t>(
          logp, static_cast<acc_t>(logp_old[row]), static_cast<acc_t>(advantages[row])));
    }
  });
  finish_reduction<scalar_t>(sums, partials, blocks_done, B, out_surrogate, out_mean_kl,
                             out_max_kl);
}

template <typename scalar_t, typename acc_t, typename index_t, int G, bool kSurrogate>
__global__ void __launch_bounds__(kThreads) kl_categorical_backward_kernel(
    const scalar_t* __restrict__ grad_mean_kl,    // []
    const scalar_t* __restrict__ grad_surrogate,  // [], surrogate only
    const scalar_t* __restrict__ logits_old,      // [B, K]
    const scalar_t* __restrict__ logits_new,      // [B, K]
    const index_t* __restrict__ actions,          // [B], surrogate only
    const scalar_t* __restrict__ logp_old,        // [B], surrogate only
    const scalar_t* __restrict__ advantages,      // [B], surrogate only
    scalar_t* __restrict__ grad_logits,           // [B, K]
    int64_t B, int64_t K) {
  const acc_t inv_B = acc_t(1) / static_cast<acc_t>(B);
  const acc_t gk = static_cast<acc_t>(*grad_mean_kl) * inv_B;
  const acc_t gs = kSurrogate ? static_cast<acc_t>(*grad_surrogate) * inv_B : acc_t(0);
  for_rows<G>(B, [&](int64_t row, bool valid, int sub) {
    const CatRow<acc_t> r =
        categorical_row<G, scalar_t, acc_t>(logits_old, logits_new, row, valid, sub, K);
    if (!valid) return;
    const acc_t lse_old = kl::cat_lse_old(r);
    const acc_t lse_new = kl::cat_lse_new(r);
    acc_t c = 0;
    int64_t action = -1;
    if (kSurrogate) {
      const index_t a = actions[row];
      if (kl::action_in_range(a, K)) {
        action = static_cast<int64_t>(a);
        c = gs * kl::surrogate_term<acc_t>(static_cast<acc_t>(logits_new[row * K + a]) - lse_new,
                                           static_cast<acc_t>(logp_old[row]),
                                           static_cast<acc_t>(advantages[row]));
      } else {
        c = std::numeric_limits<acc_t>::quiet_NaN();
      }
    }
    for (int64_t k = sub; k < K; k += G) {
      const int64_t j = row * K + k;
      grad_logits[j] = static_cast<scalar_t>(
          kl::cat_grad<acc_t>(static_cast<acc_t>(logits_old[j]), static_cast<acc_t>(logits_new[j]),
                              lse_old, lse_new, gk, c, k == action));
    }
  });
}

// --- forward, rows of at most 32 elements: tiles staged in shared memory ------------------------
// With G = 32 lanes per row a warp spends most of its time in shuffles with half its lanes idle on
// rows such as A = 17 or K = 18.  Here a block of R threads (R a multiple of 32, at most kThreads)
// copies R consecutive rows of each [B, W] input — one contiguous stretch of R·W elements — into
// shared memory with coalesced loads, then each thread reduces ONE row from shared memory with a
// sequential loop over its W elements, calling the same kl.h helpers as the G-lane kernels.
//
// A row of W elements sits at stride W in shared memory; thread t reading element a of its row
// would hit bank (t·W + a) mod 32, a gcd(W, 32)-way conflict (32-way for W = 32).  So each thread
// starts its loop at a column shifted by  s(t) = (t mod P) / (P / gcd(W, P))  (P = 32 four-byte
// banks for float, 16 eight-byte words per half-warp wavefront for double): the threads that would
// collide start at different columns, which makes every access conflict-free for all W ≤ 32
// (checked exhaustively on the bank model).  The row's terms are then added in the order
// s, s+1, …, W−1, 0, …, s−1: the same helpers on the same values as the G-lane kernels, in another
// order, so the two paths agree to rounding; identical old and new rows still give exactly 0.

constexpr int kMaxTileWidth = 32;

// Copies elements [begin, begin + n) of each of kArrays inputs to dst + k·stride, k < kArrays.
// Consecutive threads take consecutive elements; each thread has kUnroll loads per array in flight
// before it stores any, about 64 bytes in all (more costs registers, hence resident blocks, on
// the 3-array Gaussian surrogate).  No barrier inside: trip counts may differ between threads.
template <int kArrays, typename scalar_t>
__device__ __forceinline__ void stage_rows(const scalar_t* const* src,  // [≥ kArrays]
                                           scalar_t* __restrict__ dst, int stride, int64_t begin,
                                           int n) {
  constexpr int kUnroll = 64 / (kArrays * int(sizeof(scalar_t)));
  const int step = blockDim.x;
  for (int base = threadIdx.x; base < n; base += kUnroll * step) {
    scalar_t v[kArrays][kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * step;
#pragma unroll
      for (int k = 0; k < kArrays; ++k) v[k][u] = i < n ? src[k][begin + i] : scalar_t(0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * step;
      if (i < n) {
#pragma unroll
        for (int k = 0; k < kArrays; ++k) dst[k * stride + i] = v[k][u];
      }
    }
  }
}

// The first column of this thread's row loop (see the section comment); `shift_div` is
// P / gcd(W, P), computed on the host.
template <typename scalar_t>
__device__ __forceinline__ int tile_start_column(int shift_div) {
  constexpr int P = sizeof(scalar_t) == 4 ? 32 : 16;
  return (static_cast<int>(threadIdx.x) % P) / shift_div;
}

// Visits the tiles of R = blockDim.x rows with a loop whose trip count depends on blockIdx only, so
// every barrier inside is reached by the whole block.  stage(row0, rows) runs between the barriers
// that protect the tile; body(row) then runs on each thread whose row exists.
template <typename Stage, typename Body>
__device__ __forceinline__ void for_tiles(int64_t B, const Stage& stage, const Body& body) {
  const int R = blockDim.x;
  const int64_t tiles = (B + R - 1) / R;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t row0 = tile * R;
    const int rows = B - row0 < R ? static_cast<int>(B - row0) : R;
    __syncthreads();  // every thread is done reading the previous tile (and any setup is written)
    stage(row0, rows);
    __syncthreads();  // the tile is in shared memory
    if (static_cast<int>(threadIdx.x) < rows) body(row0 + threadIdx.x);
  }
}

// A state-independent [A] log_std, A ≤ 32.  Dynamic shared memory: the tile's means (old, new) and,
// for the surrogate, actions, each [R, A].  The per-dimension parts that depend on the log-stds only
// (1/σ_new and the KL's scale term) are computed once per block, by the same helpers.
template <typename scalar_t, typename acc_t, bool kSurrogate>
__global__ void __launch_bounds__(kThreads) kl_diag_gaussian_tiled_reduce_kernel(
    const scalar_t* __restrict__ mean_old,     // [B, A]
    const scalar_t* __restrict__ log_std_old,  // [A]
    const scalar_t* __restrict__ mean_new,     // [B, A]
    const scalar_t* __restrict__ log_std_new,  // [A]
    const scalar_t* __restrict__ actions,      // [B, A], surrogate only
    const scalar_t* __restrict__ logp_old,     // [B], surrogate only
    const scalar_t* __restrict__ advantages,   // [B], surrogate only
    int64_t B, int64_t A, int shift_div,
    Sums* __restrict__ partials,              // [gridDim.x]
    unsigned int* __restrict__ blocks_done,   // [1], zero on entry
    scalar_t* __restrict__ out_surrogate,     // [] or null
    scalar_t* __restrict__ out_mean_kl,       // []
    scalar_t* __restrict__ out_max_kl) {      // [] or null
  constexpr int kArrays = kSurrogate ? 3 : 2;
  extern __shared__ __align__(16) unsigned char kl_tile_smem[];
  scalar_t* const tile = reinterpret_cast<scalar_t*>(kl_tile_smem);  // [kArrays][R, A]
  __shared__ acc_t scale_term[kMaxTileWidth];  // ½ (eˣ − 1 − x), x = 2 (ℓ_old − ℓ_new)
  __shared__ acc_t inv_std[kMaxTileWidth];     // e^{−ℓ_new}
  __shared__ acc_t log_std[kMaxTileWidth];     // ℓ_new
  const int W = static_cast<int>(A);
  const int stride = static_cast<int>(blockDim.x) * W;
  for (int a = threadIdx.x; a < W; a += blockDim.x) {
    const acc_t ln = static_cast<acc_t>(log_std_new[a]);
    const acc_t lo = static_cast<acc_t>(log_std_old[a]);
    scale_term[a] = kl::gaussian_kl_scale_term<acc_t>(lo, ln);
    inv_std[a] = kl::k_exp(-ln);
    log_std[a] = ln;
  }
  const scalar_t* const src[3] = {mean_old, mean_new, actions};  // the first kArrays are staged
  const int start = tile_start_column<scalar_t>(shift_div);
  Sums sums = kl::sums_empty();
  acc_t lp_row = 0;
  acc_t adv_row = 0;
  for_tiles(
      B,
      [&](int64_t row0, int rows) {
        if (kSurrogate && static_cast<int>(threadIdx.x) < rows) {
          // issued before the tile's loads, consumed after the barrier
          lp_row = static_cast<acc_t>(logp_old[row0 + threadIdx.x]);
          adv_row = static_cast<acc_t>(advantages[row0 + threadIdx.x]);
        }
        stage_rows<kArrays, scalar_t>(src, tile, stride, row0 * A, rows * W);
      },
      [&](int64_t row) {
        const scalar_t* const mo = tile + threadIdx.x * W;
        const scalar_t* const mn = mo + stride;
        const scalar_t* const act = kSurrogate ? mn + stride : nullptr;
        acc_t kl_row = 0;
        acc_t logp = 0;
        int a = start;
        for (int n = 0; n < W; ++n) {
          const acc_t m_new = static_cast<acc_t>(mn[a]);
          kl_row += kl::gaussian_kl_from_parts<acc_t>(scale_term[a], inv_std[a],
                                                      static_cast<acc_t>(mo[a]), m_new);
          if (kSurrogate) {
            logp += kl::gaussian_log_prob_from_parts<acc_t>(static_cast<acc_t>(act[a]), m_new,
                                                            log_std[a], inv_std[a]);
          }
          a = a + 1 == W ? 0 : a + 1;
        }
        sums.kl += static_cast<double>(kl_row);
        sums.max_kl = kl::nan_max(sums.max_kl, static_cast<double>(kl_row));
        if (kSurrogate) {
          sums.surrogate += static_cast<double>(kl::surrogate_term<acc_t>(
              logp - static_cast<acc_t>(A * kl::kHalfLog2Pi), lp_row, adv_row));
        }
      });
  finish_reduction<scalar_t>(sums, partials, blocks_done, B, out_surrogate, out_mean_kl,
                             out_max_kl);
}

// The two-pass row of the tiled categorical kernel (kTwoPass, TRPO_EXT_KL_CUDA_CAT_TWO_PASS=1): the
// two maxima first, then branch-free sums of exp(ℓ − max) and of the cross term, where kl::cat_push
// rescales its running sums whenever a new maximum comes (a data-dependent branch, divergent
// across a warp's rows).  One more pass over the row, in shared memory.  The same CatRow, to
// rounding: a −inf logit adds nothing, a NaN one makes the sums NaN, identical rows give
// identical sums.  Columns are visited in the rotated order of the one-pass loop.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ CatRow<acc_t> cat_row_two_pass(const scalar_t* lo, const scalar_t* ln,
                                                          int W, int start) {
  const acc_t neg_inf = kl::neg_inf<acc_t>();
  acc_t max_old = neg_inf, max_new = neg_inf;
  int k = start;
  for (int n = 0; n < W; ++n) {
    const acc_t a = static_cast<acc_t>(lo[k]), b = static_cast<acc_t>(ln[k]);
    max_old = a > max_old ? a : max_old;
    max_new = b > max_new ? b : max_new;
    k = k + 1 == W ? 0 : k + 1;
  }
  CatRow<acc_t> r{max_old, acc_t(0), acc_t(0), max_new, acc_t(0)};
  for (int n = 0; n < W; ++n) {
    const acc_t a = static_cast<acc_t>(lo[k]), b = static_cast<acc_t>(ln[k]);
    const acc_t e = a == neg_inf ? acc_t(0) : kl::k_exp(a - max_old);
    r.sum_old += e;
    r.cross += e == acc_t(0) ? acc_t(0) : e * (a - b);
    r.sum_new += b == neg_inf ? acc_t(0) : kl::k_exp(b - max_new);
    k = k + 1 == W ? 0 : k + 1;
  }
  return r;
}

// K ≤ 32 classes.  Dynamic shared memory: the tile's logits, old and new, each [R, K].
template <typename scalar_t, typename acc_t, typename index_t, bool kSurrogate, bool kTwoPass>
__global__ void __launch_bounds__(kThreads) kl_categorical_tiled_reduce_kernel(
    const scalar_t* __restrict__ logits_old,  // [B, K]
    const scalar_t* __restrict__ logits_new,  // [B, K]
    const index_t* __restrict__ actions,      // [B], surrogate only
    const scalar_t* __restrict__ logp_old,    // [B], surrogate only
    const scalar_t* __restrict__ advantages,  // [B], surrogate only
    int64_t B, int64_t K, int shift_div,
    Sums* __restrict__ partials,             // [gridDim.x]
    unsigned int* __restrict__ blocks_done,  // [1], zero on entry
    scalar_t* __restrict__ out_surrogate,    // [] or null
    scalar_t* __restrict__ out_mean_kl,      // []
    scalar_t* __restrict__ out_max_kl) {     // [] or null
  extern __shared__ __align__(16) unsigned char kl_tile_smem[];
  scalar_t* const tile = reinterpret_cast<scalar_t*>(kl_tile_smem);  // [2][R, K]
  const int W = static_cast<int>(K);
  const int stride = static_cast<int>(blockDim.x) * W;
  const scalar_t* const src[2] = {logits_old, logits_new};
  const int start = tile_start_column<scalar_t>(shift_div);
  Sums sums = kl::sums_empty();
  index_t action = 0;
  acc_t lp_row = 0;
  acc_t adv_row = 0;
  for_tiles(
      B,
      [&](int64_t row0, int rows) {
        if (kSurrogate && static_cast<int>(threadIdx.x) < rows) {
          // issued before the tile's loads, consumed after the barrier
          action = actions[row0 + threadIdx.x];
          lp_row = static_cast<acc_t>(logp_old[row0 + threadIdx.x]);
          adv_row = static_cast<acc_t>(advantages[row0 + threadIdx.x]);
        }
        stage_rows<2, scalar_t>(src, tile, stride, row0 * K, rows * W);
      },
      [&](int64_t row) {
        const scalar_t* const lo = tile + threadIdx.x * W;
        const scalar_t* const ln = lo + stride;
        CatRow<acc_t> r = kl::cat_empty<acc_t>();
        if (kTwoPass) {
          r = cat_row_two_pass<scalar_t, acc_t>(lo, ln, W, start);
        } else {
          int k = start;
          for (int n = 0; n < W; ++n) {
            kl::cat_push<acc_t>(r, static_cast<acc_t>(lo[k]), static_cast<acc_t>(ln[k]));
            k = k + 1 == W ? 0 : k + 1;
          }
        }
        const acc_t kl_row = kl::cat_kl(r);
        sums.kl += static_cast<double>(kl_row);
        sums.max_kl = kl::nan_max(sums.max_kl, static_cast<double>(kl_row));
        if (kSurrogate) {
          // an out-of-range class gives NaN and reads nothing, as in the G-lane kernel
          const acc_t logp = kl::action_in_range(action, K)
                                 ? static_cast<acc_t>(ln[action]) - kl::cat_lse_new(r)
                                 : std::numeric_limits<acc_t>::quiet_NaN();
          sums.surrogate += static_cast<double>(kl::surrogate_term<acc_t>(logp, lp_row, adv_row));
        }
      });
  finish_reduction<scalar_t>(sums, partials, blocks_done, B, out_surrogate, out_mean_kl,
                             out_max_kl);
}

// --- Fisher metric products ----------------------------------------------------------------------

// One grid-stride pass over [B, A]; the log_std part (A or B·A elements) rides along.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) kl_metric_diag_gaussian_kernel(
    const scalar_t* __restrict__ log_std,    // [A] or [B, A]
    const scalar_t* __restrict__ u_mean,     // [B, A]
    const scalar_t* __restrict__ u_log_std,  // like log_std
    scalar_t* __restrict__ m_mean, scalar_t* __restrict__ m_log_std, int64_t B, int64_t A,
    bool per_state) {
  const acc_t inv_B = acc_t(1) / static_cast<acc_t>(B);
  const acc_t ls_scale = static_cast<acc_t>(kl::kGaussianMetricLogStd) * (per_state ? inv_B : acc_t(1));
  const int64_t n = B * A;
  const int64_t n_ls = per_state ? n : A;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const acc_t l = static_cast<acc_t>(log_std[per_state ? i : i % A]);
    m_mean[i] = static_cast<scalar_t>(
        inv_B * kl::gaussian_metric_mean<acc_t>(static_cast<acc_t>(u_mean[i]), l));
    if (i < n_ls) m_log_std[i] = static_cast<scalar_t>(ls_scale * static_cast<acc_t>(u_log_std[i]));
  }
}

// G lanes per row: softmax statistics by the online log-sum-exp of the KL kernels (the row against
// itself), then pᵀu by a group sum, then M u.
template <typename scalar_t, typename acc_t, int G>
__global__ void __launch_bounds__(kThreads) kl_metric_categorical_kernel(
    const scalar_t* __restrict__ logits,  // [B, K]
    const scalar_t* __restrict__ u,       // [B, K]
    scalar_t* __restrict__ out,           // [B, K]
    int64_t B, int64_t K) {
  const acc_t inv_B = acc_t(1) / static_cast<acc_t>(B);
  for_rows<G>(B, [&](int64_t row, bool valid, int sub) {
    const CatRow<acc_t> r = categorical_row<G, scalar_t, acc_t>(logits, logits, row, valid, sub, K);
    // p = exp(ℓ − max) / Σ, as softmax and the CPU kernel form it: exp(ℓ − lse) would carry the
    // rounding of lse (an ulp of |ℓ|, 2e-12 at |ℓ| = 1e4) into every probability.
    const acc_t inv_sum = acc_t(1) / r.sum_old;
    acc_t pu = 0;
    if (valid) {
      for (int64_t k = sub; k < K; k += G) {
        pu += softmax_p<acc_t>(logits[row * K + k], r.max_old, inv_sum) *
              static_cast<acc_t>(u[row * K + k]);
      }
    }
    pu = group_sum<G>(pu);
    if (!valid) return;
    for (int64_t k = sub; k < K; k += G) {
      const int64_t j = row * K + k;
      out[j] = static_cast<scalar_t>(inv_B * kl::cat_metric<acc_t>(
          softmax_p<acc_t>(logits[j], r.max_old, inv_sum), static_cast<acc_t>(u[j]), pu));
    }
  });
}

// --- host side -----------------------------------------------------------------------------------

struct Launch {
  unsigned int blocks;
  cudaStream_t stream;
};

// Enough blocks to fill the device once (the grid-stride loop covers the rest), no more than the
// rows need.
Launch launch_shape(int64_t rows, int G) {
  const cuda::DeviceShape dev = cuda::device_shape();
  const int64_t resident = int64_t(dev.sm_count) * std::max(1, dev.max_threads_per_sm / kThreads);
  const int64_t wanted = (rows * G + kThreads - 1) / kThreads;
  return {static_cast<unsigned int>(std::max<int64_t>(1, std::min(resident, wanted))),
          cuda::current_stream()};
}

// Workspace of one reduction: a Sums slot per block and the completion counter, zeroed here.
struct Workspace {
  at::Tensor storage;
  Sums* partials;
  unsigned int* blocks_done;
};

Workspace make_workspace(const at::Tensor& like, unsigned int blocks, cudaStream_t stream) {
  const int64_t bytes = int64_t(blocks) * int64_t(sizeof(Sums)) + 16;
  Workspace w;
  w.storage = at::empty({bytes}, like.options().dtype(at::kByte));
  auto* base = w.storage.data_ptr<uint8_t>();
  w.partials = reinterpret_cast<Sums*>(base);
  w.blocks_done = reinterpret_cast<unsigned int*>(base + int64_t(blocks) * sizeof(Sums));
  C10_CUDA_CHECK(cudaMemsetAsync(w.blocks_done, 0, sizeof(unsigned int), stream));
  return w;
}

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

struct Outputs {
  at::Tensor surrogate, mean_kl, max_kl;
};

// --- the tiled forward path (rows of at most 32 elements) --------------------------------------

// TRPO_EXT_KL_CUDA_TILES=0 sends every forward reduction down the G-lane path, to compare the two
// paths or to fall back; read once per process.
bool kl_tiles_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("TRPO_EXT_KL_CUDA_TILES");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return enabled;
}

// TRPO_EXT_KL_CUDA_CAT_TWO_PASS=1 gives the tiled categorical kernel the two-pass row
// (cat_row_two_pass), to measure it against the one-pass row; read once per process.
bool kl_cat_two_pass() {
  static const bool enabled = [] {
    const char* v = std::getenv("TRPO_EXT_KL_CUDA_CAT_TWO_PASS");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return enabled;
}

// Dynamic shared memory of one block's tiles: under the 48 KB a block gets without opting in, less
// 2 KB for the kernels' static shared memory (the reduction's scratch and the Gaussian's
// per-dimension table, under 1 KB).
constexpr int64_t kTileSmemBytes = 46 * 1024;

struct TileShape {
  unsigned int blocks;
  int rows;           // R: rows per tile = threads per block
  size_t smem_bytes;  // `arrays` tiles of [R, W]
  int shift_div;      // see tile_start_column
  cudaStream_t stream;
};

// R is the largest multiple of 32, at most kThreads, whose tiles fit kTileSmemBytes (at least 32:
// 3 arrays × 32 rows × 32 double = 24 KB).  Blocks of R threads rather than kThreads threads
// looping over R-row tiles: one thread per row keeps every thread busy in the compute phase,
// which matters where R < kThreads (W > 24 for float, W > 12 for double).  The shared memory per
// SM, not the threads, bounds the rows in flight either way.  The grid is what the device holds at
// once (the tile loop covers the rest), no more than the tiles.
template <typename Kernel>
TileShape tile_shape(Kernel kernel, int64_t B, int64_t W, int arrays, size_t elem) {
  TileShape s{};
  s.rows = kThreads;
  while (s.rows > 32 && int64_t(arrays) * s.rows * W * int64_t(elem) > kTileSmemBytes) s.rows -= 32;
  s.smem_bytes = size_t(arrays) * size_t(s.rows) * size_t(W) * elem;
  const int per_sm =
      cuda::blocks_per_sm(reinterpret_cast<const void*>(kernel), s.rows, s.smem_bytes);
  const int64_t resident = int64_t(cuda::device_shape().sm_count) * std::max(1, per_sm);
  const int64_t tiles = (B + s.rows - 1) / s.rows;
  s.blocks = static_cast<unsigned int>(std::max<int64_t>(1, std::min(resident, tiles)));
  const int P = elem == 4 ? 32 : 16;  // as in tile_start_column
  s.shift_div = P / std::gcd(static_cast<int>(W), P);
  s.stream = cuda::current_stream();
  return s;
}

// One launch of a tiled reduction kernel: inputs..., then (B, W, shift_div, workspace, outputs).
template <typename scalar_t, typename... Params, typename... Inputs>
void launch_tiled(void (*kernel)(Params...), const at::Tensor& like, int64_t B, int64_t W,
                  int arrays, const Outputs& out, Inputs... inputs) {
  TORCH_INTERNAL_ASSERT(W >= 1 && W <= kMaxTileWidth);
  const TileShape s = tile_shape(kernel, B, W, arrays, sizeof(scalar_t));
  const Workspace w = make_workspace(like, s.blocks, s.stream);
  kernel<<<s.blocks, s.rows, s.smem_bytes, s.stream>>>(
      inputs..., B, W, s.shift_div, w.partials, w.blocks_done, ptr_or_null<scalar_t>(out.surrogate),
      out.mean_kl.data_ptr<scalar_t>(), out.max_kl.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The tiled path takes a state-independent [A] log_std with A ≤ 32; per-state [B, A] log_stds and
// wider rows stay on the G-lane path.
bool gaussian_tiled(const kl::GaussianInputs& in) {
  return kl_tiles_enabled() && in.A <= kMaxTileWidth && in.log_std_old_row_stride == 0 &&
         in.log_std_new_row_stride == 0;
}

void gaussian_forward_tiled(const kl::GaussianInputs& in, const Outputs& out) {
  AT_DISPATCH_FLOATING_TYPES(in.mean_old.scalar_type(), "kl_diag_gaussian_cuda_tiled", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* const mo = in.mean_old.data_ptr<scalar_t>();
    const scalar_t* const lo = in.log_std_old.data_ptr<scalar_t>();
    const scalar_t* const mn = in.mean_new.data_ptr<scalar_t>();
    const scalar_t* const ln = in.log_std_new.data_ptr<scalar_t>();
    if (in.surrogate) {
      launch_tiled<scalar_t>(kl_diag_gaussian_tiled_reduce_kernel<scalar_t, acc_t, true>,
                             in.mean_old, in.B, in.A, 3, out, mo, lo, mn, ln,
                             in.actions.data_ptr<scalar_t>(), in.logp_old.data_ptr<scalar_t>(),
                             in.advantages.data_ptr<scalar_t>());
    } else {
      const scalar_t* const none = nullptr;
      launch_tiled<scalar_t>(kl_diag_gaussian_tiled_reduce_kernel<scalar_t, acc_t, false>,
                             in.mean_old, in.B, in.A, 2, out, mo, lo, mn, ln, none, none, none);
    }
  });
}

bool categorical_tiled(const kl::CategoricalInputs& in) {
  return kl_tiles_enabled() && in.K <= kMaxTileWidth;
}

void categorical_forward_tiled(const kl::CategoricalInputs& in, const Outputs& out) {
  AT_DISPATCH_FLOATING_TYPES(in.logits_old.scalar_type(), "kl_categorical_cuda_tiled", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* const lo = in.logits_old.data_ptr<scalar_t>();
    const scalar_t* const ln = in.logits_new.data_ptr<scalar_t>();
    const auto launch = [&](auto two_pass) {
      constexpr bool kTwoPass = decltype(two_pass)::value;
      if (in.surrogate) {
        dispatch_index(in.actions.scalar_type(), [&](auto tag) {
          using index_t = decltype(tag);
          launch_tiled<scalar_t>(
              kl_categorical_tiled_reduce_kernel<scalar_t, acc_t, index_t, true, kTwoPass>,
              in.logits_old, in.B, in.K, 2, out, lo, ln, in.actions.data_ptr<index_t>(),
              in.logp_old.data_ptr<scalar_t>(), in.advantages.data_ptr<scalar_t>());
        });
      } else {
        const int64_t* const no_actions = nullptr;
        const scalar_t* const none = nullptr;
        launch_tiled<scalar_t>(
            kl_categorical_tiled_reduce_kernel<scalar_t, acc_t, int64_t, false, kTwoPass>,
            in.logits_old, in.B, in.K, 2, out, lo, ln, no_actions, none, none);
      }
    };
    if (kl_cat_two_pass()) {
      launch(std::true_type{});
    } else {
      launch(std::false_type{});
    }
  });
}

Outputs gaussian_forward(const kl::GaussianInputs& in) {
  Outputs out;
  out.mean_kl = at::empty({}, in.mean_old.options());
  out.max_kl = at::empty({}, in.mean_old.options());
  if (in.surrogate) out.surrogate = at::empty({}, in.mean_old.options());
  if (gaussian_tiled(in)) {
    gaussian_forward_tiled(in, out);
    return out;
  }
  with_group_lanes(in.A, [&](auto g) {
    constexpr int G = decltype(g)::value;
    const Launch l = launch_shape(in.B, G);
    const Workspace w = make_workspace(in.mean_old, l.blocks, l.stream);
    AT_DISPATCH_FLOATING_TYPES(in.mean_old.scalar_type(), "kl_diag_gaussian_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto args = std::make_tuple(
          in.mean_old.data_ptr<scalar_t>(), in.log_std_old.data_ptr<scalar_t>(),
          in.mean_new.data_ptr<scalar_t>(), in.log_std_new.data_ptr<scalar_t>());
      if (in.surrogate) {
        kl_diag_gaussian_reduce_kernel<scalar_t, acc_t, G, true><<<l.blocks, kThreads, 0, l.stream>>>(
            std::get<0>(args), std::get<1>(args), std::get<2>(args), std::get<3>(args),
            in.actions.data_ptr<scalar_t>(), in.logp_old.data_ptr<scalar_t>(),
            in.advantages.data_ptr<scalar_t>(), in.B, in.A, in.log_std_old_row_stride,
            in.log_std_new_row_stride, w.partials, w.blocks_done,
            out.surrogate.data_ptr<scalar_t>(), out.mean_kl.data_ptr<scalar_t>(),
            out.max_kl.data_ptr<scalar_t>());
      } else {
        kl_diag_gaussian_reduce_kernel<scalar_t, acc_t, G, false><<<l.blocks, kThreads, 0, l.stream>>>(
            std::get<0>(args), std::get<1>(args), std::get<2>(args), std::get<3>(args), nullptr,
            nullptr, nullptr, in.B, in.A, in.log_std_old_row_stride, in.log_std_new_row_stride,
            w.partials, w.blocks_done, nullptr, out.mean_kl.data_ptr<scalar_t>(),
            out.max_kl.data_ptr<scalar_t>());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor kl_diag_gaussian_cuda(const at::Tensor& mean_old, const at::Tensor& log_std_old,
                                 const at::Tensor& mean_new, const at::Tensor& log_std_new) {
  const std::optional<at::Tensor> none;
  const kl::GaussianInputs in =
      kl::check_gaussian(mean_old, log_std_old, mean_new, log_std_new, {none, none, none});
  // Guard after the checks, so a tensor on another device gets their clear message.
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
  // Guard after the checks, so a tensor on another device gets their clear message.
  const c10::cuda::CUDAGuard device_guard(mean_old.device());
  Outputs out = gaussian_forward(in);
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
  // Guard after the checks, so a tensor on another device gets their clear message.
  const c10::cuda::CUDAGuard device_guard(mean_old.device());
  at::Tensor grad_mean = at::empty_like(in.mean_new);
  at::Tensor grad_log_std_rows = at::empty_like(in.mean_new);
  with_group_lanes(in.A, [&](auto g) {
    constexpr int G = decltype(g)::value;
    const Launch l = launch_shape(in.B, G);
    AT_DISPATCH_FLOATING_TYPES(in.mean_old.scalar_type(), "kl_diag_gaussian_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* gk = grad_mean_kl.data_ptr<scalar_t>();
      if (surrogate) {
        kl_diag_gaussian_backward_kernel<scalar_t, acc_t, G, true><<<l.blocks, kThreads, 0, l.stream>>>(
            gk, grad_surrogate->data_ptr<scalar_t>(), in.mean_old.data_ptr<scalar_t>(),
            in.log_std_old.data_ptr<scalar_t>(), in.mean_new.data_ptr<scalar_t>(),
            in.log_std_new.data_ptr<scalar_t>(), in.actions.data_ptr<scalar_t>(),
            in.logp_old.data_ptr<scalar_t>(), in.advantages.data_ptr<scalar_t>(),
            grad_mean.data_ptr<scalar_t>(), grad_log_std_rows.data_ptr<scalar_t>(), in.B, in.A,
            in.log_std_old_row_stride, in.log_std_new_row_stride);
      } else {
        kl_diag_gaussian_backward_kernel<scalar_t, acc_t, G, false><<<l.blocks, kThreads, 0, l.stream>>>(
            gk, nullptr, in.mean_old.data_ptr<scalar_t>(), in.log_std_old.data_ptr<scalar_t>(),
            in.mean_new.data_ptr<scalar_t>(), in.log_std_new.data_ptr<scalar_t>(), nullptr,
            nullptr, nullptr, grad_mean.data_ptr<scalar_t>(),
            grad_log_std_rows.data_ptr<scalar_t>(), in.B, in.A, in.log_std_old_row_stride,
            in.log_std_new_row_stride);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  at::Tensor grad_log_std =
      log_std_new.dim() == 1 ? grad_log_std_rows.sum(0) : grad_log_std_rows;
  return {grad_mean, grad_log_std};
}

Outputs categorical_forward(const kl::CategoricalInputs& in) {
  Outputs out;
  out.mean_kl = at::empty({}, in.logits_old.options());
  out.max_kl = at::empty({}, in.logits_old.options());
  if (in.surrogate) out.surrogate = at::empty({}, in.logits_old.options());
  if (categorical_tiled(in)) {
    categorical_forward_tiled(in, out);
    return out;
  }
  const at::ScalarType index_type = in.surrogate ? in.actions.scalar_type() : at::kLong;
  with_group_lanes(in.K, [&](auto g) {
    constexpr int G = decltype(g)::value;
    const Launch l = launch_shape(in.B, G);
    const Workspace w = make_workspace(in.logits_old, l.blocks, l.stream);
    AT_DISPATCH_FLOATING_TYPES(in.logits_old.scalar_type(), "kl_categorical_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      if (in.surrogate) {
        dispatch_index(index_type, [&](auto tag) {
          using index_t = decltype(tag);
          kl_categorical_reduce_kernel<scalar_t, acc_t, index_t, G, true>
              <<<l.blocks, kThreads, 0, l.stream>>>(
                  in.logits_old.data_ptr<scalar_t>(), in.logits_new.data_ptr<scalar_t>(),
                  in.actions.data_ptr<index_t>(), in.logp_old.data_ptr<scalar_t>(),
                  in.advantages.data_ptr<scalar_t>(), in.B, in.K, w.partials, w.blocks_done,
                  out.surrogate.data_ptr<scalar_t>(), out.mean_kl.data_ptr<scalar_t>(),
                  out.max_kl.data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      } else {
        kl_categorical_reduce_kernel<scalar_t, acc_t, int64_t, G, false>
            <<<l.blocks, kThreads, 0, l.stream>>>(
                in.logits_old.data_ptr<scalar_t>(), in.logits_new.data_ptr<scalar_t>(), nullptr,
                nullptr, nullptr, in.B, in.K, w.partials, w.blocks_done, nullptr,
                out.mean_kl.data_ptr<scalar_t>(), out.max_kl.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return out;
}

at::Tensor kl_categorical_cuda(const at::Tensor& logits_old, const at::Tensor& logits_new) {
  const std::optional<at::Tensor> none;
  const kl::CategoricalInputs in = kl::check_categorical(logits_old, logits_new, {none, none, none});
  // Guard after the checks, so a tensor on another device gets their clear message.
  const c10::cuda::CUDAGuard device_guard(logits_old.device());
  return categorical_forward(in).mean_kl;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_surrogate_categorical_cuda(
    const at::Tensor& logits_old, const at::Tensor& logits_new, const at::Tensor& actions,
    const at::Tensor& logp_old, const at::Tensor& advantages) {
  const std::optional<at::Tensor> act(actions), lp(logp_old), adv(advantages);
  const kl::CategoricalInputs in = kl::check_categorical(logits_old, logits_new, {act, lp, adv});
  // Guard after the checks, so a tensor on another device gets their clear message.
  const c10::cuda::CUDAGuard device_guard(logits_old.device());
  Outputs out = categorical_forward(in);
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
  // Guard after the checks, so a tensor on another device gets their clear message.
  const c10::cuda::CUDAGuard device_guard(logits_old.device());
  at::Tensor grad_logits = at::empty_like(in.logits_new);
  const at::ScalarType index_type = surrogate ? in.actions.scalar_type() : at::kLong;
  with_group_lanes(in.K, [&](auto g) {
    constexpr int G = decltype(g)::value;
    const Launch l = launch_shape(in.B, G);
    AT_DISPATCH_FLOATING_TYPES(in.logits_old.scalar_type(), "kl_categorical_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* gk = grad_mean_kl.data_ptr<scalar_t>();
      if (surrogate) {
        dispatch_index(index_type, [&](auto tag) {
          using index_t = decltype(tag);
          kl_categorical_backward_kernel<scalar_t, acc_t, index_t, G, true>
              <<<l.blocks, kThreads, 0, l.stream>>>(
                  gk, grad_surrogate->data_ptr<scalar_t>(), in.logits_old.data_ptr<scalar_t>(),
                  in.logits_new.data_ptr<scalar_t>(), in.actions.data_ptr<index_t>(),
                  in.logp_old.data_ptr<scalar_t>(), in.advantages.data_ptr<scalar_t>(),
                  grad_logits.data_ptr<scalar_t>(), in.B, in.K);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      } else {
        kl_categorical_backward_kernel<scalar_t, acc_t, int64_t, G, false>
            <<<l.blocks, kThreads, 0, l.stream>>>(
                gk, nullptr, in.logits_old.data_ptr<scalar_t>(),
                in.logits_new.data_ptr<scalar_t>(), nullptr, nullptr, nullptr,
                grad_logits.data_ptr<scalar_t>(), in.B, in.K);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return grad_logits;
}

std::tuple<at::Tensor, at::Tensor> kl_metric_diag_gaussian_cuda(const at::Tensor& log_std,
                                                                const at::Tensor& u_mean,
                                                                const at::Tensor& u_log_std) {
  const kl::MetricGaussianInputs in = kl::check_metric_gaussian(log_std, u_mean, u_log_std);
  const c10::cuda::CUDAGuard device_guard(u_mean.device());
  const at::Tensor& ls = in.log_std;
  const at::Tensor& um = in.u_mean;
  const at::Tensor& ul = in.u_log_std;
  at::Tensor m_mean = at::empty_like(um);
  at::Tensor m_log_std = at::empty_like(ul);
  const int64_t B = in.B;
  const int64_t A = in.A;
  if (B * A == 0) return {m_mean, m_log_std};
  const Launch l = launch_shape(B * A, 1);
  AT_DISPATCH_FLOATING_TYPES(um.scalar_type(), "kl_metric_diag_gaussian_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    kl_metric_diag_gaussian_kernel<scalar_t, acc_t><<<l.blocks, kThreads, 0, l.stream>>>(
        ls.data_ptr<scalar_t>(), um.data_ptr<scalar_t>(), ul.data_ptr<scalar_t>(),
        m_mean.data_ptr<scalar_t>(), m_log_std.data_ptr<scalar_t>(), B, A, in.per_state);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {m_mean, m_log_std};
}

at::Tensor kl_metric_categorical_cuda(const at::Tensor& logits, const at::Tensor& u) {
  const kl::MetricCategoricalInputs in = kl::check_metric_categorical(logits, u);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const at::Tensor& lg = in.logits;
  const at::Tensor& uc = in.u;
  at::Tensor out = at::empty_like(uc);
  const int64_t B = in.B;
  const int64_t K = in.K;
  with_group_lanes(K, [&](auto g) {
    constexpr int G = decltype(g)::value;
    const Launch l = launch_shape(B, G);
    AT_DISPATCH_FLOATING_TYPES(lg.scalar_type(), "kl_metric_categorical_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      kl_metric_categorical_kernel<scalar_t, acc_t, G><<<l.blocks, kThreads, 0, l.stream>>>(
          lg.data_ptr<scalar_t>(), uc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), B, K);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
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
