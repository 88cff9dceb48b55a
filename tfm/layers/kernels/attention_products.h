// The block products of the CPU attention kernel (included by attention_cpu.cc): a block of up to R
// query rows against a task's packed keys or values, in the compiler's generic vectors (vector.h).

#pragma once

#include <cstdint>

#include "vector.h"

namespace tfm_kernels {

constexpr int R = 8;  // query rows per block

struct Dims {
  int64_t B, T, S, N, K, H, Bm, Nm;
  int64_t qs, ks;  // floats from one position's row to the next: of the query (and dQ); of key and value (dK, dV)
  int G, Hp, Sp;
  float scale;
  bool causal, has_mask;
};

// The products below run over the first NR rows of a block (NR in 8, 4, 2, 1: the fewest that
// cover its rows), so a block of one query row (a decoding step) does not pay for eight.
#define TFM_BY_ROWS(fn, rows, ...)                                             \
  ((rows) > 4   ? fn<8>(__VA_ARGS__)                                           \
   : (rows) > 2 ? fn<4>(__VA_ARGS__)                                           \
   : (rows) > 1 ? fn<2>(__VA_ARGS__)                                           \
                : fn<1>(__VA_ARGS__))

// out[r, c] = sum_h a[r, h] * bt[h, c] for columns [0, cols) (cols a multiple of W), two vectors of
// columns at a time where it can: each broadcast a[r, h] then feeds two products.
template <int NR>
void RowsTimesPacked(const float* a, const float* bt, const Dims& d, int cols, float* out) {
  int c = 0;
  for (; c + 2 * W <= cols; c += 2 * W) {
    vf acc0[NR] = {}, acc1[NR] = {};
    for (int64_t h = 0; h < d.H; ++h) {
      const vf b0 = load(bt + h * d.Sp + c), b1 = load(bt + h * d.Sp + c + W);
      for (int r = 0; r < NR; ++r) {
        const float x = a[r * d.Hp + h];
        acc0[r] += x * b0;
        acc1[r] += x * b1;
      }
    }
    for (int r = 0; r < NR; ++r) store(out + r * d.Sp + c, acc0[r]), store(out + r * d.Sp + c + W, acc1[r]);
  }
  for (; c < cols; c += W) {
    vf acc[NR] = {};
    for (int64_t h = 0; h < d.H; ++h) {
      const vf bv = load(bt + h * d.Sp + c);
      for (int r = 0; r < NR; ++r) acc[r] += a[r * d.Hp + h] * bv;
    }
    for (int r = 0; r < NR; ++r) store(out + r * d.Sp + c, acc[r]);
  }
}

// The same from K's rows ([S, Hp]), a key at a time: for blocks of one or two query rows (decoding),
// where transposing K would cost more than the products.
template <int NR>
void RowsTimesRows(const float* a, const float* rows, int64_t stride, const Dims& d, int keys, float* out) {
  for (int s = 0; s < keys; ++s) {
    vf acc[NR] = {};
    for (int hc = 0; hc < d.Hp; hc += W) {
      const vf kv = load(rows + s * stride + hc);
      for (int r = 0; r < NR; ++r) acc[r] += load(a + r * d.Hp + hc) * kv;
    }
    for (int r = 0; r < NR; ++r) out[r * d.Sp + s] = hsum(acc[r]);
  }
}

// out[r, :] = mul[r] * sum_{s < keys} p[r, s] * rows[s, :]  ([R, Sp] x [S, Hp] -> [R, Hp]), two vectors
// of columns at a time where it can.
template <int NR>
void WeightsTimesRows(const float* p, const float* rows, int64_t stride, const Dims& d, int keys, const float* mul,
                      float* out) {
  int hc = 0;
  for (; hc + 2 * W <= d.Hp; hc += 2 * W) {
    vf acc0[NR] = {}, acc1[NR] = {};
    for (int s = 0; s < keys; ++s) {
      const vf v0 = load(rows + s * stride + hc), v1 = load(rows + s * stride + hc + W);
      for (int r = 0; r < NR; ++r) {
        const float x = p[r * d.Sp + s];
        acc0[r] += x * v0;
        acc1[r] += x * v1;
      }
    }
    for (int r = 0; r < NR; ++r) {
      store(out + r * d.Hp + hc, acc0[r] * mul[r]);
      store(out + r * d.Hp + hc + W, acc1[r] * mul[r]);
    }
  }
  for (; hc < d.Hp; hc += W) {
    vf acc[NR] = {};
    for (int s = 0; s < keys; ++s) {
      const vf v = load(rows + s * stride + hc);
      for (int r = 0; r < NR; ++r) acc[r] += p[r * d.Sp + s] * v;
    }
    for (int r = 0; r < NR; ++r) store(out + r * d.Hp + hc, acc[r] * mul[r]);
  }
}

// acc[s, :] += sum_r p[r, s] * rows[r, :] for s < keys  ([R, Sp]^T x [R, Hp] into [S, Hp]), two vectors of
// columns at a time where it can: two independent sums per key, and each p[r, s] read once for both.
template <int NR>
void AccumulateTransposed(const float* p, const float* rows, const Dims& d, int keys, float* acc) {
  int hc = 0;
  for (; hc + 2 * W <= d.Hp; hc += 2 * W) {
    vf x0[NR], x1[NR];
    for (int r = 0; r < NR; ++r) x0[r] = load(rows + r * d.Hp + hc), x1[r] = load(rows + r * d.Hp + hc + W);
    for (int s = 0; s < keys; ++s) {
      float* a = acc + s * d.Hp + hc;
      vf a0 = load(a), a1 = load(a + W);
      for (int r = 0; r < NR; ++r) {
        const float w = p[r * d.Sp + s];
        a0 += w * x0[r];
        a1 += w * x1[r];
      }
      store(a, a0), store(a + W, a1);
    }
  }
  for (; hc < d.Hp; hc += W) {
    vf x[NR];
    for (int r = 0; r < NR; ++r) x[r] = load(rows + r * d.Hp + hc);
    for (int s = 0; s < keys; ++s) {
      vf a = load(acc + s * d.Hp + hc);
      for (int r = 0; r < NR; ++r) a += p[r * d.Sp + s] * x[r];
      store(acc + s * d.Hp + hc, a);
    }
  }
}

}  // namespace tfm_kernels
