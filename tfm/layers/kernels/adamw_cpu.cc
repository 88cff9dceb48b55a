// AdamW with global-norm clipping and tfm's non-finite guard, in place over every parameter (XLA FFI).
//
// What optax.chain(clip_by_global_norm(c), adamw(lr, b1, b2, eps, weight_decay, mask)) followed by
// optax.apply_updates and the train step's guard computes, for float32 parameters, per element:
//   g' = g, or g (c / |g|) when clipping and the global norm |g| >= c (optax: (g / |g|) c)
//   mu' = (1 - b1) g' + b1 mu,  nu' = (1 - b2) g'^2 + b2 nu
//   p' = p - lr (mu' (1 / bc1) / (sqrt(nu' (1 / bc2)) + eps) + wd p)   (wd = 0 where the mask says no decay)
// with bc1 = 1 - b1^t, bc2 = 1 - b2^t for the step's count t. The guard: when `ok` (the loss and
// the gradient norm are finite) is false, or any p' would not be finite, nothing changes.
//
// In place: each result aliases its argument (the caller declares it), so the state is read and
// written once, without a fresh copy of it each step. The guard needs its verdict before the first
// write, so a first pass computes p' without storing it, checking it is finite (it reads the
// state, writes nothing); the second pass, run only on an accepted step, stores p', mu' and nu'.
//
// Arguments: scalars f32[6] = (lr, |g|, c (0: no clipping), bc1, bc2, ok), then the L parameters,
// the L gradients, the L first moments and the L second moments (float32, same shapes leaf by
// leaf). Results: the L new parameters, first and second moments (aliasing those arguments), then
// params_ok (f32 scalar, 1 or 0: whether every p' is finite, computed whatever `ok` says).
// Attributes: b1, b2, eps, weight_decay and `decayed` (one 0/1 per leaf). The leaves are cut into
// chunks run on XLA's intra-op threads.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "vector.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace tfm_kernels;

constexpr int64_t kChunk = 1 << 15;  // elements per task

struct Leaf {
  const float* g;
  float *p, *m, *v;  // updated in place (each result aliases its argument)
  int64_t n;
  float wd;
};

struct Hyper {  // the step's scalars, divisions taken once: c / |g| and the bias corrections' reciprocals
  float lr, scale, inv_bc1, inv_bc2, b1, b2, eps;
};

// Elements [i, e) of one leaf: with kStore, updates them in place; returns false if a new parameter is not
// finite. Plain pointers and scalars (no struct fields in the loop), so the compiler vectorises it.
// The clipping scale c / |g| and the bias corrections' reciprocals are taken once per step: a
// division per element is slower than the loads (one divider per core; four divisions and a square
// root made this loop compute-bound). optax divides each element; these products differ from its
// quotients by at most one rounding each.
template <bool kClipped, bool kStore>
bool UpdateRange(const float* __restrict g, float* __restrict p, float* __restrict m, float* __restrict v, int64_t i,
                 int64_t e, float lr, float scale, float inv_bc1, float inv_bc2, float b1, float b2, float eps,
                 float wd) {
  const float a1 = 1.f - b1, a2 = 1.f - b2;
  int bad = 0;
  for (int64_t k = i; k < e; ++k) {
    const float gs = kClipped ? g[k] * scale : g[k];
    const float mu = a1 * gs + b1 * m[k];
    const float nu = a2 * (gs * gs) + b2 * v[k];
    const float u = (mu * inv_bc1) / (__builtin_sqrtf(nu * inv_bc2) + eps) + wd * p[k];
    const float np = p[k] + (-lr) * u;
    bad |= (np - np) != 0.f;  // inf and NaN give NaN; vectorises, unlike std::isfinite
    if (kStore) {
      m[k] = mu;
      v[k] = nu;
      p[k] = np;
    }
  }
  return bad == 0;
}

template <bool kStore>
bool Update(const Leaf& l, const Hyper& h, bool clipped, int64_t i, int64_t e) {
  auto run = clipped ? UpdateRange<true, kStore> : UpdateRange<false, kStore>;
  return run(l.g, l.p, l.m, l.v, i, e, h.lr, h.scale, h.inv_bc1, h.inv_bc2, h.b1, h.b2, h.eps, l.wd);
}

