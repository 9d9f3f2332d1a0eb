// Native tests of the framework-free core: conversions, SR bits, and the CPU executor
// against a plain scalar loop over sign_math.h, for every dtype combination, with
// tensors that straddle chunk boundaries, and run on 1 and several threads.
#include <omp.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "core/sign_math.h"
#include "cpu/sign_cpu.h"

using namespace sign_kernels;

static int failures = 0;
#define CHECK(cond, ...)                                  \
  do {                                                    \
    if (!(cond)) {                                        \
      ++failures;                                         \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__);    \
      std::printf(__VA_ARGS__);                           \
      std::printf("\n");                                  \
    }                                                     \
  } while (0)

// ------------------------------------------------------------ conversions
static void test_conversions() {
  // bf16 round trip is exact for every bf16 value; RNE on ties goes to even.
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = to_f32(bf16_t{static_cast<uint16_t>(h)});
    if (std::isnan(f)) continue;
    CHECK(bf16_bits_rne(f) == h, "bf16 round trip of 0x%04x", h);
  }
  CHECK(bf16_bits_rne(bits_f32(0x3F808000u)) == 0x3F80, "tie rounds to even (down)");
  CHECK(bf16_bits_rne(bits_f32(0x3F818000u)) == 0x3F82, "tie rounds to even (up)");
  CHECK((bf16_bits_rne(std::nanf("")) & 0x7FC0) == 0x7FC0, "NaN stays NaN");
  // fp16: every half converts exactly to fp32 and back; compare with the compiler's _Float16.
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = to_f32(fp16_t{static_cast<uint16_t>(h)});
    _Float16 ref;
    const uint16_t hb = static_cast<uint16_t>(h);
    std::memcpy(&ref, &hb, 2);
    const float rf = static_cast<float>(ref);
    if (std::isnan(rf)) {
      CHECK(std::isnan(f), "fp16 NaN 0x%04x", h);
      continue;
    }
    CHECK(f == rf && std::signbit(f) == std::signbit(rf), "fp16->fp32 of 0x%04x: %g vs %g", h, f, rf);
    CHECK(fp16_bits_rne(f) == h, "fp16 round trip of 0x%04x", h);
  }
  std::mt19937 rng(1);
  for (int i = 0; i < 2000000; ++i) {
    const float f = bits_f32(static_cast<uint32_t>(rng()));
    if (std::isnan(f)) continue;
    const _Float16 ref = static_cast<_Float16>(f);  // IEEE round to nearest even
    uint16_t rb;
    std::memcpy(&rb, &ref, 2);
    CHECK(fp16_bits_rne(f) == rb, "fp32->fp16 of %a: 0x%04x vs 0x%04x", f, fp16_bits_rne(f), rb);
    if (failures > 20) return;
  }
}

// Stochastic rounding: the two candidates only, and unbiased in the mean.
static void test_stochastic_rounding() {
  const float x = 1.0f + 0.3f * 0.0078125f;  // 30% of the way to the next bf16
  double mean = 0.0;
  const int n = 1 << 16;
  const uint32_t key = sr_key(7, 3, 0);
  for (int i = 0; i < n; ++i) {
    const uint16_t b = bf16_bits_sr(x, sr_bits(key, i));
    CHECK(b == 0x3F80 || b == 0x3F81, "SR gives a neighbour");
    mean += to_f32(bf16_t{b});
  }
  mean /= n;
  CHECK(std::fabs(mean - x) < 2e-5, "SR mean %.8f vs %.8f", mean, x);
  CHECK(mix32(0) == 0 && mix32(1) == 0x688990C0u, "mix32 reference values (sign_kernels/_rng.py)");
  CHECK(sr_key(5, 3, 0) == 0x887F84A7u, "sr_key reference value");
}

// ------------------------------------------------------------ executor
template <class T>
static T from_f32(float v) {
  T out;
  store(&out, v, 0, 0, false);
  return out;
}

