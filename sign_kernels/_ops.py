"""Declarations of the fused ops, once, schema first.

Every executor implements these three ops with exactly these arguments:

* the compiled CPU kernels (``csrc/torch/cpu_ops.cpp``, ``STABLE_TORCH_LIBRARY_IMPL(sign_kernels, CPU)``),
* the compiled CUDA kernels (``csrc/torch/cuda_ops.cu``, ``STABLE_TORCH_LIBRARY_IMPL(sign_kernels, CUDA)``),
* the Triton kernels (``sign_kernels/triton``), registered for CUDA from Python when the
  compiled CUDA implementation is absent.

The Python reference backend (``sign_kernels/backends/reference.py``) has the same call
signature so the optimizers can call any backend the same way.

Contract shared by the three ops (docs/rules.md has the formulas):

* ``params``, ``grads`` and the state list have the same length; tensor ``i`` of each has
  the same shape and device, and is contiguous. Within one call all params share a dtype,
  all grads share a dtype, all state tensors share a dtype (the optimizer groups by them).
* ``steps[i]`` is a 0-dim int64 tensor holding t, the number of calls already applied to
  tensor ``i``. The op reads it and never writes it: the optimizer increments it.
* ``lr`` is used unless ``lr_t`` (a 0-dim float tensor) is given; ``lr_t`` lets a CUDA
  kernel read the learning rate on the device (CUDA graphs, tensor-lr schedules).
* ``grad_scale``/``found_inf`` (0-dim fp32, GradScaler's): the gradient used is
  ``g / grad_scale``; when ``found_inf`` is non-zero the op changes nothing.
* ``seeds[i]`` is the stochastic-rounding seed of tensor ``i`` (``sign_kernels._rng``);
  ``stochastic_rounding`` turns SR on for bf16 params and bf16 state.
* ``clip`` (0-dim fp32, optional, trailing): the gradient-norm clipping coefficient
  (NOTE: [8-bit momentum and the correction byte]
``lion_`` and ``tiger_`` take two more optional lists (docs/rules.md "8-bit momentum" and
"Correction byte"; the bits: NOTE: [int8 momentum] and NOTE: [correction byte] in
csrc/core/sign_math.h; the reference: sign_kernels/_quant.py):

* ``exp_avg_scales``: with int8 ``exp_avgs`` (codes), one bf16 tensor per momentum of shape
  ``shape[:-1] + (ceil(shape[-1] / 64),)``, the block scales (read and written). Given exactly
  when the momenta are int8; int8 momenta have >= 2 dims.
* ``residuals``: one int8 tensor per param, of its shape, for bf16 or fp16 params: the
  correction byte (read and written). Exclusive with ``stochastic_rounding``.

NOTE: [clipping inside the step]). Given, the gradient used is ``(g / grad_scale) * clip``,
  each operation rounded to fp32 in that order (``g * clip`` without a scale): the bits of
  ``clip_grad_norm_``'s ``g.mul_(clip)`` on fp32 gradients followed by the step. Tiger's NaN
  guard looks at that gradient too. Omitted, nothing is multiplied.

NOTE: [clipping inside the step]
``sumsq_(tensors, scale, out)`` is the norm pass: ``out[i]`` (fp64) = the sum over tensor i of
``(fp32(x) / scale)**2``, each square taken in fp64 from the fp32 quotient (exact: 48
significand bits) and summed in fp64 in an order that each backend fixes per tensor length
(never by thread count, the other tensors of the call or addresses), so the same tensor gives
the same bits in any call. NaN anywhere gives NaN, an infinity (no NaN) +inf; an empty tensor
0. All tensors share a dtype (fp32, bf16, fp16) and the device of ``out``; ``out`` is a
contiguous 1-D fp64 tensor of ``len(tensors)`` elements. The optimizers turn these sums into
the total norm and the coefficient on the device (sign_kernels/optim/_clip.py).

NOTE: [Tiger statistics input]
``tiger_`` reads two whole-tensor facts before it writes: whether ``g / grad_scale`` holds a
NaN, and RMS(θ_{t-1}) (matrix: the tensor; embedding: each row of the last dim). By default it
computes both from the tensors it is given. When those tensors are shards of a larger one
(FSDP2, tensor parallel), the facts of the whole tensor are computed outside (one all-reduce
per step, ``sign_kernels.distributed``) and handed in through four optional arguments, all
given or all omitted:

* ``stats``: a 1-D fp64 tensor on the params' device. The op reads it on the device (no host
  synchronisation), so the collective that filled it needs no sync either.
* ``stats_nan[i]``: index in ``stats`` of tensor i's NaN count (any non-zero value fires the
  guard for the whole tensor), or -1: the NaN flag comes from tensor i's own gradient.
* ``stats_sumsq[i]``: index in ``stats`` of tensor i's sum of squares of θ_{t-1} (matrix role:
  one value, the whole tensor; embedding role: one value per row of the local tensor, in
  row order, from that index on), or -1: computed from tensor i's own θ. Ignored for the
  element-wise roles and on accumulation micro-steps.
* ``stats_n[i]``: the n of RMS = fp32(sqrt(sum / n)) (in fp64) where ``stats_sumsq[i] >= 0``:
  the whole tensor's numel (matrix), the whole row's length (embedding); must be >= 1 there.

Omitted, the op computes exactly what it computed before these arguments existed (the
unsharded path is unchanged, bit for bit). The same inputs serve any other source of the
sums, e.g. sums of squares cached from the previous step's write pass.

NOTE: [Tiger sums of squares out]
The sums of squares the next call needs can come out of this one (issue 15: no read-only pass
over θ on the steady path). Two more optional arguments, given together or not at all:

* ``sumsq_out``: a 1-D fp64 tensor on the params' device (it may be ``stats`` itself);
* ``sumsq_out_at[i]``: index in ``sumsq_out`` of tensor i's sums (matrix role: one value;
  embedding role: one per row of the last dim, from that index on), or -1: none wanted.
  Ignored for the element-wise roles.

After the call, every wanted entry holds the sum of squares of θ *as the call leaves it*,
summed exactly as this backend's own pre-pass sums θ (the CPU kernels: the same calls over
the same chunks and rows; the CUDA kernels: the same device functions over the same chunks,
NOTE: [CUDA sums of squares out] in csrc/cuda/sign_functors.cuh; Triton: the same fixed
pairwise order over the update's blocks, NOTE: [Triton sums of squares] in
sign_kernels/triton/_kernels.py; the reference: the same torch expressions), so handing them to the
next call as ``stats_sumsq`` (with ``stats_n`` the tensor's numel, or its row length) gives
the RMS that call would compute from θ itself, bit for bit. This holds whatever the call
does: an update (the sums are a by-product of the write pass), the NaN guard (likewise),
an accumulation micro-step or a step GradScaler skips (θ is not written: the sums are read
from θ, unless they are the given ones in place -- ``sumsq_out`` is ``stats`` and
``sumsq_out_at[i] == stats_sumsq[i]`` -- which then stay as they are). An empty tensor's entry
is left as it is. Every backend produces
them (cpu, cuda, triton, reference); the optimizer caches them (NOTE: [cached sums of squares]
in sign_kernels/optim/tiger.py).

Two conditions the backends assume and do not check (the optimizer always meets them): the
tensors' ranges in ``sumsq_out`` do not overlap (overlapping ranges get unspecified values:
the GPU kernels write them from different blocks), and "``sumsq_out`` is ``stats``" means
the same storage at the same offset (the compiled backends compare data pointers, the
reference compares the tensor objects; two different views of one buffer may be treated
differently, which matters only if the given sums are not θ's).
"""

