"""8-bit momentum and the correction byte (docs/rules.md "8-bit momentum", "Correction byte").

Every backend against the reference bit for bit (the hard cases: ragged last blocks, all-zero
blocks, one huge outlier, every binade, NaN/Inf gradients); the quantizer's statistics (no
stall, no bias, the decay, the sign of Lion's update); state bytes; the optimizer (state,
checkpoints and their layout, convert_momentum, refusals, step_in_backward, GradScaler, maximize).
Sharded runs: tests/_sharded_cases.py (case_*_int8). CUDA: tests/test_cuda.py.
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from torch import nn

import sign_kernels as sk
from sign_kernels import _quant
from sign_kernels import backends as _backends
from sign_kernels.backends.reference import ROLE_ELEMENTWISE, ROLE_EMBEDDING, ROLE_GAIN, ROLE_MATRIX

from conftest import bits_equal

AVAILABLE = sk.available_backends()
# The fused backends that implement 8-bit momentum and the correction byte (the optimizers'
# own list, so a backend that gains them is tested here at once), where they run.
FUSED = [b for b in sorted(sk.Lion._compressed_backends & sk.Tiger._compressed_backends - {"reference", "cuda"})
         if AVAILABLE[b] is None and (b != "triton" or os.environ.get("TRITON_INTERPRET") == "1")]
SHAPES = [(5, 130), (9, 64), (3, 1), (2, 3, 70)]  # ragged last blocks, exact blocks, rows of 1, 3-d


def _hard_grads(shapes, dtype, gen, step):
    grads = []
    for s in shapes:
        g = torch.randn(s, generator=gen) * torch.pow(2.0, torch.randint(-20, 20, s, generator=gen).float())
        flat = g.view(-1)
        if step == 1:
            flat[: min(64, flat.numel())] = 0.0  # an all-zero block (of the first row)
        if step == 2 and flat.numel() > 3:
            flat[3] = 3e30  # one huge outlier in a block
        grads.append(g.to(dtype))
    return grads


def _run(backend, kind, pdt, q8, ec, steps=6, k=1, nonfinite=None, grad_scale=None, clip=None, seed=0, sr=False,
         gdt=None, lr_t=None):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(pdt) for s in SHAPES]
    if lr_t is not None:  # -0.0 params where the first steps' update direction is exactly 0
        for p in params:
            p.view(-1)[:64:2] = -0.0
    if q8:
        mom = [torch.zeros(s, dtype=torch.int8) for s in SHAPES]
        scales = [torch.zeros(_quant.scale_shape(torch.Size(s)), dtype=torch.bfloat16) for s in SHAPES]
    else:
        mom = [torch.randn(s, generator=gen) * 1e-3 for s in SHAPES]
        scales = None
    res = [torch.zeros(s, dtype=torch.int8) for s in SHAPES] if ec else None
    fn = _backends.get(backend).fn(f"{kind}_")
    for t in range(steps):
        grads = _hard_grads(SHAPES, gdt or pdt, gen, t)
        if lr_t is not None and t == 0:
            for g in grads:
                g.view(-1)[:64] = 0.0
        if nonfinite is not None and t == 3:
            grads[0].view(-1)[5] = nonfinite
        st = [torch.tensor(t, dtype=torch.int64) for _ in SHAPES]
        kw = dict(exp_avg_scales=scales, residuals=res)
        if clip is not None:
            kw["clip"] = clip
        if kind == "lion":
            fn(params, grads, mom, st, 1e-2, lr_t, 0.9, 0.99, 0.1, grad_scale, None, [1, 2, 3, 4], sr, **kw)
        else:
            roles = [ROLE_MATRIX, ROLE_EMBEDDING, ROLE_MATRIX, ROLE_EMBEDDING]
            fn(params, grads, mom, st, roles, 1e-2, lr_t, 0.9, 0.01, k, 0.99, grad_scale, None, [1, 2, 3, 4], sr,
               **kw)
    return params, mom, scales, res


def _assert_same(a, b, what):
    """Bit for bit (-0.0 is not +0.0), NaN payloads aside."""
    for la, lb in zip(a, b):
        if la is None:
            continue
        for x, y in zip(la, lb):
            assert bits_equal(x, y), what


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kind", ["lion", "tiger"])
@pytest.mark.parametrize("pdt,q8,ec", [(torch.float32, True, False), (torch.bfloat16, True, False),
                                        (torch.bfloat16, True, True), (torch.float16, True, True),
                                        (torch.bfloat16, False, True), (torch.float16, False, True)])
def test_backend_equals_reference(backend, kind, pdt, q8, ec):
    want = _run("reference", kind, pdt, q8, ec)
    _assert_same(_run(backend, kind, pdt, q8, ec), want, (backend, kind, pdt, q8, ec))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kind", ["lion", "tiger"])
@pytest.mark.parametrize("pdt,gdt,ec,sr", [(torch.bfloat16, None, False, True), (torch.bfloat16, torch.float32, False, True),
                                           (torch.bfloat16, torch.float32, True, False),
                                           (torch.bfloat16, torch.float32, False, False)])
def test_backend_equals_reference_16bit_params(backend, kind, pdt, gdt, ec, sr):
    """bf16 params with stochastic rounding or the correction byte, bf16 or fp32 grads, int8 momentum
    (SHAPES' whole 64-element blocks take the CPU's vector path, NOTE: [int8 momentum with AVX-512])."""
    for scale in (None, torch.tensor(-3.0)):
        kw = dict(sr=sr, gdt=gdt, grad_scale=scale)
        want = _run("reference", kind, pdt, True, ec, **kw)
        _assert_same(_run(backend, kind, pdt, True, ec, **kw), want, (backend, kind, pdt, gdt, ec, sr, scale))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kind", ["lion", "tiger"])
@pytest.mark.parametrize("q8", [True, False])
def test_correction_byte_every_binade(backend, kind, q8):
    """bf16 params with the correction byte in every binade, zeros, subnormals (and ±Inf/NaN for
    Lion), in whole 64-element blocks (the CPU's vector path): vectors of only normal weights
    above 2^-112 take the residual's product with 1 / u, the others its division (NOTE in
    ec_store). Zero gradients and momenta make the step a decay, θ^ (1 - 1e-3), so every weight
    stays in its binade and its residual moves."""
    gen = torch.Generator().manual_seed(7)
    e = torch.arange(-133, 128, dtype=torch.float32)  # every bf16 binade, subnormals included
    theta = (torch.pow(2.0, e) * (1 + torch.rand(e.numel(), generator=gen))).to(torch.bfloat16)
    special = [0.0, -0.0] + ([float("inf"), -float("inf"), float("nan")] if kind == "lion" else [1.0] * 3)
    theta = torch.cat([theta, torch.tensor(special + [1.0] * 6, dtype=torch.bfloat16)])  # 272 = 4 x 68
    theta = theta * torch.where(torch.rand(theta.numel(), generator=gen) < 0.5, -1.0, 1.0).to(torch.bfloat16)
    base = [theta[torch.randperm(theta.numel(), generator=gen)].view(4, 68)[:, :64].contiguous(),  # mixed vectors
            theta.view(4, 68)[:, 4:].contiguous(), theta.view(4, 68)[:, :64].contiguous()]  # sorted: one range each
    for lo in (-113, -112, -111):  # vectors whose smallest weight is at either shortcut's edge
        b = torch.pow(2.0, lo + torch.arange(256) % 16) * (1 + torch.rand(256, generator=gen))
        base.append(b.to(torch.bfloat16).view(4, 64))
    wd = 0.1 if kind == "lion" else 0.01

    def run(b):
        params = [t.clone() for t in base]
        res = [torch.randint(-127, 128, t.shape, dtype=torch.int8, generator=torch.Generator().manual_seed(i))
               for i, t in enumerate(base)]
        if q8:
            mom = [torch.zeros(t.shape, dtype=torch.int8) for t in base]
            scales = [torch.zeros(_quant.scale_shape(t.shape), dtype=torch.bfloat16) for t in base]
        else:
            mom, scales = [torch.zeros(t.shape) for t in base], [None] * len(base)
        fn = _backends.get(b).fn(f"{kind}_")
        for t in range(3):
            for i, p in enumerate(params):  # one call per tensor: Tiger's lr is set from its RMS
                kw = dict(exp_avg_scales=None if scales[i] is None else [scales[i]], residuals=[res[i]])
                args = ([p], [torch.zeros_like(p)], [mom[i]], [torch.tensor(t, dtype=torch.int64)])
                if kind == "lion":
                    fn(*args, 1e-2, None, 0.9, 0.99, wd, None, None, [i + 1], False, **kw)
                else:  # eta_p * lambda = 1e-3: eta * RMS(theta) * wd
                    rms = p.double().pow(2).mean().sqrt().item()
                    fn(*args, [ROLE_MATRIX], 1e-3 / (rms * wd), None, 0.9, wd, 1, 0.99, None, None, [i + 1], False,
                       **kw)
        return params, mom, None if not q8 else scales, res

    got, want = run(backend), run("reference")
    _assert_same(got, want, (backend, kind, q8))
    assert not torch.equal(want[3][1], torch.randint(-127, 128, base[1].shape, dtype=torch.int8,
                                                     generator=torch.Generator().manual_seed(1)))  # residuals moved


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kind", ["lion", "tiger"])
@pytest.mark.parametrize("case", ["nan", "inf", "scale", "clip", "accum", "lr-0", "lr+inf"])
def test_backend_equals_reference_hard(backend, kind, case):
    # lr = -0.0 (it passes lr >= 0) and +inf (the op's lr tensor is not range-checked):
    # lr * sign(c) for c = 0 is -0 and NaN there, which a shortcut through ±lr would miss.
    kw = {"nan": dict(nonfinite=float("nan")), "inf": dict(nonfinite=float("inf")),
          "scale": dict(grad_scale=torch.tensor(-3.0)), "clip": dict(clip=torch.tensor(0.3)),
          "accum": dict(k=3), "lr-0": dict(lr_t=torch.tensor(-0.0)), "lr+inf": dict(lr_t=torch.tensor(float("inf")))}[case]
    if case == "accum" and kind == "lion":
        pytest.skip("Lion has no accumulation")
    for pdt, q8, ec in ((torch.float32, True, False), (torch.bfloat16, True, True)):
        want = _run("reference", kind, pdt, q8, ec, **kw)
        _assert_same(_run(backend, kind, pdt, q8, ec, **kw), want, (backend, kind, case, pdt))


# ------------------------------------------------------------------ the format
def test_codes_scales_and_levels():
    m = torch.tensor([[0.0] * 64, [1.0] + [0.0] * 63, [-2.0, 1e-4] + [0.5] * 62])
    codes, scale = _quant.quantize(m, 123)
    assert scale.dtype == torch.bfloat16 and scale.shape == (3, 1)
    assert torch.equal(codes[0], torch.zeros(64, dtype=torch.int8)) and scale[0].item() == 0.0
    assert codes[1, 0].item() == 127 and scale[1].item() == 1.0  # the absmax element is exact
    assert codes[2, 0].item() == -127
    back = _quant.dequantize(codes, scale)
    assert back[1, 0].item() == 1.0 and back[2, 0].item() == -2.0
    # A value between two levels rounds to one of them, up with the probability that keeps the mean.
    x = torch.full((1, 64), 0.3)
    x[0, 0] = 1.0
    ups = []
    for key in range(400):
        c, s = _quant.quantize(x, key)
        ups.append(_quant.dequantize(c, s)[0, 1:].mean().item())
    assert abs(sum(ups) / len(ups) - 0.3) < 0.002


def test_nonfinite_momentum_is_stored_as_zero():
    m = torch.randn(2, 64)
    m[0, 3] = float("nan")
    m[1, 7] = float("inf")
    codes, scale = _quant.quantize(m, 1)
    assert codes[0, 3] == 0 and torch.isfinite(_quant.dequantize(codes, scale)[0]).all()
    assert torch.equal(codes[1], torch.zeros(64, dtype=torch.int8))  # an infinity zeroes its block


def test_correction_byte_round_trip_and_precision():
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        hat = torch.randn(10000, generator=gen) * torch.pow(2.0, torch.randint(-10, 10, (10000,), generator=gen).float())
        hat[:3] = torch.tensor([0.0, -0.0, 1e-30])
        v, rho = _quant.ec_encode(hat, dtype)
        assert torch.equal(v, hat.to(dtype))  # the 16-bit weight is round-to-nearest of the full one
        back = _quant.ec_decode(v, rho)
        unit = _quant.ec_unit(v)
        # 8 more bits than the 16-bit weight: within half a unit (u = ulp / 256), or one unit in
        # the 1/256 of an ulp around the midpoint between two 16-bit values, where |ρ| would be 128
        err = (back - hat).abs()
        assert (err <= unit + 1e-45).all()
        assert (err <= unit / 2 + 1e-45).float().mean() > 0.99
        v2, rho2 = _quant.ec_encode(back, dtype)
        assert torch.equal(v2, v) and torch.equal(rho2, rho)  # decode then encode is the identity


def test_state_bytes_per_param():
    shape = torch.Size((768, 3072))
    assert _quant.bytes_per_element(shape) <= 1.05  # codes + bf16 scales
    assert 1 + _quant.bytes_per_element(shape) <= 2.05  # + the correction byte, besides the bf16 weights
    net = nn.Linear(3072, 768, bias=False).to(torch.bfloat16)
    opt = sk.Lion(net.parameters(), lr=1e-4, momentum_dtype=torch.int8, error_correction=True)
    net.weight.grad = torch.randn_like(net.weight)
    opt.step()
    state = sum(v.numel() * v.element_size() for v in opt.state[net.weight].values() if v.dim() > 0)
    assert state / net.weight.numel() <= 2.05


# ------------------------------------------------------------------ the quantizer's statistics
def _ema(g_of_t, steps, beta, q8=True, rtn=False, m0=None, shape=(64, 256)):
    m32 = torch.zeros(shape) if m0 is None else m0.clone()
    if m0 is None:
        codes, scale = torch.zeros(shape, dtype=torch.int8), torch.zeros(_quant.scale_shape(torch.Size(shape)), dtype=torch.bfloat16)
    else:
        codes, scale = _quant.quantize(m0, 99)
    for t in range(steps):
        g = g_of_t(t)
        m = _quant.dequantize(codes, scale)
        new = beta * m + (1 - beta) * g
        if rtn:  # round to nearest on the same levels: the quantizer that freezes small momenta
            codes, scale = _rtn(new)
        else:
            codes, scale = _quant.quantize(new, _quant.state_key(7, t))
        m32 = beta * m32 + (1 - beta) * g
    return _quant.dequantize(codes, scale), m32, scale


def _rtn(m):
    rows = m.reshape(-1, m.shape[-1])
    n, cols = rows.shape
    nb = -(-cols // 64)
    a = torch.nn.functional.pad(rows.abs(), (0, nb * 64 - cols)).reshape(n, nb, 64).amax(-1)
    scale = _quant.bf16_up(a)
    s = _quant._expand(scale.float(), cols)
    a_ = rows.abs()
    lo = torch.floor(127 * torch.sqrt(torch.where(s > 0, a_ / s, torch.zeros(())))).clamp(max=126)
    up = (_quant.level(s, lo + 1) - a_) < (a_ - _quant.level(s, lo))  # the nearer of the two levels
    c = lo + up.float()
    c = torch.where(rows < 0, -c, c)
    return c.to(torch.int8).reshape(m.shape), scale.reshape(_quant.scale_shape(m.shape))


def _local_quantum(m32, scale, cols):
    s = _quant._expand(scale.float(), cols)
    lo = torch.floor(127 * torch.sqrt(torch.where(s > 0, m32.abs() / s, torch.zeros(())))).clamp(max=126)
    return _quant.level(s, lo + 1) - _quant.level(s, lo)


def _linear_rtn(m):
    """A linear absmax int8 quantizer with round-to-nearest (what 8-bit states often use)."""
    rows = m.reshape(-1, m.shape[-1])
    n, cols = rows.shape
    a = rows.abs().reshape(n, -1, 64).amax(-1)
    q = _quant._expand(a, cols) / 127
    return torch.where(q > 0, torch.round(rows / q) * q, torch.zeros(())).reshape(m.shape)


def _small(m32):
    """Elements below 1e-3 of their block's largest."""
    top = m32.abs().reshape(64, 4, 64).amax(-1).repeat_interleave(64, -1)
    return m32.abs() < 1e-3 * top


