"""The sweep: parameter sets x dtype settings x contenders -> result rows."""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import accounting, contenders as contenders_mod, paramsets
from .accounting import DTYPE_SETTINGS, DtypeSetting
from .contenders import Contender
from .paramsets import ParamSet
from .timing import MIN_STEPS, Timing, Workspace, count_launches, synchronize, time_steps


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
    schedule: str = "auto"  # interleaved | sequential | auto (interleaved on CPU, sequential on CUDA)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False here")
    return device


def resolve_schedule(name: str, device: torch.device) -> str:
    """NOTE: [interleaved schedule]"""
    if name == "auto":
        return "sequential" if device.type == "cuda" else "interleaved"
    if name not in ("interleaved", "sequential"):
        raise ValueError(f"schedule must be interleaved, sequential or auto, not {name!r}")
    return name


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


def _setting(c: Contender, ds: DtypeSetting) -> DtypeSetting:
    """The setting a contender steps in: its own (NOTE: [int8 rows]) or the section's."""
    return c.setting if c.setting is not None else ds


def _new_row(c: Contender, pset: ParamSet, ds: DtypeSetting, cfg: Config) -> Dict:
    own = _setting(c, ds)
    return dict(
        contender=c.label, key=c.key, algo=c.algo, backend=c.backend, group=c.group,
        dtype=ds.name, param_dtype=str(own.param).replace("torch.", ""),
        grad_dtype=str(own.grad).replace("torch.", ""), state_dtype=None,
        setting=c.setting.name if c.setting is not None else None,
        param_set=pset.name, n_tensors=pset.n_tensors, n_elements=pset.n_elements,
        steps=cfg.steps, warmup=cfg.warmup, status="ok",
        ms_median=None, ms_p10=None, ms_p90=None, ms_min=None, bytes_per_step=None,
        gbps=None, ceiling_gbps=None, fraction=None, ratio_vs_fused_adamw=None,
        state_bytes_per_param=None, state_bytes_model=None, state_bytes_held=None,
        launches=None, note=c.notes or None, ms=None,
        clip=c.clip, writes_grads=c.writes_grads,
    )


def _error_row(row: Dict, c: Contender, exc: BaseException, device: torch.device) -> None:
    """Peers that fail are skipped with the reason; ours and AdamW failing is an error (cli)."""
    msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    if c.group == "peer":
        row["status"] = f"skipped: failed on {device.type}: {type(exc).__name__}: {msg}"
    else:
        row["status"] = f"error: {type(exc).__name__}: {msg}"
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)


def _finish_row(row: Dict, c: Contender, opt: torch.optim.Optimizer, pset: ParamSet, ds: DtypeSetting,
                ms: List[float], launches: Optional[int]) -> None:
    """Times, bytes and state of a timed row (ratios come later: attach_ratios)."""
    timing = Timing(ms)
    ds = _setting(c, ds)  # NOTE: [int8 rows]: its own dtypes, momentum and residual
    held = accounting.measured_state_bytes(opt)
    shapes = [shape for _, shape in pset.tensors]
    model = None if c.measured_state else accounting.state_bytes_of_shapes(c.algo, shapes, ds)
    state_total = held if model is None else model
    nbytes = accounting.step_bytes_from_state(pset.numels, ds, state_total)
    if model is not None and held != model:
        row["note"] = f"state held {held} B, byte model {model} B"
    if c.algo == "tiger" and c.ours:
        nbytes = _tiger_bytes(row, c, opt, ds)
    # NOTE: [clip rows]: the norm pass (ours), or torch's norm and mul_ passes
    nbytes += pset.n_elements * accounting.clip_bytes_per_element(c.clip, c.algo, ds)
    if c.clip:
        _clip_fields(row, opt)
    if c.setting is not None:
        row.update(momentum_dtype=str(ds.momentum).replace("torch.", "") if ds.momentum else None,
                   error_correction=ds.error_correction, stochastic_rounding=ds.stochastic_rounding)
    row.update(
        steps=len(ms), state_dtype=_state_dtypes(opt), ms_median=timing.median, ms_p10=timing.percentile(10),
        ms_p90=timing.percentile(90), ms_min=min(ms), bytes_per_step=nbytes,
        gbps=accounting.gbps(nbytes, timing.median),
        state_bytes_per_param=state_total / pset.n_elements,
        state_bytes_model=model, state_bytes_held=held, launches=launches, ms=list(ms),
    )


