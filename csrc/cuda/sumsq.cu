// sumsq.cu -- the norm pass of clipping inside the step (op sumsq_): per tensor, the fp64 sum
// of the squares of fp32(x) / scale. It reads each gradient once; nothing is written but one
// fp64 partial per 64K elements and one total per tensor.
//
// NOTE: [CUDA sums of squares for clipping]
// The order of each sum is a function of the tensor's numel alone (NOTE: [clipping inside the
// step] in sign_kernels/_ops.py), so a tensor gives the same bits in any call, whatever its
// companions in the list, its address or its alignment:
//  1. partials: tensor i is cut into kChunkElems-element chunks from its first element, one
//     kBlockThreads-thread block per chunk. Thread k owns the packs of kILP elements that
//     start at k * kILP + u * kBlockThreads * kILP (u = 0, 1, ...) -- the contiguous layout of
//     thread_sumsq (sign_functors.cuh) -- and adds their squares to one fp64 accumulator in
//     element order; block_sum's fixed tree then adds the threads. The packs are read with
//     16-byte vector loads where the tensor is 16-byte aligned (chunks start 64K elements
//     apart, so every chunk of an aligned tensor is) and with scalar loads in the same
//     layout where it is not: the same values in the same order. Each partial goes to its
//     chunk's own workspace slot (the slots of tensor i follow those of tensor i - 1).
//  2. totals: one block per tensor adds its slots with sum_slots (thread k: slots k,
//     k + kBlockThreads, ... in order, then block_sum) and writes out[i]. An empty tensor
//     has no slot: its total is 0.
// How many launches a call takes (a table holds a bounded number of tensors, NOTE: [chunk
// table in kernel arguments]) changes which block runs a chunk, never the chunk, its slot or
// its reduction. No atomics, no host synchronisation, tables passed as kernel arguments and
// a workspace from the caller (the binding takes it from the caching allocator on the
// stream): CUDA-graph capturable.
//
// Each square is taken in fp64 from the fp32 quotient, which is exact (a 24-bit significand
// squared fits in 53 bits): so fma(q, q, acc) rounds exactly as acc + q * q does, with one
// instruction instead of two, and the bits depend on the summation order alone. NaN
// propagates, +inf stays +inf (no square is -inf, so no inf - inf), and a sum of finite
// squares cannot overflow fp64 (2^33 squares below 2^256 each).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "cuda/dispatch.cuh"

namespace sign_kernels {
namespace cuda {
namespace {

struct SumsqMeta {
  int64_t slot_base;  // first workspace slot of the tensor
};
using PartialTable = TensorTable<1, SumsqMeta>;

// Totals of (2): tensors first, first + 1, ... of the call, block b -> tensor first + b, whose
// partials are the slots [slot[b], slot[b + 1]).
constexpr int kTotalsPerLaunch = static_cast<int>((kArgBytes - 64) / sizeof(int64_t)) - 3;
struct TotalsTable {
  int64_t first;
  int64_t slot[kTotalsPerLaunch + 1];
  int32_t count;
};
static_assert(sizeof(TotalsTable) + 2 * sizeof(void*) <= kArgBytes, "kernel arguments exceed the parameter limit");

// The square of element x, in fp64 from the fp32 quotient, added to acc (see the NOTE: the
// fused multiply-add is exact here).
template <bool kScaled, typename T>
__device__ __forceinline__ double add_square(double acc, T x, float scale) {
  const float q = kScaled ? __fdiv_rn(to_f32(x), scale) : to_f32(x);
  const double v = static_cast<double>(q);
  return __fma_rn(v, v, acc);
}

// This thread's share of chunk c in the layout of NOTE: [CUDA sums of squares for clipping].
// kUnroll packs are loaded before any is summed (64 bytes in flight per thread whatever the
// dtype, so two blocks per SM keep enough loads outstanding to run at memory bandwidth); the
// summation order is still pack by pack, element by element.
template <bool kScaled, typename T>
__device__ __forceinline__ double chunk_thread_sumsq(const T* x, const Chunk& c, float scale) {
  constexpr int kUnroll = sizeof(T) == 2 ? 4 : 2;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * kILP;
  const bool aligned = aligned16(x + c.begin);
  double acc = 0.0;
  for (int64_t base = c.begin + static_cast<int64_t>(threadIdx.x) * kILP; base < c.end; base += kUnroll * stride) {
    Pack<T> pk[kUnroll];
    if (aligned && base + (kUnroll - 1) * stride + kILP <= c.end) {  // every pack full and aligned
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        PackSlot s;
        s.first = base + u * stride;
        s.stride = 1;
        s.end = c.end;
        s.vector = true;
        load_pack(pk[u], x, s);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int j = 0; j < kILP; ++j) acc = add_square<kScaled>(acc, pk[u].v[j], scale);
    } else {  // the chunk's tail, or a misaligned tensor: the same elements in the same order
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        PackSlot s;
        s.first = base + u * stride;
        s.stride = 1;
        s.end = c.end;
        s.vector = aligned && s.first + kILP <= c.end;
        if (s.first < c.end) load_pack(pk[u], x, s);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int j = 0; j < kILP; ++j)  // lanes past the end add nothing (0 / 0 would be NaN)
          if (base + u * stride + j < c.end) acc = add_square<kScaled>(acc, pk[u].v[j], scale);
    }
  }
  return acc;
}

// (1): one block per chunk, its partial to its slot.
template <typename T>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM)
    sumsq_partials_kernel(const SK_GRID_CONSTANT PartialTable tl, const float* scale, double* partial) {
  const Chunk c = find_chunk(tl);
  const T* x = static_cast<const T*>(tl.ptrs[0][c.tensor]);
  // The branch is uniform over the grid: one instantiation reads no scale and divides by nothing.
  const double acc = scale != nullptr ? chunk_thread_sumsq<true>(x, c, *scale) : chunk_thread_sumsq<false>(x, c, 1.0f);
  const double sum = block_sum(acc);
  if (threadIdx.x == 0) partial[tl.meta[c.tensor].slot_base + c.index] = sum;
}