template <class P, class G, class S>
static void run_case(cpu::DType pd, cpu::DType gd, cpu::DType sd, int algo, int threads, bool sr = true,
                     bool scaled = false) {
  const std::vector<int64_t> sizes = {0, 1, 7, 4097, cpu::kChunkElems - 1, cpu::kChunkElems + 3, 2 * cpu::kChunkElems};
  const int64_t n = static_cast<int64_t>(sizes.size());
  std::mt19937 rng(42);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<std::vector<P>> p(n), p_ref(n);
  std::vector<std::vector<G>> g(n);
  std::vector<std::vector<S>> s(n), s_ref(n);
  std::vector<void*> pp(n), sp(n);
  std::vector<const void*> gp(n);
  std::vector<int64_t> steps(n), rows(n), seeds(n), roles(n);
  std::vector<const int64_t*> step_ptrs(n);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t e = 0; e < sizes[i]; ++e) {
      p[i].push_back(from_f32<P>(nd(rng)));
      g[i].push_back(from_f32<G>(e % 11 == 0 ? 0.0f : nd(rng)));
      if constexpr (std::is_same<S, int16_t>::value)
        s[i].push_back(static_cast<int16_t>(static_cast<int>(rng() % 61) - 30));
      else
        s[i].push_back(from_f32<S>(e % 13 == 0 ? 0.0f : 0.1f * nd(rng)));
    }
    p_ref[i] = p[i];
    s_ref[i] = s[i];
    pp[i] = p[i].data();
    gp[i] = g[i].data();
    sp[i] = s[i].data();
    steps[i] = i;
    step_ptrs[i] = &steps[i];
    seeds[i] = 1000 + i;
    roles[i] = (i % 4 == 2 && sizes[i] % 7 == 0) ? kRoleEmbedding : (i % 4 == 2 ? 3 : i % 4);
    rows[i] = roles[i] == kRoleEmbedding ? 7 : 1;
  }
  cpu::TensorList t;
  t.count = n;
  t.params = pp.data();
  t.grads = gp.data();
  t.states = sp.data();
  t.numels = sizes.data();
  t.steps = step_ptrs.data();
  t.seeds = seeds.data();
  t.param_dtype = pd;
  t.grad_dtype = gd;
  t.state_dtype = sd;
  const float grad_scale = 3.0f;
  cpu::Common c;
  c.lr = 0.01f;
  c.stochastic_rounding = sr;
  c.grad_scale = scaled ? &grad_scale : nullptr;
  auto grad = [&](const G& v) { return scaled ? to_f32(v) / grad_scale : to_f32(v); };
  omp_set_num_threads(threads);
  const char* err = nullptr;
  constexpr bool kCounters = std::is_same<S, int16_t>::value;
  if constexpr (!kCounters) {
  if (algo == 0) {
    cpu::LionArgs a;
    a.common = c;
    a.weight_decay = 0.1f;
    err = cpu::lion_step(t, a);
    const LionScalars sc = lion_scalars(c.lr, a.beta1, a.beta2, a.weight_decay);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t e = 0; e < sizes[i]; ++e) {
        float pv = to_f32(p_ref[i][e]), mv = to_f32(s_ref[i][e]);
        lion_update(pv, mv, grad(g[i][e]), sc);
        store(&p_ref[i][e], pv, sr_key(static_cast<uint32_t>(seeds[i]), steps[i], 0), e, sr);
        store(&s_ref[i][e], mv, sr_key(static_cast<uint32_t>(seeds[i]), steps[i], 1), e, sr);
      }
  } else if (algo == 1) {
    cpu::TigerArgs a;
    a.common = c;
    a.grad_accum_steps = 2;
    a.roles = roles.data();
    a.row_sizes = rows.data();
    err = cpu::tiger_step(t, a);
    for (int64_t i = 0; i < n; ++i) {
      const TigerScalars sc = tiger_scalars(steps[i], 2, a.beta, a.weight_decay, a.shrink_ratio, roles[i]);
      const int64_t d = rows[i];
      for (int64_t r = 0; r * d < sizes[i]; ++r) {
        const int64_t lo = roles[i] == kRoleEmbedding ? r * d : 0;
        const int64_t hi = roles[i] == kRoleEmbedding ? lo + d : sizes[i];
        double sumsq = 0.0;
        for (int64_t e = lo; e < hi; ++e) sumsq += static_cast<double>(to_f32(p_ref[i][e])) * to_f32(p_ref[i][e]);
        const float lr_p = tiger_lr(c.lr, roles[i], static_cast<float>(std::sqrt(sumsq / static_cast<double>(hi - lo))));
        std::vector<float> upd(hi - lo);
        for (int64_t e = lo; e < hi; ++e) {
          float pv = to_f32(p_ref[i][e]), mv = to_f32(s_ref[i][e]);
          tiger_update(pv, mv, grad(g[i][e]), lr_p, sc);
          if (sc.update) store(&p_ref[i][e], pv, sr_key(static_cast<uint32_t>(seeds[i]), steps[i], 0), e, sr);
          store(&s_ref[i][e], mv, sr_key(static_cast<uint32_t>(seeds[i]), steps[i], 1), e, sr);
        }
        if (roles[i] != kRoleEmbedding) break;
      }
    }
  }
  } else {
    cpu::SimbaArgs a;
    a.common = c;
    a.weight_decay = 0.1f;
    a.window_size = 32;
    a.threshold_count = 5;
    err = cpu::simba_step(t, a);
    const SimbaScalars sc = simba_scalars(c.lr, a.weight_decay, a.window_size, a.threshold_count);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t e = 0; e < sizes[i]; ++e) {
        float pv = to_f32(p_ref[i][e]);
        int16_t cv;
        std::memcpy(&cv, &s_ref[i][e], 2);
        simba_update(pv, cv, grad(g[i][e]), sc);
        store(&p_ref[i][e], pv, sr_key(static_cast<uint32_t>(seeds[i]), steps[i], 0), e, sr);
        std::memcpy(&s_ref[i][e], &cv, 2);
      }
  }
  CHECK(err == nullptr, "algo %d dtypes %d/%d/%d: %s", algo, (int)pd, (int)gd, (int)sd, err ? err : "");
  for (int64_t i = 0; i < n; ++i) {
    CHECK(std::memcmp(p[i].data(), p_ref[i].data(), sizes[i] * sizeof(P)) == 0,
          "algo %d dtypes %d/%d/%d threads %d: params of tensor %lld differ", algo, (int)pd, (int)gd, (int)sd, threads,
          (long long)i);
    CHECK(std::memcmp(s[i].data(), s_ref[i].data(), sizes[i] * sizeof(S)) == 0,
          "algo %d dtypes %d/%d/%d threads %d: state of tensor %lld differs", algo, (int)pd, (int)gd, (int)sd, threads,
          (long long)i);
  }
}

