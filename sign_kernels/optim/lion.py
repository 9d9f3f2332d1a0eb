"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms")."""

from __future__ import annotations

from typing import Tuple

import torch

from ._base import SignOptimizer, _check_betas, _check_lr, _check_nonneg


class Lion(SignOptimizer):
    r"""Lion: the sign of an interpolated momentum, with decoupled weight decay.

    .. math::
        c_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t \\
        \theta_t &= \theta_{t-1} (1 - \eta\lambda) - \eta\,\mathrm{sign}(c_t) \\
        m_t &= \beta_2 m_{t-1} + (1-\beta_2) g_t

    with :math:`\mathrm{sign}(0) = 0`. One state buffer, ``exp_avg`` (the name torch.optim and
    lion-pytorch use, so their checkpoints load).

    Advice (from the paper): an lr 3-10x smaller than AdamW's and a weight decay 3-10x larger,
    keeping ``lr * weight_decay`` about the same; language models used ``betas=(0.95, 0.98)``.
    ``betas=(b, b)`` is Signum with decoupled decay, ``beta1=0`` signSGD.

    Args:
        params: parameters, named parameters or param groups.
        lr: learning rate :math:`\eta` (float or 0-dim tensor).
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1).
        weight_decay: decoupled weight decay :math:`\lambda \ge 0`.
        **options: the keyword options every sign optimizer takes (one definition:
            ``sign_kernels.optim.COMMON_OPTIONS``; README, "Common keyword options"):
            ``max_grad_norm`` (clip the gradients' total norm, over every group, inside the step:
            one fused norm pass, the coefficient ``min(1, max_grad_norm / (norm + 1e-6))``
            applied in registers, ``p.grad`` left as it was, the norm in ``opt.grad_norm``),
            ``backend`` ("auto", "reference", "cpu", "cuda", "triton"), ``momentum_dtype``
            (None: the param's; torch.float32, torch.bfloat16, or torch.int8: 8-bit momentum,
            docs/rules.md), ``error_correction`` (bf16/fp16 params keep a correction byte:
            fp32-master quality at 1 byte per param), ``stochastic_rounding`` (bf16 writes
            rounded stochastically with bits of (seed, step, index) on every backend), ``seed``,
            and torch.optim's ``maximize``, ``foreach``, ``capturable``, ``differentiable``,
            ``fused`` (README, "torch.optim flags").
    """

    _op_name = "lion_"
    _state_key = "exp_avg"
    _family = "Lion"
    _compressed_backends = frozenset({"reference", "cpu", "cuda", "triton"})

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: Tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        **options,
    ):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay), options)

    def _validate_hparams(self, group, where: str) -> None:
        _check_lr(group["lr"], where)
        _check_betas(group["betas"], where)
        _check_nonneg("weight_decay", group["weight_decay"], where)

    def _op_args(self, group, bucket, lr, lr_t):
        beta1, beta2 = group["betas"]
        return (lr, lr_t, float(beta1), float(beta2), float(group["weight_decay"]))
