// launch.h -- the framework-free launch API of the CUDA kernels.
//
// Plain C++17 and the CUDA runtime API, no torch: the torch binding
// (csrc/torch/cuda_ops.cu) turns tensor lists into these descriptors, checks them, and
// calls one function per op; a JAX FFI binding could do the same. Every function
// enqueues its kernels on `stream` and returns without synchronising: cudaSuccess, the
// launch error, or cudaErrorInvalidValue for an argument the kernels do not take (then
// nothing was enqueued; the binding is expected to have refused it with a message).
//
// The semantics are docs/rules.md's, element for element; the math is csrc/core/sign_math.h.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../core/descriptor.h"

namespace sign_kernels {
namespace cuda {

// The executor takes the one descriptor of csrc/core/descriptor.h (NOTE: [executor
// memory]): the pointer tables are host arrays, the pointers they hold and the scalar
// pointers (steps[i], lr_ptr, grad_scale, found_inf, clip, stats, sumsq_out, workspace;
// sumsq's scale and out) are device pointers, read by the kernels.
using sign_kernels::Common;
using sign_kernels::DType;
using sign_kernels::LionArgs;
using sign_kernels::Op;
using sign_kernels::SimbaArgs;
using sign_kernels::SumsqArgs;
using sign_kernels::SumsqList;
using sign_kernels::TensorList;
using sign_kernels::TigerArgs;

// Whether the kernels take this dtype combination: params fp32/bf16/fp16; grads the
// param dtype or fp32; state the param dtype, fp32 or bf16 (Lion, Tiger) or int16 (Simba);
// int8 (Lion, Tiger: 8-bit momentum, with TensorList::scales and row_sizes).
bool dtypes_supported(Op op, DType param, DType grad, DType state);

// Lion and Tiger take int8 momentum (TensorList::scales, row_sizes) and the correction byte
// (TensorList::residuals, bf16/fp16 params) as the CPU executor does (NOTE: [CUDA row blocks]
// in compressed.cuh); the lists are checked as the CPU executor checks them.
cudaError_t lion(const TensorList& t, const LionArgs& a, cudaStream_t stream);
cudaError_t simba(const TensorList& t, const SimbaArgs& a, cudaStream_t stream);

// Tiger runs a pre-pass (NaN flags of g, sums of squares of θ), a per-tensor finalisation
// and the update, all on `stream`. workspace_bytes depends on the shapes and roles only.
size_t tiger_workspace_bytes(const TensorList& t, const TigerArgs& a);
cudaError_t tiger(const TensorList& t, const TigerArgs& a, cudaStream_t stream);

// The norm pass of clipping inside the step (op sumsq_; NOTE: [CUDA sums of squares for
// clipping] in sumsq.cu): a per-chunk kernel writes partial sums to the workspace, a
// per-tensor kernel sums them into a.out. workspace_bytes depends on the numels only (0: a
// list the kernels do not take).
size_t sumsq_workspace_bytes(const SumsqList& t);
cudaError_t sumsq(const SumsqList& t, const SumsqArgs& a, cudaStream_t stream);

// Human-readable build facts ("nvcc 13.0, sm_80 sm_90a"), for diagnostics.
const char* build_info();

}  // namespace cuda
}  // namespace sign_kernels
