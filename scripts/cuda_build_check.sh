#!/usr/bin/env bash
# The compiled CUDA install, checked on a machine without a GPU (CI runs it after test.sh):
#   bash scripts/cuda_build_check.sh
#
# 1. a throwaway venv (build/cuda-venv; reused when a previous run completed it) with a CUDA
#    build of torch (SIGN_KERNELS_CUDA_TORCH, default torch==2.14.1: CUDA 13.0) and the build tools;
# 2. the wheel with the full sign_kernels._C built with CUDA against that torch by setup.py:
#    build/cuda-ext/dist/sign_kernels-<v>-cp310-abi3-<platform>.whl, objects under build/cuda-ext/b
#    (never into the source tree: the CPU build's sign_kernels/_C*.so there is what the tests use);
#    scripts/abi_check.sh audits it, and scripts/gpu_check.sh installs it when it is carried;
# 3. that wheel installed as it is into build/cuda-ext/site (pip --target: the venv stays as it
#    is) and imported in the venv (no GPU needed to import), then: _C.CUDA_COMPILED is True
#    and every op of sign_kernels/_ops.py SCHEMAS has a CUDA kernel and a CPU kernel.
#
# Any failure exits non-zero with the reason. Environment:
#   SIGN_KERNELS_CUDA_VENV   the venv's directory (default build/cuda-venv)
#   SIGN_KERNELS_CUDA_TORCH  the torch requirement (default torch==2.14.1)
#   TORCH_CUDA_ARCH_LIST     default 9.0a (one architecture: the check is that it compiles and links)
#   MAX_JOBS                 default: the CPU count
#   PYTHON                   the interpreter that makes the venv (default python3)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
VENV=${SIGN_KERNELS_CUDA_VENV:-$ROOT/build/cuda-venv}
TORCH_REQ=${SIGN_KERNELS_CUDA_TORCH:-torch==2.14.1}
OUT=$ROOT/build/cuda-ext
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
t0=$SECONDS
say() { echo "[cuda-build] $*"; }
die() { echo "[cuda-build] FAILED: $*" >&2; exit 1; }

command -v nvcc >/dev/null || die "nvcc is not on PATH: the CUDA kernels cannot be compiled here"

# NOTE: [complete venv] a venv is reused only when the marker written after a successful install
# names the same requirement and its torch still imports with CUDA; anything else (an install
# killed halfway, another torch pinned) is deleted and made again.
marker=$VENV/.sign_kernels-complete
want="$TORCH_REQ numpy setuptools wheel ninja"
if [[ -f $marker && "$(cat "$marker")" == "$want" ]] \
   && "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  say "reusing $VENV ($("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))"
else
  rm -rf "$VENV"
  say "making $VENV with $want"
  "$PY" -m venv "$VENV"
  # (pip warns once per index that lacks a package: noise, filtered out)
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore $want 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; } \
    || die "pip could not install $want into $VENV"
  echo "$want" >"$marker"
  say "venv ready after $((SECONDS - t0)) s ($(du -sh "$VENV" | cut -f1))"
fi
VPY=$VENV/bin/python
"$VPY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" \
  || die "$TORCH_REQ in $VENV is not a CUDA build of torch"

t1=$SECONDS
mkdir -p "$OUT"
say "building the sign_kernels wheel with CUDA (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS) into $OUT/dist"
# Every build directory under $OUT (egg_info too): the build writes nothing into the source tree.
rm -rf "$OUT/dist" "$OUT/site"
env -u SIGN_KERNELS_SKIP_CUDA -u SIGN_KERNELS_NO_EXTENSION \
  "$VPY" setup.py -q egg_info --egg-base "$OUT" build --build-base "$OUT/b" \
  bdist_wheel --bdist-dir "$OUT/bdist" --dist-dir "$OUT/dist" >"$OUT.log" 2>&1 \
  || { tail -n 60 "$OUT.log"; die "the CUDA build failed (full log: $OUT.log)"; }
grep -E "^sign_kernels:" "$OUT.log" || true
wheels=("$OUT"/dist/sign_kernels-*-cp310-abi3-*.whl)
[[ -f ${wheels[0]} ]] || die "no cp310-abi3 wheel in $OUT/dist"
say "built $(basename "${wheels[0]}") ($(du -h "${wheels[0]}" | cut -f1)) in $((SECONDS - t1)) s"
"$VPY" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --no-compile \
  --target "$OUT/site" "${wheels[0]}" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

# Run from $OUT so neither the source tree nor an installed sign_kernels can be imported instead.
(cd "$OUT" && PYTHONPATH="$OUT/site" "$VPY" - "$OUT/site") <<'EOF' || die "the built module does not hold the CUDA kernels"
import os, sys
import torch
import sign_kernels
from sign_kernels import _C, _ops

lib = os.path.realpath(sys.argv[1])
where = os.path.realpath(_C.__file__)
assert where.startswith(lib + os.sep), f"imported {where}, not the module of the wheel installed in {lib}"
print(f"[cuda-build] torch {torch.__version__} (CUDA {torch.version.cuda}), {where}")
errors = []
if _C.CUDA_COMPILED is not True or _C.cuda_compiled() is not True:
    errors.append(f"_C.CUDA_COMPILED is {_C.CUDA_COMPILED!r}, _C.cuda_compiled() {_C.cuda_compiled()!r}")
for name in _ops.SCHEMAS:
    for key in ("CPU",) if name in _ops.CPU_ONLY else ("CUDA", "CPU"):
        if not _ops.has_kernel(name, key):
            errors.append(f"sign_kernels::{name} has no {key} kernel")
reason = sign_kernels.available_backends()["cuda"]
if errors:
    sys.exit("[cuda-build] " + "; ".join(errors))
print(f"[cuda-build] ops with CPU and CUDA kernels: {', '.join(n for n in _ops.SCHEMAS if n not in _ops.CPU_ONLY)}; "
      f"CPU only (by design): {', '.join(sorted(_ops.CPU_ONLY))}; cuda backend without a GPU: {reason}")
EOF
say "OK: every op has its CUDA kernel ($((SECONDS - t0)) s in all)"
