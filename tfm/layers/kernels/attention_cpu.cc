// Fused scaled dot-product attention for the CPU, forward and backward, as XLA FFI handlers.
//
// The computation of tfm.layers.dot_product._xla_attention without the [B, N, T, S] tensors:
// for each batch row b and key/value head kh (one task, run on XLA's intra-op threads), the
// G = N / K query heads that read kh go through their query rows R at a time. A block of rows
// gets its scores against the keys (all S, or up to its last row when causal), its float32
// softmax (masked scores set to the most negative finite float, as the XLA path does) and its
// output; only the row maxima and the inverse row sums are kept for the backward, which
// recomputes the probabilities (FlashAttention's recomputation, Dao et al. 2022) and forms
//   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),  dQ = scale dS K,  dK = scale dS^T Q.
//
// Layouts are tfm's: query/output [B, T, N, H], key/value [B, S, K, H], mask [Bm, Nm, T, S]
// (Bm in {1, B}, Nm in {1, N}; bool, true = may attend), row statistics [B, N, T].
// Inner loops use the compiler's generic vector types (16 floats), so the same source builds
// for AVX-512, AVX2 or NEON; keys and head widths are padded to 16 inside the packed buffers.

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int W = 16;  // floats per vector
constexpr int R = 8;   // query rows per block