from __future__ import annotations

import torch

LIB_NAME = "sign_kernels"

_COMMON_TAIL = "Tensor? grad_scale, Tensor? found_inf, int[] seeds, bool stochastic_rounding, Tensor? clip=None) -> ()"
# 8-bit momentum and the correction byte (NOTE: [int8 momentum], NOTE: [correction byte]).
_COMPRESSED = "Tensor(d!)[]? exp_avg_scales=None, Tensor(e!)[]? residuals=None"
# Tiger's statistics given from outside (NOTE: [Tiger statistics input]).
_TIGER_STATS = "Tensor? stats=None, int[]? stats_nan=None, int[]? stats_sumsq=None, int[]? stats_n=None"
# Tiger's sums of squares of θ as the call leaves it (NOTE: [Tiger sums of squares out]).
_TIGER_SUMSQ_OUT = "Tensor(c!)? sumsq_out=None, int[]? sumsq_out_at=None"

SCHEMAS = {
    "lion_": (
        "lion_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor[] steps, "
        "float lr, Tensor? lr_t, float beta1, float beta2, float weight_decay, "
        + _COMMON_TAIL.replace(") -> ()", ", " + _COMPRESSED + ") -> ()")
    ),
    "tiger_": (
        "tiger_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor[] steps, "
        "int[] roles, float lr, Tensor? lr_t, float beta, float weight_decay, "
        "int grad_accum_steps, float shrink_ratio, "
        + _COMMON_TAIL.replace(", Tensor? clip=None) -> ()", ", " + _TIGER_STATS + ", " + _TIGER_SUMSQ_OUT
                              + ", Tensor? clip=None, " + _COMPRESSED + ") -> ()")
    ),
    "simba_": (
        "simba_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] sign_counts, Tensor[] steps, "
        "float lr, Tensor? lr_t, int window_size, int threshold_count, float weight_decay, "
        + _COMMON_TAIL
    ),
}

