"""What a multi-process run adds to the optimizers.

* ``DistributedLion`` (``lion``): data-parallel Lion that exchanges packed signs instead of
  gradients (docs/rules.md, Distributed Lion); ``local_grad_hook`` is the DDP comm hook that
  skips DDP's gradient all-reduce for it;
* ``_dtensor``: DTensor params (FSDP2, tensor parallel) -- the kernels see local shards, state
  has the param's placements, Tiger's whole-tensor statistics are reduced once per step. The
  optimizers use it by themselves; nothing there is called by a user.

NOTE: [lazy DistributedLion] ``sign_kernels.optim._base`` imports ``_dtensor`` from this
package while ``sign_kernels.optim`` is being imported, and ``lion`` subclasses
``sign_kernels.optim.Lion``: importing ``lion`` here eagerly would be circular. Its names are
loaded on first access instead (PEP 562); ``from sign_kernels.distributed import
DistributedLion`` works as before.
"""

__all__ = ["DistributedLion", "local_grad_hook"]


def __getattr__(name):
    if name in __all__:
        from . import lion

        return getattr(lion, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
