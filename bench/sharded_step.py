"""Host cost of a sharded step: FSDP2 (DTensor) params vs plain tensors of the same shards.

    python bench/sharded_step.py [--world 2] [--scale 1] [--steps 20] [--opts lion,simba,tiger]

Spawns ``--world`` gloo ranks on CPU. Each rank builds the GPT-2 small list
(bench/paramsets.py, 148 tensors), shards it with ``fully_shard`` (every tensor Shard(0)),
and times ``step()`` of each optimizer twice on the same local shards:

* ``sharded``: the optimizer holds the FSDP2 DTensor params (unwrap to local shards, DTensor
  state; Tiger adds its one all-reduce of statistics per step);
* ``plain``: the optimizer holds plain tensors with the shapes of the local shards (what the
  kernels see in the sharded run), no DTensor anywhere.

``sharded - plain`` is what the DTensor path adds to a step. ``--scale k`` divides every dim
of the list by k (tensor count unchanged) to make the step host-bound; ``--scale 1`` is the
real model. A second measurement times one DTensor dispatch of ``torch._foreach_add_`` over
the same 148 tensors against the same call on their local tensors: the per-call cost a
DTensor sharding rule (``register_sharding``) would add to every op call, for comparison
with the unwrap path (NOTE: [unwrap, not a DTensor sharding rule] in
sign_kernels/distributed/_dtensor.py). The two variants are interleaved round by round;
medians over ``--steps`` rounds after 3 warm-up rounds, "added" is the median of the
per-round differences; rank 0 prints the table (each rank's medians, max over ranks).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _shapes(scale: int):
    from bench.paramsets import gpt2_small

    return [(name, tuple(max(1, d // scale) for d in shape)) for name, shape in gpt2_small().tensors]


def _paired_ms(fn_a, fn_b, steps: int):
    """Medians of a, b and of the per-round differences a - b, the two interleaved round by
    round (the load of a shared machine drifts; a paired difference cancels most of it)."""
    for _ in range(3):
        fn_a()
        fn_b()
    ta, tb = [], []
    for _ in range(steps):
        for fn, out in ((fn_a, ta), (fn_b, tb)):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    med = statistics.median
    return med(ta) * 1e3, med(tb) * 1e3, med([a - b for a, b in zip(ta, tb)]) * 1e3


def _worker(rank, world, init, args):
    import sign_kernels as sk
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    torch.manual_seed(0)
    shapes = _shapes(args.scale)
    net = nn.Module()
    for i, (_, shape) in enumerate(shapes):
        net.register_parameter(f"p{i}", nn.Parameter(torch.randn(shape) * 0.02))
    fully_shard(net)
    sharded = list(net.parameters())
    from torch.distributed.tensor import DTensor

    for p in sharded:  # as FSDP2's reduce-scatter leaves them: the param's own sharding spec
        p.grad = DTensor(torch.randn_like(p._local_tensor), p._spec, requires_grad=False)
    plain = [nn.Parameter(p._local_tensor.clone()) for p in sharded]
    for p, s in zip(plain, sharded):
        p.grad = s.grad._local_tensor.clone()

    def make(kind, params):
        if kind == "lion":
            return sk.Lion(params, lr=1e-4, backend="cpu")
        if kind == "simba":
            return sk.Simba(params, lr=1e-4, backend="cpu")
        # Tiger with matrix and element-wise roles, as tiger_param_groups gives a GPT-2.
        mats = [p for p, (_, s) in zip(params, shapes) if len(s) > 1]
        vecs = [p for p, (_, s) in zip(params, shapes) if len(s) <= 1]
        return sk.Tiger([{"params": mats, "role": "matrix"}, {"params": vecs, "role": "elementwise"}],
                        lr=1e-4, backend="cpu")

    rows = []
    for kind in args.opts.split(","):
        rows.append((kind, *_paired_ms(make(kind, sharded).step, make(kind, plain).step, args.steps)))
    # DTensor dispatch of one foreach call over the same tensors vs the local tensors.
    d_lists = [p.detach() for p in sharded], [p.grad for p in sharded]
    l_lists = [p._local_tensor for p in d_lists[0]], [g._local_tensor for g in d_lists[1]]
    with torch.no_grad():
        rows.append(("foreach_add_ (dispatch)",
                     *_paired_ms(lambda: torch._foreach_add_(d_lists[0], d_lists[1], alpha=0.0),
                                 lambda: torch._foreach_add_(l_lists[0], l_lists[1], alpha=0.0), args.steps)))

    mine = torch.tensor([r[1:] for r in rows], dtype=torch.float64)
    dist.all_reduce(mine, op=dist.ReduceOp.MAX)
    if rank == 0:
        n_local = sum(p._local_tensor.numel() for p in sharded)
        print(f"GPT-2 small list / {args.scale} per dim ({len(shapes)} tensors, {n_local:,} elements per rank), "
              f"{world} gloo ranks, CPU backend, 1 thread per rank; medians of {args.steps} interleaved rounds, "
              f"max over ranks; load average {os.getloadavg()[0]:.1f}")
        print(f"{'step':<26}{'sharded ms':>12}{'plain ms':>10}{'added ms':>10}")
        for (kind, *_), (a, b, d) in zip(rows, mine.tolist()):
            print(f"{kind:<26}{a:>12.3f}{b:>10.3f}{d:>10.3f}")
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--scale", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--opts", default="lion,simba,tiger")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(args.world, os.path.join(tmp, "init"), args), nprocs=args.world,
                           start_method="spawn")


if __name__ == "__main__":
    main()
