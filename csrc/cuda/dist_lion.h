// dist_lion.h -- framework-free launch API of Distributed Lion's two fused passes on CUDA
// (math and wire layout: csrc/core/dist_lion_math.h). Host arrays of device pointers; every
// function enqueues on `stream`, never synchronises, and returns the launch error or
// cudaErrorInvalidValue for what it does not take. Device scalars (grad_scale, found_inf,
// lr_t) are read by the kernels: no host synchronisation.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/launch.h"

namespace sign_kernels {
namespace cuda {

struct DistPackArgs {
  float beta1 = 0.9f, beta2 = 0.99f;
  const float* grad_scale = nullptr;  // device, optional: g is divided by it
  const float* found_inf = nullptr;   // device, optional: non-zero keeps m and writes 0 fields
};

cudaError_t dist_lion_pack(int64_t count, const void* const* grads, void* const* exp_avgs, uint8_t* const* packed,
                           const int64_t* numels, DType grad_dtype, DType state_dtype, const DistPackArgs& a,
                           cudaStream_t stream);

struct DistApplyArgs {
  int bits = 2;          // 2, 4 or 8
  float divisor = 1.0f;  // 1 (majority) or N (average)
  float lr = 0.0f;
  const float* lr_t = nullptr;       // device, optional: used instead of lr
  float weight_decay = 0.0f;
  const float* found_inf = nullptr;  // device, optional: non-zero changes nothing
};

cudaError_t dist_lion_apply(int64_t count, void* const* params, const uint8_t* const* votes, const int64_t* numels,
                            DType param_dtype, const DistApplyArgs& a, cudaStream_t stream);

}  // namespace cuda
}  // namespace sign_kernels
