// tiger.cu -- Tiger: pre-pass (NaN flags, sums of squares), finalisation, update.
// NOTE: [Tiger pre-pass] in sign_functors.cuh says why three kernels.
#include <vector>

#include "cuda/compressed.cuh"
#include "cuda/dispatch.cuh"

namespace sign_kernels {
namespace cuda {
namespace {

size_t align16(size_t n) { return (n + 15) & ~static_cast<size_t>(15); }

struct Layout {
  size_t info = 0, chunk_nan = 0, chunk_sumsq = 0, row_rms = 0, total = 0;  // byte offsets, size
  bool ok = false;
};

// Byte layout of the workspace, and (if metas) the metadata of every tensor.
Layout layout(const TensorList& t, const TigerArgs& a, std::vector<TigerMeta>* metas) {
  Layout L;
  if (!list_ok(t) || (t.count > 0 && (a.roles == nullptr || a.row_sizes == nullptr))) return L;
  if (a.stats != nullptr && (a.stats_nan == nullptr || a.stats_sumsq == nullptr || a.stats_n == nullptr)) return L;
  if (a.sumsq_out != nullptr && a.sumsq_out_at == nullptr) return L;
  if (t.count > 0x7FFFFFFF) return L;
  if (metas) metas->resize(static_cast<size_t>(t.count));
  int64_t slots = 0, rows = 0;
  for (int64_t i = 0; i < t.count; ++i) {
    const int64_t role = a.roles[i], n = t.numels[i], d = a.row_sizes[i];
    if (role < kRoleElementwise || role > kRoleMatrix || n < 0) return L;
    const bool embedding = role == kRoleEmbedding;
    if (embedding && n > 0 && (d <= 0 || n % d != 0)) return L;
    if (metas) {
      TigerMeta& m = (*metas)[static_cast<size_t>(i)];
      m.step = t.steps[i];
      m.row_size = embedding ? d : 1;
      m.row_base = rows;
      m.slot_base = slots;
      m.seed = static_cast<uint32_t>(t.seeds[i]);
      m.index = static_cast<int32_t>(i);
      m.role = static_cast<int32_t>(role);
      const bool given = a.stats != nullptr;  // NOTE: [Tiger statistics input]
      m.given_nan = given ? a.stats_nan[i] : -1;
      m.given_sumsq = given ? a.stats_sumsq[i] : -1;
      m.given_n = given ? a.stats_n[i] : 0;
      // NOTE: [CUDA sums of squares out]: element-wise roles have none.
      const bool out = a.sumsq_out != nullptr && role >= kRoleEmbedding;
      m.out_at = out ? a.sumsq_out_at[i] : -1;
      m.out_kept = out && a.stats != nullptr && a.stats == a.sumsq_out && a.stats_sumsq[i] == m.out_at;
    }
    if (n == 0) continue;
    const int64_t chunk = prepass_chunk(role, d);
    slots += (n + chunk - 1) / chunk;
    if (embedding) rows += n / d;
  }
  L.info = 0;
  L.chunk_nan = align16(sizeof(TigerTensorInfo) * static_cast<size_t>(t.count));
  L.chunk_sumsq = L.chunk_nan + align16(sizeof(int32_t) * static_cast<size_t>(slots));
  L.row_rms = L.chunk_sumsq + align16(sizeof(double) * static_cast<size_t>(slots));
  L.total = L.row_rms + align16(sizeof(float) * static_cast<size_t>(rows));
  if (L.total < 16) L.total = 16;
  L.ok = true;
  return L;
}

}  // namespace

size_t tiger_workspace_bytes(const TensorList& t, const TigerArgs& a) {
  const Layout L = layout(t, a, nullptr);
  return L.ok ? L.total : 0;
}

cudaError_t tiger(const TensorList& t, const TigerArgs& a, cudaStream_t stream) {
  if (a.grad_accum_steps < 1) return cudaErrorInvalidValue;
  std::vector<TigerMeta> metas;
  const Layout L = layout(t, a, &metas);
  if (!L.ok) return cudaErrorInvalidValue;
  // int8 momentum / the correction byte: the same pre-pass, then the row-block update
  // (NOTE: [CUDA compressed Tiger] in compressed.cuh); refused before anything is enqueued.
  const bool compressed = is_compressed(t);
  if (compressed && !compressed_ok(t, a.row_sizes)) return cudaErrorInvalidValue;
  if (t.count == 0) return cudaSuccess;
  char* ws = static_cast<char*>(a.workspace);
  if (ws == nullptr || a.workspace_bytes < L.total || (reinterpret_cast<uintptr_t>(ws) & 15u) != 0)
    return cudaErrorInvalidValue;

  TigerHyper h;
  h.common = device_common(a.common);
  h.beta = a.beta;
  h.weight_decay = a.weight_decay;
  h.shrink_ratio = a.shrink_ratio;
  h.grad_accum_steps = a.grad_accum_steps;
  h.ws.info = reinterpret_cast<TigerTensorInfo*>(ws + L.info);
  h.ws.chunk_nan = reinterpret_cast<int32_t*>(ws + L.chunk_nan);
  h.ws.chunk_sumsq = reinterpret_cast<double*>(ws + L.chunk_sumsq);
  h.ws.row_rms = reinterpret_cast<float*>(ws + L.row_rms);
  h.stats = a.stats;
  h.sumsq_out = a.sumsq_out;

  auto meta_of = [&](int64_t i) { return metas[static_cast<size_t>(i)]; };
  auto chunk_of = [&](int64_t i) { return prepass_chunk(a.roles[i], a.row_sizes[i]); };
  TensorLists<2> pre_lists;
  pre_lists.ptrs[kParamIdx] = t.params;
  pre_lists.ptrs[kGradIdx] = t.grads;
  pre_lists.numel = t.numels;
  pre_lists.count = t.count;

  return visit_param(t.param_dtype, [&](auto p_tag) {
    using P = decltype(p_tag);
    return visit_grad<P>(t.grad_dtype, [&](auto g_tag) {
      using G = decltype(g_tag);
      // 1 + 2: pre-pass and finalisation, table by table.
      using PreTable = TensorTable<2, TigerMeta>;
      using Pre = TigerPrepassFunctor<P, G>;
      static_assert(sizeof(PreTable) + sizeof(Pre) <= kArgBytes, "kernel arguments exceed the parameter limit");
      static_assert(sizeof(PreTable) + sizeof(TigerHyper) <= kArgBytes, "kernel arguments exceed the parameter limit");
      Pre pre;
      pre.h = h;
      cudaError_t err = for_each_table<2, TigerMeta>(pre_lists, meta_of, chunk_of, [&](const PreTable& tl) {
        multi_tensor_apply_kernel<2, TigerMeta, Pre>
            <<<static_cast<unsigned>(tl.block_start[tl.num_tensors]), kBlockThreads, 0, stream>>>(tl, pre);
        cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess) return e;
        tiger_finalize_kernel<PreTable><<<static_cast<unsigned>(tl.num_tensors), kBlockThreads, 0, stream>>>(tl, h);
        return cudaGetLastError();
      });
      if (err != cudaSuccess) return err;
      if (compressed) return tiger_compressed(t, a, h, metas, stream);
      // 3: the update; 4: with sums out, the matrices' sums from its chunk slots (NOTE: [CUDA
      // sums of squares out]: embeddings whose sums are wanted are updated in the pre-pass's
      // row-aligned chunks).
      return visit_state<P>(t.state_dtype, [&](auto s_tag) {
        using S = decltype(s_tag);
        using Up = TigerUpdateFunctor<P, G, S>;
        using UpTable = TensorTable<3, TigerMeta>;
        static_assert(sizeof(UpTable) + sizeof(Up) <= kArgBytes, "kernel arguments exceed the parameter limit");
        static_assert(sizeof(Up) <= kFunctorArgBytes, "functor arguments exceed their budget");
        Up up;
        up.h = h;
        auto up_chunk = [&](int64_t i) {
          const bool rows_out = a.sumsq_out != nullptr && a.roles[i] == kRoleEmbedding && a.sumsq_out_at[i] >= 0;
          return rows_out ? prepass_chunk(a.roles[i], a.row_sizes[i]) : kChunkElems;
        };
        return for_each_table<3, TigerMeta>(lists3(t), meta_of, up_chunk, [&](const UpTable& tl) {
          multi_tensor_apply_kernel<3, TigerMeta, Up>
              <<<static_cast<unsigned>(tl.block_start[tl.num_tensors]), kBlockThreads, 0, stream>>>(tl, up);
          cudaError_t e = cudaGetLastError();
          if (e != cudaSuccess || a.sumsq_out == nullptr) return e;
          tiger_sums_out_kernel<UpTable><<<static_cast<unsigned>(tl.num_tensors), kBlockThreads, 0, stream>>>(tl, h);
          return cudaGetLastError();
        });
      });
    });
  });
}

}  // namespace cuda
}  // namespace sign_kernels
