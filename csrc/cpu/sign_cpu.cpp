// sign_cpu.cpp -- OpenMP + compiler-vectorized CPU kernels (see sign_cpu.h).
//
// NOTE: [chunks]
// A call's tensors are cut into chunks of at most kChunkElems elements, and the chunk
// table is split statically over the threads: a 124M-element GPT-2 list gives ~1900
// chunks, so two threads get equal work whatever the tensor sizes, and many tiny
// tensors (biases) cost one table entry each instead of a parallel region each.
// Each chunk is a single `omp simd` loop reading p, g, state once and writing p,
// state once: 20 bytes per fp32 element for Lion, 16 for Simba.
#include "sign_cpu.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#include <cmath>
#include <type_traits>
#include <vector>

#include "../core/sign_math.h"

namespace sign_kernels {
namespace cpu {
namespace {

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

std::vector<Chunk> make_chunks(const TensorList& t) {
  std::vector<Chunk> chunks;
  for (int64_t i = 0; i < t.count; ++i) {
    for (int64_t b = 0; b < t.numels[i]; b += kChunkElems) {
      const int64_t e = b + kChunkElems < t.numels[i] ? b + kChunkElems : t.numels[i];
      chunks.push_back({i, b, e});
    }
  }
  return chunks;
}

ParallelFor g_parallel_for = nullptr;

// Run f(i) for i in [0, n), split over the threads when n > 1.
template <class F>
void parallel_for(int64_t n, F&& f) {
  auto range = [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) f(i);
  };
  if (n <= 1) {
    range(0, n);
  } else if (g_parallel_for != nullptr) {
    g_parallel_for(n, &range, [](void* ctx, int64_t b, int64_t e) { (*static_cast<decltype(range)*>(ctx))(b, e); });
  } else {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) f(i);
  }
}

template <class F>
void for_each_chunk(const std::vector<Chunk>& chunks, F&& f) {
  parallel_for(static_cast<int64_t>(chunks.size()), [&](int64_t c) { f(chunks[c]); });
}

// Type dispatch: one helper, no macros. Calls f(P{}, G{}, S{}) for the supported
// (param, grad, state) storage combinations; returns false for the others.
template <class T>
struct Tag {
  using type = T;
};

template <bool kCounters, class F, class P, class G>
bool with_state(DType s, F&& f, Tag<P> p, Tag<G> g) {
  if constexpr (kCounters) {
    if (s != DType::kInt16) return false;
    f(p, g, Tag<int16_t>{});
    return true;
  }
  switch (s) {
    case DType::kFloat32: f(p, g, Tag<float>{}); return true;
    case DType::kBFloat16: f(p, g, Tag<bf16_t>{}); return true;
    case DType::kFloat16:
      if constexpr (std::is_same<P, fp16_t>::value) {
        f(p, g, Tag<fp16_t>{});
        return true;
      }
      return false;
    default: return false;
  }
}

template <bool kCounters, class F, class P>
bool with_grad(DType g, DType s, F&& f, Tag<P> p) {
  if (g == DType::kFloat32) return with_state<kCounters>(s, f, p, Tag<float>{});
  if constexpr (std::is_same<P, bf16_t>::value)
    if (g == DType::kBFloat16) return with_state<kCounters>(s, f, p, Tag<bf16_t>{});
  if constexpr (std::is_same<P, fp16_t>::value)
    if (g == DType::kFloat16) return with_state<kCounters>(s, f, p, Tag<fp16_t>{});
  return false;
}

// kCounters: the state is Simba's int16 counters rather than a float momentum.
template <bool kCounters, class F>
bool dispatch(const TensorList& t, F&& f) {
  switch (t.param_dtype) {
    case DType::kFloat32: return with_grad<kCounters>(t.grad_dtype, t.state_dtype, f, Tag<float>{});
    case DType::kBFloat16: return with_grad<kCounters>(t.grad_dtype, t.state_dtype, f, Tag<bf16_t>{});
    case DType::kFloat16: return with_grad<kCounters>(t.grad_dtype, t.state_dtype, f, Tag<fp16_t>{});
    default: return false;
  }
}

constexpr const char* kBadDtypes =
    "unsupported dtype combination: params float32/bfloat16/float16, grads the param dtype or "
    "float32, state the param dtype, float32 or bfloat16 (Simba: int16 counters)";

// NOTE: [flags hoisted out of the loops]
// Whether g is unscaled and whether bf16 writes round stochastically are decided once
// per chunk: each loop is compiled for one combination, so a loop without a grad scale
// has no division and a loop without SR computes no hash. (Left as runtime selects, the
// vectorizer computes both sides for every element: a division and two integer hashes
// per element, which made the loops compute-bound.)
template <class P, class S = P>
constexpr bool kCanRoundStochastically = std::is_same<P, bf16_t>::value || std::is_same<S, bf16_t>::value;

template <bool kCanSR, class F>
void with_flags(const Common& c, F&& f) {
  auto with_sr = [&](auto scale) {
    if constexpr (kCanSR) {
      if (c.stochastic_rounding) return f(scale, std::true_type{});
    }
    f(scale, std::false_type{});
  };
  if (c.has_grad_scale) {
    with_sr(std::true_type{});
  } else {
    with_sr(std::false_type{});
  }
}

template <class Scale>
SK_HD float unscale(float g, float grad_scale) { return Scale::value ? g / grad_scale : g; }

// ------------------------------------------------------------------ Lion
template <class P, class G, class S>
void lion_chunk(P* __restrict p, const G* __restrict g, S* __restrict m, int64_t begin, int64_t end,
                const LionScalars s, const Common c, uint32_t key_p, uint32_t key_m) {
  with_flags<kCanRoundStochastically<P, S>>(c, [&](auto scale, auto sr) {
    using Scale = decltype(scale);
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      float pv = to_f32(p[i]);
      float mv = to_f32(m[i]);
      lion_update(pv, mv, unscale<Scale>(to_f32(g[i]), c.grad_scale), s);
      store(p + i, pv, key_p, i, sr.value);
      store(m + i, mv, key_m, i, sr.value);
    }
  });
}

