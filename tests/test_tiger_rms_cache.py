"""Tiger's cached sums of squares (NOTE: [cached sums of squares] in sign_kernels/optim/tiger.py).

The op hands out the sums of squares of θ as it leaves it; the optimizer gives them back at the
next step while the param's version is unchanged. The results must be the same bits as the
step that reads θ itself (the optimizer without the cache), on every role, with accumulation,
NaN steps, skipped steps and params edited between steps.
"""

from __future__ import annotations

from typing import List

import pytest
import torch
from torch import nn

import sign_kernels
from sign_kernels import Tiger
from sign_kernels.optim import tiger as tiger_mod
from conftest import binade_values

BACKENDS = ["reference"] + (["cpu"] if "cpu" in sign_kernels.available_backends() else [])


class _Model(nn.Module):
    """Every role; a matrix over two CPU chunks, embedding rows inside a chunk and longer than one."""

    def __init__(self, dtype):
        super().__init__()
        g = torch.Generator().manual_seed(0)

        def rnd(*shape, scale=1.0):
            return nn.Parameter((torch.randn(*shape, generator=g) * scale).to(dtype))

        self.big = rnd(300, 250)  # 75000 elements: two chunks of the CPU kernels
        self.hard = nn.Parameter(binade_values(torch.float32, 512, g).reshape(16, 32).to(dtype))
        self.zero = nn.Parameter(torch.zeros(3, 3, dtype=dtype))  # RMS 0: never moves
        self.empty = nn.Parameter(torch.zeros(0, 5, dtype=dtype))
        self.embed = rnd(40, 24, scale=2.0)
        self.long_rows = rnd(2, 70_000)  # rows longer than a chunk
        self.bias = rnd(4097)
        self.gain = nn.Parameter((1 + torch.randn(7, generator=g) * 0.1).to(dtype))

    def groups(self):
        return [
            {"params": [self.big, self.hard, self.zero, self.empty], "role": "matrix"},
            {"params": [self.embed, self.long_rows], "role": "embedding"},
            {"params": [self.bias], "role": "elementwise"},
            {"params": [self.gain], "role": "gain"},
        ]


