"""Stateful property test: random sequences of public calls, good and bad.

A hypothesis ``RuleBasedStateMachine`` drives an optimizer on a local backend and, in
lockstep, a twin on the reference backend over copies of the same params. Rules: steps with
good gradients (incl. NaN, zeros, None) and bad ones (sparse, wrong shape), ``zero_grad``, a
scheduler step, ``add_param_group`` (good and bad), checkpoint and restore, loading foreign
and corrupted state dicts. Invariants: a call that raises changes nothing (params, state,
groups, dtypes), and the trajectory equals the reference twin's (Lion and Simba bit for bit;
Tiger within a few ulps, its RMS sums differ in order).
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from torch import nn

import sign_kernels
from conftest import LOCAL_BACKENDS
from test_checkpoints import _corrupt, assert_unchanged, snapshot

CLASSES = {"Lion": sign_kernels.Lion, "Tiger": sign_kernels.Tiger, "Simba": sign_kernels.Simba}
HP = {
    "Lion": st.fixed_dictionaries({"lr": st.sampled_from([1e-3, 0.05]), "betas": st.sampled_from([(0.9, 0.99), (0.5, 0.5), (0.0, 0.9)]),
                                   "weight_decay": st.sampled_from([0.0, 0.1])}),
    "Tiger": st.fixed_dictionaries({"lr": st.sampled_from([1e-3, 0.05]), "beta": st.sampled_from([0.9, 0.5]),
                                    "grad_accum_steps": st.sampled_from([1, 2, 3]), "weight_decay": st.sampled_from([0.0, 0.01])}),
    "Simba": st.fixed_dictionaries({"lr": st.sampled_from([1e-3, 0.05]), "window_size": st.sampled_from([2, 8, 128]),
                                    "threshold": st.sampled_from([0.0, 0.25, 1.0]), "weight_decay": st.sampled_from([0.0, 0.1])}),
}
BAD_OPTIONS = [{"lr": -1.0}, {"lr": float("nan")}, {"backend": "gpu"}, {"weight_decay": -0.5}, {"seed": "x"},
               {"maximize": "yes"}, {"fused": False}, {"foreach": True}]
SHAPES = [(5,), (3, 4), (1,), (0,), (2, 0), (7, 3)]


class OptimizerMachine(RuleBasedStateMachine):
    @initialize(name=st.sampled_from(sorted(CLASSES)), backend=st.sampled_from(LOCAL_BACKENDS), data=st.data())
    def setup(self, name, backend, data):
        self.cls, self.name, self.backend = CLASSES[name], name, backend
        self.hp = data.draw(HP[name])
        self.gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
        shapes = data.draw(st.lists(st.sampled_from(SHAPES), min_size=1, max_size=3))
        self.params = [nn.Parameter(torch.randn(s, generator=self.gen)) for s in shapes]
        self.twins = [nn.Parameter(p.detach().clone()) for p in self.params]
        self.opt = self.cls(self.params, backend=backend, **self.hp)
        self.ref = self.cls(self.twins, backend="reference", **self.hp)
        self.saved = None

    # ------------------------------------------------------------------ helpers
    def _grad(self, p, kind):
        g = torch.randn(p.shape, generator=self.gen)
        if kind == "zeros":
            g = torch.zeros_like(g)
        elif kind == "nan" and g.numel():
            g.view(-1)[0] = float("nan")
        elif kind == "inf" and g.numel():
            g.view(-1)[-1] = float("-inf")
        return g

    def _failing(self, call, exc=(ValueError, RuntimeError, TypeError)):
        snap, tsnap = snapshot(self.opt, self.params), snapshot(self.ref, self.twins)
        try:
            call()
        except exc:
            assert_unchanged(self.opt, self.params, snap)
            assert_unchanged(self.ref, self.twins, tsnap)
            return
        raise AssertionError("the call should have raised")

    # ------------------------------------------------------------------ rules
    @rule(kinds=st.lists(st.sampled_from(["normal", "normal", "zeros", "nan", "inf", "none"]), min_size=6, max_size=6))
    def step(self, kinds):
        for p, t, kind in zip(self.params, self.twins, kinds):
            if kind == "none":
                p.grad = t.grad = None
            else:
                p.grad = self._grad(p, kind)
                t.grad = p.grad.clone()
        self.opt.step()
        self.ref.step()

    @rule(which=st.sampled_from(["sparse", "shape", "int"]))
    def bad_step(self, which):
        good = [p for p in self.params if p.numel()]
        if not good:
            return
        for p, t in zip(self.params, self.twins):
            p.grad = self._grad(p, "normal")
            t.grad = p.grad.clone()
        p = good[-1]
        t = self.twins[[id(x) for x in self.params].index(id(p))]
        for x in (p, t):
            if which == "sparse":
                x.grad = x.grad.to_sparse()
            elif which == "shape":
                x.grad.data = torch.randn(x.numel() + 1)
            else:
                x.grad.data = torch.ones(x.shape, dtype=torch.int32)
        self._failing(self.opt.step)
        self._failing(self.ref.step)
        for x in self.params + self.twins:
            x.grad = None

    @rule(set_to_none=st.booleans())
    def zero_grad(self, set_to_none):
        self.opt.zero_grad(set_to_none=set_to_none)
        self.ref.zero_grad(set_to_none=set_to_none)

    @rule(gamma=st.sampled_from([0.5, 0.9]))
    def scheduler_step(self, gamma):
        for opt in (self.opt, self.ref):
            torch.optim.lr_scheduler.ExponentialLR(opt, gamma).step()

    @precondition(lambda self: len(self.params) < 6)
    @rule(shape=st.sampled_from(SHAPES), lr=st.sampled_from([None, 0.01]))
    def add_group(self, shape, lr):
        p = nn.Parameter(torch.randn(shape, generator=self.gen))
        t = nn.Parameter(p.detach().clone())
        extra = {} if lr is None else {"lr": lr}
        self.opt.add_param_group(dict(params=[p], **extra))
        self.ref.add_param_group(dict(params=[t], **extra, backend="reference"))
        self.params.append(p)
        self.twins.append(t)

    @rule(bad=st.sampled_from(BAD_OPTIONS), shape=st.sampled_from(SHAPES))
    def add_bad_group(self, bad, shape):
        p = nn.Parameter(torch.randn(shape, generator=self.gen))
        self._failing(lambda: self.opt.add_param_group(dict(params=[p], **bad)))

    @rule()
    def checkpoint(self):
        self.saved = (copy.deepcopy(self.opt.state_dict()), copy.deepcopy(self.ref.state_dict()),
                      [p.detach().clone() for p in self.params], [t.detach().clone() for t in self.twins])

    @precondition(lambda self: self.saved is not None)
    @rule()
    def restore(self):
        sd, tsd, values, tvalues = self.saved
        if len(sd["param_groups"]) != len(self.opt.param_groups):
            # groups were added since: the layout differs and the load must fail, changing nothing
            self._failing(lambda: self.opt.load_state_dict(copy.deepcopy(sd)))
            return
        self.opt.load_state_dict(copy.deepcopy(sd))
        self.ref.load_state_dict(copy.deepcopy(tsd))
        with torch.no_grad():
            for p, v in zip(self.params, values):
                p.copy_(v)
            for t, v in zip(self.twins, tvalues):
                t.copy_(v)

    @rule(kind=st.sampled_from(["adamw", "other_sign"]))
    def load_foreign(self, kind):
        params = [nn.Parameter(p.detach().clone()) for p in self.params]
        groups = [dict(params=params[sum(len(g["params"]) for g in self.opt.param_groups[:i]):][:len(g["params"])])
                  for i, g in enumerate(self.opt.param_groups)]
        if kind == "adamw":
            other = torch.optim.AdamW(groups)
        else:
            other = (sign_kernels.Simba if self.cls is not sign_kernels.Simba else sign_kernels.Lion)(groups)
        for p in params:
            p.grad = torch.ones_like(p)
        other.step()
        self._failing(lambda: self.opt.load_state_dict(other.state_dict()), ValueError)

    @precondition(lambda self: bool(self.opt.state))
    @rule(how=st.sampled_from(["missing_state_key", "wrong_shape", "negative_step", "unknown_param_id",
                               "extra_group", "bad_hparam", "not_a_state_dict"]))
    def load_corrupted(self, how):
        bad = _corrupt(self.opt.state_dict(), how, self.opt._state_key)
        self._failing(lambda: self.opt.load_state_dict(bad), ValueError)

    # ------------------------------------------------------------------ invariant
    @invariant()
    def same_trajectory_as_the_reference(self):
        if not hasattr(self, "params"):
            return
        for p, t in zip(self.params, self.twins):
            if self.cls is sign_kernels.Tiger:
                torch.testing.assert_close(p.detach(), t.detach(), rtol=2e-6, atol=1e-7, equal_nan=True)
            else:
                assert torch.equal(p.detach().nan_to_num(), t.detach().nan_to_num())
                assert torch.equal(p.detach().isnan(), t.detach().isnan())


pytestmark = pytest.mark.filterwarnings(r"ignore:Detected call of .lr_scheduler.step\(\).:UserWarning")

OptimizerMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=15, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestOptimizerMachine = OptimizerMachine.TestCase
