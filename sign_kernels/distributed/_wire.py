"""Distributed Lion's wire format, the vote, and the reference (pure torch) fused passes.

NOTE: [wire fields] (csrc/core/dist_lion_math.h) is the layout: a tensor of n elements
travels as ceil(n * bits / 8) bytes; element i is the two's complement field of ``bits``
bits at bit offset ``bits * (i % (8 // bits))`` of byte ``i // (8 // bits)``. Each worker's
d_i = sign(c_i) in {-1, 0, +1} is a 2-bit field (0 -> 00, +1 -> 01, -1 -> 11): three states,
so an element that no worker moves stays 0 on the wire and in the vote. The vote is written
in the same layout: majority as 2-bit fields, average as the sum of the d_i in
:func:`sum_bits` bits.

The two reference passes have the call signatures of the ops
``torch.ops.sign_kernels.dist_lion_pack_`` / ``dist_lion_apply_`` (sign_kernels/_ops.py).
fp64 tensors are computed in fp64 (the test oracle); other dtypes in fp32 with each product
and sum rounded separately, as the kernels do, so fp32 results are the kernels' bits.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from .. import _ops


def sum_bits(world_size: int) -> int:
    """Bits of a field that holds any sum of ``world_size`` values in {-1, 0, +1}."""
    if world_size <= 1:
        return 2
    if world_size <= 7:
        return 4
    if world_size <= 127:
        return 8
    raise ValueError(f'vote="average" supports at most 127 ranks (8-bit sums), got {world_size}')


def nbytes(numel: int, bits: int) -> int:
    """Bytes of a tensor of ``numel`` elements in ``bits``-wide fields."""
    return (numel * bits + 7) // 8


_LUT: Dict[tuple, torch.Tensor] = {}


def _unpack_lut(bits: int, device: torch.device) -> torch.Tensor:
    """[256, 8 // bits] int8: the signed fields of every byte value."""
    key = (bits, str(device))
    lut = _LUT.get(key)
    if lut is None:
        per = 8 // bits
        b = torch.arange(256, dtype=torch.int32).unsqueeze(1)
        f = (b >> (torch.arange(per, dtype=torch.int32) * bits)) & ((1 << bits) - 1)
        f = f - ((f & (1 << (bits - 1))) << 1)
        lut = _LUT[key] = f.to(torch.int8).to(device)
    return lut


def unpack_fields(data: torch.Tensor, bits: int) -> torch.Tensor:
    """The signed fields of uint8 ``data`` ([..., S] -> [..., S * 8 // bits] int8)."""
    lut = _unpack_lut(bits, data.device)
    return lut[data.long()].flatten(-2)


def pack_fields(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer ``values`` ([..., K], K a multiple of 8 // bits) as ``bits``-wide fields in uint8."""
    per = 8 // bits
    v = (values.to(torch.int16) & ((1 << bits) - 1)).to(torch.uint8)
    v = v.reshape(*values.shape[:-1], values.shape[-1] // per, per)
    out = v[..., 0].clone()
    for j in range(1, per):
        out |= v[..., j] << (bits * j)
    return out


def vote(received: torch.Tensor, mode: str, out: torch.Tensor, kernel: Optional[bool] = None) -> None:
    """Vote on one slice: ``received`` is [N, S] uint8 (every rank's 2-bit fields of the
    slice), ``out`` gets the result fields: sign of the sum (majority, 2 bits, ties -> 0) or
    the sum (average, ``sum_bits(N)`` bits).

    On CPU the compiled op ``dist_lion_vote_`` does it in one pass when it is built
    (``kernel=None``: when available; True/False force it, for the tests); elsewhere, torch
    operations on the bytes.
    """
    n = received.shape[0]
    bits = 2 if mode == "majority" else sum_bits(n)
    if kernel is None:
        kernel = received.device.type == "cpu" and _ops.has_kernel("dist_lion_vote_", "CPU")
    if kernel:
        _ops.op("dist_lion_vote_")(received.reshape(-1), out, n, bits, mode == "majority")
        return
    sums = []
    for j in range(4):  # field j of every byte, sign-extended, summed over the ranks
        f = ((received >> (2 * j)) & 3).to(torch.int8)
        sums.append((f - ((f & 2) << 1)).sum(0, dtype=torch.int8))
    s = torch.stack(sums, dim=1).reshape(-1)
    out.copy_(pack_fields(torch.sign(s) if mode == "majority" else s, bits))


# ---------------------------------------------------------------------- reference passes
def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _skip(found_inf: Optional[torch.Tensor]) -> bool:
    return found_inf is not None and bool(found_inf.item() != 0)


def dist_lion_pack_(
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    packed: Sequence[torch.Tensor],
    beta1: float,
    beta2: float,
    grad_scale: Optional[torch.Tensor],
    found_inf: Optional[torch.Tensor],
    clip: Optional[torch.Tensor] = None,
) -> None:
    """c = b1 m + (1-b1) g; d = sign(c) as 2-bit fields into ``packed``; m = b2 m + (1-b2) g.

    g is (g / grad_scale) * clip where given (NOTE: [clipping inside the step] in sign_kernels/_ops.py)."""
    skip = _skip(found_inf)
    for g, m, out in zip(grads, exp_avgs, packed):
        n = g.numel()
        if skip:
            out[: nbytes(n, 2)].zero_()
            continue
        dt = torch.float64 if torch.float64 in (g.dtype, m.dtype) else torch.float32
        dev = g.device
        b1 = torch.tensor(beta1, dtype=dt, device=dev)
        b2 = torch.tensor(beta2, dtype=dt, device=dev)
        one = torch.tensor(1.0, dtype=dt, device=dev)
        g_ = g.reshape(-1).to(dt)
        if grad_scale is not None:
            g_ = g_ / grad_scale.to(device=dev, dtype=dt)
        if clip is not None:
            g_ = g_ * clip.to(device=dev, dtype=dt)
        m_ = m.reshape(-1).to(dt)
        c = b1 * m_ + (one - b1) * g_
        d = (c > 0).to(torch.int8) - (c < 0).to(torch.int8)  # NOTE: [sign]: NaN -> 0
        m.copy_((b2 * m_ + (one - b2) * g_).reshape(m.shape))
        pad = (-n) % 4
        if pad:
            d = torch.cat([d, d.new_zeros(pad)])
        out[: nbytes(n, 2)].copy_(pack_fields(d, 2))


def dist_lion_apply_(
    params: Sequence[torch.Tensor],
    votes: Sequence[torch.Tensor],
    bits: int,
    divisor: int,
    lr: float,
    lr_t: Optional[torch.Tensor],
    weight_decay: float,
    found_inf: Optional[torch.Tensor],
) -> None:
    """θ = θ (1 - lr wd) - lr (field / divisor) for every element's voted field."""
    if _skip(found_inf):
        return
    for p, v in zip(params, votes):
        n = p.numel()
        dt, dev = _opmath(p.dtype), p.device
        lr_ = (lr_t.detach().to(device=dev, dtype=dt).reshape(()) if lr_t is not None
               else torch.tensor(lr, dtype=dt, device=dev))
        wd = torch.tensor(weight_decay, dtype=dt, device=dev)
        one = torch.tensor(1.0, dtype=dt, device=dev)
        s = unpack_fields(v[: nbytes(n, bits)], bits)[:n].to(dt)
        val = s / torch.tensor(float(divisor), dtype=dt, device=dev)
        p_ = p.reshape(-1).to(dt)
        p.copy_((p_ * (one - lr_ * wd) - lr_ * val).reshape(p.shape))
