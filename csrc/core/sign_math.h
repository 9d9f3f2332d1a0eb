// sign_math.h -- the per-element math of Lion, Tiger and Simba, shared by every
// compiled executor (the OpenMP CPU kernels and the CUDA functors).
//
// Framework-free: plain C++17 / CUDA, no torch header. Everything here is an
// inline function of fp32 values ("opmath"); storage types are converted at the
// edges by the load/store helpers below. The Python reference backend
// (sign_kernels/backends/reference.py) and the Triton kernels implement the same
// formulas in the same operation order; docs/rules.md is the contract.
//
// NOTE: [no contraction]
// Every formula below is written as separately rounded fp32 multiplies and adds.
// The build compiles with -ffp-contract=off (host) and --fmad=false (device), and
// the Triton launcher disables fp fusion, so no executor turns a*b+c into an FMA.
// That is what makes fp32 results bit-identical across CPU, CUDA and Triton.
//
// NOTE: [sign]
// sign(x) = (x > 0) - (x < 0): +1, -1, and +0 for +0, -0 and NaN. That is what
// torch.sign returns, so the torch reference and every kernel agree on NaN too.
//
// NOTE: [stochastic rounding bits]
// Writing fp32 -> bf16 with stochastic rounding adds 16 random bits to the low
// half of the fp32 word and truncates. The bits are a pure function of
// (tensor seed, step, buffer stream, element index):
//   key = mix32(seed ^ mix32(step_lo + 0x9E3779B9 * (stream + 1)))
//   r   = mix32(key ^ mix32(idx_lo ^ (idx_hi * 0x85EBCA6B)))      (uint32, wrapping)
// where mix32 is the "lowbias32" integer hash, stream 0 is the parameter and
// stream 1 the momentum, step is the optimizer step of the tensor *before* this
// call, and idx the element's offset in the (contiguous) tensor. The tensor seed
// is mix32(optimizer seed ^ mix32(index of the parameter in the optimizer)),
// computed in Python (sign_kernels/_rng.py).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SK_HD __host__ __device__ __forceinline__
#else
#define SK_HD inline __attribute__((always_inline))
#endif

