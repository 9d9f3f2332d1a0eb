// multi_tensor_apply.cuh -- the one chunking launcher of the CUDA kernels.
//
// Framework-free (no torch header): raw pointers, int64 element counts, a cudaStream_t.
// A call hands over `Depth` parallel lists of tensors (kParamIdx, kGradIdx, kStateIdx,
// ...), tensor i of every list having numel[i] contiguous elements, plus one small
// per-tensor metadata record (`Meta`: step pointer, seed, role, ...). The launcher cuts
// every tensor into chunks, one thread block per chunk, and calls the functor once per
// chunk. Functors only move memory: they load packs of kILP elements per list, call the
// per-element math of csrc/core/sign_math.h in fp32 registers, and store the packs back.
//
// NOTE: [chunk table in kernel arguments]
// The per-launch table (pointers, sizes, metadata, first block of each tensor) travels
// as a __grid_constant__ kernel argument, not as a device-resident array:
//  * a kernel argument is captured by value into a CUDA graph, so a captured step
//    replays with no host work, no pinned staging buffer and no lifetime hazard
//    (a device table would need an H2D copy from memory that must outlive the copy
//    and must not be rewritten before a replay);
//  * it needs no allocation and no synchronisation, and the framework-free core
//    stays free of allocators.
// The price is the kernel-parameter limit: a launch takes up to
// max_tensors_per_launch<Depth, Meta>() tensors and a call with more is split into
// several launches. Built with CUDA >= 12.1 the table uses the 32 KiB parameter space
// of sm_70+ (needs driver r530+): about 400-480 tensors per launch, so GPT-2 small's
// 148 tensors are one launch. Older toolkits get 4 KiB: about 40-60 tensors per launch.
//
// NOTE: [blocks found by binary search]
// Unlike a block -> (tensor, chunk) map (which bounds the blocks of one launch), the
// table stores the first block of each tensor; block b finds its tensor by a binary
// search over at most ~70 entries (a handful of constant-bank loads, nothing next to
// the 64K elements of a chunk). So a launch has no block limit: a 2^33-element tensor
// is one launch of 2^17 blocks, and many small tensors are spread one per block.
//
// NOTE: [vector loads for every dtype]
// A thread handles kILP = 8 consecutive elements per iteration. 8 elements are 16 B
// for 2-byte types (bf16, fp16, int16) and 32 B for fp32, so every list is read and
// written with 16-byte vector accesses whatever its dtype, and lists of mixed dtypes
// (bf16 params, fp32 grads) share one index space. The vector path is taken when every
// list's address at the chunk start is 16-byte aligned (then every pack is, since packs
// start 8 elements apart) and the pack is full. A misaligned tensor (a view with a
// storage offset) is processed with masked scalar accesses in a strided layout that
// stays coalesced; the last partial pack of a chunk with masked scalar accesses.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace sign_kernels {
namespace cuda {

// Named tensor-list indices.
constexpr int kParamIdx = 0;
constexpr int kGradIdx = 1;
constexpr int kStateIdx = 2;

constexpr int kBlockThreads = 512;
// NOTE: [two blocks per SM] __launch_bounds__(kBlockThreads, kMinBlocksPerSM) caps every
// kernel at 65536 / (2 * 512) = 64 registers, so two 512-thread blocks share an SM (one
// block's tail then overlaps the next block's loads). Unbounded, nvcc gave
// TigerUpdateFunctor<fp16, fp16, fp16> 70 registers (one block per SM) and let
// <float, float, bf16> spill; tests/test_cuda_codegen.py checks the bound and the spills.
constexpr int kMinBlocksPerSM = 2;
constexpr int kILP = 8;                    // elements per thread per iteration
constexpr int64_t kChunkElems = 1 << 16;   // elements per block (a multiple of kILP)
// Kernel-parameter limit (NOTE: [chunk table in kernel arguments]): 32764 bytes since
// CUDA 12.1 on sm_70+ (driver r530 or newer), 4 KiB before.
#if defined(__CUDACC_VER_MAJOR__) && (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 1))
constexpr size_t kArgBytes = 32764;
#else
constexpr size_t kArgBytes = 4096;
#endif
constexpr size_t kFunctorArgBytes = 256;   // room kept for the functor's own arguments

static_assert(kChunkElems % kILP == 0, "chunks must start on a pack boundary");

// ------------------------------------------------------------------ the table
// Struct of arrays, so block_start is one contiguous array for the binary search.
template <int Depth, typename Meta>
constexpr int max_tensors_per_launch() {
  return static_cast<int>((kArgBytes - kFunctorArgBytes - 64) /
                          (Depth * sizeof(void*) + 2 * sizeof(int64_t) + sizeof(int32_t) + sizeof(Meta)));
}

template <int Depth, typename Meta>
struct TensorTable {
  static_assert(Depth >= 1 && Depth <= 5, "tensor lists have depth 1 to 5");
  static constexpr int kMaxTensors = max_tensors_per_launch<Depth, Meta>();
  static_assert(kMaxTensors >= 8, "per-tensor metadata too large for the kernel-argument table");

