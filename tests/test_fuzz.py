"""A slice of the differential fuzz campaign (scripts/fuzz.py) runs in CI: every local backend
against the reference bit for bit, and the reference against fp64 (the whole campaign, 10^6
cases, is run by hand; its result is in bench/results/)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))

import fuzz  # noqa: E402


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_fuzz_slice():
    result = fuzz.campaign(cases=1920, seed=20261127, triton_every=6, progress=False)
    assert result["ok"], result
    # every batch but the 8-bit momentum / correction-byte ones (no fp64 form) meets the oracle
    assert result["cases_per_check"]["fp64_oracle"] + result["cases_per_check"]["compressed"] == 1920
    assert result["cases_per_check"]["compressed"] >= 64 * 3


def test_a_wrong_backend_is_caught(monkeypatch):
    """The comparison can fail: a Lion backend off by lr·1e-3 on every element is reported."""
    from sign_kernels import backends as B

    reference = B.get("reference")

    class Broken:
        def lion_(self, params, grads, exp_avgs, steps, lr, lr_t, beta1, beta2, weight_decay, **kw):
            reference.lion_(params, grads, exp_avgs, steps, lr, lr_t, beta1, beta2, weight_decay, **kw)
            for p in params:
                p.sub_(lr * 1e-3)  # a small bias on every element

        tiger_ = staticmethod(reference.tiger_)
        simba_ = staticmethod(reference.simba_)

    monkeypatch.setattr(B, "get", lambda name: Broken() if name == "broken" else reference)
    result = fuzz.campaign(cases=64 * 12, seed=3, backends=["broken"], progress=False)
    assert not result["ok"] and result["backend"] == "broken" and result["algo"] == "lion"
