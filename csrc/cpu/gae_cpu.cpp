// GAE on the CPU.  Work is split into "lanes": a lane is one environment over one chunk of the time
// axis.  With many environments each lane is a whole column and one pass suffices (every input read
// once).  With few environments and a long horizon (T = 1e6, N = 3) one column would be a single
// serial dependency chain, so the time axis is cut into chunks: pass 1 composes each chunk's affine
// map, a short serial scan over chunks gives every chunk its carry-in, and pass 2 replays each chunk.
// Lanes are processed kLanes at a time in lockstep, so their independent chains overlap in the
// pipeline instead of waiting on one multiply-add at a time.
//
// One float32 environment (T = 1e6, N = 1) has its own path: the column is scanned four elements at
// a time in SIMD registers, in cache-sized blocks processed as a pipeline from the last block to the
// first.  A worker composes its block's affine map (the block's inputs come from memory once and stay
// in L2), waits for the carry of the block after it (published by the worker that took that block as
// soon as that one had composed its map), publishes its own carry and replays the block from cache.
// Memory sees each input read once and each output written once; the blocks depend on the shape
// only, so the result does not depend on the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <thread>
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

// --- one float32 environment: a vectorised scan of the column -------------------------------

// Four-wide float vectors (GCC/clang vector extensions, so the shared header's expressions apply to
// them unchanged) and SSE2 for the shuffles and the widening of the mask bytes, which the compilers
// otherwise expand element by element.  SSE2 is part of x86-64, so no run-time dispatch is needed;
// elsewhere (and for float64) one environment takes the lane path.
#if defined(__SSE2__)
#define TRPO_GAE_SIMD 1

// Elements per block: its inputs and outputs (22 B per element) fit in one core's L2.
constexpr int64_t kBlockElems = 16384;

// Spins until `flag` is set by another worker, then reads what it guards.
template <typename T>
T wait_for(const std::atomic<int>& flag, const T& value) {
  for (int spins = 0; flag.load(std::memory_order_acquire) == 0; ++spins) {
    if (spins > 64) std::this_thread::yield();
  }
  return value;
}

struct Simd {
  typedef float vec __attribute__((vector_size(16)));
  typedef int32_t mask __attribute__((vector_size(16)));
  static constexpr int W = 4;
  // Elements K.. of `a` moved down to 0.., zeros entering at the top.
  template <int K>
  static vec down0(vec a) {
    return reinterpret_cast<vec>(_mm_srli_si128(reinterpret_cast<__m128i>(a), 4 * K));
  }
  // The same with ones entering (the identity map's coefficient).
  template <int K>
  static vec down1(vec a) {
    const vec ones_on_top = K == 1 ? vec{0.f, 0.f, 0.f, 1.f} : vec{0.f, 0.f, 1.f, 1.f};
    return reinterpret_cast<vec>(_mm_or_ps(reinterpret_cast<__m128>(down0<K>(a)),
                                           reinterpret_cast<__m128>(ones_on_top)));
  }
  // Sixteen mask bytes to four vectors of 32-bit masks, all ones where the byte is nonzero.
  static void widen(const uint8_t* bytes, mask out[4]) {
    const __m128i zero = _mm_setzero_si128();
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
    const __m128i is_zero = _mm_cmpeq_epi8(b, zero);
    const __m128i set = _mm_xor_si128(is_zero, _mm_set1_epi8(-1));
    const __m128i lo = _mm_unpacklo_epi8(set, set);
    const __m128i hi = _mm_unpackhi_epi8(set, set);
    out[0] = reinterpret_cast<mask>(_mm_unpacklo_epi16(lo, lo));
    out[1] = reinterpret_cast<mask>(_mm_unpackhi_epi16(lo, lo));
    out[2] = reinterpret_cast<mask>(_mm_unpacklo_epi16(hi, hi));
    out[3] = reinterpret_cast<mask>(_mm_unpackhi_epi16(hi, hi));
  }
};

// Vectors per unrolled group: their carries come from one scalar map each, computed off the
// critical path, so the serial dependency is one multiply-add per group.
constexpr int kGroupVecs = 4;

