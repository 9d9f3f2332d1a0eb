"""Timing primitives: the workspace (params + gradients), the step timer, the bandwidth
ceiling, and the launch counter.

NOTE: [timed region] Only ``optimizer.step()`` is inside the timed region. Before each
timed step the gradients are refilled with new random values (never zeros, never the
same twice in a row) and, on CUDA, the device is synchronised, so the step's time
includes its own launch overhead and nothing queued before it. CPU steps are timed with
``time.perf_counter`` (CPU kernels are synchronous); CUDA steps with CUDA events
recorded around the step, read after one synchronize at the end.
"""

from __future__ import annotations

import contextlib
import math
import random
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .accounting import DtypeSetting
from .paramsets import ParamSet

ALIGN = 64  # elements: every gradient view starts 256-byte aligned (fp32), 128 (bf16)


class Workspace:
    """The parameters and gradients of one (parameter set, dtype setting), shared by every
    contender timed on it; each contender gets a fresh optimizer (fresh state).

    Parameters are separate allocations, as in a model. Gradients are views of one flat
    buffer, so one kernel refills them all between steps:

    * ``fresh``: ``normal_`` over the buffer (CUDA default: the RNG runs at bandwidth);
    * ``mix``: ``grad = A + α·B`` with A, B two random pools made once and α a new random
      scalar of random sign each step (CPU default: a CPU ``normal_`` of 124M elements
      takes ~0.6 s on 2 cores, the mix ~0.04 s). Every step's gradient differs from the
      last, elementwise signs included.
    """

    def __init__(self, pset: ParamSet, ds: DtypeSetting, device: torch.device,
                 grad_mode: str = "auto", seed: int = 0):
        if grad_mode == "auto":
            grad_mode = "fresh" if device.type == "cuda" else "mix"
        if grad_mode not in ("fresh", "mix"):
            raise ValueError(f"grad_mode must be fresh, mix or auto, not {grad_mode!r}")
        self.pset, self.ds, self.device, self.grad_mode = pset, ds, device, grad_mode
        self._rng = random.Random(seed)
        self._gen = torch.Generator(device=device)
        self._gen.manual_seed(seed)
        offsets, total = [], 0
        for n in pset.numels:
            offsets.append(total)
            total += -(-n // ALIGN) * ALIGN
        self.grad_flat = torch.empty(total, dtype=ds.grad, device=device)
        self.pool = None
        if grad_mode == "mix":
            self.pool = tuple(
                torch.randn(total, generator=self._gen, dtype=ds.grad, device=device) for _ in range(2)
            )
        self._offsets = offsets
        self._other: Dict[Tuple[torch.dtype, torch.dtype], Tuple[List[torch.nn.Parameter], torch.Tensor]] = {}
        self.params: List[torch.nn.Parameter] = []
        for (name, shape), off, n in zip(pset.tensors, offsets, pset.numels):
            p = torch.nn.Parameter(torch.empty(shape, dtype=ds.param, device=device))
            with torch.no_grad():
                if self.pool is not None:
                    p.copy_(self.pool[0][off:off + n].view(shape)).mul_(0.02)
                else:
                    p.normal_(0.0, 0.02, generator=self._gen)
            p.grad = self.grad_flat[off:off + n].view(shape)
            p._bench_name = name  # the model's parameter name: Tiger gives roles by it
            self.params.append(p)
        self.refill()

    def refill(self) -> None:
        """New random gradients in place (outside the timed region)."""
        with torch.no_grad():
            if self.pool is None:
                self.grad_flat.normal_(generator=self._gen)
            else:
                alpha = self._rng.uniform(0.25, 4.0) * self._rng.choice((-1.0, 1.0))
                torch.add(self.pool[0], self.pool[1], alpha=alpha, out=self.grad_flat)

    def for_setting(self, ds: Optional[DtypeSetting]) -> Tuple[List[torch.nn.Parameter], Callable[[], None]]:
        """The params a contender of setting ``ds`` steps, and the refill of their gradients
        (NOTE: [int8 rows] in bench/contenders.py). The workspace's own where ``ds`` has its
        param and grad dtypes (or is None); otherwise copies of the params in ``ds.param``
        (separate allocations, as in a model; made once per dtype pair and shared by the
        contenders that ask for it) with gradients in ``ds.grad``, views of a flat buffer of
        their own, refilled like the workspace's (``fresh``: normal_; ``mix``: A + αB from the
        same pools, written in ``ds.grad``) before each of those contenders' steps."""
        if ds is None or (ds.param, ds.grad) == (self.ds.param, self.ds.grad):
            return self.params, self.refill
        key = (ds.param, ds.grad)
        if key not in self._other:
            flat = torch.empty(self.grad_flat.numel(), dtype=ds.grad, device=self.device)
            params = []
            for p, off in zip(self.params, self._offsets):
                q = torch.nn.Parameter(p.detach().to(ds.param).clone(memory_format=torch.contiguous_format))
                q.grad = flat[off:off + p.numel()].view(p.shape)
                q._bench_name = p._bench_name
                params.append(q)
            self._other[key] = (params, flat)
        params, flat = self._other[key]

        def refill() -> None:
            with torch.no_grad():
                if self.pool is None:
                    flat.normal_(generator=self._gen)
                else:
                    alpha = self._rng.uniform(0.25, 4.0) * self._rng.choice((-1.0, 1.0))
                    torch.add(self.pool[0], self.pool[1], alpha=alpha, out=flat)

        refill()
        return params, refill

    def ceiling_passes(self) -> Tuple[Callable[[], object], Callable[[], object], int, int]:
        """The two bandwidth-ceiling passes over this workspace's own gradient buffers
        (NOTE: [ceiling]) and the bytes each moves: ``mul``, in-place ``mul_(1)`` over the
        gradient buffer and the pools (viewed as int32: the bytes are moved, no float special
        cases); ``copy``, pool -> gradient buffer on CPU, gradient buffer -> a same-size
        buffer on CUDA (device-to-device). Both leave the gradients to be refilled."""
        bufs = [self.grad_flat] + list(self.pool or ())
        views = [b.view(torch.int32) for b in bufs]
        moved_mul = 2 * sum(b.numel() * b.element_size() for b in bufs)
        src = self.pool[0] if self.pool is not None else self.grad_flat
        dst = self.grad_flat if self.pool is not None else torch.empty_like(self.grad_flat)
        moved_copy = 2 * src.numel() * src.element_size()

        def mul() -> None:
            for v in views:
                v.mul_(1)

        return mul, lambda: dst.copy_(src), moved_mul, moved_copy

    def ceiling(self, reps: int = 10) -> Dict[str, float]:
        """Both ceiling passes timed on their own (sequential schedule): GB/s of each, and
        the larger as ``ceiling_gbps``."""
        mul, copy, moved_mul, moved_copy = self.ceiling_passes()

        def run(fn) -> float:
            first = time_steps(fn, lambda: None, self.device, warmup=1, steps=1).median
            n_reps = min(1000, max(reps, int(200.0 / max(first, 1e-3))))
            return time_steps(fn, lambda: None, self.device, warmup=1, steps=n_reps).median

        out = {"bytes_mul": moved_mul, "bytes_copy": moved_copy}
        out["mul_gbps"] = moved_mul / (run(mul) * 1e-3) / 1e9
        out["copy_gbps"] = moved_copy / (run(copy) * 1e-3) / 1e9
        out["ceiling_gbps"] = max(out["mul_gbps"], out["copy_gbps"])
        del mul, copy
        self.refill()
        return out

    def nbytes(self) -> int:
        t = sum(p.numel() * p.element_size() for p in self.params)
        t += self.grad_flat.numel() * self.grad_flat.element_size()
        if self.pool is not None:
            t += 2 * self.grad_flat.numel() * self.grad_flat.element_size()
        for params, flat in self._other.values():
            t += sum(p.numel() * p.element_size() for p in params) + flat.numel() * flat.element_size()
        return t


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def nvtx_range(name: str, enabled: bool):
    if enabled:
        torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        if enabled:
            torch.cuda.nvtx.range_pop()


@dataclass
class Timing:
    ms: List[float]

    @property
    def median(self) -> float:
        return statistics.median(self.ms)

    def percentile(self, q: float) -> float:
        """Linear-interpolated percentile, q in [0, 100]."""
        xs = sorted(self.ms)
        if len(xs) == 1:
            return xs[0]
        pos = (len(xs) - 1) * q / 100.0
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


MIN_STEPS = 5


def time_steps(step: Callable[[], object], refill: Callable[[], None], device: torch.device, *,
               warmup: int, steps: int, nvtx: bool = False, label: str = "step",
               budget_s: Optional[float] = None) -> Timing:
    """Per-step times in ms of `step`, each after a `refill` (NOTE: [timed region]).

    With `budget_s`, timing stops after the step that crosses that many wall-clock
    seconds of timed steps (at least MIN_STEPS steps): slow contenders cannot stall a sweep.
    The budget starts after the warm-up, so a JIT compile there (Triton's first call, a peer's
    autotuning) does not leave a row only its minimum of steps."""
    nvtx = nvtx and device.type == "cuda"
    deadline = None

    def over(i: int) -> bool:
        return deadline is not None and i + 1 >= MIN_STEPS and time.perf_counter() > deadline

    for i in range(warmup):
        refill()
        with nvtx_range(f"{label} warmup {i}", nvtx):
            step()
    synchronize(device)
    deadline = None if budget_s is None else time.perf_counter() + budget_s
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
        done = 0
        for i in range(steps):
            with nvtx_range("grad refill", nvtx):
                refill()
            torch.cuda.synchronize(device)
            with nvtx_range(f"{label} step {i}", nvtx):
                starts[i].record()
                step()
                ends[i].record()
            done = i + 1
            if over(i):
                break
        torch.cuda.synchronize(device)
        return Timing([s.elapsed_time(e) for s, e in zip(starts[:done], ends[:done])])
    ms = []
    for i in range(steps):
        refill()
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        ms.append((t1 - t0) * 1e3)
        if over(i):
            break
    return Timing(ms)


_LAUNCH_EVENTS = {
    "cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
    "cudaLaunchCooperativeKernel", "cudaGraphLaunch",
}


def count_launches(step: Callable[[], object], refill: Callable[[], None],
                   device: torch.device) -> Optional[int]:
    """Kernel launches in one step, from torch.profiler's CUDA runtime/driver API events.
    None on CPU (no launches to count). Triton launches through the driver API
    (``cuLaunchKernelEx``); should a profiler record no API event for them, the kernels the
    GPU ran are counted instead (device-side events, copies and fills left out), so a step
    never reads as 0 launches."""
    if device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    refill()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize(device)
    events = prof.events()
    api = sum(1 for e in events if e.name in _LAUNCH_EVENTS)
    if api:
        return api
    return sum(1 for e in events if e.device_type == DeviceType.CUDA
               and not e.name.startswith(("Memcpy", "Memset", "cudaMemcpy", "cudaMemset")))
