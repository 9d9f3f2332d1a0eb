"""torch.optim's conventions, to the letter: state-dict round trips, torch's error order and
wording, and the constructor flags every torch optimizer takes (maximize, foreach, fused,
capturable, differentiable). Written here from torch.optim's documented behaviour."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import sign_kernels
from conftest import AVAILABLE, LOCAL_BACKENDS, OPTIMIZERS, assert_close_to_oracle, hard_cases, make_params

CLASSES = [sign_kernels.Lion, sign_kernels.Tiger, sign_kernels.Simba]
FLAG_KEYS = ("maximize", "foreach", "capturable", "differentiable", "fused")
# Backends maximize is checked on: the local ones, and Triton when its interpreter runs here.
MAX_BACKENDS = LOCAL_BACKENDS + (["triton"] if AVAILABLE["triton"] is None else [])


def assert_same(a, b, path="sd"):
    """Deep equality of state dicts: same keys, same types, tensors equal in dtype and value."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, path
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                     and torch.equal(a.nan_to_num(), b.nan_to_num())), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, set(a) ^ set(b) if isinstance(b, dict) else b)
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert type(a) is type(b) and a == b, (path, a, b)


def _trained(cls, backend, named=False, extra_group=False, **kw):
    case = hard_cases(torch.float32, seed=3)[4]  # sizes: empty, 1, 4097, (3, 0), (65, 63)
    params = make_params(case, torch.float32)
    hp = dict(OPTIMIZERS[cls.__name__.lower()][1], **kw)
    src = [(f"layer{i}.weight", p) for i, p in enumerate(params)] if named else params
    opt = cls(src[:3], backend=backend, **hp)
    if extra_group:
        opt.add_param_group({"params": src[3:], "lr": 0.5 * hp["lr"]})
    else:
        opt.add_param_group({"params": src[3:]})
    for grads in case.grads:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return params, opt


@pytest.mark.parametrize("backend", MAX_BACKENDS)
@pytest.mark.parametrize("named", [False, True], ids=["ids", "names"])
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_save_load_save_is_identical(cls, backend, named):
    params, opt = _trained(cls, backend, named=named, extra_group=True)
    first = copy.deepcopy(opt.state_dict())
    fresh = cls([(f"layer{i}.weight", p) for i, p in enumerate(params[:3])] if named else params[:3],
                backend=backend, **OPTIMIZERS[cls.__name__.lower()][1])
    fresh.add_param_group({"params": [(f"layer{i}.weight", p) for i, p in enumerate(params[3:], 3)] if named
                           else params[3:]})
    fresh.load_state_dict(first)
    assert_same(fresh.state_dict(), first)
    # ... and through torch.save / torch.load
    buf = io.BytesIO()
    torch.save(fresh.state_dict(), buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=True)
    fresh.load_state_dict(again)
    assert_same(fresh.state_dict(), first)
    for group in first["param_groups"]:
        assert set(FLAG_KEYS) <= set(group)  # torch's flags are group options, as in torch.optim


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_an_older_checkpoint_of_ours_loads(cls):
    """Checkpoints from before the torch flags existed: their groups lack those keys."""
    params, opt = _trained(cls, "reference")
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        for key in FLAG_KEYS:
            del group[key]
    fresh = cls(params[:3], backend="reference", **OPTIMIZERS[cls.__name__.lower()][1])
    fresh.add_param_group({"params": params[3:]})
    fresh.load_state_dict(old)
    now = fresh.state_dict()
    assert_same(now["state"], opt.state_dict()["state"])
    for group in now["param_groups"]:
        assert [group[k] for k in FLAG_KEYS] == [False, None, False, False, None]


# ------------------------------------------------------------------ torch's error order and wording
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_hyperparameters_are_checked_before_params(cls):
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        cls(None, lr=torch.tensor([1e-3, 1e-3]))
    with pytest.raises(ValueError, match="Invalid learning rate: -0.001"):
        cls(None, lr=-1e-3)
    with pytest.raises(ValueError, match="Invalid weight_decay value: -1"):
        cls(None, weight_decay=-1)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_torch_messages_for_params(cls):
    p, q = nn.Parameter(torch.randn(2)), nn.Parameter(torch.randn(2))
    with pytest.raises(TypeError, match="params argument given to the optimizer should be an iterable"):
        cls(p)
    with pytest.raises(ValueError, match="optimizer got an empty parameter list"):
        cls([])
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        cls([{"params": [p]}, {"params": [p]}])
    with pytest.raises(ValueError, match="all optimizer param groups should be with/without names"):
        cls([{"params": [p]}, {"params": [("q", q)]}])


def test_lion_betas_use_torch_wording():
    with pytest.raises(ValueError, match=r"Invalid beta parameter at index 0: 1.0 .*betas\[0\] must be in \[0, 1\)"):
        sign_kernels.Lion(None, betas=(1.0, 0.9))
    with pytest.raises(ValueError, match=r"Invalid beta parameter at index 1: -0.1"):
        sign_kernels.Lion(None, betas=(0.9, -0.1))


# ------------------------------------------------------------------ maximize
def _run(cls, backend, maximize, negate, dtype=torch.float32, scale=None, **kw):
    case = hard_cases(dtype, seed=11)[3]  # NaN and Inf grads
    params = make_params(case, dtype)
    opt = cls(params, backend=backend, maximize=maximize, **dict(OPTIMIZERS[cls.__name__.lower()][1], **kw))
    for grads in case.grads + hard_cases(dtype, seed=12)[3].grads:
        for p, g in zip(params, grads):
            g = g.clone().to(dtype)
            p.grad = -g if negate else g
            if scale is not None:
                p.grad = p.grad * scale
        if scale is not None:
            # grad_scale alone: these grads hold NaN and Inf, which GradScaler reports (found_inf
            # = 1 skips the step), while a found_inf of 0 would certify them finite and Tiger
            # would not read them for its guard (NOTE: [GradScaler's flag as the NaN guard]).
            opt.grad_scale = torch.tensor(float(scale))
        opt.step()
    return params, opt


