"""Every local backend x dtype x shape against the fp64 reference, over several steps."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sign_kernels
from conftest import (
    LOCAL_BACKENDS,
    OPTIMIZERS,
    Case,
    assert_close_to_oracle,
    hard_cases,
    needs_cpu,
    oracle_run,
    run_optimizer,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _case_ids(dtype):
    return [c.name for c in hard_cases(dtype)]


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
@pytest.mark.parametrize("algo", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case_index", range(len(hard_cases(torch.float32))), ids=_case_ids(torch.float32))
def test_hard_cases_match_fp64_oracle(backend, algo, dtype, case_index):
    cls, hp = OPTIMIZERS[algo]
    case = hard_cases(dtype)[case_index]
    params, _ = run_optimizer(cls, hp, case, dtype, backend)
    oracle, _ = oracle_run(cls, hp, case)
    for i, (p, o) in enumerate(zip(params, oracle)):
        if case.name == "binades" and dtype != torch.float32:
            # fp64 holds the products exactly; bf16/fp16 overflow or flush at the extremes.
            finite = torch.isfinite(o.to(dtype).to(torch.float64)) & (o.abs() > torch.finfo(dtype).tiny * 4)
            p, o = p.detach()[finite], o.detach()[finite]
        # Low-precision momentum rounds small |m| differently from fp64, which may flip a
        # sign on a later step: bounded at 0.5% of the elements; none in fp32.
        flips = 0 if dtype == torch.float32 else -(-p.numel() // 200)
        assert_close_to_oracle(p, o, dtype, len(case.grads), hp["lr"], max_flips=flips,
                               what=f"{algo}/{case.name}/param {i}")


@needs_cpu
@pytest.mark.parametrize("algo", sorted(OPTIMIZERS))
@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.float32, None), (torch.float32, torch.bfloat16),
        (torch.bfloat16, None), (torch.bfloat16, torch.float32),
        (torch.float16, None), (torch.float16, torch.float32), (torch.float16, torch.bfloat16),
    ],
    ids=str,
)
@pytest.mark.parametrize("sr", [False, True], ids=["rne", "sr"])
def test_cpu_bitwise_equals_reference(algo, dtypes, sr):
    """The CPU kernel and the reference in the storage dtype compute the same bits
    (Tiger's RMS sums in a different order: a few ulps allowed there)."""
    cls, hp = OPTIMIZERS[algo]
    dtype, mdt = dtypes
    if algo == "simba" and mdt is not None:
        pytest.skip("Simba has int16 counters")
    extra = dict(stochastic_rounding=sr, seed=123)
    if mdt is not None:
        extra["momentum_dtype"] = mdt
    g = torch.Generator().manual_seed(7)
    shapes = [(1,), (4097,), (33, 65), (0,), (70000,)]
    case = Case("random", [torch.randn(s, generator=g) for s in shapes],
                [[torch.randn(s, generator=g) for s in shapes] for _ in range(4)])
    got, opt_c = run_optimizer(cls, hp, case, dtype, "cpu", **extra)
    ref, opt_r = run_optimizer(cls, hp, case, dtype, "reference", **extra)
    for a, b in zip(got, ref):
        if algo == "tiger":
            torch.testing.assert_close(a, b, atol=0, rtol=4 * 2.0**-23 if dtype == torch.float32 else 2.0**-7)
        else:
            assert torch.equal(a.view(-1).view(torch.int16 if dtype != torch.float32 else torch.int32),
                               b.view(-1).view(torch.int16 if dtype != torch.float32 else torch.int32))
    key = "sign_counts" if algo == "simba" else "exp_avg"
    for a, b in zip(got, ref):
        sa, sb = opt_c.state[a][key], opt_r.state[b][key]
        assert sa.dtype == sb.dtype == (torch.int16 if algo == "simba" else (mdt or dtype))
        if algo != "tiger":
            assert torch.equal(sa, sb)


@needs_cpu
@settings(max_examples=1000, deadline=None)
@given(
    algo=st.sampled_from(sorted(OPTIMIZERS)),
    n=st.integers(0, 300),
    steps=st.integers(1, 4),
    lr=st.floats(1e-6, 1e-1),
    beta1=st.floats(0.0, 0.999),
    beta2=st.floats(0.0, 0.999),
    wd=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_cpu_random_cases_match_fp64_oracle(algo, n, steps, lr, beta1, beta2, wd, seed):
    """1000 random cases: the fp32 CPU kernel against the fp64 reference."""
    cls, _ = OPTIMIZERS[algo]
    hp = {
        "lion": dict(lr=lr, betas=(beta1, beta2), weight_decay=wd),
        "tiger": dict(lr=lr, beta=beta1, weight_decay=wd, grad_accum_steps=1 + seed % 3),
        "simba": dict(lr=lr, window_size=1 + seed % 200, threshold=beta2, weight_decay=wd),
    }[algo]
    g = torch.Generator().manual_seed(seed)
    case = Case("hyp", [torch.randn(n, generator=g)], [[torch.randn(n, generator=g)] for _ in range(steps)])
    got, _ = run_optimizer(cls, hp, case, torch.float32, "cpu")
    oracle, _ = oracle_run(cls, hp, case)
    # A sign argument within rounding of zero may flip; with random data that is rare.
    assert_close_to_oracle(got[0], oracle[0], torch.float32, steps, lr, max_flips=max(1, n // 1000),
                           what=f"{algo} {hp}")


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
def test_sign_of_zero_is_zero(backend):
    """c = 0 exactly leaves theta at theta * (1 - lr*wd): no +-lr move (DeepSpeed's GPU bug)."""
    p = torch.nn.Parameter(torch.full((5,), 2.0))
    opt = sign_kernels.Lion([p], lr=0.5, betas=(0.9, 0.99), weight_decay=0.0, backend=backend)
    p.grad = torch.zeros(5)
    opt.step()
    assert torch.equal(p.detach(), torch.full((5,), 2.0))
    s = torch.nn.Parameter(torch.full((5,), 2.0))
    opt = sign_kernels.Simba([s], lr=0.5, backend=backend)
    s.grad = torch.zeros(5)
    opt.step()
    assert torch.equal(s.detach(), torch.full((5,), 2.0))
    assert torch.equal(opt.state[s]["sign_counts"], torch.zeros(5, dtype=torch.int16))


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
def test_simba_counter_rules(backend):
    """Counters past the threshold drive the update; counters clamp at the window."""
    w, th = 4, 0.5  # T = 2
    p = torch.nn.Parameter(torch.zeros(4))
    opt = sign_kernels.Simba([p], lr=1.0, window_size=w, threshold=th, backend=backend)
    opt.step()  # no grads: nothing happens, no state
    assert not opt.state
    p.grad = torch.ones(4)
    opt.step()
    counts = opt.state[p]["sign_counts"]
    counts.copy_(torch.tensor([3, -3, 2, 4], dtype=torch.int16))
    p.data.zero_()
    p.grad = torch.tensor([-1.0, 1.0, -1.0, 1.0])
    opt.step()
    # |3| > 2: sign(s) drives (+1 -> theta -1; -1 -> +1); |2| not > 2: sign(g) = -1 -> +1.
    assert p.detach().tolist() == [-1.0, 1.0, 1.0, -1.0]
    assert counts.tolist() == [2, -2, 1, 4]  # 4 + 1 clamps at the window


@needs_cpu
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "grad-scaled"])
@pytest.mark.parametrize("window,threshold", [(8, 0.25), (32767, 0.5)])
def test_simba_every_counter_value_cpu_equals_reference(window, threshold, scaled):
    # Every int16 counter (also outside the window, as a foreign checkpoint may hold) meets
    # every kind of gradient sign (+, -, 0, NaN), in vector-width blocks: the CPU kernels'
    # 16-bit counter arithmetic must match the reference for all of them.
    counts0 = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).repeat(4)
    g = torch.cat([torch.full((65536,), v) for v in (0.75, -2.0, 0.0, float("nan"))])
    out = {}
    for backend in ("reference", "cpu"):
        p = torch.nn.Parameter(torch.linspace(-1.0, 1.0, g.numel()))
        opt = sign_kernels.Simba([p], lr=0.01, window_size=window, threshold=threshold, weight_decay=0.1,
                                 backend=backend)
        p.grad = torch.ones_like(p)
        opt.step()
        opt.state[p]["sign_counts"].copy_(counts0)
        p.grad = g.clone()
        if scaled:  # what GradScaler hands over (_step_supports_amp_scaling): g is divided by it
            p.grad.mul_(3.0)
            opt.grad_scale, opt.found_inf = torch.tensor(3.0), torch.tensor(0.0)
        opt.step()
        out[backend] = (p.detach().clone(), opt.state[p]["sign_counts"].clone())
    assert torch.equal(out["cpu"][0], out["reference"][0])
    assert torch.equal(out["cpu"][1], out["reference"][1])


def test_threshold_count():
    from sign_kernels.backends.reference import threshold_count

    assert threshold_count(128, 0.1) == 12
    assert threshold_count(10, 1.0) == 10
    assert threshold_count(1, 0.0) == 0
