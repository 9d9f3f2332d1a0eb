#!/usr/bin/env bash
# Everything a GPU machine can tell us, in one call (offline, < 8 minutes on a 16-core H100 box):
#
#   bash scripts/gpu_check.sh OUTDIR [--dry-run]
#
# Stages (each under `timeout`; a failed stage does not stop the later ones):
#   peers      pip install --no-index --no-deps .whl/*.whl when wheels were carried there (the bench's
#              peers: lion-pytorch, torch-optimi; the GPU machine has no network), all but our own
#   build      sign_kernels._C with CUDA for the local GPU, in place, so that pytest and
#              `python -m bench` from the repo root import it: from a carried prebuilt wheel
#              .whl/sign_kernels-*-abi3-*.whl when there is one (scripts/gpu_wheels.sh makes it,
#              against torch 2.14.1+cu130 for sm_90a: one abi3 wheel on the stable ABI loads into
#              the machine's torch and Python) and it loads and runs a kernel here; otherwise, or
#              when it does not, built on the device (setup.py build_ext --inplace)
#   native     CMake build of the CUDA core + its native test for 90a only (build/gpu-native), CTest
#   memcheck   compute-sanitizer --tool memcheck on the native CUDA test
#   racecheck  compute-sanitizer --tool racecheck on the native CUDA test
#   pytest     tests/test_cuda.py, test_triton.py (TRITON_INTERPRET=0: the compiled kernels),
#              test_triton_codegen.py, test_cuda_codegen.py (on the native build),
#              test_tiger_rms_cache.py (Tiger's sums out on cuda and triton); junit xml
#   bench      python -m bench on CUDA: flat 256M, GPT-2, Llama 1B; fp32, bf16; ours on cuda and triton,
#              fused/foreach AdamW, the installed peers, 8-bit momentum and clip rows (NOTE: [gpu bench
#              rows]); then 4096 tiny tensors (fp32, ours, Lion+clip, AdamW: the launch-bound case); one
#              process per parameter set (a set cut by its time keeps its finished sections), merged
# build ‖ native run side by side, then pytest ‖ memcheck → racecheck, then the bench alone.
#
# OUTDIR gets at most 8 files: summary.txt (each stage's status and seconds, the machine),
# build.log, native.log (CMake, CTest, both sanitizers), pytest.log, pytest.xml, bench.log,
# bench.json, bench.png. Exit status: 0 when no stage failed or timed out (skipped is not failed).
#
# --dry-run: the same stages and plumbing on a CPU machine, cheaply, so that CI keeps this script
# working: no build (the CPU module in the tree is imported instead), CTest on build/core when
# scripts/test.sh left one, the GPU stages 'skipped (no GPU)', pytest on the files that skip without
# a GPU, and a tiny CPU bench (--size 1M --steps 3).
#
# Environment: PYTHON (default python3), GPU_CHECK_DEADLINE_S (default 470: the stages' timeouts
# are cut so the whole call ends by then), MAX_JOBS (default: the CPU count).
set -uo pipefail

usage() { echo "usage: $0 OUTDIR [--dry-run]" >&2; exit 2; }
OUT="" DRY=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    -*) echo "unknown option: $arg" >&2; usage ;;
    *) [[ -z $OUT ]] || usage; OUT=$arg ;;
  esac
done
[[ -n $OUT ]] || usage
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
if [[ -n "$(ls -A "$OUT")" ]]; then
  echo "$OUT is not empty: give a new or empty folder (the call must leave at most 8 files there)" >&2
  exit 2
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
NPROC=$(nproc)
export MAX_JOBS=${MAX_JOBS:-$NPROC}
DEADLINE_S=${GPU_CHECK_DEADLINE_S:-470}
DEADLINE=$((SECONDS + DEADLINE_S))
# NOTE: [phase deadlines] build/tests get the first 72 % of the time at most, so the benchmark
# (the numbers the GPU call is for) keeps at least a quarter of it (~130 s) whatever phase 1 does.
PHASE_END=$((SECONDS + DEADLINE_S * 72 / 100))
STATUS=$(mktemp -d)   # one file per stage; summary.txt is assembled from them at the end
BENCH_TMP=$(mktemp -d)
trap 'rm -rf "$STATUS" "$BENCH_TMP"' EXIT
NATIVE=$ROOT/build/gpu-native
NATIVE_TEST=$NATIVE/csrc/cuda/sign_kernels_cuda_test

