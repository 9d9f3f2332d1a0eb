#!/usr/bin/env bash
# The Triton code-generation checks (tests/test_triton_codegen.py: no spills, register budgets,
# 16-byte accesses, for every specialisation compiled for sm_90) under the triton of the GPU
# machine, not only the one CI installs: triton 3.6 compiles sm_90 with ptxas 12.8, 3.9 with
# ptxas 13.4, and they allocate registers differently (NOTE: [triton maxnreg]). CI runs it
# after scripts/test.sh; no GPU needed.
#
#   bash scripts/triton_version_check.sh          # SIGN_KERNELS_OTHER_TRITON=3.6.0 by default
#
# That triton goes to build/triton-<version> (pip --target, no dependencies: it only compiles)
# and is put first on PYTHONPATH, over the environment's own; torch and sign_kernels are the
# environment's (scripts/test.sh built the module in place).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
VER=${SIGN_KERNELS_OTHER_TRITON:-3.6.0}
DIR=build/triton-$VER
if ! PYTHONPATH=$DIR "$PY" -c "import sys, triton; sys.exit(triton.__version__ != '$VER')" 2>/dev/null; then
  rm -rf "$DIR"
  echo "[triton-$VER] installing into $DIR"
  "$PY" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps \
    --target "$DIR" "triton==$VER" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
fi
PYTHONPATH=$DIR "$PY" -c "import triton; from triton.backends.nvidia.compiler import get_ptxas; \
print('[triton-$VER] triton', triton.__version__, '| ptxas for sm_90:', get_ptxas(90).version)"
PYTHONPATH=$DIR TRITON_INTERPRET=0 "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_codegen.py
