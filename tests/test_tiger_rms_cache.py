"""Tiger's cached sums of squares (NOTE: [cached sums of squares] in sign_kernels/optim/tiger.py).

The op hands out the sums of squares of θ as it leaves it; the optimizer gives them back at the
next step while the param's version is unchanged. The results must be the same bits as the
step that reads θ itself (the optimizer without the cache), on every role, with accumulation,
NaN steps, skipped steps and params edited between steps.
"""

from __future__ import annotations

import os

# The Triton backend runs in its interpreter on CPU tensors unless TRITON_INTERPRET=0 is set (a
# GPU machine: compiled kernels on CUDA tensors); set before triton first decorates the kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")

from typing import List  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import sign_kernels  # noqa: E402
from sign_kernels import Tiger  # noqa: E402
from sign_kernels.optim import tiger as tiger_mod  # noqa: E402
from conftest import binade_values  # noqa: E402

_AVAILABLE = sign_kernels.available_backends()
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _device(backend: str) -> str:
    if backend == "cuda" or (backend == "triton" and not _INTERPRETED):
        return "cuda"
    return "cpu"


def _param(backend: str):
    """The backend as a test parameter: skipped, saying why, where it cannot run here (cuda
    without a GPU; triton without triton, or compiled without a GPU)."""
    reason = _AVAILABLE.get(backend)
    if reason is None and _device(backend) == "cuda" and not torch.cuda.is_available():
        reason = "no CUDA device"
    marks = [pytest.mark.skipif(True, reason=f"{backend}: {reason}")] if reason else []
    if backend == "triton":  # numpy warns about the Inf/NaN of the hard values
        marks.append(pytest.mark.filterwarnings("ignore::RuntimeWarning"))
    return pytest.param(backend, marks=marks, id=backend)


BACKENDS = [_param(b) for b in ("reference", "cpu", "triton", "cuda")]


def _small(backend: str) -> bool:
    return backend == "triton" and _INTERPRETED


def _skip_in_interpreter(backend: str, why: str) -> None:
    """The Triton interpreter takes ~0.5 s per optimizer step of _Model: cases that check the
    optimizer's cache logic (the same Python on every backend, tested on reference and cpu)
    run on the compiled kernels only (TRITON_INTERPRET=0 on a GPU)."""
    if _small(backend):
        pytest.skip(f"triton interpreter: {why}")


class _Model(nn.Module):
    """Every role; a matrix over two CPU chunks, embedding rows inside a chunk and longer than one
    (Triton: a matrix over 37 update blocks, rows inside a block, across two and across 35)."""

    def __init__(self, dtype, device="cpu", small=False):
        super().__init__()
        g = torch.Generator().manual_seed(0)

        def rnd(*shape, scale=1.0):
            return nn.Parameter((torch.randn(*shape, generator=g) * scale).to(dtype))

        # small (the Triton interpreter, ~100x slower per element): a matrix over 3 update
        # blocks, rows across 3 blocks; the same roles, events and edits.
        self.big = rnd(40, 130) if small else rnd(300, 250)  # 75000 elements: two chunks of the CPU kernels
        self.hard = nn.Parameter(binade_values(torch.float32, 512, g).reshape(16, 32).to(dtype))
        self.zero = nn.Parameter(torch.zeros(3, 3, dtype=dtype))  # RMS 0: never moves
        self.empty = nn.Parameter(torch.zeros(0, 5, dtype=dtype))
        self.embed = rnd(40, 24, scale=2.0)
        self.long_rows = rnd(2, 4500) if small else rnd(2, 70_000)  # rows longer than a chunk
        self.bias = rnd(4097)
        self.gain = nn.Parameter((1 + torch.randn(7, generator=g) * 0.1).to(dtype))
        self.to(device)

    def groups(self):
        return [
            {"params": [self.big, self.hard, self.zero, self.empty], "role": "matrix"},
            {"params": [self.embed, self.long_rows], "role": "embedding"},
            {"params": [self.bias], "role": "elementwise"},
            {"params": [self.gain], "role": "gain"},
        ]