// Backward over t0 + len - 1 .. t0 of the single column, A at t0 + len being `carry`.  kStore: write
// advantages and returns.  Either way return A at t0; when not storing also set *coef_prod to the
// product of the trace coefficients, so that (A at t0 from carry 0, product) is the block's map.
template <bool kStore>
float scan_column(const Ptrs<float>& p, int64_t t0, int64_t len, float gamma, float gamma_lam,
                  float carry, float* coef_prod) {
  using vec = Simd::vec;
  using mask = Simd::mask;
  constexpr int W = Simd::W;
  constexpr int G = W * kGroupVecs;
  static_assert(G == 16, "Simd::widen handles sixteen masks");
  float x = carry;
  float prod = 1.f;
  // The elements past the last whole group (latest in time, so first in the backward order).
  const int64_t whole = t0 + len / G * G;
  for (int64_t t = t0 + len - 1; t >= whole; --t) {
    const float v = p.values[t];
    const float d =
        gae::td_residual<float>(p.rewards[t], v, p.next_values[t], p.terminated[t] != 0, gamma);
    const float c = gae::trace_coef<float>(p.done[t] != 0, gamma_lam);
    x = gae::step<float>(d, c, x);
    prod *= c;
    if (kStore) {
      p.advantages[t] = x;
      p.returns[t] = x + v;
    }
  }
  const vec g = vec{} + gamma;
  const vec gl = vec{} + gamma_lam;
  for (int64_t base = whole - G; base >= t0; base -= G) {
    mask term[kGroupVecs], done[kGroupVecs];
    Simd::widen(p.terminated + base, term);
    Simd::widen(p.done + base, done);
    vec a[kGroupVecs], b[kGroupVecs], v[kGroupVecs];
    for (int u = 0; u < kGroupVecs; ++u) {
      const int64_t t = base + u * W;
      vec r, nv;
      std::memcpy(&r, p.rewards + t, sizeof(vec));
      std::memcpy(&v[u], p.values + t, sizeof(vec));
      std::memcpy(&nv, p.next_values + t, sizeof(vec));
      // The per-element maps, then their suffix compositions within the vector: afterwards element
      // i holds the map from A at t + W (the next vector's first element) to A at t + i.
      gae::Affine<vec> f{gae::td_residual<vec, mask>(r, v[u], nv, term[u], g),
                         gae::trace_coef<vec, mask>(done[u], gl)};
      f = gae::combine<vec>(f, {Simd::down0<1>(f.a), Simd::down1<1>(f.b)});
      f = gae::combine<vec>(f, {Simd::down0<2>(f.a), Simd::down1<2>(f.b)});
      a[u] = f.a;
      b[u] = f.b;
    }
    // in[u]: A at the first element after vector u, from the group's carry-in x.
    float in[kGroupVecs];
    gae::Affine<float> after = gae::identity<float>();  // vectors u + 1 .. end of the group
    for (int u = kGroupVecs - 1; u >= 0; --u) {
      in[u] = gae::step<float>(after.a, after.b, x);
      after = gae::combine<float>({a[u][0], b[u][0]}, after);
    }
    x = gae::step<float>(after.a, after.b, x);
    prod *= after.b;
    if (kStore) {
      for (int u = 0; u < kGroupVecs; ++u) {
        const vec A = a[u] + b[u] * in[u];
        const vec ret = A + v[u];
        std::memcpy(p.advantages + base + u * W, &A, sizeof(vec));
        std::memcpy(p.returns + base + u * W, &ret, sizeof(vec));
      }
    }
  }
  if (!kStore) *coef_prod = prod;
  return x;
}

// The single column in blocks of kBlockElems, pipelined as described at the top.  Every block is
// composed (from carry 0) before its replay, even when its carry-in is already known, so that the
// carry it passes on does not depend on timing or on the number of threads.
void gae_one_env(const Ptrs<float>& p, int64_t T, float gamma, float gamma_lam) {
  const int64_t rows = kBlockElems;
  const int64_t B = (T + rows - 1) / rows;
  if (B == 1) {
    scan_column<true>(p, 0, T, gamma, gamma_lam, 0.f, nullptr);
    return;
  }
  std::vector<float> carry(B);  // carry[b]: A at the first row of block b, once ready[b]
  std::unique_ptr<std::atomic<int>[]> ready(new std::atomic<int>[B]);
  for (int64_t b = 0; b < B; ++b) ready[b].store(0, std::memory_order_relaxed);
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(std::max(at::get_num_threads(), 1), B);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (;;) {
      const int64_t k = next.fetch_add(1, std::memory_order_relaxed);
      if (k >= B) break;
      const int64_t b = B - 1 - k;
      const int64_t t0 = b * rows;
      const int64_t len = std::min(rows, T - t0);
      float prod;
      const float a = scan_column<false>(p, t0, len, gamma, gamma_lam, 0.f, &prod);
      const float in = b == B - 1 ? 0.f : wait_for(ready[b + 1], carry[b + 1]);
      carry[b] = gae::step<float>(a, prod, in);
      ready[b].store(1, std::memory_order_release);
      scan_column<true>(p, t0, len, gamma, gamma_lam, in, nullptr);
    }
  });
}
#else
#define TRPO_GAE_SIMD 0
#endif  // defined(__SSE2__)

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
#if TRPO_GAE_SIMD
  if (N == 1 && in.rewards.scalar_type() == at::kFloat) {
    gae_one_env(ptrs<float>(in, advantages, returns), T, static_cast<float>(gamma),
                static_cast<float>(gamma * lam));
    return {advantages.view(rewards.sizes()), returns.view(rewards.sizes())};
  }
#endif

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
