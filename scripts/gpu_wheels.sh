#!/usr/bin/env bash
# Before a GPU call, on a machine that reaches PyPI: the benchmark's peers as wheels in .whl/,
# which scripts/gpu_check.sh installs with `pip --no-index` on the offline GPU machine:
#
#   bash scripts/gpu_wheels.sh        # then carry .whl in the call (it is git-ignored)
#
# The versions are the ones the CPU benchmark and tests ran with. All three are pure Python and
# need nothing the GPU machine lacks (torch; numpy for pytorch-optimizer), so --no-deps is whole.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
rm -rf .whl
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -d .whl \
  lion-pytorch==0.2.5 torch-optimi==0.3.3 pytorch-optimizer==4.1.0 \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
ls -l .whl