def _grads(model, step, dtype):
    g = torch.Generator().manual_seed(100 + step)
    out = {}
    for name, p in model.named_parameters():
        x = torch.randn(p.shape, generator=g)
        if name == "hard":
            x = binade_values(torch.float32, p.numel(), g).reshape(p.shape)
        if (step == 3 and name in ("big", "embed")) or (step == 5 and name in ("gain", "long_rows", "hard")):
            x.view(-1)[x.numel() // 2] = float("nan")  # the NaN guard fires for that tensor
        if step == 1 and name == "bias":
            x.view(-1)[::7] = 0.0
        out[name] = x.to(dtype)
    return out


def _run(backend: str, k: int, dtype, sr: bool, edits: bool = True) -> List[List[torch.Tensor]]:
    """Ten calls with edits between them; a snapshot of every param and momentum after each."""
    torch.manual_seed(0)
    model = _Model(dtype)
    opt = Tiger(model.groups(), lr=0.05, beta=0.9, weight_decay=0.1, grad_accum_steps=k, backend=backend,
                stochastic_rounding=sr, seed=3)
    snaps = []
    for step in range(10):
        for name, p in model.named_parameters():
            p.grad = _grads(model, step, dtype)[name]
        if step == 8:  # GradScaler found an inf: nothing changes
            opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(1.0)
        elif step == 9:
            opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(0.0)
        opt.step()
        snaps.append([t.detach().clone() for t in model.parameters()]
                     + [opt.state[p]["exp_avg"].clone() for p in model.parameters() if p in opt.state])
        if not edits:
            continue
        with torch.no_grad():
            if step == 1:
                model.big.mul_(1.25)  # in place, under no_grad
                model.embed[3].zero_()  # through a view
            elif step == 3:
                sd = {k_: v.clone() * 0.75 for k_, v in model.state_dict().items()}
                model.load_state_dict(sd)  # copy_ into every param
            elif step == 5:
                opt.load_state_dict(opt.state_dict())  # the optimizer's own checkpoint
                model.hard.data = model.hard.data * 2  # a new tensor behind the param
            elif step == 6:
                model.long_rows.add_(1.0)
            elif step == 7:  # before the skipped step: its sums are read from θ there
                model.big.add_(0.5)
                model.embed.mul_(0.5)
    return snaps


def _assert_same(a, b):
    assert len(a) == len(b)
    for step, (xa, xb) in enumerate(zip(a, b)):
        for i, (u, v) in enumerate(zip(xa, xb)):
            assert u.dtype == v.dtype and u.shape == v.shape
            assert torch.equal(u.view(torch.uint8) if u.numel() else u, v.view(torch.uint8) if v.numel() else v), \
                f"call {step}, tensor {i}: cached RMS differs from the RMS read from θ"


@pytest.fixture
def no_cache(monkeypatch):
    """The optimizer as before issue 15: the op reads θ for every RMS."""

    def off():
        monkeypatch.setattr(tiger_mod.Tiger, "_sumsq_entry", lambda self, group, bucket: None)

    return off


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("dtype,sr", [(torch.float32, False), (torch.bfloat16, True)], ids=["fp32", "bf16-sr"])
def test_cached_sums_give_the_same_bits(backend, k, dtype, sr, no_cache):
    cached = _run(backend, k, dtype, sr)
    no_cache()
    fresh = _run(backend, k, dtype, sr)
    _assert_same(cached, fresh)


def _spy(monkeypatch):
    """Record the stats_sumsq argument of every tiger_ call."""
    calls = []
    real = tiger_mod.Tiger._op_extra

    def spy(self, group, bucket):
        extra = real(self, group, bucket)
        calls.append((group.get("role"), list(extra[2]) if len(extra) > 2 else None))
        return extra

    monkeypatch.setattr(tiger_mod.Tiger, "_op_extra", spy)
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_steady_steps_are_given_the_sums_and_edits_take_them_away(backend, monkeypatch):
    calls = _spy(monkeypatch)
    model = _Model(torch.float32)
    opt = Tiger(model.groups(), lr=0.05, backend=backend)

    def step():
        calls.clear()
        for name, p in model.named_parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        return dict(calls)

    first = step()
    assert first["matrix"] == [-1, -1, -1, -1] and first["embedding"] == [-1, -1]
    second = step()
    assert second["matrix"] == [0, 1, 2, -1]  # the empty matrix has no sums
    assert second["embedding"] == [0, 40]
    with torch.no_grad():
        model.hard.mul_(2.0)
    third = step()
    assert third["matrix"] == [0, -1, 2, -1] and third["embedding"] == [0, 40]
    model.load_state_dict(model.state_dict())
    assert step()["embedding"] == [-1, -1]
    model.big.data.mul_(3.0)  # bypasses the version counter: the documented escape hatch
    opt.forget_rms()
    assert step()["matrix"] == [-1, -1, -1, -1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stale_sum_would_change_the_result(backend, no_cache):
    """The edits of _run matter: ignoring them (a cache without the version check) would differ.

    Guards the test above against edits that happen not to change the RMS."""
    cached = _run(backend, 1, torch.float32, False)
    no_cache()
    unedited = _run(backend, 1, torch.float32, False, edits=False)
    assert not all(torch.equal(u, v) for u, v in zip(cached[2], unedited[2]))


def test_two_optimizers_on_one_param_see_each_others_writes():
    """The compiled op's write bumps the version: a second optimizer's cached sums go stale."""
    if "cpu" not in BACKENDS:
        pytest.skip("the compiled CPU kernels are not built")
    p = nn.Parameter(torch.randn(64, 64))
    a = Tiger([p], lr=0.1, backend="cpu")
    b = Tiger([p], lr=0.1, backend="cpu")
    q = nn.Parameter(p.detach().clone())
    ref_a = Tiger([q], lr=0.1, backend="cpu")
    ref_b = Tiger([q], lr=0.1, backend="cpu")
    for o in (a, b, ref_a, ref_b):
        o.forget_rms()
    for step in range(3):
        g = torch.randn(64, 64, generator=torch.Generator().manual_seed(step))
        p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
        ref_a.step()
        ref_a.forget_rms()
        ref_b.step()
        ref_b.forget_rms()
        assert torch.equal(p, q), f"step {step}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_another_optimizer_writing_the_param_in_between(backend, no_cache):
    """Lion (compiled kernels, raw pointers) steps θ between Tiger's steps: Tiger must see it."""
    def run():
        torch.manual_seed(0)
        p = nn.Parameter(torch.randn(300, 250))
        tiger = Tiger([p], lr=0.05, backend=backend)
        lion = sign_kernels.Lion([p], lr=0.1, backend=backend)
        out = []
        for step in range(4):
            p.grad = torch.randn(300, 250, generator=torch.Generator().manual_seed(step))
            tiger.step()
            lion.step()
            out.append([p.detach().clone()])
        return out

    cached = run()
    no_cache()
    _assert_same(cached, run())


@pytest.fixture
def cpu_window():
    """Set the CPU Tiger kernel's window (NOTE: [Tiger windows]); restored afterwards."""
    if "cpu" not in BACKENDS:
        pytest.skip("the compiled CPU kernels are not built")
    from sign_kernels import _C

    old = _C.cpu_tiger_window()
    yield lambda n: _C.cpu_tiger_window(n)
    _C.cpu_tiger_window(old)


@pytest.mark.parametrize("window", [1, 600, 80_000])
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("dtype,sr", [(torch.float32, False), (torch.bfloat16, True)], ids=["fp32", "bf16-sr"])
def test_cpu_windows_give_the_same_bits(window, k, dtype, sr, cpu_window):
    """The CPU kernel runs its two passes window by window; where the list is cut must not
    matter (every role, NaN steps, a skipped step, edits, given and computed sums)."""
    whole = _run("cpu", k, dtype, sr)  # the default window holds each call's whole list
    assert cpu_window(window) == 1 << 20
    _assert_same(whole, _run("cpu", k, dtype, sr))
