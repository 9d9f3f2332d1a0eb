"""Gradient clipping inside the step (``max_grad_norm``; docs/rules.md "Clipping inside the step").

The op side (``clip`` on every update op, the norm pass ``sumsq_``) against the reference and
against clip-then-step; the optimizer side against ``torch.nn.utils.clip_grad_norm_``, with
the rules for non-finite norms, GradScaler, maximize, Tiger's guard and accumulation,
step_in_backward and checkpoints. Sharded runs: tests/_sharded_cases.py (case_*_clip).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

import sign_kernels as sk
from sign_kernels import backends as _backends
from sign_kernels.backends import reference as ref
from sign_kernels.backends.reference import ROLE_ELEMENTWISE, ROLE_EMBEDDING, ROLE_MATRIX

from conftest import bits_equal

BACKENDS = ["reference"] + (["cpu"] if sk.available_backends()["cpu"] is None else [])
KINDS = ("lion", "tiger", "simba")


def _op_call(backend: str, kind: str, params, grads, states, steps, clip=None, grad_scale=None, found_inf=None):
    fn = _backends.get(backend).fn(f"{kind}_")
    n = len(params)
    kw = {} if clip is None else {"clip": clip}
    if kind == "lion":
        fn(params, grads, states, steps, 1e-2, None, 0.9, 0.99, 0.1, grad_scale, found_inf, [0] * n, False, **kw)
    elif kind == "simba":
        fn(params, grads, states, steps, 1e-2, None, 8, 2, 0.1, grad_scale, found_inf, [0] * n, False, **kw)
    else:
        roles = [ROLE_MATRIX, ROLE_EMBEDDING, ROLE_ELEMENTWISE][:n]
        fn(params, grads, states, steps, roles, 1e-2, None, 0.9, 0.01, 1, 0.99, grad_scale, found_inf,
           [0] * n, False, **kw)


def _tensors(kind: str, dtype=torch.float32, gdtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(33, 17), (9, 40), (70001,)]
    params = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(gdtype or dtype) for s in shapes]
    if kind == "simba":
        states = [torch.randint(-8, 9, s, generator=gen, dtype=torch.int16) for s in shapes]
    else:
        states = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    grads[0][0, :3] = 0.0  # exact zeros: sign(0) = 0 paths
    steps = [torch.tensor(3, dtype=torch.int64) for _ in shapes]
    return params, grads, states, steps


def _clone(ts):
    return [t.clone() for t in ts]


# ------------------------------------------------------------------ the ops
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("coef", [0.37, 1.0, 2.0 ** -20, 0.0])
def test_clip_equals_clip_then_step_fp32(backend, kind, coef):
    """Given the same coefficient, the step equals g.mul_(coef) then the unclipped step, bit for bit."""
    params, grads, states, steps = _tensors(kind)
    c = torch.tensor(coef, dtype=torch.float32)
    p1, s1 = _clone(params), _clone(states)
    _op_call(backend, kind, p1, grads, s1, steps, clip=c)
    p2, s2 = _clone(params), _clone(states)
    _op_call(backend, kind, p2, [g.clone().mul_(c) for g in grads], s2, steps)
    for a, b in zip(p1 + s1, p2 + s2):
        assert bits_equal(a, b)
    p3, s3 = _clone(params), _clone(states)
    _op_call(backend, kind, p3, grads, s3, steps)
    unchanged = all(bits_equal(a, b) for a, b in zip(p1 + s1, p3 + s3))
    # The coefficient matters (the test can fail), except for Simba, whose update reads only
    # sign(g): a positive coefficient changes nothing there (docs/rules.md).
    assert unchanged == (coef == 1.0 or (kind == "simba" and coef > 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_clip_with_grad_scale_divides_then_multiplies(backend, kind):
    """(g / grad_scale) * clip, each rounded: the bits of unscale_ then clip_grad_norm_'s mul_."""
    params, grads, states, steps = _tensors(kind, seed=1)
    scale, c = torch.tensor(3.0), torch.tensor(0.61)
    p1, s1 = _clone(params), _clone(states)
    _op_call(backend, kind, p1, grads, s1, steps, clip=c, grad_scale=scale)
    p2, s2 = _clone(params), _clone(states)
    _op_call(backend, kind, p2, [(g / scale).mul_(c) for g in grads], s2, steps)
    for a, b in zip(p1 + s1, p2 + s2):
        assert bits_equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_gradients_are_clipped_in_fp32_before_the_sign(kind):
    """bf16 gradients: the coefficient multiplies the fp32 value of g in registers (no bf16
    rounding of g * clip, which clip_grad_norm_'s in-place mul_ on a bf16 grad would do)."""
    if "cpu" not in BACKENDS:
        pytest.skip("the compiled CPU kernels are not built")
    params, grads, states, steps = _tensors(kind, dtype=torch.bfloat16, seed=2)
    c = torch.tensor(0.3)
    p1, s1 = _clone(params), _clone(states)
    _op_call("cpu", kind, p1, grads, s1, steps, clip=c)
    # The same rule spelled out: fp32 gradients g.float() * c, rounded once to fp32.
    p2, s2 = _clone(params), _clone(states)
    _op_call("cpu", kind, p2, [g.float() * c for g in grads], s2, steps)
    for a, b in zip(p1 + s1, p2 + s2):
        assert bits_equal(a, b)
    p3, s3 = _clone(params), _clone(states)
    _op_call("reference", kind, p3, grads, s3, steps, clip=c)
    for a, b in zip(p1 + s1, p3 + s3):
        assert bits_equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiger_guard_sees_the_clipped_gradient(backend):
    params, grads, states, steps = _tensors("tiger", seed=3)
    grads[1][2, 5] = float("nan")
    p1, s1 = _clone(params), _clone(states)
    _op_call(backend, "tiger", p1, grads, s1, steps, clip=torch.tensor(0.5))
    assert bits_equal(s1[1], states[1])  # the guard kept m
    assert bits_equal(p1[1], params[1] * torch.tensor(0.99))  # and shrank θ (centre 0)
    assert not bits_equal(p1[0], params[0])


