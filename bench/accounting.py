"""Dtype settings and the byte model: how many bytes one optimizer step must move.

The model counts the minimum DRAM traffic of a fused single pass: every parameter and
every state tensor is read once and written once, every gradient is read once.

    bytes/step = Σ_tensors numel · (2·size(param) + size(grad)) + 2 · state_bytes

with state_bytes the bytes of the optimizer state that scale with the parameter
(per-tensor scalars such as ``step`` are left out). Per element at fp32:

    Lion / Tiger : read θ, g, m   write θ, m        20 B  (bf16 all: 10 B; bf16 + fp32 m: 14 B)
    Simba        : read θ, g, s   write θ, s        16 B  (s int16; bf16 θ, g: 10 B)
    AdamW        : read θ, g, m, v  write θ, m, v   28 B  (bf16: 14 B)

Tiger with grad_accum_steps=1 updates θ on every call, so every call is an "update step";
its RMS(θ) scaling needs θ_{t-1}, which a two-pass implementation reads a second time:
the model counts the single-pass minimum, so such an implementation shows below 100 %.
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
