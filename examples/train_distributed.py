"""Data-parallel training on N CPU ranks: DistributedLion (majority, average) vs Lion + DDP vs AdamW + DDP.

    python examples/train_distributed.py                      # 4 ranks, tiny GPT, 150 steps (a few minutes)
    python examples/train_distributed.py --ranks 2 --steps 50 --model-size nano
    python examples/train_distributed.py --ranks 2 --steps 10 --model-size nano --batch-size 8 \
        --eval-interval 5 --eval-batches 2 --out /tmp/dist/distributed     # a smoke run, seconds
    python examples/train_distributed.py --max-grad-norm 1.0                 # every run clips

The model, corpus, schedule and hyperparameters are examples/train_lm.py's (imported from it).
Each rank samples its batches from its own contiguous shard of the training bytes (per-rank
batch = --batch-size / ranks, so the global batch is train_lm.py's). Every optimizer runs the
same number of steps on the same shards:

* ``dlion-majority`` / ``dlion-average``: DDP with ``local_grad_hook`` (no gradient
  all-reduce: each rank keeps its own gradient and momentum) and DistributedLion, Lion's
  hyperparameters;
* ``lion+ddp``: DDP's fp32 gradient all-reduce and sign_kernels.Lion;
* ``adamw+ddp``: DDP's fp32 gradient all-reduce and torch.optim.AdamW.

``--max-grad-norm`` clips every run's gradient norm: DistributedLion and Lion inside their step
(``max_grad_norm=``; DistributedLion clips each rank's *local* gradient, Lion the all-reduced
one), AdamW with ``torch.nn.utils.clip_grad_norm_`` before its step.

Validation loss (nats/byte, rank 0, the same val batches as train_lm.py) and the bytes each
rank sends per step (DistributedLion: what it handed to its collectives, ``wire_bytes()``;
DDP: a ring all-reduce of the fp32 gradients, 2 (N-1)/N * 4 bytes per parameter) go to
examples/results/distributed.{json,md,png} (``--out`` elsewhere). The script checks that every
run's final validation loss is finite and that its replicas ended bit-identical on every rank,
prints what it checked, and exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_lm as T  # noqa: E402  (the model, corpus and hyperparameters)

RUNS = ("dlion-majority", "dlion-average", "lion+ddp", "adamw+ddp")


def _worker(rank, world, port, args, out_path):
    sk = T.import_sign_kernels()
    from sign_kernels.distributed import DistributedLion, local_grad_hook

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    train_data, val_data, info = T.load_corpus()
    shard = len(train_data) // world
    local_data = train_data[rank * shard:(rank + 1) * shard]
    cfg = T.MODEL_SIZES[args.model_size]
    local_batch = args.batch_size // world
    eval_gen = torch.Generator().manual_seed(12345)
    eval_batches = [T.get_batch(val_data, args.batch_size, cfg.block_size, eval_gen) for _ in range(args.eval_batches)]
    results = []
    for name in args.runs:
        torch.manual_seed(args.seed)
        model = T.GPT(cfg)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        lion_hp, adamw_hp = T.DEFAULT_HPARAMS["lion"], T.DEFAULT_HPARAMS["adamw"]
        clip = dict(max_grad_norm=args.max_grad_norm)  # None: no clipping
        if name.startswith("dlion"):
            ddp.register_comm_hook(None, local_grad_hook)
            opt = DistributedLion(T.decay_groups(model, lion_hp["weight_decay"]), lr=lion_hp["lr"],
                                  betas=(lion_hp["beta1"], lion_hp["beta2"]), weight_decay=lion_hp["weight_decay"],
                                  vote=name.split("-")[1], **clip)
            hp = dict(lion_hp)
        elif name == "lion+ddp":
            opt = sk.Lion(T.decay_groups(model, lion_hp["weight_decay"]), lr=lion_hp["lr"],
                          betas=(lion_hp["beta1"], lion_hp["beta2"]), weight_decay=lion_hp["weight_decay"], **clip)
            hp = dict(lion_hp)
        else:
            opt = torch.optim.AdamW(T.decay_groups(model, adamw_hp["weight_decay"]), lr=adamw_hp["lr"],
                                    betas=(0.9, 0.95), weight_decay=adamw_hp["weight_decay"])
            hp = dict(adamw_hp)
        if args.max_grad_norm is not None:
            hp["max_grad_norm"] = args.max_grad_norm
        warmup = max(1, args.steps // 10)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, T.cosine_lambda(warmup, args.steps))
        gen = torch.Generator().manual_seed(args.seed * 1000 + rank + 1)
        n_params = T.num_params(model)
        ring = 2 * (world - 1) * 4 * n_params // world
        curve, sent_total, t_opt, norms = [], 0, 0.0, []
        t_start = time.perf_counter()
        for step in range(args.steps):
            if step % args.eval_interval == 0 and rank == 0:
                curve.append((step, T.evaluate(model, eval_batches, torch.device("cpu"))))
            x, y = T.get_batch(local_data, local_batch, cfg.block_size, gen)
            opt.zero_grad(set_to_none=True)
            ddp(x, y).backward()
            t0 = time.perf_counter()
            if args.max_grad_norm is not None and name == "adamw+ddp":
                norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm).item())
            opt.step()
            t_opt += time.perf_counter() - t0
            if args.max_grad_norm is not None and name != "adamw+ddp":
                norms.append(opt.grad_norm.item())  # the norm before clipping (DistributedLion: this rank's)
            sched.step()
            sent_total += opt.wire_bytes()["sent"] if name.startswith("dlion") else ring
        wall = time.perf_counter() - t_start
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        everyone = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(everyone, flat)
        same = all(torch.equal(e, flat) for e in everyone)
        if rank == 0:
            final = T.evaluate(model, eval_batches, torch.device("cpu"))
            curve.append((args.steps, final))
            results.append(dict(run=name, hparams=hp, final_val_loss=final, curve=curve, params=n_params,
                                bytes_sent_per_rank_per_step=sent_total / args.steps,
                                fp32_ring_allreduce_bytes_per_step=ring, replicas_identical=same,
                                wall_s=wall, optimizer_step_s=t_opt))
            clipped = ""
            if norms:
                results[-1].update(grad_norms_rank0=norms, clipped_steps=sum(x > args.max_grad_norm for x in norms))
                clipped = f"  clipped {results[-1]['clipped_steps']}/{args.steps} (rank 0's norms " \
                          f"{min(norms):.3g}-{max(norms):.3g})"
            print(f"  {name:15s} val {final:.4f}  sent/rank/step {sent_total / args.steps / 1024:.1f} KiB  "
                  f"replicas identical: {same}  wall {wall:.0f} s{clipped}", flush=True)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(dict(corpus=info, results=results), f)
    dist.barrier()
    dist.destroy_process_group()
    # Every run finished: leave without the interpreter's teardown (see train_fsdp.py's _exit: a
    # gloo worker thread still releasing a finished collective when the interpreter finalises
    # can abort the process with "terminate called without an active exception"). An exception
    # above still reaches torch.multiprocessing and fails the run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--model-size", default="tiny", choices=sorted(T.MODEL_SIZES))
    ap.add_argument("--batch-size", type=int, default=32, help="global batch (split over the ranks)")
    ap.add_argument("--eval-interval", type=int, default=25)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--max-grad-norm", type=float, default=None,
                    help="clip every run's gradient norm (Lion, DistributedLion: inside the step; default: none)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "distributed"))
    args = ap.parse_args(argv)
    args.runs = args.runs.split(",")
    unknown = [r for r in args.runs if r not in RUNS]
    if unknown:
        ap.error(f"unknown --runs {unknown}; choose from {','.join(RUNS)}")
    if args.ranks < 1 or args.steps < 1 or args.eval_interval < 1 or args.batch_size % args.ranks:
        ap.error("--ranks, --steps and --eval-interval must be positive, and --batch-size a multiple of --ranks")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(out) + ".tmp.json"
    t0 = time.perf_counter()
    mp.start_processes(_worker, args=(args.ranks, _free_port(), args, tmp), nprocs=args.ranks, start_method="spawn")
    with open(tmp) as f:
        data = json.load(f)
    os.remove(tmp)
    command = "python examples/train_distributed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    data.update(command=command.strip(), ranks=args.ranks, steps=args.steps, model_size=args.model_size,
                global_batch=args.batch_size, max_grad_norm=args.max_grad_norm, torch=torch.__version__,
                total_wall_s=time.perf_counter() - t0)
    with open(str(out) + ".json", "w") as f:
        json.dump(data, f, indent=1)
    res = data["results"]
    base = next((r for r in res if r["run"] == "lion+ddp"), res[0])
    lines = [
        f"{args.model_size} GPT ({res[0]['params']:,} params), {args.ranks} gloo ranks on CPU, each its own data shard, "
        f"{args.steps} steps, global batch {args.batch_size}x{T.MODEL_SIZES[args.model_size].block_size} bytes, "
        f"{f'max_grad_norm {args.max_grad_norm}, ' if args.max_grad_norm is not None else ''}"
        f"torch {torch.__version__}. Command: `{data['command']}`",
        "",
        "| run | lr | weight decay | final val loss | vs Lion+DDP | bytes sent / rank / step | vs fp32 all-reduce | replicas identical |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res:
        b = r["bytes_sent_per_rank_per_step"]
        lines.append(
            f"| {r['run']} | {r['hparams']['lr']} | {r['hparams']['weight_decay']} | {r['final_val_loss']:.4f} | "
            f"{100 * (r['final_val_loss'] / base['final_val_loss'] - 1):+.2f}% | {b / 1024:.1f} KiB | "
            f"{b / r['fp32_ring_allreduce_bytes_per_step']:.3f} | {r['replicas_identical']} |")
    with open(str(out) + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for r in res:
            xs, ys = zip(*r["curve"])
            axes[0].plot(xs, ys, label=r["run"])
        axes[0].set_xlabel("step")
        axes[0].set_ylabel("validation loss (nats/byte)")
        axes[0].legend()
        axes[1].bar([r["run"] for r in res], [r["bytes_sent_per_rank_per_step"] / 1024 for r in res])
        axes[1].set_ylabel("KiB sent per rank per step")
        axes[1].set_yscale("log")
        fig.suptitle(lines[0].split(". Command")[0], fontsize=8)
        fig.tight_layout()
        fig.savefig(str(out) + ".png", dpi=110)
    except ImportError:
        print("matplotlib not installed: no plot")
    ok = True
    print("checks:")
    checks = [(sorted(r["run"] for r in res) == sorted(args.runs),
               f"every requested run finished ({', '.join(args.runs)})")]
    for r in res:
        checks.append((math.isfinite(r["final_val_loss"]),
                       f"{r['run']}: final val loss {r['final_val_loss']:.4f} is finite"))
        if "clipped_steps" in r:
            checks.append((all(math.isfinite(x) for x in r["grad_norms_rank0"]),
                           f"{r['run']}: rank 0's gradient norms are finite; clipped in {r['clipped_steps']} of "
                           f"{args.steps} steps (max_grad_norm {args.max_grad_norm})"))
        checks.append((r["replicas_identical"] is True,
                       f"{r['run']}: the {args.ranks} replicas' params are bit-identical after {args.steps} steps"))
    for passed, what in checks:
        ok = ok and passed
        print(f"  [{'ok' if passed else 'FAILED'}] {what}")
    print("all checks passed" if ok else "a check FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
