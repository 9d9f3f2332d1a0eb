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
    momentum: Optional[torch.dtype]  # None: the param dtype (what torch.optim does)

    def momentum_dtype(self) -> torch.dtype:
        return self.momentum if self.momentum is not None else self.param


DTYPE_SETTINGS = {
    "fp32": DtypeSetting("fp32", torch.float32, torch.float32, None),
    "bf16": DtypeSetting("bf16", torch.bfloat16, torch.bfloat16, None),
    # bf16 params and grads, fp32 momentum (Lion/Tiger momentum_dtype=torch.float32)
    "bf16-fp32m": DtypeSetting("bf16-fp32m", torch.bfloat16, torch.bfloat16, torch.float32),
}


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


def tiger_step_bytes(tensors: Sequence[tuple], backend: str, ds: DtypeSetting, *, steady: bool = True) -> int:
    """Bytes of one Tiger update step over ``tensors``: (numel, role, row length) triples."""
    return sum(n * tiger_bytes_per_element(role, backend, ds, steady=steady, row_len=d) for n, role, d in tensors)


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