def _clip_fields(row: Dict, opt) -> None:
    """The max norm and the last norm a clipped row's optimizer saw: its coefficient < 1 says
    the clipping path scaled the gradients (NOTE: [clip rows])."""
    from .contenders import CLIP_MAX_NORM

    norm = getattr(opt, "grad_norm", None)
    norm = float(norm) if norm is not None else None
    row.update(max_grad_norm=CLIP_MAX_NORM, grad_norm_last=norm,
               clip_coef_last=None if norm is None else min(1.0, CLIP_MAX_NORM / (norm + 1e-6)))


def _tiger_bytes(row: Dict, c: Contender, opt: torch.optim.Optimizer, ds: DtypeSetting) -> int:
    """Our Tiger's real traffic (accounting.tiger_bytes_per_element), per role, from the roles the
    optimizer gave the params; returns the bytes of the steady step the row timed."""
    from sign_kernels.optim.tiger import ROLES

    names = {code: name for name, code in ROLES.items()}
    tensors = []
    for group in opt.param_groups:
        for p, code in zip(group["params"], opt._roles(group)):
            tensors.append((p.numel(), names[code], p.shape[-1] if p.dim() else 1, p.dim()))
    per_role = {}
    for role in accounting.TIGER_ROLES:
        n = sum(t[0] for t in tensors if t[1] == role)
        if n:
            sel = [t for t in tensors if t[1] == role]
            per_role[role] = dict(
                elements=n,
                steady=accounting.tiger_step_bytes(sel, c.backend, ds, steady=True) / n,
                first=accounting.tiger_step_bytes(sel, c.backend, ds, steady=False) / n,
            )
    row["tiger_bytes_per_element"] = per_role
    row["bytes_first_step"] = accounting.tiger_step_bytes(tensors, c.backend, ds, steady=False)
    return accounting.tiger_step_bytes(tensors, c.backend, ds, steady=True)


def run_one(c: Contender, ws: Optional[Workspace], pset: ParamSet, ds: DtypeSetting,
            device: torch.device, cfg: Config) -> Dict:
    """Sequential schedule: this contender's warm-up and timed steps, all in a row."""
    row = _new_row(c, pset, ds, cfg)
    reason = c.unavailable(device)
    if reason:
        row["status"] = f"skipped: {reason}"
        return row
    assert ws is not None
    opt = None
    try:
        params, refill = ws.for_setting(c.setting)  # NOTE: [int8 rows]
        opt = c.make(params, _setting(c, ds))
        del params
        label = f"{c.key} {ds.name} {pset.name}"
        timing = time_steps(opt.step, refill, device, warmup=cfg.warmup, steps=cfg.steps,
                            nvtx=cfg.nvtx, label=label, budget_s=cfg.row_budget_s)
        launches = count_launches(opt.step, refill, device) if cfg.launches else None
    except Exception as exc:  # reported in the row; ours/AdamW also fail the run (cli)
        _error_row(row, c, exc, device)
        del opt
        _free(device, pset.n_elements > 2**24)
        return row
    _finish_row(row, c, opt, pset, ds, timing.ms, launches)
    del opt
    _free(device, pset.n_elements > 2**24)
    return row


