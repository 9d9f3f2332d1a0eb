// dispatch.cuh -- from runtime dtypes to the kernel instantiations, in one place.
//
// visit_param(dtype, f) calls f(T{}) with the storage type of the params; visit_grad<P>
// and visit_state<P> do the same for the combinations the kernels take (launch.h,
// dtypes_supported): grads P or float; momentum P, float or bf16. Only those
// combinations are instantiated (12 for Lion and Tiger, 5 for Simba), which bounds
// compile time. An unsupported dtype returns cudaErrorInvalidValue before any launch.
#pragma once

#include <cuda_runtime.h>

#include <type_traits>

#include "core/sign_math.h"
#include "cuda/launch.h"
#include "cuda/multi_tensor_apply.cuh"
#include "cuda/sign_functors.cuh"

namespace sign_kernels {
namespace cuda {

template <typename T> struct DTypeOf;
template <> struct DTypeOf<float> { static constexpr DType value = DType::kFloat32; };
template <> struct DTypeOf<bf16_t> { static constexpr DType value = DType::kBFloat16; };
template <> struct DTypeOf<fp16_t> { static constexpr DType value = DType::kFloat16; };
template <> struct DTypeOf<int16_t> { static constexpr DType value = DType::kInt16; };

template <typename F>
cudaError_t visit_param(DType d, F&& f) {
  switch (d) {
    case DType::kFloat32: return f(float{});
    case DType::kBFloat16: return f(bf16_t{});
    case DType::kFloat16: return f(fp16_t{});
    default: return cudaErrorInvalidValue;
  }
}

template <typename P, typename F>
cudaError_t visit_grad(DType d, F&& f) {
  if (d == DTypeOf<P>::value) return f(P{});
  if constexpr (!std::is_same_v<P, float>) {
    if (d == DType::kFloat32) return f(float{});
  }
  return cudaErrorInvalidValue;
}

template <typename P, typename F>
cudaError_t visit_state(DType d, F&& f) {
  if (d == DTypeOf<P>::value) return f(P{});
  if constexpr (!std::is_same_v<P, float>) {
    if (d == DType::kFloat32) return f(float{});
  }
  if constexpr (!std::is_same_v<P, bf16_t>) {
    if (d == DType::kBFloat16) return f(bf16_t{});
  }
  return cudaErrorInvalidValue;
}

// The device view of the shared arguments.
inline DeviceCommon device_common(const Common& c) {
  DeviceCommon d;
  d.lr = c.lr;
  d.lr_ptr = c.lr_ptr;
  d.grad_scale = c.grad_scale;
  d.found_inf = c.found_inf;
  d.clip = c.clip;
  d.sr = c.stochastic_rounding;
  return d;
}

// The three lists (param, grad, state) of a TensorList.
inline TensorLists<3> lists3(const TensorList& t) {
  TensorLists<3> l;
  l.ptrs[kParamIdx] = t.params;
  l.ptrs[kGradIdx] = t.grads;
  l.ptrs[kStateIdx] = t.states;
  l.numel = t.numels;
  l.count = t.count;
  return l;
}

inline bool list_ok(const TensorList& t) {
  return t.count == 0 || (t.params && t.grads && t.states && t.numels && t.steps && t.seeds);
}

}  // namespace cuda
}  // namespace sign_kernels