ffi::Error AdamW(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> scalars, ffi::RemainingArgs args, ffi::RemainingRets rets,
                 float b1, float b2, float eps, float weight_decay, ffi::Span<const int64_t> decayed) {
  const size_t L = decayed.size();
  if (args.size() != 4 * L || rets.size() != 3 * L + 1)
    return ffi::Error::InvalidArgument("tfm_adamw_cpu: expected 4 arguments and 3 results per leaf, and params_ok");
  const float* s = scalars.typed_data();
  const float norm = s[1], clip = s[2];
  const Hyper h{s[0], clip / norm, 1.f / s[3], 1.f / s[4], b1, b2, eps};
  const bool ok = s[5] != 0.f;
  std::vector<Leaf> leaves(L);
  std::vector<std::pair<size_t, int64_t>> chunks;  // (leaf, first element)
  for (size_t j = 0; j < L; ++j) {
    auto p = args.get<ffi::Buffer<ffi::F32>>(j), g = args.get<ffi::Buffer<ffi::F32>>(L + j);
    auto m = args.get<ffi::Buffer<ffi::F32>>(2 * L + j), v = args.get<ffi::Buffer<ffi::F32>>(3 * L + j);
    auto po = rets.get<ffi::Buffer<ffi::F32>>(j), mo = rets.get<ffi::Buffer<ffi::F32>>(L + j);
    auto vo = rets.get<ffi::Buffer<ffi::F32>>(2 * L + j);
    if (!p || !g || !m || !v || !po || !mo || !vo)
      return ffi::Error::InvalidArgument("tfm_adamw_cpu: every argument and result must be a float32 buffer");
    const int64_t n = p->element_count();
    if (g->element_count() != n || m->element_count() != n || v->element_count() != n ||
        (*po)->element_count() != n || (*mo)->element_count() != n || (*vo)->element_count() != n)
      return ffi::Error::InvalidArgument("tfm_adamw_cpu: a leaf's gradient, moments or results differ in size");
    if ((*po)->typed_data() != p->typed_data() || (*mo)->typed_data() != m->typed_data() ||
        (*vo)->typed_data() != v->typed_data())  // XLA aliases them, copying an argument first where it must
      return ffi::Error::InvalidArgument("tfm_adamw_cpu: each result must alias its argument");
    leaves[j] = Leaf{g->typed_data(), (*po)->typed_data(), (*mo)->typed_data(), (*vo)->typed_data(), n,
                     decayed[j] ? weight_decay : 0.f};
    for (int64_t i = 0; i < n; i += kChunk) chunks.emplace_back(j, i);
  }
  auto ok_out = rets.get<ffi::Buffer<ffi::F32>>(3 * L);
  if (!ok_out) return ffi::Error::InvalidArgument("tfm_adamw_cpu: params_ok must be a float32 scalar");
  const bool clipped = clip > 0.f && !(norm < clip);  // optax: (g / |g|) c unless |g| < c
  const int64_t tasks = static_cast<int64_t>(chunks.size());
  auto run = [&](int64_t c, auto store) {
    const auto [j, i] = chunks[c];
    return Update<decltype(store)::value>(leaves[j], h, clipped, i, std::min(leaves[j].n, i + kChunk));
  };
  std::atomic<bool> finite{true};
  ParallelFor(pool, tasks, [&](int64_t c) {
    if (!run(c, std::false_type{})) finite.store(false, std::memory_order_relaxed);
  });
  const bool params_ok = finite.load();
  if (ok && params_ok) ParallelFor(pool, tasks, [&](int64_t c) { run(c, std::true_type{}); });
  *(*ok_out)->typed_data() = params_ok ? 1.f : 0.f;
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TfmAdamW, AdamW,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<float>("b1")
                                  .Attr<float>("b2")
                                  .Attr<float>("eps")
                                  .Attr<float>("weight_decay")
                                  .Attr<ffi::Span<const int64_t>>("decayed"));
