"""Host side of the Triton backend: argument checks, the cached tensor table, the launches.

Imported lazily by ``sign_kernels.triton`` (it imports triton through ``_kernels``).
"""

from __future__ import annotations

import collections
import contextlib
import operator
import os
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from . import _kernels as K

ALGO_LION, ALGO_TIGER, ALGO_SIMBA = 0, 1, 2
ALGO_SUMSQ = 3  # the norm pass (host side only: its own kernels)
_ALGO_NAME = {ALGO_LION: "lion_", ALGO_TIGER: "tiger_", ALGO_SIMBA: "simba_", ALGO_SUMSQ: "sumsq_"}
_STATE_NAME = {ALGO_LION: "exp_avgs", ALGO_TIGER: "exp_avgs", ALGO_SIMBA: "sign_counts"}

_DT_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int16: 3}
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# NOTE: [fixed configs] (no live autotuning: the kernels update their inputs in place, and an
# autotuner would run them several times on the same buffers).
# GPU: the update kernel is a pure stream (16-20 bytes per element, no reuse). 2048 elements per
# program with 8 warps gives each thread 8 elements: two 16-byte vectors per fp32 buffer (one
# per 16-bit buffer), and every specialisation compiles to <= 64 registers for sm_90 without
# spills (tests/test_triton_codegen.py), so 4 blocks (1024 threads) fit an SM, with ~100 KB of
# loads in flight per SM: far more than the ~15 KB Little's law asks of HBM3 at 3 TB/s. With 4
# warps (16 elements per thread) the same kernels took 80-123 registers. Tiger's statistics
# pass reads 16 rows x 256 columns per iteration (16 elements per thread at 8 warps): 256
# columns fit a 768-wide embedding row in three iterations without masked lanes, and
# matrices are cut into virtual rows of 256 elements so the same tile covers them.
# Interpreter (TRITON_INTERPRET=1): numpy executes every lane of a program, masked or not, so
# the cost is about programs x BLOCK; the GPU tile is kept (tests use small, odd-sized tensors,
# where a bigger BLOCK would mostly process masked lanes). Set SIGN_KERNELS_TRITON_INTERP_BLOCK
# to a larger power of two (e.g. 16384) to run big tensors faster under the interpreter.
BLOCK, NUM_WARPS = 2048, 8
STAT_ROWS, STAT_COLS, STAT_WARPS = 16, 256, 16
if K.INTERPRETED:
    BLOCK = int(os.environ.get("SIGN_KERNELS_TRITON_INTERP_BLOCK", BLOCK))
FINISH_BLOCK, FINISH_WARPS = 256, 4
# Int8 momentum (NOTE: [int8 momentum] in _kernels): QROWS blocks of 64 elements per program,
# 1024 elements, 4 per thread at 8 warps (at 8 per thread the quantization took 112-128
# registers and spilled at 80 and 96; NOTE: [triton maxnreg]);
# the blocks of a tensor are cut in runs of QROWS from its first (a multiple of QROWS * 64
# elements from element 0 where the rows are whole blocks: the tile is then contiguous and
# 16-byte aligned).
QROWS, Q8_WARPS = 16, 8
assert BLOCK & (BLOCK - 1) == 0 and FINISH_BLOCK & (FINISH_BLOCK - 1) == 0, "the sums' trees need powers of two"
LOG2_BLOCK, LOG2_FINISH = BLOCK.bit_length() - 1, FINISH_BLOCK.bit_length() - 1
_PLAN_CACHE_SIZE = 32
ROLE_EMBEDDING = 2


@dataclass
class Plan:
    """Device tables of one parameter set, built once and reused while its key is unchanged."""
    meta: torch.Tensor          # one int64 allocation holding the three tables below
    tensors: torch.Tensor       # [n, NFIELDS]: addresses, numel, seed, role, stats rows, first block
    blocks: torch.Tensor        # [n_blocks, 2]: (tensor, first element) of each program
    tasks: torch.Tensor         # [n_tasks, 2]: (tensor, first stats row), Tiger only
    n: int
    n_blocks: int
    n_tasks: int
    # Int8 momentum: [n_qtasks, 2] (tensor, first int8 block) of sign_q8_kernel, QROWS blocks each.
    qtasks: Optional[torch.Tensor] = None
    n_qtasks: int = 0
    n_qtasks_al: int = 0
    qtask_parts: tuple = ()
    # NOTE: [per-tensor alignment] the blocks (and tasks) of the tensors whose θ, g and state
    # are all 16-byte aligned come first, n_blocks_al (n_tasks_al) of them: they run in one
    # launch with the aligned-address hints, the others in a second launch without. A tensor's
    # blocks stay together (its first one at F_BLK0 of the table), and a kernel's program id is
    # its block's index in its launch's sub-table: the block partials of Tiger's sums and of
    # sumsq_ are passed from the launch's first block on, so the id indexes them too (no
    # register spent on a global index). The (sub-table, programs, aligned, first block) of
    # each non-empty launch:
    n_blocks_al: int = 0
    n_tasks_al: int = 0
    block_parts: tuple = ()
    task_parts: tuple = ()
    # Tiger: row_sumsq f64, row_nan i32, t_nan i32, t_rms f32, row_rms f32, blk f64 (2 per block:
    # NOTE: [Triton sums of squares] in _kernels), t_sumsq f64. After a call, row_sumsq and
    # t_sumsq hold the sums of squares its RMS came from (embedding rows, matrices).
    # sumsq_: (part,), f64, one partial per block (NOTE: [Triton norm sums] in _kernels).
    stats: Optional[tuple] = None
    # Built during CUDA graph capture (NOTE: [plans in CUDA graphs]): the host table the graph's
    # copy node reads at every replay (a region of a pinned staging buffer, NOTE: [pinned
    # staging]), kept alive with the plan.
    host: Optional[torch.Tensor] = None
    ident: tuple = ()           # the parameter set, whatever its grads and stream (NOTE: [pinned staging])
    device: str = ""

    @property
    def aligned(self) -> bool:
        """Whether every tensor takes the aligned launch."""
        return (self.n_blocks_al == self.n_blocks and self.n_tasks_al == self.n_tasks
                and self.n_qtasks_al == self.n_qtasks)


def _parts(table: torch.Tensor, n_al: int, total: int) -> tuple:
    return tuple(part for part in ((table[:n_al], n_al, True, 0), (table[n_al:], total - n_al, False, n_al))
                 if part[1] > 0)


