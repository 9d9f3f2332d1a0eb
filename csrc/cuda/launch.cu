// launch.cu -- the dtype rules and build facts of launch.h.
#include "cuda/launch.h"

namespace sign_kernels {
namespace cuda {

bool dtypes_supported(Op op, DType param, DType grad, DType state) {
  const bool p_ok = param == DType::kFloat32 || param == DType::kBFloat16 || param == DType::kFloat16;
  const bool g_ok = grad == param || grad == DType::kFloat32;
  // int8: 8-bit momentum, with its block scales in the TensorList (compressed.cuh).
  const bool s_ok = op == Op::kSimba
                        ? state == DType::kInt16
                        : (state == param || state == DType::kFloat32 || state == DType::kBFloat16 ||
                           state == DType::kInt8);
  return p_ok && g_ok && s_ok;
}

#define SK_STR2(x) #x
#define SK_STR(x) SK_STR2(x)
#ifndef SIGN_KERNELS_CUDA_ARCHS
#define SIGN_KERNELS_CUDA_ARCHS unknown
#endif

const char* build_info() {
  return "nvcc " SK_STR(__CUDACC_VER_MAJOR__) "." SK_STR(__CUDACC_VER_MINOR__) ", archs " SK_STR(
      SIGN_KERNELS_CUDA_ARCHS);
}

}  // namespace cuda
}  // namespace sign_kernels
