// module.cpp -- the Python module sign_kernels._C. Importing it registers the kernels
// (TORCH_LIBRARY_IMPL blocks in cpu_ops.cpp and, when built, cuda_ops.cu) with the
// dispatcher; the ops themselves are declared in sign_kernels/_ops.py.
//
// NOTE: [no pybind11 here] The module exports three introspection functions and nothing
// else, so it uses the plain CPython API: <torch/extension.h> (pybind11 and torch's Python
// bindings) was the slowest file of the build by far (measured: ~1.3x cpu_ops.cpp, ~2x a
// CPU kernel file), for three one-line functions.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cstdint>

#include "../cpu/sign_cpu.h"

namespace sign_kernels {
int64_t cpu_threads_used(int64_t items);  // cpu_ops.cpp
}  // namespace sign_kernels

namespace {

PyObject* cuda_compiled(PyObject*, PyObject*) {
#ifdef SIGN_KERNELS_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyObject* cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(sign_kernels::cpu::isa()); }

PyObject* cpu_threads_used(PyObject*, PyObject* args, PyObject* kwargs) {
  static const char* keywords[] = {"items", nullptr};
  long long items = 1024;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|L", const_cast<char**>(keywords), &items)) return nullptr;
  return PyLong_FromLongLong(sign_kernels::cpu_threads_used(items));
}

PyObject* cpu_tiger_window(PyObject*, PyObject* args, PyObject* kwargs) {
  static const char* keywords[] = {"elems", nullptr};
  long long elems = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|L", const_cast<char**>(keywords), &elems)) return nullptr;
  return PyLong_FromLongLong(sign_kernels::cpu::set_tiger_window(elems));
}

PyMethodDef methods[] = {
    {"cuda_compiled", cuda_compiled, METH_NOARGS, "Whether the CUDA kernels were compiled into this module."},
    {"cpu_isa", cpu_isa, METH_NOARGS,
     "Instruction set of the CPU kernels in use: 'avx512', 'avx2' or 'baseline' "
     "(SIGN_KERNELS_CPU_ISA=baseline or avx2 forces a lower one)."},
    {"cpu_threads_used", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(cpu_threads_used)),
     METH_VARARGS | METH_KEYWORDS,
     "cpu_threads_used(items=1024): how many threads the CPU kernels' parallel loop spreads `items` work "
     "items over: torch.get_num_threads() for a correct build, 1 if it was compiled without torch's OpenMP."},
    {"cpu_tiger_window", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(cpu_tiger_window)),
     METH_VARARGS | METH_KEYWORDS,
     "cpu_tiger_window(elems=0): the elements per window of the CPU Tiger kernel's two passes "
     "(NOTE: [Tiger windows] in csrc/cpu/sign_cpu.cpp); sets it when elems >= 1 and returns the previous "
     "value. Results do not depend on it (tests use small windows)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                          "sign_kernels compiled kernels (CPU, and CUDA when built with it)", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
