"""The optimizers behave like torch's own: groups, schedulers, checkpoints, AMP, compile."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import sign_kernels
from conftest import LOCAL_BACKENDS, OPTIMIZERS, needs_cpu


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(50, 16), nn.LayerNorm(16), nn.Linear(16, 32), nn.GELU(),
                         nn.Linear(32, 50)).to(dtype)


def _loss(model, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 50, (8, 6), generator=g)
    y = torch.randint(0, 50, (8, 6), generator=g)
    out = model(x).float()
    return nn.functional.cross_entropy(out.reshape(-1, 50), y.reshape(-1))


def _train(model, opt, steps, start=0, sched=None):
    losses = []
    for i in range(start, start + steps):
        opt.zero_grad()
        loss = _loss(model, i)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


def _state_bytes(state):
    return {k: (v.dtype, v.clone()) for k, v in state.items() if torch.is_tensor(v)}


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
@pytest.mark.parametrize("algo", sorted(OPTIMIZERS))
def test_resume_is_bit_identical(backend, algo, tmp_path):
    """Save at step 3 through torch.save, load into fresh objects, continue: same bits."""
    cls, hp = OPTIMIZERS[algo]
    extra = dict(stochastic_rounding=True, seed=5)

    model = _model(dtype=torch.bfloat16)
    opt = cls(model.parameters(), backend=backend, **hp, **extra)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    full = _train(model, opt, 6, sched=sched)
    final = copy.deepcopy(model.state_dict())

    model = _model(dtype=torch.bfloat16)
    opt = cls(model.parameters(), backend=backend, **hp, **extra)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    first = _train(model, opt, 3, sched=sched)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, path)

    ck = torch.load(path, weights_only=True)
    model2 = _model(seed=1, dtype=torch.bfloat16)
    model2.load_state_dict(ck["model"])
    opt2 = cls(model2.parameters(), backend=backend, **hp, **extra)
    opt2.load_state_dict(ck["opt"])
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=10)
    sched2.load_state_dict(ck["sched"])
    rest = _train(model2, opt2, 3, start=3, sched=sched2)
    assert first + rest == full
    for k, v in model2.state_dict().items():
        assert torch.equal(v, final[k]), k


@pytest.mark.parametrize("algo", ["lion", "tiger"])
def test_state_dtype_survives_checkpoint(algo):
    """torch's load_state_dict would cast state to the param dtype; ours keeps it exactly."""
    cls, hp = OPTIMIZERS[algo]
    p = nn.Parameter(torch.randn(64).to(torch.bfloat16))
    opt = cls([p], momentum_dtype=torch.float32, **hp)
    p.grad = torch.randn(64).to(torch.bfloat16)
    opt.step()
    m = opt.state[p]["exp_avg"].clone()
    assert m.dtype == torch.float32
    sd = opt.state_dict()
    opt2 = cls([p], momentum_dtype=torch.float32, **hp)
    opt2.load_state_dict(sd)
    assert opt2.state[p]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt2.state[p]["exp_avg"], m)
    assert opt2.state[p]["step"].dtype == torch.int64 and int(opt2.state[p]["step"]) == 1


def test_simba_counters_stay_int16_through_checkpoint():
    cls, hp = OPTIMIZERS["simba"]
    p = nn.Parameter(torch.randn(64))
    opt = cls([p], **hp)
    for _ in range(3):
        p.grad = torch.randn(64)
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    opt2 = cls([p], **hp)
    opt2.load_state_dict(sd)
    assert opt2.state[p]["sign_counts"].dtype == torch.int16
    assert torch.equal(opt2.state[p]["sign_counts"], opt.state[p]["sign_counts"])


def test_loads_a_lion_pytorch_style_checkpoint():
    """lion-pytorch keeps only exp_avg (no step): it loads, and the step count starts at 0."""
    p = nn.Parameter(torch.randn(10))
    m = torch.randn(10)
    sd = {"state": {0: {"exp_avg": m.clone()}},
          "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.99), "weight_decay": 0.0, "params": [0]}]}
    opt = sign_kernels.Lion([p])
    opt.load_state_dict(sd)
    assert torch.equal(opt.state[p]["exp_avg"], m)
    assert int(opt.state[p]["step"]) == 0
    assert opt.param_groups[0]["backend"] == "auto"  # missing options take the defaults


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
def test_param_groups_and_add_param_group(backend):
    a, b, c = (nn.Parameter(torch.randn(5)) for _ in range(3))
    opt = sign_kernels.Lion([{"params": [a]}, {"params": [b], "lr": 0.5, "weight_decay": 0.1}], lr=0.1,
                            backend=backend)
    opt.add_param_group({"params": [c], "betas": (0.0, 0.5)})
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.5, 0.1]
    assert opt.param_groups[2]["betas"] == (0.0, 0.5)
    for p in (a, b, c):
        p.grad = torch.ones(5)
    before = [p.detach().clone() for p in (a, b, c)]
    opt.step()
    torch.testing.assert_close(a.detach(), before[0] - 0.1)
    torch.testing.assert_close(b.detach(), before[1] * (1 - 0.05) - 0.5)
    torch.testing.assert_close(c.detach(), before[2] - 0.1)