def test_constant_gradient_from_zero():
    """300 steps of a constant gradient with magnitudes over four decades in every block: the
    dequantized momentum is within 2 quanta (RMS over the elements, at the local code spacing)
    of the fp32 one, and the small elements are not biased toward zero. A linear round-to-nearest
    int8 quantizer fails here: its small elements stay 0."""
    gen = torch.Generator().manual_seed(0)
    mag = torch.pow(10.0, -4 * torch.rand(64, 256, generator=gen))
    g = mag * torch.sign(torch.randn(64, 256, generator=gen))
    dq, m32, scale = _ema(lambda t: g, 300, 0.99)
    err = (dq - m32).abs() / _local_quantum(m32, scale, 256)
    small = _small(m32)
    ratio = ((dq[small] * torch.sign(m32[small])).sum() / m32[small].abs().sum()).item()
    assert err.square().mean().sqrt().item() <= 2.0 and abs(ratio - 1) <= 0.05, (err.square().mean().sqrt(), ratio)
    lin = torch.zeros(64, 256)
    for _ in range(300):
        lin = _linear_rtn(0.99 * lin + 0.01 * g)
    assert (lin[small] * torch.sign(m32[small])).sum().item() / m32[small].abs().sum().item() < 0.2


@pytest.mark.parametrize("rtn", [False, True])
def test_moving_momentum_no_stall(rtn):
    """From one momentum toward another constant gradient (the elements' places in their blocks
    change): the stochastic rounding keeps the small elements unbiased; round-to-nearest on the
    same levels freezes increments below half a level (measured: the small elements stay at ~4x
    their fp32 value, the RMS error is ~70 quanta, against ~2.7 quanta with the stochastic rounding,
    the noise of 300 requantizations of an EMA with beta 0.99)."""
    gen = torch.Generator().manual_seed(0)
    m0 = torch.pow(10.0, -4 * torch.rand(64, 256, generator=gen)) * torch.sign(torch.randn(64, 256, generator=gen))
    g = torch.pow(10.0, -4 * torch.rand(64, 256, generator=gen)) * torch.sign(torch.randn(64, 256, generator=gen))
    dq, m32, scale = _ema(lambda t: g, 300, 0.99, rtn=rtn, m0=m0)
    err = (dq - m32).abs() / _local_quantum(m32, scale, 256)
    small = _small(m32)
    ratio = ((dq[small] * torch.sign(m32[small])).sum() / m32[small].abs().sum()).item()
    ok = abs(ratio - 1) <= 0.1 and err.square().mean().sqrt().item() <= 4.0
    assert ok != rtn, (rtn, ratio, err.square().mean().sqrt().item())


