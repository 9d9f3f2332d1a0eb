"""The executors of the three ops, and the choice between them.

Backends, each with the op signatures of ``sign_kernels._ops``:

``reference``  plain torch, one tensor at a time (any device, any float dtype, fp64 too).
``cpu``        the compiled OpenMP kernels (``sign_kernels._C``), CPU tensors.
``cuda``       the compiled multi-tensor-apply CUDA kernels, CUDA tensors.
``triton``     the Triton kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.

``backend="auto"`` picks, per device, the fastest one that is available and supports the
group's dtypes (cpu > reference on CPU; cuda > triton > reference on CUDA) and logs the
choice once. An explicit backend that cannot run raises ``BackendUnavailableError`` with
the reason; it never falls back silently.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from .. import _ops
from . import reference

logger = logging.getLogger("sign_kernels")

NAMES = ("reference", "cpu", "cuda", "triton")
CHOICES = ("auto",) + NAMES

# Dtypes the fused kernels (cpu, cuda, triton) take. The reference takes any float dtype.
FUSED_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here, or cannot take these tensors."""


@dataclass(frozen=True)
class Backend:
    name: str
    lion_: Callable
    tiger_: Callable
    simba_: Callable
    sumsq_: Callable  # the norm pass of clipping inside the step

    def fn(self, op_name: str) -> Callable:
        return getattr(self, op_name)


def _compiled_state() -> tuple[Optional[object], Optional[str]]:
    import importlib.util

    if importlib.util.find_spec("sign_kernels._C") is None:
        return None, "the compiled extension sign_kernels._C is not built (pure-Python install)"
    try:
        from .. import _C  # registers the compiled kernels with the dispatcher
    except ImportError as exc:  # built, but cannot load here (e.g. a torch ABI mismatch)
        return None, f"the compiled extension sign_kernels._C failed to load: {exc}"
    return _C, None


_C, _C_REASON = _compiled_state()
# A plain value, read once here: backend selection runs inside torch.compile'd steps, where
# Dynamo cannot trace a call into the compiled module (calling _C.cuda_compiled() there made it
# warn "does not know how to trace the builtin" on every backend="auto" run).
CUDA_COMPILED: bool = bool(getattr(_C, "CUDA_COMPILED", False))


def _op_backend(name: str) -> Backend:
    return Backend(name, _ops.op("lion_"), _ops.op("tiger_"), _ops.op("simba_"), _ops.op("sumsq_"))


def _cpu_reason() -> Optional[str]:
    if _C is None:
        return _C_REASON
    if not _ops.has_kernel("lion_", "CPU"):
        return "sign_kernels._C was built without the CPU kernels"
    return None


def _cuda_reason() -> Optional[str]:
    if _C is None:
        return _C_REASON
    if not CUDA_COMPILED:
        return "sign_kernels._C was built without CUDA (no nvcc or a CPU-only torch at build time, or SIGN_KERNELS_SKIP_CUDA=1)"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    return None


def _triton_module():
    from .. import triton as sk_triton

    return sk_triton


def _triton_reason() -> Optional[str]:
    try:
        sk_triton = _triton_module()
    except ImportError as exc:
        return f"sign_kernels.triton could not be imported ({exc})"
    reason_fn = getattr(sk_triton, "unavailable_reason", None)
    if reason_fn is None:
        return "sign_kernels.triton is incomplete in this installation"
    return reason_fn()


def available_backends() -> Dict[str, Optional[str]]:
    """Each backend's name mapped to ``None`` when it runs here, else the reason it does not."""
    return {
        "reference": None,
        "cpu": _cpu_reason(),
        "cuda": _cuda_reason(),
        "triton": _triton_reason(),
    }


_BACKENDS: Dict[str, Backend] = {}


