"""The sweep: parameter sets x dtype settings x contenders -> result rows."""

from __future__ import annotations

import gc
import os
import sys
import traceback
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from . import accounting, contenders as contenders_mod, paramsets
from .accounting import DTYPE_SETTINGS, DtypeSetting
from .contenders import Contender
from .paramsets import ParamSet
from .timing import Workspace, count_launches, time_steps


@dataclass
class Config:
    device: str = "auto"
    param_sets: Sequence[str] = ("flat", "gpt2")
    flat_size: int = 32 * 2**20
    llama_size: str = "1B"
    tiny_count: int = 4096
    dtypes: Sequence[str] = ("fp32",)
    contenders: str = "ours,adamw"
    backends: str = "best"
    steps: int = 20
    warmup: int = 3
    row_budget_s: Optional[float] = 10.0  # stop a row's timed steps after this long (>= 5 steps)
    threads: Optional[int] = None
    nvtx: bool = False
    grad_mode: str = "auto"
    seed: int = 0
    ceiling_reps: int = 10
    launches: bool = True
    progress: bool = True


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False here")
    return device


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or not enabled:
        class _Quiet:
            def update(self, n=1): pass
            def set_description(self, s): pass
            def close(self): pass
        return _Quiet()
    return tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True, leave=False)


def _free(device: torch.device, collect: bool = True) -> None:
    if collect:  # a full collection costs ~0.3 s with torch loaded: only for big buffers
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _state_dtypes(opt: torch.optim.Optimizer) -> str:
    names = set()
    for state in opt.state.values():
        for v in state.values():
            if torch.is_tensor(v) and v.numel() > 1:
                names.add(str(v.dtype).replace("torch.", ""))
    return "+".join(sorted(names)) or "-"


def run_one(c: Contender, ws: Optional[Workspace], pset: ParamSet, ds: DtypeSetting,
            device: torch.device, cfg: Config) -> Dict:
    row: Dict = dict(
        contender=c.label, key=c.key, algo=c.algo, backend=c.backend, group=c.group,
        dtype=ds.name, param_dtype=str(ds.param).replace("torch.", ""),
        grad_dtype=str(ds.grad).replace("torch.", ""), state_dtype=None,
        param_set=pset.name, n_tensors=pset.n_tensors, n_elements=pset.n_elements,
        steps=cfg.steps, warmup=cfg.warmup, status="ok",
        ms_median=None, ms_p10=None, ms_p90=None, ms_min=None, bytes_per_step=None,
        gbps=None, ceiling_gbps=None, fraction=None, ratio_vs_fused_adamw=None,
        state_bytes_per_param=None, state_bytes_model=None, state_bytes_held=None,
        launches=None, note=c.notes or None,
    )
    reason = c.unavailable(device)
    if reason:
        row["status"] = f"skipped: {reason}"
        return row
    assert ws is not None
    opt = None
    try:
        opt = c.make(ws.params, ds)
        label = f"{c.key} {ds.name} {pset.name}"
        timing = time_steps(opt.step, ws.refill, device, warmup=cfg.warmup, steps=cfg.steps,
                            nvtx=cfg.nvtx, label=label, budget_s=cfg.row_budget_s)
        launches = count_launches(opt.step, ws.refill, device) if cfg.launches else None
    except Exception as exc:  # reported in the row; ours/AdamW also fail the run (cli)
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        if c.group == "peer":
            row["status"] = f"skipped: failed on {device.type}: {type(exc).__name__}: {msg}"
        else:
            row["status"] = f"error: {type(exc).__name__}: {msg}"
            traceback.print_exc(file=sys.stderr)
        del opt
        _free(device, pset.n_elements > 2**24)
        return row
    held = accounting.measured_state_bytes(opt)
    model = None if c.measured_state else accounting.state_bytes(c.algo, pset.numels, ds)
    state_total = held if model is None else model
    nbytes = accounting.step_bytes_from_state(pset.numels, ds, state_total)
    if model is not None and held != model:
        row["note"] = f"state held {held} B, byte model {model} B"
    row.update(
        steps=len(timing.ms), state_dtype=_state_dtypes(opt), ms_median=timing.median, ms_p10=timing.percentile(10),
        ms_p90=timing.percentile(90), ms_min=min(timing.ms), bytes_per_step=nbytes,
        gbps=accounting.gbps(nbytes, timing.median),
        state_bytes_per_param=state_total / pset.n_elements,
        state_bytes_model=model, state_bytes_held=held, launches=launches,
    )
    del opt
    _free(device, pset.n_elements > 2**24)
    return row