def _grads(model, step, dtype):
    g = torch.Generator().manual_seed(100 + step)
    device = model.big.device
    out = {}
    for name, p in model.named_parameters():
        x = torch.randn(p.shape, generator=g)
        if name == "hard":
            x = binade_values(torch.float32, p.numel(), g).reshape(p.shape)
        if (step == 3 and name in ("big", "embed")) or (step == 5 and name in ("gain", "long_rows", "hard")):
            x.view(-1)[x.numel() // 2] = float("nan")  # the NaN guard fires for that tensor
        if step == 1 and name == "bias":
            x.view(-1)[::7] = 0.0
        out[name] = x.to(dtype).to(device)
    return out


def _snapshot(model, opt) -> List[torch.Tensor]:
    """Copies of every param and of every momentum the optimizer holds."""
    return ([t.detach().clone() for t in model.parameters()]
            + [opt.state[p]["exp_avg"].clone() for p in model.parameters() if p in opt.state])


def _run(backend: str, k: int, dtype, sr: bool, edits: bool = True) -> List[List[torch.Tensor]]:
    """Ten calls with edits between them; a snapshot of every param and momentum after each."""
    torch.manual_seed(0)
    model = _Model(dtype, _device(backend), small=_small(backend))
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
        snaps.append(_snapshot(model, opt))
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
    if (k == 1) != (dtype == torch.float32):
        _skip_in_interpreter(backend, "fp32 with k=1 and bf16+SR with k=4 cover its kernels")
    cached = _run(backend, k, dtype, sr)
    no_cache()
    fresh = _run(backend, k, dtype, sr)
    _assert_same(cached, fresh)


def _spy(monkeypatch):
    """Record the stats_sumsq argument of every tiger_ call."""
    calls = []
    real = tiger_mod.Tiger._op_extra

    def spy(self, group, bucket, found_inf):
        extra = real(self, group, bucket, found_inf)
        calls.append((group.get("role"), list(extra[2]) if len(extra) > 2 else None))
        return extra

    monkeypatch.setattr(tiger_mod.Tiger, "_op_extra", spy)
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_steady_steps_are_given_the_sums_and_edits_take_them_away(backend, monkeypatch):
    calls = _spy(monkeypatch)
    model = _Model(torch.float32, _device(backend), small=_small(backend))
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


def _scaled_steps(backend, found_inf, steps=4, lie_at=None, **kw):
    """Tiger on _Model under a manual GradScaler protocol: g scaled by 4, opt.grad_scale = 4 and
    opt.found_inf = `found_inf` (None: not given) every step; finite grads, but at step `lie_at`
    a NaN in `big`'s gradient that found_inf does not report. Snapshots after each step."""
    dev = _device(backend)
    model = _Model(torch.float32, dev, small=_small(backend))
    opt = Tiger(model.groups(), lr=0.05, beta=0.9, weight_decay=0.1, backend=backend, **kw)
    snaps = []
    for step in range(steps):
        grads = _grads(model, step, torch.float32)
        for name, p in model.named_parameters():
            g = torch.nan_to_num(grads[name], nan=0.5) * 4
            if step == lie_at and name == "big":
                g.view(-1)[7] = float("nan")
            p.grad = g
        opt.grad_scale = torch.tensor(4.0, device=dev)
        if found_inf is not None:
            opt.found_inf = torch.tensor(found_inf, device=dev)
        opt.step()
        snaps.append(_snapshot(model, opt))
    return model, opt, snaps


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradscaler_flag_stands_in_for_the_guard_read(backend):
    """NOTE: [GradScaler's flag as the NaN guard]: with found_inf given and 0 the op is handed
    it as every tensor's NaN count and does not read g for the guard; the same bits as the
    guard's own read (found_inf not given). Shown to be the flag, not a read: a NaN that
    found_inf does not report reaches the momentum, where the guard's read keeps it out."""
    _skip_in_interpreter(backend, "the optimizer's choice is the same Python on every backend")
    for kw in ({}, {"grad_accum_steps": 2}, {"maximize": True}):  # micro-steps; the scale negated
        _, _, flag = _scaled_steps(backend, 0.0, **kw)
        _, _, guard = _scaled_steps(backend, None, **kw)
        _assert_same(flag, guard)
    model, opt, _ = _scaled_steps(backend, 0.0, steps=2, lie_at=1)
    assert opt.state[model.big]["exp_avg"].isnan().sum().item() == 1, "the flag said no NaN: g was not read"
    model, opt, snaps = _scaled_steps(backend, None, steps=2, lie_at=1)
    assert not opt.state[model.big]["exp_avg"].isnan().any(), "no flag: the guard read g and fired"
    torch.testing.assert_close(model.big.detach(), snaps[0][0] * 0.99, rtol=0, atol=0)  # θ shrunk, as the rule says


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id in ("reference", "cpu")])
def test_gradscaler_step_gives_the_same_bits_as_the_guard(backend):
    """torch.amp.GradScaler end to end (its own inf check sets found_inf): the steps it takes equal
    the guard's (the same scale given, found_inf not), and a step with a NaN gradient is skipped."""
    runs = []
    for use_scaler in (True, False):
        model = _Model(torch.float32)
        opt = Tiger(model.groups(), lr=0.05, beta=0.9, weight_decay=0.1, backend=backend)
        scaler = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=1000)
        for step in range(4):
            opt.zero_grad()
            grads = _grads(model, step, torch.float32)
            for name in grads:  # finite after scaling: the binades up to 1e36 (GradScaler skips an inf)
                grads[name] = torch.nan_to_num(grads[name], nan=0.5).clamp(-1e36, 1e36)
            if step == 2:
                grads["embed"].view(-1)[3] = float("nan")
            if use_scaler:  # d(sum p * g)/dp = g, times the scale (a power of 2: exact)
                loss = sum((p * grads[name]).sum() for name, p in model.named_parameters())
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                assert not hasattr(opt, "found_inf"), "GradScaler removes its flag after the step"
            elif step != 2:  # the scaler skips step 2 (it found the NaN)
                for name, p in model.named_parameters():
                    p.grad = grads[name] * 8.0
                opt.grad_scale = torch.tensor(8.0)
                opt.step()
        runs.append(_snapshot(model, opt) + [opt.state[p]["step"].reshape(1).clone() for p in model.parameters()])
    _assert_same([runs[0]], [runs[1]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stale_sum_would_change_the_result(backend, no_cache):
    """The edits of _run matter: ignoring them (a cache without the version check) would differ.

    Guards the test above against edits that happen not to change the RMS."""
    _skip_in_interpreter(backend, "the edits' effect is the same on every backend")
    cached = _run(backend, 1, torch.float32, False)
    no_cache()
    unedited = _run(backend, 1, torch.float32, False, edits=False)
    assert not all(torch.equal(u, v) for u, v in zip(cached[2], unedited[2]))


def test_two_optimizers_on_one_param_see_each_others_writes():
    """The compiled op's write bumps the version: a second optimizer's cached sums go stale."""
    if _AVAILABLE["cpu"] is not None:
        pytest.skip(f"cpu: {_AVAILABLE['cpu']}")
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
        shape = (40, 130) if _small(backend) else (300, 250)
        p = nn.Parameter(torch.randn(shape).to(_device(backend)))
        tiger = Tiger([p], lr=0.05, backend=backend)
        lion = sign_kernels.Lion([p], lr=0.1, backend=backend)
        out = []
        for step in range(4):
            p.grad = torch.randn(shape, generator=torch.Generator().manual_seed(step)).to(p.device)
            tiger.step()
            lion.step()
            out.append([p.detach().clone()])
        return out

    cached = run()
    no_cache()
    _assert_same(cached, run())


# ---------------------------------------------------------------- the op's sums out, directly
# matrix over many blocks and chunks, odd matrix, element-wise (ignored), embedding rows inside
# a block, across two blocks (2049), across several (5000), long rows of a 2-d+ embedding.
_SHAPES = [(300, 250), (3, 7), (7,), (40, 24), (5, 2049), (2, 5000), (2, 2, 33)]
_ROLES = [3, 3, 0, 2, 2, 2, 2]
_SENTINEL = -7.0


def _op_case(backend, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    dev = _device(backend)
    ps = [(torch.randn(s, generator=g) * 3).to(dtype).to(dev) for s in _SHAPES]
    gs = [torch.randn(s, generator=g).to(dtype).to(dev) for s in _SHAPES]
    gs[1].view(-1)[4] = float("nan")  # the NaN guard: θ shrinks, its sums are of the shrunk θ
    ms = [torch.zeros(s, dtype=dtype, device=dev) for s in _SHAPES]
    at, size = [], 0
    for s, r in zip(_SHAPES, _ROLES):
        at.append(size)  # the element-wise tensor too: it must be ignored
        size += torch.Size(s).numel() // s[-1] if r == 2 else 1
    return ps, gs, ms, at, size


def _tiger(backend, ps, gs, ms, step, k=1, found_inf=None, **kw):
    fn = sign_kernels.backends.get(backend).fn("tiger_")
    steps = [torch.tensor(step, device=p.device) for p in ps]
    fn(ps, gs, ms, steps, _ROLES, 0.05, None, 0.9, 0.1, k, 0.99, None, found_inf, list(range(len(ps))), False, **kw)


def _sums(backend, ps, gs, ms, at, size, step, k=1, found_inf=None, out=None, **kw):
    if out is None:
        out = torch.full((size,), _SENTINEL, dtype=torch.float64, device=ps[0].device)
    _tiger(backend, ps, gs, ms, step, k, found_inf, sumsq_out=out, sumsq_out_at=at, **kw)
    return out


def _bits(x):
    return x.cpu().view(torch.int64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sums_out_are_the_sums_a_read_of_theta_gives(backend, dtype):
    """The write pass's sums (update, NaN guard) equal, bit for bit, those the backend's read of θ
    gives: a step GradScaler skips, and an accumulation micro-step (θ not written, sums read)."""
    ps, gs, ms, at, size = _op_case(backend, dtype)
    written = _sums(backend, ps, gs, ms, at, size, step=0)
    gs[1].view(-1)[4] = 0.0  # no NaN guard below: θ is not written there
    assert _bits(written)[at[2]] == _bits(torch.tensor(_SENTINEL, dtype=torch.float64)), "element-wise: no sums"
    before = [p.clone() for p in ps]
    skipped = _sums(backend, ps, gs, ms, at, size, step=1, found_inf=torch.tensor(1.0, device=ps[0].device))
    assert all(torch.equal(a, b) for a, b in zip(before, ps)), "a skipped step writes nothing"
    assert torch.equal(_bits(skipped), _bits(written))
    micro = _sums(backend, ps, gs, ms, at, size, step=0, k=2)  # t = 0, k = 2: θ not written
    assert all(torch.equal(a, b) for a, b in zip(before, ps))
    assert torch.equal(_bits(micro), _bits(written))
    # and both are the sums of θ (the reference's, up to the summation order)
    ref = torch.cat([(p.double() ** 2).reshape(-1, p.shape[-1]).sum(1) if r == 2 else (p.double() ** 2).sum().reshape(1)
                     for p, r in zip(ps, _ROLES)]).cpu()
    keep = torch.tensor([i != at[2] for i in range(size)])
    torch.testing.assert_close(written.cpu()[keep], ref[keep], rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_sums_out_on_misaligned_and_multi_chunk_tensors(backend, dtype):
    """Layouts the kernels take other paths for: every buffer one element past an aligned
    address (scalar paths), embedding rows of 1001 over several chunks (row-aligned chunk starts
    that are not 16-byte aligned), a matrix over several chunks, an empty matrix (its entry is
    left as it is), rows longer than a block; fp16. The sums out of an update equal, bit for bit, the backend's own read of
    θ (a skipped step, its found_inf a host tensor), and the fp64 sums of θ up to rounding."""
    small = _small(backend)
    shapes = [(20 if small else 70, 1001), (40, 130) if small else (300, 250), (3, 7), (0, 5), (2, 5000)]
    roles = [2, 3, 3, 3, 2]
    dev = _device(backend)
    g = torch.Generator().manual_seed(5)

    def misaligned(x):
        base = torch.empty(x.numel() + 1, dtype=dtype, device=dev)
        view = base[1:].view(x.shape)
        view.copy_(x)
        return view

    ps = [misaligned(torch.randn(sh, generator=g) * 2) for sh in shapes]
    gs = [misaligned(torch.randn(sh, generator=g)) for sh in shapes]
    ms = [misaligned(torch.randn(sh, generator=g) * 0.1) for sh in shapes]
    at, size = [], 0
    for sh, r in zip(shapes, roles):
        at.append(size)
        size += torch.Size(sh).numel() // sh[-1] if r == 2 else 1
    fn = sign_kernels.backends.get(backend).fn("tiger_")

    def call(found_inf=None):
        out = torch.full((size,), _SENTINEL, dtype=torch.float64, device=dev)
        steps = [torch.tensor(0, device=dev) for _ in ps]
        fn(ps, gs, ms, steps, roles, 0.05, None, 0.9, 0.1, 1, 0.99, None, found_inf, list(range(len(ps))), False,
           sumsq_out=out, sumsq_out_at=at)
        return out

    written = call()
    before = [p.clone() for p in ps]
    read = call(found_inf=torch.tensor(1.0))  # skipped: nothing written, the sums read from θ
    assert all(torch.equal(a, b) for a, b in zip(before, ps)), "a skipped step writes nothing"
    assert torch.equal(_bits(written), _bits(read))
    assert written[at[3]].item() == _SENTINEL, "an empty tensor's entry is left as it is"
    ref = torch.cat([(p.double() ** 2).reshape(-1, p.shape[-1]).sum(1) if r == 2 else (p.double() ** 2).sum().reshape(1)
                     for p, r in zip(ps, roles)]).cpu()
    keep = torch.arange(size) != at[3]
    torch.testing.assert_close(written.cpu()[keep], ref[keep], rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_given_sums_in_place_stay_while_theta_is_not_written(backend):
    """sumsq_out is stats and each tensor's sums are the given ones: kept on a micro-step (even
    when they are not θ's: they are the caller's), rewritten when θ is written."""
    ps, gs, ms, at, size = _op_case(backend, torch.float32)
    gs[1].view(-1)[4] = 0.0  # no NaN guard: θ is not written on the micro-step
    n = [p.shape[-1] if r == 2 else p.numel() for p, r in zip(ps, _ROLES)]
    stats = torch.full((size,), 5.0, dtype=torch.float64, device=ps[0].device)
    kw = dict(stats=stats, stats_nan=[-1] * len(ps), stats_sumsq=at, stats_n=n)
    _sums(backend, ps, gs, ms, at, size, step=0, k=2, out=stats, **kw)
    assert torch.equal(stats.cpu(), torch.full((size,), 5.0, dtype=torch.float64))
    _sums(backend, ps, gs, ms, at, size, step=1, k=2, out=stats, **kw)  # the window's last: θ written
    read = _sums(backend, ps, gs, ms, at, size, step=1, found_inf=torch.tensor(1.0, device=ps[0].device))
    keep = torch.tensor([i != at[2] for i in range(size)])
    assert torch.equal(_bits(stats)[keep], _bits(read)[keep])


@pytest.mark.parametrize("backend", BACKENDS)
def test_sums_out_arguments_are_checked(backend):
    ps, gs, ms, at, size = _op_case(backend, torch.float32)
    dev = ps[0].device
    out = torch.zeros(size, dtype=torch.float64, device=dev)
    errors = (ValueError, RuntimeError)
    with pytest.raises(errors, match="given together or not at all"):
        _tiger(backend, ps, gs, ms, 0, sumsq_out=out)
    with pytest.raises(errors, match="sumsq_out must be a"):
        _tiger(backend, ps, gs, ms, 0, sumsq_out=out.float(), sumsq_out_at=at)
    with pytest.raises(errors, match="sumsq_out_at.*entr"):
        _tiger(backend, ps, gs, ms, 0, sumsq_out=out, sumsq_out_at=at[:-1])
    bad = list(at)
    bad[3] = size - 2  # 40 rows do not fit there
    with pytest.raises(errors, match=r"sumsq_out_at\[3\] = .* is neither -1 nor the start of 40 entries"):
        _tiger(backend, ps, gs, ms, 0, sumsq_out=out, sumsq_out_at=bad)
    bad[3] = 2**63 - 1  # index + count overflows int64: must still be refused
    with pytest.raises(errors, match=r"sumsq_out_at\[3\] = .* is neither -1 nor the start of 40 entries"):
        _tiger(backend, ps, gs, ms, 0, sumsq_out=out, sumsq_out_at=bad)


def test_triton_sums_out_are_its_pre_pass_sums():
    """Triton: the update's sums out equal what the next call's own pre-pass computes from θ
    (read from the launcher's statistics buffers), bit for bit (NOTE: [Triton sums of squares])."""
    backend = "triton"
    if _AVAILABLE[backend] is not None or (_device(backend) == "cuda" and not torch.cuda.is_available()):
        pytest.skip(f"triton: {_AVAILABLE[backend] or 'no CUDA device'}")
    from sign_kernels.triton import _launch as L
    from sign_kernels.triton import _kernels as K

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        ps, gs, ms, at, size = _op_case(backend, dtype, seed=1)
        out = _sums(backend, ps, gs, ms, at, size, step=0)
        _tiger(backend, ps, gs, ms, 0)  # reads θ for its RMS
        plan = next(reversed(L._plans.values()))
        row_sumsq, t_sumsq = plan.stats[0].cpu(), plan.stats[6].cpu()
        table = plan.tensors.reshape(len(ps), -1).cpu()
        for i, (p, r) in enumerate(zip(ps, _ROLES)):
            if r == 3:
                pre = t_sumsq[i:i + 1]
            elif r == 2:
                slot, rows = int(table[i, K.F_SLOT.value]), p.numel() // p.shape[-1]
                pre = row_sumsq[slot:slot + rows]
            else:
                continue
            assert torch.equal(_bits(out[at[i]:at[i] + pre.numel()]), _bits(pre)), f"{dtype}, tensor {i}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_the_version_check_the_cache_would_be_stale(backend, monkeypatch, no_cache):
    """test_cached_sums_give_the_same_bits fails when the cache ignores the param versions."""
    _skip_in_interpreter(backend, "the version check is the same Python on every backend")
    monkeypatch.setattr(tiger_mod.Tiger, "_sums_valid", staticmethod(
        lambda entry, bucket: [at >= 0 and seen is not None for at, seen in zip(entry.at, entry.seen)]))
    stale = _run(backend, 1, torch.float32, False)
    no_cache()
    fresh = _run(backend, 1, torch.float32, False)
    assert not all(torch.equal(u, v) for a, b in zip(stale, fresh) for u, v in zip(a, b))

@pytest.fixture
def cpu_window():
    """Set the CPU Tiger kernel's window (NOTE: [Tiger windows]); restored afterwards."""
    if _AVAILABLE.get("cpu") is not None:
        pytest.skip(f"cpu: {_AVAILABLE['cpu']}")
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


_ISA_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from conftest import binade_values
from sign_kernels import _C
g = torch.Generator().manual_seed(1)
xs = [binade_values(torch.float32, 65540, g).reshape(-1, 5), torch.randn(300, 250, generator=g),
      torch.randn(70, 1001, generator=g) * 1e-20, torch.randn(3, 70000, generator=g) * 1e19]
roles = [3, 3, 2, 2]
at, size = [], 0
for x, r in zip(xs, roles):
    at.append(size)
    size += x.numel() // x.shape[-1] if r == 2 else 1
digest = []
for found_inf in (None, torch.tensor(1.0)):  # the update's fused sums; a skipped step's read of theta
    ps = [x.clone() for x in xs]
    gs = [torch.randn(x.shape, generator=torch.Generator().manual_seed(2)) for x in xs]
    ms = [torch.zeros(x.shape) for x in xs]
    out = torch.full((size,), -1.0, dtype=torch.float64)
    torch.ops.sign_kernels.tiger_(ps, gs, ms, [torch.tensor(0) for _ in ps], roles, 0.05, None, 0.9, 0.1, 1,
                                  0.99, None, found_inf, [0, 1, 2, 3], False, sumsq_out=out, sumsq_out_at=at)
    digest.append(out.view(torch.int64).tolist())
    digest.append([p.view(torch.int32).sum().item() for p in ps] + [m.view(torch.int32).sum().item() for m in ms])
print(_C.cpu_isa())
print(digest)
"""


@pytest.mark.skipif(_AVAILABLE.get("cpu") is not None, reason=f"cpu: {_AVAILABLE.get('cpu')}")
def test_cpu_sums_are_the_same_bits_on_every_instruction_set():
    """The CPU kernels' variants (baseline, AVX2, AVX-512 with its FMA sums: add_square in
    sign_cpu_kernels.inc) give the same sums of squares and the same θ and m, extreme binades
    included; each in a process of its own (SIGN_KERNELS_CPU_ISA picks the variant at import)."""
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    results = {}
    for isa in ("baseline", "avx2", ""):
        env = dict(os.environ, SIGN_KERNELS_CPU_ISA=isa)
        run = subprocess.run([sys.executable, "-c", _ISA_SCRIPT, here], env=env, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        name, digest = run.stdout.strip().splitlines()[-2:]
        results[name] = digest
    if len(results) < 2:
        pytest.skip(f"only {sorted(results)} runs on this CPU")
    assert len(set(results.values())) == 1, f"the variants differ: {sorted(results)}"
