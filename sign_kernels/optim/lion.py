"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms")."""

from __future__ import annotations

from typing import Optional, Tuple

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
        max_grad_norm: clip the gradients' total norm (over every group) to this, inside the
            step: one fused norm pass, the coefficient ``min(1, max_grad_norm / (norm + 1e-6))``
            applied in registers by the update, ``p.grad`` left as it was; the norm of the last
            step is ``opt.grad_norm``. None (default): no clipping. docs/rules.md, "Clipping".
        backend: "auto", "reference", "cpu", "cuda" or "triton".
        momentum_dtype: dtype of ``exp_avg``: None (the param's), torch.float32 or torch.bfloat16.
        stochastic_rounding: round bf16 writes (params and bf16 momentum) stochastically, with the
            random bits a function of (seed, step, element index) on every backend.
        seed: seed of the stochastic rounding.
        maximize: maximise the objective (steps on -g; the state tracks -g, as in torch.optim).
        foreach, capturable, differentiable, fused: torch.optim's flags; see the README's
            "torch.optim flags" for what each does here.
    """

    _op_name = "lion_"
    _state_key = "exp_avg"
    _family = "Lion"

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: Tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        max_grad_norm: Optional[float] = None,
        backend: str = "auto",
        momentum_dtype: Optional[torch.dtype] = None,
        stochastic_rounding: bool = False,
        seed: int = 0,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
    ):
        defaults = dict(
            lr=lr,
            betas=betas,
            weight_decay=weight_decay,
            max_grad_norm=max_grad_norm,
            backend=backend,
            momentum_dtype=momentum_dtype,
            stochastic_rounding=stochastic_rounding,
            seed=seed,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
        )
        super().__init__(params, defaults)

    def _validate_hparams(self, group, where: str) -> None:
        _check_lr(group["lr"], where)
        _check_betas(group["betas"], where)
        _check_nonneg("weight_decay", group["weight_decay"], where)

    def _op_args(self, group, bucket, lr, lr_t):
        beta1, beta2 = group["betas"]
        return (lr, lr_t, float(beta1), float(beta2), float(group["weight_decay"]))