# Distributed Lion's two fused passes (sign_kernels/distributed; NOTE: [wire fields] in
# csrc/core/dist_lion_math.h): (a) read g, m -> write m and the 2-bit fields of
# d = sign(b1 m + (1-b1) g) into uint8 ``packed`` (ceil(numel / 4) bytes each); (b) read the
# voted fields (``bits`` wide) and θ -> θ = θ (1 - lr wd) - lr (field / divisor). With
# ``found_inf`` non-zero, (a) keeps m and writes 0 fields, (b) changes nothing.
SCHEMAS["dist_lion_pack_"] = (
    "dist_lion_pack_(Tensor[] grads, Tensor(a!)[] exp_avgs, Tensor(b!)[] packed, float beta1, float beta2, "
    "Tensor? grad_scale, Tensor? found_inf, Tensor? clip=None) -> ()"
)
SCHEMAS["dist_lion_apply_"] = (
    "dist_lion_apply_(Tensor(a!)[] params, Tensor[] votes, int bits, int divisor, float lr, Tensor? lr_t, "
    "float weight_decay, Tensor? found_inf) -> ()"
)
# The vote on one rank's slice: ``received`` holds N rows of S bytes of 2-bit fields (row k
# from rank k); ``out`` gets the sign of each field's sum (majority, 2-bit fields) or the sum
# (``out_bits`` 2, 4 or 8).
SCHEMAS["dist_lion_vote_"] = (
    "dist_lion_vote_(Tensor received, Tensor(a!) out, int world_size, int out_bits, bool majority) -> ()"
)
# The norm pass of clipping inside the step (NOTE: [clipping inside the step]).
SCHEMAS["sumsq_"] = "sumsq_(Tensor[] tensors, Tensor? scale, Tensor(a!) out) -> ()"
# Ops implemented for CPU only: on CUDA, Distributed Lion's vote runs as a few torch ops on the
# device (sign_kernels/distributed/_wire.py). Every other op has CPU and CUDA kernels
# (scripts/cuda_build_check.sh checks it on the CUDA build).
CPU_ONLY = frozenset({"dist_lion_vote_"})

_lib = torch.library.Library(LIB_NAME, "DEF")
for _schema in SCHEMAS.values():
    _lib.define(_schema)


def _fake(*args, **kwargs) -> None:
    # The ops mutate their inputs in place and return nothing: the fake kernel has
    # nothing to allocate. Shape checks belong to the real kernels.
    return None


for _name in SCHEMAS:
    torch.library.register_fake(f"{LIB_NAME}::{_name}", _fake, lib=_lib)


def op(name: str):
    """The ``torch.ops.sign_kernels`` overload packet of one op ("lion_", ...)."""
    return getattr(torch.ops.sign_kernels, name)


def has_kernel(name: str, dispatch_key: str) -> bool:
    """Whether an implementation of op ``name`` is registered for ``dispatch_key``."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{LIB_NAME}::{name}", dispatch_key)