// ------------------------------------------------------------------ Simba
template <class P, class G>
void simba_chunk(P* __restrict p, const G* __restrict g, int16_t* __restrict cnt, int64_t begin, int64_t end,
                 const SimbaScalars s, const Common c, uint32_t key_p) {
  with_flags<kCanRoundStochastically<P>>(c, [&](auto scale, auto sr) {
    using Scale = decltype(scale);
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      float pv = to_f32(p[i]);
      int16_t cv = cnt[i];
      simba_update(pv, cv, unscale<Scale>(to_f32(g[i]), c.grad_scale), s);
      store(p + i, pv, key_p, i, sr.value);
      cnt[i] = cv;
    }
  });
}

// ------------------------------------------------------------------ Tiger
template <class P, class G, class S>
void tiger_chunk(P* __restrict p, const G* __restrict g, S* __restrict m, int64_t begin, int64_t end,
                 float lr_p, const TigerScalars s, const Common c, uint32_t key_p, uint32_t key_m) {
  with_flags<kCanRoundStochastically<P, S>>(c, [&](auto scale, auto sr) {
    using Scale = decltype(scale);
    if (s.update) {
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) {
        float pv = to_f32(p[i]);
        float mv = to_f32(m[i]);
        tiger_update(pv, mv, unscale<Scale>(to_f32(g[i]), c.grad_scale), lr_p, s);
        store(p + i, pv, key_p, i, sr.value);
        store(m + i, mv, key_m, i, sr.value);
      }
    } else {  // accumulation micro-step: p is neither read nor written
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) {
        float pv = 0.0f;
        float mv = to_f32(m[i]);
        tiger_update(pv, mv, unscale<Scale>(to_f32(g[i]), c.grad_scale), lr_p, s);
        store(m + i, mv, key_m, i, sr.value);
      }
    }
  });
}

template <class P>
void tiger_shrink_chunk(P* __restrict p, int64_t begin, int64_t end, const TigerScalars s, bool sr, uint32_t key_p) {
  auto loop = [&](auto sr_flag) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      float pv = to_f32(p[i]);
      tiger_shrink(pv, s);
      store(p + i, pv, key_p, i, sr_flag.value);
    }
  };
  if (kCanRoundStochastically<P> && sr) {
    loop(std::true_type{});
  } else {
    loop(std::false_type{});
  }
}

