"""Sharded parameters (FSDP2, HSDP, tensor parallel), DDP and distributed checkpoints.

The multi-process cases live in ``_sharded_cases.py``; here they run on 2 and 4 gloo ranks
(CPU), a few cases per spawn because starting processes is the expensive part. Every spawn
has a deadline (and every process group a 60 s timeout), so a hang fails instead of blocking.
The single-process tests at the end check the op's given-statistics input on every backend.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import _sharded_cases as cases
import sign_kernels
from sign_kernels.backends import get as get_backend

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

AVAILABLE = sign_kernels.available_backends()
COMPILED = "cpu" if AVAILABLE["cpu"] is None else "reference"
TRITON = os.environ.get("TRITON_INTERPRET") == "1" and AVAILABLE["triton"] is None
DEADLINE_S = 420


def _spawn(world: int, specs, tmp: str) -> None:
    """Run ``specs`` (case[:arg...]) on ``world`` gloo ranks; raise on failure or deadline."""
    ctx = mp.start_processes(cases.run_cases, args=(world, os.path.join(tmp, "init"), list(specs), tmp),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{world} ranks did not finish {specs} within {DEADLINE_S} s (hang?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        errors = [open(os.path.join(tmp, f)).read() for f in sorted(os.listdir(tmp)) if f.endswith(".err")]
        if errors:
            print("\n".join(errors))
        # rank<r>.fault: the last case each rank began, and the stacks of a rank killed by a signal
        for f in sorted(os.listdir(tmp)):
            if f.endswith(".fault"):
                text = open(os.path.join(tmp, f)).read()
                if "Fatal Python error" in text or (sys.exc_info()[0] is not None and text):
                    print(f"--- {f}\n{text}")


@pytest.fixture(scope="module")
def checkpoint_of_two_ranks():
    """Runs the 2-rank cases once; its DCP checkpoint is loaded by the 4-rank cases."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "ckpt")
        specs = [
            f"fsdp:{COMPILED}", "fsdp:reference", f"fsdp_bf16_momentum:{COMPILED}", f"fsdp_accum:{COMPILED}",
            f"fsdp_scaler:{COMPILED}",
            f"tp:{COMPILED}", f"fsdp_clip:{COMPILED}", f"tp_clip:{COMPILED}", "fsdp_clip:reference",
            f"fsdp_int8:{COMPILED}", f"tp_int8:{COMPILED}",
            f"ddp:{COMPILED}", f"bad_input:{COMPILED}", f"checkpoints:{COMPILED}:{ckpt}", f"fsdp_backward:{COMPILED}",
            f"dcp_save:{COMPILED}:{ckpt}",
        ]
        if TRITON:
            specs += ["fsdp:triton:lion,tiger", "tp:triton:tiger"]
        error = None
        try:
            _spawn(2, specs, tmp)
        except Exception as exc:  # reported by test_two_ranks; the 4-rank test skips its load
            error = exc
        yield ckpt, error


def test_two_ranks(checkpoint_of_two_ranks):
    """FSDP2 (GradScaler's protocol too), TP, bf16 momentum, DDP, refusals, every checkpoint path; on 2 ranks."""
    _, error = checkpoint_of_two_ranks
    if error is not None:
        raise error


def test_four_ranks(checkpoint_of_two_ranks):
    """FSDP2 (an empty shard), HSDP and FSDP2+TP on 2x2 meshes, TP, and the 2-rank checkpoint resumed on 4."""
    ckpt, error = checkpoint_of_two_ranks
    specs = [f"fsdp:{COMPILED}", f"hsdp:{COMPILED}", f"tp:{COMPILED}", f"fsdp_tp:{COMPILED}",
             f"fsdp_clip:{COMPILED}", f"tp_clip:{COMPILED}", f"fsdp_tp_clip:{COMPILED}",
             f"fsdp_int8:{COMPILED}", f"tp_int8:{COMPILED}"]
    if error is None:
        specs.append(f"dcp_load:{COMPILED}:{ckpt}")
    with tempfile.TemporaryDirectory() as tmp:
        _spawn(4, specs, tmp)
    if error is not None:
        pytest.fail(f"the 2-rank run failed, so the 2 -> 4 checkpoint load was not tested: {error}")


# ------------------------------------------------------------------ the op's given statistics
SINGLE_BACKENDS = [b for b in ("reference", "cpu") if AVAILABLE[b] is None] + (["triton"] if TRITON else [])
ROLES = [3, 2, 0, 3, 1]  # matrix, embedding, elementwise, matrix (NaN), gain


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(7, 5, generator=g), torch.randn(9, 33, generator=g), torch.randn(13, generator=g),
          torch.randn(4, 6, generator=g), 1 + 0.1 * torch.randn(6, generator=g)]
    gs = [torch.randn(p.shape, generator=g) for p in ps]
    ms = [torch.randn(p.shape, generator=g) for p in ps]
    gs[3][1, 2] = float("nan")
    return ps, gs, ms


