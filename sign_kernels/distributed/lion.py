"""Distributed Lion (Liu et al. 2024): data-parallel Lion that exchanges 2-bit signs, not gradients.

See :class:`DistributedLion`. The wire format and the vote are in ``_wire.py``; the fused
passes are the ops ``torch.ops.sign_kernels.dist_lion_pack_`` / ``dist_lion_apply_`` (CPU and
CUDA kernels), their Triton twins, and the pure-torch reference.
"""

from __future__ import annotations

import logging
import zlib
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .. import _ops
from .. import backends as _backends
from ..optim import _clip
from ..optim.lion import Lion
from . import _wire

logger = logging.getLogger("sign_kernels")

VOTES = ("majority", "average")
DEFAULT_BUCKET_ELEMENTS = 1 << 22  # 4M parameters = 1 MiB of packed signs per bucket


def local_grad_hook(state, bucket):
    """A DDP communication hook that skips the gradient all-reduce.

    ``ddp_model.register_comm_hook(None, local_grad_hook)``: every rank keeps its own
    gradient, which is what :class:`DistributedLion` takes (it exchanges signs instead).
    """
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


# DDP checks a hook's annotations against these objects (strings, under `from __future__
# import annotations`, would fail the check).
if dist.is_available():
    local_grad_hook.__annotations__ = {"bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]}


def _pass_fns(name: str, explicit: bool) -> Tuple[Callable, Callable, str]:
    """(pack, apply, backend name) of Distributed Lion's passes on backend ``name``."""
    if name == "reference":
        return _wire.dist_lion_pack_, _wire.dist_lion_apply_, "reference"
    if name == "triton":
        from ..triton import _dist_lion

        return _dist_lion.dist_lion_pack_, _dist_lion.dist_lion_apply_, "triton"
    key = "CPU" if name == "cpu" else "CUDA"
    if _ops.has_kernel("dist_lion_pack_", key) and _ops.has_kernel("dist_lion_apply_", key):
        return _ops.op("dist_lion_pack_"), _ops.op("dist_lion_apply_"), name
    reason = f"sign_kernels._C has no {key} kernels of dist_lion_pack_/dist_lion_apply_ (an older build?)"
    if explicit:
        raise _backends.BackendUnavailableError(f'backend="{name}" is not available for DistributedLion: {reason}')
    fallback = "triton" if name == "cuda" and _backends.available_backends()["triton"] is None else "reference"
    logger.info("sign_kernels: DistributedLion uses %r instead of %r: %s", fallback, name, reason)
    return _pass_fns(fallback, False)


class _Call:
    """One op call of a step: tensors of one param group and one (device, dtypes) bucket."""

    __slots__ = ("group", "pack", "apply", "backend", "params", "grads", "positions", "offsets", "nbytes")

    def __init__(self, group, pack, apply, backend):
        self.group, self.pack, self.apply, self.backend = group, pack, apply, backend
        self.params: List[torch.Tensor] = []
        self.grads: List[torch.Tensor] = []
        self.positions: List[int] = []
        self.offsets: List[int] = []  # byte offset of each tensor's 2-bit fields in its bucket
        self.nbytes: List[int] = []


class _CommBucket:
    """The packed signs of a run of tensors, exchanged with one all-to-all and one all-gather."""

    __slots__ = ("calls", "size", "send", "recv", "mine", "gathered", "elements")

    def __init__(self):
        self.calls: List[_Call] = []
        self.size = 0  # bytes of 2-bit fields, before padding
        self.elements = 0


class DistributedLion(Lion):
    r"""Distributed Lion: each rank keeps its own momentum and sends 2 bits per parameter.

    On rank :math:`i` of :math:`N`, with its own gradient :math:`g_i` and momentum :math:`m_i`:

    .. math::
        d_i &= \mathrm{sign}(\beta_1 m_i + (1-\beta_1) g_i) \in \{-1, 0, +1\} \\
        m_i &= \beta_2 m_i + (1-\beta_2) g_i \\
        V &= \mathrm{sign}\textstyle\sum_i d_i \ \text{(majority, ties} \to 0) \quad\text{or}\quad
             \textstyle\sum_i d_i / N \ \text{(average)} \\
        \theta &= \theta (1 - \eta\lambda) - \eta V

    and every rank applies the same :math:`V`, so the replicas stay identical. No gradient
    is all-reduced: the :math:`d_i` travel as 2-bit fields (0 stays 0: an element no rank
    moves does not move but by decay). The exchange is an all-to-all of the packed signs
    (each rank votes on its 1/N slice) and an all-gather of the packed result, bucket by
    bucket, asynchronously, so a bucket's exchange overlaps the next bucket's pass. Per rank
    and step that sends :math:`\frac{N-1}{N}(n/4 + n/4)` bytes for majority and
    :math:`\frac{N-1}{N}(n/4 + n\,b/8)` for average (:math:`b` = 4 bits for N <= 7, 8 for
    N <= 127) -- against :math:`\frac{N-1}{N}\,8n` for a ring all-reduce of fp32 gradients
    (1/16 and 3/32 of it); :meth:`wire_bytes` reports what the last step handed to the
    collectives. With identical gradients on every rank the result is Lion's, bit for bit.

    Use it with a plain model (parameters are broadcast from the group's rank 0 when the
    optimizer is built, ``sync_params=True``) and local gradients, or with DDP whose
    gradient all-reduce is switched off by :func:`local_grad_hook`::

        model = DDP(model)
        model.register_comm_hook(None, local_grad_hook)
        opt = DistributedLion(model.parameters(), lr=1e-4, weight_decay=0.1)

    Every rank must step the same parameters (those with a gradient) with the same groups:
    a mismatch is detected (one 24-byte all-reduce per step, which also spreads a
    GradScaler inf: when any rank found one, every rank skips the step) and raises on
    every rank. Sharded parameters (DTensor, FSDP2) are refused: their gradients are
    already reduce-scattered; use :class:`sign_kernels.Lion` there. Without an initialised
    process group the optimizer runs alone (N = 1) and is Lion.

    Args:
        params, lr, betas, weight_decay, backend, momentum_dtype: as :class:`sign_kernels.Lion`.
        max_grad_norm: clip this rank's local gradients to this total norm inside the step
            (:class:`sign_kernels.Lion`'s rule, over the local gradients: no collective of its
            own). A non-finite local norm on any rank skips the step on every rank (it travels
            in the step check), as GradScaler's inf does.
        vote: "majority" or "average".
        process_group: the data-parallel group (None: the default group).
        bucket_elements: parameters per exchange bucket (default 4M: 1 MiB of signs).
        sync_params: broadcast the parameters from the group's rank 0 at construction.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: Tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        vote: str = "majority",
        process_group: Optional[Any] = None,
        backend: str = "auto",
        momentum_dtype: Optional[torch.dtype] = None,
        bucket_elements: int = DEFAULT_BUCKET_ELEMENTS,
        sync_params: bool = True,
        max_grad_norm: Optional[float] = None,
    ):
        if vote not in VOTES:
            raise ValueError(f"vote must be one of {VOTES}, got {vote!r}")
        if not isinstance(bucket_elements, int) or bucket_elements < 1:
            raise ValueError(f"bucket_elements must be a positive int, got {bucket_elements!r}")
        self.vote = vote
        self.process_group = process_group
        self.bucket_elements = bucket_elements
        if dist.is_available() and dist.is_initialized():
            self.world_size = dist.get_world_size(process_group)
            self.rank = dist.get_rank(process_group)
        else:
            if process_group is not None:
                raise ValueError("process_group was given but torch.distributed is not initialised")
            self.world_size, self.rank = 1, 0
        if vote == "average":
            _wire.sum_bits(self.world_size)  # raises past 127 ranks
        self._buffers: Dict[tuple, List[_CommBucket]] = {}
        self._last_bytes: Dict[str, int] = {}
        super().__init__(params, lr, betas, weight_decay, backend=backend, momentum_dtype=momentum_dtype,
                         max_grad_norm=max_grad_norm)
        if sync_params and self.world_size > 1:
            self.broadcast_params()

    # ------------------------------------------------------------------ validation
    def _validate_hparams(self, group, where: str) -> None:
        super()._validate_hparams(group, where)
        if group.get("stochastic_rounding", False):
            raise ValueError(f"{where}: DistributedLion does not implement stochastic_rounding")
        for flag in ("maximize", "capturable"):  # Lion's flags its pack/apply passes do not take
            if group.get(flag, False):
                raise ValueError(f"{where}: DistributedLion does not implement {flag}=True")

    def _validate_group(self, group, group_index: int, params: bool = True) -> None:
        if params:
            for i, p in enumerate(group["params"]):
                if _is_dtensor(p):
                    raise TypeError(
                        f"{self._where(group_index)}: param {i} is a DTensor (sharded, e.g. FSDP2 or tensor "
                        "parallel): its gradient is already reduce-scattered, so there is no local gradient to "
                        "vote on. Use sign_kernels.Lion for sharded parameters."
                    )
        super()._validate_group(group, group_index, params)

    # ------------------------------------------------------------------ distribution
    def broadcast_params(self) -> None:
        """Copy every parameter from the group's rank 0 (a plain model's replicas start equal)."""
        src = dist.get_global_rank(self.process_group, 0) if self.process_group is not None else 0
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    dist.broadcast(p.data, src, group=self.process_group)

    def wire_bytes(self) -> Dict[str, int]:
        """Bytes the last step handed to the collectives, per rank.

        ``sent``/``received``: this rank's bytes (all-to-all: all but its own slice;
        all-gather: its slice to each of the N-1 others; plus the 24-byte check).
        ``elements``: parameters stepped. ``fp32_allreduce``: what a ring all-reduce of
        fp32 gradients sends per rank, 2 (N-1)/N * 4 bytes per element, for comparison.
        """
        return dict(self._last_bytes)

    # ------------------------------------------------------------------ the step
    def _layout(self, plan) -> Tuple[List[_CommBucket], int]:
        """Cut the step's tensors into exchange buckets; returns them and a layout hash."""
        buckets: List[_CommBucket] = []
        current = _CommBucket()
        signature = []
        for gi, (group, _offset, sbuckets) in enumerate(plan):
            explicit = group["backend"] != "auto"
            for sb in sbuckets:
                pack, apply, name = _pass_fns(sb.backend.name, explicit)
                call = None
                for p, g, j in zip(sb.params, sb.grads, sb.positions):
                    if current.elements >= self.bucket_elements:
                        buckets.append(current)
                        current, call = _CommBucket(), None
                    if call is None:
                        call = _Call(group, pack, apply, name)
                        current.calls.append(call)
                    nb = _wire.nbytes(p.numel(), 2)
                    call.params.append(p)
                    call.grads.append(g)
                    call.positions.append(j)
                    call.offsets.append(current.size)
                    call.nbytes.append(nb)
                    current.size += nb
                    current.elements += p.numel()
                    signature.append((gi, j, p.numel(), str(p.dtype)))
        if current.calls:
            buckets.append(current)
        return buckets, zlib.crc32(repr(signature).encode())

    def _allocate(self, buckets: List[_CommBucket], device: torch.device, out_bits: int) -> None:
        n = self.world_size
        for b in buckets:
            padded = -(-max(b.size, 1) // n) * n
            slice_out = padded // n * out_bits // 2
            b.send = torch.zeros(padded, dtype=torch.uint8, device=device)
            b.recv = torch.empty(padded, dtype=torch.uint8, device=device) if n > 1 else b.send
            b.mine = torch.empty(slice_out, dtype=torch.uint8, device=device)
            b.gathered = torch.empty(slice_out * n, dtype=torch.uint8, device=device) if n > 1 else b.mine

    @torch.no_grad()
    def step(self, closure=None):
        """One Distributed Lion step: pack, exchange, vote, exchange, apply (bucket by bucket)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale: Optional[torch.Tensor] = getattr(self, "grad_scale", None)
        found_inf: Optional[torch.Tensor] = getattr(self, "found_inf", None)
        n = self.world_size
        pg = self.process_group

        plan = self._plan()  # validates everything; writes nothing
        layout, layout_hash = self._layout(plan)
        devices = {c.params[0].device for b in layout for c in b.calls}
        if len(devices) > 1:
            raise RuntimeError(f"DistributedLion: all parameters must be on one device, got {sorted(map(str, devices))}")
        device = devices.pop() if devices else torch.device("cpu")
        # Clipping inside the step (NOTE: [clipping inside the step] in optim/_clip.py), of the
        # local gradients: the norm pass before the step check, which spreads a non-finite
        # norm of any rank as it spreads GradScaler's inf (every rank must skip together).
        max_norm = self.param_groups[0].get("max_grad_norm") if self.param_groups else None
        clip = _clip.norm_pass(plan, grad_scale, max_norm) if max_norm is not None and layout else None
        clip_kw = {}
        if clip is not None:
            self.grad_norm = _clip.finish(clip, tiger=False)
            coef, skip = clip.for_device(device, found_inf)
            clip_kw = {"clip": coef}
            found_inf = skip  # GradScaler's flag or'ed with the local non-finite norm

        # NOTE: [step check] One small all-reduce (MAX) of (found_inf, hash, -hash): every rank
        # learns whether any rank found an inf (then all skip, as with DDP's reduced grads), and
        # that all ranks step the same tensors in the same layout -- a mismatch would pair wrong
        # bytes in the exchange, or hang; here it raises on every rank, before anything is written.
        check_bytes = 0
        if n > 1:
            fi = found_inf.to(device=device, dtype=torch.float64).reshape(1) if found_inf is not None else None
            h = torch.tensor([float(layout_hash), -float(layout_hash)], dtype=torch.float64, device=device)
            check = torch.cat([fi, h]) if fi is not None else torch.cat([h.new_zeros(1), h])
            dist.all_reduce(check, op=dist.ReduceOp.MAX, group=pg)
            check_bytes = 2 * (n - 1) * check.numel() * 8 // n
            if check[1].item() != -check[2].item():
                raise RuntimeError(
                    "DistributedLion: the ranks step different parameters (a param has a gradient on some ranks "
                    "and not on others, or the param groups differ); every rank must step the same tensors"
                )
            if found_inf is not None:
                found_inf = check[0].to(torch.float32)
        if not layout:
            self._last_bytes = dict(sent=check_bytes, received=check_bytes, elements=0, fp32_allreduce=0)
            return loss

        out_bits = 2 if self.vote == "majority" else _wire.sum_bits(n)
        divisor = 1 if self.vote == "majority" else n
        key = (layout_hash, str(device), out_bits, tuple(b.size for b in layout))
        cached = self._buffers.get(key)
        if cached is None:
            self._allocate(layout, device, out_bits)
            self._buffers.clear()
            self._buffers[key] = layout
        else:
            for b, c in zip(layout, cached):
                b.send, b.recv, b.mine, b.gathered = c.send, c.recv, c.mine, c.gathered

        for b in layout:  # lazy state, as Lion
            for call in b.calls:
                for p in call.params:
                    state = self.state[p]
                    if not state:
                        self._init_state(call.group, p, state)
        gs = grad_scale.to(device, non_blocking=True) if grad_scale is not None else None
        fi = found_inf.to(device, non_blocking=True) if found_inf is not None else None

        sent = check_bytes
        elements = 0
        # (a) pack each bucket, and start its all-to-all while the next one is packed.
        a2a = []
        for b in layout:
            if b.size < b.send.numel():
                b.send[b.size:].zero_()
            for call in b.calls:
                beta1, beta2 = call.group["betas"]
                grads = [g if g.is_contiguous() else g.contiguous() for g in call.grads]
                bufs = [self.state[p]["exp_avg"] for p in call.params]
                views = [b.send[o:o + nb] for o, nb in zip(call.offsets, call.nbytes)]
                call.pack(grads, bufs, views, float(beta1), float(beta2), gs, fi, **clip_kw)
            elements += b.elements
            if n > 1:
                a2a.append(dist.all_to_all_single(b.recv, b.send, group=pg, async_op=True))
                sent += b.send.numel() * (n - 1) // n
        # Vote on this rank's slice of each bucket and start its all-gather.
        gathers = []
        for i, b in enumerate(layout):
            if n > 1:
                a2a[i].wait()
                _wire.vote(b.recv.view(n, -1), self.vote, b.mine)
                gathers.append(_all_gather(b.gathered, b.mine, pg))
                sent += b.mine.numel() * (n - 1)
            elif out_bits == 2:
                b.mine = b.send  # one rank: its signs are the vote
                b.gathered = b.send
            else:
                _wire.vote(b.send.view(1, -1), self.vote, b.mine)
        # (b) apply each bucket's vote as soon as it has arrived.
        k = out_bits // 2  # output bytes per input byte
        for i, b in enumerate(layout):
            if n > 1:
                gathers[i].wait()
            for call in b.calls:
                lr = call.group["lr"]
                if isinstance(lr, torch.Tensor):
                    lr_f, lr_t = 0.0, lr.to(device=device, dtype=torch.float32, non_blocking=True).reshape(())
                else:
                    lr_f, lr_t = float(lr), None
                params = [p if p.is_contiguous() else p.contiguous() for p in call.params]
                votes = [b.gathered[o * k:(o + nb) * k] for o, nb in zip(call.offsets, call.nbytes)]
                call.apply(params, votes, out_bits, divisor, lr_f, lr_t, float(call.group["weight_decay"]), fi)
                torch.autograd.graph.increment_version(params)  # NOTE: [version counters] in optim/_base.py
                for p, q in zip(call.params, params):
                    if q is not p:
                        p.copy_(q)
                steps = [self.state[p]["step"] for p in call.params]
                if fi is None:
                    torch._foreach_add_(steps, 1)
                else:
                    torch._foreach_add_(steps, 1 - fi.to(torch.int64))
        self._last_bytes = dict(
            sent=sent, received=sent, elements=elements,
            fp32_allreduce=2 * (n - 1) * 4 * elements // n if n > 1 else 0,
        )
        return loss


def _all_gather(out: torch.Tensor, inp: torch.Tensor, pg):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, inp, group=pg, async_op=True)


def _is_dtensor(p: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(p, DTensor)
