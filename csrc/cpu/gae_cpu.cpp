// GAE on the CPU.  Work is split into "lanes": a lane is one environment over one chunk of the time
// axis.  With many environments each lane is a whole column and one pass suffices (every input read
// once).  With few environments and a long horizon (T = 1e6, N = 3) one column would be a single
// serial dependency chain, so the time axis is cut into chunks: pass 1 composes each chunk's affine
// map, a short serial scan over chunks gives every chunk its carry-in, and pass 2 replays each chunk.
// Lanes are processed kLanes at a time in lockstep, so their independent chains overlap in the
// pipeline instead of waiting on one multiply-add at a time.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "gae.h"

namespace trpo_ext {
namespace {

using gae::Affine;

constexpr int kLanes = 4;
// From this many environments on, a task walks whole rows of environments instead of lanes.
constexpr int64_t kRowModeMinEnvs = 16;
// Most environments per row-walking task (the state of each stays in L1).
constexpr int64_t kRowBlock = 2048;
// Shortest chunk worth an extra pass over its inputs.
constexpr int64_t kMinChunk = 256;

template <typename scalar_t>
struct Ptrs {
  const scalar_t* rewards;      // [T, N]
  const scalar_t* values;       // [T, N]
  const scalar_t* next_values;  // [T, N]
  // Masks read as bytes: the vectoriser widens uint8 lanes but gives up on bool loads.
  const uint8_t* terminated;    // [T, N]
  const uint8_t* done;          // [T, N]
  scalar_t* advantages;         // [T, N]
  scalar_t* returns;            // [T, N]
};

// Runs `count` (<= kLanes) lanes of equal length `len` backward in lockstep.  Lane k's local step i is
// element base[k] + i * N.  kApply: start from carry[k] and write advantages and returns.  Otherwise:
// compose the chunk's affine map into agg[k].
template <bool kApply, typename scalar_t, typename acc_t>
void run_lanes(const Ptrs<scalar_t>& p, const int64_t* base, int count, int64_t len, int64_t N,
               acc_t gamma, acc_t gamma_lam, const acc_t* carry, Affine<acc_t>* agg) {
  acc_t a[kLanes];
  acc_t b[kLanes];
  for (int k = 0; k < count; ++k) {
    a[k] = kApply ? carry[k] : acc_t(0);
    b[k] = acc_t(1);
  }
  for (int64_t i = len - 1; i >= 0; --i) {
    const int64_t row = i * N;
    for (int k = 0; k < count; ++k) {
      const int64_t j = base[k] + row;
      const acc_t v = static_cast<acc_t>(p.values[j]);
      const acc_t d = gae::td_residual<acc_t>(static_cast<acc_t>(p.rewards[j]), v,
                                              static_cast<acc_t>(p.next_values[j]),
                                              p.terminated[j] != 0, gamma);
      const acc_t c = gae::trace_coef<acc_t>(p.done[j] != 0, gamma_lam);
      if (kApply) {
        a[k] = gae::step<acc_t>(d, c, a[k]);
        p.advantages[j] = static_cast<scalar_t>(a[k]);
        p.returns[j] = static_cast<scalar_t>(a[k] + v);
      } else {
        const Affine<acc_t> f = gae::combine<acc_t>({d, c}, {a[k], b[k]});
        a[k] = f.a;
        b[k] = f.b;
      }
    }
  }
  if (!kApply) {
    for (int k = 0; k < count; ++k) agg[k] = {a[k], b[k]};
  }
}

// Visits lanes [begin, end) of the lane space (lane = c * N + n, chunk c covering rows
// [c * L, min((c + 1) * L, T))) in groups of up to kLanes lanes of equal length.  Used when there are
// fewer than kRowModeMinEnvs environments, so that a group spans several chunks.
template <bool kApply, typename scalar_t, typename acc_t>
void run_lane_range(const Ptrs<scalar_t>& p, int64_t begin, int64_t end, int64_t T, int64_t N,
                    int64_t L, acc_t gamma, acc_t gamma_lam, const acc_t* carry,
                    Affine<acc_t>* agg) {
  int64_t base[kLanes];
  acc_t carry_in[kLanes];
  Affine<acc_t> out[kLanes];
  const int64_t C = (T + L - 1) / L;
  int64_t lane = begin;
  while (lane < end) {
    // A group never mixes the (shorter) last chunk with the others, so its lanes share one length.
    const int64_t boundary = (lane < (C - 1) * N) ? (C - 1) * N : C * N;
    const int64_t group_end = std::min({end, lane + kLanes, boundary});
    const int count = static_cast<int>(group_end - lane);
    const int64_t len = std::min(L, T - (lane / N) * L);
    for (int k = 0; k < count; ++k) {
      const int64_t c = (lane + k) / N;
      const int64_t n = lane + k - c * N;
      base[k] = c * L * N + n;
      if (kApply) carry_in[k] = carry ? carry[lane + k] : acc_t(0);
    }
    run_lanes<kApply>(p, base, count, len, N, gamma, gamma_lam, carry_in, out);
    if (!kApply) {
      for (int k = 0; k < count; ++k) agg[lane + k] = out[k];
    }
    lane = group_end;
  }
}

// One row of the backward recursion over `width` adjacent environments, state in a[k].  Written as
// plain loops over restrict pointers so that the compiler vectorises them (with -fno-trapping-math,
// which lets it evaluate both arms of a select; results are unchanged).
template <typename scalar_t, typename acc_t>
void apply_row(const scalar_t* __restrict__ r, const scalar_t* __restrict__ v,
               const scalar_t* __restrict__ nv, const uint8_t* __restrict__ term,
               const uint8_t* __restrict__ done, scalar_t* __restrict__ adv,
               scalar_t* __restrict__ ret, acc_t* __restrict__ a, int64_t width, acc_t gamma,
               acc_t gamma_lam) {
  for (int64_t k = 0; k < width; ++k) {
    const acc_t vk = static_cast<acc_t>(v[k]);
    const acc_t d = gae::td_residual<acc_t>(static_cast<acc_t>(r[k]), vk,
                                            static_cast<acc_t>(nv[k]), term[k] != 0, gamma);
    const acc_t ak = gae::step<acc_t>(d, gae::trace_coef<acc_t>(done[k] != 0, gamma_lam), a[k]);
    a[k] = ak;
    adv[k] = static_cast<scalar_t>(ak);
    ret[k] = static_cast<scalar_t>(ak + vk);
  }
}

template <typename scalar_t, typename acc_t>
void compose_row(const scalar_t* __restrict__ r, const scalar_t* __restrict__ v,
                 const scalar_t* __restrict__ nv, const uint8_t* __restrict__ term,
                 const uint8_t* __restrict__ done, acc_t* __restrict__ a, acc_t* __restrict__ b,
                 int64_t width, acc_t gamma, acc_t gamma_lam) {
  for (int64_t k = 0; k < width; ++k) {
    const acc_t d = gae::td_residual<acc_t>(static_cast<acc_t>(r[k]), static_cast<acc_t>(v[k]),
                                            static_cast<acc_t>(nv[k]), term[k] != 0, gamma);
    const Affine<acc_t> f =
        gae::combine<acc_t>({d, gae::trace_coef<acc_t>(done[k] != 0, gamma_lam)}, {a[k], b[k]});
    a[k] = f.a;
    b[k] = f.b;
  }
}

// Rows [t0, t0 + len) of environments [n0, n0 + width), width <= kRowBlock, walked backward a row at
// a time with the environments as the contiguous inner loop: every input streams through memory in
// order, and the per-environment state stays in L1.
template <bool kApply, typename scalar_t, typename acc_t>
void run_rows(const Ptrs<scalar_t>& p, int64_t t0, int64_t len, int64_t n0, int64_t width,
              int64_t N, acc_t gamma, acc_t gamma_lam, const acc_t* carry /* [width] or null */,
              Affine<acc_t>* agg /* [width] */) {
  acc_t a[kRowBlock];
  acc_t b[kRowBlock];
  for (int64_t k = 0; k < width; ++k) {
    a[k] = (kApply && carry) ? carry[k] : acc_t(0);
    b[k] = acc_t(1);
  }
  for (int64_t t = t0 + len - 1; t >= t0; --t) {
    const int64_t row = t * N + n0;
    if (kApply) {
      apply_row(p.rewards + row, p.values + row, p.next_values + row, p.terminated + row,
                p.done + row, p.advantages + row, p.returns + row, a, width, gamma, gamma_lam);
    } else {
      compose_row(p.rewards + row, p.values + row, p.next_values + row, p.terminated + row,
                  p.done + row, a, b, width, gamma, gamma_lam);
    }
  }
  if (!kApply) {
    for (int64_t k = 0; k < width; ++k) agg[k] = {a[k], b[k]};
  }
}

// One pass over the lane space, parallel over tasks.  With kRowModeMinEnvs environments or more a task is a
// (chunk, block of up to kRowBlock environments) walked row by row; with fewer, a task is a group of
// lanes from different chunks run in lockstep.
template <bool kApply, typename scalar_t, typename acc_t>
void run_pass(const Ptrs<scalar_t>& p, int64_t first_chunk, int64_t T, int64_t N, int64_t L,
              acc_t gamma, acc_t gamma_lam, const acc_t* carry, Affine<acc_t>* agg) {
  const int64_t C = (T + L - 1) / L;
  if (N < kRowModeMinEnvs) {
    const int64_t grain = std::max<int64_t>(kLanes, (int64_t(1) << 14) / L);
    at::parallel_for(first_chunk * N, C * N, grain, [&](int64_t b, int64_t e) {
      run_lane_range<kApply>(p, b, e, T, N, L, gamma, gamma_lam, carry, agg);
    });
    return;
  }
  // Wide blocks: each task streams long contiguous row segments, which the prefetchers follow (short
  // segments with a jump back of a whole row between them measured several times slower).  One block
  // per thread when the environments alone are the parallelism.
  const int64_t threads = std::max(at::get_num_threads(), 1);
  const int64_t per_thread = C > 1 ? N : (N + threads - 1) / threads;
  const int64_t block = std::min(kRowBlock, std::max(kRowModeMinEnvs, (per_thread + 15) / 16 * 16));
  const int64_t blocks = (N + block - 1) / block;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / (L * std::min(N, block)));
  at::parallel_for(first_chunk * blocks, C * blocks, grain, [&](int64_t b, int64_t e) {
    for (int64_t task = b; task < e; ++task) {
      const int64_t c = task / blocks;
      const int64_t n0 = (task - c * blocks) * block;
      const int64_t width = std::min(block, N - n0);
      const int64_t t0 = c * L;
      const int64_t lane0 = c * N + n0;
      run_rows<kApply>(p, t0, std::min(L, T - t0), n0, width, N, gamma, gamma_lam,
                       carry ? carry + lane0 : nullptr, agg ? agg + lane0 : nullptr);
    }
  });
}

template <typename scalar_t>
Ptrs<scalar_t> ptrs(const gae::Inputs& in, at::Tensor& advantages, at::Tensor& returns) {
  return {in.rewards.data_ptr<scalar_t>(),
          in.values.data_ptr<scalar_t>(),
          in.next_values.data_ptr<scalar_t>(),
          reinterpret_cast<const uint8_t*>(in.terminated.data_ptr<bool>()),
          reinterpret_cast<const uint8_t*>(in.done.data_ptr<bool>()),
          advantages.data_ptr<scalar_t>(),
          returns.data_ptr<scalar_t>()};
}


int64_t choose_num_chunks(int64_t T, int64_t N, int threads) {
  const int64_t wanted_lanes =
      (N < kRowModeMinEnvs ? int64_t(kLanes) : kRowModeMinEnvs) * std::max(threads, 1);
  if (N >= wanted_lanes || T < 2 * kMinChunk) return 1;
  const int64_t by_lanes = (wanted_lanes + N - 1) / N;
  return std::max<int64_t>(1, std::min(by_lanes, T / kMinChunk));
}

std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                           const at::Tensor& next_values,
                                           const at::Tensor& terminated, const at::Tensor& done,
                                           double gamma, double lam) {
  const gae::Inputs in =
      gae::check_inputs(rewards, values, next_values, terminated, done, gamma, lam);
  at::Tensor advantages = at::empty_like(in.rewards);
  at::Tensor returns = at::empty_like(in.rewards);
  const int64_t T = in.T;
  const int64_t N = in.N;
  if (T == 0 || N == 0) return {advantages, returns};

  int64_t C = choose_num_chunks(T, N, at::get_num_threads());
  const int64_t L = (T + C - 1) / C;
  C = (T + L - 1) / L;  // no empty chunk
  const int64_t lanes = C * N;

  AT_DISPATCH_FLOATING_TYPES(in.rewards.scalar_type(), "gae_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Ptrs<scalar_t> p = ptrs<scalar_t>(in, advantages, returns);
    const acc_t g = static_cast<acc_t>(gamma);
    const acc_t gl = static_cast<acc_t>(gamma * lam);
    std::vector<acc_t> carry;
    if (C > 1) {
      // Pass 1: the composed map of every chunk but the first (nothing flows out of chunk 0).
      std::vector<Affine<acc_t>> agg(lanes);
      run_pass<false>(p, 1, T, N, L, g, gl, static_cast<const acc_t*>(nullptr), agg.data());
      // carry[c, n] = A at the first row of chunk c + 1 (zero after the last chunk).
      carry.assign(lanes, acc_t(0));
      for (int64_t c = C - 2; c >= 0; --c) {
        for (int64_t n = 0; n < N; ++n) {
          const Affine<acc_t> f = agg[(c + 1) * N + n];
          carry[c * N + n] = gae::step<acc_t>(f.a, f.b, carry[(c + 1) * N + n]);
        }
      }
    }
    run_pass<true>(p, 0, T, N, L, g, gl, carry.empty() ? nullptr : carry.data(),
                   static_cast<Affine<acc_t>*>(nullptr));
  });
  return {advantages.view(rewards.sizes()), returns.view(rewards.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(trpo_ext, CPU, m) { m.impl("gae", &gae_cpu); }

}  // namespace trpo_ext