// True when the scaled gradient g / grad_scale holds a NaN in [begin, end).
template <class G>
bool has_nan(const G* __restrict g, int64_t begin, int64_t end, const Common& c) {
  int nan = 0;
  auto loop = [&](auto scale) {
    using Scale = decltype(scale);
#pragma omp simd reduction(| : nan)
    for (int64_t e = begin; e < end; ++e) {
      const float gv = unscale<Scale>(to_f32(g[e]), c.grad_scale);
      nan |= static_cast<int>(gv != gv);
    }
  };
  if (c.has_grad_scale) {
    loop(std::true_type{});
  } else {
    loop(std::false_type{});
  }
  return nan != 0;
}

// Per-chunk partial results of Tiger's pre-pass, combined in chunk order so the
// result does not depend on the thread count.
struct TigerPartial {
  double sumsq;
  int nan;
};

}  // namespace

void set_parallel_for(ParallelFor fn) { g_parallel_for = fn; }

const char* lion_step(const TensorList& t, const LionArgs& a) {
  const std::vector<Chunk> chunks = make_chunks(t);
  const LionScalars s = lion_scalars(a.common.lr, a.beta1, a.beta2, a.weight_decay);
  const bool ok = dispatch<false>(t, [&](auto pt, auto gt, auto st) {
    using P = typename decltype(pt)::type;
    using G = typename decltype(gt)::type;
    using S = typename decltype(st)::type;
    for_each_chunk(chunks, [&](const Chunk& ch) {
      const uint32_t seed = t.seeds[ch.tensor];
      const int64_t step = t.steps[ch.tensor];
      lion_chunk(static_cast<P*>(t.params[ch.tensor]), static_cast<const G*>(t.grads[ch.tensor]),
                 static_cast<S*>(t.states[ch.tensor]), ch.begin, ch.end, s, a.common, sr_key(seed, step, 0),
                 sr_key(seed, step, 1));
    });
  });
  return ok ? nullptr : kBadDtypes;
}

const char* simba_step(const TensorList& t, const SimbaArgs& a) {
  const std::vector<Chunk> chunks = make_chunks(t);
  const SimbaScalars s = simba_scalars(a.common.lr, a.weight_decay, a.window_size, a.threshold_count);
  const bool ok = dispatch<true>(t, [&](auto pt, auto gt, auto) {
    using P = typename decltype(pt)::type;
    using G = typename decltype(gt)::type;
    for_each_chunk(chunks, [&](const Chunk& ch) {
      simba_chunk(static_cast<P*>(t.params[ch.tensor]), static_cast<const G*>(t.grads[ch.tensor]),
                  static_cast<int16_t*>(t.states[ch.tensor]), ch.begin, ch.end, s, a.common,
                  sr_key(t.seeds[ch.tensor], t.steps[ch.tensor], 0));
    });
  });
  return ok ? nullptr : kBadDtypes;
}

