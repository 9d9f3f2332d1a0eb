"""DTensor parameters (FSDP2, tensor parallel): local shards for the kernels, global statistics.

What a sharded step adds to an unsharded one (docs/rules.md, "Sharded parameters"):

* the kernels see each rank's local shard only: a DTensor param, its grad and its state are
  replaced by their local tensors before bucketing (``local_pair``, ``local_states``);
* state is created with the param's placements (``torch.zeros_like`` of the DTensor: each
  rank holds its 1/N, int16 counters stay int16);
* Tiger reads two facts of the *whole* tensor: RMS(θ) and whether its gradient holds a NaN.
  ``global_stats`` computes each rank's partial sums of squares and NaN flags of every
  sharded tensor of the step, reduces them in one all-reduce per process group (over exactly
  the mesh dims that shard each tensor; an embedding's rows only where the row itself is
  split), and hands the result to the ``tiger_`` op (NOTE: [Tiger statistics input] in
  ``sign_kernels/_ops.py``), which reads it on the device: no host synchronisation, and every
  rank takes the same branch.

NOTE: [unwrap, not a DTensor sharding rule]
Two ways exist to run a custom op on DTensors: register a sharding strategy for it
(``torch.distributed.tensor.experimental.register_sharding``, what torch does for its fused
AdamW), or unwrap the local tensors in the optimizer. The optimizer already loops over its
params once per step to group them, so unwrapping costs one attribute read per tensor there;
a sharding rule instead runs DTensor's dispatch (placement propagation, then unwrapping
every tensor of every list) on each op call, and could not express Tiger's whole-tensor
statistics, which need a collective the op itself must not issue. Measured host cost of a
step: see bench/NOTES.md ("sharded step").
"""

from __future__ import annotations

import itertools
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch

_DTENSOR_MODULE = "torch.distributed.tensor"


def dtensor_class():
    """The DTensor class, or None while ``torch.distributed.tensor`` was never imported.

    No DTensor can exist before that module is imported, so the unsharded path pays nothing:
    not even the import.
    """
    mod = sys.modules.get(_DTENSOR_MODULE)
    return getattr(mod, "DTensor", None) if mod is not None else None


def _shard_dim(placement) -> Optional[int]:
    """The tensor dim a placement splits, None for Replicate; raises for anything else."""
    if placement.is_shard() or type(placement).__name__ == "_StridedShard":  # FSDP2 + TP: one dim, split
        return placement.dim
    if placement.is_replicate():
        return None
    raise ValueError(placement)


# Sharding specs already checked, by id (the spec is kept alive here, so its id is not reused).
# A param's spec object is stable across steps, and FSDP2 gives grads the param's own spec:
# the per-step check is one dict lookup and an identity test per tensor.
_CHECKED_SPECS: Dict[int, Any] = {}


def _describe(p) -> str:
    return f"placements {tuple(p.placements)} on mesh {tuple(p.device_mesh.mesh.shape)}"


def check_placements(p, where: str, j: int) -> None:
    """Refuse a param whose placements the kernels cannot honour exactly (writes nothing)."""
    for placement in p.placements:
        try:
            _shard_dim(placement)
        except ValueError:
            kind = "Partial (a pending sum, not a tensor value)" if placement.is_partial() else repr(placement)
            raise ValueError(
                f"{where}: param {j} has placement {placement!r} ({_describe(p)}): sign optimizers take "
                f"Shard and Replicate placements only; a {kind} placement cannot be updated exactly "
                f"(redistribute it to Shard or Replicate first)"
            ) from None


