// LayerNorm, RMSNorm and the exact GELU for the CPU, forward and backward, as XLA FFI handlers.
//
// The computations of tfm.layers.norms and tfm.layers.feedforward.gelu, each in one pass over its
// rows instead of XLA's separate reductions and elementwise loops. Over the last axis of x (D wide,
// R = all the other axes' product rows), with x^ = (x - mean) r, r = 1 / sqrt(var + eps), s the
// scale and g the output's cotangent:
//   forward   y = x^ s + bias                      (RMSNorm: no mean, no bias; var = mean(x^2))
//   backward  dx = r (g s - mean(g s) - x^ mean(g s x^))    (RMSNorm: no mean(g s) term)
//             d scale = sum_rows g x^,  d bias = sum_rows g
// A pre-LN block also passes x on to its residual sum: the backward then adds that sum's gradient
// to dx (has_residual), the add XLA would otherwise run as a pass of its own.
// The forward keeps the row means and the r's [R], and the backward recomputes x^ from x. The
// column sums of the backward are summed per block of kRows rows, then over the blocks in order:
// their rounding does not depend on how many threads ran.
//
// GELU: y = x Phi(x), dx = g (Phi(x) + x phi(x)), Phi(x) = (1 + erf(x / sqrt 2)) / 2, with erf as
// a rational function of x^2 on [-4, 4] (the polynomial Eigen and XLA have used; |error| < 4e-7).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "vector.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace tfm_kernels;
using F32 = ffi::Buffer<ffi::F32>;
using F32Out = ffi::ResultBuffer<ffi::F32>;

constexpr int64_t kRows = 32;         // rows per task of the norms
constexpr int64_t kElements = 16384;  // elements per task of the GELU

int64_t RowsOf(const F32& x) {
  const auto dims = x.dimensions();
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < dims.size(); ++i) rows *= dims[i];
  return rows;
}

// sum_i (x_i - shift)^p over one row, p in {1, 2}, in vectors, then the tail.
template <int P>
float RowSum(const float* x, int64_t d, float shift) {
  vf acc0 = {}, acc1 = {};
  const vf sv = splat(shift);
  int64_t i = 0;
  for (; i + 2 * W <= d; i += 2 * W) {
    const vf a = load(x + i) - sv, b = load(x + i + W) - sv;
    acc0 += P == 1 ? a : a * a;
    acc1 += P == 1 ? b : b * b;
  }
  for (; i + W <= d; i += W) {
    const vf a = load(x + i) - sv;
    acc0 += P == 1 ? a : a * a;
  }
  float s = hsum(acc0 + acc1);
  for (; i < d; ++i) s += P == 1 ? x[i] - shift : (x[i] - shift) * (x[i] - shift);
  return s;
}

ffi::Error NormForward(ffi::ThreadPool pool, F32 x, F32 scale, F32 bias, F32Out y, F32Out mean, F32Out rstd,
                       float eps, bool centre, bool has_bias) {
  const int64_t rows = RowsOf(x), d = x.dimensions().back();
  const float *xp = x.typed_data(), *sp = scale.typed_data(), *bp = bias.typed_data();
  float *yp = y->typed_data(), *mp = mean->typed_data(), *rp = rstd->typed_data();
  ParallelFor(pool, (rows + kRows - 1) / kRows, [&](int64_t task) {
    for (int64_t r = task * kRows; r < std::min(rows, (task + 1) * kRows); ++r) {
      const float* xr = xp + r * d;
      float* yr = yp + r * d;
      const float m = centre ? RowSum<1>(xr, d, 0.f) / d : 0.f;
      const float rs = 1.f / std::sqrt(RowSum<2>(xr, d, m) / d + eps);
      mp[r] = m, rp[r] = rs;
      int64_t i = 0;
      for (; i + W <= d; i += W) {
        const vf v = (load(xr + i) - m) * rs * load(sp + i);
        store(yr + i, has_bias ? v + load(bp + i) : v);
      }
      for (; i < d; ++i) yr[i] = (xr[i] - m) * rs * sp[i] + (has_bias ? bp[i] : 0.f);
    }
  });
  return ffi::Error::Success();
}

