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

namespace sign_kernels {
namespace cuda {

enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kInt16 = 3 };

enum class Op : int32_t { kLion = 0, kTiger = 1, kSimba = 2 };

// The tensors of one call: `count` tensors per list, all on one device; tensor i of every
// list has numels[i] contiguous elements. All params share param_dtype, etc. The arrays
// are host arrays; the pointers they hold are device pointers.
struct TensorList {
  int64_t count = 0;
  void* const* params = nullptr;
  const void* const* grads = nullptr;
  void* const* states = nullptr;          // exp_avg (Lion, Tiger) or sign_counts (Simba, int16)
  const int64_t* numels = nullptr;
  const int64_t* const* steps = nullptr;  // device pointer to tensor i's step t (read, never written)
  const int64_t* seeds = nullptr;         // stochastic-rounding seed of tensor i (low 32 bits used)
  DType param_dtype = DType::kFloat32;
  DType grad_dtype = DType::kFloat32;
  DType state_dtype = DType::kFloat32;
};

// Shared by the three ops. Device scalars are read by the kernels (no host sync, CUDA
// graph friendly); a null pointer means "not given".
struct Common {
  float lr = 0.0f;                    // used when lr_ptr is null
  const float* lr_ptr = nullptr;      // device fp32 learning rate
  const float* grad_scale = nullptr;  // device fp32: g = g / *grad_scale
  const float* found_inf = nullptr;   // device fp32: non-zero -> the call changes nothing
  bool stochastic_rounding = false;   // SR for bf16 params and bf16 state
};

struct LionArgs {
  Common common;
  float beta1 = 0.9f, beta2 = 0.99f, weight_decay = 0.0f;
};

struct TigerArgs {
  Common common;
  float beta = 0.965f, weight_decay = 0.01f, shrink_ratio = 0.99f;
  int64_t grad_accum_steps = 1;
  const int64_t* roles = nullptr;      // host: TigerRole of each tensor (sign_math.h)
  const int64_t* row_sizes = nullptr;  // host: last-dim size of each tensor (1 for 0-dim)
  // Device scratch of tiger_workspace_bytes(...) bytes, any contents, 16-byte aligned:
  // the pre-pass writes the per-tensor NaN flags and sums of squares there.
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  // Whole-tensor facts given from outside (sharded tensors; NOTE: [Tiger statistics input] in
  // sign_kernels/_ops.py). stats: device fp64 array, read by the kernels (no host sync); null
  // means every tensor computes its own. Host arrays, per tensor: index into stats or -1
  // (computed here): stats_nan -> NaN count (non-zero fires the guard), stats_sumsq -> sum of
  // squares of θ (matrix: one; embedding: one per row); stats_n -> n of RMS = sqrt(sum / n).
  const double* stats = nullptr;
  const int64_t* stats_nan = nullptr;
  const int64_t* stats_sumsq = nullptr;
  const int64_t* stats_n = nullptr;
  // Sums of squares of θ as the call leaves it (NOTE: [Tiger sums of squares out] in
  // sign_kernels/_ops.py; NOTE: [CUDA sums of squares out] in sign_functors.cuh): sumsq_out a
  // device fp64 array (may be stats itself), null when none are wanted; sumsq_out_at a host
  // array, per tensor: index of its sums (matrix: one; embedding: one per row) or -1.
  double* sumsq_out = nullptr;
  const int64_t* sumsq_out_at = nullptr;
};

struct SimbaArgs {
  Common common;
  int32_t window_size = 128, threshold_count = 12;
  float weight_decay = 0.0f;
};

// Whether the kernels take this dtype combination: params fp32/bf16/fp16; grads the
// param dtype or fp32; state the param dtype, fp32 or bf16 (Lion, Tiger) or int16 (Simba).
bool dtypes_supported(Op op, DType param, DType grad, DType state);

cudaError_t lion(const TensorList& t, const LionArgs& a, cudaStream_t stream);
cudaError_t simba(const TensorList& t, const SimbaArgs& a, cudaStream_t stream);

// Tiger runs a pre-pass (NaN flags of g, sums of squares of θ), a per-tensor finalisation
// and the update, all on `stream`. workspace_bytes depends on the shapes and roles only.
size_t tiger_workspace_bytes(const TensorList& t, const TigerArgs& a);
cudaError_t tiger(const TensorList& t, const TigerArgs& a, cudaStream_t stream);

// Human-readable build facts ("nvcc 13.0, sm_80 sm_90a"), for diagnostics.
const char* build_info();

}  // namespace cuda
}  // namespace sign_kernels
