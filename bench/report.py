"""Where a run happened (environment), and its three outputs: table, JSON, PNG."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

SCHEMA_VERSION = 1
REPO = Path(__file__).resolve().parent.parent
PEER_DISTS = ("lion-pytorch", "torch-optimi", "timm", "pytorch-optimizer", "bitsandbytes",
              "deepspeed")


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_info() -> Dict[str, Optional[str]]:
    def git(*args: str) -> Optional[str]:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_sha": git("rev-parse", "HEAD"), "git_dirty": bool(status) if status is not None else None}


def loadavg() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment(device: torch.device) -> Dict:
    env = dict(
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        cpu_model=cpu_model(),
        threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(),
        torch=torch.__version__,
        triton=_version("triton"),
        cuda=torch.version.cuda,
        python=platform.python_version(),
        platform=platform.platform(),
        sign_kernels=_version("sign_kernels") or _version("sign-kernels"),
        peers={d: _version(d) for d in PEER_DISTS},
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join([os.path.basename(sys.executable), "-m", "bench", *sys.argv[1:]]),
    )
    env["loadavg"] = loadavg()  # other work on the machine skews CPU timings
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["gpu_capability"] = f"{props.major}.{props.minor}"
    try:
        from .contenders import sign_kernels_backends

        env["available_backends"] = sign_kernels_backends()
    except Exception as exc:  # environment capture must not end the run
        env["available_backends"] = f"{type(exc).__name__}: {exc}"
    env.update(git_info())
    return env


def slug(env: Dict) -> str:
    if env["device"].startswith("cuda"):
        base = env["device_name"]
    else:
        base = f"cpu-{env['cpu_model']}-{env['threads']}t"
    return re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")


def default_stem(env: Dict) -> str:
    return f"{slug(env)}-{env['date'][:10]}"


# ---- table -------------------------------------------------------------------------------


def _f(x, fmt: str, dash: str = "-") -> str:
    return dash if x is None else format(x, fmt)


# A 1-minute load average above this many runnable tasks per core, at the start, means other
# work shared the cores (our own run adds its threads, so the end is judged at cores + threads).
LOAD_PER_CORE = 0.75
# Per-round ceilings whose p10-p90 spread exceeds this fraction of their median: the machine's
# bandwidth changed during the run (CPU VMs do, by 2x within seconds; NOTES.md).
CEILING_DRIFT = 0.30


def warnings_for(result: Dict) -> List[str]:
    """Reasons not to trust this run's numbers as they stand (empty when none)."""
    env = result.get("env", {})
    cores = env.get("cpu_count") or 1
    out = []
    if result.get("partial"):
        out.append(f"incomplete: {result['partial']} (rows after that point are missing)")
    start, end = env.get("loadavg"), env.get("loadavg_end")
    on_cpu = not str(env.get("device", "cpu")).startswith("cuda")
    if on_cpu and start and start[0] > LOAD_PER_CORE * cores:
        out.append(f"the machine was loaded when the run started (load average {start[0]:.1f} on {cores} cores): "
                   "CPU timings and ceilings are unreliable; rerun on a quiet machine")
    if on_cpu and end and end[0] > cores + (env.get("threads") or 1):
        out.append(f"the machine was loaded during the run (load average {end[0]:.1f} at the end, {cores} cores, "
                   f"{env.get('threads')} threads of ours)")
    for key, c in result.get("ceilings", {}).items():
        per_round = sorted(c.get("ceiling_gbps_per_round") or [])
        if len(per_round) >= 5:
            p10, p90 = per_round[len(per_round) // 10], per_round[(9 * len(per_round)) // 10]
            med = per_round[len(per_round) // 2]
            if med and (p90 - p10) / med > CEILING_DRIFT:
                out.append(f"{key}: the bandwidth ceiling drifted {p10:.1f}-{p90:.1f} GB/s (p10-p90) between "
                           f"rounds: more than {100 * CEILING_DRIFT:.0f} % of its median {med:.1f}; ratios are "
                           "per-round medians, absolute ms and GB/s are not comparable across runs")
    return out


def _ms(x: float) -> str:
    return f"{x:.2f}"


def table_header(result: Dict) -> List[str]:
    """The lines above the sections: where the run happened and what the columns mean."""
    env = result.get("env", {})
    lines = [f"WARNING: {w}" for w in result.get("warnings", [])]
    lines += [
        f"device: {env.get('device_name', result.get('device'))}  threads: {env.get('threads')}  "
        f"torch {env.get('torch')}  git {str(env.get('git_sha'))[:10]}  "
        f"load avg at start {env.get('loadavg')}",
        f"up to {result['config']['steps']} timed steps after {result['config']['warmup']} warm-up "
        "(n: the steps a row really timed; a row stops early after its time budget); "
        "ms = median [p10, p90] of the step time",
        "x AdamW = step time / fused torch.optim.AdamW's step time (same param dtype; lower is better); "
        "% ceil = GB/s / the ceiling (the faster of an in-place mul_ pass and a copy, timed in the same run)",
    ]
    if result["config"].get("schedule") == "interleaved":
        lines.append("schedule: interleaved (one step of every contender and of the ceiling passes per "
                     "round); x AdamW and % ceil are medians of per-round ratios")
    return lines


_HEAD = (f"{'contender':<26}{'backend':<10}{'n':>4}{'ms p50':>9} {'[p10, p90]':<18}{'GB/s':>7}"
         f"{'% ceil':>8}{'x AdamW':>9}{'B/elem':>8}{'state B/p':>10}{'launch':>8}")
_ABOVE = ("* above 100 % of the ceiling: this step moved its bytes faster than the in-place mul_ pass "
          "(or the copy) that defines the ceiling. On CPUs time follows the bytes read more than the "
          "bytes written, and mul_ reads only half of what it moves (bench/NOTES.md), so a "
          "read-light step can beat it; it does not mean more than the memory can deliver.")


def sections(rows: List[Dict]) -> List[tuple]:
    order = []
    for r in rows:
        k = (r["param_set"], r["dtype"])
        if k not in order:
            order.append(k)
    return order


def table_section(result: Dict, pset: str, dtype: str) -> List[str]:
    """One parameter set and dtype setting: its ceiling and one line per timed row."""
    group = [r for r in result["rows"] if (r["param_set"], r["dtype"]) == (pset, dtype)]
    r0 = group[0]
    ceil = result["ceilings"].get(f"{pset}/{dtype}", {})
    lines = ["", f"{pset} ({r0['n_tensors']} tensors, {r0['n_elements'] / 1e6:.1f}M elements), "
                 f"{dtype}; ceiling {_f(ceil.get('ceiling_gbps'), '.1f')} GB/s "
                 f"(mul_ {_f(ceil.get('mul_gbps'), '.1f')}, copy {_f(ceil.get('copy_gbps'), '.1f')})",
             _HEAD, "-" * len(_HEAD)]
    for r in group:
        if r["ms_median"] is None:
            continue
        frac = r["fraction"] and 100 * r["fraction"]
        mark = "*" if frac and frac > 100 else " "
        spread = f"[{_ms(r['ms_p10'])}, {_ms(r['ms_p90'])}]"
        lines.append(
            f"{r['contender'][:25]:<26}{r['backend'][:9]:<10}{r['steps']:>4}{_ms(r['ms_median']):>9} {spread:<18}"
            f"{r['gbps']:>7.1f}{_f(frac, '.0f'):>7}{mark}"
            f"{_f(r['ratio_vs_fused_adamw'], '.2f'):>9}"
            f"{r['bytes_per_step'] / r['n_elements']:>8.1f}{r['state_bytes_per_param']:>10.2f}"
            f"{_f(r['launches'], 'd'):>8}"
        )
        if r.get("tiger_bytes_per_element"):
            parts = [f"{role} {v['steady']:g}/{v['first']:g} ({v['elements'] / 1e6:.1f}M)"
                     for role, v in r["tiger_bytes_per_element"].items()]
            lines.append(f"{'':<4}Tiger B/elem by role, steady/first step: " + ", ".join(parts))
        if r.get("clip"):
            # NOTE: [clip rows] in bench/contenders.py
            names = {x["key"]: x["contender"] for x in group}
            ratios = [f"{names.get(k, k)} {v:.2f}" for k, v in (r.get("clip_ratios") or {}).items() if v]
            coef = r.get("clip_coef_last")
            lines.append(f"{'':<4}{r['contender']} time / " + (", ".join(ratios) or "-")
                         + f"  (max norm {r.get('max_grad_norm')}, last norm {_f(r.get('grad_norm_last'), '.4g')}, "
                         f"coefficient {_f(coef, '.3g')})")
        if r.get("group") == "int8":
            # NOTE: [int8 rows] in bench/contenders.py
            names = {x["key"]: x["contender"] for x in group}
            ratios = [f"{names.get(k, k)} {v:.2f}" for k, v in (r.get("int8_ratios") or {}).items() if v]
            lines.append(f"{'':<4}{r['contender']} time / " + (", ".join(ratios) or "-")
                         + f"  ({r.get('param_dtype')} params and grads, state {r.get('state_dtype')})")
    return lines


def table_footer(result: Dict) -> List[str]:
    """Footnotes, the rows that were not timed and why, and the warnings again."""
    rows = result["rows"]
    lines = []
    if any(r["ms_median"] is not None and r["fraction"] and r["fraction"] > 1 for r in rows):
        lines += ["", _ABOVE]
    skipped = [r for r in rows if r["ms_median"] is None]
    if skipped:
        lines += ["", "not timed:"]
        seen = set()
        for r in skipped:
            k = (r["key"], r["status"])
            if k in seen:
                continue
            seen.add(k)
            lines.append(f"  {r['contender']} [{r['backend']}] ({r['dtype']}): {r['status']}")
    if result.get("warnings"):
        lines += [""] + [f"WARNING: {w}" for w in result["warnings"]]
    return lines


def table(result: Dict) -> str:
    lines = table_header(result)
    for pset, dtype in sections(result["rows"]):
        lines += table_section(result, pset, dtype)
    return "\n".join(lines + table_footer(result))


# ---- files ------------------------------------------------------------------------------------


def write_json(result: Dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, sort_keys=False, default=str)
        f.write("\n")


def plot(result: Dict, path: Path) -> Optional[str]:
    """Two panels per parameter set: time ratio to fused AdamW, and fraction of the ceiling.
    Returns None, or why no plot was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib not available: {exc}"
    rows = [r for r in result["rows"] if r["ms_median"] is not None]
    if not rows:
        return "no timed rows"
    psets = list(dict.fromkeys(r["param_set"] for r in rows))
    labels = list(dict.fromkeys(f"{r['contender']} [{r['backend']}] {r['dtype']}" for r in rows))
    height = max(3.0, 0.28 * len(labels) + 1.5)
    fig, axes = plt.subplots(1, 2, figsize=(13, height), sharey=True)
    width = 0.8 / len(psets)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, pset in enumerate(psets):
        by = {f"{r['contender']} [{r['backend']}] {r['dtype']}": r for r in rows if r["param_set"] == pset}
        ys = [i + (j - (len(psets) - 1) / 2) * width for i in range(len(labels))]
        nan = float("nan")  # no bar
        ratio = [by[l]["ratio_vs_fused_adamw"] if l in by and by[l]["ratio_vs_fused_adamw"] else nan for l in labels]
        frac = [100 * by[l]["fraction"] if l in by and by[l]["fraction"] else nan for l in labels]
        axes[0].barh(ys, ratio, height=width, color=colors[j % len(colors)], label=pset)
        axes[1].barh(ys, frac, height=width, color=colors[j % len(colors)], label=pset)
    ratios = [r["ratio_vs_fused_adamw"] for r in rows if r["ratio_vs_fused_adamw"]]
    if ratios and max(ratios) / min(ratios) > 8:  # foreach/reference rows dwarf the rest
        axes[0].set_xscale("log")
    axes[0].axvline(1.0, color="k", lw=0.8)
    axes[0].set_xlabel("step time / fused AdamW step time (lower is better)")
    axes[1].axvline(100.0, color="k", lw=0.8)
    axes[1].set_xlabel("% of measured bandwidth ceiling (higher is better)")
    axes[0].set_yticks(range(len(labels)))
    axes[0].set_yticklabels(labels, fontsize=8)
    axes[0].invert_yaxis()
    axes[1].legend(fontsize=8, loc="lower right")
    env = result.get("env", {})
    fig.suptitle(f"sign_kernels optimizer step — {env.get('device_name', result.get('device'))}, "
                 f"{env.get('threads')} threads, torch {env.get('torch')}, {env.get('date', '')[:10]}",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
