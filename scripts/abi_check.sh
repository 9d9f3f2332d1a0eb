#!/usr/bin/env bash
# One wheel for every torch and every Python (NOTE: [stable ABI] in csrc/torch/stable.h), checked
# on a CPU machine. CI runs it after scripts/cuda_build_check.sh, whose venv (torch==2.14.1) and
# CUDA wheel it reuses:
#   bash scripts/abi_check.sh
#
# 1. the wheel, built ONCE by `pip wheel --no-build-isolation` against the torch of PYTHON's
#    environment (scripts/test.sh's: torch==2.13.0, CPU): build/abi/dist/sign_kernels-<v>-cp310-abi3-<platform>.whl
#    (in-tree, so the objects of test.sh's in-place build are reused: it only links);
# 2. that same file installed as it is (pip --target into build/abi/site-new, no build; the venv
#    itself is left as it is) beside the torch of SIGN_KERNELS_CUDA_VENV (2.14.1), and the op and
#    optimizer tests run there on the reference and cpu backends (ABI_CHECK_TESTS);
# 3. the other way round (what TORCH_TARGET_VERSION promises): a CPU wheel built against 2.14.1
#    (SIGN_KERNELS_SKIP_CUDA=1, objects under build/abi/b-new) installed into build/abi/site-old
#    and tests/test_ops.py run with PYTHON's torch 2.13 (ABI_CHECK_REVERSE=0 skips this step);
# 4. the audit of every wheel, with the CUDA wheel of scripts/cuda_build_check.sh
#    (build/cuda-ext/dist/*.whl, built against 2.14.1; that script checks it loads and registers its
#    CUDA kernels) when there is one: scripts/abi_audit.py (nm/readelf: torch's C shim and
#    CPython's stable ABI of 3.10 only) and PyPI's torch-abi-audit (STABLE, abi3, min torch 2.10.0),
#    both from a small tools venv (build/abi/tools).
#
# Any failure exits non-zero with the reason. Environment: PYTHON (default python3),
# SIGN_KERNELS_CUDA_VENV (default build/cuda-venv), MAX_JOBS (default: the CPU count),
# ABI_CHECK_TESTS (default: the files below), ABI_CHECK_REVERSE (default 1).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
VENV=${SIGN_KERNELS_CUDA_VENV:-$ROOT/build/cuda-venv}
NEW_PY=$VENV/bin/python
OUT=$ROOT/build/abi
TESTS=${ABI_CHECK_TESTS:-tests/test_ops.py tests/test_optimizer.py tests/test_parity.py tests/test_validation.py}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
t0=$SECONDS
say() { echo "[abi-check] $*"; }
die() { echo "[abi-check] FAILED: $*" >&2; exit 1; }
pip_quiet() {  # (pip warns once per index that lacks a package: noise, filtered out)
  "$@" --quiet --disable-pip-version-check --root-user-action=ignore 2> >(grep -v "is ignored: it is neither" >&2)
}
torch_of() { "$1" -c "import torch; print(torch.__version__)"; }

[[ -x $NEW_PY ]] || die "no venv at $VENV: run scripts/cuda_build_check.sh first (it makes it), or set SIGN_KERNELS_CUDA_VENV"
OLD_V=$(torch_of "$PY") || die "$PY has no torch"
NEW_V=$(torch_of "$NEW_PY") || die "$NEW_PY has no torch"
[[ $OLD_V != "$NEW_V" ]] || die "both environments have torch $OLD_V: nothing crosses versions"
rm -rf "$OUT/dist" "$OUT/dist-new" "$OUT/site-new" "$OUT/site-old" "$OUT/run"
mkdir -p "$OUT/dist" "$OUT/run"

# ---------------------------------------------------------------- 1. the wheel, once
say "1. pip wheel against torch $OLD_V ($PY)"
SIGN_KERNELS_SKIP_CUDA=1 "$PY" -m pip wheel --no-build-isolation --no-deps --disable-pip-version-check -w "$OUT/dist" . \
  >"$OUT/wheel.log" 2>&1 || { tail -n 40 "$OUT/wheel.log"; die "pip wheel failed (log: $OUT/wheel.log)"; }
