"""The compiled CUDA kernels (csrc/cuda, csrc/torch/cuda_ops.cu) against the reference backend.

Skipped without a GPU or without the compiled CUDA op. What is checked:

* bit-identity with the reference backend on the same storage dtypes (it computes in fp32
  "opmath" in the kernels' operation order, with the same stochastic-rounding bits): Lion and
  Simba exactly, Tiger's momentum exactly and θ to the effect of the RMS summation order;
* the fp64 oracle (reference on fp64 copies): every element within the storage rounding,
  except sign flips where the sign argument is within rounding of 0 -- counted and bounded;
* sizes around packs (8 elements) and chunks (65536), misaligned views, thousands of
  tensors (several launches), NaN/Inf grads, exact zeros and cancellations;
* bit-identity with the compiled CPU op (fp32, bf16 with SR), opcheck, CUDA-graph replay,
  GradScaler's found_inf, and one tensor of more than 2^31 elements (large_memory);
* clipping inside the step (NOTE: [clipping inside the step] in sign_kernels/_ops.py): a given
  ``clip`` is bit for bit the step on ``(g / grad_scale) * clip`` rounded to fp32 (what
  ``g.mul_(clip)`` leaves in fp32 grads), Tiger's NaN guard included; ``sumsq_`` within 1e-12 of
  an fp64 sum, the same bits whatever the companions, NaN/inf/empty, CUDA-graph capture;
* 8-bit momentum and the correction byte (NOTE: [CUDA row blocks] in csrc/cuda/compressed.cuh): codes,
  block scales, residuals and θ bit for bit with the reference (Tiger given the reference's sums of
  squares; with its own, the momentum bit for bit), ragged last blocks, all-zero blocks, outliers,
  NaN/Inf grads, Tiger's k > 1 and NaN guard, GradScaler's arguments, clip, misaligned views, sums
  out equal to a sums-only call, graph replay, and the optimizers with backend="cuda".
"""

from __future__ import annotations

import pytest
import torch

import sign_kernels
from sign_kernels import _ops
from sign_kernels.backends import reference as ref

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(not _ops.has_kernel("lion_", "CUDA") or not getattr(
        getattr(sign_kernels.backends, "_C", None), "cuda_compiled", lambda: False)(),
        reason="sign_kernels._C was built without the CUDA kernels"),
]

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
CHUNK = 1 << 16
SIZES = [0, 1, 3, 8, 9, 4095, 4097, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 5]
# (param, grad, state) combinations the kernels take.
LION_DTYPES = [
    (F32, F32, F32), (F32, F32, BF16),
    (BF16, BF16, BF16), (BF16, F32, BF16), (BF16, BF16, F32), (BF16, F32, F32),
    (F16, F16, F16), (F16, F32, F16), (F16, F16, F32), (F16, F32, F32), (F16, F16, BF16), (F16, F32, BF16),
]
SIMBA_DTYPES = [(F32, F32), (BF16, BF16), (BF16, F32), (F16, F16), (F16, F32)]
OPS = ("lion_", "tiger_", "simba_")


def op(name):
    return getattr(torch.ops.sign_kernels, name)


def ref_fn(name):
    return getattr(ref, name)


