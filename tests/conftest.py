"""Shared fixtures: the hard cases every backend is tested on, and the fp64 oracle."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors (scripts/test.sh
# exports this too). It must be set before triton is first imported, and importing
# sign_kernels below asks whether triton can run: a test module that set it later would find
# the kernels already compiled for a GPU ("Cannot call @triton.jit'd outside of the scope of
# a kernel"). TRITON_INTERPRET=0 on a GPU machine tests the compiled kernels.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import sign_kernels  # noqa: E402

AVAILABLE = sign_kernels.available_backends()
# Backends of the optimizer tests here (Triton and CUDA have their own test files).
LOCAL_BACKENDS = [b for b in ("reference", "cpu") if AVAILABLE[b] is None]

needs_cpu = pytest.mark.skipif(AVAILABLE["cpu"] is not None, reason=f"cpu backend: {AVAILABLE['cpu']}")

OPTIMIZERS = {
    "lion": (sign_kernels.Lion, dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)),
    "tiger": (sign_kernels.Tiger, dict(lr=1e-2, beta=0.965, weight_decay=0.01)),
    "simba": (sign_kernels.Simba, dict(lr=1e-2, window_size=16, threshold=0.25, weight_decay=0.1)),
}

ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float64: 2.0**-52}


def bits(x: torch.Tensor) -> torch.Tensor:
    """x's bits, as the signed integer type of its size."""
    return x.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per element: the same bits (-0.0 is not +0.0), or NaN in both whatever their payloads."""
    if not a.is_floating_point():
        return a == b
    return (bits(a) == bits(b)) | (torch.isnan(a) & torch.isnan(b))


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (``same_bits`` everywhere)."""
    return a.dtype == b.dtype and a.shape == b.shape and bool(same_bits(a, b).all())


def binade_values(dtype: torch.dtype, n: int, generator: torch.Generator) -> torch.Tensor:
    """Values of both signs spread over every binade the dtype can hold (normals)."""
    info = torch.finfo(dtype)
    lo, hi = math.log2(info.tiny), math.log2(info.max) - 1
    e = torch.randint(int(lo), int(hi), (n,), generator=generator).to(torch.float64)
    mant = 1.0 + torch.rand(n, generator=generator, dtype=torch.float64)
    sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).to(torch.float64)
    return (sign * mant * torch.exp2(e)).to(dtype)


@dataclass
class Case:
    """One optimizer scenario: initial params/state and a gradient per step (None = no grad)."""

    name: str
    params: List[torch.Tensor]
    grads: List[List[Optional[torch.Tensor]]]  # [step][param]
    momentum: Optional[List[torch.Tensor]] = None  # initial exp_avg, when not zero
    hparams: Dict = field(default_factory=dict)


def hard_cases(dtype: torch.dtype, seed: int = 0) -> List[Case]:
    """The shared fixture of hard cases (STYLE.md: edge cases live in one place)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    cases = []
    # Exact zeros: sign(0) = 0 must leave theta alone (up to decay).
    z = rnd(64)
    z[::3] = 0
    zg = rnd(64)
    zg[::2] = 0
    cases.append(Case("zeros", [z], [[zg], [torch.zeros(64, dtype=dtype)], [zg]]))
    # Momentum and gradient that cancel exactly (beta1 = 0.5, g = -m).
    m0 = rnd(128, scale=0.1)
    cases.append(Case("cancel", [rnd(128)], [[-m0], [m0.clone()]], momentum=[m0.clone()],
                      hparams=dict(betas=(0.5, 0.5), beta=0.5)))
    # Values in every binade, for params, grads and momentum.
    n = 512
    cases.append(Case("binades", [binade_values(dtype, n, g)],
                      [[binade_values(dtype, n, g)], [binade_values(dtype, n, g)]],
                      momentum=[binade_values(dtype, n, g)]))
    # NaN and Inf gradients.
    gn = rnd(33)
    gn[3] = float("nan")
    gn[5] = float("inf")
    gn[7] = float("-inf")
    cases.append(Case("nan_inf", [rnd(33), rnd(17)], [[gn, rnd(17)], [rnd(33), rnd(17)]]))
    # Sizes: empty, 1, 4097 (odd, crosses vector and block boundaries), 2-d.
    shapes = [(0,), (1,), (4097,), (3, 0), (65, 63)]
    cases.append(Case("sizes", [rnd(*s) for s in shapes], [[rnd(*s) for s in shapes] for _ in range(3)]))
    # Grads that are None on some steps.
    cases.append(Case("none_grads", [rnd(10), rnd(5, 4), rnd(7)],
                      [[rnd(10), None, rnd(7)], [None, rnd(5, 4), rnd(7)], [rnd(10), rnd(5, 4), None]]))
    return cases


def make_params(case: Case, dtype: torch.dtype) -> List[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone().to(dtype)) for p in case.params]


def run_optimizer(cls, hp: Dict, case: Case, dtype: torch.dtype, backend: str, **extra):
    """Run ``cls`` over the case's steps; returns (params, optimizer)."""
    params = make_params(case, dtype)
    kwargs = dict(hp)
    kwargs.update({k: v for k, v in case.hparams.items() if k in _accepted(cls)})
    kwargs.update(extra)
    opt = cls(params, backend=backend, **kwargs)
    if case.momentum is not None and cls is not sign_kernels.Simba:
        for p, m in zip(params, case.momentum):
            state = opt.state[p]
            state["exp_avg"] = m.detach().clone().to(opt.param_groups[0]["momentum_dtype"] or dtype)
            state["step"] = torch.zeros((), dtype=torch.int64)
    for step_grads in case.grads:
        for p, gr in zip(params, step_grads):
            p.grad = None if gr is None else gr.detach().clone().to(dtype)
        opt.step()
    return params, opt


def _accepted(cls) -> set:
    import inspect

    return set(inspect.signature(cls.__init__).parameters)


def assert_close_to_oracle(result: torch.Tensor, oracle: torch.Tensor, dtype: torch.dtype, steps: int, lr: float,
                           max_flips: int = 0, what: str = "") -> None:
    """``result`` (storage dtype) agrees with the fp64 ``oracle`` to a few ulps per step.

    Elements where a sign decision can legitimately differ (its argument within rounding of
    0) move by about 2*lr; they are counted and must number at most ``max_flips``.
    """
    r = result.detach().to(torch.float64)
    o = oracle.detach().to(torch.float64)
    assert r.shape == o.shape, what
    both_nan = torch.isnan(r) & torch.isnan(o)
    same_inf = torch.isinf(r) & torch.isinf(o) & (torch.sign(r) == torch.sign(o))
    ulp = ULP[dtype]
    tol = (4 * steps + 2) * ulp * o.abs().clamp_min(torch.finfo(dtype).tiny) + (4 * steps) * ulp * lr
    bad = ~(both_nan | same_inf) & ~((r - o).abs() <= tol)
    n_bad = int(bad.sum())
    if n_bad > max_flips:
        idx = bad.flatten().nonzero()[:5].flatten().tolist()
        raise AssertionError(
            f"{what}: {n_bad} elements differ from the fp64 oracle beyond {4 * steps + 2} ulps "
            f"(allowed sign flips: {max_flips}); first at {idx}: got {r.flatten()[idx].tolist()}, "
            f"oracle {o.flatten()[idx].tolist()}"
        )


def oracle_run(cls, hp: Dict, case: Case, **extra):
    """The same run with the reference backend on fp64 copies."""
    return run_optimizer(cls, hp, case, torch.float64, "reference", **extra)