wheels=("$OUT"/dist/sign_kernels-*.whl)
[[ ${#wheels[@]} == 1 && -f ${wheels[0]} ]] || die "expected one wheel in $OUT/dist, found: ${wheels[*]}"
WHEEL=${wheels[0]}
say "   $(basename "$WHEEL") ($(du -h "$WHEEL" | cut -f1), sha256 $(sha256sum "$WHEEL" | cut -c1-16))"
[[ $(basename "$WHEEL") == sign_kernels-*-cp310-abi3-*.whl ]] || die "$(basename "$WHEEL") is not tagged cp310-abi3"

# run_tests PY SITE LABEL FILES...: pytest from $OUT/run (not the source tree), importing
# sign_kernels from SITE only; the tests are the repository's, unchanged.
run_tests() {
  local py=$1 site=$2 label=$3; shift 3
  (cd "$OUT/run" && PYTHONPATH=$site "$py" - "$site" <<'EOF') || die "$label: sign_kernels is not the installed wheel"
import os, sys, torch, sign_kernels
from sign_kernels import _C
site = os.path.realpath(sys.argv[1])
for mod in (sign_kernels, _C):
    where = os.path.realpath(mod.__file__)
    assert where.startswith(site + os.sep), f"{mod.__name__} imported from {where}, not from {site}"
print(f"[abi-check]    torch {torch.__version__}, python {sys.version.split()[0]}: {os.path.relpath(_C.__file__, site)}, "
      f"cpu {sign_kernels.available_backends()['cpu'] or 'available'}, isa {_C.CPU_ISA}, "
      f"threads {_C.cpu_threads_used(64)} of {torch.get_num_threads()}")
EOF
  if (cd "$OUT/run" && PYTHONPATH=$site "$py" -m pytest -q -p no:cacheprovider --rootdir "$ROOT" "${@/#/$ROOT/}" \
        >"$OUT/$label.log" 2>&1); then
    echo "[abi-check]    $(tail -n 1 "$OUT/$label.log")"
  else
    tail -n 30 "$OUT/$label.log"
    die "$label: tests failed (log: $OUT/$label.log)"
  fi
}

# ---------------------------------------------------------------- 2. the same file under torch 2.14.1
say "2. $(basename "$WHEEL") installed unchanged beside torch $NEW_V ($VENV); $TESTS"
pip_quiet "$NEW_PY" -m pip install --no-deps --no-compile --target "$OUT/site-new" "$WHEEL" \
  || die "could not install the wheel into $OUT/site-new"
# pytest and hypothesis for that Python, beside the wheel (the shared venv stays as it is)
pip_quiet "$NEW_PY" -m pip install --no-compile --target "$OUT/site-new" "pytest>=8" "hypothesis>=6.100" expecttest \
  || die "could not install pytest into $OUT/site-new"
# shellcheck disable=SC2086
run_tests "$NEW_PY" "$OUT/site-new" "tests-built-$OLD_V-run-$NEW_V" $TESTS

# ---------------------------------------------------------------- 3. built on the newer, run on the older
if [[ ${ABI_CHECK_REVERSE:-1} == 1 ]]; then
  say "3. a CPU wheel built against torch $NEW_V, tests/test_ops.py under torch $OLD_V"
  mkdir -p "$OUT/dist-new"
  SIGN_KERNELS_SKIP_CUDA=1 "$NEW_PY" setup.py -q egg_info --egg-base "$OUT" build --build-base "$OUT/b-new" \
    bdist_wheel --bdist-dir "$OUT/b-new/bdist" --dist-dir "$OUT/dist-new" >"$OUT/wheel-new.log" 2>&1 \
    || { tail -n 40 "$OUT/wheel-new.log"; die "the build against torch $NEW_V failed (log: $OUT/wheel-new.log)"; }
  wheel_new=("$OUT"/dist-new/sign_kernels-*-cp310-abi3-*.whl)
  [[ -f ${wheel_new[0]} ]] || die "no cp310-abi3 wheel in $OUT/dist-new"
  pip_quiet "$PY" -m pip install --no-deps --no-compile --target "$OUT/site-old" "${wheel_new[0]}" \
    || die "could not install ${wheel_new[0]} into $OUT/site-old"
  run_tests "$PY" "$OUT/site-old" "tests-built-$NEW_V-run-$OLD_V" tests/test_ops.py
else
  say "3. skipped (ABI_CHECK_REVERSE=0)"
fi

# ---------------------------------------------------------------- 4. the audit
audit=("$WHEEL")
[[ ${ABI_CHECK_REVERSE:-1} == 1 ]] && audit+=("${wheel_new[0]}")
cuda_wheels=("$ROOT"/build/cuda-ext/dist/sign_kernels-*.whl)
if [[ -f ${cuda_wheels[0]} ]]; then audit+=("${cuda_wheels[0]}")
else say "   (no CUDA wheel in build/cuda-ext/dist: scripts/cuda_build_check.sh makes it)"; fi
say "4. audit of ${#audit[@]} wheel(s): $(for w in "${audit[@]}"; do printf '%s ' "$(basename "$w")"; done)"
TOOLS=$OUT/tools
if [[ ! -x $TOOLS/bin/torch-abi-audit ]]; then
  rm -rf "$TOOLS"
  "$PY" -m venv "$TOOLS"
  pip_quiet "$TOOLS/bin/python" -m pip install torch-abi-audit abi3info \
    || { say "   torch-abi-audit is not installable here: abi3info alone"; pip_quiet "$TOOLS/bin/python" -m pip install abi3info; } \
    || die "neither torch-abi-audit nor abi3info installs here: no table of CPython's stable ABI to audit against"
fi
# abi_audit.py runs on the build's Python (its torch names the libraries to check against), with
# abi3info from the tools venv.
tools_site=$("$TOOLS/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
PYTHONPATH=$tools_site "$PY" scripts/abi_audit.py --python-min 3.10 "${audit[@]}" || die "scripts/abi_audit.py found violations"
if [[ -x $TOOLS/bin/torch-abi-audit ]]; then
  rm -rf "$OUT/unpacked" && mkdir -p "$OUT/unpacked"
  for w in "${audit[@]}"; do
    d=$OUT/unpacked/$(basename "$w" .whl)
    "$PY" -m zipfile -e "$w" "$d"
    "$TOOLS/bin/torch-abi-audit" --check both --verbose "$d/sign_kernels" | sed 's/^/[abi-check]    /' \
      | tee "$OUT/torch-abi-audit.log" | grep -E "Torch ABI|Min torch|CPython ABI|\.so" || true
    grep -q "Torch ABI: *STABLE" "$OUT/torch-abi-audit.log" && grep -q "Min torch: *2\.10\.0" "$OUT/torch-abi-audit.log" \
      && grep -q "CPython ABI: *abi3" "$OUT/torch-abi-audit.log" \
      || die "torch-abi-audit on $(basename "$w"): not STABLE / abi3 / min torch 2.10.0 (log: $OUT/torch-abi-audit.log)"
  done
fi
say "OK: one cp310-abi3 wheel built against torch $OLD_V passes under $NEW_V$([[ ${ABI_CHECK_REVERSE:-1} == 1 ]] && echo " (and one built against $NEW_V under $OLD_V)"); every wheel on the stable ABIs ($((SECONDS - t0)) s)"
