"""Dtype settings and the byte model: how many bytes one optimizer step must move.

The model counts the minimum DRAM traffic of a fused single pass: every parameter and
every state tensor is read once and written once, every gradient is read once.

    bytes/step = Σ_tensors numel · (2·size(param) + size(grad)) + 2 · state_bytes

with state_bytes the bytes of the optimizer state that scale with the parameter
(per-tensor scalars such as ``step`` are left out). Per element at fp32:

    Lion / Tiger : read θ, g, m   write θ, m        20 B  (bf16 all: 10 B; bf16 + fp32 m: 14 B)
    Simba        : read θ, g, s   write θ, s        16 B  (s int16; bf16 θ, g: 10 B)
    AdamW        : read θ, g, m, v  write θ, m, v   28 B  (bf16: 14 B)

Tiger moves more than that single pass, and what it moves depends on the role of each tensor,
on the backend and on whether its RMS is cached (``tiger_bytes_per_element``; the bench rows of
our Tiger count it, per role, for the steady step they time). Per element at fp32, update steps
(grad_accum_steps=1: every call):

    every role, every backend : the NaN guard reads g before anything is written     +4 B
    matrix, cpu               : first step after θ changed outside the step: RMS pre-pass over θ
                                +4 B (28); steady steps: the sums of squares come out of the
                                previous write pass (NOTE: [cached sums of squares]): 24 B
    embedding, cpu            : each row is summed in L1 next to its update: 24 B, first and
                                steady (rows longer than 64K elements: +4 B, a pass of their own)
    elementwise / gain        : 24 B
    matrix, embedding on cuda, triton, reference: the statistics pre-pass reads θ: 28 B

Gradient-norm clipping (NOTE: [clip rows] in bench/contenders.py) adds, per element:

    ours, max_grad_norm=  : the norm pass reads g (+ size(g): Lion 24 B, Simba 20 B at fp32;
                            one fp64 per tensor written, not counted); Tiger + 0: its NaN
                            guard's read of g is the norm pass's (Tiger+clip moves Tiger's bytes)
    torch clip_grad_norm_ : a norm pass reads g, a mul_ pass reads and writes it: + 3·size(g)
    (foreach=True)          (fp32: + AdamW 28 = 40 B, + our Lion 20 = 32 B)

An accumulation micro-step ((t+1) mod k != 0) reads g twice (guard, momentum) and m, writes m:
16 B (+4 B for θ once after θ changed outside the step, cpu). Peers' Tiger rows use the
single-pass minimum (20 B): their passes are not known here.

8-bit momentum and the correction byte (NOTE: [int8 rows] in bench/contenders.py): a tensor of
2+ dims keeps int8 codes (1 B) and one bf16 scale per 64 elements of a row (2/64 B), both read
and written once per step; a 0/1-d tensor keeps an fp32 momentum (4 B). The correction byte ρ
(error_correction=True, bf16/fp16 params) is read and written with θ. Per element of a matrix
whose rows are a multiple of 64 long, steady step:

    Lion, fp32 θ and g, int8 m      : read θ 4, g 4, m 1 + 2/64; write θ 4, m 1 + 2/64   14.06 B
    Lion, bf16 θ and g, ρ, int8 m   : read θ 2, ρ 1, g 2, m 1 + 2/64; write θ 2, ρ 1,
                                      m 1 + 2/64                                          10.06 B
    Tiger: its own passes (above) with m at 1 + 2/64 each way and ρ beside θ in the update
           (its RMS is of θ16: a pre-pass reads θ, never ρ): fp32 matrix, cpu, 18.06 B
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch


@dataclass(frozen=True)
class DtypeSetting:
    name: str
    param: torch.dtype
    grad: torch.dtype
    momentum: Optional[torch.dtype]  # None: the param dtype (what torch.optim does); int8: 8-bit
    error_correction: bool = False  # the correction byte of bf16/fp16 params (ours)
    stochastic_rounding: bool = False  # bf16 writes rounded stochastically (ours)

    def momentum_dtype(self) -> torch.dtype:
        return self.momentum if self.momentum is not None else self.param


DTYPE_SETTINGS = {
    "fp32": DtypeSetting("fp32", torch.float32, torch.float32, None),
    "bf16": DtypeSetting("bf16", torch.bfloat16, torch.bfloat16, None),
    # bf16 params and grads, fp32 momentum (Lion/Tiger momentum_dtype=torch.float32)
    "bf16-fp32m": DtypeSetting("bf16-fp32m", torch.bfloat16, torch.bfloat16, torch.float32),
}


# NOTE: [int8 rows] The settings of the 8-bit momentum rows (bench/contenders.py): not sections of
# the sweep (--dtypes) but a contender's own, timed inside the fp32 section beside fp32 Lion (its
# θ and gradients in the setting's dtypes: Workspace.for_setting).
ROW_SETTINGS = {
    "fp32-int8": DtypeSetting("fp32-int8", torch.float32, torch.float32, torch.int8),
    "bf16-ec-int8": DtypeSetting("bf16-ec-int8", torch.bfloat16, torch.bfloat16, torch.int8,
                                 error_correction=True),
    "bf16-sr-int8": DtypeSetting("bf16-sr-int8", torch.bfloat16, torch.bfloat16, torch.int8,
                                 stochastic_rounding=True),
}

INT8_BLOCK = 64  # elements of a row per bf16 scale (sign_kernels._quant.QBLOCK)


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# State layouts: per element bytes of the state that scales with the tensor, for the
# algorithms the harness knows. A function of (numel, DtypeSetting) -> bytes.
StateModel = Callable[[int, DtypeSetting], int]


def lion_state(numel: int, ds: DtypeSetting) -> int:  # exp_avg
    return numel * itemsize(ds.momentum_dtype())


def simba_state(numel: int, ds: DtypeSetting) -> int:  # sign_counts, int16
    return numel * 2


def adamw_state(numel: int, ds: DtypeSetting) -> int:  # exp_avg, exp_avg_sq in param dtype
    return 2 * numel * itemsize(ds.param)


STATE_MODELS = {"lion": lion_state, "tiger": lion_state, "simba": simba_state, "adamw": adamw_state}


def state_bytes(algo: str, numels: Iterable[int], ds: DtypeSetting) -> int:
    model = STATE_MODELS[algo]
    return sum(model(n, ds) for n in numels)


def momentum_bytes(numel: int, ndim: int, row_len: int, ds: DtypeSetting) -> int:
    """Bytes of one tensor's momentum: 8-bit (2+ dims): codes + one bf16 scale per 64 elements of
    each row (the row's last block shorter); a 0/1-d tensor of an int8 setting: fp32."""
    if ds.momentum != torch.int8:
        return numel * itemsize(ds.momentum_dtype())
    if ndim < 2:
        return 4 * numel
    if numel == 0 or row_len == 0:
        return 0
    return numel + 2 * (numel // row_len) * -(-row_len // INT8_BLOCK)


def residual_bytes(numel: int, ds: DtypeSetting) -> int:
    """The correction byte: one int8 per element of a bf16/fp16 param with error_correction."""
    return numel if ds.error_correction and ds.param in (torch.bfloat16, torch.float16) else 0


def state_bytes_of_shapes(algo: str, shapes: Iterable[Sequence[int]], ds: DtypeSetting) -> int:
    """``state_bytes`` by shape: the same for the plain layouts; Lion's and Tiger's 8-bit
    momentum (block scales, fp32 for 0/1-d tensors) and correction byte need the shapes."""
    shapes = [tuple(s) for s in shapes]
    if algo in ("lion", "tiger") and (ds.momentum == torch.int8 or ds.error_correction):
        return sum(momentum_bytes(math.prod(s), len(s), s[-1] if s else 1, ds) + residual_bytes(math.prod(s), ds)
                   for s in shapes)
    return state_bytes(algo, [math.prod(s) for s in shapes], ds)


def step_bytes_from_state(numels: Sequence[int], ds: DtypeSetting, state_total: int) -> int:
    """The byte model given the total state bytes (analytic or measured)."""
    n = sum(numels)
    return n * (2 * itemsize(ds.param) + itemsize(ds.grad)) + 2 * state_total


def step_bytes(algo: str, numels: Sequence[int], ds: DtypeSetting) -> int:
    return step_bytes_from_state(numels, ds, state_bytes(algo, numels, ds))


def bytes_per_element(algo: str, ds: DtypeSetting) -> float:
    return step_bytes(algo, [1], ds)


TIGER_ROLES = ("elementwise", "gain", "embedding", "matrix")


def tiger_bytes_per_element(role: str, backend: str, ds: DtypeSetting, *, steady: bool = True,
                            update: bool = True, row_len: int = 0) -> int:
    """Bytes one Tiger call moves per element of a tensor of ``role`` (see the module doc).

    ``steady``: θ was last written by the previous step (its sums of squares are cached, on
    the backends that cache them); else the first step, or the first after an edit.
    ``update``: (t + 1) mod k == 0; else an accumulation micro-step.
    """
    p, g, m = itemsize(ds.param), itemsize(ds.grad), itemsize(ds.momentum_dtype())
    rms_role = role in ("embedding", "matrix")
    cached = backend == "cpu"  # NOTE: [cached sums of squares] in sign_kernels/optim/tiger.py
    if not update:
        return 2 * g + 2 * m + (p if rms_role and cached and not steady else 0)
    total = 2 * p + g + 2 * m + g  # the single pass, and the NaN guard's pre-read of g
    if rms_role:
        if not cached:
            total += p  # the statistics pre-pass reads θ
        elif role == "matrix" and not steady:
            total += p  # the RMS pre-pass over θ
        elif role == "embedding" and row_len > (1 << 16):
            total += p  # rows longer than a kernel chunk: a pass over θ of their own
    return total


def tiger_tensor_bytes(numel: int, role: str, backend: str, ds: DtypeSetting, *, steady: bool = True,
                       update: bool = True, row_len: int = 0, ndim: int = 2) -> int:
    """Bytes one Tiger call moves over one tensor: ``tiger_bytes_per_element`` with the momentum
    by the tensor's layout (8-bit: codes and scales, read and written once; 0/1-d: fp32) and the
    correction byte read and written beside θ in an update step (the RMS pre-pass reads θ16 only)."""
    if ds.momentum != torch.int8 and not ds.error_correction:
        return numel * tiger_bytes_per_element(role, backend, ds, steady=steady, update=update, row_len=row_len)
    plain = DtypeSetting(ds.name, ds.param, ds.grad, torch.float32)
    total = numel * tiger_bytes_per_element(role, backend, plain, steady=steady, update=update, row_len=row_len)
    total += 2 * (momentum_bytes(numel, ndim, row_len, ds) - 4 * numel)  # m: read once, written once
    if update:
        total += 2 * residual_bytes(numel, ds)
    return total


def tiger_step_bytes(tensors: Sequence[tuple], backend: str, ds: DtypeSetting, *, steady: bool = True) -> int:
    """Bytes of one Tiger update step over ``tensors``: (numel, role, row length[, ndim]) tuples
    (ndim: 2 when left out; it matters only to 8-bit momentum)."""
    return sum(tiger_tensor_bytes(t[0], t[1], backend, ds, steady=steady, row_len=t[2],
                                  ndim=t[3] if len(t) > 3 else 2) for t in tensors)


def clip_bytes_per_element(clip: Optional[str], algo: str, ds: DtypeSetting) -> int:
    """Bytes per element clipping adds to one step: ``clip`` None, "fused" (ours, inside the
    step) or "torch" (clip_grad_norm_(foreach=True) before the step); see the module doc."""
    g = itemsize(ds.grad)
    if clip is None:
        return 0
    if clip == "fused":
        return 0 if algo == "tiger" else g
    if clip == "torch":
        return 3 * g
    raise ValueError(f"unknown clip kind {clip!r}")


def measured_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the state tensors an optimizer holds, scalars (step counters) excluded."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.dim() > 0 and value.numel() > 1:
                total += value.numel() * value.element_size()
    return total


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9 if ms > 0 and math.isfinite(ms) else float("nan")
