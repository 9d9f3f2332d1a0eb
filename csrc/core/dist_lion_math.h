// dist_lion_math.h -- the per-element math and the wire format of Distributed Lion
// (SPEC.md "Distributed Lion"), shared by the CPU and CUDA executors. No torch header.
//
// Two fused passes per step:
//   pack:  c = b1 m + (1-b1) g;  d = sign(c);  m = b2 m + (1-b2) g;  write d as a 2-bit field
//   apply: s = the voted field;  V = s / divisor;  p = p (1 - lr wd) - lr V
// The Python reference (sign_kernels/distributed/_wire.py) and the Triton kernels
// (sign_kernels/triton/_dist_lion.py) compute the same fp32 operations in the same order
// (NOTE: [no contraction] in sign_math.h), so every executor writes the same bits.
//
// NOTE: [wire fields]
// A tensor of n elements travels as ceil(n * bits / 8) bytes: element i is the bits-wide
// field at bit offset bits * (i % (8 / bits)) of byte i / (8 / bits), a two's complement
// integer. The pack pass writes d_i in {-1, 0, +1} as a 2-bit field (0 -> 00, +1 -> 01,
// -1 -> 11): three states, so an element no rank moves (d = 0 everywhere) is a 0 on the
// wire and sums to 0 -- a 1-bit sign code cannot keep that rule (sign(0) would become +-1).
// The vote is written with the same layout: majority as a 2-bit field (sign of the sum),
// average as the sum itself in 4 bits (N <= 7 ranks) or 8 bits (N <= 127). Tail fields of
// the last byte are 0.
#pragma once

#include <cstdint>

#include "sign_math.h"

namespace sign_kernels {

// The 2-bit field of d = sign(b1 m + (1-b1) g); m becomes b2 m + (1-b2) g.
// Same operations as lion_update (sign_math.h), without the parameter.
SK_HD uint32_t dist_lion_pack_one(float& m, float g, const LionScalars& s) {
  const float c = s.beta1 * m + s.one_minus_beta1 * g;
  m = s.beta2 * m + s.one_minus_beta2 * g;
  const int32_t d = static_cast<int32_t>(c > 0.0f) - static_cast<int32_t>(c < 0.0f);  // NOTE: [sign]
  return static_cast<uint32_t>(d) & 3u;
}

// The signed value of the field of element i in a packed byte (bits = 2, 4 or 8).
SK_HD int32_t dist_lion_field(uint32_t byte, int64_t i, int bits) {
  const int per_byte = 8 / bits;
  const uint32_t mask = (1u << bits) - 1u;
  const uint32_t f = (byte >> (bits * static_cast<int>(i % per_byte))) & mask;
  const uint32_t half = 1u << (bits - 1);
  return static_cast<int32_t>(f) - static_cast<int32_t>((f & half) << 1);  // sign-extend
}

// p = p (1 - lr wd) - lr (s / divisor). For s / divisor in {-1, 0, 1} this is Lion's
// `p * decay - lr * sign(c)` exactly (lion_update), so identical gradients give Lion.
SK_HD float dist_lion_apply_one(float p, int32_t s, float lr, float decay, float divisor) {
  const float v = static_cast<float>(s) / divisor;
  return p * decay - lr * v;
}

}  // namespace sign_kernels
