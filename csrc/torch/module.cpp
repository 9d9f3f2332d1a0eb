// module.cpp -- the Python module sign_kernels._C. Importing it registers the kernels
// (STABLE_TORCH_LIBRARY_IMPL blocks in cpu_ops.cpp and, when built, cuda_ops.cu) with the
// dispatcher; the ops themselves are declared in sign_kernels/_ops.py.
//
// NOTE: [no pybind11 here] The module exports a few introspection values and functions and
// nothing else, so it uses the plain CPython API: <torch/extension.h> (pybind11 and torch's
// Python bindings) was the slowest file of the build by far (measured: ~1.3x cpu_ops.cpp, ~2x a
// CPU kernel file), for three one-line functions.
//
// NOTE: [limited API] Only CPython's limited API (Py_LIMITED_API, set by setup.py to the oldest
// Python the targeted torch supports), so one abi3 module serves every CPython from that one on;
// with the torch side on the stable ABI (NOTE: [stable ABI] in stable.h) one wheel serves every
// torch and every Python. scripts/abi_check.sh fails on any other CPython symbol.
#ifndef Py_LIMITED_API
#error "sign_kernels._C is built against CPython's limited API: setup.py defines Py_LIMITED_API"
#endif
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cstdint>

#include "../cpu/sign_cpu.h"

namespace sign_kernels {
int64_t cpu_threads_used(int64_t items);  // cpu_ops.cpp
}  // namespace sign_kernels

namespace {

#ifdef SIGN_KERNELS_WITH_CUDA
constexpr bool kCudaCompiled = true;
#else
constexpr bool kCudaCompiled = false;
#endif

PyObject* cuda_compiled(PyObject*, PyObject*) { return PyBool_FromLong(kCudaCompiled); }

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
    {"cuda_compiled", cuda_compiled, METH_NOARGS,
     "Whether the CUDA kernels were compiled into this module (the constant CUDA_COMPILED)."},
    {"cpu_isa", cpu_isa, METH_NOARGS,
     "Instruction set of the CPU kernels in use: 'avx512', 'avx2' or 'baseline' "
     "(SIGN_KERNELS_CPU_ISA=baseline or avx2 forces a lower one; the constant CPU_ISA)."},
    {"cpu_threads_used", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(cpu_threads_used)),
     METH_VARARGS | METH_KEYWORDS,
     "cpu_threads_used(items=1024): how many threads the CPU kernels' parallel loop spreads `items` work "
     "items over: torch.get_num_threads() for a correct build, 1 if the loop runs serially."},
    {"cpu_tiger_window", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(cpu_tiger_window)),
     METH_VARARGS | METH_KEYWORDS,
     "cpu_tiger_window(elems=0): the elements per window of the CPU Tiger kernel's two passes "
     "(NOTE: [Tiger windows] in csrc/cpu/sign_cpu.cpp); sets it when elems >= 1 and returns the previous "
     "value. Results do not depend on it (tests use small windows)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                          "sign_kernels compiled kernels (CPU, and CUDA when built with it)", -1, methods,
                          nullptr, nullptr, nullptr, nullptr};

// Adds `value` (a new reference, or null after a failure) as module attribute `name`.
bool add(PyObject* module, const char* name, PyObject* value) {
  if (value == nullptr) return false;
  if (PyModule_AddObject(module, name, value) < 0) {  // steals `value` only on success
    Py_DECREF(value);
    return false;
  }
  return true;
}

}  // namespace

// The constants are plain values, read once here: Python code (backend selection in
// sign_kernels/backends) reads them without calling into the module, which torch.compile's
// Dynamo cannot trace. The functions of the same names stay for callers that call them.
PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  if (!add(module, "CUDA_COMPILED", PyBool_FromLong(kCudaCompiled)) ||
      !add(module, "CPU_ISA", PyUnicode_FromString(sign_kernels::cpu::isa()))) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