// (2): one block per tensor, its slots in slot order (an empty tensor has none: 0).
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM)
    sumsq_totals_kernel(const SK_GRID_CONSTANT TotalsTable t, const double* partial, double* out) {
  const int b = static_cast<int>(blockIdx.x);
  const int64_t s0 = t.slot[b];
  const double sum = sum_slots(partial + s0, t.slot[b + 1] - s0);
  if (threadIdx.x == 0) out[t.first + b] = sum;
}

int64_t chunks_of(int64_t n) { return (n + kChunkElems - 1) / kChunkElems; }

// The first slot of every tensor and, at [count], the number of slots; empty when the list is
// one the kernels do not take.
std::vector<int64_t> slot_bases(const SumsqList& t) {
  if (t.count < 0 || (t.count > 0 && (t.tensors == nullptr || t.numels == nullptr))) return {};
  std::vector<int64_t> base(static_cast<size_t>(t.count) + 1);
  int64_t slots = 0;
  for (int64_t i = 0; i < t.count; ++i) {
    if (t.numels[i] < 0) return {};
    base[static_cast<size_t>(i)] = slots;
    slots += chunks_of(t.numels[i]);
  }
  base[static_cast<size_t>(t.count)] = slots;
  return base;
}

size_t workspace_bytes_of(int64_t slots) {
  const size_t bytes = (sizeof(double) * static_cast<size_t>(slots) + 15) & ~static_cast<size_t>(15);
  return bytes < 16 ? 16 : bytes;
}

}  // namespace

size_t sumsq_workspace_bytes(const SumsqList& t) {
  const std::vector<int64_t> base = slot_bases(t);
  return base.empty() ? 0 : workspace_bytes_of(base.back());
}

cudaError_t sumsq(const SumsqList& t, const SumsqArgs& a, cudaStream_t stream) {
  const std::vector<int64_t> base = slot_bases(t);
  if (base.empty()) return cudaErrorInvalidValue;
  if (t.count == 0) return cudaSuccess;
  if (a.out == nullptr || a.workspace == nullptr || a.workspace_bytes < workspace_bytes_of(base.back()) ||
      (reinterpret_cast<uintptr_t>(a.workspace) & 15u) != 0)
    return cudaErrorInvalidValue;
  double* partial = static_cast<double*>(a.workspace);

  return visit_param(t.dtype, [&](auto tag) {
    using T = decltype(tag);
    TensorLists<1> lists;
    lists.ptrs[0] = t.tensors;
    lists.numel = t.numels;
    lists.count = t.count;
    auto meta_of = [&](int64_t i) { return SumsqMeta{base[static_cast<size_t>(i)]}; };
    static_assert(sizeof(PartialTable) + 2 * sizeof(void*) <= kArgBytes, "kernel arguments exceed the parameter limit");
    cudaError_t err = for_each_table<1, SumsqMeta>(
        lists, meta_of, [](int64_t) { return kChunkElems; }, [&](const PartialTable& tl) {
          sumsq_partials_kernel<T><<<static_cast<unsigned>(tl.block_start[tl.num_tensors]), kBlockThreads, 0,
                                     stream>>>(tl, a.scale, partial);
          return cudaGetLastError();
        });
    if (err != cudaSuccess) return err;
    // (2), after every partial on the stream; empty tensors included (their total is 0).
    for (int64_t first = 0; first < t.count; first += kTotalsPerLaunch) {
      TotalsTable tt;
      tt.first = first;
      tt.count = static_cast<int32_t>(t.count - first < kTotalsPerLaunch ? t.count - first : kTotalsPerLaunch);
      for (int32_t b = 0; b <= tt.count; ++b) tt.slot[b] = base[static_cast<size_t>(first + b)];
      sumsq_totals_kernel<<<static_cast<unsigned>(tt.count), kBlockThreads, 0, stream>>>(tt, partial, a.out);
      err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  });
}

}  // namespace cuda
}  // namespace sign_kernels
