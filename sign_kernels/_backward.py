"""The optimizer step inside backward (gradient release): ``step_in_backward(optimizer)``.

Every parameter is stepped as soon as its gradient is complete and its gradient is freed, so a
full set of gradients is never alive. Parameters whose gradients complete together are stepped
in one op call (a bucket), through the optimizer's own plan: the same backend choice, op,
hyperparameters (read from the param group when the bucket runs), Tiger roles and stochastic-
rounding seeds as ``step()`` would use, so the result is bit-identical to
``loss.backward(); opt.step(); opt.zero_grad()``.

NOTE: [one backward is one step]
Each backward that reaches a parameter steps it once, exactly as one ``step()`` after that
backward would. Gradient accumulation across backwards in ``p.grad`` is therefore impossible
here (the gradient is gone after its step); Tiger accumulates in its momentum instead
(``grad_accum_steps = k``: one Tiger step per micro-batch, θ moves on the k-th), so Tiger alone
accumulates with no gradient memory at all.

NOTE: [what needs every gradient at once]
GradScaler (its inf check decides for the whole step, after every gradient exists), a step
closure and clipping by the global gradient norm all need the complete set of gradients
before any parameter moves; this mode never holds that set. ``opt.step()`` (which GradScaler's
``scaler.step(opt)`` calls) raises while a handle is active. ``clip_grad_norm_`` after backward
sees no gradients; it is documented, not intercepted.
"""

from __future__ import annotations

import weakref
from typing import Dict, List, Optional, Set, Tuple

import torch

from .optim._base import SignOptimizer

__all__ = ["step_in_backward", "StepInBackwardHandle"]

DEFAULT_BUCKET_CAP_MB = 32.0


def _engine():
    return torch.autograd.Variable._execution_engine


class StepInBackwardHandle:
    """What :func:`step_in_backward` returns; ``remove()`` gives back an ordinary optimizer."""

    def __init__(self, optimizer: SignOptimizer, bucket_cap_bytes: int):
        self._opt_ref = weakref.ref(optimizer)
        self._cap = bucket_cap_bytes
        self._hooks = []
        self._hooked: Dict[int, torch.Tensor] = {}
        self._index: Dict[int, Tuple[int, int]] = {}  # id(param) -> (group index, position)
        self._layout: Optional[tuple] = None
        self._pending: List[Tuple[int, int, torch.Tensor]] = []
        self._pending_bytes = 0
        self._tasks: Set[int] = set()  # graph tasks whose end-of-backward flush is queued
        self.removed = False
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) in self._hooked:
                    continue
                self._hooked[id(p)] = p
                self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))
        self._refresh_index(optimizer)

    # ------------------------------------------------------------------ bookkeeping
    def refusal(self, what: str) -> str:
        return (
            f"{what} is not available while step_in_backward is active: every parameter was already "
            "stepped inside backward and its gradient freed (so GradScaler, a closure or global-norm "
            "clipping, which need every gradient before the step, cannot work here). "
            "Call handle.remove() to get an ordinary optimizer back."
        )

    def _refresh_index(self, opt: SignOptimizer) -> None:
        layout = tuple(tuple(id(p) for p in g["params"]) for g in opt.param_groups)
        if layout == self._layout:
            return
        ids = {i for g in layout for i in g}
        if ids != set(self._hooked):
            raise RuntimeError(
                f"{type(opt).__name__}: its parameters changed while step_in_backward is active "
                "(add_param_group or load_state_dict with other params); call handle.remove() and "
                "step_in_backward(optimizer) again"
            )
        self._index = {i: (gi, j) for gi, g in enumerate(layout) for j, i in enumerate(g)}
        self._layout = layout

    # ------------------------------------------------------------------ the hooks
    def _on_grad(self, p: torch.Tensor) -> None:
        opt = self._opt_ref()
        if opt is None or self.removed or p.grad is None:
            return
        task = torch._C._current_graph_task_id()
        if task not in self._tasks:
            # First gradient of this backward. Outermost: check the groups once (nothing is
            # stepped yet) and drop what a backward that raised left pending. A backward nested
            # in another (reentrant checkpointing) keeps the outer one's pending params.
            if not self._tasks:
                self._refresh_index(opt)
                for gi, group in enumerate(opt.param_groups):  # a bad hyperparameter raises now
                    opt._validate_group(group, gi, params=False)
                _refuse_clipping(opt)
                self._pending, self._pending_bytes = [], 0
            if task != -1:
                _engine().queue_callback(lambda: self._end_of_backward(task))
                self._tasks.add(task)
        gi, j = self._index[id(p)]
        self._pending.append((gi, j, p))
        # NOTE: [bucket size by logical numel] numel() of a DTensor is the global one, the same
        # on every rank, so every rank cuts the same buckets (Tiger's per-bucket reductions match).
        self._pending_bytes += p.grad.numel() * p.grad.element_size()
        if task == -1 or self._pending_bytes >= self._cap:
            self._flush(opt)

    def _end_of_backward(self, task: int) -> None:
        self._tasks.discard(task)
        opt = self._opt_ref()
        if opt is not None and not self.removed:
            self._flush(opt)
            # NOTE: [LR schedulers] torch's schedulers warn when scheduler.step() comes before
            # any optimizer.step(), through this flag set by their wrapper of step(); a backward
            # is this mode's step.
            opt._opt_called = True

    def _flush(self, opt: SignOptimizer) -> None:
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        if not pending:
            return
        select: Dict[int, List[int]] = {}
        for gi, j, _ in pending:
            select.setdefault(gi, []).append(j)
        for positions in select.values():
            positions.sort()  # the order step() meets them in
        try:
            opt._step_selected(select)
        except BaseException:
            self._tasks.clear()  # this backward ends here: its end-of-backward flush never runs
            raise
        for _, _, p in pending:
            p.grad = None

    # ------------------------------------------------------------------ the handle
    def remove(self) -> None:
        """Unhook every parameter; the optimizer steps in ``step()`` again."""
        if self.removed:
            return
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._pending, self._pending_bytes = [], 0
        self.removed = True
        opt = self._opt_ref()
        if opt is not None and getattr(opt, "_step_in_backward", None) is self:
            del opt._step_in_backward

    def __enter__(self) -> "StepInBackwardHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _refuse_clipping(opt: SignOptimizer) -> None:
    for gi, group in enumerate(opt.param_groups):
        if group.get("max_grad_norm") is not None:
            raise ValueError(
                f"{type(opt).__name__} param group {gi}: max_grad_norm={group['max_grad_norm']!r} cannot work with "
                "step_in_backward: the global gradient norm is known only after the last gradient of backward, "
                "but here each parameter is stepped (and its gradient freed) as soon as its own gradient is "
                "ready. Set max_grad_norm=None for step_in_backward, or keep the gradients and call "
                "optimizer.step() after backward (clipping then costs one fused read of the gradients)"
            )


