"""Triton backend: Lion, Tiger and Simba as one multi-tensor kernel family.

Public functions (the op signatures of ``sign_kernels._ops``)::

    lion_(params, grads, exp_avgs, steps, lr, lr_t, beta1, beta2, weight_decay,
          grad_scale, found_inf, seeds, stochastic_rounding, clip=None, exp_avg_scales=None,
          residuals=None)
    tiger_(params, grads, exp_avgs, steps, roles, lr, lr_t, beta, weight_decay,
           grad_accum_steps, shrink_ratio, grad_scale, found_inf, seeds, stochastic_rounding,
           stats=None, stats_nan=None, stats_sumsq=None, stats_n=None, sumsq_out=None,
           sumsq_out_at=None, clip=None, exp_avg_scales=None, residuals=None)
    simba_(params, grads, sign_counts, steps, lr, lr_t, window_size, threshold_count,
           weight_decay, grad_scale, found_inf, seeds, stochastic_rounding, clip=None)
    sumsq_(tensors, scale, out)
    unavailable_reason() -> str | None
    register_for_cuda_if_missing() -> bool

Importing this package never imports triton: the kernels (``_kernels``) and the launcher
(``_launch``) are imported on first use, so ``import sign_kernels.triton`` works without
triton, and ``unavailable_reason()`` says why the backend cannot run.

Design notes
------------
One kernel, three algorithms. ``_kernels.sign_step_kernel`` takes the algorithm (``ALGO``)
and the storage dtypes of θ, g and the state (fp32 / bf16 / fp16, Simba's int16 counters) as
``tl.constexpr``; each (algorithm, dtypes, SR, ...) combination compiles once. The math is
``csrc/core/sign_math.h`` line for line, in fp32, with every product and sum a separate op
and ``enable_fp_fusion=False`` at every launch (NOTE: [no contraction]); divisions use
``tl.math.div_rn`` (Triton's plain fp32 ``/`` is not correctly rounded on NVIDIA). Loads of
16-bit types and every store go through the bit patterns (``_bf16_bits``, ``_fp16_bits``), the
same integer formulas as ``bf16_bits_rne`` / ``bf16_bits_sr`` / ``fp16_bits_rne``, because the
interpreter's fp32->bf16 cast truncates and hardware fp16 NaN bits differ. The stochastic
rounding bits are ``mix32`` / ``sr_key`` / ``sr_bits`` in uint32 arithmetic (NOTE:
[stochastic rounding bits]). So for fp32, and for bf16 with or without SR, the results are
bit-identical to the reference backend run in the storage dtype (Tiger: up to the order of its
fp64 sum of squares, which only matters when the fp32 RMS sits on a rounding boundary).

Multi-tensor, one launch per group. The launcher (``_launch``) builds, once per parameter
set, one int64 device tensor holding (a) a row per tensor: addresses of θ, g, state and step,
numel, SR seed, Tiger role and statistics layout; (b) a row per program: (tensor, first
element), BLOCK elements each; (c) Tiger's statistics tasks. Kernels cast the addresses with
``.to(tl.pointer_type(...))``. The plan is cached (LRU, 32 entries) under a key made of every
data_ptr, shape, role and seed, and the current stream (a plan's tables and scratch serve one
stream only: NOTE: [plans per stream] in ``_launch``), so a GPT-2-sized list (148 tensors)
costs one launch for Lion and Simba and four for Tiger (five with sums out; a misaligned
tensor adds a second launch of its blocks per pass, NOTE: [per-tensor alignment]), and no
host-to-device copy after the first step as long as the
caching allocator hands the grads back at the same addresses. Steps, ``lr_t``,
``grad_scale``, ``found_inf`` and ``clip`` are read on the device: no host synchronisation,
CUDA-graph friendly: a plan missing when a capture begins is built inside it, its table
copied from pinned memory set aside by an earlier eager call (NOTE: [plans in CUDA graphs],
NOTE: [pinned staging] in ``_launch``), and a plan a graph uses is kept for the life of the process. When
``found_inf`` is non-zero every load and store is masked off: nothing changes.

The interpreter (``TRITON_INTERPRET=1``) runs the *same* kernels on CPU tensors: it executes
loads and stores on raw host addresses and implements int->pointer casts as bit casts, so
the address table works there unchanged and no per-tensor fallback exists. It must be set
before this backend is first used (triton decides at decoration time); CUDA tensors are not
supported under the interpreter (the table would hold device addresses).

Tiger needs two whole-tensor facts before any element can be written: whether g / grad_scale
holds a NaN (the guard), and RMS(θ_{t-1}) (per tensor for the matrix role, per row of the
last dim for the embedding role). Small kernels run first: ``tiger_rows_kernel`` counts the
NaNs of g / grad_scale per row (embedding rows, or virtual rows of ``STAT_COLS`` elements for
other roles); ``tiger_sumsq_kernel`` sums θ² in fp64 over the update's blocks, in the fixed
pairwise order of NOTE: [Triton sums of squares] (``_kernels``), only where this call updates
θ with an RMS role and no sums are given; ``tiger_finish_kernel`` (one program per tensor,
fixed order, hence deterministic) turns them into the NaN flag and rms = fp32(sqrt(sumsq / n))
computed in fp64, as the reference does. With ``sumsq_out`` (NOTE: [Tiger sums of squares
out] in ``sign_kernels._ops``) the update kernel (its ``SUMSQ`` specialisation) sums the θ it
stores in that same order and ``tiger_sumsq_out_kernel`` combines the block partials, so the
next call, given those sums, skips the read of θ and gets the same bits.
The window logic (b1 = β on the first micro-step, θ written on the last) is computed per
tensor from its device step t and k.

8-bit momentum and the correction byte (NOTE: [8-bit momentum and the correction byte] in
``sign_kernels._ops``; the bits: NOTE: [int8 momentum] and NOTE: [correction byte] in
``csrc/core/sign_math.h``). The correction byte is element-wise: ``sign_step_kernel``'s ``EC``
specialisation reads θ^ = θ16 + ρ u(θ16) and writes θ16 = RNE(θ^') and ρ' (fp16 / bf16 params;
never with SR), so Tiger's sums out stay a by-product of the write (of θ16). An int8 momentum
has its own kernel, ``sign_q8_kernel``: one program per QROWS blocks of 64 elements of a row (a
[QROWS, 64] tile, the block's absmax a max along axis 1, the block index also its scale's),
with the update of ``sign_step_kernel``, then the codes by stochastic rounding on the square-law
levels with the value's hash; divisions, sqrt and floor are IEEE (``div_rn``, ``sqrt_rn``), so
the codes and scales are the reference's bits. Tiger's pre-pass is unchanged (it reads g and θ
only); with ``sumsq_out``, ``tiger_sums_after_kernel`` reads θ back over the update's blocks
and sums it in the pre-pass's order (NOTE: [Triton sums of squares]), so a sums-only call gives
the same bits. Configurations: the ``EC`` update runs 16 warps (4 elements per thread: the
encoding's registers), ``sign_q8_kernel`` 16 blocks (1024 elements) at 8 warps, bounded at 88
registers (NOTE: [triton maxnreg] in ``_launch``).

Fixed configurations (no autotuning of in-place kernels): see NOTE: [fixed configs] in
``_launch``: BLOCK 2048 with 8 warps for the update, 16x256 tiles for Tiger's statistics;
aligned-address hints for the tensors whose θ, g and state addresses are all 16-byte aligned
(their blocks run in one launch, any others in a second one without the hints: NOTE:
[per-tensor alignment] in ``_launch``). The hints
go on the typed pointers, full blocks take an unmasked path, and per-element offsets are
int32 (NOTE: [vector hints] in ``_kernels``): compiled for sm_90, the update and statistics
kernels issue 16-byte loads and stores and use at most 64 registers without spills, which
``tests/test_triton_codegen.py`` checks in CI without a GPU. Launches run under a device
guard on the params' device. The
interpreter uses the same tiles (``SIGN_KERNELS_TRITON_INTERP_BLOCK`` overrides its BLOCK).

Clipping inside the step (NOTE: [clipping inside the step] in ``sign_kernels._ops``): the
optional ``clip`` (0-dim fp32, read on the device) multiplies the gradient after the division by
``grad_scale`` (``_kernels._grad_used``), in the update and in Tiger's NaN guard; ``sumsq_`` is
the norm pass: per tensor, an fp64 sum of squares in an order fixed by its numel alone (NOTE:
[Triton norm sums] in ``_kernels``), two launches per call (block partials, then one program
per tensor), on a cached table like the update's.

Status: the CI tests (``tests/test_triton.py``) run the interpreter. The compiled GPU path
(same kernels, plus ``tl.multiple_of`` hints and ``enable_fp_fusion=False``) had no GPU to run
on when it was written: run ``TRITON_INTERPRET=0 pytest tests/test_triton.py`` on a CUDA
machine before relying on it.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

__all__ = ["lion_", "tiger_", "simba_", "sumsq_", "unavailable_reason", "register_for_cuda_if_missing"]

_OPS = ("lion_", "tiger_", "simba_", "sumsq_")
_impl_lib = None


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def unavailable_reason() -> Optional[str]:
    """None when the Triton backend can run here, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # a broken install: report it, do not hide it
        return f"triton failed to import: {exc!r}"
    if _interpret_requested():
        return _interpreter_reason(triton.__version__)
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (and TRITON_INTERPRET=1 is not set for the CPU interpreter)"
    return None


