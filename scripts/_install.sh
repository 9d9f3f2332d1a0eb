# Sourced by scripts/test.sh and scripts/bench.sh: install what the project needs, on a
# fresh machine or an existing one, without ever replacing an installed torch.
set -euo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "${BASH_SOURCE[0]}")/.."

pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "$@"; }

# torch: keep the one installed (a CUDA build on a GPU machine); else the pinned CPU wheel.
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[install] torch not found: installing torch==2.13.0 (CPU)"
  pip_install "torch==2.13.0"
fi
# Build tools for the extension (--no-build-isolation builds against the torch above).
pip_install "setuptools>=64" wheel pybind11 ninja
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
