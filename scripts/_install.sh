# Sourced by scripts/test.sh and scripts/bench.sh: install what the project needs, on a fresh
# machine or an existing one, without ever replacing an installed torch, and build the
# compiled kernels ONCE, in place, for both commands (the second command rebuilds nothing).
set -euo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# (the grep drops the warnings of a pip configuration that lists absent local indexes)
pip_install() {
  "$PY" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

# torch: keep the one installed (a CUDA build on a GPU machine); else the pinned CPU wheel.
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[install] torch not found: installing torch==2.13.0 (CPU)"
  pip_install "torch==2.13.0"
fi
# Build tools for the extension (built with --no-build-isolation against the torch above).
pip_install "setuptools>=64" wheel ninja
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

# install_project EXTRA: the package, editable, with that extra's dependencies. Pure Python
# here (no compile: build_kernels does that once); `torch>=2.4` is met by the torch above, so
# pip never replaces it.
install_project() {
  echo "[install] sign_kernels (editable) with the '$1' extra"
  SIGN_KERNELS_NO_EXTENSION=1 pip_install --no-build-isolation -e ".[$1]"
}

# build_kernels: sign_kernels/_C*.so, built in place with its objects kept under build/temp.*,
# so a second call (the other command, or a rerun) finds it up to date and compiles nothing.
build_kernels() {
  local t0=$SECONDS before after
  mkdir -p build
  before=$(stat -c %Y sign_kernels/_C*.so 2>/dev/null || echo none)
  if ! "$PY" setup.py build_ext --inplace >build/build_ext.log 2>&1; then
    cat build/build_ext.log
    echo "[build] FAILED (log above, also in build/build_ext.log)" >&2
    exit 1
  fi
  after=$(stat -c %Y sign_kernels/_C*.so 2>/dev/null || echo none)
  if [ "$before" = "$after" ]; then
    echo "[build] sign_kernels._C is up to date"
  else
    echo "[build] sign_kernels._C compiled in $((SECONDS - t0)) s ($("$PY" -c "import sys; sys.path.insert(0, '.'); from sign_kernels import _C; print('CUDA' if _C.cuda_compiled() else 'CPU', 'kernels,', _C.cpu_isa())"))"
  fi
}
