"""Host cost of step_in_backward against a normal step(), on GPT-2 small's tensor list.

    python -m bench.backward_host                 # Lion and Tiger, 148 tensors shrunk 1024x
    python -m bench.backward_host --shrink 1 --reps 5

What is timed is the optimizer's host work, not its kernels: the 148 tensors of GPT-2 small
(bench/paramsets.py) are shrunk ``--shrink`` times (and the bucket cap with them, so the
buckets are cut where the full-size run cuts them), so the op calls cost little besides their
dispatch. Each parameter gets its gradient from a real autograd backward
(``loss = sum_i (p_i * w_i).sum()``). Per repetition, interleaved:

* normal: ``backward()`` with no hooks, then ``step()`` and ``zero_grad()``: host cost =
  step + zero_grad;
* in backward: ``backward()`` under ``step_in_backward``: host cost = its time minus the
  plain backward's.

Times are the calling thread's CPU time (``time.thread_time``) with one torch thread, so other
processes on a shared machine do not count. Medians over ``--reps`` repetitions; the ratio in-backward / normal is the number the
README quotes (target: at most 2).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from .paramsets import gpt2_small
from .report import environment


# NOTE: [thread CPU time] the calling thread's CPU time, with one torch thread: on a shared
# machine wall time mostly measures the other processes; host cost is this thread's work.
_clock = time.thread_time


def _setup(algo: str, shrink: int, backend: str):
    import sign_kernels

    torch.manual_seed(0)
    ps = gpt2_small()
    params = [torch.nn.Parameter(torch.randn(max(1, n // shrink))) for n in ps.numels]
    weights = [torch.randn_like(p) for p in params]
    if algo == "lion":
        opt = sign_kernels.Lion(params, lr=1e-4, backend=backend)
    else:
        # Groups per role as tiger_param_groups makes them (the shrunk tensors are 1-d, so the
        # embedding tables run as matrices: one whole-tensor RMS each).
        def role(name):
            leaf = name.rsplit(".", 1)[-1]
            if "ln" in name:
                return "gain" if leaf == "weight" else "elementwise"
            return "elementwise" if leaf == "bias" else "matrix"

        groups = {}
        for (name, _), p in zip(ps.tensors, params):
            groups.setdefault(role(name), []).append(p)
        opt = sign_kernels.Tiger([{"params": v, "role": r} for r, v in groups.items()], lr=1e-3, backend=backend)
    return params, weights, opt


def _backward(params, weights):
    loss = sum((p * w).sum() for p, w in zip(params, weights))
    t0 = _clock()
    loss.backward()
    return _clock() - t0


def measure(algo: str, args) -> dict:
    import sign_kernels

    params, weights, opt = _setup(algo, args.shrink, args.backend)
    cap_mb = args.bucket_cap_mb / args.shrink
    plain, normal, hooked = [], [], []
    for rep in range(args.reps + 3):  # 3 warm-up repetitions
        plain.append(_backward(params, weights))
        t0 = _clock()
        opt.step()
        opt.zero_grad()
        normal.append(_clock() - t0)
        handle = sign_kernels.step_in_backward(opt, bucket_cap_mb=cap_mb)
        hooked.append(_backward(params, weights))
        handle.remove()
    plain, normal, hooked = plain[3:], normal[3:], hooked[3:]
    m_plain, m_normal, m_hooked = (statistics.median(x) for x in (plain, normal, hooked))
    host_bwd = m_hooked - m_plain
    return dict(
        algo=algo, tensors=len(params), elements=sum(p.numel() for p in params), shrink=args.shrink,
        bucket_cap_mb_full_size=args.bucket_cap_mb, reps=args.reps,
        median_plain_backward_ms=m_plain * 1e3, median_step_zero_grad_ms=m_normal * 1e3,
        median_hooked_backward_ms=m_hooked * 1e3, in_backward_host_ms=host_bwd * 1e3,
        ratio=host_bwd / m_normal,
        raw_ms=dict(plain=[x * 1e3 for x in plain], step=[x * 1e3 for x in normal], hooked=[x * 1e3 for x in hooked]),
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--algos", default="lion,tiger")
    ap.add_argument("--shrink", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--bucket-cap-mb", type=float, default=32.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: no OpenMP waits in the timing)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment(torch.device("cpu"))
    env["command"] = "python -m bench.backward_host " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    rows = []
    for algo in args.algos.split(","):
        row = measure(algo, args)
        rows.append(row)
        print(f"{algo:6s} {row['tensors']} tensors: step+zero_grad {row['median_step_zero_grad_ms']:.3f} ms, "
              f"in-backward extra {row['in_backward_host_ms']:.3f} ms (plain backward "
              f"{row['median_plain_backward_ms']:.3f} ms) -> ratio {row['ratio']:.2f}", flush=True)
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"backward-host-cpu-{env['date'][:10]}.json"
    out.write_text(json.dumps(dict(env=env, args=vars(args), rows=rows), indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