def local_pair(p, g, dtensor_cls, where: str, j: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The local shards of a DTensor param and its grad, after checking that they match."""
    spec = p._spec
    if _CHECKED_SPECS.get(id(spec)) is not spec:
        check_placements(p, where, j)
        _CHECKED_SPECS[id(spec)] = spec
    gspec = getattr(g, "_spec", None)
    if gspec is spec:
        return p._local_tensor, g._local_tensor
    if not isinstance(g, dtensor_cls):
        raise RuntimeError(
            f"{where}: param {j} is a DTensor ({_describe(p)}) but its grad is a plain {type(g).__name__}"
        )
    if gspec.placements != spec.placements or (gspec.mesh is not spec.mesh and gspec.mesh != spec.mesh):
        raise RuntimeError(
            f"{where}: param {j} has {_describe(p)} but its grad has {_describe(g)}: the grad must be "
            f"sharded like the param (a Partial grad has not been reduced yet)"
        )
    return p._local_tensor, g._local_tensor


def local_states(bufs: List[Any]) -> List[torch.Tensor]:
    """Local tensors of a bucket's state (DTensors created with the param's placements).

    ``_local_tensor`` is an attribute read (``to_local()`` would add an autograd node per
    tensor); a state loaded as a plain tensor into a sharded param was distributed on load.
    """
    return [getattr(b, "_local_tensor", b) for b in bufs]


# ------------------------------------------------------------------ 8-bit momentum's block scales
def _scale_layout(p, scale_shape_fn):
    """(global scale shape, local scale shape) of DTensor ``p``'s int8 momentum, or raise
    ValueError when its sharding splits a block (NOTE: [int8 momentum] in csrc/core/sign_math.h:
    blocks are 64 consecutive elements of a row, so only a split of the last dim at a multiple
    of 64 keeps them whole; FSDP2's Shard(0) always does)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from .._quant import QBLOCK

    gshape = tuple(scale_shape_fn(p.shape))
    mesh_shape = tuple(p.device_mesh.mesh.shape)

    def bad(offset, size):
        return ValueError(
            f"{_describe(p)}: a rank holds columns [{offset}, {offset + size}) of the last dim (size "
            f"{p.shape[-1]}); int8 momentum keeps one scale per {QBLOCK} consecutive elements of a row, so a split "
            f"of the last dim must fall on a multiple of {QBLOCK} on every rank. Use another momentum_dtype for "
            "this parameter (a param group of its own), or shard another dim"
        )

    # Every rank must agree (a refusal on some ranks only would leave the others in a
    # collective): check every coordinate of the mesh, not only this rank's.
    try:
        from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset as at_coordinate

        coords = itertools.product(*(range(n) for n in mesh_shape))
        for coord in coords:
            lshape, offset = at_coordinate(p.shape, mesh_shape, list(coord), p.placements)
            slocal, soffset = at_coordinate(torch.Size(gshape), mesh_shape, list(coord), p.placements)
            want = tuple(scale_shape_fn(torch.Size(lshape)))
            if lshape[-1] and (offset[-1] % QBLOCK or tuple(slocal) != want or soffset[-1] * QBLOCK != offset[-1]):
                raise bad(offset[-1], lshape[-1])
    except (ImportError, TypeError):  # a torch without that helper: refuse any split of the last dim
        if any(_shard_dim(pl) in (p.ndim - 1, -1) for pl in p.placements):
            raise bad(0, 0) from None
    slocal, _ = compute_local_shape_and_global_offset(torch.Size(gshape), p.device_mesh, p.placements)
    return gshape, tuple(slocal)


_CHECKED_INT8: Dict[int, Any] = {}


def check_int8_sharding(p, where: str, j: int, scale_shape_fn) -> None:
    """Refuse (before anything changes) a DTensor param whose sharding would split a block."""
    spec = p._spec
    if _CHECKED_INT8.get(id(spec)) is spec:
        return
    try:
        _scale_layout(p, scale_shape_fn)
    except ValueError as exc:
        raise ValueError(f"{where}: param {j}: {exc}") from None
    _CHECKED_INT8[id(spec)] = spec


def zeros_scales(p, scale_shape_fn) -> torch.Tensor:
    """Zero bf16 block scales for ``p``'s int8 momentum: a plain tensor, or a DTensor with the
    param's mesh and placements (each rank holds the scales of its own blocks)."""
    cls = dtensor_class()
    if cls is None or not isinstance(p, cls):
        return torch.zeros(scale_shape_fn(p.shape), dtype=torch.bfloat16, device=p.device)
    gshape, lshape = _scale_layout(p, scale_shape_fn)
    local = torch.zeros(lshape, dtype=torch.bfloat16, device=p._local_tensor.device)
    stride = torch.empty(gshape, device="meta").stride()
    return cls.from_local(local, p.device_mesh, p.placements, run_check=False, shape=torch.Size(gshape),
                          stride=stride)


def full_tensor(t) -> torch.Tensor:
    """The whole tensor of a DTensor; int16 (Simba's counters) travels as int32 (neither gloo
    nor NCCL has int16 collectives), exactly."""
    if t.dtype == torch.int16:
        return t.to(torch.int32).full_tensor().to(torch.int16)
    return t.full_tensor()


def restore_state(p, buf: torch.Tensor, dtype: torch.dtype, dtensor_cls) -> torch.Tensor:
    """A loaded state tensor with ``p``'s placements (``p`` a DTensor), or whole (``p`` plain).

    * DTensor state of the same mesh and placements (a sharded checkpoint: DCP's default,
      or ``state_dict()`` of the same layout): each rank keeps its shard;
    * DTensor state of other placements: redistributed to the param's (collective);
    * a whole tensor (a single-process checkpoint, DCP's full state dict): each rank takes its
      own shard of it, no communication;
    * DTensor state for a plain param: gathered whole (collective).
    """
    buf = buf.detach()
    if not isinstance(p, dtensor_cls):
        return full_tensor(buf).to(device=p.device, dtype=dtype, copy=True).contiguous()
    if isinstance(buf, dtensor_cls):
        if buf.device_mesh != p.device_mesh:
            raise ValueError(
                f"state on mesh {tuple(buf.device_mesh.mesh.shape)} for a param on mesh "
                f"{tuple(p.device_mesh.mesh.shape)}: load it through torch.distributed.checkpoint, which reshards"
            )
        if tuple(buf.placements) != tuple(p.placements):
            buf = buf.redistribute(p.device_mesh, p.placements)
        local = buf._local_tensor.to(device=p.device, dtype=dtype, copy=True).contiguous()
    else:
        from torch.distributed.tensor import distribute_tensor

        whole = buf.to(device=p.device, dtype=dtype)
        local = distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None)._local_tensor
        local = local.clone(memory_format=torch.contiguous_format)
    return dtensor_cls.from_local(local, p.device_mesh, p.placements, run_check=False,
                                  shape=p.shape, stride=p.stride())