  void* ptrs[Depth][kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t chunk_elems[kMaxTensors];  // per tensor: kChunkElems, or row-aligned (Tiger pre-pass)
  Meta meta[kMaxTensors];
  int32_t block_start[kMaxTensors + 1];  // first block of each tensor; [n] = blocks of the launch
  int32_t num_tensors;
};

// The chunk a block works on.
struct Chunk {
  int tensor;      // slot in the table
  int64_t index;   // chunk number within the tensor
  int64_t begin;   // first element
  int64_t end;     // one past the last element
};

template <int Depth, typename Meta>
__device__ __forceinline__ Chunk find_chunk(const TensorTable<Depth, Meta>& tl) {
  const int32_t b = static_cast<int32_t>(blockIdx.x);
  int lo = 0, hi = tl.num_tensors - 1;
  while (lo < hi) {  // last tensor whose first block is <= b (tensors with no block are not in the table)
    const int mid = (lo + hi + 1) >> 1;
    if (tl.block_start[mid] <= b) lo = mid; else hi = mid - 1;
  }
  Chunk c;
  c.tensor = lo;
  c.index = b - tl.block_start[lo];
  c.begin = c.index * tl.chunk_elems[lo];
  const int64_t stop = c.begin + tl.chunk_elems[lo];
  c.end = stop < tl.numel[lo] ? stop : tl.numel[lo];
  return c;
}

#if defined(__CUDACC_VER_MAJOR__) && (__CUDACC_VER_MAJOR__ > 11 || (__CUDACC_VER_MAJOR__ == 11 && __CUDACC_VER_MINOR__ >= 7))
#define SK_GRID_CONSTANT __grid_constant__
#else
#define SK_GRID_CONSTANT
#endif

// The generic kernel: find the chunk, hand it to the functor.
template <int Depth, typename Meta, typename Functor>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM)
    multi_tensor_apply_kernel(const SK_GRID_CONSTANT TensorTable<Depth, Meta> tl, const SK_GRID_CONSTANT Functor f) {
  f(tl, find_chunk(tl));
}

// ------------------------------------------------------------------ packs
template <typename T>
struct alignas(16) Pack {
  static_assert(sizeof(T) == 2 || sizeof(T) == 4, "storage types are 2 or 4 bytes");
  T v[kILP];
};

// Where a thread's pack lies: element j is at first + j * stride (stride 1: contiguous,
// vector-eligible; stride blockDim.x: the coalesced scalar layout of misaligned chunks).
struct PackSlot {
  int64_t first;
  int64_t stride;
  int64_t end;
  bool vector;  // full and aligned: 16-byte accesses
  __device__ __forceinline__ int64_t index(int j) const { return first + j * stride; }
  __device__ __forceinline__ bool valid(int j) const { return index(j) < end; }
};

template <typename T>
__device__ __forceinline__ void load_pack(Pack<T>& pk, const T* base, const PackSlot& s) {
  if (s.vector) {
    const uint4* src = reinterpret_cast<const uint4*>(base + s.first);
    uint4* dst = reinterpret_cast<uint4*>(&pk);
#pragma unroll
    for (int k = 0; k < static_cast<int>(sizeof(Pack<T>) / 16); ++k) dst[k] = src[k];
  } else {
#pragma unroll
    for (int j = 0; j < kILP; ++j) pk.v[j] = s.valid(j) ? base[s.index(j)] : T{};
  }
}

template <typename T>
__device__ __forceinline__ void store_pack(T* base, const Pack<T>& pk, const PackSlot& s) {
  if (s.vector) {
    uint4* dst = reinterpret_cast<uint4*>(base + s.first);
    const uint4* src = reinterpret_cast<const uint4*>(&pk);
#pragma unroll
    for (int k = 0; k < static_cast<int>(sizeof(Pack<T>) / 16); ++k) dst[k] = src[k];
  } else {
#pragma unroll
    for (int j = 0; j < kILP; ++j)
      if (s.valid(j)) base[s.index(j)] = pk.v[j];
  }
}

template <typename T>
__device__ __forceinline__ bool aligned16(const T* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// True when every list's address at element `at` is 16-byte aligned.
template <typename... Ts>
__device__ __forceinline__ bool all_aligned16(int64_t at, const Ts*... ps) {
  return (aligned16(ps + at) && ...);
}

// Calls body(slot) for every pack of the chunk [c.begin, c.end) owned by this thread.
// `aligned` (all_aligned16 at c.begin) selects contiguous packs, vectorised when full.
template <typename Body>
__device__ __forceinline__ void for_each_pack(const Chunk& c, bool aligned, Body&& body) {
  const int64_t tid = threadIdx.x;
  const int64_t nthreads = blockDim.x;
  for (int64_t base = c.begin; base < c.end; base += nthreads * kILP) {
    PackSlot s;
    s.end = c.end;
    if (aligned) {
      s.first = base + tid * kILP;
      s.stride = 1;
      s.vector = s.first + kILP <= c.end;
    } else {
      s.first = base + tid;
      s.stride = nthreads;
      s.vector = false;
    }
    if (s.first < c.end) body(s);
  }
}

// ------------------------------------------------------------------ host side
// The lists of one call. ptrs[d][i] is tensor i of list d; numel[i] its element count.
template <int Depth>
struct TensorLists {
  static_assert(Depth >= 1 && Depth <= 5, "tensor lists have depth 1 to 5");
  const void* const* ptrs[Depth];
  const int64_t* numel;
  int64_t count;
};

// Fills tables of at most kMaxTensors non-empty tensors and calls launch(table) for each,
// in tensor order. meta_of(i) gives tensor i's Meta, chunk_of(i) its chunk size (elements).
// Returns the first error of a launch, or cudaErrorInvalidValue on a bad argument.
template <int Depth, typename Meta, typename MetaFn, typename ChunkFn, typename LaunchFn>
cudaError_t for_each_table(const TensorLists<Depth>& lists, MetaFn&& meta_of, ChunkFn&& chunk_of,
                           LaunchFn&& launch) {
  using Table = TensorTable<Depth, Meta>;
  constexpr int64_t kMaxBlocks = 0x7FFFFFFF;  // gridDim.x limit
  Table tl;
  tl.num_tensors = 0;
  int64_t blocks = 0;
  auto flush = [&]() -> cudaError_t {
    if (tl.num_tensors == 0) return cudaSuccess;
    tl.block_start[tl.num_tensors] = static_cast<int32_t>(blocks);
    const cudaError_t err = launch(static_cast<const Table&>(tl));
    tl.num_tensors = 0;
    blocks = 0;
    return err;
  };
  for (int64_t i = 0; i < lists.count; ++i) {
    const int64_t n = lists.numel[i];
    if (n < 0) return cudaErrorInvalidValue;
    if (n == 0) continue;
    const int64_t chunk = chunk_of(i);
    if (chunk <= 0) return cudaErrorInvalidValue;
    const int64_t nblocks = (n + chunk - 1) / chunk;
    if (nblocks > kMaxBlocks) return cudaErrorInvalidValue;
    if (tl.num_tensors == Table::kMaxTensors || blocks + nblocks > kMaxBlocks) {
      const cudaError_t err = flush();
      if (err != cudaSuccess) return err;
    }
    const int t = tl.num_tensors++;
    for (int d = 0; d < Depth; ++d) tl.ptrs[d][t] = const_cast<void*>(lists.ptrs[d][i]);
    tl.numel[t] = n;
    tl.chunk_elems[t] = chunk;
    tl.meta[t] = meta_of(i);
    tl.block_start[t] = static_cast<int32_t>(blocks);
    blocks += nblocks;
  }
  return flush();
}

// The launcher: every chunk of every tensor through functor f, on `stream`.
template <int Depth, typename Meta, typename Functor, typename MetaFn>
cudaError_t multi_tensor_apply(const TensorLists<Depth>& lists, MetaFn&& meta_of, const Functor& f,
                               cudaStream_t stream) {
  using Table = TensorTable<Depth, Meta>;
  static_assert(sizeof(Table) + sizeof(Functor) <= kArgBytes, "kernel arguments exceed the parameter limit");
  static_assert(sizeof(Functor) <= kFunctorArgBytes, "functor arguments exceed their budget");
  static_assert(std::is_trivially_copyable<Functor>::value, "functors are passed by value to the kernel");
  return for_each_table<Depth, Meta>(
      lists, meta_of, [](int64_t) { return kChunkElems; },
      [&](const Table& tl) {
        multi_tensor_apply_kernel<Depth, Meta, Functor>
            <<<static_cast<unsigned>(tl.block_start[tl.num_tensors]), kBlockThreads, 0, stream>>>(tl, f);
        return cudaGetLastError();
      });
}

}  // namespace cuda
}  // namespace sign_kernels