typedef float vf __attribute__((vector_size(64)));
typedef float vfu __attribute__((vector_size(64), aligned(4)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint8_t vb __attribute__((vector_size(16)));
typedef uint8_t vbu __attribute__((vector_size(16), aligned(1)));

constexpr vi kIota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

inline vf load(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void store(float* p, vf x) { *reinterpret_cast<vfu*>(p) = x; }
inline vf splat(float x) { return vf{} + x; }
inline vf select(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }  // m ? a : b
inline int round_up(int x) { return (x + W - 1) / W * W; }

// Horizontal max and sum, by halves.
inline float hmax(vf x) {
  float a[W];
  std::memcpy(a, &x, sizeof a);
  for (int w = W / 2; w > 0; w /= 2)
    for (int i = 0; i < w; ++i) a[i] = std::max(a[i], a[i + w]);
  return a[0];
}
inline float hsum(vf x) {
  float a[W];
  std::memcpy(a, &x, sizeof a);
  for (int w = W / 2; w > 0; w /= 2)
    for (int i = 0; i < w; ++i) a[i] += a[i + w];
  return a[0];
}

// exp for x <= 0 (Cephes' expf polynomial, ~1 ulp); exactly 0 below the smallest normal's log.
inline vf vexp(vf x) {
  const vf lo = splat(-87.33654f);
  const vi under = x < lo;
  x = select(under, lo, x);
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
  return (vf)((vi)(p * (vf)pow2) & ~under);
}

// dst[0, n) = src[0, n) * mul, a vector at a time.
inline void CopyRow(float* dst, const float* src, int64_t n, float mul = 1.f) {
  int64_t i = 0;
  for (; i + W <= n; i += W) store(dst + i, load(src + i) * mul);
  for (; i < n; ++i) dst[i] = src[i] * mul;
}

// Scratch buffers of one thread, reused from task to task (no allocation per task).
float* Scratch(int slot, int64_t size) {
  thread_local std::vector<float> buffers[12];
  if (static_cast<int64_t>(buffers[slot].size()) < size) buffers[slot].resize(size);
  return buffers[slot].data();
}

struct Dims {
  int64_t B, T, S, N, K, H, Bm, Nm;
  int G, Hp, Sp;
  float scale;
  bool causal, has_mask;
};

Dims GetDims(const ffi::AnyBuffer::Dimensions& qd, const ffi::AnyBuffer::Dimensions& kd,
             const ffi::AnyBuffer::Dimensions& md, float scale, bool causal, bool has_mask) {
  Dims d;
  d.B = qd[0], d.T = qd[1], d.N = qd[2], d.H = qd[3], d.S = kd[1], d.K = kd[2];
  d.Bm = md[0], d.Nm = md[1];
  d.G = static_cast<int>(d.N / d.K);
  d.Hp = round_up(static_cast<int>(d.H));
  d.Sp = round_up(static_cast<int>(d.S));
  d.scale = scale, d.causal = causal, d.has_mask = has_mask;
  return d;
}

// Runs body(0..tasks-1) on the caller and XLA's intra-op threads; returns when all are done.
void ParallelFor(ffi::ThreadPool& pool, int64_t tasks, const std::function<void(int64_t)>& body) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  int64_t helpers = std::min<int64_t>(pool.num_threads(), tasks) - 1;
  auto work = [state, tasks, &body] {
    for (int64_t i; (i = state->next.fetch_add(1)) < tasks;) {
      body(i);
      if (state->done.fetch_add(1) + 1 == tasks) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  // A helper that starts after the last task finds nothing to do and touches only `state`
  // (kept alive by its copy of the pointer), never `body`.
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == tasks; });
}

// The per-task packed copies of one key/value head: K^T and V^T as [Hp, Sp], K and V as [S, Hp].
void PackTransposed(const float* x, const Dims& d, int64_t b, int64_t kh, float* out) {
  for (int64_t h = 0; h < d.H; ++h) std::fill(out + h * d.Sp + d.S, out + (h + 1) * d.Sp, 0.f);
  for (int64_t s = 0; s < d.S; ++s) {
    const float* row = x + ((b * d.S + s) * d.K + kh) * d.H;
    for (int64_t h = 0; h < d.H; ++h) out[h * d.Sp + s] = row[h];
  }
}
void PackRows(const float* x, const Dims& d, int64_t b, int64_t kh, float* out) {
  for (int64_t s = 0; s < d.S; ++s) {
    std::fill(out + s * d.Hp + d.H, out + (s + 1) * d.Hp, 0.f);
    CopyRow(out + s * d.Hp, x + ((b * d.S + s) * d.K + kh) * d.H, d.H);
  }
}
// Query-layout rows t0..t0+rows of head n, times `mul`, into [R, Hp] (rows past `rows` zero).
void PackQueryRows(const float* x, const Dims& d, int64_t b, int64_t n, int64_t t0, int rows, float mul, float* out) {
  for (int r = 0; r < rows; ++r) {
    CopyRow(out + r * d.Hp, x + ((b * d.T + t0 + r) * d.N + n) * d.H, d.H, mul);
    std::fill(out + r * d.Hp + d.H, out + (r + 1) * d.Hp, 0.f);
  }
  std::fill(out + rows * d.Hp, out + R * d.Hp, 0.f);
}
void UnpackQueryRows(const float* in, const Dims& d, int64_t b, int64_t n, int64_t t0, int rows, float* x) {
  for (int r = 0; r < rows; ++r) CopyRow(x + ((b * d.T + t0 + r) * d.N + n) * d.H, in + r * d.Hp, d.H);
}

// out[r, c] = sum_h a[r, h] * bt[h, c] for R rows and columns [0, cols) (cols a multiple of W).
void RowsTimesPacked(const float* a, const float* bt, const Dims& d, int cols, float* out) {
  for (int c = 0; c < cols; c += W) {
    vf acc[R] = {};
    for (int64_t h = 0; h < d.H; ++h) {
      const vf bv = load(bt + h * d.Sp + c);
      for (int r = 0; r < R; ++r) acc[r] += a[r * d.Hp + h] * bv;
    }
    for (int r = 0; r < R; ++r) store(out + r * d.Sp + c, acc[r]);
  }
}

// out[r, :] = mul[r] * sum_{s < keys} p[r, s] * rows[s, :]  ([R, Sp] x [S, Hp] -> [R, Hp]).
void WeightsTimesRows(const float* p, const float* rows, const Dims& d, int keys, const float* mul, float* out) {
  for (int hc = 0; hc < d.Hp; hc += W) {
    vf acc[R] = {};
    for (int s = 0; s < keys; ++s) {
      const vf v = load(rows + s * d.Hp + hc);
      for (int r = 0; r < R; ++r) acc[r] += p[r * d.Sp + s] * v;
    }
    for (int r = 0; r < R; ++r) store(out + r * d.Hp + hc, acc[r] * mul[r]);
  }
}

// acc[s, :] += sum_r p[r, s] * rows[r, :] for s < keys  ([R, Sp]^T x [R, Hp] into [S, Hp]).
void AccumulateTransposed(const float* p, const float* rows, const Dims& d, int keys, float* acc) {
  for (int hc = 0; hc < d.Hp; hc += W) {
    vf x[R];
    for (int r = 0; r < R; ++r) x[r] = load(rows + r * d.Hp + hc);
    for (int s = 0; s < keys; ++s) {
      vf a = load(acc + s * d.Hp + hc);
      for (int r = 0; r < R; ++r) a += p[r * d.Sp + s] * x[r];
      store(acc + s * d.Hp + hc, a);
    }
  }
}

// Which keys row t may see, as a lane mask over keys [c, c + W): the mask, causal, and s < keys.
inline vi Visible(const uint8_t* mask_row, const Dims& d, int64_t t, int c, int keys) {
  const vi idx = kIota + c;
  vi keep = idx < keys;
  if (d.causal) keep &= idx <= static_cast<int32_t>(t);
  if (d.has_mask) {
    vb m = {};
    if (c + W <= d.S) {
      m = *reinterpret_cast<const vbu*>(mask_row + c);
    } else {
      for (int i = 0; i < d.S - c; ++i) m[i] = mask_row[c + i];
    }
    keep &= __builtin_convertvector(m, vi) != 0;
  }
  return keep;
}

// Scores [R, Sp] -> masked scores: hidden keys get -FLT_MAX (as the XLA path), keys past `keys` -inf.
inline vf MaskScores(vf x, vi keep, int c, int keys) {
  const vi idx = kIota + c;
  return select(keep, x, select(idx < keys, splat(-FLT_MAX), splat(-INFINITY)));
}

const uint8_t* MaskRow(const bool* mask, const Dims& d, int64_t b, int64_t n, int64_t t) {
  if (!d.has_mask) return nullptr;
  const int64_t bm = d.Bm == 1 ? 0 : b, nm = d.Nm == 1 ? 0 : n;
  return reinterpret_cast<const uint8_t*>(mask) + ((bm * d.Nm + nm) * d.T + t) * d.S;
}

// Keys a block of rows starting at t0 looks at: all of them, or up to its last row when causal.
inline int KeysOf(const Dims& d, int64_t t0, int rows) {
  return static_cast<int>(d.causal ? std::min<int64_t>(d.S, t0 + rows) : d.S);
}

void ForwardTask(const float* q, const float* k, const float* v, const bool* mask, const Dims& d, int64_t task,
                 float* o, float* row_max, float* row_inv) {
  const int64_t b = task / d.K, kh = task % d.K;
  const int64_t packed = static_cast<int64_t>(d.Hp) * d.Sp;
  float *kt = Scratch(0, packed), *vr = Scratch(1, d.S * d.Hp), *qr = Scratch(2, R * d.Hp),
        *p = Scratch(3, R * d.Sp), *out = Scratch(4, R * d.Hp);
  float inv[R];
  PackTransposed(k, d, b, kh, kt);
  PackRows(v, d, b, kh, vr);
  for (int g = 0; g < d.G; ++g) {
    const int64_t n = kh * d.G + g;
    for (int64_t t0 = 0; t0 < d.T; t0 += R) {
      const int rows = static_cast<int>(std::min<int64_t>(R, d.T - t0));
      const int keys = KeysOf(d, t0, rows), cols = round_up(keys);
      PackQueryRows(q, d, b, n, t0, rows, d.scale, qr);
      RowsTimesPacked(qr, kt, d, cols, p);
      for (int r = 0; r < R; ++r) {
        float* x = p + r * d.Sp;
        if (r >= rows) {
          std::fill(x, x + cols, 0.f);
          inv[r] = 0.f;
          continue;
        }
        const int64_t t = t0 + r;
        const uint8_t* mrow = MaskRow(mask, d, b, n, t);
        vf mx = splat(-INFINITY);
        for (int c = 0; c < cols; c += W) {
          const vf s = MaskScores(load(x + c), Visible(mrow, d, t, c, keys), c, keys);
          store(x + c, s);
          mx = select(s > mx, s, mx);
        }
        const float m = hmax(mx);
        vf sum = {};
        for (int c = 0; c < cols; c += W) {
          const vf e = vexp(load(x + c) - m);
          store(x + c, e);
          sum += e;
        }
        inv[r] = 1.f / hsum(sum);
        row_max[(b * d.N + n) * d.T + t] = m;
        row_inv[(b * d.N + n) * d.T + t] = inv[r];
      }
      WeightsTimesRows(p, vr, d, keys, inv, out);  // the softmax's division, applied to the output rows
      UnpackQueryRows(out, d, b, n, t0, rows, o);
    }
  }
}

void BackwardTask(const float* q, const float* k, const float* v, const bool* mask, const float* o,
                  const float* dout, const float* row_max, const float* row_inv, const Dims& d, int64_t task,
                  float* dq, float* dk, float* dv) {
  const int64_t b = task / d.K, kh = task % d.K;
  const int64_t packed = static_cast<int64_t>(d.Hp) * d.Sp;
  float *kt = Scratch(0, packed), *vt = Scratch(1, packed), *kr = Scratch(2, d.S * d.Hp),
        *dk_acc = Scratch(3, d.S * d.Hp), *dv_acc = Scratch(4, d.S * d.Hp);
  float *qr = Scratch(5, R * d.Hp), *dor = Scratch(6, R * d.Hp), *p = Scratch(8, R * d.Sp),
        *dp = Scratch(9, R * d.Sp), *out = Scratch(10, R * d.Hp);
  float scale[R];
  std::fill(scale, scale + R, d.scale);
  std::fill(dk_acc, dk_acc + d.S * d.Hp, 0.f);
  std::fill(dv_acc, dv_acc + d.S * d.Hp, 0.f);
  PackTransposed(k, d, b, kh, kt);
  PackTransposed(v, d, b, kh, vt);
  PackRows(k, d, b, kh, kr);
  for (int g = 0; g < d.G; ++g) {
    const int64_t n = kh * d.G + g;
    for (int64_t t0 = 0; t0 < d.T; t0 += R) {
      const int rows = static_cast<int>(std::min<int64_t>(R, d.T - t0));
      const int keys = KeysOf(d, t0, rows), cols = round_up(keys);
      PackQueryRows(q, d, b, n, t0, rows, d.scale, qr);
      PackQueryRows(dout, d, b, n, t0, rows, 1.f, dor);
      RowsTimesPacked(qr, kt, d, cols, p);
      RowsTimesPacked(dor, vt, d, cols, dp);
      for (int r = 0; r < R; ++r) {
        float* x = p + r * d.Sp;
        float* y = dp + r * d.Sp;
        if (r >= rows) {
          std::fill(x, x + cols, 0.f);
          std::fill(y, y + cols, 0.f);
          continue;
        }
        const int64_t t = t0 + r;
        const uint8_t* mrow = MaskRow(mask, d, b, n, t);
        const float m = row_max[(b * d.N + n) * d.T + t], inv = row_inv[(b * d.N + n) * d.T + t];
        const float* orow = o + ((b * d.T + t) * d.N + n) * d.H;
        float delta = 0.f;  // rowsum(dP * P) = dO . O
        for (int64_t h = 0; h < d.H; ++h) delta += dor[r * d.Hp + h] * orow[h];
        for (int c = 0; c < cols; c += W) {
          const vi keep = Visible(mrow, d, t, c, keys);
          const vf prob = vexp(MaskScores(load(x + c), keep, c, keys) - m) * inv;
          store(x + c, prob);
          store(y + c, select(keep, prob * (load(y + c) - delta), vf{}));  // dS; hidden keys get none
        }
      }
      AccumulateTransposed(p, dor, d, keys, dv_acc);
      AccumulateTransposed(dp, qr, d, keys, dk_acc);
      WeightsTimesRows(dp, kr, d, keys, scale, out);
      UnpackQueryRows(out, d, b, n, t0, rows, dq);
    }
  }
  for (int64_t s = 0; s < d.S; ++s) {
    CopyRow(dk + ((b * d.S + s) * d.K + kh) * d.H, dk_acc + s * d.Hp, d.H);
    CopyRow(dv + ((b * d.S + s) * d.K + kh) * d.H, dv_acc + s * d.Hp, d.H);
  }
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::PRED> mask, float scale, bool causal, bool has_mask,
                   ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> row_max,
                   ffi::ResultBuffer<ffi::F32> row_inv) {
  const Dims d = GetDims(q.dimensions(), k.dimensions(), mask.dimensions(), scale, causal, has_mask);
  ParallelFor(pool, d.B * d.K, [&](int64_t task) {
    ForwardTask(q.typed_data(), k.typed_data(), v.typed_data(), mask.typed_data(), d, task, o->typed_data(),
                row_max->typed_data(), row_inv->typed_data());
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> dout,
                    ffi::Buffer<ffi::F32> row_max, ffi::Buffer<ffi::F32> row_inv, float scale, bool causal,
                    bool has_mask, ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv) {
  const Dims d = GetDims(q.dimensions(), k.dimensions(), mask.dimensions(), scale, causal, has_mask);
  ParallelFor(pool, d.B * d.K, [&](int64_t task) {
    BackwardTask(q.typed_data(), k.typed_data(), v.typed_data(), mask.typed_data(), o.typed_data(),
                 dout.typed_data(), row_max.typed_data(), row_inv.typed_data(), d, task, dq->typed_data(),
                 dk->typed_data(), dv->typed_data());
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TfmAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Attr<float>("scale")
                                  .Attr<bool>("causal")
                                  .Attr<bool>("has_mask")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(TfmAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<bool>("causal")
                                  .Attr<bool>("has_mask")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