@pytest.mark.parametrize("rtn", [False, True])
def test_zero_gradient_decays_like_fp32(rtn):
    """500 steps of a zero gradient decay the momentum as fp32 does (norm within 10 %), and no
    element keeps its start; round-to-nearest on the same levels leaves it stuck (~4.6x)."""
    gen = torch.Generator().manual_seed(0)
    m0 = torch.pow(10.0, -4 * torch.rand(64, 256, generator=gen)) * torch.sign(torch.randn(64, 256, generator=gen))
    dq, m32, _ = _ema(lambda t: torch.zeros(64, 256), 500, 0.99, rtn=rtn, m0=m0)
    ok = abs((dq.norm() / m32.norm()).item() - 1) <= 0.1 and bool((dq.abs() < m0.abs()).all())
    assert ok != rtn, (rtn, (dq.norm() / m32.norm()).item())


def test_sign_of_update_agrees_with_fp32_momentum():
    """Lion's sign(b1 m + (1 - b1) g) with the int8 momentum against fp32 momentum, 200 steps of a
    random-walk gradient: >= 99 % of the elements agree at every step."""
    gen = torch.Generator().manual_seed(2)
    shape = (64, 256)
    gw = torch.randn(shape, generator=gen)
    codes, scale = torch.zeros(shape, dtype=torch.int8), torch.zeros(_quant.scale_shape(torch.Size(shape)), dtype=torch.bfloat16)
    m32 = torch.zeros(shape)
    worst = 1.0
    for t in range(200):
        gw = gw + 0.3 * torch.randn(shape, generator=gen)
        m = _quant.dequantize(codes, scale)
        agree = (torch.sign(0.9 * m + 0.1 * gw) == torch.sign(0.9 * m32 + 0.1 * gw)).float().mean().item()
        worst = min(worst, agree)
        codes, scale = _quant.quantize(0.99 * m + 0.01 * gw, _quant.state_key(3, t))
        m32 = 0.99 * m32 + 0.01 * gw
    assert worst >= 0.99, worst


