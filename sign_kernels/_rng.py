"""The stochastic-rounding random bits, as documented in csrc/core/sign_math.h.

NOTE: [stochastic rounding bits] (the one definition every backend follows)::

    mix32(x)        = lowbias32 integer hash (x ^= x>>16; x *= 0x7FEB352D; x ^= x>>15;
                      x *= 0x846CA68B; x ^= x>>16), all uint32 wrapping
    tensor_seed     = mix32(seed ^ mix32(param_index))       # computed here, once per param
    key(step, s)    = mix32(tensor_seed ^ mix32(step_lo + 0x9E3779B9 * (s + 1)))
    bits(key, i)    = mix32(key ^ mix32(i_lo ^ (i_hi * 0x85EBCA6B)))
    bf16 = (fp32_bits + (bits & 0xFFFF)) >> 16                # NaN stays NaN

``seed`` is the optimizer's ``seed`` option, ``param_index`` the position of the parameter
in the optimizer (param groups in order, as in ``state_dict``), ``step`` the tensor's step
count before the call, ``s`` the buffer stream (0 parameter, 1 momentum) and ``i`` the
element's offset in the contiguous tensor.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
STREAM_PARAM = 0
STREAM_STATE = 1


def mix32(x: int) -> int:
    x &= MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    x ^= x >> 16
    return x


def tensor_seed(seed: int, param_index: int) -> int:
    return mix32((seed & MASK32) ^ mix32(param_index))


def sr_key(seed: int, step: int, stream: int) -> int:
    return mix32(seed ^ mix32((step & MASK32) + 0x9E3779B9 * (stream + 1)))


def mix32_tensor(x: torch.Tensor) -> torch.Tensor:
    """mix32 on an int64 tensor holding uint32 values (wrapping products keep the low bits)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def sr_bits(key: int, numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 32 random bits of every element of a tensor of ``numel`` elements (int64)."""
    idx = torch.arange(numel, dtype=torch.int64, device=device)
    lo = idx & MASK32
    hi = idx >> 32
    return mix32_tensor(key ^ mix32_tensor(lo ^ ((hi * 0x85EBCA6B) & MASK32)))


def bf16_stochastic(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Round fp32 ``x`` to bf16 adding the low 16 of ``bits`` (flattened order)."""
    flat = x.reshape(-1).to(torch.float32)
    u = flat.view(torch.int32).to(torch.int64) & MASK32
    r = ((u + (bits & 0xFFFF)) >> 16) & 0xFFFF
    r = torch.where(r >= 0x8000, r - 0x10000, r).to(torch.int16)
    out = r.view(torch.bfloat16)
    out = torch.where(torch.isnan(flat), torch.full_like(out, float("nan")), out)
    return out.reshape(x.shape)
