#!/usr/bin/env bash
# Before a GPU call, on a machine that reaches PyPI: the benchmark's peers as wheels in .whl/,
# which scripts/gpu_check.sh installs with `pip --no-index` on the offline GPU machine, and our
# own CUDA wheel, which it uses instead of building on the device (NOTE: [prebuilt wheel] there):
#
#   bash scripts/gpu_wheels.sh        # then carry .whl in the call (it is git-ignored)
#
# The versions are the ones the CPU benchmark and tests ran with. All three are pure Python and
# need nothing the GPU machine lacks (torch; numpy for pytorch-optimizer), so --no-deps is whole.
# Our wheel is scripts/cuda_build_check.sh's (torch 2.14.1+cu130, TORCH_CUDA_ARCH_LIST=9.0a, built
# from the working tree as it is, incrementally): cp310-abi3 on torch's stable ABI of 2.10, so it
# loads into the GPU machine's torch (2.11+cu130) and Python (3.12). SIGN_KERNELS_GPU_WHEEL=0
# leaves it out (gpu_check.sh then builds on the device, minutes of the call).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
rm -rf .whl
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -d .whl \
  lion-pytorch==0.2.5 torch-optimi==0.3.3 pytorch-optimizer==4.1.0 \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
if [[ ${SIGN_KERNELS_GPU_WHEEL:-1} != 0 ]]; then
  bash scripts/cuda_build_check.sh
  cp build/cuda-ext/dist/sign_kernels-*-cp310-abi3-*.whl .whl/
fi
ls -l .whl