# The first triton whose CPU interpreter runs every kernel here: before 3.7 it holds a scalar
# loaded from memory as a 1-element array, and a loop to such a bound (Tiger's statistics
# kernels loop over a tensor's rows) fails with "only 0-dimensional arrays can be converted to
# Python scalars" (seen with 3.6.0; 3.7.1 and later run them). Compiled for a GPU, 3.6 is fine.
INTERPRETER_MIN_TRITON = (3, 7)


def _interpreter_reason(version: str) -> Optional[str]:
    import re

    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None or (int(m.group(1)), int(m.group(2))) >= INTERPRETER_MIN_TRITON:
        return None
    need = ".".join(map(str, INTERPRETER_MIN_TRITON))
    return (f"TRITON_INTERPRET=1 needs triton >= {need} (installed: {version}); its CPU interpreter "
            "cannot run Tiger's statistics kernels (a loop bound loaded from memory)")


def _backend():
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"sign_kernels triton backend unavailable: {reason}")
    from . import _launch as launch

    return launch


def lion_(params, grads, exp_avgs, steps, lr, lr_t, beta1, beta2, weight_decay,
          grad_scale, found_inf, seeds, stochastic_rounding, clip=None, exp_avg_scales=None,
          residuals=None) -> None:
    _backend().lion_(params, grads, exp_avgs, steps, lr, lr_t, beta1, beta2, weight_decay,
                    grad_scale, found_inf, seeds, stochastic_rounding, clip, exp_avg_scales, residuals)


