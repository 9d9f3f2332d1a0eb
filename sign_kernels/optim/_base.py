"""What Lion, Tiger and Simba share: validation, lazy state, grouping, one op call per group.

No math lives here (SPEC.md is implemented by the backends). One ``step()``:

1. validates every group's hyperparameters and every gradient, and resolves the backend of
   every (device, dtypes) bucket -- all before anything is written, so bad input raises and
   leaves params and state as they were;
2. creates missing state (``exp_avg`` or ``sign_counts``, and ``step``, a 0-dim int64 on the
   param's device);
3. calls the backend's op once per bucket of tensors sharing device and dtypes;
4. advances the step counters (not where GradScaler found an inf).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.optim import Optimizer

from .. import _rng
from .. import backends as _backends
from ..distributed import _dtensor

_MOMENTUM_DTYPES = {
    None: None,
    "param": None,
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    torch.float32: torch.float32,
    torch.bfloat16: torch.bfloat16,
    torch.float16: torch.float16,
    torch.float64: torch.float64,
}


def normalize_momentum_dtype(value: Any) -> Optional[torch.dtype]:
    if isinstance(value, str):
        value = value.lower()
    if value not in _MOMENTUM_DTYPES:
        raise ValueError(
            f"momentum_dtype must be None (the parameter's dtype), torch.float32 or torch.bfloat16, got {value!r}"
        )
    return _MOMENTUM_DTYPES[value]


def _check_lr(lr: Any, where: str) -> None:
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"{where}: lr must be a float or a 1-element tensor, got shape {tuple(lr.shape)}")
        if lr.device.type == "cpu" and not (float(lr) >= 0.0):  # a device lr is not read (no sync)
            raise ValueError(f"{where}: lr must be >= 0, got {float(lr)}")
        return
    if not isinstance(lr, (int, float)) or not (lr >= 0.0) or math.isinf(lr):
        raise ValueError(f"{where}: lr must be a finite float >= 0, got {lr!r}")


def _check_unit(name: str, value: Any, where: str) -> None:
    if not isinstance(value, (int, float)) or not (0.0 <= value < 1.0):
        raise ValueError(f"{where}: {name} must be in [0, 1), got {value!r}")


def _check_nonneg(name: str, value: Any, where: str) -> None:
    if not isinstance(value, (int, float)) or not (value >= 0.0) or math.isinf(value):
        raise ValueError(f"{where}: {name} must be a finite float >= 0, got {value!r}")


class _Bucket:
    """The tensors of one op call: same device, param dtype, grad dtype, state dtype."""

    __slots__ = ("backend", "params", "grads", "positions", "keys", "sharded", "extra")

    def __init__(self, backend):
        self.backend = backend
        self.params: List[torch.Tensor] = []  # what the kernels update: local shards of DTensors
        self.grads: List[torch.Tensor] = []
        self.positions: List[int] = []  # position of each param in its group
        self.keys: List[torch.Tensor] = []  # the params as the optimizer holds them (state keys)
        self.sharded = False  # holds DTensor params (sign_kernels.distributed._dtensor)
        self.extra: tuple = ()  # trailing op arguments (Tiger's statistics of sharded tensors)


class SignOptimizer(Optimizer):
    """Base class; subclasses set the op, the state key and the hyperparameter checks."""

    _op_name: str = ""
    _state_key: str = ""
    # GradScaler sets ``self.grad_scale``/``self.found_inf`` and calls step(): the kernels
    # unscale and skip on the device, with no host synchronisation.
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults: Dict[str, Any]):
        if defaults["backend"] not in _backends.CHOICES:
            raise ValueError(f"backend must be one of {_backends.CHOICES}, got {defaults['backend']!r}")
        defaults["momentum_dtype"] = normalize_momentum_dtype(defaults.get("momentum_dtype"))
        self._seed_cache: Dict[int, Tuple[tuple, List[int]]] = {}
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ validation
    def _where(self, group_index: int) -> str:
        return f"{type(self).__name__} param group {group_index}"

    def _validate_hparams(self, group: Dict[str, Any], where: str) -> None:
        raise NotImplementedError

    def _validate_group(self, group: Dict[str, Any], group_index: int, params: bool = True) -> None:
        """Check a group's options (every step) and its params (when added or loaded)."""
        where = self._where(group_index)
        if group["backend"] not in _backends.CHOICES:
            raise ValueError(f"{where}: backend must be one of {_backends.CHOICES}, got {group['backend']!r}")
        group["momentum_dtype"] = normalize_momentum_dtype(group.get("momentum_dtype"))
        if not isinstance(group.get("seed", 0), int):
            raise ValueError(f"{where}: seed must be an int, got {group['seed']!r}")
        self._validate_hparams(group, where)
        if not params:
            return
        for i, p in enumerate(group["params"]):
            if not p.is_floating_point():
                raise ValueError(f"{where}: param {i} has dtype {p.dtype}; parameters must be floating point")
            if group["backend"] != "auto":
                # An explicit backend that cannot take these tensors fails now, not at step().
                reason = _backends.unsupported_reason(
                    group["backend"], p.device, p.dtype, p.dtype, self._state_dtype(group, p)
                )
                if reason is None:
                    _backends.get(group["backend"])
                else:
                    raise _backends.BackendUnavailableError(f"{where}: param {i}: {reason}")

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._validate_group(self.param_groups[-1], len(self.param_groups) - 1)

    # ------------------------------------------------------------------ state
    def _state_dtype(self, group: Dict[str, Any], p: torch.Tensor) -> torch.dtype:
        return group["momentum_dtype"] or p.dtype

    def _init_state(self, group: Dict[str, Any], p: torch.Tensor, state: Dict[str, Any]) -> None:
        # zeros_like: a DTensor param gets a DTensor state with its placements (1/N per rank).
        state[self._state_key] = torch.zeros_like(
            p, dtype=self._state_dtype(group, p), memory_format=torch.contiguous_format, requires_grad=False
        )
        state["step"] = torch.zeros((), dtype=torch.int64, device=p.device)

    def _group_seeds(self, group: Dict[str, Any], offset: int) -> List[int]:
        """SR seeds of the group's params (cached while seed, offset and size hold)."""
        key = (group["seed"], offset, len(group["params"]))
        cached = self._seed_cache.get(id(group))
        if cached is None or cached[0] != key:
            seeds = [_rng.tensor_seed(group["seed"], offset + j) for j in range(len(group["params"]))]
            cached = self._seed_cache[id(group)] = (key, seeds)
        return cached[1]

    # ------------------------------------------------------------------ the step
    def _plan(self) -> List[Tuple[Dict[str, Any], int, List[_Bucket]]]:
        """Validate everything and group the tensors; writes nothing."""
        plan = []
        offset = 0
        dtensor = _dtensor.dtensor_class()  # None until torch.distributed.tensor is imported
        for gi, group in enumerate(self.param_groups):
            self._validate_group(group, gi, params=False)
            where = self._where(gi)
            buckets: Dict[tuple, _Bucket] = {}
            for j, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError(f"{where}: param {j} has a sparse gradient; sign optimizers need dense gradients")
                if g.shape != p.shape:
                    raise RuntimeError(
                        f"{where}: param {j} has shape {tuple(p.shape)} but its grad has shape {tuple(g.shape)}"
                    )
                if g.device != p.device:
                    raise RuntimeError(f"{where}: param {j} is on {p.device} but its grad is on {g.device}")
                if not g.is_floating_point():
                    raise RuntimeError(f"{where}: param {j} has a {g.dtype} grad; gradients must be floating point")
                state = self.state.get(p)
                sdt = state[self._state_key].dtype if state else self._state_dtype(group, p)
                key = (p.device, p.dtype, g.dtype, sdt)
                bucket = buckets.get(key)
                if bucket is None:
                    try:
                        backend = _backends.choose(group["backend"], p.device, p.dtype, g.dtype, sdt)
                    except _backends.BackendUnavailableError as exc:
                        raise _backends.BackendUnavailableError(f"{where}: param {j}: {exc}") from None
                    bucket = buckets[key] = _Bucket(backend)
                bucket.keys.append(p)
                if dtensor is not None and isinstance(p, dtensor):
                    p, g = _dtensor.local_pair(p, g, dtensor, where, j)
                    bucket.sharded = True
                bucket.params.append(p)
                bucket.grads.append(g)
                bucket.positions.append(j)
            plan.append((group, offset, list(buckets.values())))
            offset += len(group["params"])
        return plan

    def _op_args(self, group: Dict[str, Any], bucket: _Bucket, lr: float, lr_t: Optional[torch.Tensor]) -> tuple:
        """The op's hyperparameter arguments between ``steps`` and ``grad_scale``."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step (one fused op call per device/dtype bucket)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale: Optional[torch.Tensor] = getattr(self, "grad_scale", None)
        found_inf: Optional[torch.Tensor] = getattr(self, "found_inf", None)

        plan = self._plan()
        if any(b.sharded for _, _, bs in plan for b in bs):
            self._prepare_sharded(plan, grad_scale)
        for group, offset, buckets in plan:
            seeds = self._group_seeds(group, offset)
            for bucket in buckets:
                self._run_bucket(group, bucket, [seeds[j] for j in bucket.positions], grad_scale, found_inf)
        return loss

    def _prepare_sharded(self, plan, grad_scale: Optional[torch.Tensor]) -> None:
        """Collectives a sharded step needs before its op calls (none: element-wise math)."""

    def _run_bucket(self, group, bucket: _Bucket, seeds: List[int], grad_scale, found_inf) -> None:
        states = []
        for p in bucket.keys:
            state = self.state[p]
            if not state:
                self._init_state(group, p, state)
            states.append(state)
        device = bucket.params[0].device
        bufs = [s[self._state_key] for s in states]
        if bucket.sharded:
            bufs = _dtensor.local_states(bufs)
        steps = [s["step"] for s in states]
        gs = grad_scale.to(device, non_blocking=True) if grad_scale is not None else None
        fi = found_inf.to(device, non_blocking=True) if found_inf is not None else None

        params = bucket.params
        grads = bucket.grads
        staged = None
        if bucket.backend.name != "reference":
            # The fused kernels take contiguous tensors; a non-contiguous param is updated
            # through a contiguous copy written back afterwards.
            if not all(p.is_contiguous() for p in params):
                staged = [(i, p) for i, p in enumerate(params) if not p.is_contiguous()]
                params = list(params)
                for i, p in staged:
                    params[i] = p.contiguous()
            if not all(g.is_contiguous() for g in grads):
                grads = [g.contiguous() for g in grads]

        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            lr_f, lr_t = 0.0, lr.to(device=device, dtype=torch.float32, non_blocking=True).reshape(())
        else:
            lr_f, lr_t = float(lr), None
        fn = bucket.backend.fn(self._op_name)
        fn(params, grads, bufs, steps, *self._op_args(group, bucket, lr_f, lr_t), gs, fi, seeds,
           bool(group["stochastic_rounding"]), *bucket.extra)
        if staged is not None:
            for i, p in staged:
                p.copy_(params[i])
        if fi is None:
            torch._foreach_add_(steps, 1)
        else:
            # GradScaler skipped the step on the device: the count advances by 1 - found_inf.
            torch._foreach_add_(steps, 1 - fi.to(torch.int64))

    # ------------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a checkpoint, keeping every state tensor's dtype exactly.

        ``torch.optim.Optimizer.load_state_dict`` casts state to the parameter's dtype, which
        would round an fp32 momentum of bf16 params and turn int16 Simba counters into floats.
        The state is re-taken from the checkpoint here with the dtype the optimizer uses. A
        checkpoint without ``step`` (lion-pytorch, timm) starts the counters at 0.
        """
        saved = {k: dict(v) for k, v in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        index = 0
        for gi, group in enumerate(self.param_groups):
            for key, value in self.defaults.items():  # options a foreign checkpoint lacks
                group.setdefault(key, value)
            self._validate_group(group, gi)
            for p in group["params"]:
                src = saved.get(index)
                index += 1
                if src is None or p not in self.state:
                    continue
                state = self.state[p]
                if self._state_key not in src:
                    raise KeyError(
                        f"{type(self).__name__}.load_state_dict: the state of param {index - 1} has no "
                        f"{self._state_key!r} (keys: {sorted(src)})"
                    )
                buf = src[self._state_key]
                dtype = self._state_dtype(group, p)
                state[self._state_key] = buf.to(device=p.device, dtype=dtype, copy=True).contiguous()
                step = src.get("step")
                step = torch.zeros((), dtype=torch.int64) if step is None else torch.as_tensor(step)
                state["step"] = step.to(device=p.device, dtype=torch.int64, copy=True).reshape(())
