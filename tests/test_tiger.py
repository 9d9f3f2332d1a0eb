"""Tiger in full: roles, per-tensor scaling, accumulation inside the momentum, NaN guard.

Expected values are written from docs/rules.md directly (in fp64), not taken from a backend.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sign_kernels import Tiger, role_of, tiger_param_groups
from conftest import LOCAL_BACKENDS


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok_embed = nn.Embedding(10, 4)
        self.norm = nn.LayerNorm(4)
        self.rms = nn.RMSNorm(4)
        self.proj = nn.Linear(4, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.scale = nn.Parameter(torch.ones(4))


def test_tiger_param_groups_classify_by_module_type():
    groups = {g["role"]: g["param_names"] for g in tiger_param_groups(Block(), lr=0.1)}
    assert groups["embedding"] == ["tok_embed.weight"]
    assert sorted(groups["gain"]) == ["norm.weight", "rms.weight"]
    assert sorted(groups["elementwise"]) == ["norm.bias", "proj.bias", "scale"]
    assert sorted(groups["matrix"]) == ["head.weight", "proj.weight"]
    assert all(g["lr"] == 0.1 for g in tiger_param_groups(Block(), lr=0.1))


def test_tied_parameters_appear_once():
    m = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    m[1].weight = m[0].weight
    groups = tiger_param_groups(m)
    assert sum(len(g["params"]) for g in groups) == 1
    Tiger(groups)  # torch refuses duplicates; this must construct


def test_named_parameters_and_plain_fallback():
    model = Block()
    opt = Tiger(model.named_parameters())
    names = opt.param_groups[0]["param_names"]
    roles = dict(zip(names, opt._roles(opt.param_groups[0])))
    assert roles["tok_embed.weight"] == 2 and roles["norm.weight"] == 1 and roles["proj.bias"] == 0
    assert roles["proj.weight"] == 3
    # Plain params: ndim <= 1 element-wise, else matrix.
    assert role_of(torch.zeros(3)) == "elementwise" and role_of(torch.zeros(2, 2)) == "matrix"
    assert role_of(torch.zeros(3, 3), "encoder.wte.weight") == "embedding"
    assert role_of(torch.zeros(3), "blocks.0.ln_1.weight") == "gain"


def _expected_update(theta, m, g, lr, beta, wd, role):
    """One Tiger update (k = 1) in fp64, from docs/rules.md."""
    theta, m, g = (x.double() for x in (theta, m, g))
    m = beta * m + (1 - beta) * g
    if role in ("elementwise", "gain"):
        lr_p, wd_p = 0.5 * lr, 0.0
    elif role == "embedding":
        lr_p, wd_p = lr * theta.square().mean(dim=-1, keepdim=True).sqrt(), wd
    else:
        lr_p, wd_p = lr * theta.square().mean().sqrt(), wd
    return theta - lr_p * (torch.sign(m) + wd_p * theta), m


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
@pytest.mark.parametrize("role", ["elementwise", "gain", "embedding", "matrix"])
def test_per_role_scaling(backend, role):
    torch.manual_seed(0)
    theta = torch.randn(6, 5) * torch.arange(1, 7).reshape(6, 1)  # rows of different RMS
    g = torch.randn(6, 5)
    p = nn.Parameter(theta.clone())
    opt = Tiger([{"params": [p], "role": role}], lr=0.1, beta=0.9, weight_decay=0.2, backend=backend)
    p.grad = g.clone()
    opt.step()
    want, m = _expected_update(theta, torch.zeros_like(theta), g, 0.1, 0.9, 0.2, role)
    torch.testing.assert_close(p.detach().double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(opt.state[p]["exp_avg"].double(), m, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
@pytest.mark.parametrize("shape", [(3000, 64), (2, 70_000), (7, 4096)], ids=["rows-across-chunks", "row-longer-than-a-chunk", "rows-in-one-chunk"])
def test_embedding_rows_at_kernel_chunk_sizes(backend, shape):
    # The CPU kernel cuts embeddings into chunks of whole rows where a row fits in one
    # (64K elements) and sums each row inside the update pass; longer rows take a pre-pass.
    torch.manual_seed(0)
    theta = torch.randn(shape) * torch.rand(shape[0], 1) * 3
    g = torch.randn(shape)
    p = nn.Parameter(theta.clone())
    opt = Tiger([{"params": [p], "role": "embedding"}], lr=0.1, beta=0.9, weight_decay=0.2, backend=backend)
    p.grad = g.clone()
    opt.step()
    want, _ = _expected_update(theta, torch.zeros_like(theta), g, 0.1, 0.9, 0.2, "embedding")
    torch.testing.assert_close(p.detach().double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
def test_gradient_accumulation_inside_the_momentum(backend):
    """k = 3: theta moves on calls 3, 6; m = beta*m once per window plus (1-beta)/k * each g."""
    k, beta, lr = 3, 0.8, 0.05
    p = nn.Parameter(torch.linspace(-1, 1, 7))
    opt = Tiger([{"params": [p], "role": "elementwise"}], lr=lr, beta=beta, weight_decay=0.0,
                grad_accum_steps=k, backend=backend)
    theta = p.detach().double().clone()
    m = torch.zeros(7, dtype=torch.float64)
    torch.manual_seed(1)
    for t in range(7):
        g = torch.randn(7)
        p.grad = g.clone()
        opt.step()
        b1 = beta if t % k == 0 else 1.0
        m = b1 * m + (1 - beta) / k * g.double()
        if (t + 1) % k == 0:
            theta = theta - 0.5 * lr * torch.sign(m)
        torch.testing.assert_close(p.detach().double(), theta, rtol=1e-6, atol=1e-7, msg=f"call {t}")
        torch.testing.assert_close(opt.state[p]["exp_avg"].double(), m, rtol=1e-5, atol=1e-7)
    assert int(opt.state[p]["step"]) == 7


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
def test_nan_guard_is_per_tensor(backend):
    """A NaN anywhere in a tensor's grad: that tensor keeps m and shrinks towards its
    centre (1 for gains); the other tensors update normally."""
    gain = nn.Parameter(torch.full((4,), 3.0))
    mat = nn.Parameter(torch.full((2, 2), 2.0))
    ok = nn.Parameter(torch.full((3,), 1.0))
    opt = Tiger([{"params": [gain], "role": "gain"}, {"params": [mat], "role": "matrix"},
                 {"params": [ok], "role": "elementwise"}], lr=0.1, shrink_ratio=0.5, backend=backend)
    for prm in (gain, mat, ok):
        prm.grad = torch.ones_like(prm)
    opt.step()
    m_gain = opt.state[gain]["exp_avg"].clone()
    before = [x.detach().clone() for x in (gain, mat, ok)]
    gain.grad = torch.tensor([1.0, float("nan"), 1.0, 1.0])
    mat.grad = torch.tensor([[float("nan"), 1.0], [1.0, 1.0]])
    ok.grad = torch.ones(3)
    opt.step()
    torch.testing.assert_close(gain.detach(), (before[0] - 1) * 0.5 + 1)
    torch.testing.assert_close(mat.detach(), before[1] * 0.5)
    assert torch.equal(opt.state[gain]["exp_avg"], m_gain)
    torch.testing.assert_close(ok.detach(), before[2] - 0.05)
    assert not torch.isnan(opt.state[mat]["exp_avg"]).any()


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
def test_rms_uses_theta_before_the_update(backend):
    """A matrix at zero never moves (RMS 0): Tiger's known property, kept exactly."""
    p = nn.Parameter(torch.zeros(3, 3))
    opt = Tiger([p], lr=1.0, backend=backend)
    p.grad = torch.ones(3, 3)
    opt.step()
    assert torch.equal(p.detach(), torch.zeros(3, 3))
    q = nn.Parameter(torch.full((2, 2), 2.0))
    opt = Tiger([q], lr=0.1, weight_decay=0.0, backend=backend)
    q.grad = torch.ones(2, 2)
    opt.step()
    torch.testing.assert_close(q.detach(), torch.full((2, 2), 2.0 - 0.1 * 2.0))
    assert math.isclose(float(q.detach()[0, 0]), 1.8, rel_tol=1e-6)
