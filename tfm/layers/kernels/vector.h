// Portable vector helpers and the thread-pool loop of tfm's CPU kernels (included by every kernel source).
//
// Vectors are the compiler's generic vector types (GCC and Clang): 16 floats, which the
// compiler lowers to AVX-512, AVX2 or NEON, whichever -march=native / -mcpu=native gives.

#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace tfm_kernels {

namespace ffi = xla::ffi;

constexpr int W = 16;  // floats per vector

typedef float vf __attribute__((vector_size(64)));
typedef float vfu __attribute__((vector_size(64), aligned(4)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint8_t vb __attribute__((vector_size(16)));
typedef uint8_t vbu __attribute__((vector_size(16), aligned(1)));

constexpr vi kIota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

inline vf load(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void store(float* p, vf x) { *reinterpret_cast<vfu*>(p) = x; }
inline vf splat(float x) { return vf{} + x; }
inline vf select(vi m, vf a, vf b) { return m ? a : b; }  // m: lanes of all ones (a) or zeros (b)
inline int round_up(int x) { return (x + W - 1) / W * W; }

// Whether the compiler has __builtin_shufflevector (Clang; GCC from 12).
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define TFM_HAVE_SHUFFLE 1
#else
#define TFM_HAVE_SHUFFLE 0
#endif

// Horizontal max and sum, by halves: lanes [0, 8) with [8, 16), then [0, 4) with [4, 8), ... (the
// same order in both forms; shuffles where the compiler has them, else through memory).
#if TFM_HAVE_SHUFFLE
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));
typedef float vf2 __attribute__((vector_size(8)));
template <typename Op>
inline float Reduce(vf x, Op op) {
  const vf8 a = op(__builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7),
                   __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15));
  const vf4 b = op(__builtin_shufflevector(a, a, 0, 1, 2, 3), __builtin_shufflevector(a, a, 4, 5, 6, 7));
  const vf2 c = op(__builtin_shufflevector(b, b, 0, 1), __builtin_shufflevector(b, b, 2, 3));
  return op(c, __builtin_shufflevector(c, c, 1, 0))[0];
}
#else
template <typename Op>
inline float Reduce(vf x, Op op) {
  float a[W];
  std::memcpy(a, &x, sizeof a);
  for (int w = W / 2; w > 0; w /= 2)
    for (int i = 0; i < w; ++i) a[i] = op(a[i], a[i + w]);
  return a[0];
}
#endif
inline float hmax(vf x) {
  return Reduce(x, [](auto a, auto b) { return a < b ? b : a; });  // std::max's choice, lane by lane
}
inline float hsum(vf x) {
  return Reduce(x, [](auto a, auto b) { return a + b; });
}

// a > b ? a : b and a < b ? a : b, lane by lane: where a lane holds a NaN, b's lane. On AVX-512 one
// instruction each (vmaxps and vminps compute exactly these), instead of a compare and a blend: the
// compiler does not match the generic form itself, as it cannot assume there is no NaN.
inline vf vmax(vf a, vf b) {
#if defined(__AVX512F__)
  return (vf)_mm512_max_ps((__m512)a, (__m512)b);
#else
  return a > b ? a : b;
#endif
}
inline vf vmin(vf a, vf b) {
#if defined(__AVX512F__)
  return (vf)_mm512_min_ps((__m512)a, (__m512)b);
#else
  return a < b ? a : b;
#endif
}

// exp for x <= 0 (Cephes' expf polynomial, ~1 ulp); exactly 0 below the smallest normal's log.
inline vf vexp(vf x) {
  const vf lo = splat(-87.33654f);
  const vi under = x < lo;
  x = vmax(lo, x);  // x < lo ? lo : x
  const vf magic = splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf t = x * splat(1.44269504088896341f) + magic;
  const vf n = t - magic;
  const vf r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
  vf p = splat(1.9875691500E-4f);
  p = p * r + splat(1.3981999507E-3f);
  p = p * r + splat(8.3334519073E-3f);
  p = p * r + splat(4.1665795894E-2f);
  p = p * r + splat(1.6666665459E-1f);
  p = p * r + splat(5.0000001201E-1f);
  p = p * r * r + r + splat(1.f);
  const vi pow2 = (((vi)t - (vi)magic) + 127) << 23;
  return select(under, vf{}, p * (vf)pow2);
}

// r[i][j] <- r[j][i]: a 16 x 16 tile transposed in registers, in four rounds of interleaving row i
// with row i + 8 (each round a two-source shuffle per row; Eklundh's transpose). Where the compiler
// lacks __builtin_shufflevector (GCC before 12), callers transpose element by element instead.
#if TFM_HAVE_SHUFFLE
inline void Transpose(vf (&r)[W]) {
  for (int round = 0; round < 4; ++round) {
    vf o[W];
    for (int i = 0; i < W / 2; ++i) {
      o[2 * i] = __builtin_shufflevector(r[i], r[i + 8], 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
      o[2 * i + 1] =
          __builtin_shufflevector(r[i], r[i + 8], 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    }
    for (int i = 0; i < W; ++i) r[i] = o[i];
  }
}
#endif

// dst[0, n) = src[0, n) * mul, a vector at a time.
inline void CopyRow(float* dst, const float* src, int64_t n, float mul = 1.f) {
  int64_t i = 0;
  for (; i + W <= n; i += W) store(dst + i, load(src + i) * mul);
  for (; i < n; ++i) dst[i] = src[i] * mul;
}

// Scratch buffers of one thread, reused from task to task (no allocation per task).
inline float* Scratch(int slot, int64_t size) {
  thread_local std::vector<float> buffers[12];
  if (static_cast<int64_t>(buffers[slot].size()) < size) buffers[slot].resize(size);
  return buffers[slot].data();
}

// Runs body(0..tasks-1) on the caller and XLA's intra-op threads; returns when all are done.
// Threads take the tasks in runs of `grain` (about eight runs per thread, so the last ones still
// balance the load), and the two counters sit on cache lines of their own: a task of a
// microsecond (attention over 17 positions) would otherwise spend a tenth of its time passing
// one contended line between the cores, twice.
inline void ParallelFor(ffi::ThreadPool& pool, int64_t tasks, const std::function<void(int64_t)>& body) {
  struct State {
    alignas(64) std::atomic<int64_t> next{0};
    alignas(64) std::atomic<int64_t> done{0};
    alignas(64) std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), tasks));
  const int64_t grain = std::max<int64_t>(1, tasks / (8 * threads));
  auto work = [state, tasks, grain, &body] {
    for (int64_t i; (i = state->next.fetch_add(grain)) < tasks;) {
      const int64_t end = std::min(tasks, i + grain);
      for (int64_t j = i; j < end; ++j) body(j);
      if (state->done.fetch_add(end - i) + (end - i) == tasks) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  // A helper that starts after the last task finds nothing to do and touches only `state`
  // (kept alive by its copy of the pointer), never `body`.
  for (int64_t i = 0; i < threads - 1; ++i) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == tasks; });
}

}  // namespace tfm_kernels
