// compressed.cuh -- Lion and Tiger with 8-bit momentum and/or the correction byte.
//
// NOTE: [CUDA row blocks]
// int8 momentum (NOTE: [int8 momentum] in csrc/core/sign_math.h) keeps one bf16 scale per
// block of kQBlock = 64 consecutive elements of a row (the last dim; a row's last block may be
// shorter), and a block's new codes need the absmax of its new momentum: a block is a unit of
// work that no chunk may cut. The 64K-element chunks of multi_tensor_apply cut rows anywhere,
// so these kernels have their own work items, *segments*: segment k of a tensor with rows of
// `cols` elements and nb = ceil(cols / 64) segments per row is elements [64 j, min(64 (j + 1),
// cols)) of row r = k / nb, j = k % nb. Its bf16 scale is scales[k] (rows x nb, row-major).
//  * 8 threads (kSegThreads) x kILP = 8 elements per segment: thread q owns elements
//    [8 q, 8 q + 8) of it, loaded as one vector per list (16 B for 16-bit types, 2 x 16 B for
//    fp32, 8 B for the int8 codes and residuals) when every list is aligned at the segment's
//    start (rows whose length is a multiple of 8), else with masked scalar accesses in the
//    strided layout q + 8 k (coalesced over the 8 threads). A 512-thread block holds 64
//    segments, 4096 elements; consecutive segments are consecutive memory.
//  * per element: dequantize the old code with the old scale (q8_dequant), the update in fp32
//    (lion_update / tiger_update), θ written as today (RNE, SR) or with the correction byte
//    (NOTE: [correction byte]); the new momentum stays in registers. Then the block's absmax
//    (NaN ignored: `a > amax ? a : amax`) over the 8 threads with three xor shuffles (max is
//    exact in any order), scale bits = bf16_bits_up(absmax), codes = q8_code(m, q8_scale(bits),
//    sr_key(seed, step, 1)). Everything is a sign_math.h function: the bits of the CPU kernels
//    and of the reference.
//  * the correction byte alone (a float momentum) is element-wise: the same kernels, with
//    segments of 64 elements of one "row" (the whole tensor; Tiger's embeddings: their rows,
//    for the per-row lr), and the momentum stored as lion_ec_chunk / tiger_rows store it (RNE:
//    the correction byte and stochastic rounding are exclusive).
// The table of a launch is multi_tensor_apply's (NOTE: [chunk table in kernel arguments]),
// counting segments instead of elements: a "chunk" is kSegsPerBlock segments, one per group.
//
// NOTE: [CUDA compressed Tiger]
// Tiger's whole-tensor facts come from the ordinary pre-pass and finalisation (they read θ16
// and g only: the RMS is that of the 16-bit weights, as in the reference and the CPU kernels),
// then the row-block update above replaces the update pass. The sums of squares out (NOTE:
// [CUDA sums of squares out]) are then read back from θ by a pass of their own over the
// pre-pass's chunks with the pre-pass's device functions (chunk_sums_out: thread_sumsq +
// block_sum per matrix chunk, summed by tiger_sums_out_kernel in slot order; rows_sumsq per
// embedding row), whatever the step did (update, NaN guard, accumulation micro-step,
// found_inf): a sums-only call of this path (found_inf set) gives the bits its update leaves.
// One more read of θ (2-4 B per element) where sums are wanted.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "core/sign_math.h"
#include "cuda/launch.h"
#include "cuda/multi_tensor_apply.cuh"
#include "cuda/sign_functors.cuh"