_plans: "collections.OrderedDict[tuple, Plan]" = collections.OrderedDict()
# NOTE: [plans in CUDA graphs] A captured graph holds raw pointers to its plan's device tables
# and scratch buffers, so a plan built or used while a stream is capturing moves here and is
# never evicted: evicting it would free memory a replay still reads and writes. One entry per
# parameter set that was captured. A plan missing at capture (Tiger's key changes after its
# first step; a whole-network capture after zero_grad(set_to_none=True) gets new grads; the
# capture runs on its own stream, NOTE: [plans per stream]) is built there: the table goes to
# the device by a non-blocking copy from pinned memory (NOTE: [pinned staging]), which capture
# records as a copy node reading that host memory at each replay, instead of the eager path's
# blocking copy (a stream synchronisation, illegal while capturing).
_captured_plans: Dict[tuple, Plan] = {}

# NOTE: [pinned staging] While a stream captures, torch refuses any copy between CPU and CUDA
# from unpinned memory, and pinned memory cannot be allocated either. So each device has a
# staging buffer (pinned on CUDA), allocated outside capture: a plan built during capture takes
# the next free region of it for good (the graph's copy node reads that region at every
# replay; nothing else ever writes it) and keeps it alive. Outside capture, after every plan
# built and after any capture took a region, the free part is grown to hold one new table per
# parameter set in the plan cache (``Plan.ident``: the same params, states, shapes and
# options, whatever the grads' addresses and the stream), so a capture after an eager step
# with the same parameters always finds room. A capture that needs more (say, a parameter
# set never run eagerly) stops with an error that asks for that eager warm-up step.
_staging: Dict[str, list] = {}  # device -> [buffer, elements used]
_staging_taken: set = set()      # devices whose buffer a capture used since it was last grown


def clear_cache() -> None:
    """Drop the eager plans (those of captured graphs stay: NOTE: [plans in CUDA graphs])."""
    _plans.clear()


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


# NOTE: [plans per stream] A plan's device tables and scratch buffers (Tiger's statistics, the
# norm pass's partials) are written and read by the kernels of each call, and freed when the
# plan leaves the cache. Keyed by the current stream as well, a plan is only ever used on the
# stream it was allocated on: two streams never share scratch (concurrent calls with the same
# tensors would race on it), and freeing it is ordered after its last use by that stream
# (the caching allocator hands a freed block out again only to the same stream), with no
# record_stream to call per launch.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # CUDA builds of torch


def _stream_key(device: torch.device):
    if device.type != "cuda":
        return None
    if _raw_stream is not None:  # the cheap query: this runs on every call
        return _raw_stream(device.index if device.index is not None else torch.cuda.current_device())
    return torch.cuda.current_stream(device).cuda_stream