def get(name: str) -> Backend:
    """The backend ``name``; raises ``BackendUnavailableError`` with the reason if it cannot run."""
    if name in _BACKENDS:
        return _BACKENDS[name]
    if name == "reference":
        backend = Backend("reference", reference.lion_, reference.tiger_, reference.simba_, reference.sumsq_)
    elif name in ("cpu", "cuda"):
        reason = _cpu_reason() if name == "cpu" else _cuda_reason()
        if reason is not None:
            raise BackendUnavailableError(f'backend="{name}" is not available: {reason}')
        backend = _op_backend(name)
    elif name == "triton":
        reason = _triton_reason()
        if reason is not None:
            raise BackendUnavailableError(f'backend="triton" is not available: {reason}')
        t = _triton_module()
        backend = Backend("triton", t.lion_, t.tiger_, t.simba_, t.sumsq_)
    else:
        raise ValueError(f"backend must be one of {CHOICES}, got {name!r}")
    _BACKENDS[name] = backend
    return backend


def unsupported_reason(
    name: str, device: torch.device, param_dtype: torch.dtype, grad_dtype: torch.dtype, state_dtype: torch.dtype
) -> Optional[str]:
    """Why backend ``name`` cannot take tensors of this device and these dtypes, or None."""
    if name == "reference":
        if not param_dtype.is_floating_point:
            return f"parameters must be floating point, got {param_dtype}"
        return None
    if name == "cpu" and device.type != "cpu":
        return f'backend="cpu" takes CPU tensors, got a tensor on {device}'
    if name == "cuda" and device.type != "cuda":
        return f'backend="cuda" takes CUDA tensors, got a tensor on {device}'
    if name == "triton" and device.type not in ("cuda", "cpu"):
        return f'backend="triton" takes CUDA tensors (CPU ones under TRITON_INTERPRET=1), got {device}'
    if name == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return 'backend="triton" takes CPU tensors only under TRITON_INTERPRET=1'
    if param_dtype not in FUSED_PARAM_DTYPES:
        return f'backend="{name}" takes float32, bfloat16 or float16 parameters, got {param_dtype}'
    if grad_dtype not in (param_dtype, torch.float32):
        return f'backend="{name}" takes gradients of the parameter dtype or float32, got {grad_dtype} for {param_dtype} parameters'
    if state_dtype not in (param_dtype, torch.float32, torch.bfloat16, torch.int16, torch.int8):
        return f'backend="{name}" takes state of the parameter dtype, float32, bfloat16 or int8, got {state_dtype}'
    return None


_AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}
_fallbacks_logged: set = set()


def log_fallback(name: str, what: str) -> None:
    """Log once that backend="auto" took ``name`` for ``what`` (a feature the faster one lacks)."""
    if what not in _fallbacks_logged:
        _fallbacks_logged.add(what)
        logger.info("sign_kernels: backend 'auto' uses %r for %s (the faster backend lacks it)", name, what)


# The automatic choice per (device type, dtypes), made and logged once per process.
_auto_cache: Dict[tuple, Backend] = {}


def choose(
    requested: str, device: torch.device, param_dtype: torch.dtype, grad_dtype: torch.dtype, state_dtype: torch.dtype
) -> Backend:
    """Resolve ``requested`` for one group of tensors (raises with the reason if impossible)."""
    if requested != "auto":
        backend = get(requested)
        reason = unsupported_reason(requested, device, param_dtype, grad_dtype, state_dtype)
        if reason is not None:
            raise BackendUnavailableError(reason)
        return backend
    key = (device.type, param_dtype, grad_dtype, state_dtype)
    if key in _auto_cache:
        return _auto_cache[key]
    for name in _AUTO_ORDER.get(device.type, ("reference",)):
        if available_backends()[name] is not None:
            continue
        if unsupported_reason(name, device, param_dtype, grad_dtype, state_dtype) is not None:
            continue
        logger.info(
            "sign_kernels: backend 'auto' uses %r for %s tensors (param %s, grad %s, state %s)",
            name, device.type, param_dtype, grad_dtype, state_dtype,
        )
        _auto_cache[key] = get(name)
        return _auto_cache[key]
    raise BackendUnavailableError(f"no backend can take {param_dtype} parameters on {device}")
