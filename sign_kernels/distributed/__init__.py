"""What a multi-process run adds: Distributed Lion (sign_kernels.distributed.lion)."""

from .lion import DistributedLion, local_grad_hook

__all__ = ["DistributedLion", "local_grad_hook"]