# ------------------------------------------------------------------ the optimizers
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 70)
        self.lin = nn.Linear(70, 130)
        self.norm = nn.LayerNorm(130)
        self.out = nn.Linear(130, 5)


def _make(kind, net, backend="auto", **kw):
    if kind == "lion":
        return sk.Lion(net.parameters(), lr=1e-2, weight_decay=0.1, backend=backend, **kw)
    return sk.Tiger(sk.tiger_param_groups(net), lr=1e-2, backend=backend, **kw)


def _grads(net, t):
    gen = torch.Generator().manual_seed(50 + t)
    return [torch.randn(p.shape, generator=gen).to(p.dtype) for p in net.parameters()]


def _train(net, opt, t0, t1):
    for t in range(t0, t1):
        for p, g in zip(net.parameters(), _grads(net, t)):
            p.grad = g
        opt.step()


@pytest.mark.parametrize("kind", ["lion", "tiger"])
@pytest.mark.parametrize("dtype,ec", [(torch.float32, False), (torch.bfloat16, True), (torch.bfloat16, False)])
def test_optimizer_backends_agree_and_resume_exactly(kind, dtype, ec):
    torch.manual_seed(0)
    nets = [Net().to(dtype) for _ in range(3)]
    for n in nets[1:]:
        n.load_state_dict(nets[0].state_dict())
    kw = dict(momentum_dtype=torch.int8, error_correction=ec)
    ref = _make(kind, nets[0], "reference", **kw)
    fused = _make(kind, nets[1], "auto", **kw)
    _train(nets[0], ref, 0, 4)
    _train(nets[1], fused, 0, 4)
    assert all(torch.equal(a, b) for a, b in zip(nets[0].parameters(), nets[1].parameters()))
    st = fused.state[nets[1].lin.weight]
    assert st["exp_avg"].dtype == torch.int8 and st["exp_avg_scale"].dtype == torch.bfloat16
    assert fused.state[nets[1].lin.bias]["exp_avg"].dtype == torch.float32  # 1-d: fp32 momentum
    assert ("residual" in st) == (ec and dtype != torch.float32)
    # save -> load -> save round trip; the resumed run is the uninterrupted one, bit for bit
    sd = copy.deepcopy(fused.state_dict())
    nets[2].load_state_dict(nets[1].state_dict())
    resumed = _make(kind, nets[2], "auto")  # options come from the checkpoint
    resumed.load_state_dict(sd)
    assert resumed.param_groups[0]["momentum_dtype"] == torch.int8
    sd2 = resumed.state_dict()
    for a, b in zip(sd["state"].values(), sd2["state"].values()):
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    _train(nets[1], fused, 4, 7)
    _train(nets[2], resumed, 4, 7)
    assert all(torch.equal(a, b) for a, b in zip(nets[1].parameters(), nets[2].parameters()))


