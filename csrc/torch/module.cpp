// module.cpp -- the Python module sign_kernels._C. Importing it registers the kernels
// (TORCH_LIBRARY_IMPL blocks in cpu_ops.cpp and, when built, cuda_ops.cu) with the
// dispatcher; the ops themselves are declared in sign_kernels/_ops.py.
#include <torch/extension.h>

#include "../cpu/sign_cpu.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "sign_kernels compiled kernels (CPU, and CUDA when built with it)";
  m.def("cuda_compiled", []() {
#ifdef SIGN_KERNELS_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether the CUDA kernels were compiled into this module.");
  m.def("cpu_isa", []() { return std::string(sign_kernels::cpu::isa()); },
        "Instruction set of the CPU kernels in use: 'avx2' or 'baseline' (SIGN_KERNELS_CPU_ISA=baseline forces it).");
}
