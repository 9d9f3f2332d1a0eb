// sign_functors.cuh -- the per-chunk functors of Lion, Tiger and Simba.
//
// They only move memory: read the per-tensor scalars on the device (step, lr, grad
// scale, found_inf, clip), load packs of every list, call the fp32 math of
// csrc/core/sign_math.h on each element, and store the packs with the storage rounding
// of sign_math.h (RNE, or the documented stochastic rounding for bf16). Nothing here
// computes a formula of docs/rules.md by itself.
//
// Template parameters: P param storage (float, bf16_t, fp16_t), G grad storage (P or
// float), S state storage (P, float or bf16_t; int16_t for Simba's counters).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/sign_math.h"
#include "cuda/multi_tensor_apply.cuh"

namespace sign_kernels {
namespace cuda {

// Buffer streams of NOTE: [stochastic rounding bits].
constexpr uint32_t kStreamParam = 0;
constexpr uint32_t kStreamState = 1;

// The arguments shared by the three ops, as the kernels see them.
struct DeviceCommon {
  float lr;
  const float* lr_ptr;      // device lr, or null
  const float* grad_scale;  // device scale, or null
  const float* found_inf;   // device flag, or null
  const float* clip;        // device clipping coefficient, or null
  bool sr;

  // NOTE: [found_inf]: GradScaler's flag; NaN compares != 0 too, as in the reference.
  __device__ __forceinline__ bool skip() const { return found_inf != nullptr && *found_inf != 0.0f; }
  __device__ __forceinline__ float learning_rate() const { return lr_ptr != nullptr ? *lr_ptr : lr; }
  __device__ __forceinline__ float scale() const { return grad_scale != nullptr ? *grad_scale : 1.0f; }
};

// g / scale, rounded to nearest whatever -prec-div says (the reference divides in fp32).
// Dividing by 1 is exact, so an absent scale is just 1.
template <typename G>
__device__ __forceinline__ float unscale(G g, float scale) {
  return __fdiv_rn(to_f32(g), scale);
}

// NOTE: [CUDA gradient used] The gradient the math sees (NOTE: [clipping inside the step] in
// sign_kernels/_ops.py): (g / scale) * clip, the quotient and then the product each rounded to
// fp32 (__fdiv_rn, __fmul_rn: never contracted, whatever the flags). Without a clip the factor
// is 1 and the product is the quotient exactly (IEEE, denormals kept), but for a NaN's payload,
// which nothing observes: every use of the gradient compares it or multiplies it again. So an
// omitted clip gives the bits of unscale alone, with no flag kept in a register (the Tiger
// update runs at the bound of NOTE: [two blocks per SM]; a flag made three of its
// instantiations spill). The scalars are read once per chunk; every functor, and Tiger's NaN
// scan, goes through this.
struct GradIn {
  float scale;  // 1 when absent (exact)
  float clip;   // 1 when absent (exact)

  __device__ __forceinline__ explicit GradIn(const DeviceCommon& c)
      : scale(c.scale()), clip(c.clip != nullptr ? *c.clip : 1.0f) {}

  template <typename G>
  __device__ __forceinline__ float operator()(G g) const {
    return __fmul_rn(unscale(g, scale), clip);
  }
};

// Storage value of an int16 counter, for symmetry with to_f32.
__device__ __forceinline__ int16_t to_i16(int16_t v) { return v; }

// ------------------------------------------------------------------ Lion
struct LionMeta {
  const int64_t* step;
  uint32_t seed;
};

template <typename P, typename G, typename S>
struct LionFunctor {
  DeviceCommon common;
  float beta1, beta2, weight_decay;

