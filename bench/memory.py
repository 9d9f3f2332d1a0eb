"""Peak memory of one GPT-2-small training step: normal step() vs step_in_backward.

    python -m bench.memory                       # CPU, batch 1 x 128 tokens, all modes
    python -m bench.memory --modes lion,lion-bwd --seq 256

A real forward and backward of the GPT-2 small model of examples/train_lm.py (124,439,808
parameters, tied embedding, vocabulary 50257) on CPU. After a warm-up step (which creates the
optimizer state), one more optimizer step is run under torch's profiler with
``profile_memory=True``: the running sum of its allocation events gives the peak above what
was alive when the step started (parameters, optimizer state, the batch). On a CUDA device
(``--device cuda``) ``torch.cuda.max_memory_allocated`` is read as well.

Modes: ``adamw`` (torch.optim.AdamW, default foreach), ``lion``, ``lion-bwd`` (Lion under
``step_in_backward``), ``tiger4`` (Tiger, grad_accum_steps=4: 4 micro-batches, ``step()`` after
each) and ``tiger4-bwd`` (the same under ``step_in_backward``). For Tiger the measured step is a
whole 4-micro-batch window. ``lion-4byte`` and ``lion-4byte-bwd``: the 4-byte mode (README "Four
bytes per parameter"): the model in bf16, Lion with ``error_correction=True`` (an int8 residual
per weight) and ``momentum_dtype=torch.int8`` (codes + a bf16 scale per 64 elements of a row;
0/1-d tensors fp32), the second under ``step_in_backward``; every other mode keeps fp32 weights.

Each row also gives the whole training memory per parameter (``per_param``, bytes): weights,
the correction byte, the optimizer state (momentum, its scales, step counters), the peak above
those during the measured step (gradients and activations at the peak: with the step in
backward, what is left of the gradients), and their sum (the batch of token ids left out).
``--n-layer``/``--d-model``/``--n-head``/``--vocab-size`` shrink the model (tests).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Dict, List

import torch
from torch.profiler import ProfilerActivity, profile

from .report import environment

MODES = ("adamw", "lion", "lion-bwd", "tiger4", "tiger4-bwd", "lion-4byte", "lion-4byte-bwd")
# bf16 weights + the correction byte + 8-bit momentum (README "Four bytes per parameter")
FOUR_BYTE = ("lion-4byte", "lion-4byte-bwd")


def gpt2_small(block_size: int, tied: bool = True, n_layer: int = 12, n_head: int = 12, d_model: int = 768,
               vocab_size: int = 50257):
    from examples.train_lm import GPT, ModelConfig

    return GPT(ModelConfig(n_layer=n_layer, n_head=n_head, d_model=d_model, block_size=block_size,
                           vocab_size=vocab_size, tie_weights=tied))


PHASES = ("forward", "backward", "step")


def _alloc_peak(prof, device: torch.device) -> Dict[str, int]:
    """Peak of the running sum of the profiler's allocation events on ``device``'s type (overall
    and within each phase's record_function ranges), and the value at the end. On CUDA the
    host's allocations (index batches, the profiler's own) are left out: one device's memory."""
    from torch._C._profiler import _EventType

    events, ranges = [], {ph: [] for ph in PHASES}
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == device.type:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        elif node.name in ranges:
            ranges[node.name].append((node.start_time_ns, node.end_time_ns))
        stack.extend(node.children)
    events.sort(key=lambda e: e[0])
    cur = peak = 0
    phase_peak = {ph: 0 for ph in PHASES}
    for t, size in events:
        cur += size
        peak = max(peak, cur)
        for ph, spans in ranges.items():
            if any(a <= t <= b for a, b in spans):
                phase_peak[ph] = max(phase_peak[ph], cur)
    out = {"peak_delta_bytes": peak, "end_delta_bytes": cur, "alloc_events": len(events)}
    out.update({f"peak_delta_in_{ph}_bytes": v for ph, v in phase_peak.items()})
    return out