namespace sign_kernels {
namespace cuda {

// List indices of the compressed tables (after kParamIdx, kGradIdx, kStateIdx).
constexpr int kScaleIdx = 3;     // bf16 block scales (int8 momentum), or null
constexpr int kResidualIdx = 4;  // int8 residuals (the correction byte), or null

constexpr int kSegThreads = 8;                                // threads per segment
constexpr int kSegsPerBlock = kBlockThreads / kSegThreads;    // segments per thread block
static_assert(kSegThreads * kILP == kQBlock, "a segment is one int8 block: 8 threads x 8 elements");
static_assert(kBlockThreads % 32 == 0 && 32 % kSegThreads == 0, "segments never straddle a warp");

// Whether a call takes the compressed kernels (the descriptor's lists say so).
inline bool is_compressed(const TensorList& t) {
  return t.scales != nullptr || t.residuals != nullptr || t.state_dtype == DType::kInt8;
}

// ------------------------------------------------------------------ int8 packs
struct alignas(8) Pack8 {
  int8_t v[kILP];
};

template <typename T>
struct PackType {
  using type = Pack<T>;
};
template <>
struct PackType<int8_t> {
  using type = Pack8;
};
template <typename T>
using PackOf = typename PackType<T>::type;

__device__ __forceinline__ void load_pack(Pack8& pk, const int8_t* base, const PackSlot& s) {
  if (s.vector) {
    *reinterpret_cast<uint2*>(&pk) = *reinterpret_cast<const uint2*>(base + s.first);
  } else {
#pragma unroll
    for (int j = 0; j < kILP; ++j) pk.v[j] = s.valid(j) ? base[s.index(j)] : int8_t{0};
  }
}

__device__ __forceinline__ void store_pack(int8_t* base, const Pack8& pk, const PackSlot& s) {
  if (s.vector) {
    *reinterpret_cast<uint2*>(base + s.first) = *reinterpret_cast<const uint2*>(&pk);
  } else {
#pragma unroll
    for (int j = 0; j < kILP; ++j)
      if (s.valid(j)) base[s.index(j)] = pk.v[j];
  }
}

// Alignment of a full pack of T at element `at`: 16 B (8 B for int8 packs).
template <typename T>
__device__ __forceinline__ bool pack_aligned(const T* p, int64_t at) {
  constexpr uintptr_t kAlign = sizeof(T) == 1 ? 8u : 16u;
  return (reinterpret_cast<uintptr_t>(p + at) & (kAlign - 1)) == 0;
}

// ------------------------------------------------------------------ segments
struct Segment {
  int64_t index;  // segment number in the tensor (= index of its scale)
  int64_t row;    // row of the segmentation
  int64_t begin;  // first element
  int n;          // elements (0: this thread group has no segment)
};

// This thread group's segment of chunk c (c counts segments; NOTE: [CUDA row blocks]).
__device__ __forceinline__ Segment segment_of(const Chunk& c, int64_t cols, int64_t nb) {
  Segment s;
  s.index = c.begin + static_cast<int64_t>(threadIdx.x / kSegThreads);
  const bool active = s.index < c.end;
  const int64_t k = active ? s.index : c.begin;
  s.row = nb == 1 ? k : k / nb;
  const int64_t j = k - s.row * nb;
  s.begin = s.row * cols + j * kQBlock;
  const int64_t left = cols - j * kQBlock;
  s.n = active ? static_cast<int>(left < kQBlock ? left : kQBlock) : 0;
  return s;
}

// This thread's pack of segment s: contiguous (vector when full) or strided over the group.
__device__ __forceinline__ PackSlot segment_slot(const Segment& s, bool aligned) {
  const int64_t q = threadIdx.x % kSegThreads;
  PackSlot p;
  p.end = s.begin + s.n;
  if (aligned) {
    p.first = s.begin + q * kILP;
    p.stride = 1;
    p.vector = p.first + kILP <= p.end;
  } else {
    p.first = s.begin + q;
    p.stride = kSegThreads;
    p.vector = false;
  }
  return p;
}

// Max over the kSegThreads threads of a segment; every lane of the warp must call it. The
// values are >= 0 and never NaN, so any order gives the same bits.
__device__ __forceinline__ float segment_max(float v) {
#pragma unroll
  for (int off = kSegThreads / 2; off > 0; off >>= 1) {
    const float o = __shfl_xor_sync(0xFFFFFFFFu, v, off, kSegThreads);
    v = o > v ? o : v;
  }
  return v;
}

// ------------------------------------------------------------------ θ with the correction byte
__device__ __forceinline__ uint16_t bits16_rne(bf16_t, float v) { return bf16_bits_rne(v); }
__device__ __forceinline__ uint16_t bits16_rne(fp16_t, float v) { return fp16_bits_rne(v); }

template <bool kEc, typename P>
__device__ __forceinline__ float read_param(const Pack<P>& pk, const Pack8& rk, int j) {
  if constexpr (kEc) {
    return ec_decode(pk.v[j], rk.v[j]);
  } else {
    return to_f32(pk.v[j]);
  }
}

// θ^ = v written back: the 16-bit weight (RNE) and its residual, or the storage rounding.
template <bool kEc, typename P>
__device__ __forceinline__ void write_param(Pack<P>& pk, Pack8& rk, int j, float v, uint32_t key, int64_t idx,
                                            bool sr) {
  if constexpr (kEc) {
    P w;
    w.x = bits16_rne(P{}, v);
    pk.v[j] = w;
    rk.v[j] = ec_residual(w, v);
  } else {
    store(&pk.v[j], v, key, idx, sr);
  }
}

// New codes and scale of a segment from the new momentum in registers (every lane of the warp
// calls it; masked lanes hold no element and count for nothing).
__device__ __forceinline__ void requantize(Pack8& mk, const float (&mn)[kILP], const PackSlot& s, uint32_t key,
                                           uint16_t* scale, const Segment& seg) {
  float amax = 0.0f;
#pragma unroll
  for (int j = 0; j < kILP; ++j) {
    const float a = mn[j] < 0.0f ? -mn[j] : mn[j];
    if (s.valid(j)) amax = a > amax ? a : amax;  // NaN is not > anything: ignored
  }
  amax = segment_max(amax);
  const uint16_t sb = bf16_bits_up(amax);
  const float s_new = q8_scale(sb);
  const float inv = 1.0f / s_new;  // once per block (NOTE: [int8 momentum])
#pragma unroll
  for (int j = 0; j < kILP; ++j) mk.v[j] = q8_code(mn[j], s_new, inv, key);
  if (seg.n > 0 && threadIdx.x % kSegThreads == 0) scale[seg.index] = sb;
}

// ------------------------------------------------------------------ Lion
struct LionSegMeta {
  const int64_t* step;
  int64_t cols;  // elements per row of the segmentation
  int64_t nb;    // segments per row
  uint32_t seed;
};

// S: int8_t (codes + scales) or a float momentum type; kEc: the params carry the correction byte.
template <typename P, typename G, typename S, bool kEc>
struct LionCompressedFunctor {
  DeviceCommon common;
  float beta1, beta2, weight_decay;

