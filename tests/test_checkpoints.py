"""Calls that fail change nothing; other optimizers' checkpoints are refused and say what they are;
``load_momentum`` is the explicit migration."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sign_kernels
from conftest import LOCAL_BACKENDS, OPTIMIZERS
from test_conventions import assert_same

CLASSES = [sign_kernels.Lion, sign_kernels.Tiger, sign_kernels.Simba]


def snapshot(opt, params):
    """Everything a failed call must leave as it was: groups (all keys), state (dtypes too), params."""
    groups = [{k: (list(v) if k == "params" else copy.deepcopy(v)) for k, v in g.items()} for g in opt.param_groups]
    state = {id(p): copy.deepcopy(s) for p, s in opt.state.items()}
    return groups, state, [p.detach().clone() for p in params]


def assert_unchanged(opt, params, snap):
    groups, state, values = snap
    assert len(opt.param_groups) == len(groups)
    for g, s in zip(opt.param_groups, groups):
        assert set(g) == set(s)
        for k in g:
            if k == "params":
                assert [id(p) for p in g[k]] == [id(p) for p in s[k]]
            else:
                assert_same(g[k], s[k], k)
    assert {id(p) for p in opt.state} == set(state)
    for p, st in opt.state.items():
        assert_same(st, state[id(p)])
    for p, v in zip(params, values):
        assert_same(p.detach(), v)


def trained(cls, backend="reference", steps=2, dtype=torch.float32, **kw):
    params = [nn.Parameter(torch.randn(6, dtype=dtype)), nn.Parameter(torch.randn(2, 3, dtype=dtype))]
    opt = cls(params, backend=backend, **dict(OPTIMIZERS[cls.__name__.lower()][1], **kw))
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return params, opt


BAD_GROUPS = [
    (lambda q: {"params": [q], "lr": "x"}, ValueError, r"param group 1: lr must be a finite float"),
    (lambda q: {"params": [q], "lr": -1.0}, ValueError, r"Invalid learning rate: -1.0"),
    (lambda q: {"params": [q], "backend": "gpu"}, ValueError, r"param group 1: backend must be one of"),
    (lambda q: {"params": [q], "seed": 1.5}, ValueError, r"param group 1: seed must be an int"),
    (lambda q: {"params": [q], "foreach": True}, ValueError, r"param group 1: foreach=True has no meaning"),
    (lambda q: {"params": [torch.zeros(3, dtype=torch.int32)]}, ValueError, r"param 0 has dtype torch.int32"),
    (lambda q: {"params": [q, q.new_zeros(2).requires_grad_()], "backend": "cuda"},
     sign_kernels.BackendUnavailableError, r"backend=\"cuda\""),
    (lambda q: [q], TypeError, r"param_group must be a dict"),
]


@pytest.mark.parametrize("make,exc,match", BAD_GROUPS, ids=[str(i) for i in range(len(BAD_GROUPS))])
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_failed_add_param_group_changes_nothing(cls, make, exc, match):
    params, opt = trained(cls)
    q = nn.Parameter(torch.randn(4))
    group = make(q)
    before = copy.copy(group)
    snap = snapshot(opt, params)
    with pytest.raises(exc, match=match):
        opt.add_param_group(group)
    assert_unchanged(opt, params, snap)
    if isinstance(group, dict):
        assert group == before  # the caller's dict is as it was passed (torch would fill in defaults)
    # and the optimizer still steps exactly like an untouched twin
    twin_params = [nn.Parameter(p.detach().clone()) for p in params]
    twin = cls(twin_params, backend="reference", **OPTIMIZERS[cls.__name__.lower()][1])
    twin.load_state_dict(opt.state_dict())
    for p, t in zip(params, twin_params):
        p.grad = torch.randn_like(p)
        t.grad = p.grad.clone()
    opt.step()
    twin.step()
    for p, t in zip(params, twin_params):
        assert torch.equal(p.detach(), t.detach())


def test_duplicate_param_in_a_new_group_changes_nothing():
    params, opt = trained(sign_kernels.Lion)
    snap = snapshot(opt, params)
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        opt.add_param_group({"params": [params[0]]})
    assert_unchanged(opt, params, snap)


def _foreign(kind, params):
    if kind == "adamw":
        o = torch.optim.AdamW(params)
    elif kind == "sgd":
        o = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    else:
        cls = {"lion": sign_kernels.Lion, "tiger": sign_kernels.Tiger, "simba": sign_kernels.Simba}[kind]
        o = cls(params, backend="reference")
    for p in params:
        p.grad = torch.randn_like(p)
    o.step()
    return o.state_dict()


FOREIGN = {
    sign_kernels.Lion: {"adamw": "Adam/AdamW", "sgd": "SGD", "tiger": "a Tiger state dict",
                        "simba": "a Simba state dict"},
    sign_kernels.Tiger: {"adamw": "Adam/AdamW", "sgd": "SGD", "lion": "a Lion state dict",
                         "simba": "a Simba state dict"},
    sign_kernels.Simba: {"adamw": "Adam/AdamW", "sgd": "SGD", "lion": "a Lion state dict",
                         "tiger": "a Tiger state dict"},
}


@pytest.mark.parametrize("cls,kind", [(c, k) for c, kinds in FOREIGN.items() for k in kinds],
                         ids=lambda v: v.__name__ if isinstance(v, type) else v)
def test_foreign_checkpoints_are_refused_and_change_nothing(cls, kind):
    params, opt = trained(cls)
    foreign = _foreign(kind, [nn.Parameter(p.detach().clone()) for p in params])
    snap = snapshot(opt, params)
    with pytest.raises(ValueError, match=rf"{cls.__name__}.load_state_dict: this is .*{FOREIGN[cls][kind]}.*"
                                         rf"not a {cls.__name__} checkpoint.*Nothing was loaded"):
        opt.load_state_dict(foreign)
    assert_unchanged(opt, params, snap)
    # the message points at the migration where one exists
    if cls is not sign_kernels.Simba and kind != "simba" and kind != "sgd":
        with pytest.raises(ValueError, match=r"sign_kernels.load_momentum\(optimizer, state_dict\)"):
            opt.load_state_dict(foreign)


def _corrupt(sd, how, state_key):
    sd = copy.deepcopy(sd)
    first = next(iter(sd["state"]))
    if how == "missing_state_key":
        del sd["state"][first][state_key]
    elif how == "wrong_shape":
        buf = sd["state"][first][state_key]
        sd["state"][first][state_key] = torch.zeros(buf.numel() + 1, dtype=buf.dtype)  # never the param's shape
    elif how == "negative_step":
        sd["state"][first]["step"] = torch.tensor(-2)
    elif how == "fractional_step":
        sd["state"][first]["step"] = 1.5
    elif how == "int_momentum":
        sd["state"][first][state_key] = sd["state"][first][state_key].to(torch.int32)
        if state_key == "sign_counts":
            sd["state"][first][state_key] = torch.full_like(sd["state"][first][state_key], 0.5, dtype=torch.float32)
    elif how == "unknown_param_id":
        sd["state"][99] = sd["state"][first]
    elif how == "extra_group":
        sd["param_groups"].append(dict(sd["param_groups"][0], params=[]))
    elif how == "short_group":
        sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:1]
    elif how == "bad_hparam":
        sd["param_groups"][0]["lr"] = -3.0
    elif how == "not_a_state_dict":
        return {"model": sd}
    elif how == "state_not_dicts":
        sd["state"][first] = [1, 2]
    return sd


CORRUPTIONS = {
    "missing_state_key": r"param group 0, param 0 \(id 0\): its state has no tensor",
    "wrong_shape": r"has shape \(7,\), the parameter \(6,\)",
    "negative_step": r"'step' must be a whole number >= 0, got -2",
    "fractional_step": r"'step' must be a whole number >= 0, got 1.5",
    "int_momentum": r"must be a floating-point \(or int8: 8-bit momentum\) tensor|must hold whole numbers",
    "unknown_param_id": r"state for param 99, which none of its param groups lists",
    "extra_group": r"different number of parameter groups .*checkpoint has 2, this optimizer has 1",
    "short_group": r"doesn't match the size of optimizer's group .*param group 0 has 1 params in the checkpoint, 2 here",
    "bad_hparam": r"Invalid learning rate: -3.0",
    "not_a_state_dict": r"expected what optimizer.state_dict\(\) returns",
    "state_not_dicts": r"'state' must map parameter ids to dicts",
}


@pytest.mark.parametrize("how", list(CORRUPTIONS))
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_corrupted_checkpoints_are_refused_and_change_nothing(cls, how):
    params, opt = trained(cls)
    sd = _corrupt(opt.state_dict(), how, opt._state_key)
    other_params, other = trained(cls, steps=3)  # a different state, which must survive the failed load
    snap = snapshot(other, other_params)
    with pytest.raises(ValueError, match=CORRUPTIONS[how]):
        other.load_state_dict(sd)
    assert_unchanged(other, other_params, snap)


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_names_as_state_keys_load_by_position(cls, backend):
    """torch.distributed.checkpoint hands optimizers state keyed by parameter names."""
    params, opt = trained(cls, backend, dtype=torch.bfloat16, stochastic_rounding=True,
                          **({} if cls is sign_kernels.Simba else dict(momentum_dtype=torch.float32)))
    sd = opt.state_dict()
    names = ["a.weight", "b.weight"]
    by_name = {"state": {names[i]: v for i, v in sd["state"].items()},
               "param_groups": [dict(g, params=names) for g in sd["param_groups"]]}
    fresh = cls(params, backend=backend, **OPTIMIZERS[cls.__name__.lower()][1])
    fresh.load_state_dict(by_name)
    assert_same(fresh.state_dict()["state"], sd["state"])


@pytest.mark.parametrize("cls", [sign_kernels.Lion, sign_kernels.Tiger], ids=lambda c: c.__name__)
@pytest.mark.parametrize("source", ["adamw", "lion", "tiger"])
def test_load_momentum_migrates_exp_avg_keeping_our_hyperparameters(cls, source):
    params, opt = trained(cls, lr=0.123)
    src_params = [nn.Parameter(p.detach().clone()) for p in params]
    foreign = _foreign(source, src_params)
    sign_kernels.load_momentum(opt, foreign)
    for i, p in enumerate(params):
        assert torch.equal(opt.state[p]["exp_avg"], foreign["state"][i]["exp_avg"].to(p.dtype))
        assert int(opt.state[p]["step"]) == 0
    assert opt.param_groups[0]["lr"] == 0.123


def test_load_momentum_refusals_change_nothing():
    params, opt = trained(sign_kernels.Simba)
    with pytest.raises(ValueError, match=r"Simba keeps no float momentum"):
        sign_kernels.load_momentum(opt, _foreign("adamw", [nn.Parameter(p.detach().clone()) for p in params]))
    params, opt = trained(sign_kernels.Lion)
    snap = snapshot(opt, params)
    bad = _foreign("adamw", [nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(3, 2))])  # wrong shape
    with pytest.raises(ValueError, match=r"param group 0, param 1: 'exp_avg' has shape \(3, 2\), the parameter \(2, 3\)"):
        sign_kernels.load_momentum(opt, bad)
    assert_unchanged(opt, params, snap)
    with pytest.raises(ValueError, match=r"holds no 'exp_avg' for any parameter"):
        sign_kernels.load_momentum(opt, _foreign("sgd", [nn.Parameter(p.detach().clone()) for p in params]))
    assert_unchanged(opt, params, snap)


def test_lion_pytorch_checkpoint_still_loads_with_current_options():
    p = nn.Parameter(torch.randn(10))
    m = torch.randn(10)
    sd = {"state": {0: {"exp_avg": m.clone()}},
          "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.99), "weight_decay": 0.0, "params": [0]}]}
    opt = sign_kernels.Lion([p], backend="reference", seed=7)
    opt.load_state_dict(sd)
    assert torch.equal(opt.state[p]["exp_avg"], m) and int(opt.state[p]["step"]) == 0
    g = opt.param_groups[0]
    assert g["lr"] == 1e-3 and g["backend"] == "reference" and g["seed"] == 7  # saved options win, the rest stay


def test_failed_step_and_construction_change_nothing():
    params, opt = trained(sign_kernels.Lion)
    snap = snapshot(opt, params)
    params[0].grad = torch.randn(6)
    params[1].grad = torch.randn(2, 3).to_sparse()
    with pytest.raises(RuntimeError, match="param 1 has a sparse gradient"):
        opt.step()
    assert_unchanged(opt, params, snap)
    user_group = {"params": [params[0]], "lr": -1.0}
    with pytest.raises(ValueError, match="Invalid learning rate"):
        sign_kernels.Lion([user_group])