@pytest.mark.parametrize("backend", MAX_BACKENDS)
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_maximize_is_the_step_on_minus_g(cls, backend):
    """maximize=True gives, bit for bit, the run on negated gradients (as torch.optim defines it)."""
    for dtype in (torch.float32, torch.bfloat16):
        kw = dict(stochastic_rounding=True) if dtype == torch.bfloat16 else {}
        a, oa = _run(cls, backend, True, False, dtype, **kw)
        b, ob = _run(cls, backend, False, True, dtype, **kw)
        for x, y in zip(a, b):
            assert_same(x.detach(), y.detach())
        assert_same(oa.state_dict()["state"], ob.state_dict()["state"])
        # and with a GradScaler-style scale (the scale is negated, not the gradient)
        c, _ = _run(cls, backend, True, False, dtype, scale=1024.0, **kw)
        for x, y in zip(c, a):
            assert_same(x.detach(), y.detach())
    # fp32 maximize against the fp64 oracle of the negated run
    m, _ = _run(cls, backend, True, False)
    o, _ = _run(cls, "reference", False, True, torch.float64)
    for x, y in zip(m, o):
        assert_close_to_oracle(x, y, torch.float32, steps=4, lr=OPTIMIZERS[cls.__name__.lower()][1]["lr"],
                               what=f"{cls.__name__} maximize on {backend}")


def test_maximize_moves_uphill():
    p = nn.Parameter(torch.zeros(3))
    opt = sign_kernels.Lion([p], lr=0.1, maximize=True)
    p.grad = torch.tensor([1.0, -1.0, 0.0])
    opt.step()
    assert p.tolist() == pytest.approx([0.1, -0.1, 0.0])


# ------------------------------------------------------------------ the other flags
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_flags_refused_with_the_option_to_use(cls):
    p = [nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match=r"foreach=True has no meaning here.*backend="):
        cls(p, foreach=True)
    with pytest.raises(ValueError, match=r"foreach=False has no meaning here.*backend='reference' is the per-tensor"):
        cls(p, foreach=False)
    with pytest.raises(ValueError, match=r"fused=False: the unfused per-tensor implementation is backend='reference'"):
        cls(p, fused=False)
    with pytest.raises(ValueError, match=r"differentiable=True is not supported"):
        cls(p, differentiable=True)
    with pytest.raises(ValueError, match=r"fused=True demands a fused backend"):
        cls(p, fused=True, backend="reference")
    with pytest.raises(ValueError, match=r"capturable=True needs a backend that never reads device scalars"):
        cls(p, capturable=True, backend="reference")
    with pytest.raises(ValueError, match=r"maximize must be a bool"):
        cls(p, maximize=1)
    cls(p, foreach=None, fused=None, differentiable=False, capturable=False, maximize=False)  # the defaults


@pytest.mark.skipif(AVAILABLE["cpu"] is not None, reason="needs the compiled CPU kernels")
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_fused_true_demands_a_fused_backend(cls):
    p = nn.Parameter(torch.randn(5))
    opt = cls([p], fused=True)
    p.grad = torch.randn(5)
    opt.step()
    opt.zero_grad(set_to_none=False)  # torch zeroes grads with foreach ops when fused is set
    assert torch.equal(p.grad, torch.zeros(5))
    q = nn.Parameter(torch.randn(5, dtype=torch.float64))  # only the reference takes fp64
    with pytest.raises(sign_kernels.BackendUnavailableError, match=r"param 0: fused=True, but no fused backend"):
        cls([q], fused=True)
    # set on a group later: refused at step(), before anything is written
    opt2 = cls([q])
    opt2.param_groups[0]["fused"] = True
    q.grad = torch.randn(5, dtype=torch.float64)
    q0 = q.detach().clone()
    with pytest.raises(sign_kernels.BackendUnavailableError, match="fused=True"):
        opt2.step()
    assert torch.equal(q.detach(), q0) and not opt2.state


@pytest.mark.skipif(AVAILABLE["cpu"] is not None, reason="needs the compiled CPU kernels")
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_capturable_reads_lr_from_the_device_and_changes_no_result(cls):
    a, _ = _run(cls, "cpu", False, False, capturable=True)
    b, _ = _run(cls, "cpu", False, False)
    for x, y in zip(a, b):
        assert_same(x.detach(), y.detach())
    # the lr a capturable step reads is a device tensor, filled from the group's lr
    p = nn.Parameter(torch.randn(4))
    opt = cls([p], capturable=True, backend="cpu")
    p.grad = torch.randn(4)
    opt.param_groups[0]["lr"] = 0.25
    opt.step()
    assert [float(t) for t in opt._device_scalars.values()] == [0.25]


def test_distributed_lion_refuses_the_flags_it_does_not_implement():
    from sign_kernels.distributed import DistributedLion

    p = [nn.Parameter(torch.randn(3))]
    for flag in ("maximize", "capturable"):
        opt = DistributedLion(p, backend="reference" if flag == "maximize" else "auto")
        opt.param_groups[0][flag] = True  # set on the group later: refused before anything is written
        p[0].grad = torch.randn(3)
        p0 = p[0].detach().clone()
        with pytest.raises(ValueError, match=rf"DistributedLion does not implement {flag}=True"):
            opt.step()
        assert torch.equal(p[0].detach(), p0) and not opt.state