def tiger_(params, grads, exp_avgs, steps, roles, lr, lr_t, beta, weight_decay, grad_accum_steps,
           shrink_ratio, grad_scale, found_inf, seeds, stochastic_rounding, stats=None, stats_nan=None,
           stats_sumsq=None, stats_n=None, sumsq_out=None, sumsq_out_at=None, clip=None,
           exp_avg_scales=None, residuals=None) -> None:
    _backend().tiger_(params, grads, exp_avgs, steps, roles, lr, lr_t, beta, weight_decay,
                     grad_accum_steps, shrink_ratio, grad_scale, found_inf, seeds, stochastic_rounding,
                     stats, stats_nan, stats_sumsq, stats_n, sumsq_out, sumsq_out_at, clip,
                     exp_avg_scales, residuals)


def simba_(params, grads, sign_counts, steps, lr, lr_t, window_size, threshold_count, weight_decay,
           grad_scale, found_inf, seeds, stochastic_rounding, clip=None) -> None:
    _backend().simba_(params, grads, sign_counts, steps, lr, lr_t, window_size, threshold_count,
                     weight_decay, grad_scale, found_inf, seeds, stochastic_rounding, clip)


def sumsq_(tensors, scale, out) -> None:
    _backend().sumsq_(tensors, scale, out)


def register_for_cuda_if_missing() -> bool:
    """Register these functions as the CUDA kernels of
    torch.ops.sign_kernels.{lion_,tiger_,simba_,sumsq_} for every op that has no CUDA kernel yet
    (the compiled extension registers its own first).

    Returns True if at least one op was registered. Does nothing when triton is missing or no
    CUDA device is present. Triton itself is imported only when an op first runs.
    """
    global _impl_lib
    if importlib.util.find_spec("triton") is None:
        return False
    import torch

    if not torch.cuda.is_available():
        return False
    from .. import _ops

    fns = {"lion_": lion_, "tiger_": tiger_, "simba_": simba_, "sumsq_": sumsq_}
    missing = [name for name in _OPS if name in _ops.SCHEMAS and not _ops.has_kernel(name, "CUDA")]
    if not missing:
        return False
    if _impl_lib is None:
        _impl_lib = torch.library.Library(_ops.LIB_NAME, "IMPL")
    for name in missing:
        _impl_lib.impl(name, fns[name], "CUDA")
    return True