  template <typename Table>
  __device__ __forceinline__ void operator()(const Table& tl, const Chunk& c) const {
    if (common.skip()) return;
    const LionMeta& meta = tl.meta[c.tensor];
    const int64_t t = *meta.step;
    const LionScalars sc = lion_scalars(common.learning_rate(), beta1, beta2, weight_decay);
    const GradIn grad(common);
    const uint32_t key_p = sr_key(meta.seed, t, kStreamParam);
    const uint32_t key_s = sr_key(meta.seed, t, kStreamState);
    P* p = static_cast<P*>(tl.ptrs[kParamIdx][c.tensor]);
    const G* g = static_cast<const G*>(tl.ptrs[kGradIdx][c.tensor]);
    S* m = static_cast<S*>(tl.ptrs[kStateIdx][c.tensor]);

    for_each_pack(c, all_aligned16(c.begin, p, g, m), [&](const PackSlot& s) {
      Pack<P> pk;
      Pack<G> gk;
      Pack<S> mk;
      load_pack(pk, p, s);
      load_pack(gk, g, s);
      load_pack(mk, m, s);
#pragma unroll
      for (int j = 0; j < kILP; ++j) {
        float pf = to_f32(pk.v[j]);
        float mf = to_f32(mk.v[j]);
        lion_update(pf, mf, grad(gk.v[j]), sc);
        store(&pk.v[j], pf, key_p, s.index(j), common.sr);
        store(&mk.v[j], mf, key_s, s.index(j), common.sr);
      }
      store_pack(p, pk, s);
      store_pack(m, mk, s);
    });
  }
};

// ------------------------------------------------------------------ Simba
using SimbaMeta = LionMeta;  // the same per-tensor record: step pointer and SR seed

template <typename P, typename G>
struct SimbaFunctor {
  DeviceCommon common;
  float weight_decay;
  int32_t window, threshold_count;

  template <typename Table>
  __device__ __forceinline__ void operator()(const Table& tl, const Chunk& c) const {
    if (common.skip()) return;
    const SimbaMeta& meta = tl.meta[c.tensor];
    const int64_t t = *meta.step;
    const SimbaScalars sc = simba_scalars(common.learning_rate(), weight_decay, window, threshold_count);
    const GradIn grad(common);
    const uint32_t key_p = sr_key(meta.seed, t, kStreamParam);
    P* p = static_cast<P*>(tl.ptrs[kParamIdx][c.tensor]);
    const G* g = static_cast<const G*>(tl.ptrs[kGradIdx][c.tensor]);
    int16_t* cnt = static_cast<int16_t*>(tl.ptrs[kStateIdx][c.tensor]);

    for_each_pack(c, all_aligned16(c.begin, p, g, cnt), [&](const PackSlot& s) {
      Pack<P> pk;
      Pack<G> gk;
      Pack<int16_t> ck;
      load_pack(pk, p, s);
      load_pack(gk, g, s);
      load_pack(ck, cnt, s);
#pragma unroll
      for (int j = 0; j < kILP; ++j) {
        float pf = to_f32(pk.v[j]);
        simba_update(pf, ck.v[j], grad(gk.v[j]), sc);
        store(&pk.v[j], pf, key_p, s.index(j), common.sr);
      }
      store_pack(p, pk, s);
      store_pack(cnt, ck, s);
    });
  }
};

// ------------------------------------------------------------------ Tiger
// NOTE: [Tiger pre-pass]
// Tiger needs two facts about a whole tensor before any element may be written: whether
// the gradient used (NOTE: [CUDA gradient used]) holds a NaN anywhere (the NaN guard), and
// the RMS of θ_{t-1} (matrix role: the whole tensor; embedding role: each row). A chunk
// cannot know them, so a call is
//   1. pre-pass, one block per chunk: NaN flag of the chunk and (matrix) its sum of
//      squares, written to its own slot; (embedding) the RMS of each row, whole rows
//      per chunk (the pre-pass chunks of an embedding are row-aligned);
//   2. finalisation, one block per tensor: OR of the flags and sum of the partial sums
//      in slot order -> {rms, nan} of the tensor;
//   3. the update, in ordinary chunks.
// Every partial sum has a fixed owner and a fixed reduction tree (no atomics), so the
// result is bit-reproducible run to run and under CUDA-graph replay. Sums of squares
// are taken in fp64 and rms = (float)sqrt(sumsq / n), as the reference computes it; only
// the summation order differs from it. The pre-pass reads θ only on steps that update θ
// and only for roles that scale by the RMS; on the other micro-steps it reads g alone.
struct TigerMeta {
  const int64_t* step;
  int64_t row_size;   // last-dim size (embedding rows)
  int64_t row_base;   // first row of this tensor in Workspace::row_rms
  int64_t slot_base;  // first pre-pass chunk slot of this tensor
  uint32_t seed;
  int32_t index;      // position of the tensor in the call (Workspace::info)
  int32_t role;       // TigerRole
  int32_t out_kept;   // the wanted sums out are the given ones, in place (NOTE: [CUDA sums of squares out])
  // Given statistics (NOTE: [Tiger statistics input]): indices into TigerHyper::stats, -1 = own.
  int64_t given_nan;
  int64_t given_sumsq;
  int64_t given_n;    // n of the RMS of the given sums
  int64_t out_at;     // index of the sums out in TigerHyper::sumsq_out, -1: none wanted
};

struct TigerTensorInfo {
  float rms;    // RMS of the whole tensor (matrix role, on updating steps)
  int32_t nan;  // the gradient used ((g / scale) * clip) holds a NaN
};

struct TigerWorkspace {
  TigerTensorInfo* info;  // per tensor
  int32_t* chunk_nan;     // per pre-pass chunk
  double* chunk_sumsq;    // per pre-pass chunk (matrix role)
  float* row_rms;         // per embedding row
};

// Embedding rows up to this length are reduced one warp per row (and a pre-pass chunk
// holds kChunkElems / row_size rows); longer rows get one block each.
constexpr int64_t kWarpRowMax = 2048;

struct TigerHyper {
  DeviceCommon common;
  float beta, weight_decay, shrink_ratio;
  int64_t grad_accum_steps;
  TigerWorkspace ws;
  const double* stats;  // given statistics, or null
  double* sumsq_out;    // sums of squares out, or null (NOTE: [CUDA sums of squares out])

