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
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

#include "attention_products.h"
#include "vector.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace tfm_kernels;
using F32 = ffi::Buffer<ffi::F32>;
using F32Out = ffi::ResultBuffer<ffi::F32>;

Dims GetDims(const ffi::AnyBuffer::Dimensions& qd, const ffi::AnyBuffer::Dimensions& kd,
             const ffi::AnyBuffer::Dimensions& md, float scale, bool causal, bool has_mask) {
  Dims d;
  d.B = qd[0], d.T = qd[1], d.N = qd[2], d.H = qd[3], d.S = kd[1], d.K = kd[2];
  d.Bm = md[0], d.Nm = md[1];
  d.G = static_cast<int>(d.N / d.K);
  d.qs = d.N * d.H, d.ks = d.K * d.H;  // separate tensors; the packed handlers below set their own
  d.Hp = round_up(static_cast<int>(d.H));
  d.Sp = round_up(static_cast<int>(d.S));
  d.scale = scale, d.causal = causal, d.has_mask = has_mask;
  return d;
}

// The per-task packed copies of one key/value head: K^T and V^T as [Hp, Sp], K and V as [S, Hp].
void PackTransposed(const float* x, const Dims& d, int64_t b, int64_t kh, float* out) {
  int64_t h_tiles = 0;  // head columns [0, h_tiles) come as whole W x W tiles, their padded keys zeroed on the way
#if TFM_HAVE_SHUFFLE
  h_tiles = d.H / W * W;
#endif
  for (int64_t h = h_tiles; h < d.H; ++h) std::fill(out + h * d.Sp + d.S, out + (h + 1) * d.Sp, 0.f);
  for (int64_t s0 = 0; s0 < d.S; s0 += W) {  // by tiles of W keys: their rows stay in cache
    const int n = static_cast<int>(std::min<int64_t>(W, d.S - s0));
    const float* rows[W];
    for (int i = 0; i < n; ++i) rows[i] = x + (b * d.S + s0 + i) * d.ks + kh * d.H;
#if TFM_HAVE_SHUFFLE
    for (int64_t h = 0; h < h_tiles; h += W) {  // a whole 16 x 16 tile at a time, in registers
      vf tile[W];
      for (int i = 0; i < W; ++i) tile[i] = i < n ? load(rows[i] + h) : vf{};
      Transpose(tile);
      for (int j = 0; j < W; ++j) store(out + (h + j) * d.Sp + s0, tile[j]);
    }
#endif
    for (int64_t h = h_tiles; h < d.H; ++h) {
      float* o = out + h * d.Sp + s0;
      for (int i = 0; i < n; ++i) o[i] = rows[i][h];
    }
  }
}
void PackRows(const float* x, const Dims& d, int64_t b, int64_t kh, float* out) {
  for (int64_t s = 0; s < d.S; ++s) {
    std::fill(out + s * d.Hp + d.H, out + (s + 1) * d.Hp, 0.f);
    CopyRow(out + s * d.Hp, x + (b * d.S + s) * d.ks + kh * d.H, d.H);
  }
}
// A block of query rows: row r is query position t[r] of query head n[r].
struct Block {
  int rows;
  int64_t n[R], t[R];
};

// The blocks of one task: per query head, R consecutive positions at a time; or, for decoding
// (T <= 2), the rows of all G heads that share the key/value head together, so K and V are read once.
// The vector is the calling thread's, reused from task to task (no allocation per task).
const std::vector<Block>& Blocks(const Dims& d, int64_t kh, bool across_heads) {
  thread_local std::vector<Block> blocks;
  blocks.clear();
  const int64_t per_head = across_heads ? d.G * d.T : d.T;
  for (int64_t g = 0; g < (across_heads ? 1 : d.G); ++g) {
    for (int64_t j0 = 0; j0 < per_head; j0 += R) {
      Block blk;
      blk.rows = static_cast<int>(std::min<int64_t>(R, per_head - j0));
      for (int r = 0; r < blk.rows; ++r) {
        const int64_t j = j0 + r;
        blk.n[r] = kh * d.G + (across_heads ? j / d.T : g);
        blk.t[r] = across_heads ? j % d.T : j;
      }
      blocks.push_back(blk);
    }
  }
  return blocks;
}

// Keys a block looks at: all of them, or up to its last position when causal.
inline int KeysOf(const Dims& d, const Block& blk) {
  int64_t last = 0;
  for (int r = 0; r < blk.rows; ++r) last = std::max(last, blk.t[r]);
  return static_cast<int>(d.causal ? std::min<int64_t>(d.S, last + 1) : d.S);
}