// A one-tensor list over host buffers (the descriptor points at these members).
struct OneTensor {
  void* p;
  const void* g;
  void* s;
  int64_t numel, step, seed;
  const int64_t* step_ptr = &step;
  cpu::TensorList t;
  OneTensor(void* p_, const void* g_, void* s_, int64_t numel_, int64_t step_, int64_t seed_)
      : p(p_), g(g_), s(s_), numel(numel_), step(step_), seed(seed_) {
    t.count = 1;
    t.params = &p;
    t.grads = &g;
    t.states = &s;
    t.numels = &numel;
    t.steps = &step_ptr;
    t.seeds = &seed;
  }
  OneTensor(const OneTensor&) = delete;
};

static void test_executor() {
  using D = cpu::DType;
  for (int threads : {1, 3}) {
    for (int algo : {0, 1}) {
      run_case<float, float, float>(D::kFloat32, D::kFloat32, D::kFloat32, algo, threads);
      run_case<float, float, bf16_t>(D::kFloat32, D::kFloat32, D::kBFloat16, algo, threads);
      run_case<bf16_t, bf16_t, bf16_t>(D::kBFloat16, D::kBFloat16, D::kBFloat16, algo, threads);
      run_case<bf16_t, float, float>(D::kBFloat16, D::kFloat32, D::kFloat32, algo, threads);
      run_case<fp16_t, fp16_t, fp16_t>(D::kFloat16, D::kFloat16, D::kFloat16, algo, threads);
      run_case<fp16_t, float, bf16_t>(D::kFloat16, D::kFloat32, D::kBFloat16, algo, threads);
    }
    run_case<float, float, int16_t>(D::kFloat32, D::kFloat32, D::kInt16, 2, threads);
    run_case<bf16_t, bf16_t, int16_t>(D::kBFloat16, D::kBFloat16, D::kInt16, 2, threads);
    run_case<fp16_t, float, int16_t>(D::kFloat16, D::kFloat32, D::kInt16, 2, threads);
  }
  // Without stochastic rounding, and with a gradient scale (the loops are compiled per flag).
  for (int algo : {0, 1}) {
    run_case<bf16_t, float, bf16_t>(D::kBFloat16, D::kFloat32, D::kBFloat16, algo, 2, false, true);
    run_case<float, float, float>(D::kFloat32, D::kFloat32, D::kFloat32, algo, 2, false, true);
    run_case<bf16_t, bf16_t, float>(D::kBFloat16, D::kBFloat16, D::kFloat32, algo, 2, true, true);
  }
  run_case<bf16_t, float, int16_t>(D::kBFloat16, D::kFloat32, D::kInt16, 2, 2, false, true);
  run_case<bf16_t, bf16_t, int16_t>(D::kBFloat16, D::kBFloat16, D::kInt16, 2, 2, false, false);
  // An unsupported combination is refused and writes nothing.
  float p = 1.0f, g = 1.0f;
  fp16_t m{0};
  OneTensor one(&p, &g, &m, 1, 0, 0);
  cpu::TensorList& t = one.t;
  t.state_dtype = cpu::DType::kFloat16;  // fp16 momentum for fp32 params: not supported
  CHECK(cpu::lion_step(t, cpu::LionArgs{}) != nullptr && p == 1.0f, "unsupported dtypes are refused untouched");
  // ... also when found_inf is set: a refused combination is refused either way.
  const float inf_found = 1.0f;
  cpu::LionArgs skipped;
  skipped.common.found_inf = &inf_found;
  CHECK(cpu::lion_step(t, skipped) != nullptr && p == 1.0f, "unsupported dtypes are refused with found_inf set");
}