# ------------------------------------------------------------------ Tiger's global statistics
class _Layout:
    """Where each sharded tensor's statistics go in the step's one fp64 buffer (cached)."""

    __slots__ = ("key", "per_bucket", "perm", "nan_mask", "collectives", "extras", "size")

    def __init__(self, key):
        self.key = key
        # per bucket: (bucket number, NaN positions, matrix positions, split-embedding positions)
        self.per_bucket: List[Tuple[int, List[int], List[int], List[int]]] = []
        self.perm: Optional[torch.Tensor] = None     # raw order -> order grouped by reduction set
        self.nan_mask: Optional[torch.Tensor] = None  # entries that are NaN flags
        self.collectives: List[Tuple[Any, Any]] = []  # (process group, slice or index tensor)
        self.extras: List[Tuple[int, List[int], List[int], List[int]]] = []  # op arguments per bucket
        self.size = 0


def _build_layout(key, buckets, roles_of, role_matrix: int, role_embedding: int) -> _Layout:
    layout = _Layout(key)
    # Raw entries, in the order the pieces are computed: (set, kind, bucket, position, count).
    raw: List[Tuple[int, str, int, int, int]] = []
    sets: Dict[tuple, int] = {}  # reduction set (tuple of process groups) -> first-appearance index

    def set_index(groups: tuple) -> int:
        return sets.setdefault(groups, len(sets))

    n_entry: Dict[Tuple[int, int], int] = {}
    for bno, (group, bucket) in enumerate(buckets):
        roles = roles_of(group)
        nan_ks, sq_ks, row_ks = [], [], []
        entries = {"nan": [], "sq": [], "row": []}
        for k, (p, pos) in enumerate(zip(bucket.keys, bucket.positions)):
            mesh = getattr(p, "device_mesh", None)
            if mesh is None:
                continue  # a plain tensor next to DTensors (e.g. a module TP left alone)
            dims = [(d, _shard_dim(pl)) for d, pl in enumerate(p.placements)]
            shard = tuple(mesh.get_group(d) for d, sd in dims if sd is not None)
            if not shard:
                continue  # replicated: the local tensor is the whole tensor
            role = roles[pos]
            nan_ks.append(k)
            entries["nan"].append((set_index(shard), "nan", bno, k, 1))
            if role == role_matrix:
                sq_ks.append(k)
                entries["sq"].append((set_index(shard), "sq", bno, k, 1))
                n_entry[(bno, k)] = p.numel()
            elif role == role_embedding:
                rows = tuple(mesh.get_group(d) for d, sd in dims if sd is not None and sd == p.ndim - 1)
                if rows:  # the row itself is split: its sum crosses ranks
                    count = bucket.params[k].shape[:-1].numel()  # local rows, whole or not
                    row_ks.append(k)
                    entries["row"].append((set_index(rows), "row", bno, k, count))
                    n_entry[(bno, k)] = p.shape[-1]
        raw += entries["nan"] + entries["sq"] + entries["row"]
        layout.per_bucket.append((bno, nan_ks, sq_ks, row_ks))

    # Group the entries by reduction set (stable), so each process group reduces one slice.
    # Sets are ordered by (first, last) process group, groups numbered by first appearance:
    # on a 2-D mesh that gives {a}, {a, b}, {b}, where each group's sets are adjacent. The
    # order depends on the param lists only, so it is the same on every rank.
    pg_no: Dict[Any, int] = {}
    for groups in sets:
        for pg in groups:
            pg_no.setdefault(pg, len(pg_no))
    set_key = {s: (min(pg_no[g] for g in groups), max(pg_no[g] for g in groups), s) for groups, s in sets.items()}
    offsets, start = [], 0
    for e in raw:
        offsets.append(start)
        start += e[4]
    order = sorted(range(len(raw)), key=lambda i: set_key[raw[i][0]])
    final: Dict[Tuple[str, int, int], int] = {}
    perm: List[int] = []
    set_span: Dict[int, List[int]] = {}
    for i in order:
        s, kind, bno, k, count = raw[i]
        final[(kind, bno, k)] = len(perm)
        span = set_span.setdefault(s, [len(perm), len(perm)])
        perm.extend(range(offsets[i], offsets[i] + count))
        span[1] = len(perm)
    layout.size = len(perm)
    if perm != list(range(len(perm))):
        layout.perm = torch.tensor(perm, dtype=torch.int64)
    mask = torch.zeros(len(perm), dtype=torch.bool)
    for (kind, bno, k), at in final.items():
        if kind == "nan":
            mask[at] = True
    layout.nan_mask = mask

    # One collective per process group, over the slice of the sets it belongs to.
    pg_sets: Dict[Any, List[int]] = {}
    for groups, s in sets.items():
        for pg in groups:
            pg_sets.setdefault(pg, []).append(s)
    for pg, ss in sorted(pg_sets.items(), key=lambda item: pg_no[item[0]]):
        spans = sorted(set_span[s] for s in ss if s in set_span)
        contiguous = all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        if contiguous:
            layout.collectives.append((pg, slice(spans[0][0], spans[-1][1])))
        else:  # sets interleave (3-D meshes): gather, reduce, scatter back
            idx = torch.cat([torch.arange(a, b) for a, b in spans])
            layout.collectives.append((pg, idx))

    for bno, (group, bucket) in enumerate(buckets):
        n = len(bucket.keys)
        nan_i, sq_i, n_i = [-1] * n, [-1] * n, [0] * n
        for k in range(n):
            nan_i[k] = final.get(("nan", bno, k), -1)
            sq = final.get(("sq", bno, k), final.get(("row", bno, k), -1))
            sq_i[k] = sq
            if sq >= 0:
                n_i[k] = n_entry[(bno, k)]
        layout.extras.append((bno, nan_i, sq_i, n_i))
    return layout


