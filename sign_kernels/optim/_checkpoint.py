"""Checkpoints: loading our own state dicts exactly, refusing other optimizers' clearly.

``SignOptimizer.load_state_dict`` is all-or-nothing: it checks the whole state dict and builds
the new state and param groups aside, and only then replaces the optimizer's (one assignment).
A call that raises leaves the optimizer exactly as it was.

What it keeps that ``torch.optim.Optimizer.load_state_dict`` would not: the dtype of every
state tensor (torch casts state to the parameter's dtype, which rounds an fp32 momentum of
bf16 params and turns int16 Simba counters into floats).

What it refuses: a state dict of another optimizer (AdamW, SGD, or another of our three). Its
hyperparameters and state mean something else; loading them silently would change the run.
:func:`load_momentum` is the explicit way to start Lion or Tiger from another optimizer's
first moment while keeping this optimizer's hyperparameters. lion-pytorch's and timm's Lion
keep the same ``exp_avg`` and ``betas`` as ours and load as our own checkpoints do (their
missing ``step`` starts at 0).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Mapping
from itertools import chain
from typing import Any, Dict, List, Optional, Tuple

import torch

from .. import _quant
from ..distributed import _dtensor

# Group and state keys that identify other optimizers' checkpoints (for the error message).
_ADAM_KEYS = {"eps", "amsgrad"}
_ADAM_STATE = {"exp_avg_sq", "max_exp_avg_sq"}
_SGD_KEYS = {"momentum", "nesterov", "dampening"}
_OTHER_TORCH_KEYS = {"rho", "lr_decay", "initial_accumulator_value", "alpha", "centered", "lambd", "t0", "etas",
                     "step_sizes", "momentum_decay", "max_iter", "history_size", "tolerance_grad"}
# The distinguishing hyperparameter keys of our own optimizers' groups.
FAMILY_KEYS = {
    "Lion": {"betas"},
    "Tiger": {"beta", "grad_accum_steps", "shrink_ratio"},
    "Simba": {"window_size", "threshold"},
}
FAMILY_STATE = {"Lion": "exp_avg", "Tiger": "exp_avg", "Simba": "sign_counts"}
# 8-bit momentum's block scales and the correction byte (Lion, Tiger).
COMPRESSED_STATE = {"exp_avg_scale", "residual"}


def _identify(group_keys: set, state_keys: set) -> str:
    if group_keys & _ADAM_KEYS or state_keys & _ADAM_STATE:
        return "a torch.optim Adam/AdamW state dict"
    if group_keys & _SGD_KEYS or "momentum_buffer" in state_keys:
        return "a torch.optim SGD state dict"
    if group_keys & _OTHER_TORCH_KEYS:
        return "the state dict of another torch.optim optimizer"
    if group_keys & FAMILY_KEYS["Simba"] or "sign_counts" in state_keys:
        return "a Simba state dict"
    if group_keys & FAMILY_KEYS["Tiger"]:
        return "a Tiger state dict"
    if group_keys & FAMILY_KEYS["Lion"]:
        return "a Lion state dict (sign_kernels, lion-pytorch or timm)"
    return "the state dict of another optimizer"


def foreign_reason(opt, saved_groups: List[dict], saved_state: Mapping) -> Optional[str]:
    """Why ``saved_*`` is not a checkpoint of ``opt``'s algorithm, or None."""
    family = opt._family
    group_keys = set(chain.from_iterable(g.keys() for g in saved_groups)) - {"params", "param_names"}
    state_keys = set(chain.from_iterable(v.keys() for v in saved_state.values() if isinstance(v, Mapping)))
    evidence = []
    others = set(_ADAM_KEYS | _SGD_KEYS | _OTHER_TORCH_KEYS)
    for name, keys in FAMILY_KEYS.items():
        if name != family:
            others |= keys - FAMILY_KEYS[family]
    if group_keys & others:
        evidence.append(f"its param groups have {sorted(group_keys & others)}")
    unknown_state = state_keys - {FAMILY_STATE[family], "step"} - (COMPRESSED_STATE if family != "Simba" else set())
    if unknown_state:
        evidence.append(f"its state has {sorted(unknown_state)}")
    for gi, g in enumerate(saved_groups):
        missing = sorted(FAMILY_KEYS[family] & set(opt.defaults) - set(g))
        if family == "Tiger":  # older Tiger checkpoints may lack the newer options, never beta
            missing = [k for k in missing if k == "beta"]
        if missing:
            evidence.append(f"param group {gi} lacks {missing}")
            break
    if not evidence:
        return None
    what = _identify(group_keys, state_keys)
    if FAMILY_STATE[family] == "exp_avg" and "exp_avg" in state_keys:
        hint = (f" To start {family} from that optimizer's first moment with {family}'s own hyperparameters, use "
                "sign_kernels.load_momentum(optimizer, state_dict) (README, 'Checkpoints').")
    elif family == "Simba":
        hint = " Simba keeps int16 sign counters; no float momentum converts to them exactly: start Simba fresh."
    else:
        hint = ""
    return f"this is {what}, not a {family} checkpoint: {'; '.join(evidence)}. Nothing was loaded.{hint}"