namespace sign_kernels {

// ---------------------------------------------------------------- storage types
// Tagged 16-bit storage types: the core never depends on torch's c10::BFloat16 /
// c10::Half, so the same header compiles in CMake without torch.
struct bf16_t { uint16_t x; };
struct fp16_t { uint16_t x; };

enum class Algo : int { kLion = 0, kTiger = 1, kSimba = 2 };

// Tiger parameter roles (docs/rules.md, Tiger: the roles). The integer values are
// part of the op schema (the `roles` list) and of sign_kernels/optim/tiger.py.
enum TigerRole : int {
  kRoleElementwise = 0,  // bias, norm shift: lr_p = 0.5 lr, wd_p = 0, centre 0
  kRoleGain = 1,         // norm gain:        lr_p = 0.5 lr, wd_p = 0, centre 1
  kRoleEmbedding = 2,    // lr_p = lr * RMS(row), wd_p = wd, centre 0
  kRoleMatrix = 3,       // lr_p = lr * RMS(tensor), wd_p = wd, centre 0
};

SK_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

SK_HD float bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// ------------------------------------------------------------- conversions
SK_HD float to_f32(float v) { return v; }
SK_HD float to_f32(bf16_t v) { return bits_f32(static_cast<uint32_t>(v.x) << 16); }

// IEEE binary16 -> binary32, exact, branch-light (vectorizes on the CPU).
SK_HD float to_f32(fp16_t v) {
  const uint32_t h = v.x;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t em = h & 0x7FFFu;
  // Normal and subnormal numbers: shift exponent+mantissa into place and rescale
  // by 2^112 (the exponent bias difference); this also handles subnormals exactly.
  const float mag = bits_f32(em << 13) * bits_f32(0x77800000u);  // * 2^112
  // Inf / NaN: exponent all ones.
  const uint32_t infnan = 0x7F800000u | (em & 0x3FFu) << 13;
  const uint32_t out = (em >= 0x7C00u) ? (sign | infnan) : (sign | f32_bits(mag));
  return bits_f32(out);
}

// fp32 -> bf16, round to nearest even; NaN -> quiet NaN with the sign kept.
SK_HD uint16_t bf16_bits_rne(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = ((u >> 16) & 0x8000u) | 0x7FC0u;
  return static_cast<uint16_t>(((u & 0x7FFFFFFFu) > 0x7F800000u) ? nan : rounded);
}

// fp32 -> bf16, stochastic rounding with 16 random bits (NOTE: [stochastic rounding bits]).
// Adding r to the low half rounds the magnitude up with probability frac/2^16.
SK_HD uint16_t bf16_bits_sr(float f, uint32_t r) {
  const uint32_t u = f32_bits(f);
  const uint32_t rounded = (u + (r & 0xFFFFu)) >> 16;
  const uint32_t nan = ((u >> 16) & 0x8000u) | 0x7FC0u;
  return static_cast<uint16_t>(((u & 0x7FFFFFFFu) > 0x7F800000u) ? nan : rounded);
}

// fp32 -> fp16, round to nearest even, overflow to Inf, exact subnormals.
SK_HD uint16_t fp16_bits_rne(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  // NaN: quiet NaN. Inf and anything that rounds past 65504: Inf.
  const uint32_t nan = sign | 0x7E00u;
  const uint32_t inf = sign | 0x7C00u;
  // Normal range (|f| >= 2^-14): rebias exponent, round mantissa 23 -> 10 bits.
  const uint32_t normal = (a - 0x38000000u + 0xFFFu + ((a >> 13) & 1u)) >> 13;
  // Subnormal range (|f| < 2^-14): add 0.5 (as a float) so the FPU aligns the
  // mantissa and rounds to nearest even at 2^-24; the low bits are the result.
  const float sub_f = bits_f32(a) + 0.5f;
  const uint32_t sub = f32_bits(sub_f) - 0x3F000000u;
  uint32_t mag = (a < 0x38800000u) ? sub : normal;
  mag = (a >= 0x477FF000u) ? 0x7C00u : mag;  // >= 65520 rounds to Inf
  const uint32_t out = (a > 0x7F800000u) ? nan : ((a == 0x7F800000u) ? inf : (sign | mag));
  return static_cast<uint16_t>(out);
}

// --------------------------------------------------------------- random bits
SK_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

SK_HD uint32_t sr_key(uint32_t seed, int64_t step, uint32_t stream) {
  return mix32(seed ^ mix32(static_cast<uint32_t>(step) + 0x9E3779B9u * (stream + 1u)));
}

SK_HD uint32_t sr_bits(uint32_t key, int64_t idx) {
  const uint32_t lo = static_cast<uint32_t>(idx);
  const uint32_t hi = static_cast<uint32_t>(static_cast<uint64_t>(idx) >> 32);
  return mix32(key ^ mix32(lo ^ (hi * 0x85EBCA6Bu)));
}

// ------------------------------------------------------------- stores
// store(value, key, idx, sr): write an fp32 result in the storage type. The
// stochastic flag only matters for bf16; fp32 is exact and fp16 always rounds
// to nearest even (its 10-bit mantissa is not the target of SR here).
SK_HD void store(float* dst, float v, uint32_t, int64_t, bool) { *dst = v; }
SK_HD void store(bf16_t* dst, float v, uint32_t key, int64_t idx, bool sr) {
  dst->x = sr ? bf16_bits_sr(v, sr_bits(key, idx)) : bf16_bits_rne(v);
}
SK_HD void store(fp16_t* dst, float v, uint32_t, int64_t, bool) { dst->x = fp16_bits_rne(v); }

// ------------------------------------------------------------- the math
SK_HD float sign_of(float x) { return static_cast<float>(x > 0.0f) - static_cast<float>(x < 0.0f); }

// Scalars are derived once per call, in fp32, from fp32 inputs: every executor
// derives them the same way (NOTE: [no contraction]).
struct LionScalars {
  float lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay;
};
SK_HD LionScalars lion_scalars(float lr, float beta1, float beta2, float wd) {
  LionScalars s;
  s.lr = lr;
  s.beta1 = beta1;
  s.one_minus_beta1 = 1.0f - beta1;
  s.beta2 = beta2;
  s.one_minus_beta2 = 1.0f - beta2;
  s.decay = 1.0f - lr * wd;
  return s;
}

// Lion:  c = b1 m + (1-b1) g;  p = p (1 - lr wd) - lr sign(c);  m = b2 m + (1-b2) g.
SK_HD void lion_update(float& p, float& m, float g, const LionScalars& s) {
  const float c = s.beta1 * m + s.one_minus_beta1 * g;
  p = p * s.decay - s.lr * sign_of(c);
  m = s.beta2 * m + s.one_minus_beta2 * g;
}

// Tiger, per tensor and call. t = calls made before this one, k = grad_accum_steps.
struct TigerScalars {
  float b1;        // beta if t % k == 0 else 1
  float coef;      // (1 - beta) / k
  bool update;     // (t + 1) % k == 0
  float wd;        // wd_p (0 for element-wise roles)
  float shrink;    // s of the NaN guard
  float centre;    // c of the NaN guard
};
SK_HD TigerScalars tiger_scalars(int64_t t, int64_t k, float beta, float wd, float shrink, int role) {
  TigerScalars s;
  s.b1 = (t % k == 0) ? beta : 1.0f;
  s.coef = (1.0f - beta) / static_cast<float>(k);
  s.update = ((t + 1) % k) == 0;
  const bool elementwise = role == kRoleElementwise || role == kRoleGain;
  s.wd = elementwise ? 0.0f : wd;
  s.shrink = shrink;
  s.centre = role == kRoleGain ? 1.0f : 0.0f;
  return s;
}

// The effective lr of a tensor (or row): 0.5 lr for element-wise roles, else
// lr * rms with rms = sqrt(sumsq / n) computed in fp32 from an fp32 (or wider,
// then rounded) sum of squares.
SK_HD float tiger_lr(float lr, int role, float rms) {
  return (role == kRoleElementwise || role == kRoleGain) ? 0.5f * lr : lr * rms;
}

// m = b1 m + coef g; on the last micro-step p = p - lr_p (sign(m) + wd_p p).
SK_HD void tiger_update(float& p, float& m, float g, float lr_p, const TigerScalars& s) {
  m = s.b1 * m + s.coef * g;
  if (s.update) p = p - lr_p * (sign_of(m) + s.wd * p);
}

// NaN guard (g of this tensor holds a NaN): m unchanged, p = (p - c) s + c.
SK_HD void tiger_shrink(float& p, const TigerScalars& s) { p = (p - s.centre) * s.shrink + s.centre; }

// Simba: p = p (1 - lr wd); u = |s| > T ? sign(s) : sign(g); p = p - lr u;
//        s = clamp(s + sign(g), -W, W).
struct SimbaScalars {
  float lr, decay;
  int32_t threshold;  // T = int(window_size * threshold), computed by the caller
  int32_t window;     // W
};
SK_HD SimbaScalars simba_scalars(float lr, float wd, int32_t window, int32_t threshold_count) {
  SimbaScalars s;
  s.lr = lr;
  s.decay = 1.0f - lr * wd;
  s.threshold = threshold_count;
  s.window = window;
  return s;
}

SK_HD void simba_update(float& p, int16_t& cnt, float g, const SimbaScalars& s) {
  // Written as selects and min/max, without branches, so the CPU loop vectorizes.
  const int32_t c = cnt;
  const int32_t sg = static_cast<int32_t>(g > 0.0f) - static_cast<int32_t>(g < 0.0f);
  const int32_t sc = static_cast<int32_t>(c > 0) - static_cast<int32_t>(c < 0);
  const bool use_count = (c > s.threshold) | (c < -s.threshold);  // |s| > T
  const float u = static_cast<float>(use_count ? sc : sg);
  p = p * s.decay;
  p = p - s.lr * u;
  int32_t n = c + sg;
  n = n < s.window ? n : s.window;
  n = n > -s.window ? n : -s.window;
  cnt = static_cast<int16_t>(n);
}

// ------------------------------------------------------------- int8 momentum
// NOTE: [int8 momentum] (docs/rules.md, "8-bit momentum"; the reference is
// sign_kernels/_quant.py). The momentum of a tensor of >= 2 dims is stored as int8 codes,
// one per element, and one bf16 scale per block of kQBlock consecutive elements of a row
// (the last dim; a row's last block may be shorter). A block never crosses a row, so FSDP2's
// Shard(0) keeps blocks whole, and a split of the last dim at a multiple of kQBlock too.
// Codes are companded (a square law: small momenta keep relative precision, 4 decades below
// the block's largest with a nonzero code):
//   value(c) = sign(c) * (s * ((c*c) * K))      s = fp32(scale), K = fp32(1/127^2) = 0x38820610
// (each product rounded to fp32, in that order; no division, so a vector unit does it at speed).
// The new momentum of a block is computed for all its elements first (in fp32, as for an
// fp32 momentum), then:
//   absmax = max |m| over the block (NaN ignored);  scale = bf16 of absmax rounded up
//   inv = 1 / s (once per block);  r = |m| * inv;  lo = min(floor(127 * sqrt(r)), 126)
//   vlo = value(lo), vhi = value(lo + 1);  |c| = lo + (u * (vhi - vlo) < |m| - vlo)
//   sign(c) = sign(m);  c = 0 where r is not in [0, 2) (s = 0: an all-zero block; an infinity
//   in the block zeroes it; NaN m -> 0)
// Rounding up with probability (|m| - vlo) / (vhi - vlo) (the test is written without the
// division) makes the stored value unbiased (E = m, to fp32 rounding): a momentum moving by far
// less than a level per step is kept on average, where round-to-nearest would freeze it.
// u in [0, 1) are the 24 high bits of a function of the value, not of the index:
//   u = (sr_bits(sr_key(seed, step, STREAM_STATE), f32_bits(m)) >> 8) * 2^-24
// so a sharded tensor rounds exactly as the whole one. sqrt, the products and the one division
// per block are IEEE-rounded operations: the same bits on every backend.
constexpr int64_t kQBlock = 64;

// bf16 bits of a >= 0 (not NaN) rounded toward +inf; +inf stays +inf.
SK_HD uint16_t bf16_bits_up(float a) { return static_cast<uint16_t>((f32_bits(a) + 0xFFFFu) >> 16); }

SK_HD float q8_scale(uint16_t scale_bits) { return bits_f32(static_cast<uint32_t>(scale_bits) << 16); }

// |value| of code magnitude c (0..127) under block scale s.
SK_HD float q8_level(float s, float c) { return s * ((c * c) * bits_f32(0x38820610u)); }

SK_HD float q8_dequant(int8_t code, float s) {
  const float c = static_cast<float>(code);
  const float v = q8_level(s, c < 0.0f ? -c : c);
  return c < 0.0f ? -v : v;
}

// sr_bits of a 32-bit index (the high half is 0): what q8_code hashes, in 32-bit lanes.
SK_HD uint32_t sr_bits32(uint32_t key, uint32_t idx) { return mix32(key ^ mix32(idx)); }

// The code of m under block scale s, whose reciprocal inv = 1 / s the caller computed once.
SK_HD int8_t q8_code(float m, float s, float inv, uint32_t key) {
  const float a = m < 0.0f ? -m : m;
  const float r = a * inv;
  const bool ok = r >= 0.0f && r < 2.0f;  // false for s = 0 (0 * inf), s = inf with a = inf, NaN
  float lo = floorf(127.0f * sqrtf(ok ? r : 0.0f));
  lo = lo > 126.0f ? 126.0f : lo;
  const float vlo = q8_level(s, lo);
  const float u = static_cast<float>(sr_bits32(key, f32_bits(m)) >> 8) * 5.9604644775390625e-8f;  // 2^-24
  const float c = lo + (u * (q8_level(s, lo + 1.0f) - vlo) < a - vlo ? 1.0f : 0.0f);
  const float signed_c = m < 0.0f ? -c : c;
  return static_cast<int8_t>(ok ? signed_c : 0.0f);
}

// ------------------------------------------------------------- the correction byte
// NOTE: [correction byte] (docs/rules.md, "Correction byte"). A 16-bit param θ16 (bf16 or
// fp16) with error_correction keeps an int8 ρ per element; the weight the optimizer updates is
//   θ^ = θ16 + ρ · u(θ16),   u(v) = ulp(v) / 256   (a power of two; |ρ| <= 127: within half an ulp)
// exact in fp32 (bf16: 8 + 8 significant bits, fp16: 11 + 8). After the update θ^':
//   θ16' = round-to-nearest-even(θ^'),  ρ' = clamp(rint((θ^' - θ16') / u(θ16')), -127, 127)
// (the difference is exact; dividing by a power of two is exact). An infinite or NaN θ16'
// gets ρ' = 0. u of a zero or subnormal θ16 is that of the smallest normal binade.
SK_HD float ec_unit(bf16_t v) {
  int32_t e = static_cast<int32_t>((v.x >> 7) & 0xFFu);
  if (e == 0xFF) return 0.0f;
  e = e < 1 ? 1 : e;
  const int32_t p = e - 127 - 15;  // ulp 2^(e-127-7), / 256; in [-141, 112]
  return p >= -126 ? bits_f32(static_cast<uint32_t>(p + 127) << 23) : bits_f32(1u << (p + 149));
}
SK_HD float ec_unit(fp16_t v) {
  int32_t e = static_cast<int32_t>((v.x >> 10) & 0x1Fu);
  if (e == 0x1F) return 0.0f;
  e = e < 1 ? 1 : e;
  return bits_f32(static_cast<uint32_t>(e - 15 - 18 + 127) << 23);  // ulp 2^(e-15-10), / 256
}

template <class P>
SK_HD float ec_decode(P v, int8_t rho) { return to_f32(v) + static_cast<float>(rho) * ec_unit(v); }

template <class P>
SK_HD int8_t ec_residual(P v, float hat) {
  const float u = ec_unit(v);
  if (!(u > 0.0f)) return 0;
  const float r = rintf((hat - to_f32(v)) / u);
  if (!(r == r)) return 0;
  return static_cast<int8_t>(r < -127.0f ? -127.0f : (r > 127.0f ? 127.0f : r));
}

}  // namespace sign_kernels