  __device__ __forceinline__ TigerScalars scalars(int64_t t, int role) const {
    return tiger_scalars(t, grad_accum_steps, beta, weight_decay, shrink_ratio, role);
  }
};

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, off);
  return v;
}

// Sum over the block, in a fixed order; every thread must call it; thread 0 gets the sum.
__device__ __forceinline__ double block_sum(double v) {
  __shared__ double partial[kBlockThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // partial may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  const int nwarps = blockDim.x >> 5;
  v = (warp == 0 && lane < nwarps) ? partial[lane] : 0.0;
  return warp == 0 ? warp_sum(v) : 0.0;
}

template <typename T>
__device__ __forceinline__ double sq(T x) {
  const double v = static_cast<double>(to_f32(x));
  return v * v;
}

// NOTE: [CUDA sums of squares out] The sums of squares of θ handed out for the next call
// (NOTE: [Tiger sums of squares out] in sign_kernels/_ops.py) must be the bits the pre-pass
// would compute from θ, so both go through the same three functions, in the same chunks:
//  * matrix: thread_sumsq over a kChunkElems chunk (each thread its contiguous packs, in
//    order; a fixed layout whatever the alignment), block_sum, one slot per chunk, then
//    sum_slots over the tensor's slots in slot order;
//  * embedding: rows_sumsq over the whole rows of a row-aligned chunk (a row's sum depends on
//    the row alone: a warp per row, or a block for rows longer than kWarpRowMax).
// The update pass adds the squares of the values it stores to its per-thread sum where its
// packs are those of thread_sumsq (the contiguous, aligned layout; matrices), and otherwise,
// right after writing the chunk (__syncthreads makes the block's writes visible to it), reads
// the chunk back while it is still in L1/L2, as the CPU kernels do (embedding rows, whose
// warp-per-row order no element-per-thread layout gives; misaligned chunks). When sums are
// wanted for an embedding, the update takes the pre-pass's row-aligned chunks for it. A step
// that does not write θ (accumulation micro-step, found_inf) reads θ with the same functions,
// unless the wanted sums are the given ones in place (out_kept), which then stay.
// The pre-pass sums a matrix chunk in its contiguous layout even where θ or g is misaligned
// (before, such a chunk was summed in the strided layout of its NaN scan): the one change of
// the pre-pass's bits, only for misaligned tensors.

// This thread's share of the sum of squares of chunk c of p, in the fixed layout above.
template <typename P>
__device__ __forceinline__ double thread_sumsq(const P* p, const Chunk& c) {
  const bool aligned = aligned16(p + c.begin);
  double acc = 0.0;
  for_each_pack(c, true, [&](const PackSlot& slot) {
    PackSlot s = slot;
    s.vector = s.vector && aligned;  // contiguous packs, scalar loads when p is misaligned
    Pack<P> pk;
    load_pack(pk, p, s);  // masked lanes load 0
#pragma unroll
    for (int j = 0; j < kILP; ++j) acc += sq(pk.v[j]);
  });
  return acc;
}

// Sum of n fp64 slots, in a fixed order; every thread must call it; thread 0 gets the sum.
__device__ __forceinline__ double sum_slots(const double* v, int64_t n) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += v[i];
  return block_sum(acc);
}

