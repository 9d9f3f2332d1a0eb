"""Simba: sign counters instead of a float momentum (docs/rules.md, Simba)."""

from __future__ import annotations

from typing import Optional

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
        **options: as :class:`Lion`'s; ``momentum_dtype`` must be None and ``error_correction``
            False (the state is int16 counters, and a sign update of 16-bit weights has no
            master copy to replace).
    """

    _op_name = "simba_"
    _state_key = "sign_counts"
    _family = "Simba"

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        window_size: int = 128,
        threshold: float = 0.1,
        weight_decay: float = 0.0,
        **options,
    ):
        super().__init__(params, dict(lr=lr, window_size=window_size, threshold=threshold, weight_decay=weight_decay),
                         options)

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


    def _check_options(self, group, where: str):
        if group.get("momentum_dtype") not in (None, "param", torch.int16):
            raise ValueError(
                f"{where}: Simba keeps int16 sign counters, not a float momentum: momentum_dtype must be None, "
                f"got {group['momentum_dtype']!r}"
            )
        return super()._check_options(dict(group, momentum_dtype=None), where)

    def _state_dtype(self, group, p: torch.Tensor) -> torch.dtype:
        return torch.int16

    def _check_state_tensor(self, buf: torch.Tensor, what: str) -> None:
        # Counters saved by torch.optim's own load/save path may have become floats: they
        # must still be whole numbers in int16's range.
        if buf.is_complex() or buf.dtype == torch.bool:
            raise ValueError(f"{what}: 'sign_counts' must be an int16 tensor, got {buf.dtype}")
        if buf.numel() and buf.dtype not in (torch.int16, torch.int8, torch.uint8):
            x = buf.detach().to("cpu", torch.float64)
            if not bool(torch.all((x == x.round()) & (x.abs() <= 32767))):
                raise ValueError(f"{what}: 'sign_counts' must hold whole numbers in [-32767, 32767] (int16 counters)")

    def _op_args(self, group, bucket, lr, lr_t):
        w = int(group["window_size"])
        return (lr, lr_t, w, threshold_count(w, float(group["threshold"])), float(group["weight_decay"]))
