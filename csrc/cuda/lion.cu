// lion.cu -- Lion: one fused pass, θ g m read once, θ m written once (20 B/elem at fp32).
// int8 momentum and the correction byte: compressed.cu (NOTE: [CUDA row blocks]).
#include "cuda/compressed.cuh"
#include "cuda/dispatch.cuh"

namespace sign_kernels {
namespace cuda {

cudaError_t lion(const TensorList& t, const LionArgs& a, cudaStream_t stream) {
  if (!list_ok(t)) return cudaErrorInvalidValue;
  if (is_compressed(t)) return lion_compressed(t, a, stream);
  return visit_param(t.param_dtype, [&](auto p_tag) {
    using P = decltype(p_tag);
    return visit_grad<P>(t.grad_dtype, [&](auto g_tag) {
      using G = decltype(g_tag);
      return visit_state<P>(t.state_dtype, [&](auto s_tag) {
        using S = decltype(s_tag);
        LionFunctor<P, G, S> f;
        f.common = device_common(a.common);
        f.beta1 = a.beta1;
        f.beta2 = a.beta2;
        f.weight_decay = a.weight_decay;
        auto meta_of = [&](int64_t i) {
          LionMeta m;
          m.step = t.steps[i];
          m.seed = static_cast<uint32_t>(t.seeds[i]);
          return m;
        };
        return multi_tensor_apply<3, LionMeta>(lists3(t), meta_of, f, stream);
      });
    });
  });
}

}  // namespace cuda
}  // namespace sign_kernels