// The sums of squares of rows [r0, r1) of p (rows of d elements): out(r, sum) for each row;
// every thread must call it.
template <typename P, typename Out>
__device__ __forceinline__ void rows_sumsq(const P* p, int64_t d, int64_t r0, int64_t r1, Out&& out) {
  if (d <= kWarpRowMax) {
    const int lane = threadIdx.x & 31;
    for (int64_t r = r0 + (threadIdx.x >> 5); r < r1; r += blockDim.x >> 5) {
      const P* row = p + r * d;
      double acc = 0.0;
#pragma unroll 4
      for (int64_t k = lane; k < d; k += 32) acc += sq(row[k]);
      acc = warp_sum(acc);
      if (lane == 0) out(r, acc);
    }
  } else {
    for (int64_t r = r0; r < r1; ++r) {
      const P* row = p + r * d;
      double acc = 0.0;
      for (int64_t k = threadIdx.x; k < d; k += blockDim.x) acc += sq(row[k]);
      acc = block_sum(acc);
      if (threadIdx.x == 0) out(r, acc);
    }
  }
}

// Pre-pass chunk of a tensor: ordinary, or whole rows for embeddings (NOTE: [Tiger pre-pass]).
__host__ __device__ inline int64_t prepass_chunk(int64_t role, int64_t row_size) {
  if (role != kRoleEmbedding) return kChunkElems;
  if (row_size <= kWarpRowMax) return (kChunkElems / row_size) * row_size;
  return row_size;
}

// Whether this call fills tensor `meta`'s sums out (NOTE: [CUDA sums of squares out]): wanted,
// and θ is written or the wanted sums are not the given ones in place. Uniform over a block.
__device__ __forceinline__ bool fills_sums(const TigerHyper& h, const TigerMeta& meta, bool skip) {
  if (h.sumsq_out == nullptr || meta.out_at < 0) return false;
  if (!meta.out_kept) return true;
  if (skip) return false;  // θ is not written (and the pre-pass left no flags)
  return h.ws.info[meta.index].nan || h.scalars(*meta.step, meta.role).update;
}

