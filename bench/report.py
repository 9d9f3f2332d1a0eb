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


def table(result: Dict) -> str:
    rows: List[Dict] = result["rows"]
    env = result.get("env", {})
    lines = [
        f"device: {env.get('device_name', result.get('device'))}  threads: {env.get('threads')}  "
        f"torch {env.get('torch')}  git {str(env.get('git_sha'))[:10]}  "
        f"load avg at start {env.get('loadavg')}",
        f"steps: {result['config']['steps']} timed after {result['config']['warmup']} warm-up; "
        "ms = median [p10, p90]; x AdamW = time / fused AdamW's (same param dtype); "
        "% ceil = GB/s / measured ceiling",
    ]
    if result["config"].get("schedule") == "interleaved":
        lines.append("schedule: interleaved (one step of every contender and of the ceiling passes per "
                     "round); x AdamW and % ceil are medians of per-round ratios")
    head = (f"{'contender':<26}{'backend':<10}{'ms p50':>9} {'[p10, p90]':<20}{'GB/s':>7}"
            f"{'% ceil':>8}{'x AdamW':>9}{'B/elem':>8}{'state B/p':>10}{'launch':>8}")
    order = []
    for r in rows:
        k = (r["param_set"], r["dtype"])
        if k not in order:
            order.append(k)
    skipped = []
    for pset, dtype in order:
        group = [r for r in rows if (r["param_set"], r["dtype"]) == (pset, dtype)]
        r0 = group[0]
        ceil = result["ceilings"].get(f"{pset}/{dtype}", {})
        b = ceil
        lines += ["", f"{pset} ({r0['n_tensors']} tensors, {r0['n_elements'] / 1e6:.1f}M elements), "
                      f"{dtype}; ceiling {_f(ceil.get('ceiling_gbps'), '.1f')} GB/s "
                      f"(mul_ {_f(b.get('mul_gbps'), '.1f')}, copy {_f(b.get('copy_gbps'), '.1f')})",
                  head, "-" * len(head)]
        for r in group:
            if r["ms_median"] is None:
                skipped.append(r)
                continue
            spread = f"[{r['ms_p10']:.3g}, {r['ms_p90']:.3g}]"
            lines.append(
                f"{r['contender'][:25]:<26}{r['backend'][:9]:<10}{r['ms_median']:>9.3g} {spread:<20}"
                f"{r['gbps']:>7.1f}{_f(r['fraction'] and 100 * r['fraction'], '.0f'):>8}"
                f"{_f(r['ratio_vs_fused_adamw'], '.2f'):>9}"
                f"{r['bytes_per_step'] / r['n_elements']:>8.1f}{r['state_bytes_per_param']:>10.2f}"
                f"{_f(r['launches'], 'd'):>8}"
            )
    if skipped:
        lines += ["", "not timed:"]
        seen = set()
        for r in skipped:
            k = (r["key"], r["status"])
            if k in seen:
                continue
            seen.add(k)
            lines.append(f"  {r['contender']} [{r['backend']}] ({r['dtype']}): {r['status']}")
    return "\n".join(lines)


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