def run_interleaved(here: Sequence[Contender], ws: Workspace, pset: ParamSet, ds: DtypeSetting,
                    device: torch.device, cfg: Config) -> Tuple[List[Dict], Dict[str, float]]:
    """Interleaved schedule: every contender and the two ceiling passes take one step per
    round, in an order rotated each round, so all of them meet the same machine state.

    NOTE: [interleaved schedule] On the shared 2-core VM this was developed on, memory
    bandwidth moved between ~50 and ~90 GB/s from one second to the next; timed one after
    the other, two contenders could be compared across different regimes and the ratios
    swung by 30 %. Interleaved, each round holds one step of everything, and the ratios
    (x AdamW, % ceiling) are medians of per-round ratios: paired measurements. Needs every
    contender's state at once (on the CPU that is a few GB for GPT-2), hence "auto" uses
    it on the CPU and the sequential schedule on CUDA, where events time steps stably.
    """
    rows = [_new_row(c, pset, ds, cfg) for c in here]
    members: List[Tuple[int, Callable[[], object]]] = []  # (row index or -1/-2 ceiling, step)
    opts: Dict[int, torch.optim.Optimizer] = {}
    refills: Dict[int, Callable[[], None]] = {}  # each member's gradients (NOTE: [int8 rows])
    for i, c in enumerate(here):
        reason = c.unavailable(device)
        if reason:
            rows[i]["status"] = f"skipped: {reason}"
            continue
        try:
            params, refills[i] = ws.for_setting(c.setting)
            opts[i] = c.make(params, _setting(c, ds))
        except Exception as exc:
            _error_row(rows[i], c, exc, device)
            continue
        members.append((i, opts[i].step))
    mul_fn, copy_fn, moved_mul, moved_copy = ws.ceiling_passes()
    members += [(-1, mul_fn), (-2, copy_fn)]
    cuda = device.type == "cuda"
    ms: Dict[int, List[float]] = {k: [] for k, _ in members}
    deadline = None if cfg.row_budget_s is None else time.perf_counter() + cfg.row_budget_s * len(members)

    def one_round(r: int, timed: bool) -> None:
        order = members[r % len(members):] + members[:r % len(members)]
        for k, fn in order:
            if k >= 0 and rows[k]["status"] != "ok":
                continue
            refills.get(k, ws.refill)()
            synchronize(device)
            try:
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    end.synchronize()
                    dt = start.elapsed_time(end)
                else:
                    t0 = time.perf_counter()
                    fn()
                    dt = (time.perf_counter() - t0) * 1e3
            except Exception as exc:
                if k < 0:
                    raise
                _error_row(rows[k], here[k], exc, device)
                continue
            if timed:
                ms[k].append(dt)

    for r in range(cfg.warmup):
        one_round(r, timed=False)
    for r in range(cfg.steps):
        one_round(r, timed=True)
        if deadline is not None and r + 1 >= MIN_STEPS and time.perf_counter() > deadline:
            break
    n_rounds = len(ms[-1])
    ceiling_per_round = [max(moved_mul / (a * 1e-3), moved_copy / (b * 1e-3)) / 1e9
                         for a, b in zip(ms[-1], ms[-2])]
    ceilings = {
        "bytes_mul": moved_mul, "bytes_copy": moved_copy,
        "mul_gbps": moved_mul / (Timing(ms[-1]).median * 1e-3) / 1e9,
        "copy_gbps": moved_copy / (Timing(ms[-2]).median * 1e-3) / 1e9,
        "ceiling_gbps": statistics.median(ceiling_per_round),
        "rounds": n_rounds, "ceiling_gbps_per_round": ceiling_per_round,
    }
    for i, opt in opts.items():
        row = rows[i]
        if row["status"] != "ok" or len(ms[i]) != n_rounds:
            if row["status"] == "ok":
                row["status"] = "error: fewer timed steps than rounds"
            continue
        launches = count_launches(opt.step, refills[i], device) if cfg.launches else None
        _finish_row(row, here[i], opt, pset, ds, ms[i], launches)
        row["fraction_per_round"] = [row["bytes_per_step"] / (t * 1e-3) / 1e9 / c
                                     for t, c in zip(ms[i], ceiling_per_round)]
    del opts
    return rows, ceilings


def baseline_dtype(ds_name: str) -> str:
    """Fused AdamW keeps its state in the param dtype: rows are compared at the same param dtype."""
    return {"bf16-fp32m": "bf16"}.get(ds_name, ds_name)


def _section_done(rows, first, ceilings, pset, ds, on_section) -> None:
    attach_ratios(rows, ceilings, only=rows[first:])
    if on_section is not None:
        on_section(rows, ceilings, pset.name, ds.name)


def attach_ratios(rows: List[Dict], ceilings: Dict[str, Dict], only: Optional[List[Dict]] = None) -> None:
    """x AdamW and % ceiling of every timed row (of ``only``, when given; the AdamW rows they
    are compared with may be anywhere in ``rows``). Where the row and its reference were timed
    in the same rounds (interleaved schedule), the ratio is the median of the per-round
    ratios (`paired`); otherwise it is the ratio of the medians."""
    base = {(r["param_set"], r["dtype"]): r for r in rows
            if r["key"] == contenders_mod.BASELINE and r["ms_median"]}
    for r in (rows if only is None else only):
        if r["ms_median"] is None:
            continue
        ceil = ceilings.get(f"{r['param_set']}/{r['dtype']}", {}).get("ceiling_gbps")
        r["ceiling_gbps"] = ceil
        per_round = r.pop("fraction_per_round", None)
        r["fraction"] = statistics.median(per_round) if per_round else (r["gbps"] / ceil if ceil else None)
        b = base.get((r["param_set"], baseline_dtype(r["dtype"])))
        r["ratio_paired"] = bool(per_round) and b is not None and b["dtype"] == r["dtype"]
        if b is None:
            r["ratio_vs_fused_adamw"] = None
        elif r["ratio_paired"] and r["ms"] and b["ms"] and len(r["ms"]) == len(b["ms"]):
            r["ratio_vs_fused_adamw"] = statistics.median(x / y for x, y in zip(r["ms"], b["ms"]))
        else:
            r["ratio_paired"] = False
            r["ratio_vs_fused_adamw"] = r["ms_median"] / b["ms_median"]
    _attach_clip_ratios(rows, ceilings, only)


