"""Host side of the Triton backend: argument checks, the cached tensor table, the launches.

Imported lazily by ``sign_kernels.triton`` (it imports triton through ``_kernels``).
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass
from typing import Optional

import torch

from . import _kernels as K

ALGO_LION, ALGO_TIGER, ALGO_SIMBA = 0, 1, 2
_ALGO_NAME = {ALGO_LION: "lion_", ALGO_TIGER: "tiger_", ALGO_SIMBA: "simba_"}
_STATE_NAME = {ALGO_LION: "exp_avgs", ALGO_TIGER: "exp_avgs", ALGO_SIMBA: "sign_counts"}

_DT_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int16: 3}
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# NOTE: [fixed configs] (no live autotuning: the kernels update their inputs in place, and an
# autotuner would run them several times on the same buffers).
# GPU: the update kernel is a pure stream (16-20 bytes per element, no reuse). 2048 elements per
# program with 4 warps gives each thread 16 elements: four 16-byte vectors per fp32 buffer
# (two per 16-bit buffer) in flight, enough memory-level parallelism to saturate HBM on
# A100/H100 without spilling; the tail waste of a 2048 block on small tensors (biases, norm
# gains) is negligible next to the big matrices. Tiger's statistics pass reads 16 rows x 256
# columns per iteration (4096 elements, 32 per thread): 256 columns fit a 768-wide embedding
# row in three iterations without masked lanes, and matrices are cut into virtual rows of 256
# elements so the same tile covers them.
# Interpreter (TRITON_INTERPRET=1): numpy executes every lane of a program, masked or not, so
# the cost is about programs x BLOCK; the GPU tile is kept (tests use small, odd-sized tensors,
# where a bigger BLOCK would mostly process masked lanes). Set SIGN_KERNELS_TRITON_INTERP_BLOCK
# to a larger power of two (e.g. 16384) to run big tensors faster under the interpreter.
BLOCK, NUM_WARPS = 2048, 4
STAT_ROWS, STAT_COLS, STAT_WARPS = 16, 256, 4
if K.INTERPRETED:
    BLOCK = int(os.environ.get("SIGN_KERNELS_TRITON_INTERP_BLOCK", BLOCK))
FINISH_BLOCK, FINISH_WARPS = 1024, 4
_PLAN_CACHE_SIZE = 32
ROLE_EMBEDDING = 2


@dataclass
class Plan:
    """Device tables of one parameter set, built once and reused while its key is unchanged."""
    meta: torch.Tensor          # one int64 allocation holding the three tables below
    tensors: torch.Tensor       # [n, NFIELDS]: addresses, numel, seed, role, stats rows
    blocks: torch.Tensor        # [n_blocks, 2]: (tensor, first element) of each program
    tasks: torch.Tensor         # [n_tasks, 2]: (tensor, first stats row), Tiger only
    n: int
    n_blocks: int
    n_tasks: int
    aligned: bool
    stats: Optional[tuple] = None   # Tiger: row_sumsq f64, row_nan i32, t_nan i32, t_rms f32, row_rms f32


_plans: "collections.OrderedDict[tuple, Plan]" = collections.OrderedDict()


def clear_cache() -> None:
    _plans.clear()


def _stats_rows(p: torch.Tensor, role: int) -> tuple[int, int]:
    """(row length, number of rows) of Tiger's sum-of-squares pass for one tensor."""
    numel = p.numel()
    if role == ROLE_EMBEDDING:
        length = p.shape[-1] if p.dim() > 0 else 1
        return max(length, 1), (numel // length if length > 0 else 0)
    return STAT_COLS, -(-numel // STAT_COLS)


def _build_plan(algo, params, grads, states, steps, roles, seeds, device, given=None) -> Plan:
    n = len(params)
    table = torch.zeros((n, K.NFIELDS.value), dtype=torch.int64)
    blocks, tasks = [], []
    slot = 0
    aligned = True
    for i, (p, g, m, s) in enumerate(zip(params, grads, states, steps)):
        numel = p.numel()
        role = int(roles[i]) if roles is not None else 0
        row_len, nrows = _stats_rows(p, role) if algo == ALGO_TIGER else (0, 0)
        # NOTE: [Tiger statistics input]: indices of the given statistics, -1 when none.
        at_nan, at_sq, stat_n = (given[0][i], given[1][i], given[2][i]) if given is not None else (-1, -1, 0)
        table[i] = torch.tensor([p.data_ptr(), g.data_ptr(), m.data_ptr(), s.data_ptr(), numel,
                                 int(seeds[i]) & 0xFFFFFFFF, role, row_len, nrows, slot,
                                 at_nan, at_sq, stat_n])
        aligned = aligned and all(t.data_ptr() % 16 == 0 for t in (p, g, m))
        if numel:
            starts = torch.arange(0, numel, BLOCK, dtype=torch.int64)
            blocks.append(torch.stack([torch.full_like(starts, i), starts], dim=1))
        if nrows:
            r0 = torch.arange(0, nrows, STAT_ROWS, dtype=torch.int64)
            tasks.append(torch.stack([torch.full_like(r0, i), r0], dim=1))
        slot += nrows
    empty = torch.zeros((0, 2), dtype=torch.int64)
    blocks_t = torch.cat(blocks) if blocks else empty
    tasks_t = torch.cat(tasks) if tasks else empty
    meta = torch.cat([table.reshape(-1), blocks_t.reshape(-1), tasks_t.reshape(-1)]).to(device)
    a, b = table.numel(), table.numel() + blocks_t.numel()
    plan = Plan(meta=meta, tensors=meta[:a], blocks=meta[a:b], tasks=meta[b:], n=n,
                n_blocks=blocks_t.shape[0], n_tasks=tasks_t.shape[0], aligned=aligned)
    if algo == ALGO_TIGER:
        nslots = max(slot, 1)
        plan.stats = (
            torch.empty(nslots, dtype=torch.float64, device=device),
            torch.empty(nslots, dtype=torch.int32, device=device),
            torch.empty(n, dtype=torch.int32, device=device),
            torch.empty(n, dtype=torch.float32, device=device),
            torch.empty(nslots, dtype=torch.float32, device=device),
        )
    return plan


def _get_plan(algo, params, grads, states, steps, roles, seeds, device, given=None) -> Plan:
    # NOTE: [plan key] The table holds raw addresses and sizes, so any change of a data_ptr
    # (e.g. grads re-allocated after zero_grad(set_to_none=True) landing elsewhere), a shape,
    # a role or a seed gives a new key and a new table. With the caching allocator the grads
    # usually come back at the same addresses and the table is reused.
    key = (algo, str(device), params[0].dtype, grads[0].dtype, states[0].dtype,
           tuple((p.data_ptr(), g.data_ptr(), m.data_ptr(), s.data_ptr(), tuple(p.shape))
                 for p, g, m, s in zip(params, grads, states, steps)),
           tuple(int(r) for r in roles) if roles is not None else None,
           tuple(int(x) & 0xFFFFFFFF for x in seeds),
           given)
    plan = _plans.get(key)
    if plan is None:
        plan = _build_plan(algo, params, grads, states, steps, roles, seeds, device, given)
        _plans[key] = plan
        while len(_plans) > _PLAN_CACHE_SIZE:
            _plans.popitem(last=False)
    else:
        _plans.move_to_end(key)
    return plan


def _check(algo, params, grads, states, steps, roles, seeds) -> torch.device:
    """Refuse what the optimizer should never send, naming the tensor and the rule."""
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
    if pdt not in _FLOAT_DTYPES:
        raise TypeError(f"{op} (triton): params[0] has dtype {pdt}; supported: fp32, bf16, fp16")
    if gdt not in (pdt, torch.float32):
        raise TypeError(f"{op} (triton): grads dtype {gdt} must be the param dtype {pdt} or fp32")
    if algo == ALGO_SIMBA:
        if sdt != torch.int16:
            raise TypeError(f"{op} (triton): sign_counts must be int16, got {sdt}")
    elif sdt not in (pdt, torch.float32, torch.bfloat16):
        raise TypeError(f"{op} (triton): {sname} dtype {sdt} must be the param dtype, fp32 or bf16")
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


def run(algo: int, params, grads, states, steps, roles, seeds, *, lr, lr_t, weight_decay=0.0,
        beta1=0.0, beta2=0.0, shrink=1.0, k=1, window=0, threshold=0, grad_scale=None,
        found_inf=None, stochastic_rounding=False, stats=None, stats_nan=None, stats_sumsq=None,
        stats_n=None) -> None:
    if len(params) == 0:
        return
    op = _ALGO_NAME[algo]
    device = _check(algo, params, grads, states, steps, roles, seeds)
    given = _check_given(params, roles, device, stats, stats_nan, stats_sumsq, stats_n)
    if algo == ALGO_TIGER and int(k) < 1:
        raise ValueError(f"{op}: grad_accum_steps must be >= 1, got {k}")
    lr_t = _scalar_tensor(lr_t, device, "lr_t", op)
    grad_scale = _scalar_tensor(grad_scale, device, "grad_scale", op)
    found_inf = _scalar_tensor(found_inf, device, "found_inf", op)
    plan = _get_plan(algo, params, grads, states, steps, roles, seeds, device, given)
    if plan.n_blocks == 0:
        return
    dummy = plan.meta
    scale_ptr = grad_scale if grad_scale is not None else dummy
    found_ptr = found_inf if found_inf is not None else dummy
    has_scale = grad_scale is not None
    if algo == ALGO_TIGER:
        row_sumsq, row_nan, t_nan, t_rms, row_rms = plan.stats
        if plan.n_tasks:
            K.tiger_rows_kernel[(plan.n_tasks,)](
                plan.tensors, plan.tasks, scale_ptr, found_ptr, int(k), row_sumsq, row_nan,
                G_DT=_DT_CODE[grads[0].dtype], P_DT=_DT_CODE[params[0].dtype], HAS_SCALE=has_scale,
                ROWS=STAT_ROWS, COLS=STAT_COLS, num_warps=STAT_WARPS, enable_fp_fusion=False)
        stats_ptr = stats if given is not None and stats.numel() > 0 else row_sumsq  # never read when unused
        K.tiger_finish_kernel[(plan.n,)](
            plan.tensors, row_sumsq, row_nan, t_nan, t_rms, row_rms, stats_ptr,
            BLOCK=FINISH_BLOCK, num_warps=FINISH_WARPS, enable_fp_fusion=False)
    else:
        t_nan = t_rms = row_rms = dummy
    K.sign_step_kernel[(plan.n_blocks,)](
        plan.tensors, plan.blocks,
        float(lr), lr_t if lr_t is not None else dummy, scale_ptr, found_ptr,
        float(weight_decay), float(beta1), float(beta2), float(shrink),
        int(k), int(window), int(threshold),
        t_nan, t_rms, row_rms,
        ALGO=algo, P_DT=_DT_CODE[params[0].dtype], G_DT=_DT_CODE[grads[0].dtype],
        M_DT=_DT_CODE[states[0].dtype], HAS_LR_T=lr_t is not None, HAS_SCALE=has_scale,
        HAS_FOUND=found_inf is not None, SR=bool(stochastic_rounding), ALIGNED=plan.aligned,
        BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False)


# ------------------------------------------------------------------ the op signatures
def lion_(params, grads, exp_avgs, steps, lr, lr_t, beta1, beta2, weight_decay,
          grad_scale, found_inf, seeds, stochastic_rounding) -> None:
    run(ALGO_LION, params, grads, exp_avgs, steps, None, seeds, lr=lr, lr_t=lr_t,
        weight_decay=weight_decay, beta1=beta1, beta2=beta2, grad_scale=grad_scale,
        found_inf=found_inf, stochastic_rounding=stochastic_rounding)


def tiger_(params, grads, exp_avgs, steps, roles, lr, lr_t, beta, weight_decay, grad_accum_steps,
           shrink_ratio, grad_scale, found_inf, seeds, stochastic_rounding, stats=None, stats_nan=None,
           stats_sumsq=None, stats_n=None) -> None:
    run(ALGO_TIGER, params, grads, exp_avgs, steps, roles, seeds, lr=lr, lr_t=lr_t,
        weight_decay=weight_decay, beta1=beta, shrink=shrink_ratio, k=grad_accum_steps,
        grad_scale=grad_scale, found_inf=found_inf, stochastic_rounding=stochastic_rounding,
        stats=stats, stats_nan=stats_nan, stats_sumsq=stats_sumsq, stats_n=stats_n)


def simba_(params, grads, sign_counts, steps, lr, lr_t, window_size, threshold_count, weight_decay,
           grad_scale, found_inf, seeds, stochastic_rounding) -> None:
    run(ALGO_SIMBA, params, grads, sign_counts, steps, None, seeds, lr=lr, lr_t=lr_t,
        weight_decay=weight_decay, window=window_size, threshold=threshold_count,
        grad_scale=grad_scale, found_inf=found_inf, stochastic_rounding=stochastic_rounding)
