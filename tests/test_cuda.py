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
  an fp64 sum, the same bits whatever the companions, NaN/inf/empty, CUDA-graph capture.
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