  template <typename Table>
  __device__ __forceinline__ void operator()(const Table& tl, const Chunk& c) const {
    constexpr bool kQ8 = std::is_same<S, int8_t>::value;
    if (common.skip()) return;  // uniform over the grid
    const LionSegMeta& meta = tl.meta[c.tensor];
    const int64_t t = *meta.step;
    const LionScalars sc = lion_scalars(common.learning_rate(), beta1, beta2, weight_decay);
    const GradIn grad(common);
    const uint32_t key_p = sr_key(meta.seed, t, kStreamParam);
    const uint32_t key_s = sr_key(meta.seed, t, kStreamState);
    const bool sr = !kEc && common.sr;  // exclusive with the correction byte (lion_ec_chunk)
    P* p = static_cast<P*>(tl.ptrs[kParamIdx][c.tensor]);
    const G* g = static_cast<const G*>(tl.ptrs[kGradIdx][c.tensor]);
    S* m = static_cast<S*>(tl.ptrs[kStateIdx][c.tensor]);
    uint16_t* scale = static_cast<uint16_t*>(tl.ptrs[kScaleIdx][c.tensor]);
    int8_t* rho = static_cast<int8_t*>(tl.ptrs[kResidualIdx][c.tensor]);

    const Segment seg = segment_of(c, meta.cols, meta.nb);
    bool aligned = pack_aligned(p, seg.begin) && pack_aligned(g, seg.begin) && pack_aligned(m, seg.begin);
    if constexpr (kEc) aligned = aligned && pack_aligned(rho, seg.begin);
    const PackSlot s = segment_slot(seg, aligned);
    Pack<P> pk;
    Pack<G> gk;
    PackOf<S> mk;
    Pack8 rk;
    load_pack(pk, p, s);
    load_pack(gk, g, s);
    load_pack(mk, m, s);
    if constexpr (kEc) load_pack(rk, rho, s);
    float s_old = 0.0f;
    if constexpr (kQ8) s_old = q8_scale(seg.n > 0 ? scale[seg.index] : uint16_t{0});
    float mn[kILP];
#pragma unroll
    for (int j = 0; j < kILP; ++j) {
      float pf = read_param<kEc>(pk, rk, j);
      float mf;
      if constexpr (kQ8) {
        mf = q8_dequant(mk.v[j], s_old);
      } else {
        mf = to_f32(mk.v[j]);
      }
      lion_update(pf, mf, grad(gk.v[j]), sc);
      write_param<kEc>(pk, rk, j, pf, key_p, s.index(j), sr);
      if constexpr (kQ8) {
        mn[j] = mf;
      } else {
        store(&mk.v[j], mf, key_s, s.index(j), false);
      }
    }
    store_pack(p, pk, s);
    if constexpr (kEc) store_pack(rho, rk, s);
    if constexpr (kQ8) requantize(mk, mn, s, key_s, scale, seg);
    store_pack(m, mk, s);
  }
};

// ------------------------------------------------------------------ Tiger
struct TigerSegMeta {
  TigerMeta tiger;  // the pre-pass's record: step, seed, role, index, row_base
  int64_t cols;     // elements per row of the segmentation (embeddings: their rows)
  int64_t nb;       // segments per row
};

template <typename P, typename G, typename S, bool kEc>
struct TigerCompressedFunctor {
  TigerHyper h;

