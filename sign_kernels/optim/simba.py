"""Simba: sign counters instead of a float momentum (seed 004 of SPEC.md)."""

from __future__ import annotations

import torch

from ..backends.reference import threshold_count
from ._base import SignOptimizer, _check_lr, _check_nonneg

MAX_WINDOW = 32767  # the counters are int16


class Simba(SignOptimizer):
    r"""Simba: a sign update driven by int16 sign counters.

    .. math::
        \theta &\leftarrow \theta (1 - \eta\lambda) \\
        u &= \mathrm{sign}(s) \text{ if } |s| > T \text{ else } \mathrm{sign}(g), \quad
            T = \lfloor W \cdot \text{threshold} \rfloor \\
        \theta &\leftarrow \theta - \eta u \\
        s &\leftarrow \mathrm{clamp}(s + \mathrm{sign}(g), -W, W)

    State: ``sign_counts`` (int16), 2 bytes per parameter instead of a 4-byte momentum; a step
    moves 16 bytes per fp32 parameter against Lion's 20 and fused AdamW's 28.

    The seed reports the plain form training worse than Lion on SASRec; this library
    implements it exactly as specified and reports such results as they come out.

    Args:
        params: parameters, named parameters or param groups.
        lr: learning rate :math:`\eta` (float or 0-dim tensor).
        window_size: :math:`W`, the counter bound, in [1, 32767].
        threshold: fraction of the window a counter must exceed to drive the update, in [0, 1].
        weight_decay: decoupled weight decay :math:`\lambda \ge 0`.
        backend, stochastic_rounding, seed: as in :class:`Lion`.
    """

    _op_name = "simba_"
    _state_key = "sign_counts"

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        window_size: int = 128,
        threshold: float = 0.1,
        weight_decay: float = 0.0,
        *,
        backend: str = "auto",
        stochastic_rounding: bool = False,
        seed: int = 0,
    ):
        defaults = dict(
            lr=lr,
            window_size=window_size,
            threshold=threshold,
            weight_decay=weight_decay,
            backend=backend,
            momentum_dtype=None,
            stochastic_rounding=stochastic_rounding,
            seed=seed,
        )
        super().__init__(params, defaults)

    def _validate_hparams(self, group, where: str) -> None:
        _check_lr(group["lr"], where)
        w = group["window_size"]
        if isinstance(w, bool) or not isinstance(w, int) or not (1 <= w <= MAX_WINDOW):
            raise ValueError(
                f"{where}: window_size must be an int in [1, {MAX_WINDOW}] (the counters are int16), got {w!r}"
            )
        th = group["threshold"]
        if not isinstance(th, (int, float)) or not (0.0 <= th <= 1.0):
            raise ValueError(f"{where}: threshold must be in [0, 1], got {th!r}")
        _check_nonneg("weight_decay", group["weight_decay"], where)
        if group["momentum_dtype"] is not None:
            raise ValueError(f"{where}: Simba keeps int16 counters; momentum_dtype does not apply")

    def _state_dtype(self, group, p: torch.Tensor) -> torch.dtype:
        return torch.int16

    def _op_args(self, group, bucket, lr, lr_t):
        w = int(group["window_size"])
        return (lr, lr_t, w, threshold_count(w, float(group["threshold"])), float(group["weight_decay"]))
