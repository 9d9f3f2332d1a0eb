"""``convert_momentum``: change the format of an optimizer's momentum in place, explicitly.

A checkpoint keeps its momentum format (torch's convention: options come from the checkpoint),
so changing it is a call of its own: fp32/bf16 -> int8 quantizes (to shrink a running job),
int8 -> fp32/bf16 dequantizes (to inspect the momentum, or hand it to another library).
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch

from .. import _quant
from ..distributed import _dtensor
from ._base import SignOptimizer, normalize_momentum_dtype


def _local(t):
    return getattr(t, "_local_tensor", t)


def _wrap_like(template, local: torch.Tensor):
    """``local`` as the local shard of a tensor laid out like ``template`` (or plain)."""
    cls = _dtensor.dtensor_class()
    if cls is not None and isinstance(template, cls):
        return cls.from_local(local, template.device_mesh, template.placements, run_check=False,
                              shape=template.shape, stride=template.stride())
    return local


def convert_momentum(optimizer: SignOptimizer, dtype: Any) -> None:
    """Convert every param's momentum of ``optimizer`` (Lion, Tiger, DistributedLion) to ``dtype``.

    ``dtype``: None (each param's own dtype), torch.float32, torch.bfloat16 or torch.int8 (8-bit
    momentum: 0/1-d tensors keep fp32, as when training starts that way). int8 -> float
    dequantizes exactly (every code is a value of the target dtype's range; bf16 rounds it);
    float -> int8 quantizes with the rounding of a step (NOTE: [int8 momentum]: unbiased, with
    the bits of the param's seed and step count). Sets every group's ``momentum_dtype``. All or
    nothing: everything is computed and checked first; an error leaves the optimizer as it was.
    """
    where = f"sign_kernels.convert_momentum({type(optimizer).__name__})"
    if getattr(optimizer, "_state_key", None) != "exp_avg":
        raise ValueError(f"{where}: {type(optimizer).__name__} keeps no float momentum to convert "
                         f"({getattr(optimizer, '_state_key', None)!r}); only Lion and Tiger do")
    try:
        target = normalize_momentum_dtype(dtype)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    new_groups: List[Dict[str, Any]] = []
    for gi, group in enumerate(optimizer.param_groups):
        ng = dict(group, momentum_dtype=target)
        optimizer._check_group(ng, gi, params=True)  # e.g. int8 of fp64 params is refused here
        new_groups.append(ng)
    dtensor = _dtensor.dtensor_class()
    updates = []
    offset = 0
    for gi, (group, ng) in enumerate(zip(optimizer.param_groups, new_groups)):
        seeds = optimizer._group_seeds(group, offset)
        offset += len(group["params"])
        for j, p in enumerate(group["params"]):
            state = optimizer.state.get(p)
            if not state or "exp_avg" not in state:
                continue
            m = state["exp_avg"]
            want = optimizer._state_dtype(ng, p)
            if want == torch.int8 and dtensor is not None and isinstance(p, dtensor):
                _dtensor.check_int8_sharding(p, f"{where}: param group {gi}", j, _quant.scale_shape)
            local = _local(m)
            if m.dtype == torch.int8:
                value = _quant.dequantize(local, _local(state["exp_avg_scale"]))
            else:
                value = local.to(torch.float32)
            new = {}
            if want == torch.int8:
                step = int(state["step"]) if "step" in state else 0
                codes, scale = _quant.quantize(value, _quant.state_key(seeds[j], step))
                new["exp_avg"] = _wrap_like(m, codes)
                template = _dtensor.zeros_scales(p, _quant.scale_shape)
                _local(template).copy_(scale)
                new["exp_avg_scale"] = template
            else:
                new["exp_avg"] = _wrap_like(m, value.to(want).contiguous())
            updates.append((p, new))
    for p, new in updates:
        state = optimizer.state[p]
        state.pop("exp_avg_scale", None)
        state.update(new)
    for group, ng in zip(optimizer.param_groups, new_groups):
        group["momentum_dtype"] = ng["momentum_dtype"]
