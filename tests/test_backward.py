"""step_in_backward: the step inside backward equals backward(); step(); zero_grad(), bit for bit."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/test_triton.py: Triton on CPU tensors

import pytest
import torch
from torch import nn

import sign_kernels
from conftest import LOCAL_BACKENDS, OPTIMIZERS, bits_equal

BACKENDS = LOCAL_BACKENDS + (["triton"] if sign_kernels.available_backends()["triton"] is None else [])


def _model(seed=0, dtype=torch.float32, unused=False):
    torch.manual_seed(seed)
    mods = [nn.Embedding(50, 16), nn.LayerNorm(16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 50)]
    model = nn.Sequential(*mods).to(dtype)
    if unused:  # a param no backward reaches: never stepped, no state (as in step())
        model.spare = nn.Linear(4, 4).to(dtype)
    return model


def _loss(model, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 50, (8, 6), generator=g)
    y = torch.randint(0, 50, (8, 6), generator=g)
    out = model[:5](x).float()
    return nn.functional.cross_entropy(out.reshape(-1, 50), y.reshape(-1))


def _groups(algo, model):
    """Several param groups with their own hyperparameters (and roles for Tiger)."""
    if algo == "tiger":
        groups = sign_kernels.tiger_param_groups(model)
        groups[0]["lr"] = 3e-2
        return groups
    mats = [p for p in model.parameters() if p.ndim >= 2]
    vecs = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": mats}, {"params": vecs, "lr": 3e-2, "weight_decay": 0.0}]


def _make(algo, backend, dtype, sr, k=1, unused=False, seed=0):
    cls, hp = OPTIMIZERS[algo]
    hp = dict(hp)
    if algo == "tiger":
        hp["grad_accum_steps"] = k
    model = _model(dtype=dtype, unused=unused, seed=seed)
    opt = cls(_groups(algo, model), backend=backend, stochastic_rounding=sr, seed=7, **hp)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def _assert_same(model_a, opt_a, model_b, opt_b):
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert bits_equal(a, b), name
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        assert sa["state"][i].keys() == sb["state"][i].keys()
        for key, va in sa["state"][i].items():
            vb = sb["state"][i][key]
            assert bits_equal(va, vb), (i, key)


def _run_pair(algo, backend, dtype, sr, iters, k=1, cap_mb=0.0, unused=False):
    """The ordinary loop and the in-backward loop side by side, compared after every backward."""
    ref_model, ref_opt, ref_sched = _make(algo, backend, dtype, sr, k, unused)
    model, opt, sched = _make(algo, backend, dtype, sr, k, unused)
    handle = sign_kernels.step_in_backward(opt, bucket_cap_mb=cap_mb)
    moved = []
    for i in range(iters):
        before = [p.detach().clone() for p in model.parameters()]
        _loss(ref_model, i).backward()
        try:
            ref_opt.step()
        except Exception as exc:  # noqa: BLE001 -- only the Triton interpreter's own failure skips
            if backend == "triton" and type(exc).__name__ == "InterpreterError":
                pytest.skip(f"the ordinary step() fails on this Triton interpreter too: {exc!r:.200}")
            raise
        ref_opt.zero_grad()
        ref_sched.step()
        _loss(model, i).backward()
        assert all(p.grad is None for p in model.parameters()), "a gradient survived the backward"
        sched.step()
        _assert_same(ref_model, ref_opt, model, opt)
        moved.append(any(not torch.equal(a, p) for a, p in zip(before, model.parameters())))
    handle.remove()
    return model, opt, moved


SETTINGS = [(torch.float32, False), (torch.bfloat16, True)]


@pytest.mark.parametrize("dtype,sr", SETTINGS, ids=["fp32", "bf16-sr"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algo", sorted(OPTIMIZERS))
@pytest.mark.parametrize("cap_mb", [0.0, 32.0], ids=["one-per-bucket", "one-bucket"])
def test_bit_identical_to_step(algo, backend, dtype, sr, cap_mb):
    """Groups with their own lr, a scheduler between iterations, a param no backward reaches;
    buckets of one param (seeds by position) and one bucket per backward."""
    iters = 2 if backend == "triton" else 4
    _run_pair(algo, backend, dtype, sr, iters, cap_mb=cap_mb, unused=True)


@pytest.mark.parametrize("dtype,sr", SETTINGS, ids=["fp32", "bf16-sr"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_tiger_accumulates_in_momentum_with_no_gradient_buffer(backend, dtype, sr):
    """k = 4: each micro-batch's gradient goes into the momentum and is freed; θ moves on the
    4th micro-batch only; every micro-batch equals the ordinary loop bitwise."""
    iters = 4 if backend == "triton" else 8
    _, opt, moved = _run_pair("tiger", backend, dtype, sr, iters, k=4, cap_mb=0.0)
    assert moved == [(i + 1) % 4 == 0 for i in range(iters)]
    assert all(int(s["step"]) == iters for s in opt.state.values())


def _trained_handle(algo="lion"):
    model, opt, _ = _make(algo, LOCAL_BACKENDS[-1], torch.float32, False)
    handle = sign_kernels.step_in_backward(opt)
    _loss(model, 0).backward()
    return model, opt, handle


def _snapshot(model, opt):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


def _assert_unchanged(model, opt, snap):
    m, o = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, m[k]), k
    assert opt.state_dict()["param_groups"] == o["param_groups"]
    for i, st in opt.state_dict()["state"].items():
        for key, v in st.items():
            assert torch.equal(v, o["state"][i][key]), (i, key)


def test_step_refused_while_active_and_changes_nothing():
    model, opt, handle = _trained_handle()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    snap = _snapshot(model, opt)
    with pytest.raises(RuntimeError, match=r"step\(\) is not available while step_in_backward is active"):
        opt.step()
    with pytest.raises(RuntimeError, match="step_in_backward is active"):
        opt.step(lambda: _loss(model, 1))  # a closure: refused too, and never called
    _assert_unchanged(model, opt, snap)
    handle.remove()
    opt.step()  # an ordinary optimizer again
    assert not torch.equal(next(model.parameters()), snap[0]["0.weight"])


def test_remove_gives_back_an_ordinary_optimizer():
    """After remove(): grads survive backward and step() continues the same run bitwise."""
    ref_model, ref_opt, _ = _make("tiger", LOCAL_BACKENDS[-1], torch.float32, False)
    model, opt, _ = _make("tiger", LOCAL_BACKENDS[-1], torch.float32, False)
    handle = sign_kernels.step_in_backward(opt)
    for i in range(4):
        _loss(ref_model, i).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        if i == 2:
            handle.remove()
            assert not hasattr(opt, "_step_in_backward")
        _loss(model, i).backward()
        if i >= 2:
            assert all(p.grad is not None for p in model.parameters())
            opt.step()
            opt.zero_grad()
    _assert_same(ref_model, ref_opt, model, opt)
    sign_kernels.step_in_backward(opt).remove()  # can be turned on again


def test_grad_scaler_is_refused():
    """GradScaler's inf check decides for the whole step after every gradient exists: refused."""
    model, opt, _ = _make("lion", LOCAL_BACKENDS[-1], torch.float32, False)
    handle = sign_kernels.step_in_backward(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(_loss(model, 0)).backward()
    scaler.unscale_(opt)  # nothing left to unscale
    with pytest.raises(RuntimeError, match="GradScaler"):
        scaler.step(opt)
    handle.remove()


def test_global_norm_clipping_sees_no_gradients():
    """Documented: clip_grad_norm_ after an in-backward step finds no gradient (norm 0)."""
    model, opt, handle = _trained_handle()
    assert float(nn.utils.clip_grad_norm_(model.parameters(), 1.0)) == 0.0
    handle.remove()


def test_bad_hyperparameter_raises_before_anything_is_stepped():
    model, opt, handle = _trained_handle("tiger")
    opt.param_groups[-1]["lr"] = -1.0
    snap = _snapshot(model, opt)
    with pytest.raises(ValueError, match=r"param group \d+: lr must be"):
        _loss(model, 1).backward()
    _assert_unchanged(model, opt, snap)
    opt.param_groups[-1]["lr"] = 1e-2
    _loss(model, 2).backward()  # the next backward works again
    assert all(p.grad is None for p in model.parameters())
    handle.remove()


def test_param_groups_changed_while_active_raises():
    model, opt, handle = _trained_handle()
    extra = nn.Parameter(torch.ones(3))
    opt.add_param_group({"params": [extra]})
    snap = _snapshot(model, opt)
    with pytest.raises(RuntimeError, match="parameters changed while step_in_backward is active"):
        _loss(model, 1).backward()
    _assert_unchanged(model, opt, snap)
    handle.remove()


def test_argument_checks():
    model, opt, handle = _trained_handle()
    with pytest.raises(RuntimeError, match="already active"):
        sign_kernels.step_in_backward(opt)
    handle.remove()
    with pytest.raises(TypeError, match="sign_kernels optimizer"):
        sign_kernels.step_in_backward(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="bucket_cap_mb"):
        sign_kernels.step_in_backward(opt, bucket_cap_mb=-1)
    assert not hasattr(opt, "_step_in_backward")


def test_torch_compile_model():
    """A compiled model's backward (one AOTAutograd node for all grads) runs the hooks too."""
    results = []
    for in_backward in (False, True):
        torch._dynamo.reset()
        model, opt, sched = _make("tiger", LOCAL_BACKENDS[-1], torch.float32, False, k=2)
        compiled = torch.compile(model, backend="inductor")
        handle = sign_kernels.step_in_backward(opt, bucket_cap_mb=0.0) if in_backward else None
        for i in range(4):
            g = torch.Generator().manual_seed(i)
            x = torch.randint(0, 50, (8, 6), generator=g)
            y = torch.randint(0, 50, (8, 6), generator=g)
            nn.functional.cross_entropy(compiled(x).reshape(-1, 50), y.reshape(-1)).backward()
            if handle is None:
                opt.step()
                opt.zero_grad()
            else:
                assert all(p.grad is None for p in model.parameters())
            sched.step()
        if handle is not None:
            handle.remove()
        results.append((model, opt))
    _assert_same(*results[0], *results[1])


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing(reentrant):
    """Checkpointed segments: a reentrant one runs a backward nested in the outer one; the
    params pending in the outer backward are kept and stepped as in step()."""
    from torch.utils.checkpoint import checkpoint

    def loss_fn(model, i):
        g = torch.Generator().manual_seed(i)
        x = torch.randint(0, 50, (8, 6), generator=g)
        y = torch.randint(0, 50, (8, 6), generator=g)
        h = model[0](x)
        h = checkpoint(lambda t: model[3](model[2](model[1](t))), h, use_reentrant=reentrant)
        return nn.functional.cross_entropy(model[4](h).reshape(-1, 50), y.reshape(-1))

    ref_model, ref_opt, _ = _make("lion", LOCAL_BACKENDS[-1], torch.float32, False)
    model, opt, _ = _make("lion", LOCAL_BACKENDS[-1], torch.float32, False)
    with sign_kernels.step_in_backward(opt, bucket_cap_mb=32.0):
        for i in range(3):
            loss_fn(ref_model, i).backward()
            ref_opt.step()
            ref_opt.zero_grad()
            loss_fn(model, i).backward()
            assert all(p.grad is None for p in model.parameters())
            _assert_same(ref_model, ref_opt, model, opt)
    assert not hasattr(opt, "_step_in_backward")  # the with block removed the handle