def test_checkpoint_of_another_layout_is_refused():
    net = Net()
    opt = _make("lion", net, momentum_dtype=torch.int8)
    _train(net, opt, 0, 1)
    sd = opt.state_dict()
    for layout in ("blocks32-fp32-rtn", None):
        bad = copy.deepcopy(sd)
        if layout is None:
            for g in bad["param_groups"]:
                del g["momentum_layout"]
        else:
            bad["param_groups"][0]["momentum_layout"] = layout
        before = copy.deepcopy(opt.state_dict())
        with pytest.raises(ValueError, match="layout"):
            opt.load_state_dict(bad)
        after = opt.state_dict()
        assert all(torch.equal(before["state"][k][n], after["state"][k][n]) for k in before["state"] for n in before["state"][k])


def test_convert_momentum_both_ways_and_all_or_nothing():
    torch.manual_seed(0)
    net = Net()
    opt = _make("lion", net)
    _train(net, opt, 0, 3)
    m32 = opt.state[net.lin.weight]["exp_avg"].clone()
    sk.convert_momentum(opt, torch.int8)
    st = opt.state[net.lin.weight]
    assert opt.param_groups[0]["momentum_dtype"] == torch.int8 and st["exp_avg"].dtype == torch.int8
    back = _quant.dequantize(st["exp_avg"], st["exp_avg_scale"])
    assert ((back - m32).norm() / m32.norm()).item() < 0.02
    _train(net, opt, 3, 4)
    sk.convert_momentum(opt, torch.float32)
    assert "exp_avg_scale" not in opt.state[net.lin.weight] and opt.state[net.lin.weight]["exp_avg"].dtype == torch.float32
    # int8 of fp64 params is refused, and nothing changes
    net64 = Net().double()
    opt64 = _make("lion", net64, "reference")
    _train(net64, opt64, 0, 1)
    before = {k: v.clone() for k, v in opt64.state[net64.lin.weight].items()}
    with pytest.raises(ValueError, match="int8 momentum is for float32"):
        sk.convert_momentum(opt64, torch.int8)
    assert opt64.param_groups[0]["momentum_dtype"] is None
    assert all(torch.equal(v, before[k]) for k, v in opt64.state[net64.lin.weight].items())
    with pytest.raises(ValueError, match="Simba"):
        sk.convert_momentum(sk.Simba(Net().parameters()), torch.int8)


