// descriptor.h -- the one description of a call that every executor takes.
//
// The CPU executor (csrc/cpu/sign_cpu.h, dist_lion.h) and the CUDA executor
// (csrc/cuda/launch.h, dist_lion.h) update the same tensor lists with the same
// arguments; only where the memory lives differs. So they take the same structs, declared
// here once, and the torch bindings fill the lists and the op-specific arguments with shared
// code (csrc/torch/common.h, dist_lion_checks.h); each binding fills the scalar pointers
// for its own executor's memory. Adding a
// dtype, an argument or an algorithm is a change to this file, the math
// (csrc/core/sign_math.h) and each executor's loop, not to two parallel sets of structs.
//
// NOTE: [executor memory]
// Two kinds of pointer appear below. The arrays a struct points at directly (the pointer
// tables, numels, seeds, roles, row_sizes, the stats and sumsq_out_at indices) are host arrays, read while
// the executor's call runs. What those tables hold, and the pointers marked "executor
// memory" (steps[i], lr_ptr, grad_scale, found_inf, stats, sumsq_out, workspace), live
// where the executor runs: host memory for the CPU executor, device memory for the CUDA one,
// which reads them in its kernels (no host synchronisation, CUDA-graph friendly). A null
// scalar pointer means "not given".
//
// Plain C++17, no framework, no CUDA headers: a JAX FFI binding can fill these as well.
#pragma once

#include <cstddef>
#include <cstdint>

namespace sign_kernels {

enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kInt16 = 3, kInt8 = 4 };

enum class Op : int32_t { kLion = 0, kTiger = 1, kSimba = 2 };

// The tensors of one Lion/Tiger/Simba call: `count` tensors per list; tensor i of every
// list has numels[i] contiguous elements. All params share param_dtype, all grads
// grad_dtype, all states state_dtype (the optimizers group them so).
struct TensorList {
  int64_t count = 0;
  void* const* params = nullptr;
  const void* const* grads = nullptr;
  void* const* states = nullptr;          // exp_avg (Lion, Tiger) or sign_counts (Simba, int16)
  const int64_t* numels = nullptr;
  const int64_t* const* steps = nullptr;  // executor memory: tensor i's step t before this call (read only)
  const int64_t* seeds = nullptr;         // stochastic-rounding seed of tensor i (the low 32 bits are used)
  DType param_dtype = DType::kFloat32;
  DType grad_dtype = DType::kFloat32;
  DType state_dtype = DType::kFloat32;
  // int8 momentum (state_dtype kInt8; NOTE: [int8 momentum] in sign_math.h): tensor i's bf16
  // block scales, rows x ceil(row_sizes[i] / kQBlock); null otherwise.
  void* const* scales = nullptr;
  const int64_t* row_sizes = nullptr;  // last-dim size of each tensor (set with scales)
  // The correction byte (NOTE: [correction byte]): tensor i's int8 residuals, for bf16/fp16
  // params; null: none.
  void* const* residuals = nullptr;
};

// Shared by the three ops. The scalar pointers are executor memory (fp32), null when not given.
struct Common {
  float lr = 0.0f;                    // used when lr_ptr is null
  const float* lr_ptr = nullptr;      // the learning rate as a tensor (a scheduler's lr_t)
  const float* grad_scale = nullptr;  // g is divided by *grad_scale (GradScaler)
  const float* found_inf = nullptr;   // non-zero (NaN too): the call changes nothing, but Tiger's sums out
  bool stochastic_rounding = false;   // for bf16 params and bf16 state
  // The clipping coefficient (NOTE: [clipping inside the step] in sign_kernels/_ops.py): the
  // gradient used is (g / *grad_scale) * *clip, each operation rounded to fp32 in that order.
  const float* clip = nullptr;
};

struct LionArgs {
  Common common;
  float beta1 = 0.9f, beta2 = 0.99f, weight_decay = 0.0f;
};

