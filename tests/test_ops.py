"""The ops as torch.library sees them: opcheck (schema, fake kernel, autograd registration)."""

from __future__ import annotations

import pytest
import torch

import sign_kernels  # noqa: F401  (declares the ops and loads the kernels)
from conftest import needs_cpu


def _lists(n=3, dtype=torch.float32, counters=False):
    sizes = [5, 64, 1]
    params = [torch.randn(s, dtype=dtype) for s in sizes[:n]]
    grads = [torch.randn(s, dtype=dtype) for s in sizes[:n]]
    state = [torch.zeros(s, dtype=torch.int16 if counters else dtype) for s in sizes[:n]]
    steps = [torch.tensor(i, dtype=torch.int64) for i in range(n)]
    return params, grads, state, steps


CASES = {
    "lion_": lambda: (*_lists(), 1e-3, None, 0.9, 0.99, 0.1, None, None, [1, 2, 3], False),
    "lion_sr_tensor_lr": lambda: (*_lists(dtype=torch.bfloat16), 0.0, torch.tensor(1e-2), 0.9, 0.99, 0.1,
                                  torch.tensor(4.0), torch.tensor(0.0), [1, 2, 3], True),
    "tiger_": lambda: (*_lists(), [0, 3, 1], 1e-3, None, 0.965, 0.01, 2, 0.99, None, None, [1, 2, 3], False),
    "simba_": lambda: (*_lists(counters=True), 1e-3, None, 128, 12, 0.0, None, None, [1, 2, 3], False),
}


@needs_cpu
@pytest.mark.parametrize("case", sorted(CASES))
def test_opcheck_cpu(case):
    name = case if case.endswith("_") else case.split("_")[0] + "_"
    torch.library.opcheck(getattr(torch.ops.sign_kernels, name).default, CASES[case]())


def test_schemas_declare_mutation():
    for name in ("lion_", "tiger_", "simba_"):
        schema = getattr(torch.ops.sign_kernels, name).default._schema
        mutated = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        # Tiger also writes the sums of squares out (NOTE: [Tiger sums of squares out]); Lion and
        # Tiger write 8-bit momentum's scales and the correction bytes (NOTE: [8-bit momentum and
        # the correction byte]).
        compressed = ["exp_avg_scales", "residuals"]
        want = {"lion_": ["params", "exp_avgs"] + compressed, "tiger_": ["params", "exp_avgs", "sumsq_out"] + compressed,
                "simba_": ["params", "sign_counts"]}[name]
        assert mutated == want, (name, mutated)
        assert not schema.returns


@needs_cpu
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_op_runs_on_torch_threads(threads):
    # The op's parallel loop is torch::stable::parallel_for (libtorch's own loop); the ATen
    # one it replaced ran serially when the binding was compiled without OpenMP, and nothing
    # else noticed (NOTE: [OpenMP in the binding] in setup.py): this guards the thread count.
    import os

    from sign_kernels import _C

    want = min(threads, os.cpu_count() or 1)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert _C.cpu_threads_used(64) == want
        assert _C.cpu_threads_used(1) == 1
    finally:
        torch.set_num_threads(before)


def _threaded_run(make_opt, threads: int, steps: int = 3):
    torch.manual_seed(0)
    shapes = [(300, 700), (70_000,), (5,), (1000, 64), (129, 513), (3000, 64), (2, 70_000)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        opt = make_opt(params)
        for k in range(steps):
            gen = torch.Generator().manual_seed(k)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            params[3].grad[7, 3] = float("nan") if k == 1 else params[3].grad[7, 3]  # Tiger's guard, one step
            opt.step()
    finally:
        torch.set_num_threads(before)
    return [p.detach().clone() for p in params] + [
        v.clone() for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.numel() > 1]


@needs_cpu
@pytest.mark.parametrize("algo", ["lion", "tiger", "simba"])
def test_cpu_results_do_not_depend_on_thread_count(algo):
    # Tensors of several 64K-element work items, small ones sharing items, an embedding
    # with per-row RMS: the thread split changes, the bits must not.
    from sign_kernels import Lion, Simba, Tiger

    def make(params):
        if algo == "lion":
            return Lion(params, lr=1e-2, weight_decay=0.1, backend="cpu")
        if algo == "simba":
            return Simba(params, lr=1e-2, window_size=4, threshold=0.5, weight_decay=0.1, backend="cpu")
        # Embeddings: rows within one chunk, rows across several chunks, rows longer than a chunk.
        groups = [{"params": params[:3]}, {"params": [params[3], params[5], params[6]], "role": "embedding"},
                  {"params": [params[4]], "role": "matrix"}]
        return Tiger(groups, lr=1e-2, backend="cpu")

    one = _threaded_run(make, 1)
    for threads in (2, 3):
        other = _threaded_run(make, threads)
        for a, b in zip(one, other):
            assert torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(a.nan_to_num(), b.nan_to_num())
