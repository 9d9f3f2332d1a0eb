// sign_cpu.h -- the framework-free CPU executor of Lion, Tiger and Simba.
//
// One call updates a list of tensors that share dtypes (the optimizer groups them):
// the work is cut into chunks of whole tensors and spread over OpenMP threads, and each
// chunk is one vectorizable loop that reads every buffer once and writes it once.
// The math is csrc/core/sign_math.h.
#pragma once

#include <cstdint>

#include "../core/descriptor.h"

namespace sign_kernels {
namespace cpu {

// The executor takes the one descriptor of csrc/core/descriptor.h; everything it points
// at is host memory (NOTE: [executor memory]).
using sign_kernels::Common;
using sign_kernels::DType;
using sign_kernels::LionArgs;
using sign_kernels::SimbaArgs;
using sign_kernels::SumsqArgs;
using sign_kernels::SumsqList;
using sign_kernels::TensorList;
using sign_kernels::TigerArgs;

// Each returns nullptr on success, or a static message naming the unsupported
// dtype combination (nothing is written then). A set found_inf makes the call change
// nothing (Tiger still fills its sums out).
const char* lion_step(const TensorList& t, const LionArgs& a);
const char* tiger_step(const TensorList& t, const TigerArgs& a);
const char* simba_step(const TensorList& t, const SimbaArgs& a);
// The norm pass of clipping inside the step (op sumsq_; NOTE: [norm pass order]).
const char* sumsq_step(const SumsqList& t, const SumsqArgs& a);

// Parallel loops. By default the core uses its own OpenMP threads; a host framework
// can hand in its thread pool instead (the torch binding passes torch::stable::parallel_for, so
// torch.set_num_threads governs the kernels and only one OpenMP runtime is active).
// The hook must call body(ctx, b, e) over disjoint [b, e) covering [0, n).
using ParallelFor = void (*)(int64_t n, void* ctx, void (*body)(void* ctx, int64_t begin, int64_t end));
void set_parallel_for(ParallelFor fn);

// Tiger's pre-pass and update pass run window by window (NOTE: [Tiger windows] in
// sign_cpu.cpp): about this many elements per window (default 1 << 20). Results do not
// depend on it; tests set small windows to cut their lists in many places. Returns the
// previous value; n < 1 leaves it unchanged.
int64_t set_tiger_window(int64_t n);

// The instruction set the kernels run with: "avx512" (F, BW, VL, DQ and FMA) or "avx2"
// (with FMA) where the CPU has it, else
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