def baseline_dtype(ds_name: str) -> str:
    """Fused AdamW keeps its state in the param dtype: rows are compared at the same param dtype."""
    return {"bf16-fp32m": "bf16"}.get(ds_name, ds_name)


def attach_ratios(rows: List[Dict], ceilings: Dict[str, Dict]) -> None:
    base = {(r["param_set"], r["dtype"]): r["ms_median"] for r in rows
            if r["key"] == contenders_mod.BASELINE and r["ms_median"]}
    for r in rows:
        if r["ms_median"] is None:
            continue
        ceil = ceilings.get(f"{r['param_set']}/{r['dtype']}", {}).get("ceiling_gbps")
        r["ceiling_gbps"] = ceil
        r["fraction"] = r["gbps"] / ceil if ceil else None
        b = base.get((r["param_set"], baseline_dtype(r["dtype"])))
        r["ratio_vs_fused_adamw"] = r["ms_median"] / b if b else None


def build_param_sets(cfg: Config) -> List[ParamSet]:
    return [paramsets.build(s, flat_size=cfg.flat_size, llama_size=cfg.llama_size,
                            tiny_count=cfg.tiny_count) for s in cfg.param_sets]


def run(cfg: Config) -> Dict:
    """Run the sweep; returns {"config", "device", "rows", "ceilings"} (no environment)."""
    device = resolve_device(cfg.device)
    torch.set_num_threads(cfg.threads or default_threads())
    for d in cfg.dtypes:
        if d not in DTYPE_SETTINGS:
            raise ValueError(f"unknown dtype setting {d!r}; choose from {sorted(DTYPE_SETTINGS)}")
    chosen = contenders_mod.select(device, cfg.contenders, cfg.backends)
    psets = build_param_sets(cfg)
    dsets = [DTYPE_SETTINGS[d] for d in cfg.dtypes]
    jobs = [(p, d, c) for p in psets for d in dsets for c in chosen if c.supports(d.name)]
    bar = _progress(len(jobs), cfg.progress)
    rows: List[Dict] = []
    ceilings: Dict[str, Dict] = {}
    fp32 = DTYPE_SETTINGS["fp32"]
    try:
        for pset in psets:
            for ds in dsets:
                here = [c for c in chosen if c.supports(ds.name)]
                runnable = [c for c in here if not c.unavailable(device)]
                ws = Workspace(pset, ds, device, cfg.grad_mode, cfg.seed) if runnable else None
                for c in here:
                    bar.set_description(f"{pset.name} {ds.name} {c.key}")
                    rows.append(run_one(c, ws, pset, ds, device, cfg))
                    bar.update()
                if ws is not None:
                    # NOTE: [ceiling] in the same run, after the contenders, over the same
                    # (already touched) memory they used: separate big buffers allocated and
                    # freed around the steps changed the steps' speed by up to 3x on the CPU
                    # VM this was developed on.
                    bar.set_description(f"{pset.name} {ds.name} ceiling")
                    ceilings[f"{pset.name}/{ds.name}"] = ws.ceiling(cfg.ceiling_reps)
                del ws
                _free(device, pset.n_elements > 2**24)
    finally:
        bar.close()
    attach_ratios(rows, ceilings)
    return dict(config=asdict(cfg), device=str(device), rows=rows, ceilings=ceilings)
