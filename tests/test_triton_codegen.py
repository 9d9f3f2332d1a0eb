"""The Triton kernels as an H100 would run them, checked without a GPU: every specialisation the
backend can launch is compiled for sm_90 (tests/triton_codegen.py, in a subprocess: triton
picks interpreter or compiler once per process) and must

* use no local memory or stack (no spills);
* on the aligned path (every address 16-byte aligned, NOTE: [vector hints]): issue 16-byte
  global loads and stores (``ld.global.v4`` / ``st.global.v4``; for 16-bit data eight
  elements in one), at least as many as a thread's share of a full block needs;
* stay within its register budget (below): 64 registers let 1024 threads share an SM's 64K
  registers, which is what the streaming update needs for its loads in flight.

Budgets (measured 2026-11-27 with both ptxas versions Triton ships for sm_90: 12.8 in triton
3.6, which the GPU machine has, and 13.4 in triton 3.9; NOTE: [triton maxnreg] in
sign_kernels/triton/_launch.py has the sweep): Lion and Simba's update 38-64 registers (fp16
params with stochastic rounding up to 80: the extra layout conversion and the rounding hash);
Tiger's update is bounded at 80 (12.8 needs 78-93 unbounded, 13.4 62-85), with its sums out
(``sumsq=1``: the fp64 squares and their pairwise tree) at 112 (12.8 spills at 80 and 96);
without the alignment hints (the blocks of a misaligned tensor) the loads are scalar and take
up to 112. The int8 momentum update (``sign_q8_kernel``: the update, the blocks' absmax and the
stochastic rounding onto the square-law codes; 4 elements per thread) is bounded at 88 (ptxas
13.4 takes 64-91 unbounded; at 80 two of them spill); NOTE: [triton maxnreg] in
sign_kernels/triton/_launch.py. The update with the correction
byte (``ec=1``: θ16 + ρ decoded, RNE and ρ encoded) runs 16 warps, 4 elements per thread (at 8
per thread Lion took 69-77 and Tiger's unaligned sums out spilled at 112): Lion 35-56, Tiger
46-64, its unaligned sums out 64-80 (ptxas 13.4), within the budgets above.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
BUDGET_ALIGNED = 64
BUDGET_ALIGNED_WIDE = 80      # Tiger's update, fp16 params with SR
BUDGET_SUMS_OUT = 112         # Tiger's update with its sums out
BUDGET_UNALIGNED = 112
BUDGET_Q8 = 88                # int8 momentum (sign_q8_kernel)


def _nvidia_tools_reason():
    try:
        import triton
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401

        cuobjdump = triton.knobs.nvidia.cuobjdump.path
    except Exception as exc:  # no NVIDIA backend in this triton build
        return f"triton has no NVIDIA backend here: {exc!r}"
    if not cuobjdump or not os.path.exists(cuobjdump):
        return "triton's bundled cuobjdump is missing"
    return None


def _ptxas() -> str:
    """The ptxas Triton compiles sm_90 with: allocations differ by version (NOTE: [triton maxnreg])."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        px = get_ptxas(90)
        return f"ptxas {px.version} ({px.path})"
    except Exception as exc:
        return f"ptxas unknown ({exc!r})"


@pytest.fixture(scope="module")
def kernels():
    reason = _nvidia_tools_reason()
    if reason:
        pytest.skip(reason)
    # (the caller's PYTHONPATH stays after the repo: scripts/triton_version_check.sh puts another
    # triton there)
    path = [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(path))
    args = [sys.executable, str(ROOT / "tests" / "triton_codegen.py")]
    if os.environ.get("SIGN_KERNELS_CODEGEN_ALL"):
        args.append("--all")
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stderr[-4000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def _budget(k):
    if not k["aligned"]:
        return BUDGET_UNALIGNED
    name = k["name"]
    if k["kernel"] == "sign_q8_kernel":
        return BUDGET_Q8
    if "sumsq=1" in name:  # Tiger's sums out (NOTE: [Triton sums of squares])
        return BUDGET_SUMS_OUT
    wide = "tiger_" in name or ("p=float16" in name and "sr=1" in name)
    return BUDGET_ALIGNED_WIDE if wide else BUDGET_ALIGNED


def test_every_specialisation_compiled(kernels):
    names = {k["kernel"] for k in kernels}
    assert names == {"sign_step_kernel", "tiger_rows_kernel", "tiger_sumsq_kernel", "tiger_finish_kernel",
                     "tiger_sumsq_out_kernel", "sumsq_blocks_kernel", "sumsq_total_kernel", "sign_q8_kernel",
                     "tiger_sums_after_kernel"}
    # 3 algorithms x their dtype combinations x SR x alignment x optional inputs (x Tiger's sums out)
    assert sum(k["kernel"] == "sign_step_kernel" for k in kernels) >= 135
    assert any("sumsq=1" in k["name"] for k in kernels)
    # the correction byte and int8 momentum (NOTE: [8-bit momentum and the correction byte])
    assert any(k["kernel"] == "sign_step_kernel" and "ec=1" in k["name"] for k in kernels)
    assert sum(k["kernel"] == "sign_q8_kernel" for k in kernels) >= 66


def test_no_spills(kernels):
    bad = [f"{k['name']}: stack {k['stack']} local {k['local']}" for k in kernels
           if k["stack"] or k["local"]]
    assert not bad, "\n".join([_ptxas()] + bad)


def test_registers_within_budget(kernels):
    bad = [f"{k['name']}: {k['regs']} registers > {_budget(k)}" for k in kernels
           if k["regs"] > _budget(k)]
    assert not bad, "\n".join([_ptxas()] + bad)


def test_aligned_path_uses_16_byte_accesses(kernels):
    bad = [f"{k['name']}: {k['v4_loads']} 16-byte loads (needs {k['min_v4_loads']}), "
           f"{k['v4_stores']} stores (needs {k['min_v4_stores']})" for k in kernels
           if k["aligned"] and (k["v4_loads"] < k["min_v4_loads"] or k["v4_stores"] < k["min_v4_stores"])]
    assert not bad, "\n".join([_ptxas()] + bad)
    assert any(k["aligned"] and k["kernel"] == "tiger_rows_kernel" for k in kernels)
    assert any(k["aligned"] and k["kernel"] == "tiger_sumsq_kernel" for k in kernels)
    assert any(k["aligned"] and k["kernel"] == "sumsq_blocks_kernel" for k in kernels)
    assert any(k["aligned"] and k["kernel"] == "sign_q8_kernel" and k["min_v4_loads"] for k in kernels)
