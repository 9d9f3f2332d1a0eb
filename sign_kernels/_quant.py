"""8-bit momentum and the correction byte, in plain torch: the reference of every backend.

NOTE: [int8 momentum] and NOTE: [correction byte] in csrc/core/sign_math.h define the bits;
docs/rules.md ("8-bit momentum", "Correction byte") states the rules. Everything here computes
in fp32 with torch's IEEE operations (no contraction), so it gives the kernels' bits.

int8 momentum: a tensor of >= 2 dims keeps int8 codes of its shape and one bf16 scale per block
of ``QBLOCK`` consecutive elements of a row (the last dim), shape ``rows x ceil(cols / QBLOCK)``.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch

from . import _rng

QBLOCK = 64  # elements per scale: 64 x int8 + 2 bytes of bf16 scale = 1.03 bytes per element
LAYOUT = "rowblock64-bf16scale-sqrt-sr-v2"  # saved with int8 checkpoints; another layout is refused

_MASK = 0xFFFFFFFF


def scale_shape(shape: torch.Size) -> Tuple[int, ...]:
    """The shape of the block scales of a momentum of ``shape`` (>= 2 dims)."""
    return tuple(shape[:-1]) + (-(-shape[-1] // QBLOCK),)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def bf16_up(a: torch.Tensor) -> torch.Tensor:
    """bf16 of fp32 ``a`` >= 0 rounded toward +inf (bf16_bits_up)."""
    u = a.contiguous().view(torch.int32).to(torch.int64) & _MASK
    r = ((u + 0xFFFF) >> 16) & 0xFFFF
    return torch.where(r >= 0x8000, r - 0x10000, r).to(torch.int16).view(torch.bfloat16)


# K = fp32(1 / 127^2), by its bits (NOTE: [int8 momentum]: no division per element).
_K = torch.tensor([0x38820610], dtype=torch.int32).view(torch.float32)[0].item()


def level(scale: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """|value| of code magnitudes ``c`` (fp32) under fp32 scales (q8_level): s * ((c*c) * K)."""
    return scale * ((c * c) * torch.tensor(_K, dtype=torch.float32, device=c.device))


def _expand(per_block: torch.Tensor, cols: int) -> torch.Tensor:
    return per_block.repeat_interleave(QBLOCK, dim=-1)[..., :cols]


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 momentum of int8 ``codes`` with bf16 block ``scale`` (q8_dequant), in codes' shape."""
    c = _rows(codes).to(torch.float32)
    s = _expand(_rows(scale).to(torch.float32), c.shape[1])
    v = level(s, c.abs())
    return torch.where(c < 0, -v, v).reshape(codes.shape)


def _value_bits(key: int, m: torch.Tensor) -> torch.Tensor:
    """sr_bits(key, f32_bits(m)): the random bits are a function of the value (sharding-free)."""
    idx = m.contiguous().view(torch.int32).to(torch.int64) & _MASK
    return _rng.mix32_tensor(key ^ _rng.mix32_tensor(idx))


def quantize(m: torch.Tensor, key: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, bf16 block scales) of fp32 momentum ``m`` (>= 2 dims), rounding stochastically
    with the bits of ``key`` (q8_code)."""
    rows = _rows(m.to(torch.float32))
    n, cols = rows.shape
    nb = -(-cols // QBLOCK)
    a = rows.abs()
    a_ = torch.where(torch.isnan(a), torch.zeros((), dtype=a.dtype, device=a.device), a)
    pad = nb * QBLOCK - cols
    if pad:
        a_ = torch.nn.functional.pad(a_, (0, pad))
    scale = bf16_up(a_.reshape(n, nb, QBLOCK).amax(dim=-1))
    s = _expand(scale.to(torch.float32), cols)
    inv = _expand(torch.tensor(1.0, dtype=torch.float32, device=m.device) / scale.to(torch.float32), cols)
    r = a * inv
    valid = (r >= 0.0) & (r < 2.0)
    r = torch.where(valid, r, torch.zeros((), dtype=r.dtype, device=r.device))
    lo = torch.clamp(torch.floor(torch.tensor(127.0, dtype=torch.float32, device=m.device) * torch.sqrt(r)), max=126.0)
    vlo = level(s, lo)
    u = (_value_bits(key, rows) >> 8).to(torch.float32) * (2.0 ** -24)
    c = lo + (u * (level(s, lo + 1.0) - vlo) < a - vlo).to(torch.float32)
    c = torch.where(rows < 0, -c, c)
    c = torch.where(valid, c, torch.zeros((), dtype=c.dtype, device=c.device))
    return c.to(torch.int8).reshape(m.shape), scale.reshape(scale_shape(m.shape))


def state_key(seed: int, step: int) -> int:
    return _rng.sr_key(seed, step, _rng.STREAM_STATE)


# ------------------------------------------------------------------ the correction byte
def ec_unit(v: torch.Tensor) -> torch.Tensor:
    """u(θ16) = ulp(θ16) / 256 in fp32 (0 for inf/NaN), for bf16 or fp16 ``v``."""
    bits = v.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    if v.dtype == torch.bfloat16:
        e = (bits >> 7) & 0xFF
        top, off = 0xFF, 127 + 15
    elif v.dtype == torch.float16:
        e = (bits >> 10) & 0x1F
        top, off = 0x1F, 15 + 18
    else:
        raise ValueError(f"error correction needs bf16 or fp16 params, got {v.dtype}")
    p = torch.clamp(e, min=1) - off
    u = torch.ldexp(torch.ones(v.shape, dtype=torch.float32, device=v.device), p)
    return torch.where(e == top, torch.zeros((), dtype=torch.float32, device=v.device), u)


def ec_decode(v: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """θ^ = θ16 + ρ · u(θ16), exact in fp32."""
    return v.to(torch.float32) + rho.to(torch.float32) * ec_unit(v)


def ec_encode(hat: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(θ16', ρ') of the fp32 weight ``hat``: round to nearest even, then the residual."""
    v = hat.to(dtype)
    u = ec_unit(v)
    r = torch.round((hat - v.to(torch.float32)) / torch.where(u > 0, u, torch.ones_like(u)))
    ok = (u > 0) & torch.isfinite(r)
    r = torch.where(ok, torch.clamp(r, -127.0, 127.0), torch.zeros((), dtype=r.dtype, device=r.device))
    return v, r.to(torch.int8)


def bytes_per_element(shape: torch.Size) -> float:
    """State bytes per element of an int8 momentum of ``shape`` (codes + scales)."""
    n = math.prod(shape)
    return (n + 2 * math.prod(scale_shape(shape))) / max(n, 1)
