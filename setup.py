"""Build of sign_kernels and its compiled kernels, sign_kernels._C.

    pip install --no-build-isolation .        # compiled install (uses the torch already installed)
    pip install --no-build-isolation -e .     # the same, editable
    pip wheel --no-build-isolation --no-deps -w dist .   # a wheel: sign_kernels-<v>-cp310-abi3-<platform>.whl

The extension is built against the torch found in the environment (torch >= 2.10), hence
--no-build-isolation (an isolated build would download another torch). It always holds
the CPU kernels; it also holds the CUDA kernels when that torch has CUDA and nvcc is found.
It uses torch's stable ABI only (NOTE: [stable ABI] in csrc/torch/stable.h) and CPython's
limited API only (NOTE: [limited API] in csrc/torch/module.cpp), so the module and its wheel
load into every torch from TORCH_TARGET (NOTE: [target torch version]) on and every CPython
from 3.10 on, whichever of them built it (scripts/abi_check.sh checks both).

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


# NOTE: [target torch version] The oldest torch the module loads into: 2.10, the first stable ABI
# with everything the bindings use: Tensor[] arguments as std::vector<torch::stable::Tensor>,
# torch::stable::parallel_for, and the stable empty/full/to ops; 2.9 has none of them. Newer
# stable APIs stay out of reach (the headers hide what is newer than the target): the current
# CUDA stream's handle (torch::stable::accelerator::Stream::nativeHandle) is 2.13, so cuda_ops.cu
# takes it from the C shim (aoti_torch_get_current_cuda_stream, there since before 2.10).
# torch 2.10 itself supports CPython >= 3.10: the limited API of 3.10 (abi3) is the Python side.
TORCH_TARGET = (2, 10)
PY_LIMITED_API = "0x030A0000"  # CPython 3.10: what torch's BuildExtension defines (checked below)
PY_LIMITED_TAG = "cp310"


def _torch_target_macro() -> tuple[str, str]:
    major, minor = TORCH_TARGET
    return "TORCH_TARGET_VERSION", f"0x{major:02X}{minor:02X}000000000000"


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

    built_against = tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2])
    if built_against < TORCH_TARGET:
        raise SystemExit(
            f"sign_kernels: the compiled kernels use torch's stable ABI of torch "
            f"{'.'.join(map(str, TORCH_TARGET))} and need it to build (found torch {torch.__version__}); "
            "upgrade torch, or set SIGN_KERNELS_NO_EXTENSION=1 for a pure-Python install")
    os.environ.setdefault("MAX_JOBS", str(min(8, os.cpu_count() or 1)))
    # NOTE: [OpenMP in the binding] No -fopenmp: the CPU kernels' parallel loops run on torch's
    # thread pool through torch::stable::parallel_for, which runs inside libtorch with torch's own
    # OpenMP (NOTE: [parallel loops on torch's pool] in csrc/torch/cpu_ops.cpp). (The ATen
    # at::parallel_for used before was inline in ATen's headers and quietly serial without
    # -fopenmp.) `sign_kernels._C.cpu_threads_used()` reports what a build really does; a test
    # checks it. -fopenmp-simd only vectorises (no runtime library).
    host_flags = ["-O3", "-fopenmp-simd", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
    host_flags += os.environ.get("SIGN_KERNELS_CPU_FLAGS", "").split()
    # The stable ABI of the oldest torch served (NOTE: [target torch version]); the Python limited
    # API is defined by torch's BuildExtension for py_limited_api extensions (-DPy_LIMITED_API=its
    # min_supported_cpython), which must be the one the wheel's tag names.
    torch_limited = getattr(cpp_extension, "min_supported_cpython", PY_LIMITED_API)
    if int(torch_limited, 16) != int(PY_LIMITED_API, 16):
        raise SystemExit(f"sign_kernels: torch {torch.__version__} builds limited-API extensions for CPython "
                         f"{torch_limited}, the wheel is tagged {PY_LIMITED_TAG} ({PY_LIMITED_API}): update setup.py")
    define_macros = [_torch_target_macro()]
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
            define_macros=define_macros + [
                ("SIGN_KERNELS_WITH_CUDA", "1"),
                ("SIGN_KERNELS_CUDA_ARCHS", os.environ["TORCH_CUDA_ARCH_LIST"].replace(";", "_").replace(" ", "_")),
                ("USE_CUDA", "1"),  # declares the CUDA part of torch's C shim (the current stream)
            ],
            extra_compile_args={
                "cxx": host_flags,
                # NOTE: [no contraction] in csrc/core/sign_math.h: no FMA, bit-identical to CPU/Triton.
                # Never --use_fast_math: fp16 subnormals pass through fp32 subnormals (no FTZ).
                "nvcc": ["-O3", "--fmad=false", "--prec-div=true", "--prec-sqrt=true", "--ftz=false",
                         "--expt-relaxed-constexpr", "-lineinfo"],
            },
            py_limited_api=True,
        )
    else:
        if torch.version.cuda is not None and not _flag("SIGN_KERNELS_SKIP_CUDA"):
            print("sign_kernels: torch has CUDA but nvcc was not found; building the CPU kernels only", file=sys.stderr)
        ext = cpp_extension.CppExtension(
            "sign_kernels._C", sources, include_dirs=include_dirs, depends=depends, define_macros=define_macros,
            extra_compile_args={"cxx": host_flags}, py_limited_api=True,
        )
    return [ext], {"build_ext": _build_ext_class(cpp_extension.BuildExtension)}


def _build_ext_class(base):
    """torch's BuildExtension, which also removes a stale module of another ABI tag.

    NOTE: [stale module] The module is sign_kernels/_C.abi3.so. A tree built before the move to the
    limited API still holds sign_kernels/_C.cpython-3XX-*.so, in place and in build/lib.*, which
    Python's import prefers to the abi3 one and a wheel would ship beside it: every build deletes
    the module's siblings where it writes the module (in place with `setup.py build_ext --inplace`,
    what scripts/_install.sh runs; else the build directory a wheel is made from).
    """

    class BuildExt(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, no_python_abi_suffix=False, **kwargs)

        def run(self):
            super().run()
            for ext in self.extensions:
                name = self.get_ext_filename(ext.name)
                for where in {self.build_lib, ROOT if self.inplace else self.build_lib}:
                    built = os.path.join(where, name)
                    stem = os.path.join(os.path.dirname(built), ext.name.split(".")[-1])
                    for stale in glob.glob(stem + ".*.so"):
                        if os.path.abspath(stale) != os.path.abspath(built):
                            print(f"sign_kernels: removing {os.path.relpath(stale, ROOT)} (NOTE: [stale module])",
                                  file=sys.stderr)
                            os.remove(stale)

    return BuildExt


ext_modules, cmdclass = extensions()

setup(
    packages=find_packages(include=["sign_kernels", "sign_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # The wheel of a build with the extension is tagged cp310-abi3 (NOTE: [limited API] in
    # csrc/torch/module.cpp); a pure-Python build stays py3-none-any.
    options={"bdist_wheel": {"py_limited_api": PY_LIMITED_TAG}} if ext_modules else {},
)