def _check_layout(opt, saved_groups: List[dict], where: str) -> None:
    groups = opt.param_groups
    if len(groups) != len(saved_groups):
        raise ValueError(
            f"loaded state dict has a different number of parameter groups ({where}: the checkpoint has "
            f"{len(saved_groups)}, this optimizer has {len(groups)}); nothing was loaded"
        )
    for gi, (g, s) in enumerate(zip(groups, saved_groups)):
        if len(g["params"]) != len(s["params"]):
            raise ValueError(
                f"loaded state dict contains a parameter group that doesn't match the size of optimizer's group "
                f"({where}: param group {gi} has {len(s['params'])} params in the checkpoint, "
                f"{len(g['params'])} here); nothing was loaded"
            )


def _check_structure(state_dict: Any, where: str) -> Tuple[List[dict], Mapping]:
    if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError(
            f"{where}: expected what optimizer.state_dict() returns, a dict with 'state' and 'param_groups'; "
            f"got {type(state_dict).__name__}"
            + (f" with keys {sorted(map(str, state_dict))}" if isinstance(state_dict, Mapping) else "")
        )
    groups, state = state_dict["param_groups"], state_dict["state"]
    if not isinstance(groups, (list, tuple)) or not all(isinstance(g, Mapping) and "params" in g for g in groups):
        raise ValueError(f"{where}: 'param_groups' must be a list of dicts, each with 'params'")
    if not isinstance(state, Mapping) or not all(isinstance(v, Mapping) for v in state.values()):
        raise ValueError(f"{where}: 'state' must map parameter ids to dicts of state")
    return list(groups), state


def _step_tensor(value: Any, device: torch.device, what: str) -> torch.Tensor:
    if value is None:
        return torch.zeros((), dtype=torch.int64, device=device)
    t = torch.as_tensor(value).detach()
    if t.numel() != 1 or t.is_complex():
        raise ValueError(f"{what}: 'step' must be a single number, got shape {tuple(t.shape)}")
    v = float(t.reshape(()).to("cpu", torch.float64))
    if not (v >= 0 and v == int(v)):
        raise ValueError(f"{what}: 'step' must be a whole number >= 0, got {v}")
    return torch.full((), int(v), dtype=torch.int64, device=device)