def _call(backend, ps, gs, ms, *given, k=1, t=0):
    steps = [torch.full((), t, dtype=torch.int64) for _ in ps]
    get_backend(backend).tiger_(ps, gs, ms, steps, ROLES, 1e-2, None, 0.9, 0.01, k, 0.99, None, None,
                                [1, 2, 3, 4, 5], False, *given)


def _stepped(backend, ps, gs, ms, *given, **kw):
    """(params, momenta) after one call on copies of ps and ms."""
    p2, m2 = [p.clone() for p in ps], [m.clone() for m in ms]
    _call(backend, p2, gs, m2, *given, **kw)
    return p2, m2


def _own_stats(ps):
    """The statistics each tensor would compute itself, in the given-statistics layout."""
    vals = [0.0, ps[0].double().square().sum().item(), 1.0, 0.0]
    row0 = len(vals)
    vals += ps[1].double().square().sum(-1).tolist()
    stats = torch.tensor(vals, dtype=torch.float64)
    return stats, [0, -1, -1, 2, 3], [1, row0, -1, -1, -1], [ps[0].numel(), ps[1].shape[-1], 0, 0, 0]


@pytest.mark.parametrize("backend", SINGLE_BACKENDS)
def test_given_statistics_equal_to_own_give_the_same_bits(backend):
    ps, gs, ms = _tensors()
    a, am = _stepped(backend, ps, gs, ms)
    b, bm = _stepped(backend, ps, gs, ms, *_own_stats(ps))
    for x, y in zip(a + am, b + bm):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", SINGLE_BACKENDS)
def test_given_statistics_are_what_the_op_uses(backend):
    ps, gs, ms = _tensors()
    stats, at_nan, at_sq, n = _own_stats(ps)
    # Sums of squares of a tensor twice the size (n doubled, sums x 8): RMS x 2, so each
    # matrix/embedding step is twice as long; a NaN count given for the gain (whose own
    # gradient is finite) shrinks it whole towards 1 and keeps its momentum.
    stats2 = stats.clone()
    stats2[at_sq[0]] *= 8
    stats2[at_sq[1]:at_sq[1] + 9] *= 8
    stats2[at_nan[4]] = 1.0
    n2 = [x * 2 for x in n]
    base, bm = _stepped(backend, ps, gs, ms)
    got, gm = _stepped(backend, ps, gs, ms, stats2, at_nan, at_sq, n2)
    for i in (0, 1):  # matrix (one sum), embedding (a sum per row)
        torch.testing.assert_close(got[i] - ps[i], 2 * (base[i] - ps[i]), rtol=1e-5, atol=1e-7)
    assert torch.equal(got[4], (ps[4] - 1) * torch.tensor(0.99) + 1) and torch.equal(gm[4], ms[4])
    assert torch.equal(got[3], ps[3] * torch.tensor(0.99))  # its own NaN (flag given as 1)
    assert torch.equal(got[2], base[2])  # element-wise roles ignore sums
    # An accumulation micro-step (k = 2, t = 0) reads no sums: same bits as without them.
    a, am = _stepped(backend, ps, gs, ms, k=2)
    stats3 = stats.clone()
    stats3[at_sq[0]] = 1e30
    b, bmm = _stepped(backend, ps, gs, ms, stats3, [-1] * 5, at_sq, n, k=2)
    for x, y in zip(a + am, b + bmm):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", SINGLE_BACKENDS)
def test_given_statistics_bad_arguments_are_refused(backend):
    ps, gs, ms = _tensors()
    stats, at_nan, at_sq, n = _own_stats(ps)
    bad = [
        ((stats, at_nan, at_sq, None), "together"),
        ((stats.float(), at_nan, at_sq, n), "float64"),
        ((stats, at_nan[:-1], at_sq, n), "entr"),
        ((stats, [99] + at_nan[1:], at_sq, n), "stats_nan[0]"),
        ((stats, at_nan, [at_sq[0], stats.numel() - 3] + at_sq[2:], n), "stats_sumsq[1]"),
        ((stats, at_nan, [at_sq[0], 2**63 - 1] + at_sq[2:], n), "stats_sumsq[1]"),  # index + rows overflows
        ((stats, at_nan, at_sq, [0] + n[1:]), "stats_n[0]"),
    ]
    for given, words in bad:
        p2, m2 = [p.clone() for p in ps], [m.clone() for m in ms]
        with pytest.raises((ValueError, RuntimeError), match=None) as info:
            _call(backend, p2, gs, m2, *given)
        assert words in str(info.value), (words, str(info.value))
        assert all(torch.equal(x, y) for x, y in zip(p2 + m2, ps + ms)), "a refused call changed tensors"
