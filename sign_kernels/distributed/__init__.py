"""What a multi-process run adds to the optimizers.

``DistributedLion`` (``lion``): data-parallel Lion that exchanges packed signs instead of
gradients (docs/rules.md, Distributed Lion); ``local_grad_hook`` is the DDP comm hook that
skips DDP's gradient all-reduce for it.

``_dtensor``: DTensor params (FSDP2, tensor parallel) -- the kernels see local shards, state
has the param's placements, Tiger's whole-tensor statistics are reduced once per step. The
optimizers use it by themselves; nothing there needs to be called by a user.
"""

from .lion import DistributedLion, local_grad_hook

__all__ = ["DistributedLion", "local_grad_hook"]
