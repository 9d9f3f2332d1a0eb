// dist_lion.h -- the framework-free CPU executor of Distributed Lion's two fused passes
// (csrc/core/dist_lion_math.h has the math and NOTE: [wire fields]).
#pragma once

#include <cstdint>

#include "sign_cpu.h"

namespace sign_kernels {
namespace cpu {

// Pass (a): read g, m; write m and the 2-bit sign fields of d (packed[i]: ceil(numels[i] / 4)
// bytes). Pass (b): apply the aggregate vote. The descriptors are csrc/core/descriptor.h's;
// the scalars they point at are host memory here (NOTE: [executor memory]).
using sign_kernels::DistApplyArgs;
using sign_kernels::DistApplyList;
using sign_kernels::DistPackArgs;
using sign_kernels::DistPackList;

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