// The sums out of chunk c after the update wrote it (or left it): `acc` is this thread's
// thread_sumsq share where in_regs (matrix, computed from the stored values), else θ is read back.
template <typename P, typename Table>
__device__ __forceinline__ void chunk_sums_out(const TigerHyper& h, const Table& tl, const Chunk& c,
                                               const TigerMeta& meta, bool in_regs, double acc) {
  const P* p = static_cast<const P*>(tl.ptrs[kParamIdx][c.tensor]);
  if (meta.role == kRoleMatrix) {
    if (!in_regs) {
      __syncthreads();  // the block's writes of this chunk, visible to every thread of it
      acc = thread_sumsq(p, c);
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) h.ws.chunk_sumsq[meta.slot_base + c.index] = acc;  // summed per tensor after
  } else {
    __syncthreads();
    const int64_t d = meta.row_size;  // the chunk holds whole rows (prepass_chunk)
    double* out = h.sumsq_out + meta.out_at;
    rows_sumsq(p, d, c.begin / d, c.end / d, [&](int64_t r, double s) { out[r] = s; });
  }
}

// Pre-pass over lists (θ, g), in chunks whose size is TigerMeta-dependent (row-aligned for
// embeddings). Writes chunk_nan / chunk_sumsq of its slot and row_rms of its rows.
template <typename P, typename G>
struct TigerPrepassFunctor {
  TigerHyper h;

  template <typename Table>
  __device__ __forceinline__ void operator()(const Table& tl, const Chunk& c) const {
    if (h.common.skip()) return;  // uniform over the grid: nothing will be read
    const TigerMeta& meta = tl.meta[c.tensor];
    const bool update = h.scalars(*meta.step, meta.role).update;
    const bool given_sums = meta.given_sumsq >= 0;  // whole-tensor sums given: θ is not read
    const bool matrix_rms = update && meta.role == kRoleMatrix && !given_sums;
    const bool row_rms = update && meta.role == kRoleEmbedding;
    const GradIn grad(h.common);  // the NaN guard looks at the gradient the update uses
    const P* p = static_cast<const P*>(tl.ptrs[kParamIdx][c.tensor]);
    const G* g = static_cast<const G*>(tl.ptrs[kGradIdx][c.tensor]);

    int nan = 0;
    double sumsq = 0.0;
    const bool scan_nan = meta.given_nan < 0;  // a given NaN count: g is not read here
    // θ's sums in the layout of thread_sumsq (NOTE: [CUDA sums of squares out]): in the NaN
    // scan's loop when that layout is the contiguous one, else on their own.
    const bool aligned = all_aligned16(c.begin, p, g);
    const bool fused_sq = matrix_rms && aligned;
    if (scan_nan || fused_sq) for_each_pack(c, aligned, [&](const PackSlot& s) {
      if (scan_nan) {
        Pack<G> gk;
        load_pack(gk, g, s);
#pragma unroll
        for (int j = 0; j < kILP; ++j) nan |= s.valid(j) && isnan(grad(gk.v[j]));
      }
      if (fused_sq) {
        Pack<P> pk;
        load_pack(pk, p, s);  // masked lanes load 0
#pragma unroll
        for (int j = 0; j < kILP; ++j) sumsq += sq(pk.v[j]);
      }
    });
    if (matrix_rms && !aligned) sumsq = thread_sumsq(p, c);
    nan = __syncthreads_or(nan);
    if (matrix_rms) sumsq = block_sum(sumsq);
    if (threadIdx.x == 0) {
      h.ws.chunk_nan[meta.slot_base + c.index] = nan;
      if (matrix_rms) h.ws.chunk_sumsq[meta.slot_base + c.index] = sumsq;
    }

    if (row_rms) {
      const int64_t d = meta.row_size;
      const int64_t r0 = c.begin / d, r1 = c.end / d;  // the chunk holds whole rows
      float* out = h.ws.row_rms + meta.row_base;
      if (given_sums) {  // the whole rows' sums, given
        const double* given = h.stats + meta.given_sumsq;
        const double n = static_cast<double>(meta.given_n);
        for (int64_t r = r0 + threadIdx.x; r < r1; r += blockDim.x) out[r] = static_cast<float>(sqrt(given[r] / n));
      } else {
        rows_sumsq(p, d, r0, r1, [&](int64_t r, double s) { out[r] = static_cast<float>(sqrt(s / static_cast<double>(d))); });
      }
    }
  }
};

