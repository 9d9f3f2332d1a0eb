"""Contenders: how to build each optimizer the harness times, and whether it can run here.

A contender is a factory plus an availability check. Availability never raises: a
missing package or device is a reason string, and the row reads "skipped: <reason>".
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .accounting import ROW_SETTINGS, DtypeSetting

Factory = Callable[[Sequence[torch.Tensor], DtypeSetting], torch.optim.Optimizer]

OURS = ("lion", "tiger", "simba")
ADAMW = ("adamw-fused", "adamw-foreach")
BASELINE = "adamw-fused"

# NOTE: [clip rows] Gradient-norm clipping at this max norm: ours inside the step
# (max_grad_norm=, group "clip", keys "lion+clip[cpu]", ...) and torch's
# clip_grad_norm_(foreach=True) before an unclipped step ("clip+adamw-fused", "clip+lion[cpu]").
# The workspace's gradients are N(0, 1 + a^2) per element (a in [0.25, 4], timing.Workspace), so
# their total norm is sqrt(numel) x [1.03, 4.1]: >1.1e4 for GPT-2, >1.8e3 for 4096 x 768, >60 for
# 4096 elements. 1.0 is below all of them: every step clips (coefficient < 1), and the rows
# record the last norm they saw (grad_norm_last) and its coefficient (clip_coef_last).
CLIP_MAX_NORM = 1.0
CLIP_NAMES = ("lion+clip", "tiger+clip", "simba+clip", "clip+adamw", "clip+lion")

# NOTE: [int8 rows] 8-bit momentum (momentum_dtype=torch.int8) and the correction byte
# (error_correction=True), group "int8", timed in the fp32 section beside fp32 Lion (the
# acceptance compares with it): "lion-int8" / "tiger-int8" step the section's fp32 params with an
# int8 momentum; "lion-bf16-ec-int8" / "tiger-bf16-ec-int8" (the 4-byte mode) and
# "lion-bf16-sr-int8" (stochastic rounding, no residual) step bf16 copies of the params with bf16
# gradients of their own (Workspace.for_setting: refilled before each of their steps, as the
# section's are). Each row's bytes and state come from its own setting (accounting.ROW_SETTINGS,
# by shape: codes + a bf16 scale per 64 elements of a row, fp32 for 0/1-d tensors, + ρ).
# Under each row the table gives its paired time ratio to Lion (and Tiger) of the section.
INT8_ROWS = {  # name: (algo, setting, label)
    "lion-int8": ("lion", "fp32-int8", "Lion int8"),
    "tiger-int8": ("tiger", "fp32-int8", "Tiger int8"),
    "lion-bf16-ec-int8": ("lion", "bf16-ec-int8", "Lion bf16+ec+int8"),
    "tiger-bf16-ec-int8": ("tiger", "bf16-ec-int8", "Tiger bf16+ec+int8"),
    "lion-bf16-sr-int8": ("lion", "bf16-sr-int8", "Lion bf16+sr+int8"),
}
INT8_NAMES = tuple(INT8_ROWS)


@dataclass
class Contender:
    key: str  # stable id: "lion[cpu]", "adamw-fused", "peer:lion-pytorch"
    label: str  # what the table shows
    algo: str  # byte model: lion, tiger, simba, adamw
    backend: str  # our backend name, "fused"/"foreach" for AdamW, the peer's mode
    make: Factory
    group: str  # "ours", "adamw", "peer"
    dtypes: Sequence[str] = ("fp32", "bf16")
    # None when it can run on `device`; otherwise why not.
    unavailable: Callable[[torch.device], Optional[str]] = lambda device: None
    # True when the state layout is not the algorithm's plain one (bytes from the state held)
    measured_state: bool = False
    notes: str = ""
    # NOTE: [clip rows] None, "fused" (ours, max_grad_norm inside the step: + one read of g,
    # except Tiger, whose norm pass replaces its NaN guard's read) or "torch"
    # (clip_grad_norm_(foreach=True) first: a norm pass reading g, a mul_ pass reading and
    # writing it, + 3 x size(g)).
    clip: Optional[str] = None
    # The step writes p.grad (torch's clip_grad_norm_ scales it in place): it must get fresh
    # gradients before every step, or the scaling compounds from step to step. The harness
    # refills them before every step of every schedule; a timing that does not (the plain loop
    # of bench.check_timing) says so.
    writes_grads: bool = False
    ours: bool = False  # a sign_kernels optimizer (Tiger's byte model by role applies)
    # NOTE: [int8 rows] The contender's own param/grad/momentum setting, in place of the
    # section's: it steps params and gradients of that setting's dtypes (the section's own where
    # they match) and its bytes and state are counted by it. None: the section's setting.
    setting: Optional[DtypeSetting] = None
    name: str = ""  # the --contenders name that selects this row alone (int8 rows)

    def supports(self, dtype_name: str) -> bool:
        return dtype_name in self.dtypes


def module_missing(name: str) -> Optional[str]:
    """None if `name` imports, else a one-line reason."""
    try:
        if importlib.util.find_spec(name) is None:
            return f"{name} not installed"
    except (ImportError, ValueError) as exc:
        return f"{name} not importable: {exc}"
    try:
        importlib.import_module(name)
    except Exception as exc:  # a broken install is a skip reason, not a crash
        return f"{name} import failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def _needs_cuda(device: torch.device) -> Optional[str]:
    return None if device.type == "cuda" else "needs a CUDA device"


def _both(*checks: Callable[[torch.device], Optional[str]]) -> Callable[[torch.device], Optional[str]]:
    def check(device: torch.device) -> Optional[str]:
        for c in checks:
            reason = c(device)
            if reason:
                return reason
        return None

    return check


def _module(name: str) -> Callable[[torch.device], Optional[str]]:
    return lambda device: module_missing(name)


# ---- ours ------------------------------------------------------------------------------------

DEVICE_BACKENDS = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


def sign_kernels_backends() -> Dict[str, Optional[str]]:
    """sign_kernels.available_backends(), or every backend marked with the import error."""
    reason = module_missing("sign_kernels")
    if reason:
        return {b: reason for b in ("cuda", "triton", "cpu", "reference")}
    import sign_kernels

    return dict(sign_kernels.available_backends())


def select_backends(device: torch.device, which: str) -> List[str]:
    """Backends to time on `device`: 'best' (the first usable in speed order), 'all', or a list."""
    order = DEVICE_BACKENDS.get(device.type, ("reference",))
    if which not in ("best", "all"):
        return [b.strip() for b in which.split(",") if b.strip()]
    avail = sign_kernels_backends()
    usable = [b for b in order if avail.get(b, "unknown backend") is None]
    if which == "all":
        return list(order)  # unusable ones become "skipped" rows with the library's reason
    return usable[:1] or [order[0]]


def _ours(algo: str, backend: str, clip: bool = False) -> Contender:
    cls_name = algo.capitalize()

    def make(params, ds: DtypeSetting):
        import sign_kernels

        cls = getattr(sign_kernels, cls_name)
        kwargs = dict(backend=backend)
        if clip:
            kwargs["max_grad_norm"] = CLIP_MAX_NORM
        if algo != "simba":
            kwargs["momentum_dtype"] = ds.momentum
        if ds.error_correction:  # NOTE: [int8 rows]
            kwargs["error_correction"] = True
        if ds.stochastic_rounding:
            kwargs["stochastic_rounding"] = True
        if algo == "tiger":
            # Named: Tiger gives roles by name (role_of), as a model's named_parameters() would:
            # GPT-2's wte/wpe are embeddings, ln_*.weight gains, biases element-wise. Its own θ
            # (the grads stay shared): the interleaved schedule steps every contender on the
            # workspace's params, and a write by another optimizer sends Tiger back to its
            # first-step path (θ read again for the RMS), which a training run meets only after
            # θ was changed outside the step.
            own = []
            for i, p in enumerate(params):
                q = torch.nn.Parameter(p.detach().clone())
                q.grad = p.grad
                own.append((getattr(p, "_bench_name", f"param{i}"), q))
            params = own
        return cls(params, **kwargs)

    def unavailable(device: torch.device) -> Optional[str]:
        avail = sign_kernels_backends()
        if backend not in avail:
            return f"sign_kernels has no backend {backend!r}"
        if avail[backend] is not None:
            return f"backend {backend}: {avail[backend]}"
        if backend not in DEVICE_BACKENDS.get(device.type, ()):
            return f"backend {backend} does not run {device.type} tensors"
        return None

    return Contender(
        key=f"{algo}+clip[{backend}]" if clip else f"{algo}[{backend}]",
        label=f"{cls_name}+clip" if clip else cls_name,
        algo=algo,
        backend=backend,
        make=make,
        group="clip" if clip else "ours",
        dtypes=("fp32", "bf16") if algo == "simba" else ("fp32", "bf16", "bf16-fp32m"),
        unavailable=unavailable,
        clip="fused" if clip else None,
        ours=True,
        notes=f"max_grad_norm={CLIP_MAX_NORM:g} (clips every step here)" if clip else "",
    )


def _int8(name: str, backend: str) -> Contender:
    """An 8-bit momentum row (NOTE: [int8 rows]): ours with the setting's momentum, residual
    and rounding; skipped where the backend has no int8 kernels for the optimizer."""
    algo, setting, label = INT8_ROWS[name]
    base = _ours(algo, backend)

    def unavailable(device: torch.device) -> Optional[str]:
        reason = base.unavailable(device)
        if reason:
            return reason
        import sign_kernels

        have = getattr(getattr(sign_kernels, algo.capitalize()), "_compressed_backends", frozenset())
        if backend not in have:
            return (f"backend {backend}: no 8-bit momentum / correction byte kernels for {algo.capitalize()} "
                    f"(those that have them: {', '.join(sorted(have)) or 'none'})")
        return None

    ds = ROW_SETTINGS[setting]
    what = {"fp32-int8": "fp32 params and grads, momentum_dtype=int8",
            "bf16-ec-int8": "bf16 params and grads (its own), error_correction=True, momentum_dtype=int8",
            "bf16-sr-int8": "bf16 params and grads (its own), stochastic_rounding=True, momentum_dtype=int8"}[setting]
    return Contender(
        key=f"{name}[{backend}]", label=label, algo=algo, backend=backend, make=base.make, group="int8",
        dtypes=("fp32",), unavailable=unavailable, ours=True, setting=ds, name=name, notes=what,
    )


def _int8_rows(backends: Sequence[str]) -> List[Contender]:
    return [_int8(name, b) for name in INT8_NAMES for b in backends]


# ---- torch AdamW, the baseline -------------------------------------------------------------


def _adamw(mode: str) -> Contender:
    def make(params, ds: DtypeSetting):
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, **{mode: True})

    return Contender(
        key=f"adamw-{mode}", label="AdamW", algo="adamw", backend=mode, make=make, group="adamw"
    )


# ---- torch's clip_grad_norm_ before an unclipped step ------------------------------------------


class TorchClipThenStep:
    """``torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)``, then ``inner.step()``:
    what a training loop does without a fused clip. Everything else (state, param_groups) is
    the inner optimizer's. ``clip_grad_norm_`` scales p.grad in place (NOTE: [clip rows]:
    ``writes_grads``)."""

    def __init__(self, inner: torch.optim.Optimizer, max_norm: float):
        self.inner = inner
        self.max_norm = max_norm
        self.params = [p for g in inner.param_groups for p in g["params"]]
        self.grad_norm: Optional[torch.Tensor] = None

    def step(self):
        self.grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm, foreach=True)
        return self.inner.step()

    def __getattr__(self, name):  # state, param_groups, _roles ...: the inner optimizer's
        return getattr(self.inner, name)


def _torch_clip(inner: Contender) -> Contender:
    def make(params, ds: DtypeSetting):
        return TorchClipThenStep(inner.make(params, ds), CLIP_MAX_NORM)

    return Contender(
        key=f"clip+{inner.key}", label=f"clip+{inner.label}", algo=inner.algo, backend=inner.backend,
        make=make, group="clip", dtypes=inner.dtypes, unavailable=inner.unavailable,
        measured_state=inner.measured_state, clip="torch", writes_grads=True, ours=inner.ours,
        notes=f"torch clip_grad_norm_(max_norm={CLIP_MAX_NORM:g}, foreach=True) scales p.grad in place, "
              "then the unclipped step; gradients are refilled before every step",
    )


def _clip_rows(backends: Sequence[str]) -> List[Contender]:
    out = [_ours(algo, b, clip=True) for algo in OURS for b in backends]
    out.append(_torch_clip(_adamw("fused")))
    out += [_torch_clip(_ours("lion", b)) for b in backends]
    return out


# ---- peers ------------------------------------------------------------------------------------


def _peers() -> List[Contender]:
    def lion_pytorch(use_triton: bool) -> Factory:
        def make(params, ds):
            from lion_pytorch import Lion

            return Lion(params, lr=1e-4, use_triton=use_triton)

        return make

    def optimi_lion(params, ds):
        from optimi import Lion

        return Lion(params, lr=1e-4)

    def timm_lion(params, ds):
        from timm.optim import Lion

        return Lion(params, lr=1e-4)

    def po(name: str, lr: float) -> Factory:
        def make(params, ds):
            import pytorch_optimizer

            return getattr(pytorch_optimizer, name)(params, lr=lr)

        return make

    def bnb_lion(bits: int) -> Factory:
        def make(params, ds):
            import bitsandbytes as bnb

            return bnb.optim.Lion(params, lr=1e-4, optim_bits=bits)

        return make

    def deepspeed_lion(params, ds):
        from deepspeed.ops.lion import FusedLion

        return FusedLion(params, lr=1e-4)

    def triton_missing(device):
        return module_missing("triton")

    return [
        Contender("peer:lion-pytorch", "lion-pytorch Lion", "lion", "torch", lion_pytorch(False),
                  "peer", unavailable=_module("lion_pytorch")),
        Contender("peer:lion-pytorch-triton", "lion-pytorch Lion", "lion", "triton",
                  lion_pytorch(True), "peer",
                  unavailable=_both(_module("lion_pytorch"), _needs_cuda, triton_missing)),
        Contender("peer:optimi-lion", "optimi Lion", "lion", "torch", optimi_lion, "peer",
                  unavailable=_module("optimi"), measured_state=True,
                  notes="torch-optimi defaults: Kahan summation buffer for low-precision params"),
        Contender("peer:timm-lion", "timm Lion", "lion", "torch", timm_lion, "peer",
                  unavailable=_module("timm")),
        Contender("peer:pytorch-optimizer-lion", "pytorch-optimizer Lion", "lion", "torch",
                  po("Lion", 1e-4), "peer", unavailable=_module("pytorch_optimizer")),
        Contender("peer:pytorch-optimizer-tiger", "pytorch-optimizer Tiger", "tiger", "torch",
                  po("Tiger", 1e-3), "peer", unavailable=_module("pytorch_optimizer")),
        Contender("peer:bnb-lion32", "bitsandbytes Lion 32-bit", "lion", "bnb", bnb_lion(32),
                  "peer", unavailable=_module("bitsandbytes"), measured_state=True),
        Contender("peer:bnb-lion8", "bitsandbytes Lion 8-bit", "lion", "bnb", bnb_lion(8),
                  "peer", unavailable=_module("bitsandbytes"), measured_state=True),
        Contender("peer:deepspeed-fusedlion", "DeepSpeed FusedLion", "lion", "cuda",
                  deepspeed_lion, "peer",
                  unavailable=_both(_needs_cuda, _module("deepspeed"))),
    ]


PEER_KEYS = tuple(c.key for c in _peers())


def all_contenders(device: torch.device, backends: str = "best") -> List[Contender]:
    out = [_ours(algo, b) for algo in OURS for b in select_backends(device, backends)]
    out += [_adamw("fused"), _adamw("foreach")]
    out += _clip_rows(select_backends(device, backends))
    out += _int8_rows(select_backends(device, backends))
    out += _peers()
    return out


def _clip_match(name: str, c: Contender) -> bool:
    """Whether a clip row answers to ``name``: clip (all), ours+clip, torch-clip, lion+clip,
    tiger+clip, simba+clip, clip+adamw, clip+lion (NOTE: [clip rows])."""
    if c.group != "clip":
        return False
    if name == "clip":
        return True
    if name == "ours+clip":
        return c.clip == "fused"
    if name == "torch-clip":
        return c.clip == "torch"
    algo = c.algo if c.clip == "fused" else None
    if name.endswith("+clip"):
        return algo == name[:-len("+clip")]
    if name in ("clip+adamw", "clip+adamw-fused"):
        return c.clip == "torch" and c.algo == "adamw"
    if name == "clip+lion":
        return c.clip == "torch" and c.algo == "lion"
    return False


def select(device: torch.device, names: str, backends: str = "best") -> List[Contender]:
    """Contenders by comma-separated names: groups (ours, adamw, peers, all), algorithms
    (lion, tiger, simba), AdamW modes (adamw-fused, adamw-foreach), peer keys (lion-pytorch,
    peer:optimi-lion, ...), clipping rows (clip = all of: ours+clip = lion+clip, tiger+clip,
    simba+clip; torch-clip = clip+adamw, clip+lion; NOTE: [clip rows]), 8-bit momentum rows
    (int8 = all of: lion-int8, tiger-int8, lion-bf16-ec-int8, tiger-bf16-ec-int8,
    lion-bf16-sr-int8; ec-int8 = the two bf16+ec+int8 rows; NOTE: [int8 rows]). Fused AdamW,
    the baseline of every ratio, is always included. The default run (ours,adamw,peers) has no
    clip or int8 rows; `all` has them."""
    pool = all_contenders(device, backends)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    picked: List[Contender] = []
    for name in wanted:
        if name == "all":
            match = pool
        elif name in ("ours", "adamw", "peers"):
            group = {"ours": "ours", "adamw": "adamw", "peers": "peer"}[name]
            match = [c for c in pool if c.group == group]
        elif name in OURS:
            match = [c for c in pool if c.group == "ours" and c.algo == name]
        elif name in ("clip", "ours+clip", "torch-clip", "clip+adamw-fused") + CLIP_NAMES:
            match = [c for c in pool if _clip_match(name, c)]
        elif name == "int8":
            match = [c for c in pool if c.group == "int8"]
        elif name == "ec-int8":
            match = [c for c in pool if c.group == "int8" and c.setting.error_correction]
        elif name in INT8_NAMES:
            match = [c for c in pool if c.group == "int8" and c.name == name]
        else:
            key = name if name.startswith(("peer:", "adamw-")) or "[" in name else f"peer:{name}"
            match = [c for c in pool if c.key == key]
            if not match:
                raise ValueError(f"unknown contender {name!r}; known: {[c.key for c in pool]}")
        picked += [c for c in match if c not in picked]
    if not any(c.key == BASELINE for c in picked):
        picked.append(next(c for c in pool if c.key == BASELINE))
    return picked