def test_frozen_and_gradless_params_are_skipped():
    a, b = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(5), requires_grad=False)
    opt = sign_kernels.Lion([a, b], lr=0.1)
    b0 = b.detach().clone()
    a.grad = torch.ones(5)
    opt.step()
    assert b not in opt.state and torch.equal(b.detach(), b0)
    opt.zero_grad()
    assert a.grad is None
    a0 = a.detach().clone()
    opt.step()  # no grads: nothing moves, the step count stays
    assert torch.equal(a.detach(), a0) and int(opt.state[a]["step"]) == 1


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
def test_tensor_lr_equals_float_lr(backend):
    g = torch.randn(100)
    out = []
    for lr in (0.01, torch.tensor(0.01)):
        p = nn.Parameter(torch.linspace(-1, 1, 100))
        opt = sign_kernels.Lion([p], lr=lr, weight_decay=0.3, backend=backend)
        p.grad = g.clone()
        opt.step()
        out.append(p.detach().clone())
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
@pytest.mark.parametrize("algo", sorted(OPTIMIZERS))
def test_grad_scaler_unscales_and_skips_on_inf(backend, algo):
    """GradScaler hands grad_scale/found_inf to the kernels: unscaling equals plain grads,
    and an inf skips the step (params, state and step count untouched)."""
    cls, hp = OPTIMIZERS[algo]
    torch.manual_seed(0)
    w0 = torch.randn(4, 4)
    x = torch.randn(8, 4)

    def run(scaled, inject_inf=False):
        w = nn.Parameter(w0.clone())
        opt = cls([w], backend=backend, **hp)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1) if scaled else None
        for i in range(3):
            opt.zero_grad()
            loss = (x @ w).square().mean()
            if scaled:
                scaler.scale(loss).backward()
                if inject_inf and i == 1:
                    w.grad[0, 0] = float("inf")
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                if not (inject_inf and i == 1):
                    opt.step()
        return w.detach(), opt.state[w]

    plain, plain_state = run(False)
    scaled, scaled_state = run(True)
    torch.testing.assert_close(scaled, plain, rtol=0, atol=1e-6)
    assert int(scaled_state["step"]) == 3
    skipped, skipped_state = run(True, inject_inf=True)
    plain_skip, plain_skip_state = run(False, inject_inf=True)
    torch.testing.assert_close(skipped, plain_skip, rtol=0, atol=1e-6)
    assert int(skipped_state["step"]) == 2


@needs_cpu
@pytest.mark.parametrize("algo", sorted(OPTIMIZERS))
def test_torch_compile_training_step(algo):
    """A compiled training step (model and optimizer) matches the eager one."""
    cls, hp = OPTIMIZERS[algo]
    results = []
    for compiled in (False, True):
        model = _model()
        opt = cls(model.parameters(), backend="cpu", **hp)

        def step(i):
            opt.zero_grad()
            loss = _loss(model, i)
            loss.backward()
            opt.step()
            return loss

        fn = torch.compile(step, backend="inductor") if compiled else step
        for i in range(3):
            fn(i)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_cpu
def test_compiled_optimizer_step_has_no_graph_break():
    model = _model()
    opt = sign_kernels.Lion(model.parameters(), backend="cpu")
    _loss(model, 0).backward()
    explanation = torch._dynamo.explain(opt.step)()
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
def test_non_contiguous_and_storage_sharing_params(backend):
    """A transposed param and two params viewing one storage update like contiguous ones."""
    base = torch.randn(30)
    views = [nn.Parameter(base[:10]), nn.Parameter(base[10:])]
    t = nn.Parameter(torch.randn(6, 5).t())
    assert not t.is_contiguous()
    ref = [nn.Parameter(base[:10].clone()), nn.Parameter(base[10:].clone()), nn.Parameter(t.detach().contiguous())]
    grads = [torch.randn(10), torch.randn(20), torch.randn(5, 6)]
    for params in (views + [t], ref):
        opt = sign_kernels.Lion(params, lr=0.1, weight_decay=0.1, backend=backend)
        for _ in range(2):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(views + [t], ref):
        assert torch.equal(a.detach(), b.detach())
    assert torch.equal(base[:10], views[0].detach())  # written through the shared storage


def test_available_backends_and_auto_logging(caplog):
    avail = sign_kernels.available_backends()
    assert set(avail) == {"reference", "cpu", "cuda", "triton"}
    assert avail["reference"] is None
    for name, reason in avail.items():
        assert reason is None or isinstance(reason, str) and reason
    from sign_kernels import backends

    backends._auto_cache.clear()
    with caplog.at_level(logging.INFO, logger="sign_kernels"):
        for _ in range(2):
            p = nn.Parameter(torch.randn(3))
            p.grad = torch.randn(3)
            sign_kernels.Lion([p]).step()
    msgs = [r.message for r in caplog.records if "backend 'auto'" in r.message]
    assert len(msgs) == 1  # said once
    expected = "cpu" if avail["cpu"] is None else "reference"
    assert f"'{expected}'" in msgs[0]


def test_explicit_unavailable_backend_raises_with_reason():
    avail = sign_kernels.available_backends()
    p = nn.Parameter(torch.randn(3))
    if avail["cuda"] is not None:
        with pytest.raises(sign_kernels.BackendUnavailableError, match="cuda"):
            sign_kernels.Lion([p], backend="cuda")


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
def test_fp64_params(backend):
    p = nn.Parameter(torch.randn(10, dtype=torch.float64))
    if backend == "cpu":
        with pytest.raises(sign_kernels.BackendUnavailableError, match="float32, bfloat16 or float16"):
            sign_kernels.Lion([p], backend=backend)
        return
    opt = sign_kernels.Lion([p], lr=0.1, backend=backend)
    p.grad = torch.randn(10, dtype=torch.float64)
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.float64