# ------------------------------------------------------------------ the norm pass
def _sumsq(backend, tensors, scale=None):
    out = torch.full((len(tensors),), -1.0, dtype=torch.float64)
    _backends.get(backend).sumsq_(tensors, scale, out)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sumsq_against_fp64(backend, dtype):
    gen = torch.Generator().manual_seed(4)
    sizes = [0, 1, 15, 16, 17, 65535, 65536, 65537, 300001]
    tensors = [(torch.randn(n, generator=gen) * 10.0 ** (i - 4)).to(dtype) for i, n in enumerate(sizes)]
    for scale in (None, torch.tensor(3.0)):
        got = _sumsq(backend, tensors, scale)
        want = torch.stack([((t.float() / (scale if scale is not None else 1.0)).double() ** 2).sum() for t in tensors])
        assert got[0] == 0.0
        torch.testing.assert_close(got, want, rtol=1e-13, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sumsq_bits_depend_on_the_tensor_alone(backend):
    """The same tensor gives the same bits alone, with other tensors, at another position or
    thread count: the order is fixed by its length (NOTE: [norm pass order])."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(200003, generator=gen)
    others = [torch.randn(n, generator=gen) for n in (7, 65536, 1000)]
    alone = _sumsq(backend, [x])[0]
    mixed = _sumsq(backend, [others[0], x, others[1], others[2]])[1]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _sumsq(backend, [others[1], x])[1]
    finally:
        torch.set_num_threads(threads)
    assert alone.item() == mixed.item() == single.item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sumsq_nan_and_inf(backend):
    a, b, c = torch.randn(1000), torch.randn(70000), torch.randn(5)
    b[123] = float("inf")
    c[4] = float("nan")
    got = _sumsq(backend, [a, b, c, torch.empty(0)])
    assert math.isfinite(got[0]) and got[1] == math.inf and math.isnan(got[2]) and got[3] == 0.0
    b[5] = float("nan")
    assert math.isnan(_sumsq(backend, [b])[0])
    assert _sumsq(backend, [torch.full((10,), 3e38)])[0] == pytest.approx(10 * 9e76)  # no fp32 overflow


def test_sumsq_bad_arguments():
    if "cpu" not in BACKENDS:
        pytest.skip("the compiled CPU kernels are not built")
    op = _backends.get("cpu").sumsq_
    with pytest.raises(RuntimeError, match="out has 1 entries for 2 tensors"):
        op([torch.ones(3), torch.ones(2)], None, torch.zeros(1, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="float64"):
        op([torch.ones(3)], None, torch.zeros(1))
    with pytest.raises(RuntimeError, match="share a dtype"):
        op([torch.ones(3), torch.ones(2, dtype=torch.bfloat16)], None, torch.zeros(2, dtype=torch.float64))


# ------------------------------------------------------------------ the optimizers
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 12)
        self.lin = nn.Linear(12, 24)
        self.norm = nn.LayerNorm(24)
        self.out = nn.Linear(24, 5)


def _make(kind, net, backend, **kw):
    if kind == "lion":
        return sk.Lion(net.parameters(), lr=1e-2, weight_decay=0.1, backend=backend, **kw)
    if kind == "simba":
        return sk.Simba(net.parameters(), lr=1e-2, window_size=8, threshold=0.25, backend=backend, **kw)
    return sk.Tiger(sk.tiger_param_groups(net), lr=1e-2, backend=backend, **kw)


def _pair(seed=0):
    torch.manual_seed(seed)
    a = Net()
    b = Net()
    b.load_state_dict(a.state_dict())
    return a, b


def _grads(net, t, scale=1.0):
    gen = torch.Generator().manual_seed(100 + t)
    return [torch.randn(p.shape, generator=gen) * scale for p in net.parameters()]


def _set(net, grads):
    for p, g in zip(net.parameters(), grads):
        p.grad = g.clone()


def _same(a, b):
    return all(bits_equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_norm_and_step_against_clip_grad_norm(backend, kind):
    """grad_norm within 1e-6 of clip_grad_norm_'s; the step is clip_grad_norm_'s coefficient
    (torch's expression on our norm) applied with mul_, then the unclipped step, bit for bit;
    below the max it is the unclipped step; p.grad is left as it was."""
    a, b = _pair()
    max_norm = 2.0
    oa = _make(kind, a, backend, max_grad_norm=max_norm)
    ob = _make(kind, b, backend)
    clipped = 0
    for t in range(6):
        scale = 1.0 if t % 2 else 0.01  # total norms ~20 (clipped) and ~0.2 (not)
        grads = _grads(a, t, scale)
        _set(a, grads)
        _set(b, grads)
        oa.step()
        assert all(bits_equal(p.grad, g) for p, g in zip(a.parameters(), grads))
        assert oa.grad_norm.dtype == torch.float32 and oa.grad_norm.dim() == 0
        total = torch.nn.utils.clip_grad_norm_([q for q in b.parameters()], float("inf"))  # the norm only
        assert abs(oa.grad_norm.item() - total.item()) <= 1e-6 * total.item()
        coef = torch.clamp(max_norm / (oa.grad_norm + 1e-6), max=1.0)
        clipped += bool(coef < 1)
        for q in b.parameters():
            q.grad.mul_(coef)
        ob.step()
        assert _same(a, b), (kind, t)
    assert clipped == 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["lion", "tiger"])
def test_clipping_changes_the_run(backend, kind):
    """The test above can fail: without the coefficient the runs part."""
    a, b = _pair()
    oa, ob = _make(kind, a, backend, max_grad_norm=0.5), _make(kind, b, backend)
    for t in range(3):
        g = _grads(a, t)
        _set(a, g)
        _set(b, g)
        oa.step()
        ob.step()
    assert not _same(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["lion", "simba"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_norm_skips_lion_and_simba(backend, kind, bad):
    a, _ = _pair()
    opt = _make(kind, a, backend, max_grad_norm=1.0)
    _set(a, _grads(a, 0))
    opt.step()
    before = [p.detach().clone() for p in a.parameters()]
    state = {k: v.clone() for k, v in opt.state[a.lin.weight].items()}
    g = _grads(a, 1)
    g[1][0, 0] = bad  # lin.weight
    _set(a, g)
    opt.step()
    assert all(bits_equal(p, q) for p, q in zip(a.parameters(), before))
    for k, v in opt.state[a.lin.weight].items():
        assert bits_equal(v, state[k]), k  # the step count did not advance either
    assert math.isnan(opt.grad_norm.item()) if bad != bad else opt.grad_norm.item() == math.inf


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiger_nan_tensor_takes_the_guard_and_the_others_their_own_norm(backend):
    """Tiger keeps its per-tensor NaN rule: the NaN tensor shrinks, the others are clipped
    with the norm of the tensors without NaN (the same as a run that never saw the NaN tensor)."""
    a, b = _pair()
    oa = sk.Tiger([{"params": [a.lin.weight], "role": "matrix"}, {"params": [a.out.weight], "role": "matrix"}],
                  lr=1e-2, backend=backend, max_grad_norm=1.0)
    ob = sk.Tiger([{"params": [b.out.weight], "role": "matrix"}], lr=1e-2, backend=backend, max_grad_norm=1.0)
    w = a.lin.weight.detach().clone()
    ga = torch.randn(a.lin.weight.shape)
    ga[1, 1] = float("nan")
    go = torch.randn(a.out.weight.shape) * 3
    a.lin.weight.grad, a.out.weight.grad, b.out.weight.grad = ga, go.clone(), go.clone()
    oa.step()
    ob.step()
    assert bits_equal(a.lin.weight, w * torch.tensor(0.99))
    assert bits_equal(a.out.weight, b.out.weight)
    assert math.isnan(oa.grad_norm.item())
    # An infinity (no NaN) makes the others' norm infinite: the whole step is skipped.
    before = [a.lin.weight.detach().clone(), a.out.weight.detach().clone()]
    ga = torch.randn(a.lin.weight.shape)
    ga[0, 0] = float("nan")
    go = torch.randn(a.out.weight.shape)
    go[0, 0] = float("inf")
    a.lin.weight.grad, a.out.weight.grad = ga, go
    oa.step()
    assert bits_equal(a.lin.weight, before[0]) and bits_equal(a.out.weight, before[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiger_with_clipping_does_not_read_g_for_the_guard(backend, monkeypatch):
    """The norm pass is where the guard looks: every tensor's NaN flag is given to the op."""
    seen = []
    real = _backends.get(backend)

    def spy(*args, **kwargs):
        seen.append(kwargs.get("stats_nan", args[15 + 1] if len(args) > 16 else None))
        return real.tiger_(*args, **kwargs)

    monkeypatch.setitem(_backends._BACKENDS, backend, dataclasses.replace(real, tiger_=spy))
    a, _ = _pair()
    opt = _make("tiger", a, backend, max_grad_norm=1.0)
    for t in range(2):
        _set(a, _grads(a, t))
        opt.step()
    flat = [i for s in seen for i in s]
    assert seen and all(i >= 0 for i in flat), seen


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiger_accumulation_clips_each_micro_batch(backend):
    """k > 1: each step() call (micro-batch) is clipped by its own gradient's norm."""
    a, b = _pair()
    oa = _make("tiger", a, backend, max_grad_norm=1.0, grad_accum_steps=3)
    ob = _make("tiger", b, backend, grad_accum_steps=3)
    for t in range(6):
        g = _grads(a, t, 1.0 if t % 2 else 0.01)
        _set(a, g)
        _set(b, g)
        oa.step()
        coef = torch.clamp(1.0 / (oa.grad_norm + 1e-6), max=1.0)
        for q in b.parameters():
            q.grad.mul_(coef)
        ob.step()
        assert _same(a, b) and all(bits_equal(oa.state[p]["exp_avg"], ob.state[q]["exp_avg"])
                                   for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_grad_scaler_protocol_norm_of_unscaled_gradients(backend, kind):
    """Under GradScaler's protocol (grad_scale, found_inf given) the norm is of g / scale and the
    step equals the unscaled run's; a found_inf step changes nothing."""
    a, b = _pair()
    oa, ob = _make(kind, a, backend, max_grad_norm=1.0), _make(kind, b, backend, max_grad_norm=1.0)
    for t in range(4):
        g = _grads(a, t)
        _set(b, g)
        _set(a, [x * 1024 for x in g])
        oa.grad_scale = torch.tensor(1024.0)
        oa.found_inf = torch.tensor(1.0 if t == 2 else 0.0)
        oa.step()
        if t != 2:
            ob.step()
            assert oa.grad_norm.item() == ob.grad_norm.item()
        assert _same(a, b), t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_maximize_with_clipping_is_the_run_on_negated_gradients(backend, kind):
    a, b = _pair()
    oa, ob = _make(kind, a, backend, max_grad_norm=1.0, maximize=True), _make(kind, b, backend, max_grad_norm=1.0)
    for t in range(3):
        g = _grads(a, t)
        _set(a, g)
        _set(b, [-x for x in g])
        oa.step()
        ob.step()
        assert _same(a, b)


def test_real_grad_scaler_on_cpu():
    if "cpu" not in BACKENDS:
        pytest.skip("the compiled CPU kernels are not built")
    torch.manual_seed(0)
    net = nn.Linear(8, 4)
    opt = sk.Lion(net.parameters(), lr=1e-3, max_grad_norm=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    x = torch.randn(16, 8)
    loss = net(x).square().sum()
    scaler.scale(loss).backward()
    scaled = [p.grad.clone() for p in net.parameters()]
    scaler.step(opt)
    scaler.update()
    want = torch.sqrt(sum((g / 256.0).double().square().sum() for g in scaled)).float()
    assert abs(opt.grad_norm.item() - want.item()) <= 1e-6 * want.item()
    assert all(bits_equal(p.grad, g) for p, g in zip(net.parameters(), scaled))  # still scaled: untouched


def test_distributed_lion_alone_clips_as_lion():
    a, b = _pair()
    from sign_kernels.distributed import DistributedLion

    oa = DistributedLion(a.parameters(), lr=1e-2, weight_decay=0.1, max_grad_norm=1.0)
    ob = sk.Lion(b.parameters(), lr=1e-2, weight_decay=0.1, max_grad_norm=1.0)
    for t in range(3):
        g = _grads(a, t)
        _set(a, g)
        _set(b, g)
        oa.step()
        ob.step()
        assert _same(a, b) and oa.grad_norm.item() == ob.grad_norm.item()


# ------------------------------------------------------------------ options and refusals
@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan"), True, "1"])
def test_bad_max_grad_norm_is_refused(bad):
    with pytest.raises(ValueError, match="max_grad_norm must be None or a finite float > 0"):
        sk.Lion(nn.Linear(2, 2).parameters(), max_grad_norm=bad)


def test_groups_must_agree_and_a_refused_step_changes_nothing():
    a, _ = _pair()
    opt = sk.Lion([{"params": [a.lin.weight]}, {"params": [a.out.weight], "max_grad_norm": 2.0}],
                  lr=1e-2, max_grad_norm=1.0)
    _set(a, _grads(a, 0))
    before = [p.detach().clone() for p in a.parameters()]
    with pytest.raises(ValueError, match="param group 1: max_grad_norm is 2.0 but param group 0 has 1.0"):
        opt.step()
    assert all(bits_equal(p, q) for p, q in zip(a.parameters(), before)) and not opt.state


def test_step_in_backward_refuses_clipping():
    a, _ = _pair()
    opt = sk.Lion(a.parameters(), lr=1e-2, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="step_in_backward.*global gradient norm"):
        sk.step_in_backward(opt)
    opt.param_groups[0]["max_grad_norm"] = None
    handle = sk.step_in_backward(opt)
    opt.param_groups[0]["max_grad_norm"] = 1.0  # set after: refused at the next backward, before any step
    w = a.lin.weight.detach().clone()
    with pytest.raises(ValueError, match="max_grad_norm"):
        a.out(a.norm(a.lin(torch.randn(3, 12)))).sum().backward()
    assert bits_equal(a.lin.weight, w)
    handle.remove()


def test_state_dict_round_trip_keeps_max_grad_norm():
    a, b = _pair()
    oa = sk.Tiger(a.parameters(), lr=1e-2, max_grad_norm=0.7)
    _set(a, _grads(a, 0))
    oa.step()
    sd = oa.state_dict()
    assert all(g["max_grad_norm"] == 0.7 for g in sd["param_groups"])
    ob = sk.Tiger(b.parameters(), lr=1e-2)
    ob.load_state_dict(sd)
    assert ob.param_groups[0]["max_grad_norm"] == 0.7
    assert ob.state_dict()["param_groups"] == sd["param_groups"]
    # A checkpoint from before the option keeps the current value.
    old = oa.state_dict()
    for g in old["param_groups"]:
        del g["max_grad_norm"]
    oc = sk.Tiger(b.parameters(), lr=1e-2, max_grad_norm=3.0)
    oc.load_state_dict(old)
    assert oc.param_groups[0]["max_grad_norm"] == 3.0
