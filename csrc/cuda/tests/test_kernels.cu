// test_kernels.cu -- native test of the CUDA core against a host loop over sign_math.h.
//
// No torch, no framework: the host reference calls the same per-element functions the
// functors call, so Lion and Simba must agree bit for bit (fp32, bf16 with stochastic
// rounding, fp16), Tiger's momentum bit for bit and its θ to within the one-ulp effect of
// a different fp64 summation order on the RMS. Cases: sizes around packs and chunks,
// misaligned views, hundreds of tensors (several launches), mixed dtypes, grad scale,
// clipping coefficient, found_inf, device lr, Tiger's NaN guard, accumulation window and
// roles. int8 momentum and the correction byte (run_q): codes, scales and residuals bit for
// bit, ragged and misaligned rows, Tiger's sums out equal to a sums-only call's. And the
// norm pass (sumsq): against a host fp64 sum, the same bits whatever the companions and the
// alignment, NaN, inf and empty tensors.
//
// Exit codes: 0 pass, 1 failure, 77 no CUDA device (CTest SKIP_RETURN_CODE).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

#include "core/sign_math.h"
#include "cuda/launch.h"

namespace sk = sign_kernels;
namespace skc = sign_kernels::cuda;

namespace {

int g_failures = 0;

#define CHECK_CUDA(expr)                                                                      \
  do {                                                                                        \
    cudaError_t e_ = (expr);                                                                  \
    if (e_ != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "%s:%d: %s -> %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_)); \
      std::exit(1);                                                                           \
    }                                                                                         \
  } while (0)

uint64_t g_rng = 0x9E3779B97F4A7C15ull;
uint32_t next_u32() {
  g_rng ^= g_rng << 13;
  g_rng ^= g_rng >> 7;
  g_rng ^= g_rng << 17;
  return static_cast<uint32_t>(g_rng >> 11);
}
// Values with exact zeros, ties of m and g, and magnitudes over many binades.
float next_value() {
  const uint32_t r = next_u32();
  if (r % 16 == 0) return 0.0f;
  const float mant = 1.0f + static_cast<float>(r >> 9 & 0xFFFF) / 65536.0f;
  const int exp = static_cast<int>(r >> 25 & 31) - 20;
  return ((r & 1) ? -1.0f : 1.0f) * std::ldexp(mant, exp);
}

size_t dsize(skc::DType d) { return d == skc::DType::kFloat32 ? 4 : 2; }

// Host storage of one tensor in any dtype, as raw bytes.
struct HostTensor {
  skc::DType dtype;
  std::vector<unsigned char> bytes;
  int64_t n;
  HostTensor(skc::DType d, int64_t n_) : dtype(d), bytes(static_cast<size_t>(n_) * dsize(d)), n(n_) {}
  float get(int64_t i) const {
    switch (dtype) {
      case skc::DType::kFloat32: { float v; std::memcpy(&v, &bytes[i * 4], 4); return v; }
      case skc::DType::kBFloat16: { sk::bf16_t v; std::memcpy(&v, &bytes[i * 2], 2); return sk::to_f32(v); }
      case skc::DType::kFloat16: { sk::fp16_t v; std::memcpy(&v, &bytes[i * 2], 2); return sk::to_f32(v); }
      default: { int16_t v; std::memcpy(&v, &bytes[i * 2], 2); return v; }
    }
  }
  int16_t get_i16(int64_t i) const { int16_t v; std::memcpy(&v, &bytes[i * 2], 2); return v; }
  void set_i16(int64_t i, int16_t v) { std::memcpy(&bytes[i * 2], &v, 2); }
  // Write with sign_math's store (RNE, or SR for bf16).
  void put(int64_t i, float v, uint32_t key, bool sr) {
    switch (dtype) {
      case skc::DType::kFloat32: { float o; sk::store(&o, v, key, i, sr); std::memcpy(&bytes[i * 4], &o, 4); break; }
      case skc::DType::kBFloat16: { sk::bf16_t o; sk::store(&o, v, key, i, sr); std::memcpy(&bytes[i * 2], &o, 2); break; }
      case skc::DType::kFloat16: { sk::fp16_t o; sk::store(&o, v, key, i, sr); std::memcpy(&bytes[i * 2], &o, 2); break; }
      default: set_i16(i, static_cast<int16_t>(v));
    }
  }
};

struct DeviceBuf {
  unsigned char* base = nullptr;
  unsigned char* ptr = nullptr;  // base + offset elements (misaligned views)
  DeviceBuf(const HostTensor& h, int offset_elems) {
    const size_t off = static_cast<size_t>(offset_elems) * dsize(h.dtype);
    CHECK_CUDA(cudaMalloc(&base, h.bytes.size() + off + 16));
    ptr = base + off;
    CHECK_CUDA(cudaMemcpy(ptr, h.bytes.data(), h.bytes.size(), cudaMemcpyHostToDevice));
  }
  void fetch(HostTensor& h) const {
    CHECK_CUDA(cudaMemcpy(h.bytes.data(), ptr, h.bytes.size(), cudaMemcpyDeviceToHost));
  }
  ~DeviceBuf() { cudaFree(base); }
  DeviceBuf(const DeviceBuf&) = delete;
  DeviceBuf& operator=(const DeviceBuf&) = delete;
};

enum class Algo { kLion, kTiger, kSimba };

struct Case {
  const char* name;
  Algo algo;
  skc::DType p, g, s;
  std::vector<int64_t> sizes;
  std::vector<int64_t> rows;   // Tiger: last-dim size per tensor (1 if absent)
  std::vector<int64_t> roles;  // Tiger roles
  int offset = 0;              // element offset of every device pointer (misaligned views)
  bool sr = false;
  bool scale = false;          // grad_scale = 4
  float clip = 0.0f;           // the clipping coefficient; 0 = not given (clip_zero: given, 0)
  bool clip_zero = false;      // clip = 0 given (inf * 0 = NaN: fires Tiger's guard)
  int inf_tensor = -1;         // put an inf in this tensor's grad
  bool found_inf = false;
  bool device_lr = false;
  int64_t step = 0;            // t of every tensor
  int64_t accum = 1;           // Tiger k
  int nan_tensor = -1;         // Tiger: put a NaN in this tensor's grad
};

// Host reference of one call on host copies.
void reference(const Case& c, std::vector<HostTensor>& P, const std::vector<HostTensor>& G,
               std::vector<HostTensor>& S, const std::vector<int64_t>& seeds) {
  const float lr = 1e-2f, scale = c.scale ? 4.0f : 1.0f;
  const bool clipped = c.clip != 0.0f || c.clip_zero;
  if (c.found_inf) return;
  for (size_t i = 0; i < P.size(); ++i) {
    const int64_t n = P[i].n;
    const uint32_t seed = static_cast<uint32_t>(seeds[i]);
    const uint32_t kp = sk::sr_key(seed, c.step, 0), ks = sk::sr_key(seed, c.step, 1);
    // The gradient used: (g / scale) * clip, each rounded to fp32 (host: -ffp-contract=off).
    auto grad = [&](int64_t j) {
      const float q = G[i].get(j) / scale;
      return clipped ? q * c.clip : q;
    };
    if (c.algo == Algo::kLion) {
      const sk::LionScalars sc = sk::lion_scalars(lr, 0.9f, 0.99f, 0.1f);
      for (int64_t j = 0; j < n; ++j) {
        float p = P[i].get(j), m = S[i].get(j);
        sk::lion_update(p, m, grad(j), sc);
        P[i].put(j, p, kp, c.sr);
        S[i].put(j, m, ks, c.sr);
      }
    } else if (c.algo == Algo::kSimba) {
      const sk::SimbaScalars sc = sk::simba_scalars(lr, 0.1f, 16, 4);
      for (int64_t j = 0; j < n; ++j) {
        float p = P[i].get(j);
        int16_t cnt = S[i].get_i16(j);
        sk::simba_update(p, cnt, grad(j), sc);
        P[i].put(j, p, kp, c.sr);
        S[i].set_i16(j, cnt);
      }
    } else {
      const int role = static_cast<int>(c.roles[i]);
      const sk::TigerScalars sc = sk::tiger_scalars(c.step, c.accum, 0.965f, 0.01f, 0.99f, role);
      bool nan = false;
      for (int64_t j = 0; j < n; ++j) nan |= std::isnan(grad(j));
      if (nan) {
        for (int64_t j = 0; j < n; ++j) {
          float p = P[i].get(j);
          sk::tiger_shrink(p, sc);
          P[i].put(j, p, kp, c.sr);
        }
        continue;
      }
      const int64_t d = c.rows[i];
      std::vector<float> rms(static_cast<size_t>(role == sk::kRoleEmbedding ? n / d : 1), 0.0f);
      if (role == sk::kRoleMatrix) {
        double acc = 0.0;
        for (int64_t j = 0; j < n; ++j) acc += static_cast<double>(P[i].get(j)) * P[i].get(j);
        rms[0] = static_cast<float>(std::sqrt(acc / static_cast<double>(n)));
      } else if (role == sk::kRoleEmbedding) {
        for (int64_t r = 0; r < n / d; ++r) {
          double acc = 0.0;
          for (int64_t j = r * d; j < (r + 1) * d; ++j) acc += static_cast<double>(P[i].get(j)) * P[i].get(j);
          rms[r] = static_cast<float>(std::sqrt(acc / static_cast<double>(d)));
        }
      }
      for (int64_t j = 0; j < n; ++j) {
        float p = P[i].get(j), m = S[i].get(j);
        const float r = role == sk::kRoleEmbedding ? rms[j / d] : rms[0];
        sk::tiger_update(p, m, grad(j), sk::tiger_lr(lr, role, r), sc);
        if (sc.update) P[i].put(j, p, kp, c.sr);
        S[i].put(j, m, ks, c.sr);
      }
    }
  }
}

// Bitwise comparison (after canonicalising NaN); `tol` > 0 allows a relative error.
int compare(const char* what, const char* name, size_t t, const HostTensor& want, const HostTensor& got, float tol) {
  int bad = 0;
  for (int64_t j = 0; j < want.n; ++j) {
    const float a = want.get(j), b = got.get(j);
    const bool same_bits = std::memcmp(&want.bytes[j * dsize(want.dtype)], &got.bytes[j * dsize(got.dtype)],
                                       dsize(want.dtype)) == 0;
    const bool ok = same_bits || (std::isnan(a) && std::isnan(b)) ||
                    (tol > 0 && std::fabs(a - b) <= tol * std::fmax(std::fabs(a), 1e-30f));
    if (!ok && bad++ < 3)
      std::fprintf(stderr, "  %s: %s tensor %zu elem %lld: want %.9g got %.9g\n", name, what, t,
                   static_cast<long long>(j), a, b);
  }
  return bad;
}

void run(const Case& c) {
  const size_t nt = c.sizes.size();
  std::vector<HostTensor> P, G, S;
  std::vector<int64_t> seeds;
  for (size_t i = 0; i < nt; ++i) {
    const int64_t n = c.sizes[i];
    P.emplace_back(c.p, n);
    G.emplace_back(c.g, n);
    S.emplace_back(c.s, n);
    seeds.push_back(static_cast<int64_t>(sk::mix32(static_cast<uint32_t>(i) * 7919u + 1u)));
    for (int64_t j = 0; j < n; ++j) {
      P[i].put(j, next_value(), 0, false);
      const float gv = next_value();
      G[i].put(j, (next_u32() % 8 == 0) ? 0.0f : gv, 0, false);
      if (c.s == skc::DType::kInt16) {
        S[i].set_i16(j, static_cast<int16_t>(static_cast<int>(next_u32() % 33) - 16));
      } else {
        // m = -g exactly for some elements: c = b1 m + (1-b1) g is then tiny or zero.
        S[i].put(j, (next_u32() % 8 == 0) ? -G[i].get(j) : next_value(), 0, false);
      }
    }
    if (static_cast<int>(i) == c.nan_tensor && n > 0) G[i].put(n / 2, NAN, 0, false);
    if (static_cast<int>(i) == c.inf_tensor && n > 0) G[i].put(n - 1, INFINITY, 0, false);
  }

  // Device copies.
  std::vector<DeviceBuf*> dp, dg, ds;
  std::vector<void*> pp, sp;
  std::vector<const void*> gp;
  std::vector<int64_t> numels(c.sizes);
  for (size_t i = 0; i < nt; ++i) {
    dp.push_back(new DeviceBuf(P[i], c.offset));
    dg.push_back(new DeviceBuf(G[i], c.offset));
    ds.push_back(new DeviceBuf(S[i], c.offset));
    pp.push_back(dp.back()->ptr);
    gp.push_back(dg.back()->ptr);
    sp.push_back(ds.back()->ptr);
  }
  int64_t* d_steps;
  float* d_scalars;  // lr, scale, found_inf, clip
  CHECK_CUDA(cudaMalloc(&d_steps, sizeof(int64_t) * (nt + 1)));
  CHECK_CUDA(cudaMalloc(&d_scalars, sizeof(float) * 4));
  std::vector<int64_t> h_steps(nt + 1, c.step);
  const float h_scalars[4] = {1e-2f, 4.0f, c.found_inf ? 1.0f : 0.0f, c.clip};
  CHECK_CUDA(cudaMemcpy(d_steps, h_steps.data(), sizeof(int64_t) * (nt + 1), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_scalars, h_scalars, sizeof(h_scalars), cudaMemcpyHostToDevice));
  std::vector<const int64_t*> steps(nt);
  for (size_t i = 0; i < nt; ++i) steps[i] = d_steps + i;

  skc::TensorList tl;
  tl.count = static_cast<int64_t>(nt);
  tl.params = pp.data();
  tl.grads = gp.data();
  tl.states = sp.data();
  tl.numels = numels.data();
  tl.steps = steps.data();
  tl.seeds = seeds.data();
  tl.param_dtype = c.p;
  tl.grad_dtype = c.g;
  tl.state_dtype = c.s;
  skc::Common common;
  common.lr = c.device_lr ? 123.0f : 1e-2f;  // the device lr must win
  common.lr_ptr = c.device_lr ? d_scalars : nullptr;
  common.grad_scale = c.scale ? d_scalars + 1 : nullptr;
  common.found_inf = c.found_inf ? d_scalars + 2 : nullptr;
  common.clip = c.clip != 0.0f || c.clip_zero ? d_scalars + 3 : nullptr;
  common.stochastic_rounding = c.sr;

  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  void* ws = nullptr;
  if (c.algo == Algo::kLion) {
    skc::LionArgs a;
    a.common = common;
    a.beta1 = 0.9f;
    a.beta2 = 0.99f;
    a.weight_decay = 0.1f;
    CHECK_CUDA(skc::lion(tl, a, stream));
  } else if (c.algo == Algo::kSimba) {
    skc::SimbaArgs a;
    a.common = common;
    a.window_size = 16;
    a.threshold_count = 4;
    a.weight_decay = 0.1f;
    CHECK_CUDA(skc::simba(tl, a, stream));
  } else {
    skc::TigerArgs a;
    a.common = common;
    a.beta = 0.965f;
    a.weight_decay = 0.01f;
    a.shrink_ratio = 0.99f;
    a.grad_accum_steps = c.accum;
    a.roles = c.roles.data();
    a.row_sizes = c.rows.data();
    a.workspace_bytes = skc::tiger_workspace_bytes(tl, a);
    CHECK_CUDA(cudaMalloc(&ws, a.workspace_bytes));
    CHECK_CUDA(cudaMemset(ws, 0xFF, a.workspace_bytes));  // the kernels must not rely on zeros
    a.workspace = ws;
    CHECK_CUDA(skc::tiger(tl, a, stream));
  }
  CHECK_CUDA(cudaStreamSynchronize(stream));

  reference(c, P, G, S, seeds);
  int bad = 0;
  for (size_t i = 0; i < nt; ++i) {
    HostTensor gotp(c.p, c.sizes[i]), gots(c.s, c.sizes[i]);
    dp[i]->fetch(gotp);
    ds[i]->fetch(gots);
    bad += compare("param", c.name, i, P[i], gotp, c.algo == Algo::kTiger ? 2e-6f : 0.0f);
    bad += compare("state", c.name, i, S[i], gots, 0.0f);
  }
  std::printf("%-40s %s (%zu tensors)\n", c.name, bad ? "FAIL" : "ok", nt);
  g_failures += bad != 0;

  for (size_t i = 0; i < nt; ++i) {
    delete dp[i];
    delete dg[i];
    delete ds[i];
  }
  cudaFree(d_steps);
  cudaFree(d_scalars);
  if (ws) cudaFree(ws);
  cudaStreamDestroy(stream);
}

// ------------------------------------------------------------------ sumsq
// One sumsq call over device copies of `tensors` (offset elements into their buffers); the
// workspace and out start as garbage (the kernels must not rely on zeros).
std::vector<double> device_sumsq(const std::vector<const HostTensor*>& tensors, int offset, const float* d_scale) {
  std::vector<DeviceBuf*> bufs;
  std::vector<const void*> ptrs;
  std::vector<int64_t> numels;
  for (const HostTensor* h : tensors) {
    bufs.push_back(new DeviceBuf(*h, offset));
    ptrs.push_back(bufs.back()->ptr);
    numels.push_back(h->n);
  }
  sk::SumsqList l;
  l.count = static_cast<int64_t>(tensors.size());
  l.tensors = ptrs.data();
  l.numels = numels.data();
  l.dtype = tensors.empty() ? skc::DType::kFloat32 : tensors[0]->dtype;
  sk::SumsqArgs a;
  a.scale = d_scale;
  a.workspace_bytes = skc::sumsq_workspace_bytes(l);
  double* d_out;
  CHECK_CUDA(cudaMalloc(&d_out, sizeof(double) * (tensors.size() + 1)));
  CHECK_CUDA(cudaMemset(d_out, 0xFF, sizeof(double) * (tensors.size() + 1)));
  CHECK_CUDA(cudaMalloc(&a.workspace, a.workspace_bytes));
  CHECK_CUDA(cudaMemset(a.workspace, 0xFF, a.workspace_bytes));
  a.out = d_out;
  CHECK_CUDA(skc::sumsq(l, a, nullptr));
  std::vector<double> out(tensors.size());
  CHECK_CUDA(cudaMemcpy(out.data(), d_out, sizeof(double) * out.size(), cudaMemcpyDeviceToHost));
  cudaFree(d_out);
  cudaFree(a.workspace);
  for (DeviceBuf* b : bufs) delete b;
  return out;
}

bool same_bits(double a, double b) { return std::memcmp(&a, &b, sizeof a) == 0; }

// The norm pass: each sum within 1e-12 of a host fp64 sum, the same bits with other
// companions and misaligned, NaN -> NaN, inf -> +inf, empty -> 0.
void run_sumsq(skc::DType dtype, bool scaled) {
  const float scale = 0.75f;  // not a power of 2: the fp32 quotient rounds
  float* d_scale = nullptr;
  if (scaled) {
    CHECK_CUDA(cudaMalloc(&d_scale, sizeof(float)));
    CHECK_CUDA(cudaMemcpy(d_scale, &scale, sizeof(float), cudaMemcpyHostToDevice));
  }
  const std::vector<int64_t> sizes = {0, 1, 7, 8, 9, 4097, 65535, 65536, 65537, 3 * 65536 + 5, 1000000, 0, 33};
  std::vector<HostTensor> T;
  for (int64_t n : sizes) {
    T.emplace_back(dtype, n);
    for (int64_t j = 0; j < n; ++j) T.back().put(j, next_value(), 0, false);
  }
  const size_t k_nan = T.size(), k_inf = T.size() + 1;
  T.emplace_back(dtype, 70000);
  T.emplace_back(dtype, 70000);
  for (int64_t j = 0; j < 70000; ++j) {
    T[k_nan].put(j, next_value(), 0, false);
    T[k_inf].put(j, next_value(), 0, false);
  }
  T[k_nan].put(69999, NAN, 0, false);
  T[k_nan].put(3, INFINITY, 0, false);  // NaN wins over inf
  T[k_inf].put(65536 + 5, -INFINITY, 0, false);

  std::vector<const HostTensor*> all, rev, sub;
  for (const HostTensor& h : T) all.push_back(&h);
  rev.assign(all.rbegin(), all.rend());
  for (size_t i = 0; i < all.size(); i += 3) sub.push_back(all[i]);
  const std::vector<double> got = device_sumsq(all, 0, d_scale);
  const std::vector<double> got_rev = device_sumsq(rev, 0, d_scale);
  const std::vector<double> got_sub = device_sumsq(sub, 0, d_scale);
  const std::vector<double> got_mis = device_sumsq(all, 1, d_scale);  // misaligned: scalar loads

  int bad = 0;
  for (size_t i = 0; i < T.size(); ++i) {
    long double acc = 0.0L;  // wider than the device's fp64: the reference's own error is negligible
    for (int64_t j = 0; j < T[i].n; ++j) {
      const float q = scaled ? T[i].get(j) / scale : T[i].get(j);
      acc += static_cast<long double>(static_cast<double>(q) * static_cast<double>(q));
    }
    const double want = static_cast<double>(acc);
    const double g = got[i];
    bool ok;
    if (i == k_nan) ok = std::isnan(g);
    else if (i == k_inf) ok = std::isinf(g) && g > 0;
    else if (T[i].n == 0) ok = same_bits(g, 0.0);
    else ok = std::fabs(g - want) <= 1e-12 * want;
    const bool same = same_bits(g, got_rev[T.size() - 1 - i]) && same_bits(g, got_mis[i]) &&
                      (i % 3 != 0 || same_bits(g, got_sub[i / 3]));
    if ((!ok || !same) && bad++ < 3)
      std::fprintf(stderr, "  sumsq tensor %zu (%lld elements): want %.17g got %.17g (reversed %.17g, "
                   "misaligned %.17g)\n", i, static_cast<long long>(T[i].n), want, g, got_rev[T.size() - 1 - i],
                   got_mis[i]);
  }
  char name[64];
  std::snprintf(name, sizeof name, "sumsq %s%s", dtype == skc::DType::kFloat32 ? "fp32" :
                dtype == skc::DType::kBFloat16 ? "bf16" : "fp16", scaled ? " scaled" : "");
  std::printf("%-40s %s (%zu tensors)\n", name, bad ? "FAIL" : "ok", T.size());
  g_failures += bad != 0;
  if (d_scale) cudaFree(d_scale);
}

// ------------------------------------------------------------------ int8 momentum, the correction byte
// NOTE: [CUDA row blocks] in csrc/cuda/compressed.cuh against a host loop over the same
// sign_math.h functions, block by block as the CPU kernels (lion_q8_rows, tiger_rows): codes,
// scales and residuals bit for bit; θ bit for bit too except Tiger's RMS-scaled roles (the RMS
// summation order), compared as θ^ = θ16 + ρ u within a unit of the correction byte.
struct QCase {
  const char* name;
  Algo algo;
  skc::DType p, g, s;  // s: kInt8 (codes + bf16 scales) or a float momentum (with the correction byte)
  bool ec;
  std::vector<std::pair<int64_t, int64_t>> shapes;  // rows x cols
  std::vector<int64_t> roles;                       // Tiger
  int offset = 0;                                   // element offset of every device pointer
  bool sr = false;
  bool scale = false;      // grad_scale = 4
  float clip = 0.0f;       // given when non-zero
  bool found_inf = false;
  int64_t step = 0;
  int64_t accum = 1;
  int nan_tensor = -1;     // a NaN in this tensor's grad (Tiger: the guard)
  int inf_tensor = -1;     // an inf in this tensor's grad
  bool sums_out = false;   // Tiger: sums of squares out; a sums-only call must give the same bits
};

struct RawBuf {
  unsigned char* base = nullptr;
  unsigned char* ptr = nullptr;
  size_t bytes;
  RawBuf(const void* src, size_t n, size_t off) : bytes(n) {
    CHECK_CUDA(cudaMalloc(&base, n + off + 16));
    ptr = base + off;
    if (n) CHECK_CUDA(cudaMemcpy(ptr, src, n, cudaMemcpyHostToDevice));
  }
  void fetch(void* dst) const {
    if (bytes) CHECK_CUDA(cudaMemcpy(dst, ptr, bytes, cudaMemcpyDeviceToHost));
  }
  ~RawBuf() { cudaFree(base); }
  RawBuf(const RawBuf&) = delete;
  RawBuf& operator=(const RawBuf&) = delete;
};

uint16_t bits16_at(const HostTensor& h, int64_t j) {
  uint16_t b;
  std::memcpy(&b, &h.bytes[j * 2], 2);
  return b;
}

// θ^ of element j: the 16-bit weight and its residual (the correction byte), or the weight.
float theta_hat(const HostTensor& h, const std::vector<int8_t>& rho, int64_t j) {
  if (rho.empty()) return h.get(j);
  if (h.dtype == skc::DType::kBFloat16) return sk::ec_decode(sk::bf16_t{bits16_at(h, j)}, rho[j]);
  return sk::ec_decode(sk::fp16_t{bits16_at(h, j)}, rho[j]);
}

void put_theta(HostTensor& h, std::vector<int8_t>& rho, int64_t j, float v, uint32_t key, bool sr) {
  if (rho.empty()) return h.put(j, v, key, sr);
  uint16_t b;
  if (h.dtype == skc::DType::kBFloat16) {
    const sk::bf16_t w{sk::bf16_bits_rne(v)};
    rho[j] = sk::ec_residual(w, v);
    b = w.x;
  } else {
    const sk::fp16_t w{sk::fp16_bits_rne(v)};
    rho[j] = sk::ec_residual(w, v);
    b = w.x;
  }
  std::memcpy(&h.bytes[j * 2], &b, 2);
}

struct QTensor {
  HostTensor p, g, m;  // m: the float momentum (unused with int8)
  std::vector<int8_t> codes, rho;
  std::vector<uint16_t> scales;
  int64_t rows, cols, nb;
};

void q_reference(const QCase& c, std::vector<QTensor>& T, const std::vector<int64_t>& seeds) {
  const float lr = 1e-2f, scale = c.scale ? 4.0f : 1.0f;
  if (c.found_inf) return;
  const bool q8 = c.s == skc::DType::kInt8;
  for (size_t i = 0; i < T.size(); ++i) {
    QTensor& x = T[i];
    const int64_t n = x.rows * x.cols;
    const uint32_t seed = static_cast<uint32_t>(seeds[i]);
    const uint32_t kp = sk::sr_key(seed, c.step, 0), ks = sk::sr_key(seed, c.step, 1);
    const bool sr = c.sr && !c.ec;
    auto grad = [&](int64_t j) {
      const float q = x.g.get(j) / scale;
      return c.clip != 0.0f ? q * c.clip : q;
    };
    const int role = c.algo == Algo::kTiger ? static_cast<int>(c.roles[i]) : 0;
    const sk::TigerScalars ts = sk::tiger_scalars(c.step, c.accum, 0.965f, 0.01f, 0.99f, role);
    std::vector<float> row_lr(static_cast<size_t>(x.rows), 0.0f);
    if (c.algo == Algo::kTiger) {
      bool nan = false;
      for (int64_t j = 0; j < n; ++j) nan |= std::isnan(grad(j));
      if (nan) {  // the guard: m and its scales unchanged
        for (int64_t j = 0; j < n; ++j) {
          float v = theta_hat(x.p, x.rho, j);
          sk::tiger_shrink(v, ts);
          put_theta(x.p, x.rho, j, v, kp, sr);
        }
        continue;
      }
      double all = 0.0;
      for (int64_t r = 0; r < x.rows; ++r) {
        double acc = 0.0;
        for (int64_t j = r * x.cols; j < (r + 1) * x.cols; ++j) acc += static_cast<double>(x.p.get(j)) * x.p.get(j);
        all += acc;
        row_lr[r] = sk::tiger_lr(lr, role, static_cast<float>(std::sqrt(acc / static_cast<double>(x.cols))));
      }
      const float lr_t = sk::tiger_lr(lr, role, static_cast<float>(std::sqrt(all / static_cast<double>(n))));
      if (role != sk::kRoleEmbedding)
        for (float& v : row_lr) v = lr_t;
    }
    const sk::LionScalars ls = sk::lion_scalars(lr, 0.9f, 0.99f, 0.1f);
    for (int64_t r = 0; r < x.rows; ++r) {
      for (int64_t b = 0; b < x.nb; ++b) {
        const int64_t first = r * x.cols + b * sk::kQBlock;
        const int64_t cnt = std::min<int64_t>(sk::kQBlock, x.cols - b * sk::kQBlock);
        const float s_old = q8 ? sk::q8_scale(x.scales[r * x.nb + b]) : 0.0f;
        float mn[sk::kQBlock];
        float amax = 0.0f;
        for (int64_t k = 0; k < cnt; ++k) {
          const int64_t j = first + k;
          const bool write_p = c.algo == Algo::kLion || ts.update;
          float pv = write_p ? theta_hat(x.p, x.rho, j) : 0.0f;
          float mv = q8 ? sk::q8_dequant(x.codes[j], s_old) : x.m.get(j);
          if (c.algo == Algo::kLion) sk::lion_update(pv, mv, grad(j), ls);
          else sk::tiger_update(pv, mv, grad(j), row_lr[r], ts);
          if (write_p) put_theta(x.p, x.rho, j, pv, kp, sr);
          if (q8) {
            mn[k] = mv;
            const float a = mv < 0.0f ? -mv : mv;
            amax = a > amax ? a : amax;
          } else {
            x.m.put(j, mv, ks, false);
          }
        }
        if (!q8) continue;
        const uint16_t sb = sk::bf16_bits_up(amax);
        const float sc = sk::q8_scale(sb), inv = 1.0f / sc;
        for (int64_t k = 0; k < cnt; ++k) x.codes[first + k] = sk::q8_code(mn[k], sc, inv, ks);
        x.scales[r * x.nb + b] = sb;
      }
    }
  }
}

void run_q(const QCase& c) {
  const bool q8 = c.s == skc::DType::kInt8;
  const size_t nt = c.shapes.size();
  std::vector<QTensor> T;
  std::vector<int64_t> seeds, numels, cols;
  for (size_t i = 0; i < nt; ++i) {
    const int64_t rows = c.shapes[i].first, co = c.shapes[i].second, n = rows * co;
    const skc::DType ms = q8 ? skc::DType::kFloat32 : c.s;
    T.push_back(QTensor{HostTensor(c.p, n), HostTensor(c.g, n), HostTensor(ms, q8 ? 0 : n), {}, {}, {}, rows, co,
                        (co + sk::kQBlock - 1) / sk::kQBlock});
    QTensor& x = T.back();
    seeds.push_back(static_cast<int64_t>(sk::mix32(static_cast<uint32_t>(i) * 7919u + 5u)));
    numels.push_back(n);
    cols.push_back(co);
    for (int64_t j = 0; j < n; ++j) {
      x.p.put(j, next_value(), 0, false);
      x.g.put(j, (next_u32() % 8 == 0) ? 0.0f : next_value(), 0, false);
      if (!q8) x.m.put(j, next_value(), 0, false);
    }
    if (q8) {
      x.codes.resize(static_cast<size_t>(n));
      for (int8_t& v : x.codes) v = static_cast<int8_t>(static_cast<int>(next_u32() % 255) - 127);
      x.scales.resize(static_cast<size_t>(rows * x.nb));
      for (uint16_t& v : x.scales) v = (next_u32() % 8 == 0) ? 0 : sk::bf16_bits_up(std::fabs(next_value()));
      // An all-zero block (zero codes, scale 0, zero grads) and one huge outlier.
      if (n >= 2 && x.nb > 0) {
        for (int64_t k = 0; k < std::min<int64_t>(co, sk::kQBlock); ++k) {
          x.codes[k] = 0;
          x.g.put(k, 0.0f, 0, false);
        }
        x.scales[0] = 0;
        if (rows > 1) x.g.put(co + std::min<int64_t>(co - 1, 3), 3e30f, 0, false);
      }
    }
    if (c.ec) {
      x.rho.resize(static_cast<size_t>(n));
      for (int8_t& v : x.rho) v = static_cast<int8_t>(static_cast<int>(next_u32() % 255) - 127);
    }
    if (static_cast<int>(i) == c.nan_tensor && n > 0) x.g.put(n / 2, NAN, 0, false);
    if (static_cast<int>(i) == c.inf_tensor && n > 0) x.g.put(n - 1, INFINITY, 0, false);
  }

  std::vector<RawBuf*> bufs;
  std::vector<void*> pp, sp, scp, rp;
  std::vector<const void*> gp;
  std::vector<RawBuf*> dp, ds, dsc, dr;
  for (QTensor& x : T) {
    // offset elements of each list's own type (int8 lists: offset bytes)
    const size_t po = static_cast<size_t>(c.offset) * dsize(c.p), go = static_cast<size_t>(c.offset) * dsize(c.g);
    bufs.push_back(new RawBuf(x.p.bytes.data(), x.p.bytes.size(), po));
    dp.push_back(bufs.back());
    bufs.push_back(new RawBuf(x.g.bytes.data(), x.g.bytes.size(), go));
    gp.push_back(bufs.back()->ptr);
    if (q8) {
      bufs.push_back(new RawBuf(x.codes.data(), x.codes.size(), static_cast<size_t>(c.offset)));
      ds.push_back(bufs.back());
      bufs.push_back(new RawBuf(x.scales.data(), x.scales.size() * 2, 0));
      dsc.push_back(bufs.back());
      scp.push_back(bufs.back()->ptr);
    } else {
      bufs.push_back(new RawBuf(x.m.bytes.data(), x.m.bytes.size(), static_cast<size_t>(c.offset) * dsize(c.s)));
      ds.push_back(bufs.back());
    }
    if (c.ec) {
      bufs.push_back(new RawBuf(x.rho.data(), x.rho.size(), static_cast<size_t>(c.offset)));
      dr.push_back(bufs.back());
      rp.push_back(bufs.back()->ptr);
    }
    pp.push_back(dp.back()->ptr);
    sp.push_back(ds.back()->ptr);
  }
  int64_t* d_steps;
  float* d_scalars;  // lr, scale, found_inf, clip, 1 (the found_inf of the sums-only call)
  CHECK_CUDA(cudaMalloc(&d_steps, sizeof(int64_t) * (nt + 1)));
  CHECK_CUDA(cudaMalloc(&d_scalars, sizeof(float) * 5));
  std::vector<int64_t> h_steps(nt + 1, c.step);
  const float h_scalars[5] = {1e-2f, 4.0f, c.found_inf ? 1.0f : 0.0f, c.clip, 1.0f};
  CHECK_CUDA(cudaMemcpy(d_steps, h_steps.data(), sizeof(int64_t) * (nt + 1), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_scalars, h_scalars, sizeof(h_scalars), cudaMemcpyHostToDevice));
  std::vector<const int64_t*> steps(nt);
  for (size_t i = 0; i < nt; ++i) steps[i] = d_steps + i;

  skc::TensorList tl;
  tl.count = static_cast<int64_t>(nt);
  tl.params = pp.data();
  tl.grads = gp.data();
  tl.states = sp.data();
  tl.numels = numels.data();
  tl.steps = steps.data();
  tl.seeds = seeds.data();
  tl.param_dtype = c.p;
  tl.grad_dtype = c.g;
  tl.state_dtype = c.s;
  if (q8) {
    tl.scales = scp.data();
    tl.row_sizes = cols.data();
  }
  if (c.ec) tl.residuals = rp.data();
  skc::Common common;
  common.lr = 1e-2f;
  common.grad_scale = c.scale ? d_scalars + 1 : nullptr;
  common.found_inf = c.found_inf ? d_scalars + 2 : nullptr;
  common.clip = c.clip != 0.0f ? d_scalars + 3 : nullptr;
  common.stochastic_rounding = c.sr;

  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  void* ws = nullptr;
  double* d_out = nullptr;
  std::vector<int64_t> out_at(nt, -1);
  int64_t nout = 0;
  std::vector<double> out1, out2;
  if (c.algo == Algo::kLion) {
    skc::LionArgs a;
    a.common = common;
    a.beta1 = 0.9f;
    a.beta2 = 0.99f;
    a.weight_decay = 0.1f;
    CHECK_CUDA(skc::lion(tl, a, stream));
  } else {
    skc::TigerArgs a;
    a.common = common;
    a.beta = 0.965f;
    a.weight_decay = 0.01f;
    a.shrink_ratio = 0.99f;
    a.grad_accum_steps = c.accum;
    a.roles = c.roles.data();
    a.row_sizes = cols.data();
    if (c.sums_out) {
      for (size_t i = 0; i < nt; ++i) {
        if (c.roles[i] != sk::kRoleMatrix && c.roles[i] != sk::kRoleEmbedding) continue;
        out_at[i] = nout;
        nout += c.roles[i] == sk::kRoleEmbedding ? T[i].rows : 1;
      }
      CHECK_CUDA(cudaMalloc(&d_out, sizeof(double) * static_cast<size_t>(nout + 1)));
      CHECK_CUDA(cudaMemset(d_out, 0xFF, sizeof(double) * static_cast<size_t>(nout + 1)));
      a.sumsq_out = d_out;
      a.sumsq_out_at = out_at.data();
    }
    a.workspace_bytes = skc::tiger_workspace_bytes(tl, a);
    CHECK_CUDA(cudaMalloc(&ws, a.workspace_bytes));
    CHECK_CUDA(cudaMemset(ws, 0xFF, a.workspace_bytes));
    a.workspace = ws;
    CHECK_CUDA(skc::tiger(tl, a, stream));
    if (c.sums_out) {
      out1.resize(static_cast<size_t>(nout));
      CHECK_CUDA(cudaMemcpyAsync(out1.data(), d_out, sizeof(double) * out1.size(), cudaMemcpyDeviceToHost, stream));
      CHECK_CUDA(cudaMemsetAsync(d_out, 0xFF, sizeof(double) * static_cast<size_t>(nout), stream));
      a.common.found_inf = d_scalars + 4;  // the sums-only call: θ as the first call left it
      CHECK_CUDA(skc::tiger(tl, a, stream));
      out2.resize(out1.size());
      CHECK_CUDA(cudaMemcpyAsync(out2.data(), d_out, sizeof(double) * out2.size(), cudaMemcpyDeviceToHost, stream));
    }
  }
  CHECK_CUDA(cudaStreamSynchronize(stream));

  q_reference(c, T, seeds);
  int bad = 0;
  for (size_t i = 0; i < nt; ++i) {
    const QTensor& x = T[i];
    const int64_t n = x.rows * x.cols;
    HostTensor gotp(c.p, n), gotm(q8 ? skc::DType::kFloat32 : c.s, q8 ? 0 : n);
    std::vector<int8_t> codes(x.codes.size()), rho(x.rho.size());
    std::vector<uint16_t> scales(x.scales.size());
    dp[i]->fetch(gotp.bytes.data());
    if (q8) {
      ds[i]->fetch(codes.data());
      dsc[i]->fetch(scales.data());
    } else {
      ds[i]->fetch(gotm.bytes.data());
    }
    if (c.ec) dr[i]->fetch(rho.data());
    const bool exact = c.algo == Algo::kLion || c.roles[i] == sk::kRoleElementwise || c.roles[i] == sk::kRoleGain;
    if (exact || !c.ec) {
      bad += compare("param", c.name, i, x.p, gotp, exact ? 0.0f : 2e-6f);
      if (exact && c.ec && std::memcmp(rho.data(), x.rho.data(), rho.size()) != 0 && bad++ < 3)
        std::fprintf(stderr, "  %s: residuals of tensor %zu differ\n", c.name, i);
    } else {  // θ^ within a unit of the correction byte (the RMS order may move one rounding)
      for (int64_t j = 0; j < n; ++j) {
        const float a = theta_hat(x.p, x.rho, j), b = theta_hat(gotp, rho, j);
        const bool ok = a == b || (std::isnan(a) && std::isnan(b)) ||
                        std::fabs(a - b) <= 1.0f / 32768.0f * std::fmax(std::fabs(a), 1e-30f);
        if (!ok && bad++ < 3)
          std::fprintf(stderr, "  %s: theta^ tensor %zu elem %lld: want %.9g got %.9g\n", c.name, i,
                       static_cast<long long>(j), a, b);
      }
    }
    if (q8) {
      for (size_t j = 0; j < codes.size(); ++j)
        if (codes[j] != x.codes[j] && bad++ < 3)
          std::fprintf(stderr, "  %s: code tensor %zu elem %zu: want %d got %d\n", c.name, i, j, x.codes[j], codes[j]);
      for (size_t j = 0; j < scales.size(); ++j)
        if (scales[j] != x.scales[j] && bad++ < 3)
          std::fprintf(stderr, "  %s: scale tensor %zu block %zu: want %04x got %04x\n", c.name, i, j, x.scales[j],
                       scales[j]);
    } else {
      bad += compare("state", c.name, i, x.m, gotm, 0.0f);
    }
    if (c.sums_out && out_at[i] >= 0 && n > 0) {
      const bool emb = c.roles[i] == sk::kRoleEmbedding;
      for (int64_t r = 0; r < (emb ? x.rows : 1); ++r) {
        double want = 0.0;
        const int64_t b = emb ? r * x.cols : 0, e = emb ? (r + 1) * x.cols : n;
        for (int64_t j = b; j < e; ++j) want += static_cast<double>(gotp.get(j)) * gotp.get(j);
        const size_t k = static_cast<size_t>(out_at[i] + r);
        const bool ok = std::fabs(out1[k] - want) <= 1e-12 * want && std::memcmp(&out1[k], &out2[k], 8) == 0;
        if (!ok && bad++ < 3)
          std::fprintf(stderr, "  %s: sums out tensor %zu row %lld: want %.17g got %.17g, sums-only call %.17g\n",
                       c.name, i, static_cast<long long>(r), want, out1[k], out2[k]);
      }
    }
  }
  std::printf("%-40s %s (%zu tensors)\n", c.name, bad ? "FAIL" : "ok", nt);
  g_failures += bad != 0;
  for (RawBuf* b : bufs) delete b;
  cudaFree(d_steps);
  cudaFree(d_scalars);
  if (ws) cudaFree(ws);
  if (d_out) cudaFree(d_out);
  cudaStreamDestroy(stream);
}

}  // namespace

int main() {
  int ndev = 0;
  if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
    std::printf("no CUDA device: skipped\n");
    return 77;
  }
  using D = skc::DType;
  const std::vector<int64_t> edge = {1, 3, 8, 9, 4095, 4097, 65535, 65536, 65537, 131072 + 5};
  std::vector<int64_t> many(300);
  for (size_t i = 0; i < many.size(); ++i) many[i] = 1 + static_cast<int64_t>(next_u32() % 3000);

  std::vector<Case> cases;
  auto add = [&](Case c) { cases.push_back(c); };
  // Lion over every dtype combination.
  const D pd[] = {D::kFloat32, D::kBFloat16, D::kFloat16};
  for (D p : pd)
    for (D g : {p, D::kFloat32})
      for (D s : {p, D::kFloat32, D::kBFloat16}) {
        if (p == D::kFloat32 && g != p) continue;
        Case c{"lion", Algo::kLion, p, g, s, edge};
        c.sr = true;
        add(c);
      }
  { Case c{"lion misaligned", Algo::kLion, D::kBFloat16, D::kFloat32, D::kFloat32, edge}; c.offset = 1; c.sr = true; add(c); }
  { Case c{"lion many tensors", Algo::kLion, D::kFloat32, D::kFloat32, D::kFloat32, many}; add(c); }
  { Case c{"lion scale + device lr", Algo::kLion, D::kFloat32, D::kFloat32, D::kFloat32, edge}; c.scale = true; c.device_lr = true; add(c); }
  { Case c{"lion found_inf", Algo::kLion, D::kFloat32, D::kFloat32, D::kFloat32, edge}; c.found_inf = true; add(c); }
  // Simba.
  for (D p : pd)
    for (D g : {p, D::kFloat32}) {
      if (p == D::kFloat32 && g != p) continue;
      Case c{"simba", Algo::kSimba, p, g, D::kInt16, edge};
      c.sr = true;
      add(c);
    }
  { Case c{"simba misaligned", Algo::kSimba, D::kFloat16, D::kFloat16, D::kInt16, edge}; c.offset = 3; add(c); }
  // Tiger: every role, row sizes small and large, NaN guard, accumulation window.
  {
    Case base{"tiger", Algo::kTiger, D::kFloat32, D::kFloat32, D::kFloat32,
              {7, 4097, 64 * 1000, 3 * 5000, 200003, 10, 65537 * 2}};
    base.rows = {7, 4097, 64, 5000, 200003, 1, 65537};
    base.roles = {0, 1, 2, 2, 3, 3, 3};
    for (D p : pd)
      for (D s : {p, D::kFloat32, D::kBFloat16}) {
        Case c = base;
        c.p = p;
        c.g = p;
        c.s = s;
        c.sr = true;
        add(c);
      }
    Case c = base;
    c.name = "tiger nan guard + scale";
    c.nan_tensor = 4;
    c.scale = true;
    add(c);
    c = base;
    c.name = "tiger accumulation t=0 k=4";
    c.accum = 4;
    add(c);
    c = base;
    c.name = "tiger accumulation t=3 k=4 misaligned";
    c.accum = 4;
    c.step = 3;
    c.offset = 1;
    c.p = D::kBFloat16;
    c.g = D::kFloat32;
    add(c);
    c = base;
    c.name = "tiger found_inf";
    c.found_inf = true;
    add(c);
    c = base;
    c.name = "tiger clip + scale + nan guard";
    c.clip = 0.3f;
    c.scale = true;
    c.nan_tensor = 4;
    add(c);
    c = base;
    c.name = "tiger clip 0, an inf grad (guard)";
    c.clip_zero = true;
    c.inf_tensor = 5;
    c.p = D::kBFloat16;
    c.g = D::kFloat32;
    c.s = D::kBFloat16;
    c.sr = true;
    add(c);
  }
  // The clipping coefficient (NOTE: [CUDA gradient used]).
  { Case c{"lion clip + scale", Algo::kLion, D::kFloat32, D::kFloat32, D::kFloat32, edge}; c.clip = 0.3f; c.scale = true; add(c); }
  { Case c{"lion clip bf16", Algo::kLion, D::kBFloat16, D::kBFloat16, D::kBFloat16, edge}; c.clip = 0.3f; c.sr = true; add(c); }
  { Case c{"simba clip misaligned", Algo::kSimba, D::kFloat16, D::kFloat32, D::kInt16, edge}; c.clip = 0.3f; c.offset = 3; add(c); }
  for (const Case& c : cases) run(c);
  // int8 momentum and the correction byte (NOTE: [CUDA row blocks]): ragged last blocks (cols
  // not a multiple of 64), rows shorter than a block, one block per row, many blocks per row,
  // a chunk's worth of segments and more.
  {
    const std::vector<std::pair<int64_t, int64_t>> shapes = {{5, 130}, {9, 64}, {3, 1}, {7, 70}, {2, 3}, {40, 4100},
                                                             {1, 200003}, {4096, 8}};
    const std::vector<int64_t> roles = {3, 2, 0, 1, 3, 2, 3, 2};
    for (Algo algo : {Algo::kLion, Algo::kTiger})
      for (D p : pd)
        for (D g : {p, D::kFloat32})
          for (bool ec : {false, true})
            for (D s : {D::kInt8, p, D::kFloat32, D::kBFloat16}) {
              if (p == D::kFloat32 && (g != p || ec)) continue;  // the correction byte: 16-bit params
              if (s != D::kInt8 && !ec) continue;                 // neither: the ordinary kernels
              if (s != D::kInt8 && s == D::kBFloat16 && p == D::kBFloat16) continue;
              QCase c{algo == Algo::kLion ? "lion compressed" : "tiger compressed", algo, p, g, s, ec, shapes, roles};
              c.sr = !ec;
              c.sums_out = algo == Algo::kTiger;
              run_q(c);
            }
    QCase c{"lion q8 misaligned + scale + clip + nonfinite", Algo::kLion, D::kBFloat16, D::kFloat32, D::kInt8, true,
            shapes, roles};
    c.offset = 1;
    c.scale = true;
    c.clip = 0.3f;
    c.nan_tensor = 0;
    c.inf_tensor = 5;
    run_q(c);
    c.algo = Algo::kTiger;
    c.name = "tiger q8 misaligned + guard + inf + sums";
    c.sums_out = true;
    run_q(c);
    c.name = "tiger q8 accumulation t=0 k=3";
    c.offset = 0;
    c.nan_tensor = -1;
    c.accum = 3;
    run_q(c);
    c.name = "tiger q8 accumulation t=2 k=3";
    c.step = 2;
    run_q(c);
    c.name = "tiger q8 found_inf (sums only)";
    c.found_inf = true;
    run_q(c);
    c.algo = Algo::kLion;
    c.name = "lion q8 found_inf";
    run_q(c);
  }
  for (D d : pd)
    for (bool scale : {false, true}) run_sumsq(d, scale);
  std::printf("%s\n", g_failures ? "FAILED" : "all passed");
  return g_failures ? 1 : 0;
}
