"""What a multi-process run adds to the optimizers.

``DistributedLion`` (``lion``): data-parallel Lion that exchanges packed signs instead of
gradients (docs/rules.md, Distributed Lion); ``local_grad_hook`` is the DDP comm hook that
skips DDP's gradient all-reduce for it.

``_dtensor``: DTensor params (FSDP2, tensor parallel) -- the kernels see local shards, state
has the param's placements, Tiger's whole-tensor statistics are reduced once per step. The
optimizers use it by themselves; nothing there needs to be called by a user.
"""

__all__ = ["DistributedLion", "local_grad_hook"]


def __getattr__(name):
    # Imported on first use: sign_kernels.optim._base imports ._dtensor (which runs this
    # file first) while sign_kernels.optim is still initialising, and .lion imports
    # sign_kernels.optim.lion; an import here at the top would be circular.
    if name in __all__:
        from . import lion

        return getattr(lion, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
