// dist_lion.h -- the framework-free CPU executor of Distributed Lion's two fused passes
// (csrc/core/dist_lion_math.h has the math and NOTE: [wire fields]).
#pragma once

#include <cstdint>

#include "sign_cpu.h"

namespace sign_kernels {
namespace cpu {

// Pass (a): read g, m; write m and the 2-bit sign fields of d. Tensor i has numels[i]
// elements; packed[i] holds ceil(numels[i] / 4) bytes.
struct DistPackList {
  int64_t count = 0;
  const void* const* grads = nullptr;
  void* const* exp_avgs = nullptr;
  uint8_t* const* packed = nullptr;
  const int64_t* numels = nullptr;
  DType grad_dtype = DType::kFloat32;
  DType state_dtype = DType::kFloat32;
};

struct DistPackArgs {
  float beta1 = 0.9f, beta2 = 0.99f;
  bool has_grad_scale = false;
  float grad_scale = 1.0f;
  bool skip = false;  // GradScaler found an inf: m is kept and every field written 0
};

// Pass (b): read the voted fields and p; write p. votes[i] holds ceil(numels[i] * bits / 8) bytes.
struct DistApplyList {
  int64_t count = 0;
  void* const* params = nullptr;
  const uint8_t* const* votes = nullptr;
  const int64_t* numels = nullptr;
  DType param_dtype = DType::kFloat32;
};

struct DistApplyArgs {
  int bits = 2;           // 2, 4 or 8
  float divisor = 1.0f;   // 1 (majority) or N (average)
  float lr = 0.0f, weight_decay = 0.0f;
};

// Each returns nullptr on success or a static message (nothing is written then).
const char* dist_lion_pack(const DistPackList& t, const DistPackArgs& a);
const char* dist_lion_apply(const DistApplyList& t, const DistApplyArgs& a);

// The vote on one slice: `received` holds `ranks` rows of `slice_bytes` bytes of 2-bit
// fields (row k from rank k); `out` gets, per field, the sign of the sum (majority: 2-bit
// fields, slice_bytes bytes) or the sum (out_bits = 4 or 8: slice_bytes * out_bits / 2 bytes).
const char* dist_lion_vote(const uint8_t* received, int64_t ranks, int64_t slice_bytes, uint8_t* out, int out_bits,
                           bool majority);

}  // namespace cpu
}  // namespace sign_kernels
