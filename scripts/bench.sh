#!/usr/bin/env bash
# The main job: installs the package (compiled) and runs the throughput benchmark on
# whatever device exists here.  bash scripts/bench.sh [python -m bench flags...]
source "$(dirname "${BASH_SOURCE[0]}")/_install.sh"
install_project bench
build_kernels
exec "$PY" -m bench "$@"
