"""Training-level checks (fast): the optimizers lower a loss, and bf16 stochastic rounding
keeps training moving where round-to-nearest-even stalls.

The model is the byte-level GPT of examples/train_lm.py at its smallest size.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

import sign_kernels as sk

ROOT = Path(__file__).resolve().parent.parent


def _load_example():
    spec = importlib.util.spec_from_file_location("train_lm", ROOT / "examples" / "train_lm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it is executed
    spec.loader.exec_module(module)
    return module


train_lm = _load_example()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These models are tiny: one thread is faster, and immune to oversubscription when the
    # machine is busy (OpenMP workers spinning against other processes).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _backends():
    out = ["reference", "auto"]
    if sk.available_backends().get("cpu") is None:
        out.append("cpu")
    return out


def _make_optimizer(name, model, backend, **extra):
    if name == "lion":
        return sk.Lion(model.parameters(), lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1, backend=backend, **extra)
    if name == "tiger":
        return sk.Tiger(sk.tiger_param_groups(model), lr=5e-2, weight_decay=0.01, backend=backend, **extra)
    if name == "simba":
        return sk.Simba(model.parameters(), lr=3e-3, weight_decay=0.1, backend=backend, **extra)
    raise ValueError(name)


def _nano_gpt(seed=0):
    cfg = train_lm.ModelConfig(n_layer=1, n_head=2, d_model=32, block_size=32, vocab_size=64)
    torch.manual_seed(seed)
    return train_lm.GPT(cfg), cfg


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("name", ["lion", "tiger", "simba"])
def test_optimizer_lowers_loss_on_fixed_batch(name, backend):
    model, cfg = _nano_gpt()
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(cfg.vocab_size, (8, cfg.block_size), generator=gen)
    y = (3 * x + 1) % cfg.vocab_size  # a learnable per-position map
    opt = _make_optimizer(name, model, backend)
    with torch.no_grad():
        initial = model(x, y).item()
    assert abs(initial - math.log(cfg.vocab_size)) < 0.1  # starts near uniform
    losses = []
    for _ in range(40):
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = model(x, y).item()
    assert all(math.isfinite(v) for v in losses)
    assert final < 0.6 * initial, (name, backend, initial, final)
    # every parameter moved, and the state has the documented keys
    for p in model.parameters():
        state = opt.state[p]
        assert "step" in state
        assert ("sign_counts" if name == "simba" else "exp_avg") in state
    if name == "simba":
        assert all(opt.state[p]["sign_counts"].dtype == torch.int16 for p in model.parameters())


# --------------------------------------------------------------------------------------
# bf16: stochastic rounding vs round-to-nearest-even
# --------------------------------------------------------------------------------------
# bf16 has 8 significant bits: the spacing of representable values is 2^-7 in [1, 2) and
# 2^-8 in [0.5, 1). A sign update of lr = 1e-4 on a parameter at 1.0 is far below half a
# spacing (2^-9 ~ 0.002), so round-to-nearest-even writes 1.0 back every step: the parameter
# never moves. Stochastic rounding rounds down with probability ~lr/2^-8, so the expected
# displacement after N steps is N*lr (unbiased), and the mean over many elements is close.

LR = 1e-4
N_STEPS = 200
NUMEL = 4096


def _bf16_optimizer(name, p, sr, backend):
    common = dict(lr=LR, weight_decay=0.0, backend=backend, stochastic_rounding=sr, seed=123)
    if name == "lion":
        return sk.Lion([p], betas=(0.9, 0.99), **common)
    if name == "tiger":
        # a 2-d tensor is a matrix: lr_p = lr * RMS(p) = lr at p = 1
        return sk.Tiger([p], **common)
    if name == "simba":
        return sk.Simba([p], **common)
    raise ValueError(name)


def _displacement(name, sr, backend):
    p = torch.nn.Parameter(torch.ones(64, NUMEL // 64, dtype=torch.bfloat16))
    opt = _bf16_optimizer(name, p, sr, backend)
    for _ in range(N_STEPS):
        p.grad = torch.ones_like(p)  # sign +1 every step: the update is -lr each step
        opt.step()
    return (1.0 - p.detach().float()).mean().item()


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("name", ["lion", "tiger", "simba"])
def test_bf16_sign_update_below_half_ulp(name, backend):
    assert LR < 2.0**-9  # below half the bf16 spacing just under 1.0: RNE cannot move it
    rne = _displacement(name, sr=False, backend=backend)
    sr = _displacement(name, sr=True, backend=backend)
    assert rne == 0.0, f"{name}: round-to-nearest moved a bf16 param by {rne} (expected a stall)"
    expected = N_STEPS * LR  # 0.02
    # per element the displacement is a sum of N Bernoulli steps of 2^-8 (mean N*lr,
    # sd ~ sqrt(N*lr*2^-8) ~ 0.009); the mean over 4096 elements has sd ~ 1.4e-4.
    assert abs(sr - expected) < 0.1 * expected, f"{name}: SR mean displacement {sr}, expected ~{expected}"


@pytest.mark.parametrize("name", ["lion", "tiger", "simba"])
def test_bf16_training_stalls_without_sr(name):
    """A bf16 regression towards 0.99 from 1.0 with lr=1e-4: RNE stalls, SR converges."""

    def run(sr):
        p = torch.nn.Parameter(torch.ones(8, 256, dtype=torch.bfloat16))
        opt = _bf16_optimizer(name, p, sr, "auto")
        target = torch.full(p.shape, 0.99)
        losses = []
        for _ in range(300):
            loss = (p.float() - target).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    plain, stochastic = run(False), run(True)
    assert plain[-1] == plain[0], f"{name}: plain bf16 should stall, {plain[0]} -> {plain[-1]}"
    # min, not last: Simba's clamped counters keep pushing past the target for ~window steps
    assert min(stochastic) < 0.5 * stochastic[0], f"{name}: SR did not train, {stochastic[0]} -> {min(stochastic)}"