// Finalisation: one block per tensor of a pre-pass table.
template <typename Table>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM) tiger_finalize_kernel(const SK_GRID_CONSTANT Table tl,
                                                                       const SK_GRID_CONSTANT TigerHyper h) {
  if (h.common.skip()) return;
  const int t = blockIdx.x;
  const TigerMeta& meta = tl.meta[t];
  const bool matrix_rms = h.scalars(*meta.step, meta.role).update && meta.role == kRoleMatrix;
  const int64_t nchunks = (tl.numel[t] + tl.chunk_elems[t] - 1) / tl.chunk_elems[t];
  int nan = 0;
  for (int64_t i = threadIdx.x; i < nchunks; i += blockDim.x) nan |= h.ws.chunk_nan[meta.slot_base + i];
  nan = __syncthreads_or(nan);
  // NOTE: [CUDA sums of squares out]: tiger_sums_out_kernel sums the update's slots the same way.
  double sumsq = matrix_rms ? sum_slots(h.ws.chunk_sumsq + meta.slot_base, nchunks) : 0.0;
  if (threadIdx.x == 0) {
    TigerTensorInfo info;
    info.nan = meta.given_nan >= 0 ? h.stats[meta.given_nan] != 0.0 : nan != 0;
    const bool given = meta.given_sumsq >= 0;  // NOTE: [Tiger statistics input]
    if (given && matrix_rms) sumsq = h.stats[meta.given_sumsq];
    const double n = static_cast<double>(given ? meta.given_n : tl.numel[t]);
    info.rms = matrix_rms ? static_cast<float>(sqrt(sumsq / n)) : 0.0f;
    h.ws.info[meta.index] = info;
  }
}

// After the update (NOTE: [CUDA sums of squares out]), one block per tensor of an update
// table: a matrix's sums out from the update's chunk slots, summed as tiger_finalize_kernel sums
// the pre-pass's. (Embedding rows were written by the update itself.)
template <typename Table>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM) tiger_sums_out_kernel(const SK_GRID_CONSTANT Table tl,
                                                                       const SK_GRID_CONSTANT TigerHyper h) {
  const int t = blockIdx.x;
  const TigerMeta& meta = tl.meta[t];
  if (meta.role != kRoleMatrix || !fills_sums(h, meta, h.common.skip())) return;
  const int64_t nchunks = (tl.numel[t] + tl.chunk_elems[t] - 1) / tl.chunk_elems[t];
  const double sumsq = sum_slots(h.ws.chunk_sumsq + meta.slot_base, nchunks);
  if (threadIdx.x == 0) h.sumsq_out[meta.out_at] = sumsq;
}

// The update, in ordinary chunks (row-aligned ones for embeddings whose sums are wanted),
// after the pre-pass and finalisation of every tensor.
template <typename P, typename G, typename S>
struct TigerUpdateFunctor {
  TigerHyper h;

