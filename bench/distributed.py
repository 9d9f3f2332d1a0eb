"""Distributed benchmark: DistributedLion against data-parallel Lion and AdamW, N gloo ranks on CPU.

    python -m bench.distributed                       # 2 and 4 ranks, flat-8M and gpt2-small
    python -m bench.distributed --ranks 2 --paramsets flat --flat-size 4M --steps 5

Every rank holds the whole parameter set (bench/paramsets.py) with its own random gradient.
One timed step per contender is what a data-parallel step adds to backward:

* ``dlion-majority`` / ``dlion-average``: DistributedLion.step() (pack, all-to-all, vote,
  all-gather, apply), the backend "auto" picks;
* ``lion+allreduce-fp32`` / ``lion+allreduce-bf16``: an all-reduce of the gradients in 25 MiB
  buckets (as DDP does; bf16: cast, all-reduce, cast back, as DDP's bf16_compress_hook), then
  sign_kernels.Lion.step();
* ``adamw+allreduce-fp32``: the same fp32 all-reduce, then torch.optim.AdamW(foreach).

Time per step is the slowest rank's, median over the timed steps (with min and max). Bytes
per step per rank: DistributedLion reports what it handed to the collectives
(``wire_bytes()``); an all-reduce of n elements of b bytes sends 2 (N-1)/N * n * b per rank
in a ring (bandwidth-optimal, the bound every all-reduce meets). Results: JSON (raw times)
and a PNG under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import time
from datetime import datetime, timedelta, timezone
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from . import paramsets

CONTENDERS = ("dlion-majority", "dlion-average", "lion+allreduce-fp32", "lion+allreduce-bf16", "adamw+allreduce-fp32")
BUCKET_BYTES = 25 * 2**20


def _buckets(params: List[torch.Tensor], elem_bytes: int) -> List[List[torch.Tensor]]:
    out, cur, size = [], [], 0
    for p in params:
        cur.append(p)
        size += p.numel() * elem_bytes
        if size >= BUCKET_BYTES:
            out.append(cur)
            cur, size = [], 0
    if cur:
        out.append(cur)
    return out


def _allreduce_grads(params: List[torch.Tensor], dtype: torch.dtype) -> None:
    """DDP's gradient averaging: flat buckets, asynchronous all-reduces, copy back."""
    work = []
    for bucket in _buckets(params, torch.finfo(dtype).bits // 8):
        flat = torch.cat([p.grad.reshape(-1) for p in bucket]).to(dtype)
        work.append((bucket, flat, dist.all_reduce(flat, async_op=True)))
    n = dist.get_world_size()
    for bucket, flat, w in work:
        w.wait()
        flat = flat.to(torch.float32).div_(n)
        off = 0
        for p in bucket:
            p.grad.copy_(flat[off:off + p.numel()].view_as(p.grad))
            off += p.numel()


def _worker(rank: int, world: int, port: int, specs: List[dict], steps: int, warmup: int, threads: int, out: str):
    from sign_kernels import Lion
    from sign_kernels.distributed import DistributedLion

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    rows = []
    for spec in specs:
        ps = paramsets.build(spec["spec"], flat_size=spec["flat_size"], llama_size="1B")
        gen = torch.Generator().manual_seed(1234)
        params = [torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02) for _, shape in ps.tensors]
        ggen = torch.Generator().manual_seed(rank)
        grads = [torch.randn(p.shape, generator=ggen) for p in params]
        n = ps.n_elements
        for name in CONTENDERS:
            opt = lion = adamw = None  # the previous contender's state is freed
            for p, g in zip(params, grads):
                p.grad = g.clone()
            if name.startswith("dlion"):
                opt = DistributedLion(params, lr=1e-4, weight_decay=0.1, vote=name.split("-")[1])
                step = opt.step
            elif name.startswith("lion"):
                lion = Lion(params, lr=1e-4, weight_decay=0.1)
                dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32

                def step(lion=lion, dtype=dtype):
                    _allreduce_grads(params, dtype)
                    lion.step()
            else:
                adamw = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, foreach=True)

                def step(adamw=adamw):
                    _allreduce_grads(params, torch.float32)
                    adamw.step()
            times = []
            for i in range(warmup + steps):
                for p, g in zip(params, grads):
                    p.grad.copy_(g)  # the all-reduce contenders overwrite the grads
                dist.barrier()
                t0 = time.perf_counter()
                step()
                dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # the step takes as long as its slowest rank
                if i >= warmup:
                    times.append(float(dt))
            if name.startswith("dlion"):
                wb = opt.wire_bytes()
                sent = wb["sent"]
            else:
                eb = 2 if name.endswith("bf16") else 4
                sent = 2 * (world - 1) * n * eb // world
            rows.append(dict(paramset=ps.name, elements=n, tensors=ps.n_tensors, ranks=world, contender=name,
                             step_s=times, median_s=statistics.median(times), min_s=min(times), max_s=max(times),
                             bytes_sent_per_rank=sent, fp32_allreduce_bytes=2 * (world - 1) * n * 4 // world))
            del step
            for p in params:
                p.grad = None
            if rank == 0:
                r = rows[-1]
                print(f"  {world} ranks {ps.name:12s} {name:22s} median {r['median_s'] * 1e3:8.1f} ms  "
                      f"sent {sent / 2**20:8.2f} MiB/rank ({sent / r['fp32_allreduce_bytes']:.3f} of fp32 all-reduce)",
                      flush=True)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f)
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        return "unknown"


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    groups = sorted({(r["paramset"], r["ranks"]) for r in rows}, key=lambda k: (k[0], k[1]))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / len(CONTENDERS)
    for ci, name in enumerate(CONTENDERS):
        xs, t, b, lo, hi = [], [], [], [], []
        for gi, (ps, nr) in enumerate(groups):
            r = next((r for r in rows if r["paramset"] == ps and r["ranks"] == nr and r["contender"] == name), None)
            if r is None:
                continue
            xs.append(gi + (ci - (len(CONTENDERS) - 1) / 2) * width)
            t.append(r["median_s"] * 1e3)
            lo.append((r["median_s"] - r["min_s"]) * 1e3)
            hi.append((r["max_s"] - r["median_s"]) * 1e3)
            b.append(r["bytes_sent_per_rank"] / r["elements"])
        axes[0].bar(xs, t, width, yerr=[lo, hi], label=name, capsize=2)
        axes[1].bar(xs, b, width, label=name)
    labels = [f"{ps}\n{nr} ranks" for ps, nr in groups]
    for ax in axes:
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(labels, fontsize=8)
    axes[0].set_ylabel("optimizer step incl. communication, ms (median, min-max)")
    axes[1].set_ylabel("bytes sent per rank per step / parameter")
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"DistributedLion vs data-parallel Lion/AdamW, gloo on CPU ({result['host']['cpu']}, "
                 f"{result['threads']} thread(s)/rank), {result['git']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.distributed", description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--paramsets", nargs="+", default=["flat", "gpt2"], choices=["flat", "gpt2", "tiny"])
    ap.add_argument("--flat-size", default="8M")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--out", default=None, help="output stem (default bench/results/distributed-<date>-<sha>)")
    args = ap.parse_args(argv)
    specs = [dict(spec=s, flat_size=paramsets.parse_size(args.flat_size)) for s in args.paramsets]
    sha = _git_sha()
    stem = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    f"distributed-{datetime.now(timezone.utc):%Y-%m-%d}-{sha}")
    rows = []
    for world in args.ranks:
        tmp = f"{stem}.rank0-{world}.json"
        mp.start_processes(_worker, args=(world, _free_port(), specs, args.steps, args.warmup, args.threads, tmp),
                           nprocs=world, start_method="spawn")
        with open(tmp) as f:
            rows += json.load(f)
        os.remove(tmp)
    import sign_kernels

    result = dict(
        command="python -m bench.distributed " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        git=sha, torch=torch.__version__, date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        host=dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
                  cpu_isa=getattr(sign_kernels.backends._C, "cpu_isa", lambda: "?")()),
        threads=args.threads, rows=rows,
    )
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    try:
        plot(result, stem + ".png")
    except ImportError:
        print("matplotlib not installed: no plot")
    print(f"wrote {stem}.json" + (f" and {stem}.png" if os.path.exists(stem + '.png') else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