struct TigerArgs {
  Common common;
  float beta = 0.965f, weight_decay = 0.01f, shrink_ratio = 0.99f;
  int64_t grad_accum_steps = 1;
  const int64_t* roles = nullptr;      // TigerRole of each tensor (sign_math.h)
  const int64_t* row_sizes = nullptr;  // last-dim size of each tensor (1 for 0-dim): embedding rows
  // Whole-tensor facts given from outside (sharded tensors; NOTE: [Tiger statistics input] in
  // sign_kernels/_ops.py). stats (executor memory, fp64) null: every tensor computes its own.
  // Else, per tensor, an index into stats or -1 (computed here): stats_nan -> NaN count
  // (non-zero fires the guard), stats_sumsq -> sum of squares of theta (matrix: one;
  // embedding: one per row), with stats_n the n of RMS = sqrt(sum / n).
  const double* stats = nullptr;
  const int64_t* stats_nan = nullptr;
  const int64_t* stats_sumsq = nullptr;
  const int64_t* stats_n = nullptr;
  // Sums of squares of theta as the call leaves it (NOTE: [Tiger sums of squares out] in
  // sign_kernels/_ops.py). sumsq_out (executor memory, fp64; may be stats itself) null: none
  // wanted. Else, per tensor, the index of its sums (matrix: one; embedding: one per row) or
  // -1; ignored for the element-wise roles. Right even when found_inf is set (recomputed,
  // unless they are the given sums in place; an empty tensor's entries are left as they are).
  double* sumsq_out = nullptr;
  const int64_t* sumsq_out_at = nullptr;
  // CUDA only: device scratch of cuda::tiger_workspace_bytes(...) bytes, any contents,
  // 16-byte aligned, where the pre-pass leaves its per-tensor flags and sums. The CPU
  // executor keeps its scratch on the host and ignores these.
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

struct SimbaArgs {
  Common common;
  int32_t window_size = 128, threshold_count = 12;
  float weight_decay = 0.0f;
};

// Distributed Lion's local pass (sign_kernels/distributed): packs each worker's sign vote
// d_i into 2-bit fields and advances its momentum.
struct DistPackList {
  int64_t count = 0;
  const void* const* grads = nullptr;
  void* const* exp_avgs = nullptr;
  uint8_t* const* packed = nullptr;  // ceil(numels[i] / 4) bytes each
  const int64_t* numels = nullptr;
  DType grad_dtype = DType::kFloat32;
  DType state_dtype = DType::kFloat32;
};

struct DistPackArgs {
  float beta1 = 0.9f, beta2 = 0.99f;
  const float* grad_scale = nullptr;  // executor memory: g is divided by it
  const float* found_inf = nullptr;   // executor memory: non-zero keeps m and writes every field 0
  const float* clip = nullptr;        // executor memory: the quotient is then multiplied by it
};

// Distributed Lion's apply pass: every worker applies the aggregate vote V.
struct DistApplyList {
  int64_t count = 0;
  void* const* params = nullptr;
  const uint8_t* const* votes = nullptr;  // `bits`-bit fields: ceil(numels[i] * bits / 8) bytes
  const int64_t* numels = nullptr;
  DType param_dtype = DType::kFloat32;
};

struct DistApplyArgs {
  int32_t bits = 2;                  // 2, 4 or 8
  float divisor = 1.0f;              // 1 (majority) or N (average)
  float lr = 0.0f;                   // used when lr_ptr is null
  const float* lr_ptr = nullptr;     // executor memory
  float weight_decay = 0.0f;
  const float* found_inf = nullptr;  // executor memory: non-zero changes nothing
};

// The norm pass of clipping inside the step (op sumsq_; NOTE: [clipping inside the step] in
// sign_kernels/_ops.py): out[i] = sum over tensor i of (fp32(x) / *scale)^2, each square in
// fp64 from the fp32 quotient, summed in fp64 in an order fixed by numels[i] alone.
struct SumsqList {
  int64_t count = 0;
  const void* const* tensors = nullptr;
  const int64_t* numels = nullptr;
  DType dtype = DType::kFloat32;  // fp32, bf16 or fp16
};

struct SumsqArgs {
  const float* scale = nullptr;  // executor memory, null: no division
  double* out = nullptr;         // executor memory: count fp64 sums
  // CUDA only: device scratch (any contents, 16-byte aligned) for per-chunk partial sums;
  // its size is the CUDA executor's to say (cuda::sumsq_workspace_bytes). The CPU ignores it.
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

}  // namespace sign_kernels