def _live_bytes(model, opt) -> Dict[str, int]:
    """Weights, and the optimizer's state tensors (``state_bytes``: all of them, as before;
    ``residual_bytes``: the correction byte's share of it)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    state = residual = 0
    for st in opt.state.values():
        for k, v in st.items():
            if torch.is_tensor(v):
                state += v.numel() * v.element_size()
                if k == "residual":
                    residual += v.numel() * v.element_size()
    return {"param_bytes": params, "state_bytes": state, "residual_bytes": residual}


def per_param(row: Dict) -> Dict[str, float]:
    """The whole training memory per parameter, in bytes (see the module doc)."""
    n = row["n_params"]
    out = dict(weights=row["param_bytes"] / n, residual=row["residual_bytes"] / n,
               optimizer_state=(row["state_bytes"] - row["residual_bytes"]) / n,
               peak_above=row["peak_delta_bytes"] / n)
    out["total"] = sum(out.values())
    return out


def run_mode(mode: str, args) -> Dict:
    import sign_kernels

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = gpt2_small(args.seq, tied=not args.untied, n_layer=args.n_layer, n_head=args.n_head,
                       d_model=args.d_model, vocab_size=args.vocab_size).to(device)
    four = mode in FOUR_BYTE
    if four:
        model = model.to(torch.bfloat16)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}]
    micro = 1
    if mode == "adamw":
        opt = torch.optim.AdamW(groups, lr=1e-4)
    elif four:
        opt = sign_kernels.Lion(groups, lr=1e-4, backend=args.backend, momentum_dtype=torch.int8,
                                error_correction=True)
    elif mode.startswith("lion"):
        opt = sign_kernels.Lion(groups, lr=1e-4, backend=args.backend)
    else:
        micro = 4
        opt = sign_kernels.Tiger(sign_kernels.tiger_param_groups(model), lr=1e-3, grad_accum_steps=4,
                                 backend=args.backend)
    handle = sign_kernels.step_in_backward(opt, bucket_cap_mb=args.bucket_cap_mb) if mode.endswith("-bwd") else None
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, args.vocab_size, (args.batch, args.seq + 1), generator=gen).to(device)
               for _ in range(micro)]

    def one_step():
        for b in batches:
            with torch.profiler.record_function("forward"):
                loss = model(b[:, :-1], b[:, 1:])
            with torch.profiler.record_function("backward"):
                loss.backward()
            del loss
            if handle is None:
                with torch.profiler.record_function("step"):
                    opt.step()
                    opt.zero_grad(set_to_none=True)

    one_step()  # warm-up: creates the optimizer state
    live = _live_bytes(model, opt)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else []),
                 profile_memory=True) as prof:
        one_step()
    seconds = time.perf_counter() - t0
    row = dict(mode=mode, micro_batches=micro, **live, **_alloc_peak(prof, device), step_seconds_profiled=round(seconds, 2))
    if device.type == "cuda":
        row["cuda_peak_delta_bytes"] = torch.cuda.max_memory_allocated() - base_cuda
    n = sum(p.numel() for p in model.parameters())
    size = model.tok_emb.weight.element_size()  # the gradients' dtype: the weights'
    row["n_params"] = n
    row["weight_dtype"] = str(model.tok_emb.weight.dtype).replace("torch.", "")
    row["grad_set_bytes"] = n * size
    row["embedding_grad_bytes"] = model.tok_emb.weight.numel() * size
    row["tied"] = not args.untied
    row["per_param"] = per_param(row)
    if handle is not None:
        assert all(p.grad is None for p in model.parameters())
        handle.remove()
    return row


PER_PARAM_COLUMNS = (("weights", "weights"), ("residual", "corr. byte"), ("optimizer_state", "opt. state"),
                     ("peak_above", "grads+act. at peak"), ("total", "total"))


def per_param_table(rows: List[Dict]) -> str:
    """Bytes per parameter of each mode: what a training step holds at its peak."""
    head = f"{'bytes per parameter':<28}" + "".join(f"{label:>20}" for _, label in PER_PARAM_COLUMNS)
    lines = ["", head, "-" * len(head)]
    for r in rows:
        pp = r["per_param"]
        lines.append(f"{r['mode'] + ' (' + r['weight_dtype'] + ')':<28}"
                     + "".join(f"{pp[k]:>20.2f}" for k, _ in PER_PARAM_COLUMNS))
    lines.append("grads+act. at peak: the peak above weights + state during the step (gradients, activations); "
                 "the batch is left out")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--bucket-cap-mb", type=float, default=32.0)
    ap.add_argument("--untied", action="store_true", help="an output head of its own (163M parameters)")
    ap.add_argument("--n-layer", type=int, default=12, help="GPT-2 small: 12 (smaller for tests)")
    ap.add_argument("--n-head", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--vocab-size", type=int, default=50257)
    ap.add_argument("--out", default=None, help="JSON file (default bench/results/memory-<device>-<date>.json)")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m!r}; choose from {MODES}")
    env = environment(torch.device(args.device))
    env["command"] = "python -m bench.memory " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    rows: List[Dict] = []
    for m in modes:
        row = run_mode(m, args)
        rows.append(row)
        mib = lambda b: b / 2**20  # noqa: E731
        print(f"{m:14s} params {mib(row['param_bytes']):7.1f} MiB  state {mib(row['state_bytes']):7.1f} MiB  "
              f"step peak above start {mib(row['peak_delta_bytes']):7.1f} MiB  (in forward/backward/step: "
              + "/".join(f"{mib(row[f'peak_delta_in_{ph}_bytes']):.1f}" for ph in PHASES)
              + f")  {row['step_seconds_profiled']} s",
              flush=True)
    print(per_param_table(rows))
    by = {r["mode"]: r for r in rows}
    savings = {}
    for a, b in (("lion", "lion-bwd"), ("tiger4", "tiger4-bwd"), ("lion-4byte", "lion-4byte-bwd")):
        if a in by and b in by:
            saved = by[a]["peak_delta_bytes"] - by[b]["peak_delta_bytes"]
            savings[f"{a} - {b}"] = dict(saved_bytes=saved, of_grad_set=saved / by[a]["grad_set_bytes"])
            print(f"{a} -> {b}: {saved / 2**20:.1f} MiB saved = {saved / by[a]['grad_set_bytes']:.3f} of the gradient set")
    result = dict(env=env, args=vars(args), rows=rows, savings=savings)
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / (
        f"memory-{args.device}{'-untied' if args.untied else ''}-{env['date'][:10]}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
