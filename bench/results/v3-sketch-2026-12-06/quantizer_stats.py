"""Quantizer statistics of the v3 sketch against test_int8's criteria (experiment)."""
import sys, torch
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), "..", "..", ".."))
from sign_kernels import _quant, _rng
M = 0xFFFFFFFF
import os
MB = int(os.environ.get("MB", "3")); E0 = int(os.environ.get("E0", "15"))
T14 = 2.0 ** -E0
BASE = (127 - E0) << MB
SH = 23 - MB

def f32_from_bits(b):  # int64 tensor of uint32 bits -> fp32
    b = b & M
    return torch.where(b >= 2**31, b - 2**32, b).to(torch.int32).view(torch.float32)

def bits_of(x):
    return x.contiguous().view(torch.int32).to(torch.int64) & M

def scale_of(amax):
    return f32_from_bits((bits_of(amax) + 0x7FFFFF) & 0xFF800000)

def exp_(t, cols):
    return t.repeat_interleave(64, -1)[..., :cols]

def quantize(m, key, hash_rounds=1):
    rows = m.reshape(-1, m.shape[-1]).float()
    n, cols = rows.shape
    a = rows.abs()
    amax = torch.nan_to_num(a, nan=0.0).reshape(n, -1, 64).amax(-1)
    S = scale_of(amax)
    inv = exp_(1.0 / S, cols)
    r = a * inv
    ok = r <= 1.125
    t = r + T14
    h = bits_of(rows)
    h = _rng.mix32_tensor(key ^ h) if hash_rounds == 1 else _rng.mix32_tensor(key ^ _rng.mix32_tensor(h))
    q = bits_of(t) + (h >> (32 - SH))
    c = (q >> SH) - BASE
    c = torch.where(rows < 0, -c, c)
    c = torch.where(ok, c, torch.zeros_like(c))
    return c.to(torch.int8).reshape(m.shape), S.reshape(n, -1)

def level(c, S):  # |value| of code magnitude c (int64) under scale S (fp32, expanded)
    return (f32_from_bits((c + BASE) << SH) - T14) * S

def dequantize(codes, S):
    c = codes.reshape(-1, codes.shape[-1]).to(torch.int64)
    s = exp_(S, c.shape[1])
    v = level(c.abs(), s)
    return torch.where(c < 0, -v, v).reshape(codes.shape)

def local_quantum(m32, S, cols):
    s = exp_(S, cols)
    t = m32.abs() / s + T14
    c = (bits_of(t) >> SH) - BASE
    return level(c + 1, s) - level(c, s)

def ema(g_of_t, steps, beta, m0=None, shape=(64, 256), rounds=1):
    m32 = torch.zeros(shape) if m0 is None else m0.clone()
    codes, S = (torch.zeros(shape, dtype=torch.int8), torch.zeros(shape[0], shape[1] // 64)) if m0 is None else quantize(m0, 99, rounds)
    for t in range(steps):
        m = dequantize(codes, S)
        codes, S = quantize(beta * m + (1 - beta) * g_of_t(t), _quant.state_key(7, t), rounds)
        m32 = beta * m32 + (1 - beta) * g_of_t(t)
    return dequantize(codes, S), m32, S

def small(m32):
    top = m32.abs().reshape(64, 4, 64).amax(-1).repeat_interleave(64, -1)
    return m32.abs() < 1e-3 * top

def ratio(dq, m32, sm):
    return ((dq[sm] * torch.sign(m32[sm])).sum() / m32[sm].abs().sum()).item()

for rounds in (1,):
    print(f"== hash rounds {rounds}")
    gen = torch.Generator().manual_seed(0)
    mag = torch.pow(10.0, -4 * torch.rand(64, 256, generator=gen))
    g = mag * torch.sign(torch.randn(64, 256, generator=gen))
    dq, m32, S = ema(lambda t: g, 300, 0.99, rounds=rounds)
    err = (dq - m32).abs() / local_quantum(m32, S, 256)
    print("constant from zero: rms quanta %.2f (<= 2), small ratio %.3f (1 +- 0.05)" % (err.square().mean().sqrt(), ratio(dq, m32, small(m32))))
    gen = torch.Generator().manual_seed(0)
    m0 = torch.pow(10.0, -4 * torch.rand(64, 256, generator=gen)) * torch.sign(torch.randn(64, 256, generator=gen))
    g = torch.pow(10.0, -4 * torch.rand(64, 256, generator=gen)) * torch.sign(torch.randn(64, 256, generator=gen))
    dq, m32, S = ema(lambda t: g, 300, 0.99, m0=m0, rounds=rounds)
    err = (dq - m32).abs() / local_quantum(m32, S, 256)
    print("moving: rms quanta %.2f (<= 4), small ratio %.3f (1 +- 0.1)" % (err.square().mean().sqrt(), ratio(dq, m32, small(m32))))
    dq, m32, _ = ema(lambda t: torch.zeros(64, 256), 500, 0.99, m0=m0, rounds=rounds)
    print("decay: norm ratio %.3f (1 +- 0.1), all moved %s" % ((dq.norm() / m32.norm()).item(), bool((dq.abs() < m0.abs()).all())))
    for seed, dist in ((2, "gauss"), (5, "4dec")):
        gen = torch.Generator().manual_seed(seed)
        shape = (64, 256)
        gw = torch.randn(shape, generator=gen)
        if dist == "4dec":
            gw = gw * torch.pow(10.0, -4 * torch.rand(shape, generator=gen))
        codes, S = torch.zeros(shape, dtype=torch.int8), torch.zeros(64, 4)
        m32 = torch.zeros(shape); worst = 1.0; tot = 0
        for t in range(200):
            step = 0.3 * torch.randn(shape, generator=gen)
            gw = gw + (step if dist == "gauss" else step * gw.abs())
            m = dequantize(codes, S)
            agree = (torch.sign(0.9 * m + 0.1 * gw) == torch.sign(0.9 * m32 + 0.1 * gw)).float().mean().item()
            worst = min(worst, agree); tot += agree
            codes, S = quantize(0.99 * m + 0.01 * gw, _quant.state_key(3, t), rounds)
            m32 = 0.99 * m32 + 0.01 * gw
        print("sign agreement (%s): worst %.4f (>= 0.99), mean %.4f" % (dist, worst, tot / 200))
