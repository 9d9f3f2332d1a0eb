// sign_cpu.h -- the framework-free CPU executor of Lion, Tiger and Simba.
//
// One call updates a list of tensors that share dtypes (the optimizer groups them):
// the work is cut into chunks of whole tensors and spread over OpenMP threads, and each
// chunk is one vectorizable loop that reads every buffer once and writes it once.
// The math is csrc/core/sign_math.h.
#pragma once

#include <cstdint>

namespace sign_kernels {
namespace cpu {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kInt16 = 3 };

// The tensors of one call. Pointer arrays have `count` entries; tensor i has
// numels[i] contiguous elements. `steps[i]` is its step count t before this call.
struct TensorList {
  int64_t count = 0;
  void* const* params = nullptr;
  const void* const* grads = nullptr;
  void* const* states = nullptr;  // exp_avg (Lion, Tiger) or sign_counts (Simba)
  const int64_t* numels = nullptr;
  const int64_t* steps = nullptr;
  const uint32_t* seeds = nullptr;  // stochastic-rounding seed of each tensor
  DType param_dtype = DType::kFloat32;
  DType grad_dtype = DType::kFloat32;
  DType state_dtype = DType::kFloat32;
};

// Shared by the three ops: gradient unscaling and stochastic rounding.
struct Common {
  float lr = 0.0f;
  bool has_grad_scale = false;
  float grad_scale = 1.0f;  // g is divided by it when has_grad_scale
  bool stochastic_rounding = false;
};

struct LionArgs {
  Common common;
  float beta1 = 0.9f, beta2 = 0.99f, weight_decay = 0.0f;
};

struct TigerArgs {
  Common common;
  float beta = 0.965f, weight_decay = 0.01f, shrink_ratio = 0.99f;
  int64_t grad_accum_steps = 1;
  const int32_t* roles = nullptr;      // TigerRole of each tensor
  const int64_t* row_sizes = nullptr;  // last-dim size of each tensor (embedding rows)
  // Whole-tensor facts given from outside (sharded tensors; NOTE: [Tiger statistics input]
  // in sign_kernels/_ops.py). Null: every tensor computes its own. Else, per tensor, an
  // index into `stats` or -1 (computed here): stats_nan -> NaN count (non-zero fires the
  // guard), stats_sumsq -> sum of squares of theta (matrix: one; embedding: one per row),
  // with stats_n the n of RMS = sqrt(sum / n).
  const double* stats = nullptr;
  const int64_t* stats_nan = nullptr;
  const int64_t* stats_sumsq = nullptr;
  const int64_t* stats_n = nullptr;
  // Sums of squares of theta as the call leaves it (NOTE: [Tiger sums of squares out] in
  // sign_kernels/_ops.py). Null: none wanted. Else, per tensor, an index into `sumsq_out`
  // (matrix: one entry; embedding: one per row) or -1; ignored for the element-wise roles.
  double* sumsq_out = nullptr;
  const int64_t* sumsq_out_at = nullptr;
  // GradScaler found an inf: nothing is updated; only sumsq_out is filled where it must be.
  bool skip = false;
};

struct SimbaArgs {
  Common common;
  int32_t window_size = 128, threshold_count = 12;
  float weight_decay = 0.0f;
};

// Each returns nullptr on success, or a static message naming the unsupported
// dtype combination (nothing is written then).
const char* lion_step(const TensorList& t, const LionArgs& a);
const char* tiger_step(const TensorList& t, const TigerArgs& a);
const char* simba_step(const TensorList& t, const SimbaArgs& a);

// Parallel loops. By default the core uses its own OpenMP threads; a host framework
// can hand in its thread pool instead (the torch binding passes at::parallel_for, so
// torch.set_num_threads governs the kernels and only one OpenMP runtime is active).
// The hook must call body(ctx, b, e) over disjoint [b, e) covering [0, n).
using ParallelFor = void (*)(int64_t n, void* ctx, void (*body)(void* ctx, int64_t begin, int64_t end));
void set_parallel_for(ParallelFor fn);

// Tiger's pre-pass and update pass run window by window (NOTE: [Tiger windows] in
// sign_cpu.cpp): about this many elements per window (default 1 << 20). Results do not
// depend on it; tests set small windows to cut their lists in many places. Returns the
// previous value; n < 1 leaves it unchanged.
int64_t set_tiger_window(int64_t n);

// The instruction set the kernels run with: "avx2" where the CPU has it, else
// "baseline" (the compiler's default target). SIGN_KERNELS_CPU_ISA=baseline forces the
// baseline (tests run both).
const char* isa();

namespace detail {
extern ParallelFor g_parallel_for;
}  // namespace detail

// Elements per work chunk (a multiple of 64 so chunk starts stay 256-byte aligned).
constexpr int64_t kChunkElems = 1 << 16;

}  // namespace cpu
}  // namespace sign_kernels
