"""``python -m bench``: argument parsing and the three outputs."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

import torch

from . import report, runner
from .paramsets import LLAMA_CONFIGS, parse_size

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Time one optimizer step of Lion/Tiger/Simba (every backend) against "
        "fused AdamW and peer implementations; write a table, a JSON file and a PNG.",
    )
    a = p.add_argument
    a("--full", action="store_true",
      help="the full sweep: flat 256M, gpt2, llama, tiny; fp32, bf16, bf16-fp32m; every backend; peers")
    a("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    a("--param-sets", help="comma list of flat, gpt2, llama, tiny (default flat,gpt2)")
    a("--size", default=None, help="flat tensor size, binary suffixes: 32M = 32*2^20 (default 32M; 256M with --full)")
    a("--llama-size", choices=sorted(LLAMA_CONFIGS), default=None,
      help="Llama config (default 1B on CUDA, 350M on CPU)")
    a("--tiny-count", type=int, default=4096, help="number of 768-element tensors in 'tiny'")
    a("--dtypes", help="comma list of fp32, bf16, bf16-fp32m (default fp32)")
    a("--contenders", help="comma list: ours, adamw, peers, all, lion, tiger, simba, adamw-fused, "
      "adamw-foreach, clip rows (clip, ours+clip, torch-clip, lion+clip, clip+adamw, ...), 8-bit "
      "momentum rows (int8, ec-int8, lion-int8, tiger-int8, lion-bf16-ec-int8, tiger-bf16-ec-int8, "
      "lion-bf16-sr-int8; timed in the fp32 section), "
      "or a peer (lion-pytorch, optimi-lion, ...; see --list). Default ours,adamw,peers "
      "(the peers that are installed: bash scripts/bench.sh installs lion-pytorch, torch-optimi and "
      "pytorch-optimizer)")
    a("--backends", default=None, help="best (default), all (default with --full), or a comma list")
    a("--steps", type=int, default=None, help="timed steps per row (default 20 CPU, 100 CUDA)")
    a("--warmup", type=int, default=None, help="untimed steps first (default 3 CPU, 10 CUDA)")
    a("--row-budget", type=float, default=10.0,
      help="seconds: a row stops timing after this long, with at least 5 steps (0: no limit)")
    a("--schedule", choices=("auto", "interleaved", "sequential"), default="auto",
      help="interleaved: every contender and the ceiling take one step per round, ratios are "
      "medians of per-round ratios; sequential: one contender after another. auto: interleaved "
      "on CPU, sequential on CUDA (see NOTES.md)")
    a("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    a("--nvtx", action="store_true", help="wrap every step in an NVTX range (CUDA; for nsys)")
    a("--grad-mode", choices=("auto", "fresh", "mix"), default="auto",
      help="how gradients are refilled between steps (see NOTES.md); auto: fresh on CUDA, mix on CPU")
    a("--seed", type=int, default=0)
    a("--no-launches", action="store_true", help="do not profile a step to count launches (CUDA)")
    a("--out", type=Path, default=DEFAULT_OUT, help="results folder (default bench/results)")
    a("--name", default=None, help="file stem (default <device-slug>-<date>)")
    a("--no-plot", action="store_true")
    a("--no-progress", action="store_true")
    a("--list", action="store_true", help="list contenders and whether each can run here, then exit")
    a("--check", action="store_true",
      help="after the run, re-time the first param set's contenders against plain perf_counter "
      "loops in fresh processes and print the agreement (bench/check_timing.py)")
    return p


def config_from_args(args: argparse.Namespace) -> runner.Config:
    device = runner.resolve_device(args.device)
    cuda = device.type == "cuda"
    full = args.full

    def pick(value, quick, full_value):
        return value if value is not None else (full_value if full else quick)

    return runner.Config(
        device=str(device),
        param_sets=tuple(pick(args.param_sets, "flat,gpt2", "flat,gpt2,llama,tiny").split(",")),
        flat_size=parse_size(pick(args.size, "32M", "256M")),
        llama_size=args.llama_size or ("1B" if cuda else "350M"),
        tiny_count=args.tiny_count,
        dtypes=tuple(pick(args.dtypes, "fp32", "fp32,bf16,bf16-fp32m").split(",")),
        contenders=pick(args.contenders, "ours,adamw,peers", "all"),
        backends=pick(args.backends, "best", "all"),
        steps=args.steps if args.steps is not None else (100 if cuda else 20),
        warmup=args.warmup if args.warmup is not None else (10 if cuda else 3),
        row_budget_s=args.row_budget or None,
        threads=args.threads,
        nvtx=args.nvtx,
        grad_mode=args.grad_mode,
        seed=args.seed,
        launches=not args.no_launches,
        progress=not args.no_progress,
        schedule=args.schedule,
    )


def list_contenders(cfg: runner.Config) -> str:
    from .contenders import select

    device = runner.resolve_device(cfg.device)
    lines = []
    for c in select(device, "all", "all"):
        why = c.unavailable(device)
        lines.append(f"{c.key:<30} {c.label} [{c.backend}]: {'ok' if why is None else 'skipped: ' + why}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    cfg = config_from_args(args)
    if args.list:
        print(list_contenders(cfg))
        return 0
    if args.nvtx and not cfg.device.startswith("cuda"):
        print("note: --nvtx has no effect on CPU", file=sys.stderr)
    env = report.environment(runner.resolve_device(cfg.device))  # before: load of others
    env["threads"] = cfg.threads or runner.default_threads()
    head = {"env": env, "config": {"steps": cfg.steps, "warmup": cfg.warmup,
                                   "schedule": runner.resolve_schedule(cfg.schedule, runner.resolve_device(cfg.device))},
            "rows": [], "ceilings": {}}
    head["warnings"] = report.warnings_for(head)  # the load at the start, known now
    print("\n".join(report.table_header(head)), flush=True)
    shown = set()
    stem = args.name or report.default_stem(env)
    json_path = args.out / f"{stem}.json"
    partial_config = dict(asdict(cfg), schedule=head["config"]["schedule"])

    def show(rows, ceilings, pset, dtype):
        # each parameter set's rows as soon as they are timed, with the drift warning of its ceiling
        part = {"env": {**env, "loadavg": None}, "rows": rows, "ceilings": {f"{pset}/{dtype}": ceilings[f"{pset}/{dtype}"]}}
        lines = report.table_section(part, pset, dtype) + [f"WARNING: {w}" for w in report.warnings_for(part)]
        print("\n".join(lines), flush=True)
        shown.add((pset, dtype))
        # The rows so far on disk at once, marked partial: a run killed later (a time limit, as
        # in scripts/gpu_check.sh) keeps its finished sections. The complete file replaces it.
        report.write_json({"schema_version": report.SCHEMA_VERSION, "env": env, "config": partial_config,
                           "device": str(runner.resolve_device(cfg.device)), "rows": rows, "ceilings": ceilings,
                           "partial": f"the run stopped after {pset}/{dtype}"}, json_path)

    result = runner.run(cfg, on_section=show)
    env["threads"] = torch.get_num_threads()
    env["loadavg_end"] = report.loadavg()
    result = {"schema_version": report.SCHEMA_VERSION, "env": env, **result}
    result["warnings"] = report.warnings_for(result)
    for pset, dtype in report.sections(result["rows"]):
        if (pset, dtype) not in shown:
            print("\n".join(report.table_section(result, pset, dtype)))
    print("\n".join(report.table_footer(result)))
    if args.check:
        from . import check_timing

        result["timing_check"] = check_timing.check(cfg)
    report.write_json(result, json_path)
    print(f"\nresults: {json_path}")
    if not args.no_plot:
        why = report.plot(result, args.out / f"{stem}.png")
        print(f"plot:    {args.out / f'{stem}.png'}" if why is None else f"plot:    skipped ({why})")
    errors = [r for r in result["rows"] if r["status"].startswith("error")]
    if errors:
        print(f"\n{len(errors)} row(s) failed (see 'not timed' above)", file=sys.stderr)
        return 1
    return 0