  template <typename Table>
  __device__ __forceinline__ void operator()(const Table& tl, const Chunk& c) const {
    constexpr bool kQ8 = std::is_same<S, int8_t>::value;
    if (h.common.skip()) return;  // uniform over the grid; the sums out come after
    const TigerSegMeta& sm = tl.meta[c.tensor];
    const TigerMeta& meta = sm.tiger;
    const int64_t t = *meta.step;
    const TigerScalars sc = h.scalars(t, meta.role);
    const TigerTensorInfo info = h.ws.info[meta.index];
    const uint32_t key_p = sr_key(meta.seed, t, kStreamParam);
    const uint32_t key_s = sr_key(meta.seed, t, kStreamState);
    const bool sr = !kEc && h.common.sr;  // exclusive with the correction byte (tiger_rows)
    P* p = static_cast<P*>(tl.ptrs[kParamIdx][c.tensor]);
    const G* g = static_cast<const G*>(tl.ptrs[kGradIdx][c.tensor]);
    S* m = static_cast<S*>(tl.ptrs[kStateIdx][c.tensor]);
    uint16_t* scale = static_cast<uint16_t*>(tl.ptrs[kScaleIdx][c.tensor]);
    int8_t* rho = static_cast<int8_t*>(tl.ptrs[kResidualIdx][c.tensor]);
    const Segment seg = segment_of(c, sm.cols, sm.nb);
    bool p_aligned = pack_aligned(p, seg.begin);
    if constexpr (kEc) p_aligned = p_aligned && pack_aligned(rho, seg.begin);
    Pack<P> pk;
    Pack8 rk;

    if (info.nan) {  // NaN guard (uniform over the tensor): m and its scales unchanged, θ shrunk
      const PackSlot s = segment_slot(seg, p_aligned);
      load_pack(pk, p, s);
      if constexpr (kEc) load_pack(rk, rho, s);
#pragma unroll
      for (int j = 0; j < kILP; ++j) {
        float pf = read_param<kEc>(pk, rk, j);
        tiger_shrink(pf, sc);
        write_param<kEc>(pk, rk, j, pf, key_p, s.index(j), sr);
      }
      store_pack(p, pk, s);
      if constexpr (kEc) store_pack(rho, rk, s);
      return;
    }

    const GradIn grad(h.common);
    float lr_p = 0.0f;
    if (sc.update) {
      const float lr = h.common.learning_rate();
      const float rms = meta.role == kRoleEmbedding ? (seg.n > 0 ? h.ws.row_rms[meta.row_base + seg.row] : 0.0f)
                                                    : info.rms;
      lr_p = tiger_lr(lr, meta.role, rms);
    }
    const bool aligned = p_aligned && pack_aligned(g, seg.begin) && pack_aligned(m, seg.begin);
    const PackSlot s = segment_slot(seg, aligned);
    PackOf<S> mk;
    Pack<G> gk;
    load_pack(gk, g, s);
    load_pack(mk, m, s);
    if (sc.update) {  // an accumulation micro-step neither reads nor writes θ
      load_pack(pk, p, s);
      if constexpr (kEc) load_pack(rk, rho, s);
    }
    float s_old = 0.0f;
    if constexpr (kQ8) s_old = q8_scale(seg.n > 0 ? scale[seg.index] : uint16_t{0});
    float mn[kILP];
#pragma unroll
    for (int j = 0; j < kILP; ++j) {
      float pf = sc.update ? read_param<kEc>(pk, rk, j) : 0.0f;
      float mf;
      if constexpr (kQ8) {
        mf = q8_dequant(mk.v[j], s_old);
      } else {
        mf = to_f32(mk.v[j]);
      }
      tiger_update(pf, mf, grad(gk.v[j]), lr_p, sc);
      if (sc.update) write_param<kEc>(pk, rk, j, pf, key_p, s.index(j), sr);
      if constexpr (kQ8) {
        mn[j] = mf;
      } else {
        store(&mk.v[j], mf, key_s, s.index(j), false);
      }
    }
    if (sc.update) {
      store_pack(p, pk, s);
      if constexpr (kEc) store_pack(rho, rk, s);
    }
    if constexpr (kQ8) requantize(mk, mn, s, key_s, scale, seg);
    store_pack(m, mk, s);
  }
};

// The sums of squares out after the row-block update (NOTE: [CUDA compressed Tiger]): chunk c
// of the pre-pass's chunking, read back from θ with the pre-pass's functions.
template <typename P>
struct TigerSumsOutFunctor {
  TigerHyper h;