  template <typename Table>
  __device__ __forceinline__ void operator()(const Table& tl, const Chunk& c) const {
    const TigerMeta& meta = tl.meta[c.tensor];
    if (h.common.skip()) {  // nothing is written; the sums out are read from θ where wanted
      if (fills_sums(h, meta, true)) chunk_sums_out<P>(h, tl, c, meta, false, 0.0);
      return;
    }
    const int64_t t = *meta.step;
    const TigerScalars sc = h.scalars(t, meta.role);
    const TigerTensorInfo info = h.ws.info[meta.index];
    const uint32_t key_p = sr_key(meta.seed, t, kStreamParam);
    const uint32_t key_s = sr_key(meta.seed, t, kStreamState);
    const bool sr = h.common.sr;
    P* p = static_cast<P*>(tl.ptrs[kParamIdx][c.tensor]);
    const G* g = static_cast<const G*>(tl.ptrs[kGradIdx][c.tensor]);
    S* m = static_cast<S*>(tl.ptrs[kStateIdx][c.tensor]);
    // NOTE: [CUDA sums of squares out]: this thread's share of a matrix chunk's sums, from the
    // values stored, where the packs are thread_sumsq's (contiguous layout).
    const bool fill = fills_sums(h, meta, false);
    const bool sum_regs = fill && meta.role == kRoleMatrix;
    double acc = 0.0;

    if (info.nan) {  // NaN guard: m unchanged, θ shrunk towards its centre
      const bool aligned = all_aligned16(c.begin, p);
      for_each_pack(c, aligned, [&](const PackSlot& s) {
        Pack<P> pk;
        load_pack(pk, p, s);
#pragma unroll
        for (int j = 0; j < kILP; ++j) {
          float pf = to_f32(pk.v[j]);
          tiger_shrink(pf, sc);
          store(&pk.v[j], pf, key_p, s.index(j), sr);
          if (sum_regs && aligned) acc += s.valid(j) ? sq(pk.v[j]) : 0.0;
        }
        store_pack(p, pk, s);
      });
      if (fill) chunk_sums_out<P>(h, tl, c, meta, aligned, acc);
      return;
    }

    const GradIn grad(h.common);
    if (!sc.update) {  // accumulation micro-step: θ is neither read nor written
      for_each_pack(c, all_aligned16(c.begin, g, m), [&](const PackSlot& s) {
        Pack<G> gk;
        Pack<S> mk;
        load_pack(gk, g, s);
        load_pack(mk, m, s);
#pragma unroll
        for (int j = 0; j < kILP; ++j) {
          float unused = 0.0f;
          float mf = to_f32(mk.v[j]);
          tiger_update(unused, mf, grad(gk.v[j]), 0.0f, sc);
          store(&mk.v[j], mf, key_s, s.index(j), sr);
        }
        store_pack(m, mk, s);
      });
      if (fill) chunk_sums_out<P>(h, tl, c, meta, false, 0.0);  // θ as it is, read for the sums
      return;
    }

    const float lr = h.common.learning_rate();
    const bool per_row = meta.role == kRoleEmbedding;
    const float lr_tensor = tiger_lr(lr, meta.role, info.rms);  // unused for embeddings
    const int64_t d = meta.row_size;
    const float* row_rms = h.ws.row_rms + meta.row_base;
    const bool aligned = all_aligned16(c.begin, p, g, m);
    for_each_pack(c, aligned, [&](const PackSlot& s) {
      Pack<P> pk;
      Pack<G> gk;
      Pack<S> mk;
      load_pack(pk, p, s);
      load_pack(gk, g, s);
      load_pack(mk, m, s);
      // Row cursor of element 0; contiguous packs advance it without a division.
      int64_t row = per_row ? s.first / d : 0;
      int64_t col = per_row ? s.first - row * d : 0;
#pragma unroll
      for (int j = 0; j < kILP; ++j) {
        float lr_p = lr_tensor;
        if (per_row) {
          if (s.stride != 1 && j > 0) {
            row = s.index(j) / d;
          } else if (col == d) {
            ++row;
            col = 0;
          }
          ++col;
          lr_p = tiger_lr(lr, meta.role, s.valid(j) ? row_rms[row] : 0.0f);
        }
        float pf = to_f32(pk.v[j]);
        float mf = to_f32(mk.v[j]);
        tiger_update(pf, mf, grad(gk.v[j]), lr_p, sc);
        store(&pk.v[j], pf, key_p, s.index(j), sr);
        store(&mk.v[j], mf, key_s, s.index(j), sr);
        if (sum_regs && aligned) acc += s.valid(j) ? sq(pk.v[j]) : 0.0;
      }
      store_pack(p, pk, s);
      store_pack(m, mk, s);
    });
    if (fill) chunk_sums_out<P>(h, tl, c, meta, aligned, acc);
  }
};

}  // namespace cuda
}  // namespace sign_kernels
