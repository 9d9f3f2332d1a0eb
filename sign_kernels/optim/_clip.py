"""Gradient-norm clipping inside the step (``max_grad_norm``): the norm pass and the coefficient.

NOTE: [clipping inside the step] (the op side is in sign_kernels/_ops.py; the rule in
docs/rules.md, "Clipping inside the step"). ``torch.nn.utils.clip_grad_norm_`` followed by a
step reads every gradient three times and writes it once (a norm pass, a ``mul_`` pass, the
step). Here one step is:

1. the norm pass: one ``sumsq_`` op call per bucket, the fp64 sum of squares of each
   gradient (of ``g / grad_scale`` under GradScaler), into one fp64 vector with an entry per
   tensor of the step, in plan order (groups, buckets, tensors). Sharded tensors' entries are
   partial sums: they travel in the step's one statistics collective (merged with Tiger's, in
   sign_kernels/distributed/_dtensor.py) and come back whole;
2. on the device, with torch ops (no host synchronisation): the total norm
   ``sqrt(sum of the entries)`` rounded to fp32 (``opt.grad_norm``), and the coefficient
   ``min(1, max_grad_norm / (total_norm + 1e-6))`` in fp32, torch's expression;
3. the update pass: every op call gets ``clip`` and multiplies ``g / grad_scale`` by it in
   registers. No pass writes g; ``p.grad`` is left as it was.

Non-finite norms (no GradScaler; under GradScaler a step with an inf or NaN is skipped before
anything here matters): Lion and Simba skip the whole step, as GradScaler does (nothing
changes, the step counts do not advance), and ``grad_norm`` holds the inf or NaN. Tiger keeps
its per-tensor NaN rule exactly: a tensor whose gradient holds a NaN takes the NaN guard, and
the coefficient of the others is computed from their norm alone (the NaN entries left out);
if that norm is infinite (an inf without NaN), the whole step is skipped. For Tiger the norm
pass is also where the guard looks: the op is given each tensor's NaN flag (its sum is NaN
exactly when its gradient holds a NaN: squares of infinities are +inf, never NaN), so it
reads g once, in the update pass.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch


def check_max_grad_norm(value: Any, where: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < value) or math.isinf(value):
        raise ValueError(f"{where}: max_grad_norm must be None or a finite float > 0, got {value!r}")


def max_norm_of(groups: List[Dict[str, Any]], where) -> Optional[float]:
    """The one max_grad_norm of the optimizer, after checking that every group agrees."""
    if not groups:
        return None
    first = groups[0].get("max_grad_norm")
    for gi, g in enumerate(groups[1:], 1):
        if g.get("max_grad_norm") != first:
            raise ValueError(
                f"{where(gi)}: max_grad_norm is {g.get('max_grad_norm')!r} but param group 0 has {first!r}; "
                "the gradient norm is one norm over every group, so every group must have the same max_grad_norm"
            )
    return first


class ClipStep:
    """What one clipped step computes before its op calls."""

    __slots__ = ("max_norm", "sums", "flags", "coef", "skip", "cache", "_per_device")

    def __init__(self, max_norm: float, sums: torch.Tensor):
        self.max_norm = max_norm
        self.sums = sums          # fp64, one entry per tensor of the step, plan order (bucket.clip_at: a bucket's first)
        self.flags: Optional[torch.Tensor] = None  # fp64 1.0 where the sum is NaN (Tiger's guard)
        self.coef: Optional[torch.Tensor] = None   # fp32 0-dim
        self.skip: Optional[torch.Tensor] = None   # bool 0-dim: the step changes nothing
        self.cache: Dict[str, Any] = {}  # per-step values the optimizer derives once (Tiger's sharded flags)
        self._per_device: Dict[torch.device, tuple] = {}

    def for_device(self, device: torch.device, found_inf: Optional[torch.Tensor]):
        """(clip, found_inf) on ``device``: the coefficient, and GradScaler's flag or'ed with ours."""
        hit = self._per_device.get(device)
        if hit is None:
            coef = self.coef.to(device, non_blocking=True)
            skip = self.skip.to(device, non_blocking=True)
            if found_inf is not None:
                skip = skip | (found_inf.to(device, non_blocking=True) != 0)
            hit = self._per_device[device] = (coef, skip.to(torch.float32))
        return hit


def norm_pass(plan, grad_scale: Optional[torch.Tensor], max_norm: float) -> Optional[ClipStep]:
    """Step 1: the local sums of squares of every gradient of the plan (one op call per bucket)."""
    buckets = [b for _, _, bs in plan for b in bs]
    if not buckets:
        return None
    device = buckets[0].params[0].device
    total = sum(len(b.grads) for b in buckets)
    parts = []
    at = 0
    same_device = all(b.params[0].device == device for b in buckets)
    out_all = torch.empty(total, dtype=torch.float64, device=device) if same_device else None
    for b in buckets:  # plan order
        n = len(b.grads)
        dev = b.params[0].device
        out = out_all[at:at + n] if out_all is not None else torch.empty(n, dtype=torch.float64, device=dev)
        scale = grad_scale.to(dev, non_blocking=True) if grad_scale is not None else None
        grads = b.grads if b.backend.name == "reference" or all(g.is_contiguous() for g in b.grads) \
            else [g.contiguous() for g in b.grads]
        b.backend.fn("sumsq_")(grads, scale, out)  # a bucket's grads share a dtype (its key)
        b.clip_at = at
        parts.append(out)
        at += n
    sums = out_all if out_all is not None else torch.cat([p.to(device) for p in parts])
    return ClipStep(max_norm, sums)


def finish(clip: ClipStep, tiger: bool) -> torch.Tensor:
    """Step 2: the total norm (returned, fp32 0-dim), the coefficient and the skip flag."""
    sums = clip.sums
    norm = sums.sum().sqrt().to(torch.float32)
    kept_norm = norm
    if tiger:  # the coefficient of the tensors without NaN (their guard takes the others)
        nan = sums.isnan()
        clip.flags = nan.to(torch.float64)
        kept_norm = torch.where(nan, torch.zeros((), dtype=sums.dtype, device=sums.device), sums).sum().sqrt().to(torch.float32)
    # torch.nn.utils.clip_grad_norm_'s expression, in fp32.
    coef = torch.clamp(clip.max_norm / (kept_norm + 1e-6), max=1.0)
    clip.skip = ~torch.isfinite(kept_norm)
    # A skipped step writes nothing; keep the coefficient finite anyway (NaN would do no harm
    # there, but a finite value keeps the kernels' inputs ordinary).
    clip.coef = torch.where(clip.skip, torch.ones_like(coef), coef)
    return norm
