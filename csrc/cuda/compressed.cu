// compressed.cu -- the launches of Lion and Tiger with 8-bit momentum and/or the correction
// byte (NOTE: [CUDA row blocks] and NOTE: [CUDA compressed Tiger] in compressed.cuh).
#include <type_traits>
#include <vector>

#include "cuda/compressed.cuh"
#include "cuda/dispatch.cuh"

namespace sign_kernels {
namespace cuda {
namespace {

// Calls f(P{}, G{}, S{}, std::integral_constant<bool, kEc>{}) for the combinations the
// compressed kernels take (compressed_ok has checked the list).
template <typename F>
cudaError_t visit_compressed(const TensorList& t, F&& f) {
  const bool ec = t.residuals != nullptr;
  return visit_param(t.param_dtype, [&](auto p_tag) {
    using P = decltype(p_tag);
    return visit_grad<P>(t.grad_dtype, [&](auto g_tag) {
      using G = decltype(g_tag);
      auto with_state = [&](auto s_tag) -> cudaError_t {
        using S = decltype(s_tag);
        constexpr bool kQ8 = std::is_same<S, int8_t>::value;
        if constexpr (std::is_same<P, float>::value) {
          if constexpr (kQ8) {
            if (!ec) return f(P{}, G{}, S{}, std::false_type{});
          }
          return cudaErrorInvalidValue;  // no correction byte for fp32; fp32 momentum: not compressed
        } else {
          if (ec) return f(P{}, G{}, S{}, std::true_type{});
          if constexpr (kQ8) return f(P{}, G{}, S{}, std::false_type{});
          return cudaErrorInvalidValue;  // neither int8 nor residuals: not a compressed list
        }
      };
      if (t.state_dtype == DType::kInt8) return with_state(int8_t{});
      return visit_state<P>(t.state_dtype, with_state);
    });
  });
}

// The five lists of a compressed launch; null tables where scales or residuals are absent.
struct CompressedLists {
  std::vector<void*> nulls;
  std::vector<int64_t> segments;  // per tensor: the "numel" of the table (NOTE: [CUDA row blocks])
  TensorLists<5> lists;