if ! command -v nvcc >/dev/null && [[ -x ${CUDA_HOME:-/usr/local/cuda}/bin/nvcc ]]; then
  export PATH=${CUDA_HOME:-/usr/local/cuda}/bin:$PATH
fi
SANITIZER=$(command -v compute-sanitizer || ls -d "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" \
  /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer \
  /usr/local/cuda*/compute-sanitizer/compute-sanitizer 2>/dev/null | head -n 1)
HAVE_GPU=0
if [[ $DRY == 0 ]] && command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then HAVE_GPU=1; fi
if [[ $DRY == 0 && $HAVE_GPU == 0 ]]; then
  echo "no GPU found (nvidia-smi -L failed): use --dry-run on a CPU machine" >&2
  exit 2
fi

# stage NAME LOG TIMEOUT_S CMD...  runs CMD under timeout, appending to LOG; records status and time.
stage() {
  local name=$1 log=$2 limit=$3; shift 3
  local left=$((PHASE_END - SECONDS)) t0=$SECONDS rc
  ((limit > left)) && limit=$left
  if ((limit < 5)); then
    echo "TIMEOUT (no time left before the deadline)" >"$STATUS/$name"
    echo "[gpu-check] $name: $(cat "$STATUS/$name")"
    return 124
  fi
  { echo; echo "===== $name: $* (timeout ${limit}s)"; } >>"$log"
  # functions run in a child bash (export -f below): timeout kills its whole process group
  # STAGE_LIMIT: the command's own time, for a command that can end itself in time (run_pytest)
  STAGE_LIMIT=$limit timeout -k 15 "$limit" bash -c '"$@"' "$name" "$@" >>"$log" 2>&1
  rc=$?
  local dt=$((SECONDS - t0))
  case $rc in
    0) echo "ok ${dt}s" ;;
    124|137) echo "TIMEOUT after ${dt}s (limit ${limit}s)" ;;
    *) echo "FAILED rc=$rc ${dt}s (see $(basename "$log"))" ;;
  esac >"$STATUS/$name"
  echo "[gpu-check] $name: $(cat "$STATUS/$name")"
  return $rc
}
skip() { echo "skipped ($2)" >"$STATUS/$1"; echo "[gpu-check] $1: skipped ($2)"; }

# -v: each test's outcome as it ends, so a stage cut by its time limit still says what passed
pytest_args=(-v -p no:cacheprovider -rfEs --junitxml "$OUT/pytest.xml")
"$PY" -c "import pytest_timeout" 2>/dev/null && pytest_args+=(--timeout 120)
# pytest-timeout >= 2.3 has --session-timeout (run_pytest)
HAVE_SESSION_TIMEOUT=0
"$PY" - <<'EOF' 2>/dev/null && HAVE_SESSION_TIMEOUT=1
import sys
from importlib.metadata import version
sys.exit(0 if tuple(int(x) for x in version("pytest-timeout").split(".")[:2]) >= (2, 3) else 1)
EOF
# --dist loadfile: a module's tests on one worker, so each module-scoped fixture (the codegen
# tests compile all 212 Triton specialisations: about a minute cold) runs once, not per worker.
"$PY" -c "import xdist" 2>/dev/null && pytest_args+=(-n 6 --dist loadfile)