def step_in_backward(optimizer: SignOptimizer, *, bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB) -> StepInBackwardHandle:
    """Step ``optimizer``'s parameters inside backward, freeing each gradient after its step.

    Rules:

    * The result is bit-identical to ``loss.backward(); optimizer.step(); optimizer.zero_grad()``
      (same op calls, backend, hyperparameters, Tiger roles and stochastic-rounding seeds);
      an LR scheduler stepped between iterations is read as in ``step()``.
    * Every backward is one step of every parameter it reaches; parameters it does not reach
      are not stepped. After each backward every ``p.grad`` of the optimizer is None. Tiger's
      ``grad_accum_steps = k`` accumulates in the momentum: θ moves on every k-th backward.
    * Gradients that complete together are stepped in one op call, a bucket of at most about
      ``bucket_cap_mb`` MiB of gradients (plus the one that crosses the cap); the rest is
      stepped when the backward ends. The cap bounds the gradient memory alive at a time.
    * ``optimizer.step()`` raises while the handle is active, and so does GradScaler's
      ``scaler.step(optimizer)``; a closure, GradScaler and global-norm gradient clipping need
      every gradient before the step and cannot be used (``clip_grad_norm_`` after backward
      finds no gradients).
    * Errors: the param groups' hyperparameters are checked at the first gradient of each
      backward, before anything is stepped. A gradient that fails its check (sparse, wrong
      shape) raises out of backward and leaves its bucket's params as they were; buckets
      stepped before it in that backward stay stepped.
    * Reentrant activation checkpointing (``use_reentrant=True``) runs nested backwards; they
      are handled, but a param whose gradient is accumulated in two of them (used inside and
      outside a checkpointed segment) would be stepped twice: use ``use_reentrant=False``.
      After an exception out of backward, call ``optimizer.zero_grad()`` before the next one.
    * ``max_grad_norm`` (clipping inside the step) is refused, here and at each backward's first
      gradient: the global norm needs every gradient before the first parameter steps.
    * Adding or removing parameters of the optimizer while active raises at the next backward
      (before anything is stepped): remove the handle and call this again.
    * State dicts are those of normal mode. ``handle.remove()`` (or leaving a ``with`` block)
      gives back an ordinary optimizer.
    """
    if not isinstance(optimizer, SignOptimizer):
        raise TypeError(
            f"step_in_backward takes a sign_kernels optimizer (Lion, Tiger, Simba), got {type(optimizer).__name__}"
        )
    if getattr(optimizer, "_step_in_backward", None) is not None:
        raise RuntimeError(
            f"step_in_backward is already active on this {type(optimizer).__name__}; remove the first handle"
        )
    if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)) or not (bucket_cap_mb >= 0):
        raise ValueError(f"bucket_cap_mb must be a number >= 0, got {bucket_cap_mb!r}")
    _refuse_clipping(optimizer)
    handle = StepInBackwardHandle(optimizer, int(bucket_cap_mb * 2**20))
    optimizer._step_in_backward = handle
    return handle