template <typename F>  // float or const float
inline F* QueryRow(F* x, int64_t stride, const Dims& d, int64_t b, const Block& blk, int r) {
  return x + (b * d.T + blk.t[r]) * stride + blk.n[r] * d.H;
}

// A block's rows of a query-layout tensor, times `mul`, into [R, Hp] (rows past `rows` zero).
void PackQueryRows(const float* x, int64_t stride, const Dims& d, int64_t b, const Block& blk, float mul, float* out) {
  for (int r = 0; r < blk.rows; ++r) {
    CopyRow(out + r * d.Hp, QueryRow(x, stride, d, b, blk, r), d.H, mul);
    std::fill(out + r * d.Hp + d.H, out + (r + 1) * d.Hp, 0.f);
  }
  std::fill(out + blk.rows * d.Hp, out + R * d.Hp, 0.f);
}
void UnpackQueryRows(const float* in, const Dims& d, int64_t b, const Block& blk, float* x, int64_t stride) {
  for (int r = 0; r < blk.rows; ++r) CopyRow(QueryRow(x, stride, d, b, blk, r), in + r * d.Hp, d.H);
}

// Asks the cache for a block's rows of a query-layout tensor ahead of their use: rows T * N * H floats
// apart come from memory, and the next block's loads would otherwise wait for them. Inlined: GCC drops
// calls to a function that only prefetches, as if it did nothing.
__attribute__((always_inline)) inline void PrefetchQueryRows(const float* x, int64_t stride, const Dims& d, int64_t b,
                                                            const Block& blk) {
  for (int r = 0; r < blk.rows; ++r) {
    const float* row = QueryRow(x, stride, d, b, blk, r);
    for (int64_t h = 0; h < d.H; h += 64 / sizeof(float)) __builtin_prefetch(row + h);
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

void ForwardTask(const float* q, const float* k, const float* v, const bool* mask, const Dims& d, int64_t task,
                 float* o, float* row_max, float* row_inv) {
  const int64_t b = task / d.K, kh = task % d.K;
  const int64_t packed = static_cast<int64_t>(d.Hp) * d.Sp;
  float *kt = Scratch(0, packed), *vr = Scratch(1, d.S * d.Hp), *qr = Scratch(2, R * d.Hp),
        *p = Scratch(3, R * d.Sp), *out = Scratch(4, R * d.Hp);
  float inv[R];
  const bool few_rows = d.T <= 2;  // K by rows (RowsTimesRows) instead of transposed
  // Rows of a multiple of W floats are read in place, [S, K * H] apart; others are copied, padded.
  const bool in_place = d.H == d.Hp;
  const int64_t stride = in_place ? d.ks : d.Hp;
  const float* krows = in_place ? k + b * d.S * d.ks + kh * d.H : kt;
  const float* vrows = in_place ? v + b * d.S * d.ks + kh * d.H : vr;
  if (!few_rows) {
    PackTransposed(k, d, b, kh, kt);
  } else if (!in_place) {
    PackRows(k, d, b, kh, kt);
  }
  if (!in_place) PackRows(v, d, b, kh, vr);
  const std::vector<Block>& blocks = Blocks(d, kh, few_rows);
  for (size_t i = 0; i < blocks.size(); ++i) {
    const Block& blk = blocks[i];
    if (i + 1 < blocks.size()) PrefetchQueryRows(q, d.qs, d, b, blocks[i + 1]);
    const int rows = blk.rows, keys = KeysOf(d, blk), cols = round_up(keys);
    PackQueryRows(q, d.qs, d, b, blk, d.scale, qr);
    if (few_rows) {
      TFM_BY_ROWS(RowsTimesRows, rows, qr, krows, stride, d, keys, p);
    } else {
      TFM_BY_ROWS(RowsTimesPacked, rows, qr, kt, d, cols, p);
    }
    for (int r = 0; r < R; ++r) {
      float* x = p + r * d.Sp;
      if (r >= rows) {
        std::fill(x, x + cols, 0.f);
        inv[r] = 0.f;
        continue;
      }
      const int64_t n = blk.n[r], t = blk.t[r];
      const uint8_t* mrow = MaskRow(mask, d, b, n, t);
      vf mx = splat(-INFINITY);
      for (int c = 0; c < cols; c += W) {
        const vf s = MaskScores(load(x + c), Visible(mrow, d, t, c, keys), c, keys);
        store(x + c, s);
        mx = vmax(s, mx);  // s > mx ? s : mx
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
    // The softmax's division, applied to the output rows.
    TFM_BY_ROWS(WeightsTimesRows, rows, p, vrows, stride, d, keys, inv, out);
    UnpackQueryRows(out, d, b, blk, o, d.N * d.H);
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
  const bool in_place = d.H == d.Hp;  // K's rows read where they are, as in the forward
  const int64_t stride = in_place ? d.ks : d.Hp;
  const float* krows = in_place ? k + b * d.S * d.ks + kh * d.H : kr;
  if (!in_place) PackRows(k, d, b, kh, kr);
  const std::vector<Block>& blocks = Blocks(d, kh, d.T <= 2);
  for (size_t i = 0; i < blocks.size(); ++i) {
    const Block& blk = blocks[i];
    if (i + 1 < blocks.size()) {
      PrefetchQueryRows(q, d.qs, d, b, blocks[i + 1]);
      for (const float* x : {dout, o}) PrefetchQueryRows(x, d.N * d.H, d, b, blocks[i + 1]);
    }
    const int rows = blk.rows, keys = KeysOf(d, blk), cols = round_up(keys);
    PackQueryRows(q, d.qs, d, b, blk, d.scale, qr);
    PackQueryRows(dout, d.N * d.H, d, b, blk, 1.f, dor);
    TFM_BY_ROWS(RowsTimesPacked, rows, qr, kt, d, cols, p);
    TFM_BY_ROWS(RowsTimesPacked, rows, dor, vt, d, cols, dp);
    for (int r = 0; r < R; ++r) {
      float* x = p + r * d.Sp;
      float* y = dp + r * d.Sp;
      if (r >= rows) {
        std::fill(x, x + cols, 0.f);
        std::fill(y, y + cols, 0.f);
        continue;
      }
      const int64_t n = blk.n[r], t = blk.t[r];
      const uint8_t* mrow = MaskRow(mask, d, b, n, t);
      const float m = row_max[(b * d.N + n) * d.T + t], inv = row_inv[(b * d.N + n) * d.T + t];
      const float* orow = QueryRow(o, d.N * d.H, d, b, blk, r);
      // rowsum(dP * P) = dO . O, by lanes then across them (a scalar sum would be one long dependency chain).
      vf lanes = {};
      int64_t h = 0;
      for (; h + W <= d.H; h += W) lanes += load(dor + r * d.Hp + h) * load(orow + h);
      float delta = hsum(lanes);
      for (; h < d.H; ++h) delta += dor[r * d.Hp + h] * orow[h];
      for (int c = 0; c < cols; c += W) {
        const vi keep = Visible(mrow, d, t, c, keys);
        const vf prob = vexp(MaskScores(load(x + c), keep, c, keys) - m) * inv;
        store(x + c, prob);
        store(y + c, select(keep, prob * (load(y + c) - delta), vf{}));  // dS; hidden keys get none
      }
    }
    TFM_BY_ROWS(AccumulateTransposed, rows, p, dor, d, keys, dv_acc);
    TFM_BY_ROWS(AccumulateTransposed, rows, dp, qr, d, keys, dk_acc);
    TFM_BY_ROWS(WeightsTimesRows, rows, dp, krows, stride, d, keys, scale, out);
    UnpackQueryRows(out, d, b, blk, dq, d.qs);
  }
  for (int64_t s = 0; s < d.S; ++s) {
    CopyRow(dk + (b * d.S + s) * d.ks + kh * d.H, dk_acc + s * d.Hp, d.H);
    CopyRow(dv + (b * d.S + s) * d.ks + kh * d.H, dv_acc + s * d.Hp, d.H);
  }
}

using Mask = ffi::Buffer<ffi::PRED>;

ffi::Error Forward(ffi::ThreadPool pool, F32 q, F32 k, F32 v, Mask mask, float scale, bool causal, bool has_mask,
                   F32Out o, F32Out row_max, F32Out row_inv) {
  const Dims d = GetDims(q.dimensions(), k.dimensions(), mask.dimensions(), scale, causal, has_mask);
  ParallelFor(pool, d.B * d.K, [&](int64_t task) {
    ForwardTask(q.typed_data(), k.typed_data(), v.typed_data(), mask.typed_data(), d, task, o->typed_data(),
                row_max->typed_data(), row_inv->typed_data());
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, F32 q, F32 k, F32 v, Mask mask, F32 o, F32 dout, F32 row_max,
                    F32 row_inv, float scale, bool causal, bool has_mask, F32Out dq, F32Out dk, F32Out dv) {
  const Dims d = GetDims(q.dimensions(), k.dimensions(), mask.dimensions(), scale, causal, has_mask);
  ParallelFor(pool, d.B * d.K, [&](int64_t task) {
    BackwardTask(q.typed_data(), k.typed_data(), v.typed_data(), mask.typed_data(), o.typed_data(),
                 dout.typed_data(), row_max.typed_data(), row_inv.typed_data(), d, task, dq->typed_data(),
                 dk->typed_data(), dv->typed_data());
  });
  return ffi::Error::Success();
}

// The same over one packed tensor qkv [B, T, (N + 2K) H]: each position's row holds its query heads,
// then its key heads, then its value heads (the fused Q/K/V projection's output, unsplit), and the
// backward writes dQ, dK and dV into one tensor of that layout. T == S (self-attention).
Dims PackedDims(const ffi::AnyBuffer::Dimensions& xd, const ffi::AnyBuffer::Dimensions& md, int64_t heads,
                int64_t kv_heads, float scale, bool causal, bool has_mask) {
  const int64_t h = xd[2] / (heads + 2 * kv_heads);
  const int64_t qd[4] = {xd[0], xd[1], heads, h}, kd[4] = {xd[0], xd[1], kv_heads, h};
  Dims d = GetDims(ffi::AnyBuffer::Dimensions(qd, 4), ffi::AnyBuffer::Dimensions(kd, 4), md, scale, causal, has_mask);
  d.qs = d.ks = xd[2];
  return d;
}

ffi::Error PackedForward(ffi::ThreadPool pool, F32 qkv, Mask mask, float scale, bool causal, bool has_mask,
                         int64_t heads, int64_t kv_heads, F32Out o, F32Out row_max, F32Out row_inv) {
  const Dims d = PackedDims(qkv.dimensions(), mask.dimensions(), heads, kv_heads, scale, causal, has_mask);
  const float* q = qkv.typed_data();
  ParallelFor(pool, d.B * d.K, [&](int64_t task) {
    ForwardTask(q, q + d.N * d.H, q + (d.N + d.K) * d.H, mask.typed_data(), d, task, o->typed_data(),
                row_max->typed_data(), row_inv->typed_data());
  });
  return ffi::Error::Success();
}

ffi::Error PackedBackward(ffi::ThreadPool pool, F32 qkv, Mask mask, F32 o, F32 dout, F32 row_max, F32 row_inv,
                          float scale, bool causal, bool has_mask, int64_t heads, int64_t kv_heads, F32Out dqkv) {
  const Dims d = PackedDims(qkv.dimensions(), mask.dimensions(), heads, kv_heads, scale, causal, has_mask);
  const float* q = qkv.typed_data();
  float* dq = dqkv->typed_data();
  ParallelFor(pool, d.B * d.K, [&](int64_t task) {
    BackwardTask(q, q + d.N * d.H, q + (d.N + d.K) * d.H, mask.typed_data(), o.typed_data(), dout.typed_data(),
                 row_max.typed_data(), row_inv.typed_data(), d, task, dq, dq + d.N * d.H, dq + (d.N + d.K) * d.H);
  });
  return ffi::Error::Success();
}

// The bindings: the thread pool, query, key, value and mask first; then the backward's four
// extra inputs; then the attributes and three outputs of both.
auto Inputs() { return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<Mask>(); }
template <typename Binding>
auto Attributes(Binding binding) {
  return std::move(binding).template Attr<float>("scale").template Attr<bool>("causal").template Attr<bool>("has_mask")
      .template Ret<F32>().template Ret<F32>().template Ret<F32>();
}

template <typename Binding>
auto PackedAttributes(Binding binding) {
  return std::move(binding).template Attr<float>("scale").template Attr<bool>("causal")
      .template Attr<bool>("has_mask").template Attr<int64_t>("heads").template Attr<int64_t>("kv_heads");
}
auto PackedInputs() { return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32>().Arg<Mask>(); }

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TfmAttentionForward, Forward, Attributes(Inputs()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(TfmAttentionBackward, Backward,
                              Attributes(Inputs().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(TfmAttentionPackedForward, PackedForward,
                              PackedAttributes(PackedInputs()).Ret<F32>().Ret<F32>().Ret<F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(TfmAttentionPackedBackward, PackedBackward,
                              PackedAttributes(PackedInputs().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>()).Ret<F32>());