  template <typename Table>
  __device__ __forceinline__ void operator()(const Table& tl, const Chunk& c) const {
    const TigerMeta& meta = tl.meta[c.tensor];
    if (!fills_sums(h, meta, h.common.skip())) return;  // uniform over the block
    chunk_sums_out<P>(h, tl, c, meta, false, 0.0);
  }
};

// The kernel of the compressed launches: multi_tensor_apply_kernel under another name (its
// functors load packs of 8 bytes and less where multi_tensor_apply_kernel's load 16).
template <typename Table, typename Functor>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM)
    row_block_kernel(const SK_GRID_CONSTANT Table tl, const SK_GRID_CONSTANT Functor f) {
  f(tl, find_chunk(tl));
}

// ------------------------------------------------------------------ host side (compressed.cu)
// Whether the compressed kernels take this list: int8 state exactly with scales (and row sizes
// dividing the numels), residuals only with 16-bit params, the dtypes of dispatch.cuh (state
// int8, or P / fp32 / bf16 with residuals). tiger_rows: Tiger's last-dim sizes (a.row_sizes),
// null for Lion.
bool compressed_ok(const TensorList& t, const int64_t* tiger_rows);

cudaError_t lion_compressed(const TensorList& t, const LionArgs& a, cudaStream_t stream);

// Tiger's update and sums out after the pre-pass and finalisation (tiger.cu) of a list that
// compressed_ok took: `h` and `metas` are the ones the pre-pass used.
cudaError_t tiger_compressed(const TensorList& t, const TigerArgs& a, const TigerHyper& h,
                             const std::vector<TigerMeta>& metas, cudaStream_t stream);

}  // namespace cuda
}  // namespace sign_kernels