# ------------------------------------------------------------------ values
def hard_values(n: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Values in every binade the dtype holds, random signs, ~1/8 exact zeros (CPU fp32)."""
    lo, hi = {F32: (-149, 127), BF16: (-133, 127), F16: (-24, 15)}[dtype]
    hi = min(hi, 20)  # keep |θ| such that lr-sized steps still show
    e = torch.randint(lo, hi + 1, (n,), generator=gen).to(torch.float64)
    mant = 1.0 + torch.rand(n, generator=gen, dtype=torch.float64)
    x = torch.ldexp(mant, e)
    x = torch.where(torch.rand(n, generator=gen) < 0.5, -x, x)
    x = torch.where(torch.rand(n, generator=gen) < 0.125, torch.zeros_like(x), x)
    return x.to(dtype)


def normal_values(n: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(n, generator=gen).to(dtype)


def make_tensors(shapes, pdt, gdt, sdt, *, seed=0, hard=True, counters=False, device="cuda"):
    gen = torch.Generator().manual_seed(seed)
    vals = hard_values if hard else normal_values
    ps, gs, ss = [], [], []
    for shape in shapes:
        n = 1
        for d in shape:
            n *= d
        p = vals(n, gen, pdt)
        g = vals(n, gen, gdt)
        if counters:
            s = torch.randint(-20, 21, (n,), generator=gen, dtype=torch.int16)
        else:
            s = vals(n, gen, sdt)
            if n:
                # m = -g exactly on some elements: with beta1 = 0.5 the sign argument cancels to 0.
                tie = torch.rand(n, generator=gen) < 0.125
                s = torch.where(tie, (-g.float()).to(sdt), s)
        ps.append(p.reshape(shape).to(device))
        gs.append(g.reshape(shape).to(device))
        ss.append(s.reshape(shape).to(device))
    return ps, gs, ss


def hyper(name, shapes, **over):
    if name == "lion_":
        h = dict(lr=1e-2, lr_t=None, beta1=0.9, beta2=0.99, weight_decay=0.1)
    elif name == "tiger_":
        roles = [tiger_role(s, i) for i, s in enumerate(shapes)]
        h = dict(roles=roles, lr=1e-2, lr_t=None, beta=0.965, weight_decay=0.01, grad_accum_steps=1,
                 shrink_ratio=0.99)
    else:
        h = dict(lr=1e-2, lr_t=None, window_size=16, threshold_count=4, weight_decay=0.1)
    h.update(over)
    return h


def tiger_role(shape, i):
    if len(shape) >= 2:
        return (ref.ROLE_EMBEDDING, ref.ROLE_MATRIX)[i % 2]
    return (ref.ROLE_MATRIX, ref.ROLE_ELEMENTWISE, ref.ROLE_GAIN)[i % 3]


def state_name(name):
    return "sign_counts" if name == "simba_" else "exp_avgs"


def call(fn, name, ps, gs, ss, steps, h, *, grad_scale=None, found_inf=None, seeds=None, sr=False, clip=None):
    seeds = list(seeds) if seeds is not None else [(1000003 * i + 17) & 0xFFFFFFFF for i in range(len(ps))]
    extra = {} if clip is None else {"clip": clip}  # omitted, as the callers without clipping do
    fn(params=ps, grads=gs, steps=steps, grad_scale=grad_scale, found_inf=found_inf, seeds=seeds,
       stochastic_rounding=sr, **{state_name(name): ss}, **h, **extra)


def clone(ts, **kw):
    return [t.detach().clone().to(**kw) if kw else t.detach().clone() for t in ts]


def steps_of(n, t=0, device="cuda"):
    return [torch.full((), t, dtype=torch.int64, device=device) for _ in range(n)]


def assert_same(a, b, what):
    for i, (x, y) in enumerate(zip(a, b)):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}[{i}]: {m}")


def run_both(name, shapes, pdt, gdt, sdt, *, t=0, sr=False, hard=True, seed=0, grad_scale=None, lr_t=None,
             nonfinite=False, **over):
    counters = name == "simba_"
    ps, gs, ss = make_tensors(shapes, pdt, gdt, sdt, seed=seed, hard=hard, counters=counters)
    if nonfinite:
        for g in gs:
            if g.numel() >= 3:
                flat = g.view(-1)
                flat[0], flat[1], flat[-1] = float("nan"), float("inf"), float("-inf")
    h = hyper(name, shapes, lr_t=lr_t, **over)
    ps_r, gs_r, ss_r = clone(ps), clone(gs), clone(ss)
    call(op(name), name, ps, gs, ss, steps_of(len(ps), t), h, grad_scale=grad_scale, sr=sr)
    call(ref_fn(name), name, ps_r, gs_r, ss_r, steps_of(len(ps), t), h, grad_scale=grad_scale, sr=sr)
    return (ps, ss), (ps_r, ss_r)


SHAPES = [(n,) for n in SIZES] + [(3, 7), (2, 3, 5), (64, 48), (9, 4100)]


# ------------------------------------------------------------------ bit-identity with the reference
@pytest.mark.parametrize("dtypes", LION_DTYPES, ids=lambda d: "-".join(str(x).split(".")[1] for x in d))
@pytest.mark.parametrize("sr", [False, True], ids=["rne", "sr"])
def test_lion_matches_reference_bitwise(dtypes, sr):
    (ps, ss), (ps_r, ss_r) = run_both("lion_", SHAPES, *dtypes, sr=sr)
    assert_same(ps, ps_r, "params")
    assert_same(ss, ss_r, "exp_avgs")


@pytest.mark.parametrize("dtypes", SIMBA_DTYPES, ids=lambda d: "-".join(str(x).split(".")[1] for x in d))
@pytest.mark.parametrize("sr", [False, True], ids=["rne", "sr"])
def test_simba_matches_reference_bitwise(dtypes, sr):
    (ps, ss), (ps_r, ss_r) = run_both("simba_", SHAPES, dtypes[0], dtypes[1], torch.int16, sr=sr)
    assert_same(ps, ps_r, "params")
    assert_same(ss, ss_r, "sign_counts")


def tiger_param_tol(dtype):
    # rms = sqrt(sumsq / n) is summed in another order than the reference's: it may differ by
    # one fp32 ulp, which moves lr_p by 2^-24 relative and may flip one rounding of θ.
    return dict(rtol={F32: 2.0**-21, BF16: 2.0**-7, F16: 2.0**-10}[dtype], atol=1e-7, equal_nan=True)


@pytest.mark.parametrize("dtypes", LION_DTYPES, ids=lambda d: "-".join(str(x).split(".")[1] for x in d))
@pytest.mark.parametrize("t,k", [(0, 1), (0, 4), (3, 4), (5, 4)])
def test_tiger_matches_reference(dtypes, t, k):
    (ps, ss), (ps_r, ss_r) = run_both("tiger_", SHAPES, *dtypes, t=t, sr=True, grad_accum_steps=k)
    assert_same(ss, ss_r, "exp_avgs")
    for i, (a, b) in enumerate(zip(ps, ps_r)):
        torch.testing.assert_close(a, b, **tiger_param_tol(dtypes[0]), msg=lambda m: f"params[{i}]: {m}")


@pytest.mark.parametrize("dtypes", [(F32, F32, F32), (BF16, F32, F32), (F16, F16, F32)])
def test_tiger_nan_guard(dtypes):
    shapes = [(5, 7), (4097,), (3, 9000), (300,)]
    ps, gs, ss = make_tensors(shapes, *dtypes, hard=False)
    gs[0].view(-1)[17] = float("nan")  # whole tensor 0 shrinks
    gs[2].view(-1)[-1] = float("nan")  # whole tensor 2 shrinks (NaN in its last chunk)
    h = hyper("tiger_", shapes, roles=[ref.ROLE_GAIN, ref.ROLE_MATRIX, ref.ROLE_EMBEDDING, ref.ROLE_ELEMENTWISE])
    ps_r, gs_r, ss_r = clone(ps), clone(gs), clone(ss)
    m0 = clone(ss)
    call(op("tiger_"), "tiger_", ps, gs, ss, steps_of(4), h)
    call(ref.tiger_, "tiger_", ps_r, gs_r, ss_r, steps_of(4), h)
    assert torch.equal(ss[0], m0[0]) and torch.equal(ss[2], m0[2])  # momentum untouched
    assert not torch.equal(ss[1], m0[1])
    assert_same(ss, ss_r, "exp_avgs")
    for i, (a, b) in enumerate(zip(ps, ps_r)):
        torch.testing.assert_close(a, b, **tiger_param_tol(dtypes[0]), msg=lambda m: f"params[{i}]: {m}")


@pytest.mark.parametrize("name", OPS)
def test_nonfinite_grads_and_grad_scale(name):
    scale = torch.tensor(1024.0, device="cuda")
    sdt = torch.int16 if name == "simba_" else F32
    (ps, ss), (ps_r, ss_r) = run_both(name, SHAPES[:8], F32, F32, sdt, nonfinite=True, grad_scale=scale)
    if name == "tiger_":
        assert_same(ss, ss_r, "state")
        for a, b in zip(ps, ps_r):
            torch.testing.assert_close(a, b, **tiger_param_tol(F32))
    else:
        assert_same(ps, ps_r, "params")
        assert_same(ss, ss_r, "state")


@pytest.mark.parametrize("name", OPS)
def test_device_lr_tensor(name):
    lr_t = torch.tensor(3e-3, device="cuda")
    sdt = torch.int16 if name == "simba_" else BF16
    (ps, ss), (ps_r, ss_r) = run_both(name, SHAPES[:8], BF16, BF16, sdt, lr_t=lr_t, lr=123.0, sr=True)
    assert_same(ss, ss_r, "state")
    if name != "tiger_":
        assert_same(ps, ps_r, "params")


# ------------------------------------------------------------------ the fp64 oracle
def sign_arg64(name, p, g, s, h):
    """The fp64 argument of the sign whose flip moves θ by 2 lr (None: no such argument)."""
    g, s = g.double(), s.double()
    if name == "lion_":
        return h["beta1"] * s + (1 - h["beta1"]) * g
    if name == "tiger_":
        return h["beta"] * s + (1 - h["beta"]) * g
    return None


@pytest.mark.parametrize("name", ["lion_", "tiger_"])
@pytest.mark.parametrize("dtypes", [(F32, F32, F32), (BF16, F32, F32), (BF16, BF16, BF16), (F16, F32, F32)],
                         ids=lambda d: "-".join(str(x).split(".")[1] for x in d))
def test_fp64_oracle(name, dtypes):
    shapes = [(4097,), (CHUNK + 1,), (64, 48)]
    ps, gs, ss = make_tensors(shapes, *dtypes, hard=False, seed=3)
    h = hyper(name, shapes)
    p64, g64, s64 = clone(ps, dtype=torch.float64), clone(gs, dtype=torch.float64), clone(ss, dtype=torch.float64)
    cargs = [sign_arg64(name, p, g, s, h) for p, g, s in zip(ps, gs, ss)]
    m_in = clone(s64)
    call(op(name), name, ps, gs, ss, steps_of(3), h)
    call(ref_fn(name), name, p64, g64, s64, steps_of(3), h)
    eps = {F32: 2.0**-24, BF16: 2.0**-8, F16: 2.0**-11}
    tiny = {F32: 2.0**-149, BF16: 2.0**-133, F16: 2.0**-24}  # spacing of the subnormals
    for i, (p, p_ref, c) in enumerate(zip(ps, p64, cargs)):
        err = (p.double() - p_ref).abs()
        # storage rounding of the result, plus the fp32 opmath rounding of each term
        bound = 2 * eps[dtypes[0]] * p_ref.abs() + 8 * 2.0**-24 * (p_ref.abs() + h["lr"]) + tiny[dtypes[0]]
        bad = err > bound
        # sign flips: only where the fp64 sign argument is within fp32 rounding of 0
        near_zero = c.abs() <= 4 * 2.0**-24 * (s64[i].abs() + g64[i].abs() + c.abs()) + 1e-30
        flips = bad & near_zero
        assert not (bad & ~near_zero).any(), f"params[{i}]: {int((bad & ~near_zero).sum())} elements off"
        assert int(flips.sum()) <= max(2, p.numel() // 10000), f"params[{i}]: {int(flips.sum())} sign flips"
        err_m = (ss[i].double() - s64[i]).abs()
        # the fp32 betas (0.99 is not exact in fp32) and the fp32 products and sum
        bound_m = 2 * eps[dtypes[2]] * s64[i].abs() + 8 * 2.0**-24 * (m_in[i].abs() + g64[i].abs()) + tiny[dtypes[2]]
        assert bool((err_m <= bound_m).all()), f"exp_avgs[{i}]: {int((err_m > bound_m).sum())} elements off"


# ------------------------------------------------------------------ layouts and counts
@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("dtypes", [(F32, F32, F32), (BF16, F32, BF16), (F16, F16, F32)],
                         ids=lambda d: "-".join(str(x).split(".")[1] for x in d))
def test_misaligned_views(name, dtypes):
    """Views with storage offset 1 element (and 3): the masked scalar path."""
    sdt = torch.int16 if name == "simba_" else dtypes[2]
    shapes = [(n,) for n in (1, 9, 4097, CHUNK + 3)]
    base_p, base_g, base_s = make_tensors([(n + 3,) for (n,) in shapes], dtypes[0], dtypes[1], sdt,
                                          counters=name == "simba_")
    off = [1, 3, 1, 1]
    ps = [b[o:o + n] for b, o, (n,) in zip(base_p, off, shapes)]
    gs = [b[o:o + n] for b, o, (n,) in zip(base_g, off, shapes)]
    ss = [b[o:o + n] for b, o, (n,) in zip(base_s, off, shapes)]
    assert all(p.storage_offset() > 0 and p.is_contiguous() for p in ps)
    h = hyper(name, shapes)
    ps_r, gs_r, ss_r = clone(ps), clone(gs), clone(ss)
    before = [b.clone() for b in base_p]
    call(op(name), name, ps, gs, ss, steps_of(4), h, sr=True)
    call(ref_fn(name), name, ps_r, gs_r, ss_r, steps_of(4), h, sr=True)
    assert_same(ss, ss_r, "state")
    if name != "tiger_":
        assert_same(ps, ps_r, "params")
    for b, o, (n,), orig in zip(base_p, off, shapes, before):  # nothing outside the view is written
        assert torch.equal(b[:o], orig[:o]) and torch.equal(b[o + n:], orig[o + n:])


@pytest.mark.parametrize("name", OPS)
def test_thousands_of_tensors(name):
    gen = torch.Generator().manual_seed(5)
    shapes = [(int(n),) for n in torch.randint(1, 300, (3000,), generator=gen)]
    shapes[::97] = [(0,)] * len(shapes[::97])  # empty tensors interleaved
    sdt = torch.int16 if name == "simba_" else F32
    (ps, ss), (ps_r, ss_r) = run_both(name, shapes, F32, F32, sdt, hard=False, t=0)
    assert_same(ss, ss_r, "state")
    if name != "tiger_":
        assert_same(ps, ps_r, "params")


# ------------------------------------------------------------------ CPU op, opcheck, graphs, AMP
@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("dtypes,sr", [((F32, F32, F32), False), ((BF16, BF16, BF16), True),
                                       ((BF16, F32, F32), True)])
def test_bit_identical_with_cpu_op(name, dtypes, sr):
    if not _ops.has_kernel(name, "CPU"):
        pytest.skip("the compiled CPU op is not built")
    sdt = torch.int16 if name == "simba_" else dtypes[2]
    shapes = SHAPES
    ps, gs, ss = make_tensors(shapes, dtypes[0], dtypes[1], sdt, counters=name == "simba_")
    h = hyper(name, shapes)
    pc, gc, sc = clone(ps, device="cpu"), clone(gs, device="cpu"), clone(ss, device="cpu")
    call(op(name), name, ps, gs, ss, steps_of(len(ps), 2), h, sr=sr)
    call(op(name), name, pc, gc, sc, steps_of(len(ps), 2, "cpu"), h, sr=sr)
    assert_same([s.cpu() for s in ss], sc, "state")
    if name == "tiger_":
        for a, b in zip(ps, pc):
            torch.testing.assert_close(a.cpu(), b, **tiger_param_tol(dtypes[0]))
    else:
        assert_same([p.cpu() for p in ps], pc, "params")


@pytest.mark.parametrize("name", OPS)
def test_opcheck(name):
    shapes = [(3, 5), (17,)]
    sdt = torch.int16 if name == "simba_" else F32
    ps, gs, ss = make_tensors(shapes, F32, F32, sdt, hard=False, counters=name == "simba_")
    h = hyper(name, shapes, lr_t=torch.tensor(1e-3, device="cuda"))
    kwargs = dict(params=ps, grads=gs, steps=steps_of(2), grad_scale=torch.tensor(2.0, device="cuda"),
                  found_inf=torch.tensor(0.0, device="cuda"), seeds=[1, 2], stochastic_rounding=False,
                  **{state_name(name): ss}, **h)
    schema = op(name).default._schema
    # Tiger's trailing optional inputs (given statistics, sums out) are absent: None
    args = [kwargs.get(a.name) for a in schema.arguments]
    assert all(a.name in kwargs or (a.has_default_value() and a.default_value is None) for a in schema.arguments)
    torch.library.opcheck(op(name).default, args)


@pytest.mark.parametrize("name", OPS)
def test_cuda_graph_replay_equals_eager(name):
    shapes = [(257, 33), (4097,), (8,)]
    sdt = torch.int16 if name == "simba_" else BF16
    ps, gs, ss = make_tensors(shapes, BF16, F32, sdt, hard=False, counters=name == "simba_")
    h = hyper(name, shapes, lr_t=torch.tensor(1e-3, device="cuda"))
    if name == "tiger_":
        h["grad_accum_steps"] = 2
    pe, ge, se = clone(ps), clone(gs), clone(ss)
    steps_g, steps_e = steps_of(3), steps_of(3)

    def step(p, g, s, st):
        call(op(name), name, p, g, s, st, h, sr=True)
        torch._foreach_add_(st, 1)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as torch.cuda.graph asks
        step(ps, gs, ss, steps_g)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(ps, gs, ss, steps_g)
    step(pe, ge, se, steps_e)  # eager: the warm-up step
    for i in range(5):
        graph.replay()
        step(pe, ge, se, steps_e)
        h["lr_t"].mul_(0.5)  # the graph reads the current lr on the device
    torch.cuda.synchronize()
    assert_same(ps, pe, "params")
    assert_same(ss, se, "state")
    assert all(int(a) == int(b) == 6 for a, b in zip(steps_g, steps_e))


@pytest.mark.parametrize("name", OPS)
def test_found_inf_skips(name):
    sdt = torch.int16 if name == "simba_" else F32
    ps, gs, ss = make_tensors(SHAPES[:6], F32, F32, sdt, hard=False, counters=name == "simba_")
    p0, s0 = clone(ps), clone(ss)
    h = hyper(name, SHAPES[:6])
    for fi in (torch.tensor(1.0, device="cuda"), torch.tensor(float("nan"), device="cuda"), torch.tensor(1.0)):
        call(op(name), name, ps, gs, ss, steps_of(6), h, found_inf=fi, grad_scale=torch.tensor(4.0, device="cuda"))
        assert_same(ps, p0, "params")
        assert_same(ss, s0, "state")


@pytest.mark.parametrize("cls", ["Lion", "Tiger", "Simba"])
def test_grad_scaler_injected_inf(cls):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).cuda()
    opt = getattr(sign_kernels, cls)(model.parameters(), lr=1e-3, backend="cuda")
    scaler = torch.amp.GradScaler("cuda", init_scale=1024.0)
    x = torch.randn(16, 32, device="cuda")
    for it in range(3):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(x).float().square().mean()
        scaler.scale(loss).backward()
        if it == 1:
            model[0].weight.grad.view(-1)[3] = float("inf")
            before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        if it == 1:
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "step not skipped"
            assert all(int(opt.state[p]["step"]) == 1 for p in model.parameters())
    assert all(int(opt.state[p]["step"]) == 2 for p in model.parameters())


@pytest.mark.parametrize("cls", ["Lion", "Simba"])
def test_optimizer_graph_capture(cls):
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64).cuda()
    twin = torch.nn.Linear(64, 64).cuda()
    twin.load_state_dict(model.state_dict())
    grads = [torch.randn_like(p) for p in model.parameters()]
    opt = getattr(sign_kernels, cls)(model.parameters(), lr=torch.tensor(1e-3, device="cuda"), backend="cuda")
    opt_e = getattr(sign_kernels, cls)(twin.parameters(), lr=torch.tensor(1e-3, device="cuda"), backend="cuda")
    for p, q, g in zip(model.parameters(), twin.parameters(), grads):
        p.grad, q.grad = g.clone(), g.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    opt_e.step()
    for _ in range(4):
        graph.replay()
        opt_e.step()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


# ------------------------------------------------------------------ 64-bit sizes
@pytest.mark.large_memory
@pytest.mark.slow
def test_more_than_2_31_elements():
    n = (1 << 31) + 4099
    free, _ = torch.cuda.mem_get_info()
    if free < 5 * n * 2 + (2 << 30):
        pytest.skip("needs about 24 GiB of free device memory")
    gen = torch.Generator(device="cuda").manual_seed(0)
    p = torch.randn(n, device="cuda", dtype=BF16, generator=gen)
    g = torch.randn(n, device="cuda", dtype=BF16, generator=gen)
    m = torch.randn(n, device="cuda", dtype=BF16, generator=gen)
    windows = [slice(0, 4096), slice((1 << 31) - 4096, (1 << 31) + 4096), slice(n - 5000, n)]
    expect = []
    for w in windows:  # RNE rounding is index-free, so windows can be checked on their own
        pw, gw, mw = p[w].clone(), g[w].clone(), m[w].clone()
        ref.lion_([pw], [gw], [mw], steps_of(1), 1e-2, None, 0.9, 0.99, 0.1, None, None, [7], False)
        expect.append((pw, mw))
    op("lion_")([p], [g], [m], steps_of(1), 1e-2, None, 0.9, 0.99, 0.1, None, None, [7], False)
    for w, (pw, mw) in zip(windows, expect):
        assert torch.equal(p[w], pw) and torch.equal(m[w], mw)


# ------------------------------------------------------------------ torch.optim flags on CUDA
@pytest.mark.parametrize("cls", [sign_kernels.Lion, sign_kernels.Tiger, sign_kernels.Simba], ids=lambda c: c.__name__)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_maximize_is_the_step_on_minus_g(cls, backend):
    """maximize=True on the device equals the run on negated gradients, bit for bit."""
    if backend == "triton" and sign_kernels.available_backends()["triton"] is not None:
        pytest.skip("triton unavailable")
    gen = torch.Generator(device="cuda").manual_seed(3)
    init = [torch.randn(s, device="cuda", generator=gen) for s in [(4097,), (65, 63)]]
    grads = [[torch.randn_like(x) for x in init] for _ in range(3)]
    grads[1][0][5] = float("nan")
    runs = []
    for maximize in (True, False):
        params = [torch.nn.Parameter(x.clone()) for x in init]
        opt = cls(params, backend=backend, maximize=maximize, capturable=True)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone() if maximize else -g
            opt.step()
        runs.append([p.detach() for p in params])
    for a, b in zip(*runs):
        assert torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan())


# ------------------------------------------------------------------ clipping inside the step
# NOTE: [clipping inside the step] in sign_kernels/_ops.py; NOTE: [CUDA gradient used] in
# csrc/cuda/sign_functors.cuh; NOTE: [CUDA sums of squares for clipping] in csrc/cuda/sumsq.cu.
CLIP = 0.3  # not a power of 2: the product rounds


def used_grads(gs, clip, grad_scale=None):
    """The fp32 gradient the ops use: (g / grad_scale) * clip, each rounded to fp32 -- on fp32
    grads without a scale, what clip_grad_norm_'s g.mul_(clip) leaves in them. Device tensors
    only (torch divides by a CPU scalar through its reciprocal)."""
    out = []
    for g in gs:
        x = g.detach().float()
        if grad_scale is not None:
            x = x / grad_scale.to(x.device)
        out.append(x * clip.to(x.device))
    return out


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("scaled", [False, True], ids=["noscale", "scale"])
def test_clip_is_the_step_on_clipped_fp32_grads(name, scaled):
    """fp32: clip given == g.mul_(clip) then no clip, bit for bit, against the reference and
    against the CUDA op itself (Tiger's θ exactly too: the same RMS order); non-finite grads
    included (Tiger's guard sees the clipped gradient)."""
    shapes = SHAPES[:9] + [(64, 48), (9, 4100)]
    counters = name == "simba_"
    sdt = torch.int16 if counters else F32
    ps, gs, ss = make_tensors(shapes, F32, F32, sdt, seed=11, counters=counters)
    for g in gs[2::3]:
        if g.numel() >= 3:
            flat = g.view(-1)
            flat[0], flat[1], flat[-1] = float("nan"), float("inf"), float("-inf")
    clip = torch.tensor(CLIP, device="cuda")
    scale = torch.tensor(3.0, device="cuda") if scaled else None
    h = hyper(name, shapes)
    runs = []
    for fn, with_clip in ((op(name), True), (op(name), False), (ref_fn(name), False)):
        p, s = clone(ps), clone(ss)
        g = clone(gs) if with_clip else used_grads(gs, clip, scale)
        call(fn, name, p, g, s, steps_of(len(ps), 2), h, grad_scale=scale if with_clip else None,
             clip=clip if with_clip else None)
        runs.append((p, s))
    (pc, sc), (pm, sm), (pr, sr_) = runs
    assert_same(pc, pm, "params (clip vs premultiplied, cuda)")
    assert_same(sc, sm, "state (clip vs premultiplied, cuda)")
    assert_same(sc, sr_, "state (clip vs premultiplied reference)")
    if name == "tiger_":
        for i, (a, b) in enumerate(zip(pc, pr)):
            torch.testing.assert_close(a, b, **tiger_param_tol(F32), msg=lambda m: f"params[{i}]: {m}")
    else:
        assert_same(pc, pr, "params (clip vs premultiplied reference)")


@pytest.mark.parametrize("name", OPS)
def test_clip_matches_reference_with_clip(name):
    """bf16 params and grads with SR: the CUDA op and the reference, both given the clip."""
    counters = name == "simba_"
    sdt = torch.int16 if counters else BF16
    ps, gs, ss = make_tensors(SHAPES, BF16, BF16, sdt, seed=12, counters=counters)
    clip = torch.tensor(CLIP, device="cuda")
    scale = torch.tensor(0.75, device="cuda")
    h = hyper(name, SHAPES)
    ps_r, gs_r, ss_r = clone(ps), clone(gs), clone(ss)
    call(op(name), name, ps, gs, ss, steps_of(len(ps), 1), h, grad_scale=scale, sr=True, clip=clip)
    call(ref_fn(name), name, ps_r, gs_r, ss_r, steps_of(len(ps), 1), h, grad_scale=scale, sr=True, clip=clip)
    assert_same(ss, ss_r, "state")
    if name == "tiger_":
        for i, (a, b) in enumerate(zip(ps, ps_r)):
            torch.testing.assert_close(a, b, **tiger_param_tol(BF16), msg=lambda m: f"params[{i}]: {m}")
    else:
        assert_same(ps, ps_r, "params")


@pytest.mark.parametrize("name", OPS)
def test_clip_bf16_grads(name):
    """bf16 grads: the gradient used is fp32(g) * clip in fp32, i.e. the step on fp32 grads
    holding that product (bit for bit, Tiger's θ included)."""
    counters = name == "simba_"
    sdt = torch.int16 if counters else BF16
    shapes = SHAPES[:9] + [(64, 48)]
    ps, gs, ss = make_tensors(shapes, BF16, BF16, sdt, seed=13, counters=counters)
    clip = torch.tensor(CLIP, device="cuda")
    h = hyper(name, shapes)
    pm, sm = clone(ps), clone(ss)
    call(op(name), name, ps, gs, ss, steps_of(len(ps)), h, sr=True, clip=clip)
    call(op(name), name, pm, used_grads(gs, clip), sm, steps_of(len(ps)), h, sr=True)
    assert_same(ps, pm, "params")
    assert_same(ss, sm, "state")


@pytest.mark.parametrize("name", OPS)
def test_clip_omitted_and_host_clip(name):
    """clip=None is the call without the argument; a CPU clip equals a device one; a clip of 1
    changes nothing (x * 1 is x)."""
    counters = name == "simba_"
    sdt = torch.int16 if counters else F32
    shapes = SHAPES[:8]
    ps, gs, ss = make_tensors(shapes, F32, F32, sdt, seed=14, counters=counters)
    h = hyper(name, shapes)
    seeds = [(1000003 * i + 17) & 0xFFFFFFFF for i in range(len(ps))]
    variants = {
        "omitted": {},
        "None": {"clip": None},
        "one": {"clip": torch.tensor(1.0, device="cuda")},
        "cpu": {"clip": torch.tensor(CLIP)},
        "device": {"clip": torch.tensor(CLIP, device="cuda")},
        "device-fp64": {"clip": torch.tensor(CLIP, device="cuda", dtype=torch.float64)},  # to fp32, as grad_scale
    }
    outs = {}
    for key, extra in variants.items():
        p, s = clone(ps), clone(ss)
        op(name)(params=p, grads=clone(gs), steps=steps_of(len(ps)), grad_scale=None, found_inf=None, seeds=seeds,
                 stochastic_rounding=False, **{state_name(name): s}, **h, **extra)
        outs[key] = (p, s)
    for a, b in (("omitted", "None"), ("omitted", "one"), ("cpu", "device"), ("device-fp64", "device")):
        assert_same(outs[a][0], outs[b][0], f"params ({a} vs {b})")
        assert_same(outs[a][1], outs[b][1], f"state ({a} vs {b})")


@pytest.mark.parametrize("clip_value", [float("nan"), 0.0])
def test_tiger_guard_sees_the_clipped_gradient(clip_value):
    """A NaN clip fires every tensor's guard; a zero clip fires it where g holds an inf (inf * 0)."""
    shapes = [(5, 7), (4097,), (3, 9000), (300,)]
    ps, gs, ss = make_tensors(shapes, F32, F32, F32, hard=False, seed=15)
    gs[1].view(-1)[100] = float("inf")
    h = hyper("tiger_", shapes, roles=[ref.ROLE_MATRIX, ref.ROLE_MATRIX, ref.ROLE_EMBEDDING, ref.ROLE_GAIN])
    clip = torch.tensor(clip_value, device="cuda")
    m0 = clone(ss)
    pm, sm = clone(ps), clone(ss)
    call(op("tiger_"), "tiger_", ps, gs, ss, steps_of(4), h, clip=clip)
    call(op("tiger_"), "tiger_", pm, used_grads(gs, clip), sm, steps_of(4), h)
    fired = [True] * 4 if clip_value != clip_value else [False, True, False, False]
    for i, f in enumerate(fired):
        assert torch.equal(ss[i], m0[i]) == f, f"tensor {i}: guard {'not ' if f else ''}expected"
    assert_same(ps, pm, "params")
    assert_same(ss, sm, "exp_avgs")


def test_dist_lion_pack_clip():
    """Distributed Lion's pack pass: clip given == the pass on the clipped fp32 gradient."""
    from sign_kernels.distributed import _wire

    if not _ops.has_kernel("dist_lion_pack_", "CUDA"):
        pytest.skip("no CUDA dist_lion_pack_")
    shapes = [(1,), (7,), (4097,), (CHUNK + 3,)]
    _, gs, ms = make_tensors(shapes, F32, F32, F32, seed=16)
    gs[2].view(-1)[5] = float("nan")
    clip = torch.tensor(CLIP, device="cuda")
    scale = torch.tensor(0.75, device="cuda")
    runs = []
    for fn, with_clip in ((op("dist_lion_pack_"), True), (op("dist_lion_pack_"), False),
                          (_wire.dist_lion_pack_, True)):
        m = clone(ms)
        packed = [torch.full(((g.numel() + 3) // 4,), 0xAA, dtype=torch.uint8, device="cuda") for g in gs]
        if with_clip:
            fn(clone(gs), m, packed, 0.9, 0.99, scale, None, clip)
        else:
            fn(used_grads(gs, clip, scale), m, packed, 0.9, 0.99, None, None)
        runs.append((m, packed))
    for m, packed in runs[1:]:
        assert_same(runs[0][0], m, "exp_avgs")
        assert_same(runs[0][1], packed, "packed")


@pytest.mark.parametrize("name", OPS)
def test_clip_opcheck(name):
    shapes = [(3, 5), (17,)]
    sdt = torch.int16 if name == "simba_" else F32
    ps, gs, ss = make_tensors(shapes, F32, F32, sdt, hard=False, counters=name == "simba_")
    h = hyper(name, shapes)
    kwargs = dict(params=ps, grads=gs, steps=steps_of(2), grad_scale=torch.tensor(2.0, device="cuda"),
                  found_inf=None, seeds=[1, 2], stochastic_rounding=False, clip=torch.tensor(0.5, device="cuda"),
                  **{state_name(name): ss}, **h)
    args = [kwargs.get(a.name) for a in op(name).default._schema.arguments]
    torch.library.opcheck(op(name).default, args)


def test_clip_cuda_graph_replay_reads_the_current_clip():
    shapes = [(257, 33), (4097,)]
    ps, gs, ss = make_tensors(shapes, F32, F32, F32, hard=False, seed=17)
    h = hyper("lion_", shapes)
    clip = torch.tensor(CLIP, device="cuda")
    pe, se = clone(ps), clone(ss)

    def step(p, s):
        call(op("lion_"), "lion_", p, gs, s, steps_of(2), h, clip=clip)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(ps, ss)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(ps, ss)
    step(pe, se)
    for _ in range(3):
        clip.mul_(-0.5)  # the sign of the clipped gradient flips: the replay must see it
        graph.replay()
        step(pe, se)
    torch.cuda.synchronize()
    assert_same(ps, pe, "params")
    assert_same(ss, se, "exp_avgs")


# ------------------------------------------------------------------ sumsq_
def sumsq(tensors, scale=None, fn=None):
    out = torch.full((len(tensors),), -1.0, dtype=torch.float64, device="cuda")
    (fn or op("sumsq_"))(tensors, scale, out)
    return out


def sumsq64(tensors, scale=None):
    """The fp64 oracle: the fp32 quotient, squared and summed in fp64 by torch."""
    out = []
    for x in tensors:
        q = x.float()
        if scale is not None:
            q = q / scale.to(device=x.device, dtype=torch.float32)
        out.append(q.double().square().sum())
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.float64, device="cuda")


SUMSQ_SIZES = [1, 3, 8, 9, 4095, 4097, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 5, 1_000_003]


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("scale", [None, "device", "cpu"])
def test_sumsq_matches_fp64(dtype, scale):
    gen = torch.Generator().manual_seed(21)
    xs = [hard_values(n, gen, dtype).cuda() for n in SUMSQ_SIZES] + [normal_values(64 * 48, gen, dtype).cuda().view(64, 48)]
    s = {None: None, "device": torch.tensor(0.75, device="cuda"), "cpu": torch.tensor(0.75)}[scale]
    got = sumsq(xs, s)
    want = sumsq64(xs, None if s is None else s.cuda())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    ref_out = torch.zeros(len(xs), dtype=torch.float64, device="cuda")
    ref.sumsq_(xs, None if s is None else s.cuda(), ref_out)
    torch.testing.assert_close(got, ref_out, rtol=1e-12, atol=0)


def test_sumsq_same_bits_whatever_the_companions():
    """The order is fixed by each tensor's numel: other tensors, their number (several launches),
    their order, and a misaligned copy of the same values give the same bits."""
    gen = torch.Generator().manual_seed(22)
    xs = [normal_values(n, gen, F32).cuda() for n in SUMSQ_SIZES]
    scale = torch.tensor(3.0, device="cuda")
    alone = [sumsq([x], scale) for x in xs]
    together = sumsq(xs, scale)
    # several launches of both kernels (NOTE: [chunk table in kernel arguments])
    others = [normal_values(int(n), gen, F32).cuda() for n in torch.randint(1, 3000, (5000,), generator=gen)]
    mixed = list(others[:1000]) + xs[::-1] + list(others[1000:])
    in_crowd = sumsq(mixed, scale)[1000:1000 + len(xs)].flip(0)
    misaligned = []
    for x in xs:
        buf = torch.empty(x.numel() + 1, dtype=x.dtype, device="cuda")
        view = buf[1:]
        view.copy_(x)
        misaligned.append(view)
    shifted = sumsq(misaligned, scale)
    for i in range(len(xs)):
        bits = together[i : i + 1].view(torch.int64)
        assert torch.equal(alone[i].view(torch.int64), bits), f"tensor {i}: alone"
        assert torch.equal(in_crowd[i : i + 1].view(torch.int64), bits), f"tensor {i}: in a crowd"
        assert torch.equal(shifted[i : i + 1].view(torch.int64), bits), f"tensor {i}: misaligned"
    again = sumsq(xs, scale)
    assert torch.equal(again.view(torch.int64), together.view(torch.int64))


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=lambda d: str(d).split(".")[1])
def test_sumsq_nonfinite_and_empty(dtype):
    gen = torch.Generator().manual_seed(23)
    nan = normal_values(CHUNK + 7, gen, dtype).cuda()
    nan[CHUNK + 3] = float("nan")
    nan[2] = float("inf")  # NaN wins over inf
    inf = normal_values(CHUNK + 7, gen, dtype).cuda()
    inf[CHUNK + 1] = float("-inf")
    empty = torch.empty(0, dtype=dtype, device="cuda")
    empty2d = torch.empty(3, 0, dtype=dtype, device="cuda")
    tiny = torch.zeros(5, dtype=dtype, device="cuda")
    out = sumsq([empty, nan, inf, empty2d, tiny])
    assert out[0].item() == 0.0 and not torch.signbit(out[0])
    assert out[1].isnan()
    assert out[2].item() == float("inf")
    assert out[3].item() == 0.0 and out[4].item() == 0.0
    # a zero scale: x / 0 is inf (0 / 0 NaN), as the division would give
    out = sumsq([torch.ones(9, dtype=dtype, device="cuda"), empty], torch.tensor(0.0, device="cuda"))
    assert out[0].item() == float("inf") and out[1].item() == 0.0
    assert sumsq([]).numel() == 0  # nothing to do


def test_sumsq_cuda_graph_capture():
    gen = torch.Generator().manual_seed(24)
    xs = [normal_values(n, gen, BF16).cuda() for n in (5, CHUNK + 9, 3 * CHUNK)]
    scale = torch.tensor(2.0, device="cuda")
    out = torch.zeros(len(xs), dtype=torch.float64, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        op("sumsq_")(xs, scale, out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        op("sumsq_")(xs, scale, out)
    for s in (2.0, 0.5, 3.0):
        scale.fill_(s)  # the replay reads the current scale and tensors
        for x in xs:
            x.add_(0.25)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out.view(torch.int64), sumsq(xs, scale).view(torch.int64))


def test_sumsq_checks_and_opcheck():
    x = torch.randn(10, device="cuda")
    with pytest.raises(RuntimeError, match="sumsq_"):
        op("sumsq_")([x, x.half()], None, torch.zeros(2, dtype=torch.float64, device="cuda"))
    with pytest.raises(RuntimeError, match="sumsq_"):
        op("sumsq_")([x], None, torch.zeros(2, dtype=torch.float64, device="cuda"))
    with pytest.raises(RuntimeError, match="sumsq_"):
        op("sumsq_")([x], None, torch.zeros(1, dtype=torch.float32, device="cuda"))
    with pytest.raises(RuntimeError, match="sumsq_"):
        op("sumsq_")([x[::2]], None, torch.zeros(1, dtype=torch.float64, device="cuda"))
    torch.library.opcheck(op("sumsq_").default,
                          ([x, torch.randn(3, 4, device="cuda")], torch.tensor(2.0, device="cuda"),
                           torch.zeros(2, dtype=torch.float64, device="cuda")))


def test_sumsq_close_to_cpu_op():
    if not _ops.has_kernel("sumsq_", "CPU"):
        pytest.skip("the compiled CPU op is not built")
    gen = torch.Generator().manual_seed(25)
    xs = [hard_values(n, gen, BF16) for n in SUMSQ_SIZES]
    cpu = torch.zeros(len(xs), dtype=torch.float64)
    op("sumsq_")(xs, torch.tensor(0.75), cpu)
    torch.testing.assert_close(sumsq([x.cuda() for x in xs], torch.tensor(0.75, device="cuda")).cpu(), cpu,
                               rtol=1e-12, atol=0)


# ------------------------------------------------------------------ int8 momentum and the correction byte
# NOTE: [8-bit momentum and the correction byte] in sign_kernels/_ops.py; the kernels: NOTE: [CUDA row
# blocks] and NOTE: [CUDA compressed Tiger] in csrc/cuda/compressed.cuh. Against the reference on the
# same device, bit for bit (Tiger with the reference's sums of squares given as statistics, so that
# both compute the same RMS; with its own sums, the momentum bit for bit and θ within rounding).
from sign_kernels import _quant  # noqa: E402

QDEV = "cuda"
I8 = torch.int8
# ragged last blocks (cols not a multiple of 64), exact blocks, rows of 1, 3-d, many blocks per row,
# many short rows, rows shorter than a pack
Q_SHAPES = [(5, 130), (9, 64), (3, 1), (2, 3, 70), (40, 4100), (300, 8), (7, 2, 3)]
Q_ROLES = [ref.ROLE_MATRIX, ref.ROLE_EMBEDDING, ref.ROLE_ELEMENTWISE, ref.ROLE_MATRIX, ref.ROLE_EMBEDDING,
           ref.ROLE_EMBEDDING, ref.ROLE_GAIN]
# the correction byte alone (a float momentum) also takes 0-d and 1-d params
EC_SHAPES = Q_SHAPES + [(1000,), (70,), ()]
EC_ROLES = Q_ROLES + [ref.ROLE_MATRIX, ref.ROLE_ELEMENTWISE, ref.ROLE_GAIN]
# (param, grad, state, correction byte): int8 state is 8-bit momentum; a float state comes with the byte.
Q_DTYPES = [
    (F32, F32, I8, False), (BF16, BF16, I8, False), (BF16, F32, I8, False), (F16, F16, I8, False),
    (BF16, BF16, I8, True), (BF16, F32, I8, True), (F16, F16, I8, True), (F16, F32, I8, True),
    (BF16, BF16, BF16, True), (BF16, F32, F32, True), (F16, F16, F16, True), (F16, F32, F32, True),
    (F16, F16, BF16, True),
]


def q_ids(d):
    return "-".join(str(x).split(".")[1] for x in d[:3]) + ("-ec" if d[3] else "")


def q_make(shapes, pdt, sdt, ec, *, seed=0, device=None):
    """params, momenta (int8 codes or floats), bf16 block scales (or None), residuals (or None).
    Random codes, scales over many binades with 1/8 zeros, and an all-zero block: the first block
    of the first row (q_grads keeps its gradients 0)."""
    device = device or QDEV
    gen = torch.Generator().manual_seed(seed)
    q8 = sdt == I8
    ps, ms, scs, rs = [], [], [], []
    for shape in shapes:
        n = 1
        for d in shape:
            n *= d
        p = torch.randn(n, generator=gen) * torch.pow(2.0, torch.randint(-8, 8, (n,), generator=gen).float())
        ps.append(p.to(pdt).reshape(shape).to(device))
        if q8:
            m = torch.randint(-127, 128, shape, generator=gen, dtype=I8)
            sshape = _quant.scale_shape(torch.Size(shape))
            mag = torch.rand(sshape, generator=gen) * torch.pow(2.0, torch.randint(-30, 4, sshape, generator=gen).float())
            mag = torch.where(torch.rand(sshape, generator=gen) < 0.125, torch.zeros(()), mag)
            sc = _quant.bf16_up(mag)
            m.view(-1, shape[-1])[0, :64] = 0
            sc.view(-1, sc.shape[-1])[0, 0] = 0
            ms.append(m.to(device))
            scs.append(sc.to(device))
        else:
            ms.append((torch.randn(n, generator=gen) * 1e-3).to(sdt).reshape(shape).to(device))
        if ec:
            rs.append(torch.randint(-127, 128, shape, generator=gen, dtype=I8).to(device))
    return ps, ms, (scs if q8 else None), (rs if ec else None)


def q_grads(shapes, gdt, gen, t, nonfinite=None, device=None):
    """Gradients over 40 binades (fp16: 20, mostly finite); the all-zero block stays 0; one huge
    outlier at t == 2 (inf in fp16); a non-finite value in tensor 0 at t == 1."""
    device = device or QDEV
    lo, hi = (-12, 8) if gdt == F16 else (-20, 20)
    out = []
    for i, shape in enumerate(shapes):
        n = 1
        for d in shape:
            n *= d
        g = torch.randn(n, generator=gen) * torch.pow(2.0, torch.randint(lo, hi, (n,), generator=gen).float())
        g = g.reshape(shape)
        if len(shape) >= 2:
            g.view(-1, shape[-1])[0, :64] = 0.0
        if t == 2 and n > 1:
            g.view(-1)[-1] = 3e30
        if nonfinite is not None and t == 1 and i == 0:
            g.view(-1)[n // 2] = nonfinite
        out.append(g.to(gdt).to(device))
    return out


def q_step(fn, kind, ps, gs, ms, scs, rs, t, *, roles=None, k=1, sr=False, grad_scale=None, found_inf=None,
           clip=None, **tiger_kw):
    dev = ps[0].device
    steps = [torch.full((), t, dtype=torch.int64, device=dev) for _ in ps]
    seeds = [(1000003 * i + 17) & 0xFFFFFFFF for i in range(len(ps))]
    kw = dict(exp_avg_scales=scs, residuals=rs)
    if clip is not None:
        kw["clip"] = clip
    if kind == "lion_":
        fn(ps, gs, ms, steps, 1e-2, None, 0.9, 0.99, 0.1, grad_scale, found_inf, seeds, sr, **kw)
    else:
        fn(ps, gs, ms, steps, roles, 1e-2, None, 0.965, 0.01, k, 0.99, grad_scale, found_inf, seeds, sr,
           **tiger_kw, **kw)


def q_stats(ps, roles):
    """The reference's sums of squares of θ as given statistics (NOTE: [Tiger statistics input]):
    with them the kernels' RMS is the reference's, bit for bit."""
    parts, at, ns, off = [], [], [], 0
    for p, role in zip(ps, roles):
        if role in (ref.ROLE_MATRIX, ref.ROLE_EMBEDDING) and p.numel():
            s = ref.tiger_sumsq(p, role)
            parts.append(s)
            at.append(off)
            ns.append(p.numel() if role == ref.ROLE_MATRIX else p.shape[-1])
            off += s.numel()
        else:
            at.append(-1)
            ns.append(0)
    stats = torch.cat(parts) if parts else torch.zeros(1, dtype=torch.float64, device=ps[0].device)
    return dict(stats=stats, stats_nan=[-1] * len(ps), stats_sumsq=at, stats_n=ns)


def q_clone(*lists):
    return [None if x is None else clone(x) for x in lists]


def q_theta(ps, rs):
    """θ^ = θ16 + ρ u(θ16) (the weight the rules update), or θ."""
    if rs is None:
        return [p.float() for p in ps]
    return [_quant.ec_decode(p, r) for p, r in zip(ps, rs)]


def q_assert_state(got, want, what):
    for name, a, b in zip(("exp_avgs", "exp_avg_scales"), got, want):
        if a is not None:
            assert_same(a, b, f"{what}: {name}")


def q_run(kind, shapes, dtypes, *, steps=4, sr=False, k=1, nonfinite=None, given=False, seed=0, **kw):
    """`steps` calls of the CUDA op and of the reference from the same state; returns both states."""
    pdt, gdt, sdt, ec = dtypes
    roles = (EC_ROLES if len(shapes) == len(EC_ROLES) else Q_ROLES)[: len(shapes)] if kind == "tiger_" else None
    ps, ms, scs, rs = q_make(shapes, pdt, sdt, ec, seed=seed)
    pr, mr, scr, rr = q_clone(ps, ms, scs, rs)
    gen = torch.Generator().manual_seed(seed + 1)
    for t in range(steps):
        gs = q_grads(shapes, gdt, gen, t, nonfinite)
        extra = dict(kw)
        if kind == "tiger_":
            extra.update(roles=roles, k=k)
            if given:
                extra.update(q_stats(pr, roles))
        q_step(op(kind), kind, ps, gs, ms, scs, rs, t, sr=sr, **{key: (v.clone() if key == "stats" else v)
                                                                 for key, v in extra.items()})
        q_step(ref_fn(kind), kind, pr, clone(gs), mr, scr, rr, t, sr=sr, **extra)
    return (ps, ms, scs, rs), (pr, mr, scr, rr)


def q_assert_bitwise(got, want, what):
    ps, ms, scs, rs = got
    pr, mr, scr, rr = want
    assert_same(ps, pr, f"{what}: params")
    q_assert_state((ms, scs), (mr, scr), what)
    if rs is not None:
        assert_same(rs, rr, f"{what}: residuals")


@pytest.mark.parametrize("dtypes", Q_DTYPES, ids=q_ids)
@pytest.mark.parametrize("sr", [False, True], ids=["rne", "sr"])
def test_lion_compressed_matches_reference_bitwise(dtypes, sr):
    if sr and dtypes[3]:
        pytest.skip("the correction byte and stochastic rounding are exclusive")
    shapes = Q_SHAPES if dtypes[2] == I8 else EC_SHAPES
    got, want = q_run("lion_", shapes, dtypes, sr=sr)
    q_assert_bitwise(got, want, "lion_")


@pytest.mark.parametrize("dtypes", Q_DTYPES, ids=q_ids)
@pytest.mark.parametrize("k", [1, 3])
def test_tiger_compressed_matches_reference_bitwise(dtypes, k):
    shapes = Q_SHAPES if dtypes[2] == I8 else EC_SHAPES
    got, want = q_run("tiger_", shapes, dtypes, steps=6, k=k, sr=not dtypes[3], given=True)
    q_assert_bitwise(got, want, f"tiger_ k={k}")


@pytest.mark.parametrize("dtypes", Q_DTYPES, ids=q_ids)
def test_tiger_compressed_own_sums(dtypes):
    """With its own sums of squares: the momentum bit for bit (it does not depend on θ), θ^ within
    the effect of the RMS summation order."""
    shapes = Q_SHAPES if dtypes[2] == I8 else EC_SHAPES
    (ps, ms, scs, rs), (pr, mr, scr, rr) = q_run("tiger_", shapes, dtypes, steps=4)
    q_assert_state((ms, scs), (mr, scr), "tiger_")
    tol = tiger_param_tol(dtypes[0]) if rs is None else dict(rtol=2.0**-14, atol=1e-7, equal_nan=True)
    for i, (a, b) in enumerate(zip(q_theta(ps, rs), q_theta(pr, rr))):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"theta[{i}]: {m}")


@pytest.mark.parametrize("kind", ["lion_", "tiger_"])
@pytest.mark.parametrize("nonfinite", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtypes", [(F32, F32, I8, False), (BF16, F32, I8, True), (F16, F16, F32, True)], ids=q_ids)
def test_compressed_nonfinite_grads(kind, nonfinite, dtypes):
    """NaN: Lion's momentum element codes 0; Tiger's NaN guard (codes, scales untouched, θ^ shrunk).
    Inf: the block's scale is inf and its codes 0."""
    shapes = Q_SHAPES if dtypes[2] == I8 else EC_SHAPES
    got, want = q_run(kind, shapes, dtypes, nonfinite=nonfinite, given=True)
    q_assert_bitwise(got, want, kind)


@pytest.mark.parametrize("kind", ["lion_", "tiger_"])
@pytest.mark.parametrize("scaler", ["scale", "clip", "scale+clip", "host"])
def test_compressed_grad_scale_and_clip(kind, scaler):
    """GradScaler's arguments (a negative scale flips every sign) and the clipping coefficient."""
    dev = QDEV
    gs_ = {"scale": (torch.tensor(-3.0, device=dev), None), "clip": (None, torch.tensor(0.3, device=dev)),
           "scale+clip": (torch.tensor(1024.0, device=dev), torch.tensor(0.7, device=dev)),
           "host": (torch.tensor(8.0), torch.tensor(0.5))}[scaler]
    for dtypes in ((F32, F32, I8, False), (BF16, BF16, I8, True), (F16, F32, F32, True)):
        shapes = Q_SHAPES if dtypes[2] == I8 else EC_SHAPES
        got, want = q_run(kind, shapes, dtypes, given=True, grad_scale=gs_[0], found_inf=torch.tensor(0.0, device=dev),
                          clip=gs_[1])
        q_assert_bitwise(got, want, f"{kind} {scaler} {dtypes}")


@pytest.mark.parametrize("kind", ["lion_", "tiger_"])
def test_compressed_found_inf_skips(kind):
    for dtypes in ((F32, F32, I8, False), (BF16, F32, I8, True), (F16, F16, F32, True)):
        shapes = Q_SHAPES if dtypes[2] == I8 else EC_SHAPES
        ps, ms, scs, rs = q_make(shapes, dtypes[0], dtypes[2], dtypes[3])
        before = q_clone(ps, ms, scs, rs)
        gs = q_grads(shapes, dtypes[1], torch.Generator().manual_seed(3), 0)
        roles = (EC_ROLES if len(shapes) == len(EC_ROLES) else Q_ROLES)
        for fi in (torch.tensor(1.0, device=QDEV), torch.tensor(float("nan"), device=QDEV), torch.tensor(1.0)):
            kw = dict(roles=roles) if kind == "tiger_" else {}
            q_step(op(kind), kind, ps, gs, ms, scs, rs, 0, found_inf=fi, grad_scale=torch.tensor(4.0, device=QDEV), **kw)
            for a, b, what in zip((ps, ms, scs, rs), before, ("params", "exp_avgs", "scales", "residuals")):
                if a is not None:
                    assert_same(a, b, what)


@pytest.mark.parametrize("case", ["update", "guard", "accum", "micro-step"])
@pytest.mark.parametrize("dtypes", [(F32, F32, I8, False), (BF16, F32, I8, True), (BF16, BF16, F32, True)], ids=q_ids)
def test_tiger_compressed_sums_out_equal_a_sums_only_call(case, dtypes):
    """NOTE: [Tiger sums of squares out]: the sums the update leaves are the bits a sums-only call
    (found_inf set) computes from θ afterwards, within 1e-12 of the reference's; the sums-only call
    changes nothing."""
    shapes = Q_SHAPES if dtypes[2] == I8 else EC_SHAPES
    roles = (EC_ROLES if len(shapes) == len(EC_ROLES) else Q_ROLES)
    ps, ms, scs, rs = q_make(shapes, dtypes[0], dtypes[2], dtypes[3])
    at, off = [], 0
    for p, role in zip(ps, roles):
        rows = p.numel() // p.shape[-1] if role == ref.ROLE_EMBEDDING else 1
        at.append(off if role in (ref.ROLE_MATRIX, ref.ROLE_EMBEDDING) else -1)
        off += rows if role in (ref.ROLE_MATRIX, ref.ROLE_EMBEDDING) else 0
    t, k = {"update": (0, 1), "guard": (1, 1), "accum": (2, 3), "micro-step": (0, 3)}[case]
    gs = q_grads(shapes, dtypes[1], torch.Generator().manual_seed(4), t, float("nan") if case == "guard" else None)
    out = torch.full((off,), -1.0, dtype=torch.float64, device=QDEV)
    q_step(op("tiger_"), "tiger_", ps, gs, ms, scs, rs, t, roles=roles, k=k, sumsq_out=out, sumsq_out_at=at)
    after = q_clone(ps, ms, scs, rs)
    again = torch.full((off,), -2.0, dtype=torch.float64, device=QDEV)
    q_step(op("tiger_"), "tiger_", ps, gs, ms, scs, rs, t, roles=roles, k=k, sumsq_out=again, sumsq_out_at=at,
           found_inf=torch.tensor(1.0, device=QDEV))
    assert torch.equal(out.view(torch.int64), again.view(torch.int64))
    for a, b, what in zip((ps, ms, scs, rs), after, ("params", "exp_avgs", "scales", "residuals")):
        if a is not None:
            assert_same(a, b, what)
    want = torch.cat([ref.tiger_sumsq(p, role) for p, role, i in zip(ps, roles, at) if i >= 0])
    torch.testing.assert_close(out, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind", ["lion_", "tiger_"])
def test_compressed_misaligned_views(kind):
    """Views with a storage offset (scalar accesses in the strided layout) give the same bits."""
    dtypes = (BF16, F32, I8, True)
    ps, ms, scs, rs = q_make(Q_SHAPES, BF16, I8, True)
    pr, mr, scr, rr = q_clone(ps, ms, scs, rs)

    def shifted(ts):
        out = []
        for x in ts:
            buf = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
            v = buf[1:].view(x.shape)
            v.copy_(x)
            out.append(v)
        return out

    ps, ms, scs, rs = shifted(ps), shifted(ms), shifted(scs), shifted(rs)
    gen = torch.Generator().manual_seed(5)
    for t in range(3):
        gs = q_grads(Q_SHAPES, dtypes[1], gen, t)
        kw = dict(roles=Q_ROLES, **q_stats(pr, Q_ROLES)) if kind == "tiger_" else {}
        q_step(op(kind), kind, ps, shifted(gs), ms, scs, rs, t, **kw)
        q_step(ref_fn(kind), kind, pr, gs, mr, scr, rr, t, **kw)
    q_assert_bitwise((ps, ms, scs, rs), (pr, mr, scr, rr), kind)


@pytest.mark.parametrize("kind", ["lion_", "tiger_"])
def test_compressed_checks(kind):
    """What the binding refuses (csrc/torch/common.h CompressedLists), as on the CPU."""
    ps, ms, scs, rs = q_make([(3, 70)], BF16, I8, True)
    gs = q_grads([(3, 70)], BF16, torch.Generator().manual_seed(6), 0)
    kw = dict(roles=[ref.ROLE_MATRIX]) if kind == "tiger_" else {}
    with pytest.raises(RuntimeError, match="exp_avg_scales"):
        q_step(op(kind), kind, ps, gs, ms, None, rs, 0, **kw)
    with pytest.raises(RuntimeError, match="exp_avg_scales"):
        q_step(op(kind), kind, ps, gs, ms, [scs[0][:, :1].contiguous()], rs, 0, **kw)
    with pytest.raises(RuntimeError, match="exclusive"):
        q_step(op(kind), kind, ps, gs, ms, scs, rs, 0, sr=True, **kw)
    with pytest.raises(RuntimeError, match="correction byte"):
        q_step(op(kind), kind, [p.float() for p in ps], [g.float() for g in gs], ms, scs, rs, 0, **kw)


@pytest.mark.parametrize("kind", ["lion_", "tiger_"])
def test_compressed_cuda_graph_replay_equals_eager(kind):
    shapes, roles = Q_SHAPES, Q_ROLES
    ps, ms, scs, rs = q_make(shapes, BF16, I8, True)
    pe, me, sce, re_ = q_clone(ps, ms, scs, rs)
    gs = q_grads(shapes, F32, torch.Generator().manual_seed(7), 0)
    lr_t = torch.tensor(1e-3, device="cuda")
    steps_g, steps_e = steps_of(len(shapes)), steps_of(len(shapes))
    seeds = list(range(1, len(shapes) + 1))

    def step(p, m, sc, r, st):
        kw = dict(exp_avg_scales=sc, residuals=r)
        if kind == "lion_":
            op(kind)(p, gs, m, st, 1.0, lr_t, 0.9, 0.99, 0.1, None, None, seeds, False, **kw)
        else:
            op(kind)(p, gs, m, st, roles, 1.0, lr_t, 0.965, 0.01, 2, 0.99, None, None, seeds, False, **kw)
        torch._foreach_add_(st, 1)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(ps, ms, scs, rs, steps_g)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(ps, ms, scs, rs, steps_g)
    step(pe, me, sce, re_, steps_e)
    for _ in range(5):
        graph.replay()
        step(pe, me, sce, re_, steps_e)
        lr_t.mul_(0.5)
    torch.cuda.synchronize()
    q_assert_bitwise((ps, ms, scs, rs), (pe, me, sce, re_), kind)


class _QNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(40, 70)
        self.lin = torch.nn.Linear(70, 130)
        self.norm = torch.nn.LayerNorm(130)
        self.out = torch.nn.Linear(130, 5)


@pytest.mark.parametrize("kind", ["Lion", "Tiger"])
@pytest.mark.parametrize("dtype,ec", [(F32, False), (BF16, True), (F16, True), (BF16, False)],
                         ids=["fp32", "bf16-ec", "fp16-ec", "bf16"])
def test_optimizer_int8_and_correction_byte_on_cuda(kind, dtype, ec):
    """sign_kernels.Lion/Tiger(momentum_dtype=torch.int8, error_correction=..., backend="cuda") against
    backend="reference": Lion bit for bit; Tiger's momentum bit for bit and θ within rounding (its RMS
    is summed in another order)."""
    torch.manual_seed(0)
    a, b = _QNet().to(dtype).cuda(), _QNet().to(dtype).cuda()
    b.load_state_dict(a.state_dict())

    def make(net, backend):
        kw = dict(momentum_dtype=torch.int8, error_correction=ec, backend=backend)
        if kind == "Lion":
            return sign_kernels.Lion(net.parameters(), lr=1e-2, weight_decay=0.1, **kw)
        return sign_kernels.Tiger(sign_kernels.tiger_param_groups(net), lr=1e-2, **kw)

    oa, ob = make(a, "cuda"), make(b, "reference")
    for t in range(4):
        gen = torch.Generator().manual_seed(50 + t)
        for p, q in zip(a.parameters(), b.parameters()):
            g = torch.randn(p.shape, generator=gen).to(dtype).cuda()
            p.grad, q.grad = g, g.clone()
        oa.step()
        ob.step()
    st = oa.state[a.lin.weight]
    assert st["exp_avg"].dtype == torch.int8 and st["exp_avg_scale"].dtype == torch.bfloat16
    assert ("residual" in st) == (ec and dtype != F32)
    for p, q in zip(a.parameters(), b.parameters()):
        sa, sb = oa.state[p], ob.state[q]
        for key in ("exp_avg", "exp_avg_scale"):
            if key in sa:
                assert torch.equal(sa[key], sb[key]), key
        if kind == "Lion":
            assert torch.equal(p, q)
            if "residual" in sa:
                assert torch.equal(sa["residual"], sb["residual"])
        else:
            ra, rb = sa.get("residual"), sb.get("residual")
            ta = _quant.ec_decode(p, ra) if ra is not None else p.float()
            tb = _quant.ec_decode(q, rb) if rb is not None else q.float()
            tol = tiger_param_tol(dtype) if ra is None else dict(rtol=2.0**-14, atol=1e-7)
            torch.testing.assert_close(ta, tb, **tol)