ffi::Error NormBackward(ffi::ThreadPool pool, F32 x, F32 scale, F32 mean, F32 rstd, F32 g, F32 residual, F32Out dx,
                        F32Out dscale, F32Out dbias, bool centre, bool has_residual) {
  const int64_t rows = RowsOf(x), d = x.dimensions().back(), tasks = (rows + kRows - 1) / kRows;
  const float *xp = x.typed_data(), *sp = scale.typed_data(), *mp = mean.typed_data(), *rp = rstd.typed_data(),
              *gp = g.typed_data(), *resp = residual.typed_data();
  float* dxp = dx->typed_data();
  std::vector<float> partial(2 * tasks * d);  // per task: its rows' sums of g x^, then of g
  ParallelFor(pool, tasks, [&](int64_t task) {
    float* ps = partial.data() + 2 * task * d;
    float* pb = ps + d;
    std::fill(ps, ps + 2 * d, 0.f);
    for (int64_t r = task * kRows; r < std::min(rows, (task + 1) * kRows); ++r) {
      const float *xr = xp + r * d, *gr = gp + r * d;
      const float m = mp[r], rs = rp[r];
      vf a0 = {}, b0 = {};  // sums of g s and of g s x^
      int64_t i = 0;
      for (; i + W <= d; i += W) {
        const vf gv = load(gr + i), xh = (load(xr + i) - m) * rs, gs = gv * load(sp + i);
        a0 += gs, b0 += gs * xh;
        store(ps + i, load(ps + i) + gv * xh);
        store(pb + i, load(pb + i) + gv);
      }
      float a = hsum(a0), b = hsum(b0);
      for (int64_t j = i; j < d; ++j) {
        const float xh = (xr[j] - m) * rs, gs = gr[j] * sp[j];
        a += gs, b += gs * xh;
        ps[j] += gr[j] * xh, pb[j] += gr[j];
      }
      a = centre ? a / d : 0.f, b /= d;
      float* dr = dxp + r * d;
      const float* rr = resp + r * d;
      for (i = 0; i + W <= d; i += W) {
        const vf xh = (load(xr + i) - m) * rs, v = (load(gr + i) * load(sp + i) - a - xh * b) * rs;
        store(dr + i, has_residual ? v + load(rr + i) : v);
      }
      for (; i < d; ++i) {
        const float v = (gr[i] * sp[i] - a - (xr[i] - m) * rs * b) * rs;
        dr[i] = has_residual ? v + rr[i] : v;
      }
    }
  });
  float *ds = dscale->typed_data(), *db = dbias->typed_data();
  std::fill(ds, ds + d, 0.f);
  std::fill(db, db + d, 0.f);
  for (int64_t t = 0; t < tasks; ++t) {
    const float* ps = partial.data() + 2 * t * d;
    for (int64_t i = 0; i < d; ++i) ds[i] += ps[i], db[i] += ps[d + i];
  }
  return ffi::Error::Success();
}

// erf(x) for x clamped to [-4, 4]: x P(x^2) / Q(x^2), itself clamped to [-1, 1].
inline vf Erf(vf x) {
  const vf lo = splat(-4.f), hi = splat(4.f), one = splat(1.f);
  x = vmin(hi, vmax(lo, x));  // x < lo ? lo : x, then x > hi ? hi : x
  const vf z = x * x;
  vf p = splat(-2.72614225801306e-10f);
  p = p * z + splat(2.77068142495902e-08f);
  p = p * z + splat(-2.10102402082508e-06f);
  p = p * z + splat(-5.69250639462346e-05f);
  p = p * z + splat(-7.34990630326855e-04f);
  p = p * z + splat(-2.95459980854025e-03f);
  p = p * z + splat(-1.60960333262415e-02f);
  vf q = splat(-1.45660718464996e-05f);
  q = q * z + splat(-2.13374055278905e-04f);
  q = q * z + splat(-1.68282697438203e-03f);
  q = q * z + splat(-7.37332916720468e-03f);
  q = q * z + splat(-1.42647390514189e-02f);
  vf e = x * p / q;
  return vmax(-one, vmin(one, e));  // e > 1 ? 1 : e, then e < -1 ? -1 : e
}

inline vf Cdf(vf x) { return splat(0.5f) + splat(0.5f) * Erf(x * splat(0.70710678118654752f)); }

// out[i] = fn(x[i], g[i]) for i < n (g may be null), by vectors; the tail through a zero-padded vector.
template <typename Fn>
void Elementwise(ffi::ThreadPool& pool, int64_t n, const float* x, const float* g, float* out, Fn fn) {
  ParallelFor(pool, (n + kElements - 1) / kElements, [&](int64_t task) {
    const int64_t end = std::min(n, (task + 1) * kElements);
    int64_t i = task * kElements;
    for (; i + W <= end; i += W) store(out + i, fn(load(x + i), g ? load(g + i) : vf{}));
    if (i < end) {
      float xt[W] = {}, gt[W] = {}, ot[W];
      std::copy(x + i, x + end, xt);
      if (g) std::copy(g + i, g + end, gt);
      store(ot, fn(load(xt), load(gt)));
      std::copy(ot, ot + (end - i), out + i);
    }
  });
}

ffi::Error GeluForward(ffi::ThreadPool pool, F32 x, F32Out y) {
  Elementwise(pool, x.element_count(), x.typed_data(), nullptr, y->typed_data(),
              [](vf v, vf) { return v * Cdf(v); });
  return ffi::Error::Success();
}

ffi::Error GeluBackward(ffi::ThreadPool pool, F32 x, F32 g, F32Out dx) {
  Elementwise(pool, x.element_count(), x.typed_data(), g.typed_data(), dx->typed_data(), [](vf v, vf gv) {
    const vf pdf = vexp(splat(-0.5f) * v * v) * splat(0.39894228040143268f);
    return gv * (Cdf(v) + v * pdf);
  });
  return ffi::Error::Success();
}

}  // namespace

// The bindings: XLA's intra-op threads, then the operands, the results and the attributes, in order.
XLA_FFI_DEFINE_HANDLER_SYMBOL(TfmNormForward, NormForward,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32>().Arg<F32>().Arg<F32>()  // x, scale, bias
                                  .Ret<F32>().Ret<F32>().Ret<F32>()  // y, mean, rstd
                                  .Attr<float>("eps").Attr<bool>("centre").Attr<bool>("has_bias"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(TfmNormBackward, NormBackward,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>()
                                  .Arg<F32>().Arg<F32>()  // x, scale, mean, rstd, g, the residual's gradient
                                  .Ret<F32>().Ret<F32>().Ret<F32>()  // dx, d scale, d bias
                                  .Attr<bool>("centre").Attr<bool>("has_residual"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(TfmGeluForward, GeluForward,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32>().Ret<F32>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(TfmGeluBackward, GeluBackward,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32>().Arg<F32>().Ret<F32>());
