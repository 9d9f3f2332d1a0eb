"""Build of sign_kernels and its compiled kernels, sign_kernels._C.

    pip install --no-build-isolation .        # compiled install (uses the torch already installed)
    pip install --no-build-isolation -e .     # the same, editable

The extension is built against the torch found in the environment, hence
--no-build-isolation (an isolated build would download another torch). It always holds
the CPU kernels; it also holds the CUDA kernels when that torch has CUDA and nvcc is found.

Environment variables:
  SIGN_KERNELS_SKIP_CUDA=1      build the CPU kernels only, even where CUDA could be built.
  SIGN_KERNELS_NO_EXTENSION=1   build no extension at all (pure Python: reference and Triton backends).
  TORCH_CUDA_ARCH_LIST          CUDA architectures, e.g. "8.0;9.0a" (the default when unset).
  MAX_JOBS                      parallel compile jobs (ninja); defaults to the CPU count, at most 8.
  CUDA_HOME                     the CUDA toolkit (otherwise found from nvcc on PATH, also when that
                                nvcc is a wrapper script: nvcc --dryrun reports its TOP directory).
  SIGN_KERNELS_CPU_FLAGS        extra host compiler flags, e.g. "-march=native" for a local build.

Without torch at build time the build stops and says so (SIGN_KERNELS_NO_EXTENSION=1 for a
pure-Python install); a compile error is an error, never a silent pure-Python fallback.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0a"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _rel(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _is_toolkit(home: str) -> bool:
    libs = [os.path.join(home, d, "libcudart.so") for d in ("lib64", "lib", "targets/x86_64-linux/lib")]
    return os.path.isfile(os.path.join(home, "bin", "nvcc")) and any(map(os.path.exists, libs))


def _set_cuda_home_from_nvcc() -> None:
    """Set CUDA_HOME from nvcc when it is unset, before torch.utils.cpp_extension reads it.

    NOTE: [nvcc wrapper] torch takes CUDA_HOME = dirname(dirname(which nvcc)). Where nvcc
    on PATH is a wrapper script (e.g. /usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc)
    that is /usr/local, which has no lib64/libcudart.so, and the link fails with
    `cannot find -lcudart`. nvcc itself knows its toolkit: `nvcc --dryrun` prints `TOP=...`.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return  # no toolkit: torch finds none either, and the CPU-only build is announced below
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if not _is_toolkit(home):
        try:
            out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=120)
            top = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
        except (OSError, subprocess.SubprocessError):
            top = None
        home = os.path.realpath(top.group(1).strip()) if top else home
    if not _is_toolkit(home):
        raise SystemExit(f"sign_kernels: nvcc ({nvcc}) is not inside a CUDA toolkit this build can find "
                         f"(looked at {home}): set CUDA_HOME to the toolkit directory (the one holding "
                         "bin/nvcc and lib64/libcudart.so), or SIGN_KERNELS_SKIP_CUDA=1 for a CPU-only build")
    print(f"sign_kernels: CUDA_HOME unset; using {home} (from {nvcc})", file=sys.stderr)
    os.environ["CUDA_HOME"] = home


def _openmp_flags(torch) -> list[str]:
    """-fopenmp when torch's intra-op parallelism is OpenMP (its Linux wheels), else nothing.

    NOTE: [OpenMP in the binding] The CPU op runs on torch's thread pool through
    at::parallel_for, whose OpenMP implementation is inline in ATen's headers and guarded
    by `#ifdef _OPENMP`: compiled without -fopenmp, at::parallel_for quietly runs the
    whole range on the calling thread. (The first builds did exactly that: the CPU op
    took the same time with 1 and 2 threads.) Linking with -fopenmp adds a dependency on
    libgomp.so.1, which the dynamic loader resolves to the libgomp torch already loaded
    (same soname), so there is one OpenMP runtime in the process.
    `sign_kernels._C.cpu_threads_used()` reports what a build really does; a test checks it.
    """
    if not torch._C.has_openmp:
        return []
    cxx = os.environ.get("CXX", "c++")
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    if sys.platform != "linux" or "clang" in version.lower():
        # clang's -fopenmp brings libomp, a second OpenMP runtime beside torch's libgomp.
        print(f"sign_kernels: not adding -fopenmp ({sys.platform}, {cxx}); the CPU kernels will run on one "
              "thread (sign_kernels._C.cpu_threads_used() reports it)", file=sys.stderr)
        return []
    return ["-fopenmp"]


