#!/usr/bin/env bash
# The test command: installs everything, builds, runs the native tests (CTest) and pytest.
#   bash scripts/test.sh [pytest args...]
# Without a GPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1) and the
# CUDA tests are skipped; every .cu file is still compiled by nvcc through CMake when
# nvcc is on the machine.
source "$(dirname "${BASH_SOURCE[0]}")/_install.sh"

if ! "$PY" -c "import triton" 2>/dev/null; then
  echo "[install] triton not found: installing triton==3.9.0"
  pip_install "triton==3.9.0"
fi
install_project test
build_kernels

echo "[native] CMake core build and CTest"
mkdir -p build
cmake -S . -B build/core -DCMAKE_BUILD_TYPE=Release >build/cmake-configure.log 2>&1 \
  || { cat build/cmake-configure.log; exit 1; }
grep -E "sign_kernels|CUDA" build/cmake-configure.log || true
cmake --build build/core -j "$MAX_JOBS"
ctest --test-dir build/core --output-on-failure

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi
echo "[pytest] TRITON_INTERPRET=${TRITON_INTERPRET:-0}"
exec "$PY" -m pytest -q -p no:cacheprovider "$@"
