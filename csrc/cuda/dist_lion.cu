// dist_lion.cu -- Distributed Lion's fused passes on CUDA (dist_lion.h). One grid-stride
// launch per tensor: the passes run once per exchange bucket, whose tensors are few and
// large next to a model's; each thread owns whole packed bytes, so no two threads write one.
#include <type_traits>

#include "cuda/dist_lion.h"

#include "core/dist_lion_math.h"

namespace sign_kernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 4096;

template <class G, class S>
__global__ void pack_kernel(const G* __restrict__ g, S* __restrict__ m, uint8_t* __restrict__ out, int64_t n,
                            LionScalars s, const float* grad_scale, const float* found_inf, const float* clip) {
  const bool skip = found_inf != nullptr && *found_inf != 0.0f;
  const float scale = grad_scale != nullptr ? *grad_scale : 1.0f;
  const float coef = clip != nullptr ? *clip : 1.0f;
  const int64_t bytes = (n + 3) / 4;
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < bytes;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t byte = 0;
    if (!skip) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t i = 4 * b + j;
        if (i < n) {
          float mv = to_f32(m[i]);
          float gv = to_f32(g[i]);
          // The gradient used (NOTE: [CUDA gradient used] in sign_functors.cuh): the quotient,
          // then the clipping product, each rounded to fp32.
          if (grad_scale != nullptr) gv = __fdiv_rn(gv, scale);
          if (clip != nullptr) gv = __fmul_rn(gv, coef);
          byte |= dist_lion_pack_one(mv, gv, s) << (2 * j);
          store(m + i, mv, 0u, i, false);
        }
      }
    }
    out[b] = static_cast<uint8_t>(byte);
  }
}

template <class P, int kBits>
__global__ void apply_kernel(P* __restrict__ p, const uint8_t* __restrict__ v, int64_t n, float lr, const float* lr_t,
                             float weight_decay, float divisor, const float* found_inf) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  const float lr_ = lr_t != nullptr ? *lr_t : lr;
  const float decay = 1.0f - lr_ * weight_decay;  // as lion_scalars
  constexpr int kPerByte = 8 / kBits;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t f = dist_lion_field(v[i / kPerByte], i, kBits);
    store(p + i, dist_lion_apply_one(to_f32(p[i]), f, lr_, decay, divisor), 0u, i, false);
  }
}

int blocks_for(int64_t work) {
  const int64_t b = (work + kThreads - 1) / kThreads;
  return static_cast<int>(b < kMaxBlocks ? (b > 0 ? b : 1) : kMaxBlocks);
}

template <class F>
cudaError_t visit_float(DType d, F&& f) {
  switch (d) {
    case DType::kFloat32: return f(static_cast<float*>(nullptr));
    case DType::kBFloat16: return f(static_cast<bf16_t*>(nullptr));
    case DType::kFloat16: return f(static_cast<fp16_t*>(nullptr));
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t dist_lion_pack(const DistPackList& t, const DistPackArgs& a, cudaStream_t stream) {
  const LionScalars s = lion_scalars(0.0f, a.beta1, a.beta2, 0.0f);
  return visit_float(t.grad_dtype, [&](auto g_tag) {
    using G = std::remove_pointer_t<decltype(g_tag)>;
    return visit_float(t.state_dtype, [&](auto s_tag) {
      using S = std::remove_pointer_t<decltype(s_tag)>;
      for (int64_t i = 0; i < t.count; ++i) {
        if (t.numels[i] == 0) continue;
        pack_kernel<G, S><<<blocks_for((t.numels[i] + 3) / 4), kThreads, 0, stream>>>(
            static_cast<const G*>(t.grads[i]), static_cast<S*>(t.exp_avgs[i]), t.packed[i], t.numels[i], s,
            a.grad_scale, a.found_inf, a.clip);
      }
      return cudaGetLastError();
    });
  });
}

cudaError_t dist_lion_apply(const DistApplyList& t, const DistApplyArgs& a, cudaStream_t stream) {
  if (a.bits != 2 && a.bits != 4 && a.bits != 8) return cudaErrorInvalidValue;
  return visit_float(t.param_dtype, [&](auto p_tag) {
    using P = std::remove_pointer_t<decltype(p_tag)>;
    for (int64_t i = 0; i < t.count; ++i) {
      if (t.numels[i] == 0) continue;
      P* p = static_cast<P*>(t.params[i]);
      const uint8_t* v = t.votes[i];
      const int64_t n = t.numels[i];
      const int blocks = blocks_for(n);
      if (a.bits == 2)
        apply_kernel<P, 2><<<blocks, kThreads, 0, stream>>>(p, v, n, a.lr, a.lr_ptr, a.weight_decay, a.divisor,
                                                            a.found_inf);
      else if (a.bits == 4)
        apply_kernel<P, 4><<<blocks, kThreads, 0, stream>>>(p, v, n, a.lr, a.lr_ptr, a.weight_decay, a.divisor,
                                                            a.found_inf);
      else
        apply_kernel<P, 8><<<blocks, kThreads, 0, stream>>>(p, v, n, a.lr, a.lr_ptr, a.weight_decay, a.divisor,
                                                            a.found_inf);
    }
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace sign_kernels