def extensions():
    if _flag("SIGN_KERNELS_NO_EXTENSION"):
        return [], {}
    try:
        import torch

        if torch.version.cuda is not None and not _flag("SIGN_KERNELS_SKIP_CUDA"):
            _set_cuda_home_from_nvcc()
        from torch.utils import cpp_extension
    except ImportError:
        # NOTE: [no silent pure-Python build] A build without torch would quietly give a package
        # without its kernels (and pip would then pull the newest torch, gigabytes, as a dependency).
        raise SystemExit(
            "sign_kernels: torch is not importable in this environment, and the compiled kernels are "
            "built against the torch you run. Install torch first (the build your machine needs; e.g. "
            "`pip install torch`), then `pip install --no-build-isolation .` (without "
            "--no-build-isolation pip builds in a fresh environment that has no torch). For a pure-Python "
            "install (reference and Triton backends only) set SIGN_KERNELS_NO_EXTENSION=1."
        )

    os.environ.setdefault("MAX_JOBS", str(min(8, os.cpu_count() or 1)))
    host_flags = ["-O3", "-fopenmp-simd", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
    omp_flags = _openmp_flags(torch)
    host_flags += omp_flags + os.environ.get("SIGN_KERNELS_CPU_FLAGS", "").split()
    link_flags = list(omp_flags)
    sources = _rel("csrc/cpu/*.cpp") + ["csrc/torch/cpu_ops.cpp", "csrc/torch/module.cpp"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    # Headers: a rebuild (`python setup.py build_ext --inplace`, what scripts/_install.sh runs)
    # must not skip the extension when only a header changed; ninja then rebuilds what includes it.
    depends = [f for pat in ("csrc/*/*.h", "csrc/*/*.cuh", "csrc/*/*.inc") for f in _rel(pat)]

    with_cuda = (
        not _flag("SIGN_KERNELS_SKIP_CUDA")
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
    )
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        cuda_sources = _rel("csrc/cuda/*.cu") + _rel("csrc/torch/*.cu")
        ext = cpp_extension.CUDAExtension(
            "sign_kernels._C",
            sources + cuda_sources,
            include_dirs=include_dirs,
            depends=depends,
            define_macros=[
                ("SIGN_KERNELS_WITH_CUDA", "1"),
                ("SIGN_KERNELS_CUDA_ARCHS", os.environ["TORCH_CUDA_ARCH_LIST"].replace(";", "_").replace(" ", "_")),
            ],
            extra_compile_args={
                "cxx": host_flags,
                # NOTE: [no contraction] in csrc/core/sign_math.h: no FMA, bit-identical to CPU/Triton.
                # Never --use_fast_math: fp16 subnormals pass through fp32 subnormals (no FTZ).
                "nvcc": ["-O3", "--fmad=false", "--prec-div=true", "--prec-sqrt=true", "--ftz=false",
                         "--expt-relaxed-constexpr", "-lineinfo"],
            },
            extra_link_args=link_flags,
        )
    else:
        if torch.version.cuda is not None and not _flag("SIGN_KERNELS_SKIP_CUDA"):
            print("sign_kernels: torch has CUDA but nvcc was not found; building the CPU kernels only", file=sys.stderr)
        ext = cpp_extension.CppExtension(
            "sign_kernels._C", sources, include_dirs=include_dirs, depends=depends, extra_compile_args={"cxx": host_flags},
            extra_link_args=link_flags,
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = extensions()

setup(
    packages=find_packages(include=["sign_kernels", "sign_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