// Tiger needs two per-tensor facts before it may write anything: whether g holds a
// NaN (the guard) and, on update steps, the RMS of theta_{t-1} (whole tensor, or per
// row for embeddings). A read-only pre-pass over the same chunk table computes them;
// then the update pass runs with per-tensor (or per-row) learning rates.
const char* tiger_step(const TensorList& t, const TigerArgs& a) {
  const std::vector<Chunk> chunks = make_chunks(t);
  const int64_t nchunks = static_cast<int64_t>(chunks.size());
  const Common& c = a.common;
  const bool ok = dispatch<false>(t, [&](auto pt, auto gt, auto st) {
    using P = typename decltype(pt)::type;
    using G = typename decltype(gt)::type;
    using S = typename decltype(st)::type;
    std::vector<TigerScalars> sc(t.count);
    for (int64_t i = 0; i < t.count; ++i)
      sc[i] = tiger_scalars(t.steps[i], a.grad_accum_steps, a.beta, a.weight_decay, a.shrink_ratio, a.roles[i]);

    // Pre-pass: NaN flag of g, and sum of squares of p where an RMS is needed.
    std::vector<TigerPartial> part(nchunks);
    std::vector<std::vector<double>> row_sumsq(t.count);
    for (int64_t i = 0; i < t.count; ++i)
      if (sc[i].update && a.roles[i] == kRoleEmbedding && a.row_sizes[i] > 0)
        row_sumsq[i].assign(t.numels[i] / a.row_sizes[i], 0.0);
    for_each_chunk(chunks, [&](const Chunk& ch) {
      const int64_t i = ch.tensor;
      const int nan = has_nan(static_cast<const G*>(t.grads[i]), ch.begin, ch.end, c);
      double sumsq = 0.0;
      const P* p = static_cast<const P*>(t.params[i]);
      if (sc[i].update && a.roles[i] == kRoleMatrix) {
#pragma omp simd reduction(+ : sumsq)
        for (int64_t e = ch.begin; e < ch.end; ++e) {
          const double v = to_f32(p[e]);
          sumsq += v * v;
        }
      }
      part[&ch - chunks.data()] = {sumsq, nan};
    });
    // Embedding rows: each row's sum of squares, in element order.
    for (int64_t i = 0; i < t.count; ++i) {
      if (row_sumsq[i].empty()) continue;
      const P* p = static_cast<const P*>(t.params[i]);
      const int64_t d = a.row_sizes[i], rows = static_cast<int64_t>(row_sumsq[i].size());
      parallel_for(rows, [&](int64_t r) {
        double acc = 0.0;
        for (int64_t e = r * d; e < (r + 1) * d; ++e) {
          const double v = to_f32(p[e]);
          acc += v * v;
        }
        row_sumsq[i][r] = acc;
      });
    }
    // Combine per tensor, in chunk order.
    std::vector<int> nan(t.count, 0);
    std::vector<double> sumsq(t.count, 0.0);
    for (int64_t k = 0; k < nchunks; ++k) {
      nan[chunks[k].tensor] |= part[k].nan;
      sumsq[chunks[k].tensor] += part[k].sumsq;
    }
    std::vector<float> lr_p(t.count);
    std::vector<std::vector<float>> row_lr(t.count);
    for (int64_t i = 0; i < t.count; ++i) {
      const int64_t n = t.numels[i];
      const float rms = n > 0 ? static_cast<float>(std::sqrt(sumsq[i] / static_cast<double>(n))) : 0.0f;
      lr_p[i] = tiger_lr(c.lr, a.roles[i], rms);
      if (!row_sumsq[i].empty()) {
        row_lr[i].resize(row_sumsq[i].size());
        const double d = static_cast<double>(a.row_sizes[i]);
        for (size_t r = 0; r < row_sumsq[i].size(); ++r)
          row_lr[i][r] = tiger_lr(c.lr, kRoleEmbedding, static_cast<float>(std::sqrt(row_sumsq[i][r] / d)));
      }
    }

    // Update pass.
    for_each_chunk(chunks, [&](const Chunk& ch) {
      const int64_t i = ch.tensor;
      P* p = static_cast<P*>(t.params[i]);
      const uint32_t key_p = sr_key(t.seeds[i], t.steps[i], 0);
      const uint32_t key_m = sr_key(t.seeds[i], t.steps[i], 1);
      if (nan[i]) {
        tiger_shrink_chunk(p, ch.begin, ch.end, sc[i], c.stochastic_rounding, key_p);
        return;
      }
      const G* g = static_cast<const G*>(t.grads[i]);
      S* m = static_cast<S*>(t.states[i]);
      if (row_lr[i].empty()) {
        tiger_chunk(p, g, m, ch.begin, ch.end, lr_p[i], sc[i], c, key_p, key_m);
        return;
      }
      const int64_t d = a.row_sizes[i];
      for (int64_t b = ch.begin; b < ch.end;) {  // split the chunk at row boundaries
        const int64_t row = b / d;
        const int64_t e = (row + 1) * d < ch.end ? (row + 1) * d : ch.end;
        tiger_chunk(p, g, m, b, e, row_lr[i][row], sc[i], c, key_p, key_m);
        b = e;
      }
    });
  });
  return ok ? nullptr : kBadDtypes;
}

}  // namespace cpu
}  // namespace sign_kernels