def test_refusals():
    with pytest.raises(ValueError, match="exclusive"):
        sk.Lion(Net().parameters(), error_correction=True, stochastic_rounding=True)
    with pytest.raises(ValueError, match="Simba keeps int16"):
        sk.Simba(Net().parameters(), momentum_dtype=torch.int8)
    with pytest.raises(ValueError, match="error_correction must be a bool"):
        sk.Tiger(Net().parameters(), error_correction="yes")
    with pytest.raises(ValueError, match="int8 momentum is for float32"):
        sk.Lion(Net().double().parameters(), momentum_dtype=torch.int8, backend="reference")


@pytest.mark.parametrize("kind", ["lion", "tiger"])
def test_step_in_backward_grad_scaler_and_maximize(kind):
    """The same op calls in every mode: step_in_backward equals backward(); step(), GradScaler's
    protocol equals the unscaled run, maximize equals the run on negated gradients."""
    torch.manual_seed(0)
    a, b = Net().to(torch.bfloat16), Net().to(torch.bfloat16)
    b.load_state_dict(a.state_dict())
    kw = dict(momentum_dtype=torch.int8, error_correction=True)
    oa, ob = _make(kind, a, **kw), _make(kind, b, **kw)
    handle = sk.step_in_backward(ob)
    idx = torch.arange(12).remainder(40).reshape(3, 4)
    for _ in range(3):
        for net, opt in ((a, oa), (b, ob)):
            loss = net.out(net.norm(net.lin(net.emb(idx)))).float().square().mean()
            loss.backward()
            if net is a:
                opt.step()
                opt.zero_grad()
    handle.remove()
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    c, d = Net(), Net()
    d.load_state_dict(c.state_dict())
    oc, od = _make(kind, c, momentum_dtype=torch.int8, maximize=True), _make(kind, d, momentum_dtype=torch.int8)
    for t in range(3):
        gs = _grads(c, t)
        for p, q, g in zip(c.parameters(), d.parameters(), gs):
            p.grad = g * 8
            q.grad = -g
        oc.grad_scale = torch.tensor(8.0)
        oc.found_inf = torch.tensor(0.0)
        oc.step()
        od.step()
    assert all(torch.equal(x, y) for x, y in zip(c.parameters(), d.parameters()))


def test_torch_compile_of_the_step():
    torch.manual_seed(0)
    a, b = Net(), Net()
    b.load_state_dict(a.state_dict())
    oa = _make("lion", a, momentum_dtype=torch.int8)
    ob = _make("lion", b, momentum_dtype=torch.int8)
    step = torch.compile(ob.step, backend="eager")
    for t in range(2):
        for p, q, g in zip(a.parameters(), b.parameters(), _grads(a, t)):
            p.grad, q.grad = g, g.clone()
        oa.step()
        step()
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