def clip_references(key: str) -> List[str]:
    """The rows a clip row's time is compared with (NOTE: [clip rows]): ours+clip -> the same
    optimizer unclipped, Lion+clip (Tiger, Simba), and torch's clip + fused AdamW; torch clip +
    X -> X unclipped."""
    if key.startswith("clip+"):
        return [key[len("clip+"):]]
    if "+clip[" in key:
        algo, backend = key.split("+clip[")
        refs = [f"{algo}[{backend}"]
        if algo != "lion":
            refs.append(f"lion+clip[{backend}")
        return refs + ["clip+" + contenders_mod.BASELINE]
    return []


def paired_ratio(r: Dict, b: Dict, rounds: Optional[int]) -> Optional[float]:
    """r's step time / b's: the median of per-round ratios where both were timed in the same
    rounds (interleaved), else the ratio of the medians."""
    if not r.get("ms_median") or not b.get("ms_median"):
        return None
    if rounds and r.get("ms") and b.get("ms") and len(r["ms"]) == len(b["ms"]) == rounds:
        return statistics.median(x / y for x, y in zip(r["ms"], b["ms"]))
    return r["ms_median"] / b["ms_median"]


def int8_references(key: str) -> List[str]:
    """The rows an 8-bit momentum row's time is compared with (NOTE: [int8 rows]): Lion (fp32,
    the acceptance's reference) and, where they differ, the same optimizer without int8 and the
    same row without bf16 (bf16+ec+int8 -> int8 at fp32; bf16+sr+int8 -> bf16+ec+int8)."""
    name, _, backend = key.partition("[")
    if name not in contenders_mod.INT8_ROWS:
        return []
    algo = contenders_mod.INT8_ROWS[name][0]
    refs = [f"lion[{backend}"]
    if algo != "lion":
        refs.append(f"{algo}[{backend}")
    if name.endswith("-bf16-ec-int8"):
        refs.append(f"{algo}-int8[{backend}")
    elif name.endswith("-bf16-sr-int8"):
        refs.append(f"{algo}-bf16-ec-int8[{backend}")
    return refs


def _attach_clip_ratios(rows: List[Dict], ceilings: Dict[str, Dict], only: Optional[List[Dict]]) -> None:
    """``clip_ratios`` of the clip rows, ``int8_ratios`` of the 8-bit momentum rows: their
    paired time ratios to the rows they are compared with (of the same section)."""
    by_key = {(r["param_set"], r["dtype"], r.get("key")): r for r in rows if r.get("ms_median")}
    for r in (rows if only is None else only):
        if not r.get("ms_median"):
            continue
        if r.get("clip"):
            field, refs = "clip_ratios", clip_references(r["key"])
        elif r.get("group") == "int8":
            field, refs = "int8_ratios", int8_references(r["key"])
        else:
            continue
        rounds = ceilings.get(f"{r['param_set']}/{r['dtype']}", {}).get("rounds")
        out = {}
        for ref in refs:
            b = by_key.get((r["param_set"], r["dtype"], ref))
            if b is not None:
                out[ref] = paired_ratio(r, b, rounds)
        r[field] = out


def build_param_sets(cfg: Config) -> List[ParamSet]:
    return [paramsets.build(s, flat_size=cfg.flat_size, llama_size=cfg.llama_size,
                            tiny_count=cfg.tiny_count) for s in cfg.param_sets]


def run(cfg: Config, on_section=None) -> Dict:
    """Run the sweep; returns {"config", "device", "rows", "ceilings"} (no environment).

    ``on_section(rows, ceilings, param_set, dtype)``, when given, is called as soon as a
    parameter set and dtype setting is done (its rows have their ratios), so a caller can show
    it while the rest runs.
    """
    device = resolve_device(cfg.device)
    schedule = resolve_schedule(cfg.schedule, device)
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
                first = len(rows)
                if ws is not None and schedule == "interleaved":
                    bar.set_description(f"{pset.name} {ds.name} (interleaved)")
                    got, ceilings[f"{pset.name}/{ds.name}"] = run_interleaved(here, ws, pset, ds, device, cfg)
                    rows += got
                    bar.update(len(here))
                    del ws
                    _free(device, pset.n_elements > 2**24)
                    _section_done(rows, first, ceilings, pset, ds, on_section)
                    continue
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
                _section_done(rows, first, ceilings, pset, ds, on_section)
    finally:
        bar.close()
    config = asdict(cfg)
    config["schedule"] = schedule
    return dict(config=config, device=str(device), rows=rows, ceilings=ceilings)
