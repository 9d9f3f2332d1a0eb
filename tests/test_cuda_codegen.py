"""The CUDA kernels as the GPU would run them, checked without a GPU: the CMake-built
static library (``build/core/csrc/cuda/libsign_kernels_cuda.a``, which ``scripts/test.sh``
builds before pytest) is read with ``cuobjdump``:

* ``--dump-resource-usage``: no kernel of any architecture uses a stack or local memory
  (spills), and every kernel fits two 512-thread blocks per SM: at most 64 registers
  (NOTE: [two blocks per SM] in csrc/cuda/multi_tensor_apply.cuh);
* ``--dump-sass``: every functor kernel of the aligned path issues 128-bit global loads
  (``LDG.E.128``), and every one that writes θ or the state 128-bit stores (``STG.E.128``).

Skips, saying why, where the library or cuobjdump is absent (no nvcc: CMake builds no CUDA).
``SIGN_KERNELS_CUDA_LIB`` points it at another build.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIB = Path(os.environ.get("SIGN_KERNELS_CUDA_LIB", ROOT / "build/core/csrc/cuda/libsign_kernels_cuda.a"))
MAX_REGS = 65536 // (2 * 512)


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and Path(home, "bin", "cuobjdump").exists():
            return str(Path(home, "bin", "cuobjdump"))
    try:  # triton's NVIDIA backend bundles one
        import triton

        path = triton.knobs.nvidia.cuobjdump.path
        return path if path and os.path.exists(path) else None
    except Exception:
        return None


@pytest.fixture(scope="module")
def tool():
    if not LIB.exists():
        pytest.skip(f"{LIB} not built (scripts/test.sh builds it with CMake when nvcc exists)")
    exe = _cuobjdump()
    if exe is None:
        pytest.skip("cuobjdump not found (PATH, CUDA_HOME/bin, /usr/local/cuda/bin, triton)")
    return exe


def _run(exe, *args):
    return subprocess.run([exe, *args, str(LIB)], capture_output=True, text=True, check=True,
                          timeout=600).stdout


def _demangle(names):
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout
    return dict(zip(names, out.splitlines()))


@pytest.fixture(scope="module")
def usage(tool):
    """[(arch, demangled function, {REG, STACK, LOCAL, SHARED})]"""
    rows, arch, fn = [], None, None
    for line in _run(tool, "--dump-resource-usage").splitlines():
        if m := re.match(r"\s*arch = (sm_\w+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            fn = m.group(1)
        elif "REG:" in line and fn:
            rows.append((arch, fn, {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", line)}))
            fn = None
    names = _demangle(sorted({f for _, f, _ in rows}))
    assert rows, "cuobjdump listed no kernels"
    return [(a, names[f], u) for a, f, u in rows]


@pytest.fixture(scope="module")
def sass(tool):
    """{(arch, demangled function): SASS text}"""
    out, arch, fn = {}, None, None
    for line in _run(tool, "--dump-sass").splitlines():
        if m := re.match(r"\s*arch = (sm_\w+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function : (\S+)", line):
            fn = (arch, m.group(1))
            out[fn] = []
        elif fn:
            out[fn].append(line)
    names = _demangle(sorted({f for _, f in out}))
    return {(a, names[f]): "\n".join(v) for (a, f), v in out.items()}


def test_no_spills_and_two_blocks_per_sm(usage):
    bad = [f"{a} {f[:160]}: {u}" for a, f, u in usage
           if u["STACK"] or u["LOCAL"] or u["REG"] > MAX_REGS]
    assert not bad, "\n".join(bad)


def test_every_architecture_and_functor_present(usage):
    archs = {a for a, _, _ in usage}
    assert "sm_90a" in archs, archs
    for functor in ("LionFunctor", "SimbaFunctor", "TigerUpdateFunctor", "TigerPrepassFunctor"):
        assert any(functor in f for _, f, _ in usage), functor


def test_aligned_functors_use_128_bit_accesses(sass):
    functors = {k: v for k, v in sass.items() if "multi_tensor_apply_kernel" in k[1]}
    assert functors
    bad = []
    for (arch, fn), text in functors.items():
        if "LDG.E.128" not in text:
            bad.append(f"{arch} {fn[:160]}: no LDG.E.128")
        writes = "TigerPrepassFunctor" not in fn  # the pre-pass only reads θ and g
        if writes and "STG.E.128" not in text:
            bad.append(f"{arch} {fn[:160]}: no STG.E.128")
    assert not bad, "\n".join(bad)