def _staging_room(device: torch.device) -> None:
    """Outside capture: grow the device's staging buffer (NOTE: [pinned staging])."""
    dev = str(device)
    need = sum({p.ident: p.meta.numel() for p in _plans.values() if p.device == dev}.values())
    st = _staging.get(dev)
    _staging_taken.discard(dev)
    if st is not None and st[0].numel() - st[1] >= need:
        return
    size = max(need + need // 2, 1024)
    # Regions that captured plans took keep the old buffer alive through their views.
    _staging[dev] = [torch.empty(size, dtype=torch.int64, pin_memory=device.type == "cuda"), 0]


def _staged(host: torch.Tensor, device: torch.device, what: str) -> torch.Tensor:
    """During capture: ``host`` copied into a region of the staging buffer, taken for good."""
    dev = str(device)
    st = _staging.get(dev)
    free = st[0].numel() - st[1] if st is not None else 0
    if free < host.numel():
        raise RuntimeError(
            f"sign_kernels {what} (triton): these tensors need a new launch table ({host.numel() * 8} bytes) "
            f"while CUDA graph capture is under way, and the pinned staging buffer of {dev} has "
            f"{free * 8} bytes free (pinned memory cannot be allocated during capture). Run one eager "
            "step with the same parameters (and optimizer options) before capturing (NOTE: [pinned staging] "
            "in sign_kernels/triton/_launch.py).")
    region = st[0][st[1]:st[1] + host.numel()]
    st[1] += host.numel()
    _staging_taken.add(dev)
    region.copy_(host)
    return region


_data_ptr = torch.Tensor.data_ptr
_shape = operator.attrgetter("shape")
_dtype = operator.attrgetter("dtype")
_device = operator.attrgetter("device")


def _stats_rows(p: torch.Tensor, role: int) -> tuple[int, int]:
    """(row length, number of rows) of Tiger's sum-of-squares pass for one tensor."""
    numel = p.numel()
    if role == ROLE_EMBEDDING:
        length = p.shape[-1] if p.dim() > 0 else 1
        return max(length, 1), (numel // length if length > 0 else 0)
    return STAT_COLS, -(-numel // STAT_COLS)


def _ranges(counts: torch.Tensor, step: int) -> torch.Tensor:
    """[sum(ceil(c / step)), 2] int64: (i, j * step) for every i and j < ceil(counts[i] / step)."""
    per = (counts + (step - 1)) // step
    idx = torch.repeat_interleave(torch.arange(counts.numel(), dtype=torch.int64), per)
    first = torch.cumsum(per, 0) - per
    j = torch.arange(idx.numel(), dtype=torch.int64) - first[idx]
    return torch.stack([idx, j * step], dim=1)


def _split_ranges(counts: torch.Tensor, step: int, aligned: torch.Tensor) -> tuple[torch.Tensor, int]:
    """_ranges of the aligned tensors, then of the others (NOTE: [per-tensor alignment]), and
    how many rows the aligned ones have."""
    zero = torch.zeros_like(counts)
    first = _ranges(torch.where(aligned, counts, zero), step)
    return torch.cat([first, _ranges(torch.where(aligned, zero, counts), step)]), first.shape[0]


def _build_plan(algo, params, grads, states, steps, roles, seeds, device, given=None, out=None,
                capturing=False, ident=(), scales=None, residuals=None) -> Plan:
    n = len(params)
    addr = torch.tensor([list(map(_data_ptr, lst)) for lst in (params, grads, states, steps)],
                        dtype=torch.int64)  # [4, n]
    numel = torch.tensor(list(map(torch.Tensor.numel, params)), dtype=torch.int64)
    table = torch.zeros((n, K.NFIELDS.value), dtype=torch.int64)
    table[:, :4] = addr.T
    table[:, K.F_NUMEL.value] = numel
    table[:, K.F_SEED.value] = torch.tensor([int(x) & 0xFFFFFFFF for x in seeds], dtype=torch.int64)
    aligned = (addr[:3] % 16 == 0).all(dim=0)  # per tensor: θ, g and state
    if residuals is not None:  # NOTE: [correction byte]: ρ is read and written with θ
        rho = torch.tensor(list(map(_data_ptr, residuals)), dtype=torch.int64)
        table[:, K.F_RESID.value] = rho
        aligned &= rho % 16 == 0
    qtasks_t, n_qtasks_al = torch.zeros((0, 2), dtype=torch.int64), 0
    if scales is not None:  # NOTE: [int8 momentum]: the blocks of each row, QROWS per program
        cols = torch.tensor([p.shape[-1] for p in params], dtype=torch.int64)
        table[:, K.F_SCALES.value] = torch.tensor(list(map(_data_ptr, scales)), dtype=torch.int64)
        table[:, K.F_QCOLS.value] = cols
        nq = torch.where(cols > 0, numel // cols.clamp(min=1) * ((cols + 63) // 64), 0)
        qtasks_t, n_qtasks_al = _split_ranges(nq, QROWS, aligned)
    # The first block of each tensor in the blocks table, aligned tensors' blocks first
    # (NOTE: [per-tensor alignment]).
    per = (numel + (BLOCK - 1)) // BLOCK
    per_al, per_un = torch.where(aligned, per, 0), torch.where(aligned, 0, per)
    table[:, K.F_BLK0.value] = torch.where(aligned, torch.cumsum(per_al, 0) - per_al,
                                           per_al.sum() + torch.cumsum(per_un, 0) - per_un)
    if algo == ALGO_TIGER:
        # Built once per parameter set (NOTE: [plan key]); per-tensor Python is fine here.
        layout = torch.tensor([_stats_rows(p, int(r)) for p, r in zip(params, roles)],
                              dtype=torch.int64).reshape(n, 2)
        nrows = layout[:, 1]
        table[:, K.F_ROLE.value] = torch.tensor([int(r) for r in roles], dtype=torch.int64)
        table[:, K.F_ROWLEN.value] = layout[:, 0]
        table[:, K.F_NROWS.value] = nrows
        table[:, K.F_SLOT.value] = torch.cumsum(nrows, 0) - nrows
        tasks_t, n_tasks_al = _split_ranges(nrows, STAT_ROWS, aligned)
        slot = int(nrows.sum())
        # NOTE: [Tiger statistics input]: indices of the given statistics, -1 when none.
        table[:, K.F_GIVEN_NAN.value] = torch.tensor(given[0], dtype=torch.int64) if given else -1
        table[:, K.F_GIVEN_SUMSQ.value] = torch.tensor(given[1], dtype=torch.int64) if given else -1
        table[:, K.F_GIVEN_N.value] = torch.tensor(given[2], dtype=torch.int64) if given else 0
        # NOTE: [Tiger sums of squares out]: index of the wanted sums, -1 when none; kept in place.
        table[:, K.F_OUT_AT.value] = torch.tensor(out[0], dtype=torch.int64) if out else -1
        table[:, K.F_OUT_KEPT.value] = torch.tensor(out[1], dtype=torch.int64) if out else 0
    else:
        tasks_t, n_tasks_al = torch.zeros((0, 2), dtype=torch.int64), 0
        slot = 0
    blocks_t, n_blocks_al = _split_ranges(numel, BLOCK, aligned)
    host = torch.cat([table.reshape(-1), blocks_t.reshape(-1), tasks_t.reshape(-1), qtasks_t.reshape(-1)])
    if capturing:  # NOTE: [plans in CUDA graphs]
        host = _staged(host, device, _ALGO_NAME[algo])
        meta = host.to(device, non_blocking=True)
    else:
        meta = host.to(device)
    a, b = table.numel(), table.numel() + blocks_t.numel()
    c = b + tasks_t.numel()
    plan = Plan(meta=meta, tensors=meta[:a], blocks=meta[a:b].view(-1, 2), tasks=meta[b:c].view(-1, 2), n=n,
                n_blocks=blocks_t.shape[0], n_tasks=tasks_t.shape[0], n_blocks_al=n_blocks_al,
                n_tasks_al=n_tasks_al, host=host if capturing else None, ident=ident, device=str(device),
                qtasks=meta[c:].view(-1, 2), n_qtasks=qtasks_t.shape[0], n_qtasks_al=n_qtasks_al)
    plan.block_parts = _parts(plan.blocks, n_blocks_al, plan.n_blocks)
    plan.task_parts = _parts(plan.tasks, n_tasks_al, plan.n_tasks)
    plan.qtask_parts = _parts(plan.qtasks, n_qtasks_al, plan.n_qtasks)
    if algo == ALGO_TIGER:
        nslots = max(slot, 1)
        plan.stats = (
            torch.empty(nslots, dtype=torch.float64, device=device),
            torch.empty(nslots, dtype=torch.int32, device=device),
            torch.empty(n, dtype=torch.int32, device=device),
            torch.empty(n, dtype=torch.float32, device=device),
            torch.empty(nslots, dtype=torch.float32, device=device),
            torch.empty(2 * max(plan.n_blocks, 1), dtype=torch.float64, device=device),
            torch.empty(n, dtype=torch.float64, device=device),
        )
    elif algo == ALGO_SUMSQ:
        plan.stats = (torch.empty(max(plan.n_blocks, 1), dtype=torch.float64, device=device),)
    return plan


def _cached(key, ident, device, build) -> Plan:
    """The plan of ``key``: a captured one, else the LRU's, else ``build(capturing)``."""
    plan = _captured_plans.get(key)
    if plan is not None:
        return plan
    if _capturing(device):  # NOTE: [plans in CUDA graphs]
        plan = _plans.pop(key, None)
        if plan is None:
            plan = build(True)
        _captured_plans[key] = plan
        return plan
    plan = _plans.get(key)
    if plan is None:
        plan = build(False)
        _plans[key] = plan
        while len(_plans) > _PLAN_CACHE_SIZE:
            _plans.popitem(last=False)
        _staging_room(device)  # NOTE: [pinned staging]
    else:
        _plans.move_to_end(key)
        if _staging_taken:
            _staging_room(device)
    return plan


def _get_plan(algo, params, grads, states, steps, roles, seeds, device, given=None, out=None, scales=None,
              residuals=None) -> Plan:
    # NOTE: [plan key] The table holds raw addresses and sizes, so any change of a data_ptr
    # (e.g. grads re-allocated after zero_grad(set_to_none=True) landing elsewhere), a shape,
    # a role or a seed gives a new key and a new table. With the caching allocator the grads
    # usually come back at the same addresses and the table is reused. The key is made with
    # `map` over C-level accessors, not a Python loop per tensor: on a GPT-2-sized list this
    # is what every step pays on the host (the CUDA backend's equivalent is C++). It also holds
    # the current stream (NOTE: [plans per stream]).
    ident = (algo, str(device), params[0].dtype, grads[0].dtype, states[0].dtype,
             tuple(map(_data_ptr, params)), tuple(map(_data_ptr, states)), tuple(map(_data_ptr, steps)),
             tuple(map(_shape, params)),
             tuple(roles) if roles is not None else None, tuple(seeds), given, out,
             tuple(map(_data_ptr, scales)) if scales is not None else None,
             tuple(map(_data_ptr, residuals)) if residuals is not None else None)
    key = (ident, tuple(map(_data_ptr, grads)), _stream_key(device))
    return _cached(key, ident, device, lambda capturing: _build_plan(
        algo, params, grads, states, steps, roles, seeds, device, given, out, capturing=capturing, ident=ident,
        scales=scales, residuals=residuals))


def _lists_ok(params, grads, states, steps, roles, pdt, gdt, sdt, device) -> bool:
    """The per-tensor rules of _check, tested with C-level `map`s (no Python loop per tensor):
    True when every tensor passes; _check then names the first one that does not."""
    shapes = list(map(_shape, params))
    return (set(map(_dtype, params)) == {pdt} and set(map(_dtype, grads)) == {gdt}
            and set(map(_dtype, states)) == {sdt} and set(map(_dtype, steps)) == {torch.int64}
            and all(set(map(_device, lst)) == {device} for lst in (params, grads, states, steps))
            and all(map(torch.Tensor.is_contiguous, params)) and all(map(torch.Tensor.is_contiguous, grads))
            and all(map(torch.Tensor.is_contiguous, states))
            and list(map(_shape, grads)) == shapes and list(map(_shape, states)) == shapes
            and set(map(torch.Tensor.dim, steps)) == {0}
            and (roles is None or set(roles) <= {0, 1, 2, 3}))


def dtype_error(algo, pdt, gdt, sdt) -> Optional[str]:
    """None when the backend runs (params, grads, state) dtypes (pdt, gdt, sdt), else the rule
    broken. The codegen test compiles every combination this accepts."""
    sname = _STATE_NAME[algo]
    if pdt not in _FLOAT_DTYPES:
        return f"params[0] has dtype {pdt}; supported: fp32, bf16, fp16"
    if gdt not in (pdt, torch.float32):
        return f"grads dtype {gdt} must be the param dtype {pdt} or fp32"
    if algo == ALGO_SIMBA:
        if sdt != torch.int16:
            return f"sign_counts must be int16, got {sdt}"
    elif sdt not in (pdt, torch.float32, torch.bfloat16):
        return f"{sname} dtype {sdt} must be the param dtype, fp32 or bf16"
    return None


def _check(algo, params, grads, states, steps, roles, seeds, q8=False) -> torch.device:
    """Refuse what the optimizer should never send, naming the tensor and the rule. q8: the
    momenta are int8 codes (their scales: _check_compressed)."""
    op = _ALGO_NAME[algo]
    sname = _STATE_NAME[algo]
    n = len(params)
    lists = {"grads": grads, sname: states, "steps": steps, "seeds": seeds}
    if roles is not None:
        lists["roles"] = roles
    for name, lst in lists.items():
        if len(lst) != n:
            raise ValueError(f"{op}: {len(lst)} {name} for {n} params")
    device = params[0].device
    if device.type != "cuda" and not (K.INTERPRETED and device.type == "cpu"):
        raise ValueError(f"{op} (triton): params must be CUDA tensors"
                         + (" (or CPU tensors under TRITON_INTERPRET=1)" if K.INTERPRETED else
                            "; CPU tensors need TRITON_INTERPRET=1 set before sign_kernels.triton is first used"))
    pdt, gdt, sdt = params[0].dtype, grads[0].dtype, states[0].dtype
    err = dtype_error(algo, pdt, gdt, pdt if q8 else sdt)
    if err is None and q8 and sdt != torch.int8:
        err = f"{sname} dtype {sdt} with exp_avg_scales: int8 momentum needs int8 codes"
    if err is not None:
        raise TypeError(f"{op} (triton): {err}")
    if _lists_ok(params, grads, states, steps, roles, pdt, gdt, sdt, device):
        return device
    for i in range(n):
        p, g, m, s = params[i], grads[i], states[i], steps[i]
        for name, t, dt in (("params", p, pdt), ("grads", g, gdt), (sname, m, sdt)):
            if t.dtype != dt:
                raise TypeError(f"{op}: {name}[{i}] has dtype {t.dtype}, {name}[0] has {dt} "
                                "(one call takes one dtype per list)")
            if t.device != device:
                raise ValueError(f"{op}: {name}[{i}] is on {t.device}, params[0] on {device}")
            if not t.is_contiguous():
                raise ValueError(f"{op}: {name}[{i}] is not contiguous")
        if g.shape != p.shape or m.shape != p.shape:
            raise ValueError(f"{op}: params[{i}] has shape {tuple(p.shape)}, grads {tuple(g.shape)}, "
                             f"{sname} {tuple(m.shape)}")
        if s.dim() != 0 or s.dtype != torch.int64 or s.device != device:
            raise ValueError(f"{op}: steps[{i}] must be a 0-dim int64 tensor on {device}, got "
                             f"{s.dtype} shape {tuple(s.shape)} on {s.device}")
        if roles is not None and int(roles[i]) not in (0, 1, 2, 3):
            raise ValueError(f"{op}: roles[{i}] = {roles[i]} is not a Tiger role (0..3)")
    return device


def _check_compressed(algo, params, states, scales, residuals, sr, device) -> tuple[bool, bool]:
    """8-bit momentum and the correction byte (NOTE: [8-bit momentum and the correction byte] in
    sign_kernels/_ops.py): (int8 momentum, correction byte), after refusing what does not fit."""
    op = _ALGO_NAME[algo]
    n = len(params)
    q8 = scales is not None
    if q8 != (torch.int8 in set(map(_dtype, states))):
        raise ValueError(f"{op}: int8 momentum and exp_avg_scales are given together or not at all")
    if q8:
        if len(scales) != n:
            raise ValueError(f"{op}: exp_avg_scales needs one bf16 scale tensor per int8 momentum ({n}), "
                             f"got {len(scales)}")
        for i, (m, sc) in enumerate(zip(states, scales)):
            want = tuple(m.shape[:-1]) + (-(-m.shape[-1] // 64),) if m.dim() >= 2 else None
            if m.dtype != torch.int8 or want is None or sc.dtype != torch.bfloat16 or tuple(sc.shape) != want:
                raise ValueError(f"{op}: tensor {i}: int8 momentum needs >= 2 dims and bf16 scales of shape "
                                 f"{want if want is not None else '?'}, got {m.dtype} with {m.dim()} dims and "
                                 f"{sc.dtype} {tuple(sc.shape)}")
            if sc.device != device or not sc.is_contiguous():
                raise ValueError(f"{op}: exp_avg_scales[{i}] must be contiguous and on {device}")
    if residuals is not None:
        if sr:
            raise ValueError(f"{op}: residuals (the correction byte) and stochastic_rounding are exclusive")
        if len(residuals) != n:
            raise ValueError(f"{op}: residuals needs one int8 tensor per param ({n}), got {len(residuals)}")
        for i, (p, r) in enumerate(zip(params, residuals)):
            if p.dtype not in (torch.bfloat16, torch.float16) or r.dtype != torch.int8 or r.shape != p.shape:
                raise ValueError(f"{op}: tensor {i}: the correction byte needs bf16/fp16 params and an int8 "
                                 f"residual of their shape, got {p.dtype} and {r.dtype} {tuple(r.shape)}")
            if r.device != device or not r.is_contiguous():
                raise ValueError(f"{op}: residuals[{i}] must be contiguous and on {device}")
    return q8, residuals is not None


def _scalar_tensor(t: Optional[torch.Tensor], device, name: str, op: str):
    if t is None:
        return None
    if t.numel() != 1:
        raise ValueError(f"{op}: {name} must hold one value, got shape {tuple(t.shape)}")
    return t.detach().reshape(()).to(device)


def _check_given(params, roles, device, stats, stats_nan, stats_sumsq, stats_n):
    """Tiger's given statistics (NOTE: [Tiger statistics input]) as a hashable triple, or None."""
    parts = (stats, stats_nan, stats_sumsq, stats_n)
    if all(x is None for x in parts):
        return None
    if any(x is None for x in parts):
        raise ValueError("tiger_: stats, stats_nan, stats_sumsq and stats_n are given together or not at all")
    if stats.dtype != torch.float64 or stats.dim() != 1 or stats.device != device:
        raise ValueError(f"tiger_: stats must be a 1-D float64 tensor on {device}, got {stats.dtype} of shape "
                         f"{tuple(stats.shape)} on {stats.device}")
    n, length = len(params), stats.numel()
    given = (tuple(int(x) for x in stats_nan), tuple(int(x) for x in stats_sumsq), tuple(int(x) for x in stats_n))
    if any(len(lst) != n for lst in given):
        raise ValueError(f"tiger_: stats_nan, stats_sumsq and stats_n must have one entry per param ({n})")
    for i, p in enumerate(params):
        at_nan, at_sq, sn = given[0][i], given[1][i], given[2][i]
        rows = p.numel() // p.shape[-1] if int(roles[i]) == ROLE_EMBEDDING and p.dim() and p.shape[-1] else 1
        if not -1 <= at_nan < length:
            raise ValueError(f"tiger_: stats_nan[{i}] = {at_nan} is neither -1 nor an index of stats (numel {length})")
        if at_sq < -1 or (at_sq >= 0 and at_sq + rows > length):
            raise ValueError(f"tiger_: stats_sumsq[{i}] = {at_sq} is neither -1 nor the start of {rows} entries "
                             f"of stats (numel {length})")
        if at_sq >= 0 and sn < 1:
            raise ValueError(f"tiger_: stats_n[{i}] must be >= 1 where stats_sumsq[{i}] is given, got {sn}")
    return given


def _check_sumsq_out(params, roles, device, stats, given, sumsq_out, sumsq_out_at):
    """Tiger's sums of squares out (NOTE: [Tiger sums of squares out]) as a hashable pair
    (index per tensor or -1, kept in place per tensor), or None when not wanted."""
    if sumsq_out is None and sumsq_out_at is None:
        return None
    if sumsq_out is None or sumsq_out_at is None:
        raise ValueError("tiger_: sumsq_out and sumsq_out_at are given together or not at all")
    if sumsq_out.dtype != torch.float64 or sumsq_out.dim() != 1 or not sumsq_out.is_contiguous():
        raise ValueError(f"tiger_: sumsq_out must be a contiguous 1-D float64 tensor, got {sumsq_out.dtype} of shape "
                         f"{tuple(sumsq_out.shape)}")
    if sumsq_out.device != device:
        raise ValueError(f"tiger_: sumsq_out is on {sumsq_out.device}, the params on {device}")
    n, length = len(params), sumsq_out.numel()
    if len(sumsq_out_at) != n:
        raise ValueError(f"tiger_: sumsq_out_at must have one entry per param ({n}), got {len(sumsq_out_at)}")
    at, kept = [], []
    same = stats is not None and stats.data_ptr() == sumsq_out.data_ptr()
    for i, p in enumerate(params):
        a, role = int(sumsq_out_at[i]), int(roles[i])
        rows = p.numel() // p.shape[-1] if role == ROLE_EMBEDDING and p.dim() and p.shape[-1] else 1
        if a < -1 or (a >= 0 and a + rows > length):
            raise ValueError(f"tiger_: sumsq_out_at[{i}] = {a} is neither -1 nor the start of {rows} entries of "
                             f"sumsq_out (numel {length})")
        # Element-wise roles have no sums; an empty tensor none to write.
        a = a if role >= ROLE_EMBEDDING and p.numel() > 0 else -1
        at.append(a)
        kept.append(int(a >= 0 and same and given is not None and given[1][i] == a))
    return tuple(at), tuple(kept)


def step_config(algo, pdt, gdt, sdt, *, has_lr_t, has_scale, has_found, sr, aligned, sumsq=False,
                has_clip=False, ec=False) -> dict:
    """Constexpr arguments and launch options of ``sign_step_kernel`` for one call: what
    ``run`` launches and what ``tests/test_triton_codegen.py`` compiles for sm_90. ec: the
    correction byte (never with SR)."""
    return dict(ALGO=algo, P_DT=_DT_CODE[pdt], G_DT=_DT_CODE[gdt], M_DT=_DT_CODE[sdt],
                HAS_LR_T=bool(has_lr_t), HAS_SCALE=bool(has_scale), HAS_FOUND=bool(has_found),
                HAS_CLIP=bool(has_clip), EC=bool(ec) and algo != ALGO_SIMBA,
                # SR changes only bf16 stores: one specialisation fewer where none exists.
                SR=bool(sr) and torch.bfloat16 in (pdt, sdt), ALIGNED=bool(aligned),
                # The correction byte's encoding (RNE, the unit, rint) at 8 elements per thread took
                # 69-77 registers for Lion and spilled in Tiger's unaligned sums out: 16 warps, 4 per
                # thread (the sums' order depends on BLOCK only, NOTE: [Triton sums of squares]).
                BLOCK=BLOCK, num_warps=2 * NUM_WARPS if ec and algo != ALGO_SIMBA else NUM_WARPS,
                enable_fp_fusion=False,
                # Tiger's sums out (NOTE: [Triton sums of squares]): its own specialisations.
                SUMSQ=bool(sumsq) and algo == ALGO_TIGER, LOG2_BLOCK=LOG2_BLOCK,
                # NOTE: [triton maxnreg] below.
                **_maxnreg(algo, bool(sr) and torch.bfloat16 in (pdt, sdt), aligned, sumsq))


# NOTE: [triton maxnreg] Register bounds (launch option ``maxnreg``) where ptxas needs one to
# neither spill nor take more than its budget (tests/test_triton_codegen.py), chosen from every
# specialisation compiled for sm_90 by both ptxas versions Triton ships: 12.8 (triton 3.6, the
# GPU machine's) and 13.4 (triton 3.9; ``ptxas-blackwell``, used for sm_90 too). Their allocations
# differ: unbounded, Tiger's aligned update takes 78-93 registers under 12.8 and 62-85 under
# 13.4, with its sums out 96-115 and 80-99; and "unbounded" is not free of spills (12.8 gives
# Simba bf16 with SR 40 registers and an 8-byte stack, Tiger's unaligned SR update 80 and 8).
# One rule for both (columns of the sweep: bounds none/64/72/80/96/112):
# * Tiger's update, aligned: 80, no spill under either (at 64 and 72 both spill somewhere);
#   with its sums out (NOTE: [Triton sums of squares]): 112 (12.8 spills at 80 and at 96 with
#   SR; 13.4 takes 77-95 there);
# * Tiger's update, unaligned: 112 (both spill at 80 with the sums out);
# * Simba with SR, aligned: 64 (12.8's stack frame above, gone at 64; 13.4: 52-55 either way);
# * everything else unbounded: Lion, Simba without SR, the statistics kernels (sumsq_config
#   bounds the aligned pre-pass over 16-bit θ: 12.8 takes 74 unbounded, 62 at 64).
# * the correction byte (EC): the same bounds, at 16 warps (step_config); int8 momentum:
#   _maxnreg_q8 (88). Measured with 13.4 only (triton 3.9 here): recheck with 12.8.
def _maxnreg_q8(algo, pdt, ec, aligned) -> dict:
    """NOTE: [triton maxnreg], int8 momentum (sign_q8_kernel, 4 elements per thread): unbounded,
    ptxas 13.4 takes 64-91 registers; at 80 two specialisations spill 8 bytes (Lion's aligned bf16
    update with the correction byte, Tiger's unaligned bf16 SR update), at 88 none does (of 66)."""
    return {"maxnreg": 88}


def _maxnreg(algo, sr, aligned, sumsq) -> dict:
    """``sr``: stochastic rounding in effect (a bf16 param or state)."""
    if algo == ALGO_TIGER:
        return {"maxnreg": 80 if aligned and not sumsq else 112}
    if algo == ALGO_SIMBA and aligned and sr:
        return {"maxnreg": 64}
    return {}


def q8_config(algo, pdt, gdt, *, has_lr_t, has_scale, has_found, sr, ec, aligned, has_clip=False) -> dict:
    """Constexpr arguments and launch options of ``sign_q8_kernel`` (int8 momentum)."""
    sr = bool(sr) and pdt == torch.bfloat16 and not ec  # the codes always round stochastically
    return dict(ALGO=algo, P_DT=_DT_CODE[pdt], G_DT=_DT_CODE[gdt], HAS_LR_T=bool(has_lr_t),
                HAS_SCALE=bool(has_scale), HAS_FOUND=bool(has_found), HAS_CLIP=bool(has_clip), SR=sr,
                EC=bool(ec), ALIGNED=bool(aligned), QROWS=QROWS, num_warps=Q8_WARPS, enable_fp_fusion=False,
                **_maxnreg_q8(algo, pdt, ec, aligned))


def sums_after_config(pdt, *, has_found, aligned) -> dict:
    """Constexpr arguments and launch options of ``tiger_sums_after_kernel``."""
    cfg = sumsq_config(pdt, aligned=aligned)
    cfg["HAS_FOUND"] = bool(has_found)
    return cfg


def rows_config(gdt, *, has_scale, aligned, has_clip=False) -> dict:
    """Constexpr arguments and launch options of ``tiger_rows_kernel``."""
    return dict(G_DT=_DT_CODE[gdt], HAS_SCALE=bool(has_scale), HAS_CLIP=bool(has_clip),
                ALIGNED=bool(aligned), ROWS=STAT_ROWS, COLS=STAT_COLS, num_warps=STAT_WARPS,
                enable_fp_fusion=False)


def sumsq_config(pdt, *, aligned) -> dict:
    """Constexpr arguments and launch options of ``tiger_sumsq_kernel`` (the update's blocks)."""
    # 16 bytes of θ per thread: 8 warps for 16-bit θ, 16 for fp32 (4 elements per thread, so the
    # squares in fp64 stay within 64 registers: 78 at 8 warps). The sums' order does not depend
    # on it (NOTE: [Triton sums of squares]).
    return dict(P_DT=_DT_CODE[pdt], ALIGNED=bool(aligned), BLOCK=BLOCK, LOG2_BLOCK=LOG2_BLOCK,
                num_warps=NUM_WARPS if pdt.itemsize == 2 else STAT_WARPS, enable_fp_fusion=False,
                **({"maxnreg": 64} if aligned else {}))  # NOTE: [triton maxnreg]


def finish_config() -> dict:
    """Constexpr arguments and launch options of ``tiger_finish_kernel``."""
    return dict(BLOCK=FINISH_BLOCK, LOG2=LOG2_FINISH, UBLOCK=BLOCK, num_warps=FINISH_WARPS,
                enable_fp_fusion=False)


def sumsq_out_config(*, has_found) -> dict:
    """Constexpr arguments and launch options of ``tiger_sumsq_out_kernel``."""
    return dict(HAS_FOUND=bool(has_found), **finish_config())


def norm_config(dt, *, has_scale, aligned) -> dict:
    """Constexpr arguments and launch options of ``sumsq_blocks_kernel`` (the norm pass)."""
    # As sumsq_config: 16 bytes of x per thread (NOTE: [Triton norm sums]: the order of the
    # sums depends on BLOCK only).
    return dict(DT=_DT_CODE[dt], HAS_SCALE=bool(has_scale), ALIGNED=bool(aligned), BLOCK=BLOCK,
                LOG2_BLOCK=LOG2_BLOCK, num_warps=NUM_WARPS if dt.itemsize == 2 else STAT_WARPS,
                enable_fp_fusion=False, **({"maxnreg": 64} if aligned else {}))  # NOTE: [triton maxnreg]


def norm_total_config() -> dict:
    """Constexpr arguments and launch options of ``sumsq_total_kernel``."""
    return dict(BLOCK=FINISH_BLOCK, LOG2=LOG2_FINISH, UBLOCK=BLOCK, num_warps=FINISH_WARPS,
                enable_fp_fusion=False)


def _device_guard(device: torch.device):
    # Triton launches on the current CUDA device's stream: make it the params' device.
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def run(algo: int, params, grads, states, steps, roles, seeds, *, lr, lr_t, weight_decay=0.0,
        beta1=0.0, beta2=0.0, shrink=1.0, k=1, window=0, threshold=0, grad_scale=None,
        found_inf=None, stochastic_rounding=False, stats=None, stats_nan=None, stats_sumsq=None,
        stats_n=None, sumsq_out=None, sumsq_out_at=None, clip=None, exp_avg_scales=None,
        residuals=None) -> None:
    if len(params) == 0:
        return
    op = _ALGO_NAME[algo]
    q8 = exp_avg_scales is not None or (len(states) > 0 and states[0].dtype == torch.int8)
    device = _check(algo, params, grads, states, steps, roles, seeds, q8=q8)
    q8, ec = _check_compressed(algo, params, states, exp_avg_scales, residuals, stochastic_rounding, device)
    given = _check_given(params, roles, device, stats, stats_nan, stats_sumsq, stats_n)
    out = _check_sumsq_out(params, roles, device, stats, given, sumsq_out, sumsq_out_at)
    if out is not None and all(a < 0 for a in out[0]):
        out = None  # nothing wanted: the plain kernels
    if algo == ALGO_TIGER and int(k) < 1:
        raise ValueError(f"{op}: grad_accum_steps must be >= 1, got {k}")
    lr_t = _scalar_tensor(lr_t, device, "lr_t", op)
    grad_scale = _scalar_tensor(grad_scale, device, "grad_scale", op)
    found_inf = _scalar_tensor(found_inf, device, "found_inf", op)
    clip = _scalar_tensor(clip, device, "clip", op)  # NOTE: [clipping inside the step]
    plan = _get_plan(algo, params, grads, states, steps, roles, seeds, device, given, out,
                     exp_avg_scales if q8 else None, residuals if ec else None)
    if plan.n_blocks == 0:
        return
    dummy = plan.meta
    scale_ptr = grad_scale if grad_scale is not None else dummy
    found_ptr = found_inf if found_inf is not None else dummy
    has_scale = grad_scale is not None
    has_clip = clip is not None
    clip_ptr = clip if has_clip else dummy
    pdt, gdt, sdt = params[0].dtype, grads[0].dtype, states[0].dtype
    sumsq = out is not None
    with _device_guard(device):
        if algo == ALGO_TIGER:
            row_sumsq, row_nan, t_nan, t_rms, row_rms, blk, t_sumsq = plan.stats
            # NOTE: [per-tensor alignment]: one launch per non-empty part.
            for tasks, count, aligned, _ in plan.task_parts:
                K.tiger_rows_kernel[(count,)](
                    plan.tensors, tasks, scale_ptr, clip_ptr, row_nan,
                    **rows_config(gdt, has_scale=has_scale, aligned=aligned, has_clip=has_clip))
            for blocks, count, aligned, first in plan.block_parts:
                K.tiger_sumsq_kernel[(count,)](
                    plan.tensors, blocks, int(k), row_sumsq, blk[2 * first:] if first else blk,
                    **sumsq_config(pdt, aligned=aligned))
            stats_ptr = stats if given is not None and stats.numel() > 0 else row_sumsq  # unread when unused
            K.tiger_finish_kernel[(plan.n,)](
                plan.tensors, row_nan, row_sumsq, blk, int(k), t_nan, t_rms, row_rms, t_sumsq, stats_ptr,
                **finish_config())
        else:
            t_nan = t_rms = row_rms = blk = dummy
        out_ptr = sumsq_out if sumsq and sumsq_out.numel() > 0 else dummy  # unread when unused
        if q8:
            # NOTE: [int8 momentum]: the int8 blocks' update, then (Tiger) the sums out read back
            # from θ over the update's blocks.
            for qtasks, count, aligned, _ in plan.qtask_parts:
                K.sign_q8_kernel[(count,)](
                    plan.tensors, qtasks,
                    float(lr), lr_t if lr_t is not None else dummy, scale_ptr, found_ptr, clip_ptr,
                    float(weight_decay), float(beta1), float(beta2), float(shrink), int(k),
                    t_nan, t_rms, row_rms,
                    **q8_config(algo, pdt, gdt, has_lr_t=lr_t is not None, has_scale=has_scale,
                                has_found=found_inf is not None, sr=stochastic_rounding, ec=ec,
                                aligned=aligned, has_clip=has_clip))
            if sumsq:
                for blocks, count, aligned, first in plan.block_parts:
                    K.tiger_sums_after_kernel[(count,)](
                        plan.tensors, blocks, t_nan, found_ptr, int(k), blk[2 * first:] if first else blk, out_ptr,
                        **sums_after_config(pdt, has_found=found_inf is not None, aligned=aligned))
                K.tiger_sumsq_out_kernel[(plan.n,)](
                    plan.tensors, blk, t_nan, found_ptr, int(k), out_ptr,
                    **sumsq_out_config(has_found=found_inf is not None))
            return
        for blocks, count, aligned, first in plan.block_parts:
            K.sign_step_kernel[(count,)](
                plan.tensors, blocks,
                float(lr), lr_t if lr_t is not None else dummy, scale_ptr, found_ptr, clip_ptr,
                float(weight_decay), float(beta1), float(beta2), float(shrink),
                int(k), int(window), int(threshold),
                t_nan, t_rms, row_rms, blk[2 * first:] if first and sumsq else blk, out_ptr,
                **step_config(algo, pdt, gdt, sdt, has_lr_t=lr_t is not None, has_scale=has_scale,
                              has_found=found_inf is not None, sr=stochastic_rounding,
                              aligned=aligned, sumsq=sumsq, has_clip=has_clip, ec=ec))
        if sumsq:
            K.tiger_sumsq_out_kernel[(plan.n,)](
                plan.tensors, blk, t_nan, found_ptr, int(k), out_ptr,
                **sumsq_out_config(has_found=found_inf is not None))


# ------------------------------------------------------------------ the op signatures
def lion_(params, grads, exp_avgs, steps, lr, lr_t, beta1, beta2, weight_decay,
          grad_scale, found_inf, seeds, stochastic_rounding, clip=None, exp_avg_scales=None,
          residuals=None) -> None:
    run(ALGO_LION, params, grads, exp_avgs, steps, None, seeds, lr=lr, lr_t=lr_t,
        weight_decay=weight_decay, beta1=beta1, beta2=beta2, grad_scale=grad_scale,
        found_inf=found_inf, stochastic_rounding=stochastic_rounding, clip=clip,
        exp_avg_scales=exp_avg_scales, residuals=residuals)


def tiger_(params, grads, exp_avgs, steps, roles, lr, lr_t, beta, weight_decay, grad_accum_steps,
           shrink_ratio, grad_scale, found_inf, seeds, stochastic_rounding, stats=None, stats_nan=None,
           stats_sumsq=None, stats_n=None, sumsq_out=None, sumsq_out_at=None, clip=None,
           exp_avg_scales=None, residuals=None) -> None:
    run(ALGO_TIGER, params, grads, exp_avgs, steps, roles, seeds, lr=lr, lr_t=lr_t,
        weight_decay=weight_decay, beta1=beta, shrink=shrink_ratio, k=grad_accum_steps,
        grad_scale=grad_scale, found_inf=found_inf, stochastic_rounding=stochastic_rounding,
        stats=stats, stats_nan=stats_nan, stats_sumsq=stats_sumsq, stats_n=stats_n,
        sumsq_out=sumsq_out, sumsq_out_at=sumsq_out_at, clip=clip,
        exp_avg_scales=exp_avg_scales, residuals=residuals)


def simba_(params, grads, sign_counts, steps, lr, lr_t, window_size, threshold_count, weight_decay,
           grad_scale, found_inf, seeds, stochastic_rounding, clip=None) -> None:
    run(ALGO_SIMBA, params, grads, sign_counts, steps, None, seeds, lr=lr, lr_t=lr_t,
        weight_decay=weight_decay, window=window_size, threshold=threshold_count,
        grad_scale=grad_scale, found_inf=found_inf, stochastic_rounding=stochastic_rounding, clip=clip)


def sumsq_(tensors, scale, out) -> None:
    """out[i] = sum of (fp32(tensors[i]) / scale)**2 in fp64 (NOTE: [clipping inside the step]
    in sign_kernels/_ops.py; the order: NOTE: [Triton norm sums] in _kernels)."""
    n = len(tensors)
    device = _check_norm(tensors, out)
    if n == 0:
        return
    scale = _scalar_tensor(scale, device, "scale", "sumsq_")
    dt = tensors[0].dtype
    # NOTE: [plan key]: only the addresses and shapes of the tensors (and the stream).
    ident = (ALGO_SUMSQ, str(device), dt, tuple(map(_shape, tensors)))
    key = (ident, tuple(map(_data_ptr, tensors)), _stream_key(device))
    plan = _cached(key, ident, device, lambda capturing: _build_plan(
        ALGO_SUMSQ, tensors, tensors, tensors, tensors, None, (0,) * n, device, capturing=capturing,
        ident=ident))
    (part,) = plan.stats
    with _device_guard(device):
        for blocks, count, aligned, first in plan.block_parts:
            K.sumsq_blocks_kernel[(count,)](
                plan.tensors, blocks, scale if scale is not None else plan.meta, part[first:] if first else part,
                **norm_config(dt, has_scale=scale is not None, aligned=aligned))
        K.sumsq_total_kernel[(n,)](plan.tensors, part, out, **norm_total_config())


def _check_norm(tensors, out) -> torch.device:
    """sumsq_'s arguments (NOTE: [clipping inside the step]): the device of ``out``."""
    n = len(tensors)
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float64 or out.dim() != 1 \
            or not out.is_contiguous() or out.numel() != n:
        raise ValueError(f"sumsq_: out must be a contiguous 1-D float64 tensor of {n} elements (one per tensor), "
                         f"got {getattr(out, 'dtype', type(out))} of shape {tuple(getattr(out, 'shape', ()))}")
    device = out.device
    if device.type != "cuda" and not (K.INTERPRETED and device.type == "cpu"):
        raise ValueError("sumsq_ (triton): tensors must be CUDA tensors"
                         + (" (or CPU tensors under TRITON_INTERPRET=1)" if K.INTERPRETED else
                            "; CPU tensors need TRITON_INTERPRET=1 set before sign_kernels.triton is first used"))
    if n == 0:
        return device
    dt = tensors[0].dtype
    if dt not in _FLOAT_DTYPES:
        raise TypeError(f"sumsq_ (triton): tensors[0] has dtype {dt}; supported: fp32, bf16, fp16")
    if set(map(_dtype, tensors)) == {dt} and set(map(_device, tensors)) == {device} \
            and all(map(torch.Tensor.is_contiguous, tensors)):
        return device
    for i, t in enumerate(tensors):
        if t.dtype != dt:
            raise TypeError(f"sumsq_: tensors[{i}] has dtype {t.dtype}, tensors[0] has {dt} "
                            "(one call takes one dtype)")
        if t.device != device:
            raise ValueError(f"sumsq_: tensors[{i}] is on {t.device}, out on {device}")
        if not t.is_contiguous():
            raise ValueError(f"sumsq_: tensors[{i}] is not contiguous")
    return device
