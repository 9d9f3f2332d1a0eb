// module.cpp -- the Python module sign_kernels._C. Importing it registers the kernels
// (TORCH_LIBRARY_IMPL blocks in cpu_ops.cpp and, when built, cuda_ops.cu) with the
// dispatcher; the ops themselves are declared in sign_kernels/_ops.py.
#include <torch/extension.h>

#include "../cpu/sign_cpu.h"

namespace sign_kernels {
int64_t cpu_threads_used(int64_t items);  // cpu_ops.cpp
}  // namespace sign_kernels

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
        "Instruction set of the CPU kernels in use: 'avx512', 'avx2' or 'baseline' "
        "(SIGN_KERNELS_CPU_ISA=baseline or avx2 forces a lower one).");
  m.def("cpu_threads_used", &sign_kernels::cpu_threads_used, pybind11::arg("items") = 1024,
        "How many threads the CPU kernels' parallel loop spreads `items` work items over: "
        "torch.get_num_threads() for a correct build, 1 if it was compiled without torch's OpenMP.");
}