// A set found_inf (the descriptor's host scalar) makes every op change nothing; NaN counts as set.
static void test_found_inf() {
  for (const float flag : {1.0f, std::numeric_limits<float>::quiet_NaN()}) {
    std::vector<float> p(100, 1.5f), g(100, 0.25f), m(100, 0.5f);
    std::vector<int16_t> counts(100, 3);
    const int64_t role = kRoleMatrix, row = 100;
    OneTensor one(p.data(), g.data(), m.data(), 100, 3, 7);
    cpu::TensorList& t = one.t;
    cpu::LionArgs la;
    la.common.lr = 0.1f;
    la.common.found_inf = &flag;
    CHECK(cpu::lion_step(t, la) == nullptr, "lion with found_inf");
    cpu::TigerArgs ta;
    ta.common = la.common;
    ta.roles = &role;
    ta.row_sizes = &row;
    CHECK(cpu::tiger_step(t, ta) == nullptr, "tiger with found_inf");
    double sums = -1.0;
    const int64_t at = 0;
    ta.sumsq_out = &sums;
    ta.sumsq_out_at = &at;
    CHECK(cpu::tiger_step(t, ta) == nullptr, "tiger with found_inf and sums out");
    CHECK(sums == 100 * 1.5 * 1.5, "a skipped Tiger step still fills its sums out, got %g", sums);
    one.s = counts.data();
    t.state_dtype = cpu::DType::kInt16;
    cpu::SimbaArgs sa;
    sa.common = la.common;
    CHECK(cpu::simba_step(t, sa) == nullptr, "simba with found_inf");
    for (int e = 0; e < 100; ++e)
      CHECK(p[e] == 1.5f && m[e] == 0.5f && counts[e] == 3, "found_inf set: element %d was written", e);
    la.common.found_inf = nullptr;  // the control: the same call without the flag writes
    one.s = m.data();
    t.state_dtype = cpu::DType::kFloat32;
    CHECK(cpu::lion_step(t, la) == nullptr && p[0] != 1.5f, "lion without found_inf updates");
  }
}

int main() {
  test_conversions();
  test_stochastic_rounding();
  test_executor();
  test_found_inf();
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "OK", failures);
  return failures ? 1 : 0;
}
