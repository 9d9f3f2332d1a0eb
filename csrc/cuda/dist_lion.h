// dist_lion.h -- framework-free launch API of Distributed Lion's two fused passes on CUDA
// (math and wire layout: csrc/core/dist_lion_math.h). Host arrays of device pointers; every
// function enqueues on `stream`, never synchronises, and returns the launch error or
// cudaErrorInvalidValue for what it does not take. Device scalars (grad_scale, found_inf,
// lr_ptr) are read by the kernels: no host synchronisation.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/launch.h"

namespace sign_kernels {
namespace cuda {

// The descriptors are csrc/core/descriptor.h's; the pointers they hold and the scalar
// pointers are device memory (NOTE: [executor memory]).
using sign_kernels::DistApplyArgs;
using sign_kernels::DistApplyList;
using sign_kernels::DistPackArgs;
using sign_kernels::DistPackList;

// Pass (a): read g, m; write m and the 2-bit sign fields of d.
cudaError_t dist_lion_pack(const DistPackList& t, const DistPackArgs& a, cudaStream_t stream);

// Pass (b): read the voted fields and p; write p.
cudaError_t dist_lion_apply(const DistApplyList& t, const DistApplyArgs& a, cudaStream_t stream);

}  // namespace cuda
}  // namespace sign_kernels