# ---------------------------------------------------------------- stage commands
check_cuda_module() {  # the in-tree module has the CUDA kernels, and one runs on this GPU
  "$PY" - <<'EOF'
import torch
import sign_kernels
from sign_kernels import _C
print(_C.__file__, "CUDA_COMPILED", _C.CUDA_COMPILED, "| torch", torch.__version__)
assert _C.CUDA_COMPILED, "no CUDA kernels in the module"
p = torch.ones(1000, device="cuda"); g = torch.full_like(p, 0.5); m = torch.zeros_like(p)
step = torch.zeros((), dtype=torch.long, device="cuda")
torch.ops.sign_kernels.lion_([p], [g], [m], [step], 0.5, None, 0.9, 0.99, 0.0, None, None, [0], False)
torch.cuda.synchronize()
assert torch.all(p == 0.5), "the CUDA Lion kernel did not run as it should"
print("a CUDA Lion step ran")
EOF
}
build_gpu() {
  local prebuilt=(.whl/sign_kernels-*-abi3-*.whl)
  if [[ -f ${prebuilt[0]} ]]; then
    # NOTE: [prebuilt wheel] only its module, into the tree, where the in-place build puts it (the
    # tests and the bench import the package from the repo root); the other ABI tags' modules go.
    echo "prebuilt wheel ${prebuilt[0]}: its sign_kernels/_C.abi3.so into the tree, no build"
    rm -f sign_kernels/_C.*.so
    if "$PY" -m zipfile -e "${prebuilt[0]}" .whl/unpacked && cp .whl/unpacked/sign_kernels/_C.abi3.so sign_kernels/ \
       && check_cuda_module; then
      return 0
    fi
    echo "the prebuilt wheel does not serve here: building on the device instead"
    rm -f sign_kernels/_C.*.so
  fi
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} "$PY" setup.py build_ext --inplace && check_cuda_module
}
build_dry() {
  echo "dry run: no build; importing the CPU module in the tree"
  "$PY" -c "from sign_kernels import _C; print(_C.__file__, 'cuda_compiled', _C.cuda_compiled())"
}
native_gpu() {
  cmake -S . -B "$NATIVE" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a \
      -DSIGN_KERNELS_CUDA_ARCHITECTURES=90a -DCMAKE_CUDA_COMPILER="$(command -v nvcc)" \
    && cmake --build "$NATIVE" -j "$((NPROC > 6 ? 6 : NPROC))"
  if [[ ! -x $NATIVE_TEST ]]; then
    # a failed configure or one without CUDA builds no CUDA test: say so, then nvcc alone
    echo "CMake built no $NATIVE_TEST: building the native CUDA test with nvcc alone"
    native_nvcc
    return
  fi
  ctest --test-dir "$NATIVE" --output-on-failure
}
native_nvcc() {
  # No CMake >= 3.24 on the machine: the native test built by nvcc alone, with CMake's flags
  # (NOTE: [no contraction]); no static library, so test_cuda_codegen skips.
  mkdir -p "$NATIVE/csrc/cuda" && cd "$NATIVE/csrc/cuda" || return 1
  local srcs=("$ROOT"/csrc/cuda/{launch,lion,simba,tiger}.cu "$ROOT"/csrc/cuda/tests/test_kernels.cu)
  printf '%s\n' "${srcs[@]}" | xargs -P "$((NPROC > 6 ? 6 : NPROC))" -I{} sh -c \
    'nvcc -c -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a --fmad=false --prec-div=true \
       --prec-sqrt=true --ftz=false -Xcompiler=-ffp-contract=off -Xcompiler=-fPIC \
       "-DSIGN_KERNELS_CUDA_ARCHS=90a" -I"$1/csrc" "$2" -o "$(basename "$2" .cu).o"' _ "$ROOT" {} \
    && nvcc -gencode arch=compute_90a,code=sm_90a ./*.o -o sign_kernels_cuda_test \
    && { ./sign_kernels_cuda_test; rc=$?; ((rc == 77)) && echo "native test: skipped (exit 77: no device)"; ((rc == 0 || rc == 77)); }
}
native_dry() {
  echo "dry run: CTest on build/core (scripts/test.sh's CMake build), no build here"
  ctest --test-dir build/core --output-on-failure
}
sanitize() { "$SANITIZER" --tool "$1" --error-exitcode 1 --print-limit 20 "$NATIVE_TEST"; }
run_pytest() {
  local more=()
  # pytest-timeout >= 2.3 ends the session before the stage's limit: its summary and junit survive
  if ((HAVE_SESSION_TIMEOUT == 1 && STAGE_LIMIT > 60)); then more=(--session-timeout $((STAGE_LIMIT - 30))); fi
  echo "pytest ${more[*]} $*"
  TRITON_INTERPRET=0 SIGN_KERNELS_CUDA_LIB=$NATIVE/csrc/cuda/libsign_kernels_cuda.a "$PY" -m pytest "${more[@]}" "$@"
}
bench_one() {  # bench_one NAME ARGS...: one parameter set into $BENCH_TMP/NAME.json
  local name=$1; shift
  "$PY" -m bench --no-progress --no-plot --out "$BENCH_TMP" --name "$name" "$@"
}
export -f check_cuda_module build_gpu build_dry native_gpu native_nvcc native_dry sanitize run_pytest bench_one
export SANITIZER PY NPROC NATIVE NATIVE_TEST BENCH_TMP ROOT HAVE_SESSION_TIMEOUT

# ---------------------------------------------------------------- the run
T0=$SECONDS
{
  echo "gpu_check $(date -u +%FT%TZ) $([[ $DRY == 1 ]] && echo '(DRY RUN: CPU, plumbing only)')"
  if git rev-parse --git-dir >/dev/null 2>&1; then
    echo "git: $(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo ' + local changes')"
  else echo "git: not a repository"; fi
  echo "host: $(hostname), $NPROC cores, MAX_JOBS=$MAX_JOBS"
  "$PY" - <<'EOF' 2>&1
import sys, torch
try:
    import triton; tv = triton.__version__
except ImportError as exc:
    tv = f"none ({exc})"
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda, "| triton", tv)
try:  # the ptxas Triton compiles sm_90 with: its register allocation differs by version
    from triton.backends.nvidia.compiler import get_ptxas
    px = get_ptxas(90)
    print("triton's ptxas for sm_90:", px.version, px.path)
except Exception as exc:
    print("triton's ptxas for sm_90: unknown", repr(exc)[:120])
EOF
  if [[ $HAVE_GPU == 1 ]]; then nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1
  else echo "gpu: none"; fi
  command -v nvcc >/dev/null && nvcc --version | tail -n 2 | head -n 1
  echo
} >"$STATUS/.head"

echo "[gpu-check] phase 1: build ‖ native (CMake, CTest, memcheck, racecheck) ‖ then pytest"
(
  wheels=()
  for w in .whl/*.whl; do [[ -e $w && $(basename "$w") != sign_kernels-* ]] && wheels+=("$w"); done
  if [[ $DRY == 1 ]]; then skip peers "dry run"
  elif ((${#wheels[@]} == 0)); then skip peers "no peer .whl/*.whl carried"
  else stage peers "$OUT/build.log" 60 "$PY" -m pip install --no-index --no-deps --quiet "${wheels[@]}"; fi
  if [[ $DRY == 1 ]]; then stage build "$OUT/build.log" 240 build_dry
  else stage build "$OUT/build.log" 240 build_gpu; fi
  if [[ $DRY == 1 ]]; then
    run_files=(tests/test_cuda.py tests/test_triton.py)  # both skip without a GPU: seconds
  else
    run_files=(tests/test_cuda.py tests/test_triton.py tests/test_triton_codegen.py tests/test_cuda_codegen.py
               tests/test_tiger_rms_cache.py)  # + Tiger's sums out and cached RMS on cuda and compiled triton
  fi
  # test_cuda_codegen reads the native build's library: wait (a while) for that stage to end.
  while [[ ! -f $STATUS/native ]] && ((SECONDS < PHASE_END - 90)); do sleep 2; done
  # 260 s: a cold Triton cache compiles every kernel the tests launch (~100 specialisations
  # with clipping, the norm pass and 8-bit momentum, + ~250 in the codegen test, on 6 xdist
  # workers); 200 s left no margin (issue 24).
  stage pytest "$OUT/pytest.log" 260 run_pytest "${pytest_args[@]}" "${run_files[@]}"
) &
pid_a=$!
(
  if [[ $DRY == 1 ]]; then
    if [[ -f build/core/CTestTestfile.cmake ]]; then stage native "$OUT/native.log" 120 native_dry
    else skip native "dry run: no build/core from scripts/test.sh"; fi
  elif cmake --version 2>/dev/null | awk 'NR==1 {split($3, v, "."); ok = v[1] > 3 || (v[1] == 3 && v[2] >= 24)} END {exit !ok}'; then
    stage native "$OUT/native.log" 240 native_gpu
  else
    stage native "$OUT/native.log" 240 native_nvcc
  fi
  for tool in memcheck racecheck; do
    if [[ $HAVE_GPU == 0 ]]; then skip "$tool" "no GPU"
    elif [[ -z $SANITIZER ]]; then skip "$tool" "compute-sanitizer not found in PATH, CUDA_HOME or /usr/local/cuda*"
    elif [[ ! -x $NATIVE_TEST ]]; then skip "$tool" "the native test was not built"
    else stage "$tool" "$OUT/native.log" 150 sanitize "$tool"; fi
  done
) &
pid_b=$!
wait "$pid_a" "$pid_b"

echo "[gpu-check] phase 2: the benchmark alone"
PHASE_END=$DEADLINE
weight=() extra=()
if [[ $DRY == 1 ]]; then
  sets=(flat)
  common=(--device cpu --size 1M --steps 3 --warmup 1 --dtypes fp32 --backends cpu
          --contenders lion,lion+clip,lion-int8 --row-budget 2 --no-launches)
else
  # NOTE: [gpu bench rows] cuda and triton, not --backends all: the reference backend's rows
  # (one tensor at a time in plain torch) say nothing the targets need and cost a 1B model's time.
  # tiny (4096 tensors of 768): the launch-bound case, whose host time the issue compares with
  # fused AdamW's (and Lion+clip's with Lion's: <= 1.3x); fp32 and our rows only, the peers'
  # per-tensor loops would take its share.
  # The 8-bit momentum and clipping rows go where they fit and say the most, after the set's
  # usual rows (a set cut by its time keeps its first sections, fp32 first): 8-bit momentum
  # (fp32 section only; a backend without its kernels is a skipped row, no time) on flat (the
  # bandwidth case: 14.06 and 10.06 B/elem against Lion's 20) and GPT-2 (every int8 row); the
  # clipping rows on GPT-2 (Lion+clip, Tiger+clip, torch's clip + fused AdamW; fp32 and bf16):
  # ~15 more GPT-2 rows of ~1.5 s, so GPT-2's weight is 3; Llama (the slowest) gets none.
  sets=(flat gpt2 llama tiny)
  common=(--device cuda --size 256M --llama-size 1B --dtypes fp32,bf16 --backends cuda,triton
          --contenders ours,adamw,peers --schedule sequential --row-budget 3)
  weight=([0]=2 [1]=3 [2]=3 [3]=1)   # of the time left, by set: the 1B model's rows are the slowest
  extra=([0]="--contenders ours,adamw,peers,lion-int8,lion-bf16-ec-int8"
         [1]="--contenders ours,adamw,peers,lion+clip,tiger+clip,clip+adamw,int8"
         [3]="--tiny-count 4096 --dtypes fp32 --contenders ours,adamw,lion+clip")
fi
i=0
for s in "${sets[@]}"; do
  # each set gets its weight's share of what is left (less 20 s for the merge); unused time rolls on
  left_w=0
  for ((j = i; j < ${#sets[@]}; j++)); do left_w=$((left_w + ${weight[j]:-1})); done
  share=$(( (DEADLINE - 20 - SECONDS) * ${weight[i]:-1} / left_w ))
  read -r -a more <<<"${extra[i]:-}"
  i=$((i + 1))
  stage "bench-$s" "$OUT/bench.log" "$share" bench_one "$s" --param-sets "$s" "${common[@]}" "${more[@]}"
done
parts=("$BENCH_TMP"/*.json)
if [[ -e ${parts[0]} ]]; then
  stage bench-merge "$OUT/bench.log" 60 "$PY" -m bench.merge "${parts[@]}" -o "$OUT/bench"
else
  skip bench-merge "no bench result to merge"
fi

# ---------------------------------------------------------------- summary
fails=0
{
  cat "$STATUS/.head"
  for name in peers build native memcheck racecheck pytest "${sets[@]/#/bench-}" bench-merge; do
    st=$(cat "$STATUS/$name" 2>/dev/null || echo "not run")
    printf '%-12s %s\n' "$name" "$st"
    [[ $st == ok* || $st == skipped* ]] || fails=$((fails + 1))
  done
  if [[ -f $OUT/pytest.xml ]]; then
    "$PY" - "$OUT/pytest.xml" <<'EOF'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
print("pytest: {tests} tests, {failures} failed, {errors} errors, {skipped} skipped".format(**tot))
EOF
  fi
  echo "total $((SECONDS - T0))s; $fails stage(s) failed or timed out"
} >"$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
n=$(find "$OUT" -type f | wc -l)
if ((n > 8)); then echo "[gpu-check] $OUT holds $n files (at most 8 allowed)" >&2; exit 1; fi
((fails == 0))
