"""sign_kernels: fused sign-based optimizers (Lion, Tiger, Simba) for PyTorch.

One semantics (docs/rules.md), four executors (reference, cpu, cuda, triton), one thin
``torch.optim.Optimizer`` layer. ``available_backends()`` says what runs here.
"""

from . import _ops  # declares torch.ops.sign_kernels.* before any kernel registers
from .backends import BackendUnavailableError, available_backends
from .optim import Lion, Simba, Tiger, role_of, tiger_param_groups
from .optim._checkpoint import load_momentum
from .optim._convert import convert_momentum
from ._backward import step_in_backward

__version__ = "0.1.0"

__all__ = [
    "Lion",
    "Tiger",
    "Simba",
    "tiger_param_groups",
    "role_of",
    "load_momentum",
    "convert_momentum",
    "step_in_backward",
    "available_backends",
    "BackendUnavailableError",
    "__version__",
]


def _register_triton() -> None:
    # Where the compiled CUDA kernels are absent, the Triton kernels serve the ops on CUDA.
    import torch

    from .backends import _cuda_reason

    if not torch.cuda.is_available() or _cuda_reason() is None:
        return
    try:
        from . import triton as _sk_triton
    except ImportError:
        return
    register = getattr(_sk_triton, "register_for_cuda_if_missing", None)
    if register is not None:
        register()


_register_triton()
