"""Does the harness agree with an independent measurement?

For each contender, a fresh Python process builds the same parameters and optimizer,
runs the warm-up, then times N back-to-back ``optimizer.step()`` calls with nothing but
``time.perf_counter`` (and one ``torch.cuda.synchronize`` before and after on CUDA):
no per-step timer, no events, no gradient refill inside the loop. Its mean ms/step is
compared with the harness's median for the same row.

    python -m bench.check_timing                      # gpt2, fp32, ours + AdamW
    python -m bench.check_timing --param-set flat --size 64M --steps 30
    python -m bench --check                           # the same, after a normal run

Harness and plain loop alternate, contender by contender, so that load drifting on a
shared machine affects both alike. The two differ by design in small ways: the plain loop reports a mean (outliers count),
the harness a median; the plain loop steps on the same gradient every time. A contender that
writes p.grad (torch's clip_grad_norm_ rows, ``writes_grads``) therefore clips an already
clipped gradient from its second step on (norm ~max_norm, coefficient ~1: the same passes
run, so the time is comparable, but the table marks those rows).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

from . import paramsets, runner
from .accounting import DTYPE_SETTINGS
from .contenders import all_contenders, select
from .timing import Workspace, synchronize

REPO = Path(__file__).resolve().parent.parent


def plain_time(key: str, pset_name: str, dtype: str, cfg: runner.Config) -> float:
    """ms/step of `key` from a fresh process, timed with perf_counter around N steps."""
    cmd = [
        sys.executable, "-m", "bench.check_timing", "--child", key, "--param-set", pset_name,
        "--dtypes", dtype, "--device", cfg.device, "--size", str(cfg.flat_size),
        "--llama-size", cfg.llama_size, "--tiny-count", str(cfg.tiny_count),
        "--steps", str(cfg.steps), "--warmup", str(cfg.warmup),
        "--threads", str(cfg.threads or runner.default_threads()),
        "--grad-mode", cfg.grad_mode, "--seed", str(cfg.seed),
    ]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"child for {key} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["ms_per_step"]


def child(args: argparse.Namespace) -> None:
    device = runner.resolve_device(args.device)
    torch.set_num_threads(args.threads)
    pset = paramsets.build(args.param_set, flat_size=paramsets.parse_size(args.size),
                           llama_size=args.llama_size, tiny_count=args.tiny_count)
    ds = DTYPE_SETTINGS[args.dtypes]
    contender = next(c for c in all_contenders(device, "all") if c.key == args.child)
    ws = Workspace(pset, ds, device, args.grad_mode, args.seed)
    params, refill = ws.for_setting(contender.setting)  # NOTE: [int8 rows]: its own dtypes
    opt = contender.make(params, contender.setting or ds)
    for _ in range(args.warmup):
        refill()
        opt.step()
    refill()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        opt.step()
    synchronize(device)
    t1 = time.perf_counter()
    print(json.dumps({"ms_per_step": (t1 - t0) * 1e3 / args.steps}))


def check(cfg: runner.Config, reps: int = 3) -> List[Dict]:
    """For each contender of the first parameter set: `reps` rounds of (harness row in this
    process, plain loop in a fresh process), back to back so that load drifting on a
    shared machine hits both alike. Compares the median of each; prints and returns."""
    device = runner.resolve_device(cfg.device)
    torch.set_num_threads(cfg.threads or runner.default_threads())
    spec = cfg.param_sets[0]
    pset = runner.build_param_sets(dataclasses.replace(cfg, param_sets=(spec,)))[0]
    chosen = select(device, cfg.contenders, cfg.backends)
    out: List[Dict] = []
    print(f"\ntiming check on {pset.name}: harness median vs plain perf_counter mean "
          f"({cfg.steps} steps, fresh process); median of {reps} alternating rounds")
    print(f"{'contender':<28}{'dtype':<12}{'harness ms':>11}{'plain ms':>10}{'diff':>8}")
    for name in cfg.dtypes:
        ds = DTYPE_SETTINGS[name]
        here = [c for c in chosen if c.supports(name) and not c.unavailable(device)]
        if not here:
            continue
        ws = Workspace(pset, ds, device, cfg.grad_mode, cfg.seed)
        for c in here:
            harness, plain = [], []
            for _ in range(reps):
                row = runner.run_one(c, ws, pset, ds, device, cfg)
                if row["ms_median"] is None:
                    break
                harness.append(row["ms_median"])
                plain.append(plain_time(c.key, spec, name, cfg))
            if not harness:
                continue
            h, p = statistics.median(harness), statistics.median(plain)
            out.append(dict(key=c.key, dtype=name, param_set=pset.name, harness_ms=harness,
                            plain_ms=plain, harness_ms_median=h, plain_ms_median=p,
                            rel_diff=p / h - 1.0))
            label = f"{c.label} [{c.backend}]"
            mark = "  (plain loop: p.grad scaled in place, not refilled)" if c.writes_grads else ""
            print(f"{label:<28}{name:<12}{h:>11.3f}{p:>10.3f}{100 * (p / h - 1):>+7.1f}%{mark}")
        del ws
    if out:
        print(f"largest disagreement: {100 * max(abs(o['rel_diff']) for o in out):.1f}%")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.check_timing", description=__doc__.split("\n\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--param-set", default="gpt2")
    p.add_argument("--dtypes", default="fp32")
    p.add_argument("--contenders", default="ours,adamw")
    p.add_argument("--backends", default="best")
    p.add_argument("--device", default="auto")
    p.add_argument("--size", default="32M")
    p.add_argument("--llama-size", default="350M")
    p.add_argument("--tiny-count", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=runner.default_threads())
    p.add_argument("--grad-mode", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reps", type=int, default=3, help="alternating rounds per contender")
    p.add_argument("--out", type=Path, default=None, help="also write the comparison as JSON here")
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    cfg = runner.Config(
        device=str(runner.resolve_device(args.device)), param_sets=(args.param_set,),
        flat_size=paramsets.parse_size(args.size), llama_size=args.llama_size,
        tiny_count=args.tiny_count, dtypes=tuple(args.dtypes.split(",")),
        contenders=args.contenders, backends=args.backends, steps=args.steps,
        warmup=args.warmup, threads=args.threads, grad_mode=args.grad_mode, seed=args.seed,
        launches=False, ceiling_reps=3,
    )
    out = check(cfg, args.reps)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(config=dataclasses.asdict(cfg), check=out), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
