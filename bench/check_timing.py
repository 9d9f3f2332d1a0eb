"""Does the harness agree with an independent measurement?

For each contender, a fresh Python process builds the same parameters and optimizer,
runs the warm-up, then times N back-to-back ``optimizer.step()`` calls with nothing but
``time.perf_counter`` (and one ``torch.cuda.synchronize`` before and after on CUDA):
no per-step timer, no events, no gradient refill inside the loop. Its mean ms/step is
compared with the harness's median for the same row.

    python -m bench.check_timing                      # gpt2, fp32, ours + AdamW
    python -m bench.check_timing --param-set flat --size 64M --steps 30
    python -m bench --check                           # the same, after a normal run

The two differ by design in small ways: the plain loop reports a mean (outliers count),
the harness a median; the plain loop steps on the same gradient every time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

from . import paramsets, runner
from .accounting import DTYPE_SETTINGS
from .contenders import all_contenders
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
    opt = contender.make(ws.params, ds)
    for _ in range(args.warmup):
        ws.refill()
        opt.step()
    ws.refill()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        opt.step()
    synchronize(device)
    t1 = time.perf_counter()
    print(json.dumps({"ms_per_step": (t1 - t0) * 1e3 / args.steps}))


def check_result(result: Dict, cfg: runner.Config) -> List[Dict]:
    """Re-time every timed row of the first parameter set in fresh processes; print and
    return the comparison."""
    rows = [r for r in result["rows"] if r["ms_median"] is not None]
    if not rows:
        print("timing check: no timed rows")
        return []
    first = rows[0]["param_set"]
    spec = next(s for s in cfg.param_sets if paramsets.build(
        s, flat_size=cfg.flat_size, llama_size=cfg.llama_size, tiny_count=cfg.tiny_count).name == first)
    out = []
    print(f"\ntiming check on {first}: harness median vs plain perf_counter mean over "
          f"{cfg.steps} steps in a fresh process")
    print(f"{'contender':<28}{'dtype':<12}{'harness ms':>11}{'plain ms':>10}{'diff':>8}")
    for r in rows:
        if r["param_set"] != first:
            continue
        plain = plain_time(r["key"], spec, r["dtype"], cfg)
        diff = plain / r["ms_median"] - 1.0
        out.append(dict(key=r["key"], dtype=r["dtype"], param_set=first,
                        harness_ms_median=r["ms_median"], plain_ms_mean=plain, rel_diff=diff))
        print(f"{r['contender'] + ' [' + r['backend'] + ']':<28}{r['dtype']:<12}"
              f"{r['ms_median']:>11.3f}{plain:>10.3f}{100 * diff:>+7.1f}%")
    worst = max(abs(o["rel_diff"]) for o in out)
    print(f"largest disagreement: {100 * worst:.1f}%")
    result["timing_check"] = out
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
    result = runner.run(cfg)
    out = check_result(result, cfg)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(config=result["config"], check=out), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
