"""What Lion, Tiger and Simba share: validation, lazy state, grouping, one op call per group.

No math lives here (docs/rules.md is implemented by the backends). One ``step()``:

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
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.optim import Optimizer

from .. import _quant, _rng
from .. import backends as _backends
from ..distributed import _dtensor
from . import _checkpoint, _clip

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
    "float64": torch.float64,
    torch.int8: torch.int8,  # 8-bit momentum (NOTE: [int8 momentum] in csrc/core/sign_math.h)
    "int8": torch.int8,
}


def normalize_momentum_dtype(value: Any) -> Optional[torch.dtype]:
    if isinstance(value, str):
        value = value.lower()
    if value not in _MOMENTUM_DTYPES:
        raise ValueError(
            "momentum_dtype must be None (the parameter's dtype), torch.float32, torch.bfloat16 or torch.int8 "
            f"(8-bit momentum), got {value!r}"
        )
    return _MOMENTUM_DTYPES[value]


# NOTE: [torch's wording] Where torch.optim has a message for the same rule, ours starts with
# torch's words (users grep for them, torch's generic optimizer tests match them), and goes on
# with the group and the rule in our words.
def _check_lr(lr: Any, where: str) -> None:
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element ({where}: lr is a tensor of shape {tuple(lr.shape)})")
        if not lr.is_floating_point():
            raise ValueError(f"{where}: a tensor lr must be floating point, got {lr.dtype}")
        if lr.device.type == "cpu" and not (float(lr) >= 0.0):  # a device lr is not read (no sync)
            raise ValueError(f"Invalid learning rate: {float(lr)} ({where}: lr must be >= 0)")
        return
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise ValueError(f"{where}: lr must be a finite float >= 0 or a 1-element tensor, got {lr!r}")
    if not (lr >= 0.0) or math.isinf(lr):
        raise ValueError(f"Invalid learning rate: {lr} ({where}: lr must be a finite float >= 0)")


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_unit(name: str, value: Any, where: str, torch_name: Optional[str] = None) -> None:
    if not _is_real(value) or not (0.0 <= value < 1.0):
        prefix = f"Invalid {torch_name}: {value} (" if torch_name else ""
        suffix = ")" if torch_name else ""
        raise ValueError(f"{prefix}{where}: {name} must be in [0, 1), got {value!r}{suffix}")


def _check_betas(betas: Any, where: str) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{where}: betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        _check_unit(f"betas[{i}]", b, where, torch_name=f"beta parameter at index {i}")


def _check_nonneg(name: str, value: Any, where: str) -> None:
    if not _is_real(value) or not (value >= 0.0) or math.isinf(value):
        prefix = f"Invalid {name} value: {value} (" if name == "weight_decay" else ""
        suffix = ")" if prefix else ""
        raise ValueError(f"{prefix}{where}: {name} must be a finite float >= 0, got {value!r}{suffix}")


# The constructor flags every torch.optim optimizer takes, and what ours do with them
# (README "torch.optim flags"): maximize and capturable are honoured; fused=True demands a
# fused backend; foreach and differentiable have no meaning here beyond their defaults.
TORCH_FLAG_DEFAULTS = dict(maximize=False, foreach=None, capturable=False, differentiable=False, fused=None)

# The keyword options every sign optimizer takes, with their defaults: the one place they are
# declared (each constructor names its algorithm's hyperparameters and passes **options here).
# They become group options, as in torch.optim, checked by _check_options.
COMMON_OPTIONS: Dict[str, Any] = dict(
    max_grad_norm=None,        # clipping inside the step (optim/_clip.py)
    backend="auto",
    momentum_dtype=None,       # None (the param's), float32, bfloat16, int8 (8-bit momentum)
    error_correction=False,    # the correction byte of 16-bit params
    stochastic_rounding=False,
    seed=0,
    **TORCH_FLAG_DEFAULTS,
)


def _check_flags(group: Dict[str, Any], where: str) -> None:
    for name in ("maximize", "capturable", "differentiable"):
        if not isinstance(group[name], bool):
            raise ValueError(f"{where}: {name} must be a bool, got {group[name]!r}")
    for name in ("foreach", "fused"):
        if group[name] is not None and not isinstance(group[name], bool):
            raise ValueError(f"{where}: {name} must be None or a bool, got {group[name]!r}")
    if group["differentiable"]:
        raise ValueError(
            f"{where}: differentiable=True is not supported: the update is a sign (zero gradient almost "
            "everywhere) written in place by fused kernels, so there is nothing to differentiate through"
        )
    if group["foreach"] is not None:
        raise ValueError(
            f"{where}: foreach={group['foreach']} has no meaning here: the fused backends ('cpu', 'cuda', "
            "'triton') already update every tensor of a group in one multi-tensor pass, and backend='reference' "
            "is the per-tensor loop; leave foreach=None and choose with backend=..."
        )
    if group["fused"] is False:
        raise ValueError(
            f"{where}: fused=False: the unfused per-tensor implementation is backend='reference'; pass that "
            "instead (fused=None lets backend='auto' choose)"
        )
    if group["fused"] and group["backend"] == "reference":
        raise ValueError(f"{where}: fused=True demands a fused backend ('cpu', 'cuda' or 'triton'), got backend='reference'")
    if group["capturable"] and group["backend"] == "reference":
        raise ValueError(
            f"{where}: capturable=True needs a backend that never reads device scalars on the host; "
            "backend='reference' reads the step counts and found_inf on the host (use 'cuda' or 'triton')"
        )
    if not isinstance(group["stochastic_rounding"], bool):
        raise ValueError(f"{where}: stochastic_rounding must be a bool, got {group['stochastic_rounding']!r}")
    seed = group["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{where}: seed must be an int, got {seed!r}")


class _Bucket:
    """The tensors of one op call: same device, param dtype, grad dtype, state dtype."""

    __slots__ = ("backend", "params", "grads", "positions", "keys", "sharded", "extra", "clip_at")

    def __init__(self, backend):
        self.backend = backend
        self.params: List[torch.Tensor] = []  # what the kernels update: local shards of DTensors
        self.grads: List[torch.Tensor] = []
        self.positions: List[int] = []  # position of each param in its group
        self.keys: List[torch.Tensor] = []  # the params as the optimizer holds them (state keys)
        self.sharded = False  # holds DTensor params (sign_kernels.distributed._dtensor)
        self.extra: tuple = ()  # trailing op arguments (Tiger's statistics of sharded tensors)
        self.clip_at = -1  # with max_grad_norm: the index of its first tensor's sum in the step's norm vector


class SignOptimizer(Optimizer):
    """Base class; subclasses set the op, the state key and the hyperparameter checks.

    Every public call is all-or-nothing: construction, ``add_param_group``, ``step`` and
    ``load_state_dict`` validate everything first and only then change the optimizer, so a call
    that raises leaves params, state and param groups exactly as they were.
    """

    _op_name: str = ""
    _state_key: str = ""
    # GradScaler sets ``self.grad_scale``/``self.found_inf`` and calls step(): the kernels
    # unscale and skip on the device, with no host synchronisation.
    _step_supports_amp_scaling = True
    # "Lion", "Tiger" or "Simba": whose checkpoints load as this optimizer's own (_checkpoint.py).
    _family: str = ""
    # The backends whose kernels implement 8-bit momentum and the correction byte for this
    # optimizer's op; backend="auto" takes the reference elsewhere (and says so in the log).
    _compressed_backends: frozenset = frozenset({"reference"})

    def __init__(self, params, hparams: Dict[str, Any], options: Optional[Dict[str, Any]] = None):
        options = dict(options or {})
        unknown = sorted(set(options) - set(COMMON_OPTIONS))
        if unknown:  # Python's own wording for a misspelt keyword
            raise TypeError(f"{type(self).__name__}.__init__() got an unexpected keyword argument {unknown[0]!r}")
        defaults = dict(hparams)
        for name, value in COMMON_OPTIONS.items():
            defaults[name] = options.get(name, value)
        # torch.optim validates hyperparameters before it looks at params (torch's error order).
        defaults.update(self._check_options(defaults, f"{type(self).__name__}"))
        self._reset_caches()
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ validation
    def _where(self, group_index: int) -> str:
        return f"{type(self).__name__} param group {group_index}"

    def _validate_hparams(self, group: Dict[str, Any], where: str) -> None:
        raise NotImplementedError

    def _check_options(self, group: Dict[str, Any], where: str) -> Dict[str, Any]:
        """Check a group's options without changing it; returns the normalised values to set."""
        self._validate_hparams(group, where)
        if group["backend"] not in _backends.CHOICES:
            raise ValueError(f"{where}: backend must be one of {_backends.CHOICES}, got {group['backend']!r}")
        try:
            momentum_dtype = normalize_momentum_dtype(group.get("momentum_dtype"))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        _check_flags(group, where)
        _clip.check_max_grad_norm(group.get("max_grad_norm"), where)
        ec = group.get("error_correction", False)
        if not isinstance(ec, bool):
            raise ValueError(f"{where}: error_correction must be a bool, got {ec!r}")
        if ec and group["stochastic_rounding"]:
            raise ValueError(
                f"{where}: error_correction=True and stochastic_rounding=True are exclusive: both are ways to keep "
                "the bits a 16-bit weight drops (the correction byte keeps them exactly, stochastic rounding on "
                "average); choose one"
            )
        return {"momentum_dtype": momentum_dtype}

    def _check_group(self, group: Dict[str, Any], group_index: int, params: bool = True) -> Dict[str, Any]:
        """Check a group's options (every step) and its params (when added or loaded); changes nothing."""
        where = self._where(group_index)
        updates = self._check_options(group, where)
        if not params:
            return updates
        probe = dict(group, **updates)
        for i, p in enumerate(group["params"]):
            if not p.is_floating_point():
                raise ValueError(f"{where}: param {i} has dtype {p.dtype}; parameters must be floating point")
            if probe["momentum_dtype"] == torch.int8 and p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise ValueError(f"{where}: param {i} is {p.dtype}: int8 momentum is for float32, bfloat16 and float16 "
                                 "params")
            if group["backend"] != "auto" or group["fused"]:
                # An explicit backend (or fused=True) that cannot take these tensors fails now, not at step().
                try:
                    self._resolve_backend(probe, p.device, p.dtype, p.dtype, self._state_dtype(probe, p))
                except _backends.BackendUnavailableError as exc:
                    raise _backends.BackendUnavailableError(f"{where}: param {i}: {exc}") from None
        return updates

    def _validate_group(self, group: Dict[str, Any], group_index: int, params: bool = True) -> None:
        """Check a group and normalise its options in place (only once every check has passed)."""
        group.update(self._check_group(group, group_index, params))

    def _resolve_backend(self, group, device, param_dtype, grad_dtype, state_dtype):
        backend = _backends.choose(group["backend"], device, param_dtype, grad_dtype, state_dtype)
        compressed = state_dtype == torch.int8 or (group.get("error_correction")
                                                   and param_dtype in (torch.bfloat16, torch.float16))
        if compressed and backend.name not in self._compressed_backends:
            what = "int8 momentum" if state_dtype == torch.int8 else "the correction byte"
            if group["backend"] != "auto":
                raise _backends.BackendUnavailableError(
                    f'backend="{backend.name}" does not implement {what} for {type(self).__name__} yet '
                    f"(backends that do: {sorted(self._compressed_backends)})"
                )
            backend = _backends.get("reference")
            _backends.log_fallback(backend.name, f"{type(self).__name__} with {what} on {device.type}")
        if group["fused"] and backend.name == "reference":
            raise _backends.BackendUnavailableError(
                f"fused=True, but no fused backend takes {param_dtype} parameters with {grad_dtype} grads and "
                f"{state_dtype} state on {device.type} (only the reference can)"
            )
        return backend

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a param group (torch.optim's rules, then ours); on any error nothing is added.

        The group dict is left as it was passed when the call fails (torch fills in defaults).
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        before = dict(param_group)
        count = len(self.param_groups)
        try:
            super().add_param_group(param_group)
            self._validate_group(self.param_groups[-1], len(self.param_groups) - 1)
        except BaseException:
            del self.param_groups[count:]
            param_group.clear()
            param_group.update(before)
            raise

    # ------------------------------------------------------------------ state
    def _state_dtype(self, group: Dict[str, Any], p: torch.Tensor) -> torch.dtype:
        dtype = group["momentum_dtype"] or p.dtype
        if dtype == torch.int8 and p.dim() < 2:
            # NOTE: [int8 momentum]: blocks are rows of the last dim; a 0/1-d tensor (a bias, a
            # norm gain: ~0.1 % of a transformer's params) keeps an fp32 momentum, since FSDP2
            # cuts 1-d tensors anywhere, across blocks.
            return torch.float32
        return dtype

    @staticmethod
    def _corrected(group: Dict[str, Any], p: torch.Tensor) -> bool:
        """Whether ``p`` carries a correction byte (error_correction on a bf16/fp16 param)."""
        return bool(group.get("error_correction")) and p.dtype in (torch.bfloat16, torch.float16)

    def _init_state(self, group: Dict[str, Any], p: torch.Tensor, state: Dict[str, Any]) -> None:
        # zeros_like: a DTensor param gets a DTensor state with its placements (1/N per rank).
        dtype = self._state_dtype(group, p)
        state[self._state_key] = torch.zeros_like(
            p, dtype=dtype, memory_format=torch.contiguous_format, requires_grad=False
        )
        if dtype == torch.int8:
            state["exp_avg_scale"] = _dtensor.zeros_scales(p, _quant.scale_shape)
        if self._corrected(group, p):
            state["residual"] = torch.zeros_like(p, dtype=torch.int8, memory_format=torch.contiguous_format)
        state["step"] = torch.zeros((), dtype=torch.int64, device=p.device)

    def _group_seeds(self, group: Dict[str, Any], offset: int) -> List[int]:
        """SR seeds of the group's params (cached while seed, offset and size hold)."""
        key = (group["seed"], offset, len(group["params"]))
        cached = self._seed_cache.get(id(group))
        if cached is None or cached[0] != key:
            seeds = [_rng.tensor_seed(group["seed"], offset + j) for j in range(len(group["params"]))]
            cached = self._seed_cache[id(group)] = (key, seeds)
        return cached[1]

    def _device_scalar(self, device: torch.device, dtype: torch.dtype, value: Optional[float]) -> torch.Tensor:
        """A cached 0-dim tensor on ``device``: a constant (``value``), or a buffer to fill (None)."""
        key = (device, dtype, value)
        t = self._device_scalars.get(key)
        if t is None:
            t = self._device_scalars[key] = torch.full((), 0.0 if value is None else value, dtype=dtype, device=device)
        return t

    # ------------------------------------------------------------------ the step
    def _plan(self, select: Optional[Dict[int, List[int]]] = None) -> List[Tuple[Dict[str, Any], int, List[_Bucket]]]:
        """Validate everything and group the tensors; writes nothing.

        ``select`` ({group index: positions}, step_in_backward's buckets) restricts the plan to
        those params; offsets, and so the SR seeds, stay those of the whole optimizer.
        """
        plan = []
        offset = 0
        _clip.max_norm_of(self.param_groups, self._where)  # one norm over every group: one max_grad_norm
        dtensor = _dtensor.dtensor_class()  # None until torch.distributed.tensor is imported
        for gi, group in enumerate(self.param_groups):
            if select is not None and gi not in select:
                offset += len(group["params"])
                continue
            self._validate_group(group, gi, params=False)
            where = self._where(gi)
            buckets: Dict[tuple, _Bucket] = {}
            positions = range(len(group["params"])) if select is None else select[gi]
            for j in positions:
                p = group["params"][j]
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
                        backend = self._resolve_backend(group, p.device, p.dtype, g.dtype, sdt)
                    except _backends.BackendUnavailableError as exc:
                        raise _backends.BackendUnavailableError(f"{where}: param {j}: {exc}") from None
                    bucket = buckets[key] = _Bucket(backend)
                bucket.keys.append(p)
                if dtensor is not None and isinstance(p, dtensor):
                    if sdt == torch.int8:
                        _dtensor.check_int8_sharding(p, where, j, _quant.scale_shape)
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
        handle = getattr(self, "_step_in_backward", None)
        if handle is not None:
            raise RuntimeError(handle.refusal("step()"))
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale: Optional[torch.Tensor] = getattr(self, "grad_scale", None)
        found_inf: Optional[torch.Tensor] = getattr(self, "found_inf", None)

        self._run_plan(self._plan(), grad_scale, found_inf)
        return loss

    @torch.no_grad()
    def _step_selected(self, select: Dict[int, List[int]]) -> None:
        """step() on some params only ({group index: positions}); step_in_backward's path.

        Same plan, op calls, seeds and hyperparameters as step() gives those params (sharded
        Tiger: its statistics collective per flushed bucket; tested in
        _sharded_cases.case_fsdp_backward). No GradScaler here: its inf check needs every
        gradient (see step_in_backward).
        """
        self._run_plan(self._plan(select), None, None)

    def _run_plan(self, plan, grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor]) -> None:
        """The writes of a validated plan: the norm pass (max_grad_norm), the sharded step's
        collective, then one op call per bucket (NOTE: [clipping inside the step] in _clip.py)."""
        max_norm = self.param_groups[0].get("max_grad_norm") if self.param_groups else None
        clip = _clip.norm_pass(plan, grad_scale, max_norm) if max_norm is not None else None
        if any(b.sharded for _, _, bs in plan for b in bs):
            self._prepare_sharded(plan, grad_scale, found_inf, clip)
        if clip is not None:
            self.grad_norm = _clip.finish(clip, tiger=self._family == "Tiger")
        self._clip_step = clip
        try:
            for group, offset, buckets in plan:
                seeds = self._group_seeds(group, offset)
                for bucket in buckets:
                    self._run_bucket(group, bucket, [seeds[j] for j in bucket.positions], grad_scale, found_inf)
        finally:
            self._clip_step = None

    def _prepare_sharded(self, plan, grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor],
                         clip: Optional["_clip.ClipStep"] = None) -> None:
        """Collectives a sharded step needs before its op calls: none for element-wise math, but
        the norm of the sharded gradients when clipping (one all-reduce per process group)."""
        if clip is not None:
            _dtensor.global_stats(self, plan, grad_scale, found_inf, clip, tiger=False)

    def _op_extra(self, group: Dict[str, Any], bucket: _Bucket, found_inf: Optional[torch.Tensor]) -> tuple:
        """The op's trailing optional arguments for this bucket (Tiger's statistics); found_inf is
        GradScaler's flag on the bucket's device, or None."""
        return bucket.extra

    def _op_done(self, group: Dict[str, Any], bucket: _Bucket) -> None:
        """Called after a bucket's op call (and the copy-back of staged params)."""

    def _bucket_state(self, group, bucket: _Bucket):
        """(states, the op's state list, its 8-bit-momentum/correction-byte keyword lists) of a
        bucket, creating missing state; local tensors of DTensor state."""
        states = []
        for p in bucket.keys:
            state = self.state[p]
            if not state:
                self._init_state(group, p, state)
            states.append(state)
        bufs = [s[self._state_key] for s in states]
        compressed = {}
        if bufs[0].dtype == torch.int8:  # 8-bit momentum: its block scales
            compressed["exp_avg_scales"] = [s["exp_avg_scale"] for s in states]
        if "residual" in states[0]:  # the correction byte (the group's option, a 16-bit bucket)
            compressed["residuals"] = [s["residual"] for s in states]
        if bucket.sharded:
            bufs = _dtensor.local_states(bufs)
            compressed = {k: _dtensor.local_states(v) for k, v in compressed.items()}
        return states, bufs, compressed

    def _run_bucket(self, group, bucket: _Bucket, seeds: List[int], grad_scale, found_inf) -> None:
        states, bufs, compressed = self._bucket_state(group, bucket)
        device = bucket.params[0].device
        steps = [s["step"] for s in states]
        gs = grad_scale.to(device, non_blocking=True) if grad_scale is not None else None
        clip = getattr(self, "_clip_step", None)
        if clip is not None:
            # The coefficient, and GradScaler's found_inf or'ed with a non-finite norm (_clip.py).
            coef, fi = clip.for_device(device, found_inf)
            clip_kw = {"clip": coef}
        else:
            fi = found_inf.to(device, non_blocking=True) if found_inf is not None else None
            clip_kw = {}
        if group["maximize"]:
            # NOTE: [maximize] torch.optim's maximize steps on -g (the state tracks -g too). The
            # kernels already divide g by grad_scale, and g / (-s) == -(g / s) exactly in IEEE
            # arithmetic (the sign is exact, the magnitude rounds the same), so maximize is the
            # same op call with the scale negated: no extra pass, the same bits on every backend.
            gs = -gs if gs is not None else self._device_scalar(device, torch.float32, -1.0)

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
        elif group["capturable"]:
            # capturable=True: every scalar the kernel reads lives on the device (lr here; the step
            # counts, grad_scale and found_inf always do), so a CUDA graph of the step replays it.
            lr_f, lr_t = 0.0, self._device_scalar(device, torch.float32, None).fill_(float(lr))
        else:
            lr_f, lr_t = float(lr), None
        fn = bucket.backend.fn(self._op_name)
        fn(params, grads, bufs, steps, *self._op_args(group, bucket, lr_f, lr_t), gs, fi, seeds,
           bool(group["stochastic_rounding"]), *self._op_extra(group, bucket, fi), **clip_kw, **compressed)
        if staged is not None:
            for i, p in staged:
                p.copy_(params[i])
        # NOTE: [version counters] The compiled kernels write through raw pointers, which
        # autograd does not see: count the write, so that a version check (autograd's saved
        # tensors, Tiger's cached sums of squares) sees every param this step changed.
        torch.autograd.graph.increment_version(bucket.params)
        self._op_done(group, bucket)
        if fi is None:
            torch._foreach_add_(steps, 1)
        else:
            # GradScaler skipped the step on the device: the count advances by 1 - found_inf.
            torch._foreach_add_(steps, 1 - fi.to(torch.int64))

    # ------------------------------------------------------------------ checkpoints
    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self._reset_caches()  # pickling and deepcopy keep only defaults, state and param_groups

    def _reset_caches(self) -> None:
        self._seed_cache: Dict[int, Tuple[tuple, List[int]]] = {}
        self._device_scalars: Dict[tuple, torch.Tensor] = {}
        self._clip_step = None
        # The total gradient norm of the last clipped step (fp32, 0-dim, on the first param's
        # device; the norm before clipping, as clip_grad_norm_ returns it), None before one.
        self.grad_norm: Optional[torch.Tensor] = getattr(self, "grad_norm", None)

    def _check_state_tensor(self, buf: torch.Tensor, what: str) -> None:
        """Refuse a saved state tensor this optimizer cannot use (called before anything changes)."""
        if not buf.is_floating_point() and buf.dtype != torch.int8:
            raise ValueError(f"{what}: {self._state_key!r} must be a floating-point (or int8: 8-bit momentum) tensor, "
                             f"got {buf.dtype}")

    def _restore_state_tensor(self, p: torch.Tensor, buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A loaded state tensor as this optimizer keeps it: on the param's device, in ``dtype``."""
        dtensor = _dtensor.dtensor_class()
        if dtensor is not None and (isinstance(p, dtensor) or isinstance(buf, dtensor)):
            return _dtensor.restore_state(p, buf, dtype, dtensor)  # with the param's placements
        return buf.detach().to(device=p.device, dtype=dtype, copy=True).contiguous()

    def _restore_like(self, like: torch.Tensor, buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A loaded state tensor in the layout of ``like`` (a fresh state tensor: plain, or a DTensor
        with its shape and placements), e.g. int8 momentum's block scales."""
        return self._restore_state_tensor(like, buf, dtype)

    def state_dict(self) -> Dict[str, Any]:
        """torch's state dict, with ``momentum_dtype`` saved by name ("bfloat16", not torch.bfloat16).

        NOTE: [dtype options by name] torch.distributed.checkpoint takes tensors, numbers,
        strings and containers of them; a torch.dtype in a param group makes its
        ``get_optimizer_state_dict`` raise. ``load_state_dict`` reads either form.
        """
        sd = super().state_dict()
        for g in sd["param_groups"]:  # packed copies: the live groups keep their torch.dtype
            if isinstance(g.get("momentum_dtype"), torch.dtype):
                g["momentum_dtype"] = str(g["momentum_dtype"]).replace("torch.", "")
            if g.get("momentum_dtype") == "int8":
                # NOTE: [int8 momentum]: the codes mean something only in their layout; a
                # checkpoint says which, and another layout is refused on load.
                g["momentum_layout"] = _quant.LAYOUT
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a checkpoint of this optimizer: all or nothing, every state dtype kept exactly.

        The whole state dict is checked and the new state and param groups are built aside;
        only then are they swapped in, so an error leaves the optimizer as it was. Refused, with
        an error that says what the checkpoint is: other optimizers' state dicts (AdamW, SGD,
        another sign optimizer; see :func:`sign_kernels.load_momentum` for the explicit
        migration), a different param-group layout, state of the wrong shape or kind. Params are
        matched by position in their group, as torch does, whatever the saved ids are (integer
        indices or the parameter names that ``torch.distributed.checkpoint`` uses). Saved
        options win; options a checkpoint lacks (older versions, lion-pytorch) keep their
        current values. A checkpoint without ``step`` (lion-pytorch, timm) starts it at 0.
        Save -> load -> save gives the same dict.
        """
        sd = state_dict.copy() if isinstance(state_dict, Mapping) else state_dict
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, sd)
            if result is not None:
                sd = result
        state, groups = _checkpoint.build_loaded(self, sd)
        self.__setstate__({"state": state, "param_groups": groups})
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)