def _norm_dtype(t: torch.Tensor) -> Optional[torch.dtype]:
    return None if t.dtype in (torch.float32, torch.float64) else torch.float32


def global_stats(opt, plan, grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor] = None,
                 clip=None, tiger: bool = True) -> None:
    """The statistics of the whole tensors of every sharded bucket of ``plan``, in one collective.

    One fp64 buffer per step holds, for each sharded tensor, a partial gradient entry and
    (Tiger) the partial sum of squares of θ (matrix role) and per-row sums of squares
    (embedding role, row split); one all-reduce per process group sums them (over exactly the
    mesh dims that shard each tensor). The gradient entry is the NaN flag of g / grad_scale
    (Tiger without clipping), or, with ``clip`` (max_grad_norm; NOTE: [clipping inside the
    step] in sign_kernels/optim/_clip.py), the norm pass's local sum of squares of g /
    grad_scale: the reduced sums go back into ``clip.sums``, whole, and a NaN in any shard
    makes the whole tensor's sum NaN, which is Tiger's flag. Tiger's buckets then read their
    entries on the device (``bucket.extra``). Every rank must step the same params (as FSDP2/TP
    do), so every rank issues the same collectives in the same order.
    """
    import torch.distributed as dist

    from ..backends.reference import ROLE_ELEMENTWISE, ROLE_EMBEDDING, ROLE_MATRIX

    numbered = [(group, b) for group, _, bs in plan for b in bs]
    buckets = [(group, b) for group, b in numbered if b.sharded]
    if not buckets:
        return
    devices = {b.params[0].device for _, b in buckets}
    if len(devices) > 1:
        raise RuntimeError(
            f"{type(opt).__name__}: sharded params on several devices ({sorted(map(str, devices))}) in one "
            "optimizer are not supported; use one optimizer per device"
        )
    device = devices.pop()
    if tiger:
        roles_of = opt._roles
    else:  # Lion, Simba: element-wise, only the gradients' entries
        def roles_of(group):
            return (ROLE_ELEMENTWISE,) * len(group["params"])
    key = (tiger, tuple((id(group), roles_of(group), tuple(map(id, b.keys))) for group, b in buckets))
    attr = "_dt_stats_layout" if tiger else "_dt_clip_layout"
    layout = getattr(opt, attr, None)
    if layout is None or layout.key != key:
        layout = _build_layout(key, buckets, roles_of, ROLE_MATRIX, ROLE_EMBEDDING)
        if layout.perm is not None:
            layout.perm = layout.perm.to(device)
        layout.nan_mask = layout.nan_mask.to(device)
        layout.collectives = [
            (pg, sl if isinstance(sl, slice) else sl.to(device)) for pg, sl in layout.collectives
        ]
        setattr(opt, attr, layout)
    if layout.size == 0:
        return

    f64 = torch.float64
    pieces = []
    cached_sums = getattr(opt, "local_sums", None)
    for bno, nan_ks, sq_ks, row_ks in layout.per_bucket:
        group, b = buckets[bno]
        # NOTE: [cached sums in the collective] The local sums of squares of θ come from the
        # tiger_ op itself: the ones the previous step's write pass left (NOTE: [cached sums
        # of squares] in sign_kernels/optim/tiger.py) where they still describe θ, else a
        # call of the op that writes nothing and sums θ in its own pre-pass order
        # (Tiger.local_sums). Either way the same bits for the same θ, so a run resumed from
        # a checkpoint (no cache) feeds the collective exactly what the uninterrupted run fed
        # it (it once used foreach norms there, in another order and in fp32: the resumed
        # run differed).
        sums, at = cached_sums(group, b) if cached_sums is not None and (sq_ks or row_ks) else (None, None)
        if nan_ks and clip is not None:
            pieces.append(clip.sums.index_select(0, torch.tensor([b.clip_at + k for k in nan_ks], device=clip.sums.device)).to(device))
        elif nan_ks and found_inf is not None:
            # NOTE: [GradScaler's flag as the NaN guard] (sign_kernels/optim/tiger.py): found_inf
            # = 0 certifies these gradients finite, and a set one makes the op change nothing;
            # it stands in for the norms of g (NaN where set, 0 where not): no read of g.
            set_ = found_inf.to(device=device, dtype=f64).reshape(1) != 0
            flag = torch.zeros(1, dtype=f64, device=device).masked_fill_(set_, float("nan"))
            pieces.append(flag.expand(len(nan_ks)))
        elif nan_ks:
            # NOTE: [statistics from foreach norms] One fused foreach L2 norm per bucket for
            # the grads: its norm is NaN exactly when g holds a NaN (squares of infinities and
            # overflows give inf, never NaN); only that fact crosses the wire.
            grads = [b.grads[k] for k in nan_ks]
            pieces.append(torch.stack(torch._foreach_norm(grads, 2, _norm_dtype(grads[0]))).to(f64))
        if sq_ks:
            # (an empty shard has no sums: its entry is 0)
            piece = sums.index_select(0, torch.tensor([max(at[k], 0) for k in sq_ks], device=sums.device))
            empty = [i for i, k in enumerate(sq_ks) if at[k] < 0]
            if empty:
                piece[torch.tensor(empty, device=piece.device)] = 0.0
            pieces.append(piece)
        for k in row_ks:
            count = b.params[k].shape[:-1].numel()
            pieces.append(sums[at[k]:at[k] + count] if at[k] >= 0 else torch.zeros(count, dtype=f64, device=device))
    raw = torch.cat(pieces)
    if layout.perm is not None:
        raw = raw.index_select(0, layout.perm)
    if clip is not None:
        vals = raw  # the gradient entries are sums of squares of g / grad_scale already
    else:
        # g / grad_scale is NaN where g is (GradScaler's scale is finite and > 0). The NaN
        # entries are norms of g, the others sums of squares of θ.
        flags = raw if grad_scale is None else raw / grad_scale.to(device=device, dtype=f64)
        vals = torch.where(layout.nan_mask, flags.isnan().to(f64), raw)
    for pg, sl in layout.collectives:
        if isinstance(sl, slice):
            dist.all_reduce(vals[sl], group=pg)
        else:
            part = vals.index_select(0, sl)
            dist.all_reduce(part, group=pg)
            vals.index_copy_(0, sl, part)
    if clip is not None:
        # The whole tensors' sums back into the step's norm vector.
        dst, src = [], []
        for bno, nan_i, _, _ in layout.extras:
            b = buckets[bno][1]
            for k, at in enumerate(nan_i):
                if at >= 0:
                    dst.append(b.clip_at + k)
                    src.append(at)
        if dst:
            idx = torch.tensor(src, device=device)
            clip.sums.index_copy_(0, torch.tensor(dst, device=clip.sums.device),
                                  vals.index_select(0, idx).to(clip.sums.device))
    if tiger:
        for bno, nan_i, sq_i, n_i in layout.extras:
            buckets[bno][1].extra = (vals, nan_i, sq_i, n_i)


