"""Differential fuzz campaign: every local backend against the reference, and against fp64.

    python scripts/fuzz.py --cases 1000000                # the campaign (minutes; not in CI)
    python scripts/fuzz.py --cases 3000 --seed 1          # a slice (tests/test_fuzz.py runs one)
    TRITON_INTERPRET=1 python scripts/fuzz.py ...         # includes the Triton kernels on CPU

A *case* is one tensor stepped once by one op call: a random algorithm (Lion, Tiger with a
random role, Simba), random hyperparameters, storage dtypes (param fp32/bf16/fp16, grad of
the param dtype or fp32, state fp32/bf16/param), shape (empty, scalar-like, odd sizes, rows),
step count (Tiger's accumulation phase, the stochastic-rounding stream), stochastic rounding,
GradScaler's scale and found_inf, and values drawn from a mixture of normal numbers, every
binade, exact zeros, exact ties (g = -m with beta 0.5) and NaN/Inf. Cases are batched 64 to
an op call (one call, one set of hyperparameters), as the optimizers call the ops. About a
quarter of Lion's and Tiger's batches use 8-bit momentum (2-d tensors with ragged last blocks,
random codes and bf16 scales: all-zero blocks, all-equal blocks, blocks with one huge outlier)
and, for 16-bit params, about half of those and a quarter of the others the correction byte
(random residuals); these compare their codes, scales and residuals bit for bit too, and skip
the fp64 oracle (int8 momentum has no fp64 form).

Checks, per case:
1. each compiled/Triton backend equals the reference backend on the same storage dtypes bit
   for bit (Lion, Simba, Tiger's element-wise roles); Tiger's matrix and embedding roles
   within 4 ulps of the parameter (their RMS sums may run in another order);
2. fp32 storage: the reference equals the fp64 reference within (2 + 4) ulps per element,
   except where the sign argument itself is within fp32 rounding of zero (then a flip is
   legitimate and allowed).
Exit status 1 and a reproducer (seed, batch) on the first mismatch.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Dict, List

import torch

import sign_kernels
from sign_kernels import backends as B
from sign_kernels.backends import reference as ref

BATCH = 64
F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
ULP = {F32: 2.0**-23, BF16: 2.0**-7, F16: 2.0**-10}
ROLE_ULPS = 4  # Tiger's RMS roles: summation order may differ between backends


def _values(n: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """A mixture: normal numbers, every binade of ``dtype``, zeros, NaN/Inf (rarely)."""
    info = torch.finfo(dtype)
    kind = torch.randint(0, 16, (n,), generator=gen)
    x = torch.randn(n, generator=gen, dtype=F64)
    lo, hi = math.log2(info.tiny), math.log2(info.max) - 1
    e = torch.randint(int(lo), int(hi), (n,), generator=gen).to(F64)
    binade = (1 + torch.rand(n, generator=gen, dtype=F64)) * torch.exp2(e) * torch.where(x < 0, -1.0, 1.0)
    x = torch.where(kind < 5, binade, x)
    x = torch.where(kind == 5, torch.zeros_like(x), x)
    x = torch.where(kind == 6, torch.full_like(x, math.inf) * torch.sign(x + 0.5), x)
    x = torch.where(kind == 7, torch.full_like(x, math.nan), x) if torch.rand((), generator=gen) < 0.3 else x
    return x.to(dtype)


def _shape(gen: torch.Generator):
    r = int(torch.randint(0, 10, (), generator=gen))
    if r == 0:
        return (0,)
    if r == 1:
        return (1,)
    if r < 6:
        return (int(torch.randint(2, 300, (), generator=gen)),)
    rows, cols = (int(torch.randint(1, 24, (), generator=gen)) for _ in range(2))
    return (rows, cols)


def _pick(gen, seq):
    return seq[int(torch.randint(0, len(seq), (), generator=gen))]


def make_batch(seed: int, batch: int = BATCH) -> Dict:
    """One op call's worth of cases, fully determined by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    algo = _pick(gen, ["lion", "tiger", "simba"])
    pdt = _pick(gen, [F32, F32, BF16, F16])
    gdt = _pick(gen, [pdt, F32])
    sdt = torch.int16 if algo == "simba" else _pick(gen, [pdt, F32, BF16])
    sr = bool(torch.rand((), generator=gen) < 0.3) and (pdt == BF16 or sdt == BF16)
    scaled = bool(torch.rand((), generator=gen) < 0.2)
    hp: Dict = dict(lr=_pick(gen, [1e-4, 3e-3, 0.1, 1.0]), weight_decay=_pick(gen, [0.0, 0.01, 0.5]))
    if algo == "lion":
        hp["betas"] = _pick(gen, [(0.9, 0.99), (0.5, 0.5), (0.0, 0.9), (0.95, 0.98)])
    elif algo == "tiger":
        hp.update(beta=_pick(gen, [0.965, 0.5, 0.0]), grad_accum_steps=_pick(gen, [1, 1, 2, 4]),
                  shrink_ratio=_pick(gen, [0.99, 0.5, 1.0]))
    else:
        w = _pick(gen, [1, 8, 128, 32767])
        hp.update(window_size=w, threshold=_pick(gen, [0.0, 0.1, 0.5, 1.0]))
    params, grads, states, steps, roles, seeds = [], [], [], [], [], []
    for i in range(batch):
        shape = _shape(gen)
        role = _pick(gen, [0, 1, 2, 3]) if algo == "tiger" else 0
        if role == ref.ROLE_EMBEDDING and len(shape) < 2:
            shape = (max(1, shape[0] // 7), 7) if shape[0] else (0, 3)
        n = math.prod(shape)
        p = _values(n, gen, F64).clamp(-1e4, 1e4).nan_to_num(0.5).to(pdt).reshape(shape)
        g = _values(n, gen, gdt).reshape(shape)
        if algo == "simba":
            s = torch.randint(-hp["window_size"] - 2, hp["window_size"] + 3, shape, generator=gen).clamp(-32767, 32767)
            s = s.to(torch.int16)
        else:
            s = _values(n, gen, F64).nan_to_num(0.0).clamp(-1e3, 1e3).to(sdt).reshape(shape)
            if algo == "lion" and hp["betas"][0] == 0.5 and torch.rand((), generator=gen) < 0.5:
                g = (-s.to(F64)).to(gdt)  # exact ties: c = 0.5 m + 0.5 (-m) = 0
        params.append(p)
        grads.append(g)
        states.append(s)
        steps.append(torch.tensor(int(torch.randint(0, 9, (), generator=gen)), dtype=torch.int64))
        roles.append(role)
        seeds.append(int(torch.randint(0, 2**31, (), generator=gen)))
    gs = torch.tensor(_pick(gen, [1024.0, 0.5, 65536.0])) if scaled else None
    fi = torch.tensor(float(torch.rand((), generator=gen) < 0.2)) if scaled else None
    b = dict(algo=algo, hp=hp, params=params, grads=grads, states=states, steps=steps, roles=roles,
             seeds=seeds, sr=sr, grad_scale=gs, found_inf=fi, scales=None, residuals=None)
    if algo != "simba":
        _compress(b, torch.Generator().manual_seed(seed ^ 0x5EED5EED))
    return b


def _compress(b: Dict, gen: torch.Generator) -> None:
    """Turn some batches into 8-bit momentum and/or correction-byte cases (own generator: the
    other batches stay what they were)."""
    q8 = bool(torch.rand((), generator=gen) < 0.25)
    pdt = b["params"][0].dtype
    ec = pdt in (BF16, F16) and bool(torch.rand((), generator=gen) < (0.5 if q8 else 0.25))
    if not (q8 or ec):
        return
    b["sr"] = False if ec else b["sr"]
    if q8:
        for i in range(len(b["params"])):
            shape = (int(torch.randint(1, 6, (), generator=gen)), int(torch.randint(1, 200, (), generator=gen)))
            n = math.prod(shape)
            b["params"][i] = _values(n, gen, F64).clamp(-1e4, 1e4).nan_to_num(0.5).to(pdt).reshape(shape)
            g = _values(n, gen, b["grads"][i].dtype).reshape(shape)
            kind = int(torch.randint(0, 4, (), generator=gen))
            if kind == 1:
                g.view(-1)[int(torch.randint(0, n, (), generator=gen))] = 3e38 if g.dtype == F32 else 6e4
            b["grads"][i] = g
            b["states"][i] = torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)
            if kind == 2:
                b["states"][i].fill_(int(torch.randint(-127, 128, (), generator=gen)))  # all-equal blocks
            nb = -(-shape[1] // 64)
            e = torch.randint(-40, 40, (shape[0], nb), generator=gen).to(torch.float32)
            sc = torch.exp2(e) * (1 + torch.rand((shape[0], nb), generator=gen))
            sc = torch.where(torch.rand((shape[0], nb), generator=gen) < 0.2, torch.zeros(()), sc)  # all-zero blocks
            if kind == 3:
                sc[0, 0] = 3e38  # a block of one huge outlier
            b["states"][i] = torch.where(sc.repeat_interleave(64, -1)[:, :shape[1]] == 0,
                                         torch.zeros((), dtype=torch.int8), b["states"][i])
        b["scales"] = [torch.zeros((p.shape[0], -(-p.shape[1] // 64)), dtype=BF16) for p in b["params"]]
        gen2 = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (), generator=gen)))
        for sc in b["scales"]:
            sc.copy_((torch.exp2(torch.randint(-40, 40, sc.shape, generator=gen2).float())
                      * (1 + torch.rand(sc.shape, generator=gen2))).to(BF16))
            sc.masked_fill_(torch.rand(sc.shape, generator=gen2) < 0.2, 0.0)
    if ec:
        b["residuals"] = [torch.randint(-127, 128, p.shape, generator=gen, dtype=torch.int8) for p in b["params"]]


def run_backend(backend, b: Dict, dtype=None):
    """Apply one op call of ``b`` with ``backend``; returns (params, states), copies."""
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    params = [cast(p.clone()) for p in b["params"]]
    grads = [cast(g.clone()) for g in b["grads"]]
    states = [s.clone() if s.dtype in (torch.int16, torch.int8) else cast(s.clone()) for s in b["states"]]
    steps = [t.clone() for t in b["steps"]]
    hp, tail = b["hp"], dict(grad_scale=b["grad_scale"], found_inf=b["found_inf"], seeds=b["seeds"],
                             stochastic_rounding=b["sr"] and dtype is None)
    extra = {}
    if b.get("scales") is not None:
        extra["exp_avg_scales"] = [t.clone() for t in b["scales"]]
    if b.get("residuals") is not None:
        extra["residuals"] = [t.clone() for t in b["residuals"]]
    tail.update(extra)
    lr = float(hp["lr"])
    if b["algo"] == "lion":
        backend.lion_(params, grads, states, steps, lr, None, float(hp["betas"][0]), float(hp["betas"][1]),
                      float(hp["weight_decay"]), **tail)
    elif b["algo"] == "tiger":
        backend.tiger_(params, grads, states, steps, list(b["roles"]), lr, None, float(hp["beta"]),
                       float(hp["weight_decay"]), int(hp["grad_accum_steps"]), float(hp["shrink_ratio"]), **tail)
    else:
        w = int(hp["window_size"])
        backend.simba_(params, grads, states, steps, lr, None, w, ref.threshold_count(w, float(hp["threshold"])),
                       float(hp["weight_decay"]), **tail)
    return params, states, extra.get("exp_avg_scales"), extra.get("residuals")


def compressed(b: Dict) -> bool:
    return b.get("scales") is not None or b.get("residuals") is not None


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    same = (a == b) | (a.isnan() & b.isnan()) if a.is_floating_point() else (a == b)
    return same.reshape(-1)


def compare_backend(b: Dict, got, want) -> List[str]:
    """Mismatches of a backend's result ``got`` against the reference's ``want`` (same dtypes)."""
    errors = []
    for i, (gp, wp, gs, ws) in enumerate(zip(got[0], want[0], got[1], want[1])):
        role = b["roles"][i]
        tiger_rms = b["algo"] == "tiger" and role in (ref.ROLE_MATRIX, ref.ROLE_EMBEDDING)
        if tiger_rms:
            d = (gp.to(F64) - wp.to(F64)).abs()
            tol = ROLE_ULPS * ULP[gp.dtype] * wp.to(F64).abs().clamp_min(torch.finfo(gp.dtype).tiny)
            ok = (d <= tol) | (gp.isnan() & wp.isnan()) | (gp == wp)
            if not bool(ok.all()):
                errors.append(f"case {i}: param beyond {ROLE_ULPS} ulps ({int((~ok).sum())} elements)")
        elif not bool(_bits_equal(gp, wp).all()):
            errors.append(f"case {i}: param differs in {int((~_bits_equal(gp, wp)).sum())} elements")
        if not bool(_bits_equal(gs, ws).all()):
            errors.append(f"case {i}: state differs in {int((~_bits_equal(gs, ws)).sum())} elements")
        if got[2] is not None and not bool(_bits_equal(got[2][i], want[2][i]).all()):
            errors.append(f"case {i}: int8 momentum's scales differ")
        if got[3] is not None:
            same = _bits_equal(got[3][i], want[3][i])
            if tiger_rms:  # the residual follows θ, which may differ by a few ulps here: compare θ^
                from sign_kernels import _quant

                hg, hw = _quant.ec_decode(gp, got[3][i]).to(F64), _quant.ec_decode(wp, want[3][i]).to(F64)
                same = same | ((hg - hw).abs() <= ROLE_ULPS * ULP[gp.dtype] * hw.abs()).reshape(-1)
            if not bool(same.all()):
                errors.append(f"case {i}: correction bytes differ in {int((~same).sum())} elements")
    return errors


def compare_oracle(b: Dict, got, oracle) -> List[str]:
    """fp32 storage only: the reference against the fp64 reference, flips only where legitimate."""
    errors = []
    hp = b["hp"]
    for i, (p32, p64) in enumerate(zip(got[0], oracle[0])):
        if b["params"][i].dtype != F32 or p32.numel() == 0:
            continue
        x, o = p32.to(F64), p64
        # Each result is one or two rounded sums of terms no larger than |θ|, lr·|θ|, lr and the
        # NaN guard's centre (1 for gains): a few ulps of those magnitudes, not of the result
        # (θ − η can cancel).
        scale = o.abs() + b["params"][i].to(F64).abs().nan_to_num(0.0) + hp["lr"] + (b["roles"][i] == ref.ROLE_GAIN)
        if b["algo"] == "tiger":
            # Tiger's update lr_p (sign(m) + wd θ) is a product of a rounded wd θ with lr_p = lr · rms(θ):
            # the rounding of wd θ is amplified by lr_p, so the terms' size is lr_p (1 + wd |θ|)
            # (found by seed 2029: lr 1, rms 5312, wd θ = 1.02 against sign -1, result -10.45).
            p0 = b["params"][i].to(F64).nan_to_num(0.0, 0.0, 0.0)
            role = b["roles"][i]
            if role == ref.ROLE_MATRIX or (role == ref.ROLE_EMBEDDING and p0.dim() < 2):
                rms = p0.pow(2).mean().sqrt()
            elif role == ref.ROLE_EMBEDDING:
                rms = p0.pow(2).mean(-1, keepdim=True).sqrt()
            else:
                rms = torch.tensor(0.5, dtype=F64)
            scale = scale + hp["lr"] * rms * (1 + hp["weight_decay"] * p0.abs())
        ok = (x - o).abs() <= 6 * ULP[F32] * scale.clamp_min(torch.finfo(F32).tiny)
        ok |= (x.isnan() & o.isnan()) | (x == o)
        if bool(ok.all()):
            continue
        # A flip is legitimate where the fp64 sign argument is within fp32 rounding of zero.
        g = b["grads"][i].to(F64)
        if b["grad_scale"] is not None:
            g = g / float(b["grad_scale"])
        m = b["states"][i].to(F64)
        if b["algo"] == "lion":
            arg_terms = (hp["betas"][0] * m).abs() + ((1 - hp["betas"][0]) * g).abs()
            arg = hp["betas"][0] * m + (1 - hp["betas"][0]) * g
        elif b["algo"] == "tiger":  # the sign is of the new momentum
            k, t = hp["grad_accum_steps"], int(b["steps"][i])
            b1, coef = (hp["beta"] if t % k == 0 else 1.0), (1 - hp["beta"]) / k
            arg_terms = (b1 * m).abs() + (coef * g).abs()
            arg = b1 * m + coef * g
        else:
            arg_terms, arg = torch.ones_like(x), torch.ones_like(x)
        # within rounding of zero, or so small that fp32 holds it as a subnormal (or flushes it)
        near_zero = (arg.abs() <= 4 * ULP[F32] * arg_terms) | (arg.abs() < 2 * torch.finfo(F32).tiny)
        bad = ~ok & ~near_zero.reshape(ok.shape)
        if b["algo"] == "tiger" and b["roles"][i] in (ref.ROLE_MATRIX, ref.ROLE_EMBEDDING):
            bad &= ~((x - o).abs() <= 16 * ULP[F32] * (o.abs() + hp["lr"]))  # RMS in fp64 vs fp32 lr product
        if bool(bad.any()):
            errors.append(f"case {i}: {int(bad.sum())} elements beyond the fp64 oracle's tolerance")
    return errors


def campaign(cases: int, seed: int = 0, backends=None, oracle_every: int = 1, triton_every: int = 1,
             progress: bool = True) -> Dict:
    avail = sign_kernels.available_backends()
    names = backends or [n for n in ("cpu", "triton") if avail[n] is None]
    runners = {n: B.get(n) for n in names}
    reference = B.get("reference")
    counts = {n: 0 for n in names}
    counts["fp64_oracle"] = 0
    counts["compressed"] = 0  # cases with 8-bit momentum and/or the correction byte
    elements = 0
    n_batches = math.ceil(cases / BATCH)
    t0 = time.time()
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=n_batches * BATCH, unit="case", mininterval=2.0)
        except ImportError:
            bar = None
    for k in range(n_batches):
        bseed = seed * 1_000_003 + k
        b = make_batch(bseed)
        counts["compressed"] += BATCH if compressed(b) else 0
        want = run_backend(reference, b)
        elements += sum(p.numel() for p in b["params"])
        for name, runner in runners.items():
            if name == "triton" and k % triton_every:
                continue
            if compressed(b) and name not in (sign_kernels.Lion._compressed_backends & sign_kernels.Tiger._compressed_backends):
                continue  # a backend without 8-bit momentum / the correction byte yet
            errs = compare_backend(b, run_backend(runner, b), want)
            if errs:
                return dict(ok=False, backend=name, batch_seed=bseed, algo=b["algo"], errors=errs[:5])
            counts[name] += BATCH
        if k % oracle_every == 0 and not compressed(b):
            errs = compare_oracle(b, want, run_backend(reference, b, F64))
            if errs:
                return dict(ok=False, backend="reference vs fp64", batch_seed=bseed, algo=b["algo"], errors=errs[:5])
            counts["fp64_oracle"] += BATCH
        if bar is not None:
            bar.update(BATCH)
    if bar is not None:
        bar.close()
    return dict(ok=True, cases_per_check=counts, batches=n_batches, elements=elements, seconds=round(time.time() - t0, 1),
                torch=torch.__version__, seed=seed)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backends", default=None, help="comma-separated (default: cpu and triton where available)")
    ap.add_argument("--oracle-every", type=int, default=1, help="run the fp64 oracle on every k-th batch")
    ap.add_argument("--triton-every", type=int, default=1, help="run Triton (slow in the interpreter) on every k-th batch")
    ap.add_argument("--json", default=None, help="write the result here")
    args = ap.parse_args(argv)
    result = campaign(args.cases, args.seed, args.backends.split(",") if args.backends else None,
                      args.oracle_every, args.triton_every)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
