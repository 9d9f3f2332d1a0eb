// simba.cu -- Simba: θ g s read once, θ s written once (16 B/elem at fp32 θ g, int16 s).
#include "cuda/dispatch.cuh"

namespace sign_kernels {
namespace cuda {

cudaError_t simba(const TensorList& t, const SimbaArgs& a, cudaStream_t stream) {
  if (!list_ok(t) || t.state_dtype != DType::kInt16) return cudaErrorInvalidValue;
  return visit_param(t.param_dtype, [&](auto p_tag) {
    using P = decltype(p_tag);
    return visit_grad<P>(t.grad_dtype, [&](auto g_tag) {
      using G = decltype(g_tag);
      SimbaFunctor<P, G> f;
      f.common = device_common(a.common);
      f.weight_decay = a.weight_decay;
      f.window = a.window_size;
      f.threshold_count = a.threshold_count;
      auto meta_of = [&](int64_t i) {
        SimbaMeta m;
        m.step = t.steps[i];
        m.seed = static_cast<uint32_t>(t.seeds[i]);
        return m;
      };
      return multi_tensor_apply<3, SimbaMeta>(lists3(t), meta_of, f, stream);
    });
  });
}

}  // namespace cuda
}  // namespace sign_kernels
