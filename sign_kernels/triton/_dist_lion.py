"""Triton kernels of Distributed Lion's two fused passes (imported lazily: needs triton).

Same math, operation order and wire layout as ``csrc/core/dist_lion_math.h`` (NOTE: [wire
fields]): every product and sum a separate fp32 op, launched with ``enable_fp_fusion=False``,
divisions by ``tl.math.div_rn``, 16-bit stores through the bit formulas of ``_kernels``. One
launch per tensor (the passes run once per exchange bucket; a tensor table as in
``_launch`` would save launches on models with many small tensors). Each program covers
BYTES packed bytes (pack: 4 BYTES elements; apply: a [BYTES, fields per byte] tile), each
element read and written once.
Runs on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from . import _kernels as K

BYTES = 1024
_DT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def _load(ptr, offs, mask, DT: tl.constexpr):
    if DT == 0:
        x = tl.load(ptr + offs, mask=mask, other=0.0)
    elif DT == 1:
        b = tl.load(ptr + offs, mask=mask, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
        x = (b << 16).to(tl.float32, bitcast=True)
    else:
        x = tl.load(ptr + offs, mask=mask, other=0).to(tl.float16, bitcast=True).to(tl.float32)
    return x


@triton.jit
def _store(ptr, offs, x, mask, DT: tl.constexpr):
    if DT == 0:
        tl.store(ptr + offs, x, mask=mask)
    elif DT == 1:
        tl.store(ptr + offs, K._bf16_bits(x, 0, False).to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(ptr + offs, K._fp16_bits(x).to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)


@triton.jit
def dist_lion_pack_kernel(g_ptr, m_ptr, out_ptr, n, beta1, beta2, scale_ptr, found_ptr, clip_ptr,
                          G_DT: tl.constexpr, M_DT: tl.constexpr, HAS_SCALE: tl.constexpr,
                          HAS_FOUND: tl.constexpr, BYTES: tl.constexpr, HAS_CLIP: tl.constexpr = False):
    pid = tl.program_id(0).to(tl.int64)
    b = pid * BYTES + tl.arange(0, BYTES).to(tl.int64)
    bmask = b < (n + 3) // 4
    b1 = tl.cast(beta1, tl.float32)
    b2 = tl.cast(beta2, tl.float32)
    if HAS_FOUND:
        ok = tl.load(found_ptr) == 0
    byte = tl.zeros([BYTES], dtype=tl.int32)
    # The four fields of a byte: four interleaved loads of the same cache lines.
    for j in tl.static_range(4):
        offs = b * 4 + j
        mask = offs < n
        # the gradient used: (g / grad_scale) * clip (NOTE: [clipping inside the step])
        g = K._grad_used(_load(g_ptr, offs, mask, G_DT), scale_ptr, clip_ptr, HAS_SCALE, HAS_CLIP)
        m = _load(m_ptr, offs, mask, M_DT)
        c = b1 * m + (1.0 - b1) * g
        m_new = b2 * m + (1.0 - b2) * g
        d = (c > 0).to(tl.int32) - (c < 0).to(tl.int32)  # NOTE: [sign]: NaN -> 0
        if HAS_FOUND:
            d = tl.where(ok, d, 0)
            mask = tl.where(ok, mask, False)
        byte = byte | ((d & 3) << (2 * j))
        _store(m_ptr, offs, m_new, mask, M_DT)
    tl.store(out_ptr + b, byte.to(tl.uint8), mask=bmask)


@triton.jit
def dist_lion_apply_kernel(p_ptr, v_ptr, n, lr, lr_ptr, weight_decay, divisor, found_ptr,
                           P_DT: tl.constexpr, BITS: tl.constexpr, HAS_LR_T: tl.constexpr,
                           HAS_FOUND: tl.constexpr, BYTES: tl.constexpr):
    PER: tl.constexpr = 8 // BITS
    pid = tl.program_id(0).to(tl.int64)
    b = pid * BYTES + tl.arange(0, BYTES).to(tl.int64)
    j = tl.arange(0, PER)
    offs = b[:, None] * PER + j[None, :]
    mask = offs < n
    byte = tl.load(v_ptr + b, mask=b < (n * BITS + 7) // 8, other=0).to(tl.int32)
    f = (byte[:, None] >> (BITS * j[None, :])) & ((1 << BITS) - 1)
    s = f - ((f & (1 << (BITS - 1))) << 1)  # sign-extend the field
    if HAS_LR_T:
        lr_ = tl.load(lr_ptr).to(tl.float32)
    else:
        lr_ = tl.cast(lr, tl.float32)
    decay = 1.0 - lr_ * tl.cast(weight_decay, tl.float32)
    v = tl.math.div_rn(s.to(tl.float32), tl.cast(divisor, tl.float32))
    if HAS_FOUND:
        mask = tl.where(tl.load(found_ptr) == 0, mask, False)
    p = _load(p_ptr, offs, mask, P_DT)
    _store(p_ptr, offs, p * decay - lr_ * v, mask, P_DT)


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.view(torch.int16)


def _check(name: str, t: torch.Tensor) -> int:
    if t.dtype not in _DT:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return _DT[t.dtype]


def dist_lion_pack_(grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
                    packed: Sequence[torch.Tensor], beta1: float, beta2: float,
                    grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor],
                    clip: Optional[torch.Tensor] = None) -> None:
    """The op ``dist_lion_pack_`` (sign_kernels/_ops.py) on Triton; ``clip`` (0-dim fp32, read on
    the device) multiplies g / grad_scale (NOTE: [clipping inside the step])."""
    for i, (g, m, out) in enumerate(zip(grads, exp_avgs, packed)):
        n = g.numel()
        if n == 0:
            continue
        gdt, mdt = _check(f"grads[{i}]", g), _check(f"exp_avgs[{i}]", m)
        if out.dtype != torch.uint8 or out.numel() < (n + 3) // 4:
            raise ValueError(f"packed[{i}] must be uint8 with at least ceil(numel / 4) bytes")
        grid = (triton.cdiv((n + 3) // 4, BYTES),)
        dummy = g
        dist_lion_pack_kernel[grid](
            _raw(g), _raw(m), out, n, float(beta1), float(beta2),
            grad_scale if grad_scale is not None else dummy, found_inf if found_inf is not None else dummy,
            clip if clip is not None else dummy,
            G_DT=gdt, M_DT=mdt, HAS_SCALE=grad_scale is not None, HAS_FOUND=found_inf is not None,
            HAS_CLIP=clip is not None, BYTES=BYTES, enable_fp_fusion=False)


def dist_lion_apply_(params: Sequence[torch.Tensor], votes: Sequence[torch.Tensor], bits: int, divisor: int,
                     lr: float, lr_t: Optional[torch.Tensor], weight_decay: float,
                     found_inf: Optional[torch.Tensor]) -> None:
    """The op ``dist_lion_apply_`` (sign_kernels/_ops.py) on Triton."""
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8, got {bits}")
    for i, (p, v) in enumerate(zip(params, votes)):
        n = p.numel()
        if n == 0:
            continue
        pdt = _check(f"params[{i}]", p)
        grid = (triton.cdiv((n * bits + 7) // 8, BYTES),)
        dist_lion_apply_kernel[grid](
            _raw(p), v, n, float(lr), lr_t if lr_t is not None else p, float(weight_decay), float(divisor),
            found_inf if found_inf is not None else p,
            P_DT=pdt, BITS=bits, HAS_LR_T=lr_t is not None, HAS_FOUND=found_inf is not None,
            BYTES=BYTES, enable_fp_fusion=False)