  explicit CompressedLists(const TensorList& t) : nulls(static_cast<size_t>(t.count), nullptr),
                                                  segments(static_cast<size_t>(t.count), 0) {
    lists.ptrs[kParamIdx] = t.params;
    lists.ptrs[kGradIdx] = t.grads;
    lists.ptrs[kStateIdx] = t.states;
    lists.ptrs[kScaleIdx] = t.scales != nullptr ? t.scales : nulls.data();
    lists.ptrs[kResidualIdx] = t.residuals != nullptr ? t.residuals : nulls.data();
    lists.numel = segments.data();
    lists.count = t.count;
  }
};

// Segments of a tensor of n elements cut into rows of `cols`: rows x ceil(cols / 64).
int64_t segments_of(int64_t n, int64_t cols) { return n > 0 ? (n / cols) * ((cols + kQBlock - 1) / kQBlock) : 0; }

template <int Depth, typename Meta, typename Functor, typename MetaFn, typename ChunkFn>
cudaError_t launch_rows(const TensorLists<Depth>& lists, MetaFn&& meta_of, ChunkFn&& chunk_of, const Functor& f,
                        cudaStream_t stream) {
  using Table = TensorTable<Depth, Meta>;
  static_assert(sizeof(Table) + sizeof(Functor) <= kArgBytes, "kernel arguments exceed the parameter limit");
  static_assert(sizeof(Functor) <= kFunctorArgBytes, "functor arguments exceed their budget");
  static_assert(std::is_trivially_copyable<Functor>::value, "functors are passed by value to the kernel");
  return for_each_table<Depth, Meta>(lists, meta_of, chunk_of, [&](const Table& tl) {
    row_block_kernel<Table, Functor>
        <<<static_cast<unsigned>(tl.block_start[tl.num_tensors]), kBlockThreads, 0, stream>>>(tl, f);
    return cudaGetLastError();
  });
}

}  // namespace

bool compressed_ok(const TensorList& t, const int64_t* tiger_rows) {
  if (!list_ok(t)) return false;
  const bool q8 = t.scales != nullptr;
  if (q8 != (t.state_dtype == DType::kInt8)) return false;  // int8 momentum needs its scales, and only it
  if (q8 && t.row_sizes == nullptr) return false;
  if (t.residuals != nullptr && t.param_dtype != DType::kBFloat16 && t.param_dtype != DType::kFloat16) return false;
  if (!q8 && t.residuals == nullptr) return false;
  const bool p_ok = t.param_dtype == DType::kFloat32 || t.param_dtype == DType::kBFloat16 ||
                    t.param_dtype == DType::kFloat16;
  const bool g_ok = t.grad_dtype == t.param_dtype || t.grad_dtype == DType::kFloat32;
  const bool s_ok = q8 || t.state_dtype == t.param_dtype || t.state_dtype == DType::kFloat32 ||
                    t.state_dtype == DType::kBFloat16;
  if (!p_ok || !g_ok || !s_ok) return false;
  for (int64_t i = 0; i < t.count; ++i) {
    const int64_t n = t.numels[i];
    if (n < 0) return false;
    if (!q8 || n == 0) continue;
    const int64_t cols = t.row_sizes[i];
    if (cols <= 0 || n % cols != 0) return false;
    if (tiger_rows != nullptr && tiger_rows[i] != cols) return false;  // one last dim
    if (t.scales[i] == nullptr) return false;
  }
  if (t.residuals != nullptr)
    for (int64_t i = 0; i < t.count; ++i)
      if (t.numels[i] > 0 && t.residuals[i] == nullptr) return false;
  return true;
}

cudaError_t lion_compressed(const TensorList& t, const LionArgs& a, cudaStream_t stream) {
  if (!compressed_ok(t, nullptr)) return cudaErrorInvalidValue;
  if (t.count == 0) return cudaSuccess;
  const bool q8 = t.scales != nullptr;
  CompressedLists cl(t);
  std::vector<LionSegMeta> metas(static_cast<size_t>(t.count));
  for (int64_t i = 0; i < t.count; ++i) {
    LionSegMeta& m = metas[static_cast<size_t>(i)];
    const int64_t n = t.numels[i];
    // int8 momentum: the rows of its blocks; the correction byte alone: one row (element-wise).
    m.cols = q8 ? t.row_sizes[i] : (n > 0 ? n : 1);
    m.nb = (m.cols + kQBlock - 1) / kQBlock;
    m.step = t.steps[i];
    m.seed = static_cast<uint32_t>(t.seeds[i]);
    cl.segments[static_cast<size_t>(i)] = segments_of(n, m.cols);
  }
  return visit_compressed(t, [&](auto p_tag, auto g_tag, auto s_tag, auto ec) {
    using F = LionCompressedFunctor<decltype(p_tag), decltype(g_tag), decltype(s_tag), decltype(ec)::value>;
    F f;
    f.common = device_common(a.common);
    f.beta1 = a.beta1;
    f.beta2 = a.beta2;
    f.weight_decay = a.weight_decay;
    return launch_rows<5, LionSegMeta>(
        cl.lists, [&](int64_t i) { return metas[static_cast<size_t>(i)]; },
        [](int64_t) { return static_cast<int64_t>(kSegsPerBlock); }, f, stream);
  });
}

cudaError_t tiger_compressed(const TensorList& t, const TigerArgs& a, const TigerHyper& h,
                             const std::vector<TigerMeta>& metas, cudaStream_t stream) {
  if (!compressed_ok(t, a.row_sizes) || metas.size() != static_cast<size_t>(t.count)) return cudaErrorInvalidValue;
  const bool q8 = t.scales != nullptr;
  CompressedLists cl(t);
  std::vector<TigerSegMeta> seg_metas(static_cast<size_t>(t.count));
  for (int64_t i = 0; i < t.count; ++i) {
    TigerSegMeta& m = seg_metas[static_cast<size_t>(i)];
    const int64_t n = t.numels[i];
    m.tiger = metas[static_cast<size_t>(i)];
    // int8 blocks: rows of the last dim; embeddings: their rows (the per-row lr); else one row.
    const bool rows = q8 || a.roles[i] == kRoleEmbedding;
    m.cols = rows ? a.row_sizes[i] : (n > 0 ? n : 1);
    if (n > 0 && (m.cols <= 0 || n % m.cols != 0)) return cudaErrorInvalidValue;
    if (m.cols <= 0) m.cols = 1;
    m.nb = (m.cols + kQBlock - 1) / kQBlock;
    cl.segments[static_cast<size_t>(i)] = segments_of(n, m.cols);
  }
  cudaError_t err = visit_compressed(t, [&](auto p_tag, auto g_tag, auto s_tag, auto ec) {
    using F = TigerCompressedFunctor<decltype(p_tag), decltype(g_tag), decltype(s_tag), decltype(ec)::value>;
    F f;
    f.h = h;
    return launch_rows<5, TigerSegMeta>(
        cl.lists, [&](int64_t i) { return seg_metas[static_cast<size_t>(i)]; },
        [](int64_t) { return static_cast<int64_t>(kSegsPerBlock); }, f, stream);
  });
  if (err != cudaSuccess || a.sumsq_out == nullptr) return err;
  // The sums out, from θ as the update left it, over the pre-pass's chunks.
  TensorLists<1> theta;
  theta.ptrs[kParamIdx] = t.params;
  theta.numel = t.numels;
  theta.count = t.count;
  auto meta_of = [&](int64_t i) { return metas[static_cast<size_t>(i)]; };
  auto chunk_of = [&](int64_t i) { return prepass_chunk(a.roles[i], a.row_sizes[i]); };
  return visit_param(t.param_dtype, [&](auto p_tag) {
    using P = decltype(p_tag);
    using Table = TensorTable<1, TigerMeta>;
    using F = TigerSumsOutFunctor<P>;
    static_assert(sizeof(Table) + sizeof(F) <= kArgBytes, "kernel arguments exceed the parameter limit");
    static_assert(sizeof(Table) + sizeof(TigerHyper) <= kArgBytes, "kernel arguments exceed the parameter limit");
    F f;
    f.h = h;
    return for_each_table<1, TigerMeta>(theta, meta_of, chunk_of, [&](const Table& tl) {
      row_block_kernel<Table, F>
          <<<static_cast<unsigned>(tl.block_start[tl.num_tensors]), kBlockThreads, 0, stream>>>(tl, f);
      cudaError_t e = cudaGetLastError();
      if (e != cudaSuccess) return e;
      tiger_sums_out_kernel<Table><<<static_cast<unsigned>(tl.num_tensors), kBlockThreads, 0, stream>>>(tl, h);
      return cudaGetLastError();
    });
  });
}

}  // namespace cuda
}  // namespace sign_kernels