def build_loaded(opt, state_dict: Any) -> Tuple[Dict[torch.Tensor, dict], List[dict]]:
    """The state and param groups ``opt`` would have after loading ``state_dict``; changes nothing."""
    where = f"{type(opt).__name__}.load_state_dict"
    saved_groups, saved_state = _check_structure(state_dict, where)
    reason = foreign_reason(opt, saved_groups, saved_state)
    if reason is not None:
        raise ValueError(f"{where}: {reason}")
    _check_layout(opt, saved_groups, where)

    new_groups = []
    id_map: Dict[Any, Tuple[torch.Tensor, int, int]] = {}
    for gi, (group, saved) in enumerate(zip(opt.param_groups, saved_groups)):
        layout = saved.get("momentum_layout")
        if layout is not None and layout != _quant.LAYOUT:
            raise ValueError(
                f"{where}: param group {gi}: the checkpoint's int8 momentum has layout {layout!r}, this version of "
                f"sign_kernels reads {_quant.LAYOUT!r}; convert it with the version that wrote it "
                "(sign_kernels.convert_momentum(optimizer, torch.float32), then save) and load that. Nothing was loaded"
            )
        ng = copy.deepcopy({k: v for k, v in saved.items() if k not in ("params", "momentum_layout")})
        ng["params"] = group["params"]
        if "param_names" in group and "param_names" not in ng:
            ng["param_names"] = group["param_names"]
        for key in opt.defaults:  # options an older or foreign-format checkpoint lacks keep their values
            if key not in ng:
                ng[key] = group[key]
        ng.update(opt._check_group(ng, gi, params=True))
        new_groups.append(ng)
        for j, (pid, p) in enumerate(zip(saved["params"], group["params"])):
            id_map[pid] = (p, gi, j)

    new_state: Dict[torch.Tensor, dict] = defaultdict(dict)
    for pid, entry in saved_state.items():
        if pid not in id_map:
            raise ValueError(f"{where}: the checkpoint has state for param {pid!r}, which none of its param groups lists")
        p, gi, j = id_map[pid]
        if not entry:
            continue
        what = f"{where}: param group {gi}, param {j} (id {pid!r})"
        buf = entry.get(opt._state_key)
        if not isinstance(buf, torch.Tensor):
            raise ValueError(f"{what}: its state has no tensor {opt._state_key!r} (keys: {sorted(map(str, entry))})")
        if tuple(buf.shape) != tuple(p.shape):
            raise ValueError(f"{what}: {opt._state_key!r} has shape {tuple(buf.shape)}, the parameter {tuple(p.shape)}")
        opt._check_state_tensor(buf, what)
        group = new_groups[gi]
        dtype = opt._state_dtype(group, p)
        if (buf.dtype == torch.int8) != (dtype == torch.int8):
            raise ValueError(
                f"{what}: {opt._state_key!r} is {buf.dtype} but the param group's momentum_dtype gives {dtype}; "
                "a checkpoint keeps its momentum format (convert explicitly with sign_kernels.convert_momentum)"
            )
        state = {opt._state_key: opt._restore_state_tensor(p, buf, dtype)}
        if dtype == torch.int8:
            if saved_groups[gi].get("momentum_layout") != _quant.LAYOUT:
                raise ValueError(f"{what}: int8 momentum without its layout in the checkpoint's param group "
                                 "('momentum_layout'): not a checkpoint of 8-bit momentum this version can read")
            sc = entry.get("exp_avg_scale")
            want = _quant.scale_shape(p.shape)
            if not isinstance(sc, torch.Tensor) or tuple(sc.shape) != want or not sc.is_floating_point():
                raise ValueError(f"{what}: int8 momentum needs 'exp_avg_scale', a float tensor of shape {want}, got "
                                 f"{type(sc).__name__ if not isinstance(sc, torch.Tensor) else (sc.dtype, tuple(sc.shape))}")
            state["exp_avg_scale"] = opt._restore_like(_dtensor.zeros_scales(p, _quant.scale_shape), sc, torch.bfloat16)
        if opt._corrected(group, p):
            r = entry.get("residual")
            if r is None:  # saved without the correction byte: the 16-bit weight is the whole weight
                r = torch.zeros(p.shape, dtype=torch.int8)
            if not isinstance(r, torch.Tensor) or tuple(r.shape) != tuple(p.shape) or r.is_floating_point():
                raise ValueError(f"{what}: 'residual' must be an int8 tensor of the param's shape {tuple(p.shape)}")
            state["residual"] = opt._restore_state_tensor(p, r, torch.int8)
        state["step"] = _step_tensor(entry.get("step"), p.device, what)
        new_state[p] = state
    return new_state, new_groups


def load_momentum(optimizer, state_dict: Any, key: str = "exp_avg") -> None:
    """Start ``optimizer``'s momentum from another optimizer's, keeping its own hyperparameters.

    The explicit migration for a state dict that ``load_state_dict`` refuses as foreign: e.g.
    AdamW's, lion-pytorch's or Tiger's ``exp_avg`` into Lion, or AdamW's or Lion's into Tiger.
    Params are matched by position (the param groups must have the same sizes); each param
    with a saved ``key`` gets it as its momentum, cast to this optimizer's state dtype, and its
    step count restarts at 0. Hyperparameters, other params' state and everything else of the
    saved dict are ignored. All-or-nothing, as ``load_state_dict``.
    """
    where = f"sign_kernels.load_momentum({type(optimizer).__name__})"
    if getattr(optimizer, "_state_key", None) != "exp_avg":
        raise ValueError(
            f"{where}: {type(optimizer).__name__} keeps no float momentum "
            f"({getattr(optimizer, '_state_key', None)!r}); only Lion and Tiger take one"
        )
    saved_groups, saved_state = _check_structure(state_dict, where)
    _check_layout(optimizer, saved_groups, where)
    updates = {}
    for gi, (group, saved) in enumerate(zip(optimizer.param_groups, saved_groups)):
        for j, (pid, p) in enumerate(zip(saved["params"], group["params"])):
            entry = saved_state.get(pid)
            if not entry or key not in entry:
                continue
            buf = entry[key]
            what = f"{where}: param group {gi}, param {j}"
            if not isinstance(buf, torch.Tensor) or not buf.is_floating_point():
                raise ValueError(f"{what}: {key!r} must be a floating-point tensor, got {type(buf).__name__}")
            if tuple(buf.shape) != tuple(p.shape):
                raise ValueError(f"{what}: {key!r} has shape {tuple(buf.shape)}, the parameter {tuple(p.shape)}")
            updates[p] = {
                "exp_avg": optimizer._restore_state_tensor(p, buf, optimizer._state_dtype(group, p)),
                "step": torch.zeros((), dtype=torch.int64, device=p.device),
            }
    if not updates:
        raise ValueError(f"{where}: the state dict holds no {key!r} for any parameter; nothing was loaded")
    for p, state in updates.items():
        optimizer.state[p] = state
