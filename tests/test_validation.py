"""Bad input raises a clear error naming the parameter and the rule, and changes nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sign_kernels
from conftest import LOCAL_BACKENDS

BAD_HPARAMS = [
    (sign_kernels.Lion, dict(lr=-1e-3), r"lr must be .*>= 0"),
    (sign_kernels.Lion, dict(lr=float("nan")), r"lr must be"),
    (sign_kernels.Lion, dict(betas=(1.0, 0.99)), r"betas\[0\] must be in \[0, 1\)"),
    (sign_kernels.Lion, dict(betas=(0.9, -0.1)), r"betas\[1\] must be in \[0, 1\)"),
    (sign_kernels.Lion, dict(betas=(0.9,)), r"betas must be a pair"),
    (sign_kernels.Lion, dict(weight_decay=-0.1), r"weight_decay must be .*>= 0"),
    (sign_kernels.Lion, dict(momentum_dtype=torch.int16), r"momentum_dtype must be"),
    (sign_kernels.Lion, dict(error_correction=True, stochastic_rounding=True), r"exclusive"),
    (sign_kernels.Lion, dict(backend="gpu"), r"backend must be one of"),
    (sign_kernels.Tiger, dict(beta=1.0), r"beta must be in \[0, 1\)"),
    (sign_kernels.Tiger, dict(lr=-1.0), r"lr must be"),
    (sign_kernels.Tiger, dict(weight_decay=-1.0), r"weight_decay must be"),
    (sign_kernels.Tiger, dict(grad_accum_steps=0), r"grad_accum_steps must be an int >= 1"),
    (sign_kernels.Tiger, dict(shrink_ratio=0.0), r"shrink_ratio must be in \(0, 1\]"),
    (sign_kernels.Tiger, dict(shrink_ratio=1.5), r"shrink_ratio must be in \(0, 1\]"),
    (sign_kernels.Simba, dict(window_size=0), r"window_size must be an int in \[1, 32767\]"),
    (sign_kernels.Simba, dict(window_size=40000), r"window_size must be an int in \[1, 32767\] \(the counters are int16\)"),
    (sign_kernels.Simba, dict(threshold=1.5), r"threshold must be in \[0, 1\]"),
    (sign_kernels.Simba, dict(threshold=-0.1), r"threshold must be in \[0, 1\]"),
    (sign_kernels.Simba, dict(weight_decay=-0.1), r"weight_decay must be"),
]


@pytest.mark.parametrize("cls,kwargs,match", BAD_HPARAMS, ids=lambda v: str(v) if isinstance(v, dict) else None)
def test_bad_hyperparameters_raise_at_construction(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls([nn.Parameter(torch.randn(3))], **kwargs)


def _trained(cls, backend):
    p = nn.Parameter(torch.randn(8))
    q = nn.Parameter(torch.randn(4))
    opt = cls([p, q], backend=backend)
    p.grad, q.grad = torch.randn(8), torch.randn(4)
    opt.step()
    return p, q, opt


def _snapshot(params, opt):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()["state"])


def _assert_unchanged(params, opt, snap):
    ps, st = snap
    for p, s in zip(params, ps):
        assert torch.equal(p.detach(), s)
    now = opt.state_dict()["state"]
    assert now.keys() == st.keys()
    for k in st:
        for key in st[k]:
            assert torch.equal(now[k][key], st[k][key]), (k, key)


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
@pytest.mark.parametrize("cls", [sign_kernels.Lion, sign_kernels.Tiger, sign_kernels.Simba])
@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda p, q, g: g.__setitem__("lr", -0.5), ValueError, "param group 0: lr must be"),
        (lambda p, q, g: setattr(q.grad, "data", torch.randn(5)), RuntimeError,  # torch forbids q.grad = ...
         r"param 1 has shape \(4,\) but its grad has shape \(5,\)"),
        (lambda p, q, g: setattr(q, "grad", torch.randn(4).to_sparse()), RuntimeError, "param 1 has a sparse gradient"),
        (lambda p, q, g: g.__setitem__("backend", "nope"), ValueError, "backend must be one of"),
    ],
    ids=["negative_lr", "grad_shape", "sparse_grad", "bad_backend"],
)
def test_bad_input_at_step_changes_nothing(backend, cls, mutate, exc, match):
    """The first param is fine, the second bad: the error comes before the first is touched."""
    p, q, opt = _trained(cls, backend)
    p.grad, q.grad = torch.randn(8), torch.randn(4)
    snap = _snapshot([p, q], opt)
    mutate(p, q, opt.param_groups[0])
    with pytest.raises(exc, match=match):
        opt.step()
    _assert_unchanged([p, q], opt, snap)


def test_bad_group_hyperparameters_in_a_second_group_change_nothing():
    a, b = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))
    opt = sign_kernels.Simba([{"params": [a]}, {"params": [b]}])
    a.grad, b.grad = torch.randn(4), torch.randn(4)
    opt.param_groups[1]["window_size"] = 70000
    a0 = a.detach().clone()
    with pytest.raises(ValueError, match=r"Simba param group 1: window_size must be an int in \[1, 32767\]"):
        opt.step()
    assert torch.equal(a.detach(), a0) and not opt.state


def test_explicit_backend_that_cannot_take_the_tensor():
    avail = sign_kernels.available_backends()
    if avail["cpu"] is None:
        # "cpu" for a meta (non-CPU) tensor: refused at construction, naming the rule.
        with pytest.raises(sign_kernels.BackendUnavailableError, match=r'backend="cpu" takes CPU tensors'):
            sign_kernels.Lion([nn.Parameter(torch.randn(3, device="meta"))], backend="cpu")
    with pytest.raises(sign_kernels.BackendUnavailableError, match=r'backend="cuda"'):
        sign_kernels.Lion([nn.Parameter(torch.randn(3))], backend="cuda")


def test_tiger_role_errors():
    with pytest.raises(ValueError, match=r"role must be None or one of"):
        sign_kernels.Tiger([{"params": [nn.Parameter(torch.randn(3))], "role": "weights"}])
    with pytest.raises(ValueError, match=r"param 0 has role 'embedding' but 1 dims"):
        sign_kernels.Tiger([{"params": [nn.Parameter(torch.randn(3))], "role": "embedding"}])


def test_integer_params_are_refused():
    with pytest.raises(ValueError, match="parameters must be floating point"):
        sign_kernels.Lion([torch.zeros(3, dtype=torch.int32)])


@pytest.mark.skipif(sign_kernels.available_backends()["cpu"] is not None, reason="needs the compiled op")
def test_op_checks_name_tensor_and_rule():
    """The C++ side refuses what the optimizers never send, naming the tensor and the rule."""
    op = torch.ops.sign_kernels.lion_
    p, g, m = torch.randn(4), torch.randn(4), torch.zeros(4)
    step = torch.zeros((), dtype=torch.int64)
    with pytest.raises(RuntimeError, match=r"tensor 1: param shape \[3\], grad shape \[4\]"):
        op([p, torch.randn(3)], [g, g], [m, torch.zeros(3)], [step, step], 0.1, None, 0.9, 0.99, 0.0, None, None,
           [0, 0], False)
    with pytest.raises(RuntimeError, match=r"tensor 0: params, grads and state must be contiguous"):
        q = torch.randn(4, 2).t()
        op([q], [torch.randn(2, 4)], [torch.zeros(2, 4)], [step], 0.1, None, 0.9, 0.99, 0.0, None, None, [0], False)
    with pytest.raises(RuntimeError, match=r"unsupported dtypes"):
        op([p], [g], [torch.zeros(4, dtype=torch.float16)], [step], 0.1, None, 0.9, 0.99, 0.0, None, None, [0], False)
    with pytest.raises(RuntimeError, match=r"must have the same length"):
        op([p], [g], [m], [], 0.1, None, 0.9, 0.99, 0.0, None, None, [0], False)
    with pytest.raises(RuntimeError, match=r"window_size must be in \[1, 32767\]"):
        torch.ops.sign_kernels.simba_([p], [g], [torch.zeros(4, dtype=torch.int16)], [step], 0.1, None, 0, 0, 0.0,
                                      None, None, [0], False)


@pytest.mark.parametrize("version, ok", [("3.6.0", False), ("3.5.1", False), ("2.3.1", False), ("3.7.0", True),
                                         ("3.7.1", True), ("3.9.0", True), ("3.10.0", True), ("4.0.0", True),
                                         ("3.8.0+git1234", True)])
def test_triton_interpreter_needs_3_7(version, ok):
    """The CPU interpreter of triton < 3.7 cannot run Tiger's statistics kernels: the backend
    says so (with the version) instead of failing inside a kernel."""
    from sign_kernels.triton import _interpreter_reason

    reason = _interpreter_reason(version)
    assert (reason is None) == ok
    if not ok:
        assert "TRITON_INTERPRET=1 needs triton >= 3.7" in reason and version in reason
