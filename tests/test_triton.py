"""Triton backend against the reference backend (bit for bit) and the fp64 oracle.

Runs in CI on CPU tensors under the Triton interpreter: TRITON_INTERPRET is set to 1 here,
before anything imports triton (triton decides interpreter vs compiler when the kernels are
decorated, i.e. when sign_kernels.triton first runs an op). Run this file in its own pytest
process, or first, if other test modules import triton-compiled code. On a GPU machine run it
with TRITON_INTERPRET=0 to test the compiled kernels on CUDA tensors.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from sign_kernels import _rng  # noqa: E402
from sign_kernels import triton as skt  # noqa: E402
from sign_kernels.backends import reference as ref  # noqa: E402

if skt.unavailable_reason() is not None:
    pytest.skip(f"triton backend unavailable: {skt.unavailable_reason()}", allow_module_level=True)

from sign_kernels.triton import _kernels as K  # noqa: E402
from sign_kernels.triton import _launch as L  # noqa: E402

DEVICE = "cpu" if K.INTERPRETED else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("compiled triton needs CUDA (set TRITON_INTERPRET=1 for the CPU interpreter)",
                allow_module_level=True)

# numpy warns about the Inf/NaN the hard cases produce on purpose
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
SHAPES = [(0,), (1,), (5,), (4097,), (3, 7), (2, 3, 5)]
TIGER_ROLES = [3, 0, 1, 3, 2, 2]  # every role, embeddings of 2 and 3 dims


# ---------------------------------------------------------------- fixtures of values
def hard_values(n: int, gen: torch.Generator, max_exp: int = 127, min_exp: int = -149) -> torch.Tensor:
    """fp32 values in every binade [min_exp, max_exp], random signs, ~1/8 exact zeros."""
    if n == 0:
        return torch.zeros(0)
    e = torch.arange(n) % (max_exp - min_exp + 1) + min_exp
    e = e[torch.randperm(n, generator=gen)]
    mant = 1.0 + torch.rand(n, generator=gen, dtype=torch.float64)
    x = torch.ldexp(mant, e.to(torch.float64)).to(F32)
    x = torch.where(torch.rand(n, generator=gen) < 0.5, -x, x)
    return torch.where(torch.rand(n, generator=gen) < 0.125, torch.zeros_like(x), x)


def make_case(shapes, pdt, gdt, sdt, seed=0, hard=True, nonfinite=False):
    """params, grads, states on DEVICE. Hard cases: every binade the storage dtype holds,
    exact zeros where m = g = 0 (sign(0) = 0 must leave θ alone), g = -m (cancels exactly
    when beta1 = 0.5), and optionally NaN / ±Inf grads."""
    gen = torch.Generator().manual_seed(seed)
    lim = {F32: (127, -149), BF16: (127, -133), F16: (15, -24)}
    ps, gs, ms = [], [], []
    for shape in shapes:
        n = int(torch.tensor(shape).prod()) if shape else 1
        if hard:
            hi, lo = lim[pdt]
            p = hard_values(n, gen, min(hi, 8), max(lo, -20))
            g = hard_values(n, gen, *lim[gdt] if gdt != torch.int16 else (8, -20))
            m = hard_values(n, gen, *lim[sdt]) if sdt != torch.int16 else None
        else:
            p, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
            m = torch.randn(n, generator=gen) if sdt != torch.int16 else None
        if m is None:
            m = torch.randint(-20, 21, (n,), generator=gen)
        elif n > 4:
            z = torch.rand(n, generator=gen) < 0.1
            m = torch.where(z, torch.zeros_like(m), m)
            g = torch.where(z, torch.zeros_like(g), g)
            c = torch.rand(n, generator=gen) < 0.1
            g = torch.where(c, -m.to(F32), g)
        if nonfinite and n > 4:
            g[1], g[2], g[3] = float("nan"), float("inf"), float("-inf")
        ps.append(p.to(pdt).reshape(shape).to(DEVICE))
        gs.append(g.to(gdt).reshape(shape).to(DEVICE))
        ms.append(m.to(sdt).reshape(shape).to(DEVICE))
    return ps, gs, ms


def steps_of(shapes, t):
    return [torch.tensor(t, dtype=torch.int64, device=DEVICE) for _ in shapes]


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def assert_bitwise(outs, refs, what):
    for i, (a, b) in enumerate(zip(outs, refs)):
        a, b = a.cpu(), b.cpu()
        if a.is_floating_point():
            # NaN payloads may differ only if both are NaN; every kernel writes the same quiet NaN.
            same = (bits(a) == bits(b)) | (torch.isnan(a) & torch.isnan(b))
        else:
            same = a == b
        n_bad = int((~same).sum())
        assert n_bad == 0, f"{what}[{i}] shape {tuple(a.shape)}: {n_bad} elements differ, e.g. " \
            f"{a.reshape(-1)[~same.reshape(-1)][:4].tolist()} vs {b.reshape(-1)[~same.reshape(-1)][:4].tolist()}"


def clone(ts):
    return [t.clone() for t in ts]


# ---------------------------------------------------------------- the three ops, both backends
def call(backend, algo, ps, gs, ms, steps, *, lr=1e-2, lr_t=None, wd=0.1, betas=(0.9, 0.99),
         beta=0.965, k=2, shrink=0.99, window=16, thr=3, roles=None, scale=None, found=None,
         sr=False):
    seeds = [_rng.tensor_seed(1234, i) for i in range(len(ps))]
    if algo == "lion":
        backend.lion_(ps, gs, ms, steps, lr, lr_t, betas[0], betas[1], wd, scale, found, seeds, sr)
    elif algo == "tiger":
        roles = roles if roles is not None else TIGER_ROLES[: len(ps)]
        backend.tiger_(ps, gs, ms, steps, roles, lr, lr_t, beta, wd, k, shrink, scale, found, seeds, sr)
    else:
        backend.simba_(ps, gs, ms, steps, lr, lr_t, window, thr, wd, scale, found, seeds, sr)


def run_both(algo, ps, gs, ms, n_steps=2, t0=0, **kw):
    """n_steps calls of the Triton op and of the reference op on copies; bitwise comparison."""
    a_p, a_m, b_p, b_m = clone(ps), clone(ms), clone(ps), clone(ms)
    steps = steps_of(ps, t0)  # persistent, as the optimizer's state: the table is reused
    for t in range(t0, t0 + n_steps):
        call(skt, algo, a_p, gs, a_m, steps, **kw)
        call(ref, algo, b_p, gs, b_m, steps, **kw)
        torch._foreach_add_(steps, 1)
        assert_bitwise(a_p, b_p, f"{algo} params t={t}")
        assert_bitwise(a_m, b_m, f"{algo} state t={t}")
    return a_p, a_m


# Every supported (param, grad, state) combination; SR only where a bf16 buffer exists.
def _float_combos():
    out = []
    for p in (F32, BF16, F16):
        for g in dict.fromkeys((p, F32)):
            for m in dict.fromkeys((p, F32, BF16)):
                for sr in (False, True):
                    if sr and BF16 not in (p, m):
                        continue
                    out.append(pytest.param(p, g, m, sr, id=f"p{p}-g{g}-m{m}-sr{int(sr)}".replace("torch.", "")))
    return out


@pytest.mark.parametrize("pdt,gdt,sdt,sr", _float_combos())
def test_lion_bitwise(pdt, gdt, sdt, sr):
    ps, gs, ms = make_case(SHAPES, pdt, gdt, sdt, seed=1, nonfinite=True)
    run_both("lion", ps, gs, ms, sr=sr)
    run_both("lion", ps, gs, ms, sr=sr, betas=(0.5, 0.99), t0=5)  # g = -m cancels exactly


@pytest.mark.parametrize("pdt,gdt,sdt,sr", _float_combos())
def test_tiger_bitwise(pdt, gdt, sdt, sr):
    ps, gs, ms = make_case(SHAPES, pdt, gdt, sdt, seed=2)
    # k = 2 over t = 0, 1, 2: decay-only call, update call, decay call again.
    run_both("tiger", ps, gs, ms, n_steps=3, k=2, sr=sr)


@pytest.mark.parametrize("pdt,gdt,sr", [(F32, F32, False), (BF16, BF16, False), (BF16, F32, False),
                                         (BF16, BF16, True), (BF16, F32, True), (F16, F16, False),
                                         (F16, F32, False)])
def test_simba_bitwise(pdt, gdt, sr):
    ps, gs, ms = make_case(SHAPES, pdt, gdt, torch.int16, seed=3, nonfinite=True)
    run_both("simba", ps, gs, ms, n_steps=3, window=16, thr=3, sr=sr)


# ---------------------------------------------------------------- against the fp64 oracle
def _oracle(algo, ps, gs, ms, t, **kw):
    p64 = [p.double() for p in ps]
    m64 = [m.double() if m.is_floating_point() else m.clone() for m in ms]
    g64 = [g.double() for g in gs]
    call(ref, algo, p64, g64, m64, steps_of(ps, t), **kw)
    return p64, m64


@pytest.mark.parametrize("algo", ["lion", "tiger", "simba"])
def test_fp32_matches_fp64_oracle(algo):
    """fp32 kernels vs the fp64 reference: a few ulps everywhere except where the sign
    argument is within rounding of zero; those flips are counted and bounded."""
    sdt = torch.int16 if algo == "simba" else F32
    ps, gs, ms = make_case(SHAPES, F32, F32, sdt, seed=4, nonfinite=(algo != "tiger"))
    kw = dict(k=1) if algo == "tiger" else {}
    ulp = 2.0 ** -23
    for t in range(2):
        p_old, m_old = [p.cpu().double() for p in ps], [m.cpu().double() for m in ms]
        p64, m64 = _oracle(algo, ps, gs, ms, t, **kw)
        call(skt, algo, ps, gs, ms, steps_of(ps, t), **kw)
        total = flips = 0
        for i, (p, q) in enumerate(zip(ps, p64)):
            p, q = p.cpu().double(), q.cpu()
            # a few ulps of the operands (|θ|, the step, which is at most ~1 here)
            ok = ((p - q).abs() <= 8 * ulp * (p_old[i].abs() + q.abs() + 1)) | (p == q)
            ok |= torch.isnan(p) & torch.isnan(q)
            # a sign flip (|c| within rounding of 0) moves θ by at most 2 lr_p
            assert bool(((p - q).abs()[~ok] <= 2.5 * 1e-2 * 300).all()), f"{algo} params[{i}] far off"
            flips += int((~ok).sum())
            total += p.numel()
        for i, (m, q) in enumerate(zip(ms, m64)):
            m, q = m.cpu(), q.cpu()
            if not m.is_floating_point():
                assert torch.equal(m, q), f"{algo} counters[{i}]"
                continue
            m, g = m.double(), gs[i].cpu().double()
            tol = 4 * ulp * (m_old[i].abs() + g.abs()) + 2.0 ** -147  # rounding of b m and c g
            ok = ((m - q).abs() <= tol) | (m == q) | (torch.isnan(m) & torch.isnan(q))
            ok |= torch.isinf(m) & (q.abs() >= 3.4e38)  # fp32 overflow of a finite fp64 value
            assert bool(ok.all()), f"{algo} state[{i}]: {int((~ok).sum())} elements off, e.g. " \
                f"{m[~ok][:3].tolist()} vs {q[~ok][:3].tolist()}"
        # Exact zeros and exactly cancelling pairs give sign 0 in both precisions; only |c|
        # within rounding of 0 may flip.
        assert flips <= max(2, total // 100), f"{algo}: {flips} sign flips of {total}"


@pytest.mark.parametrize("pdt", [BF16, F16])
def test_16bit_error_at_most_reference(pdt):
    """16-bit storage: the kernel's error vs fp64 is the reference's (it is the same rounding)."""
    ps, gs, ms = make_case(SHAPES, pdt, F32, F32, seed=5, hard=False)
    p64, _ = _oracle("lion", ps, gs, ms, 0)
    a, b = clone(ps), clone(ps)
    call(skt, "lion", a, gs, clone(ms), steps_of(ps, 0))
    call(ref, "lion", b, gs, clone(ms), steps_of(ps, 0))
    for x, y, q in zip(a, b, p64):
        ex = (x.double() - q).abs().max() if x.numel() else 0
        ey = (y.double() - q).abs().max() if y.numel() else 0
        assert ex <= ey


# ---------------------------------------------------------------- semantics that matter
def test_sign_of_zero_leaves_param():
    # m = g = 0, no decay: sign(0) = 0, so θ must not move (DeepSpeed's GPU Lion moved it by +lr).
    p = torch.linspace(-1, 1, 4097, device=DEVICE)
    z = torch.zeros_like(p)
    for algo, m in (("lion", z.clone()), ("tiger", z.clone()), ("simba", torch.zeros_like(p, dtype=torch.int16))):
        q = p.clone()
        call(skt, algo, [q], [z], [m], steps_of([q], 0), wd=0.0, k=1, roles=[0])
        assert torch.equal(q, p), algo
        assert not bool(m.any()), algo


def test_nan_grad_sign_is_zero():
    p = torch.ones(8, device=DEVICE)
    g = torch.full_like(p, float("nan"))
    m = torch.zeros_like(p)
    call(skt, "lion", [p], [g], [m], steps_of([p], 0), wd=0.0)
    assert torch.equal(p, torch.ones_like(p))  # c = NaN, sign(NaN) = 0
    assert bool(torch.isnan(m).all())


def test_found_inf_skips_and_grad_scale_divides():
    ps, gs, ms = make_case(SHAPES, F32, F32, F32, seed=6, hard=False)
    for algo in ("lion", "tiger", "simba"):
        st = [m.to(torch.int16) for m in ms] if algo == "simba" else ms
        a_p, a_m = clone(ps), clone(st)
        call(skt, algo, a_p, gs, a_m, steps_of(ps, 1), k=1,
             found=torch.tensor(1.0, device=DEVICE), scale=torch.tensor(0.0, device=DEVICE))
        assert_bitwise(a_p, ps, f"{algo} found_inf params")
        assert_bitwise(a_m, st, f"{algo} found_inf state")
        scale = torch.tensor(1024.0, device=DEVICE)
        run_both(algo, ps, [g * 1024 for g in gs], st, n_steps=1, t0=1, k=1, scale=scale,
                 found=torch.tensor(0.0, device=DEVICE))


def test_lr_tensor_same_as_float():
    ps, gs, ms = make_case(SHAPES, BF16, BF16, BF16, seed=7, hard=False)
    for algo in ("lion", "tiger"):
        a_p, a_m, b_p, b_m = clone(ps), clone(ms), clone(ps), clone(ms)
        call(skt, algo, a_p, gs, a_m, steps_of(ps, 1), lr=3e-3, k=1, sr=True)
        call(skt, algo, b_p, gs, b_m, steps_of(ps, 1), lr=123.0, k=1, sr=True,
             lr_t=torch.tensor(3e-3, dtype=torch.float64, device=DEVICE))
        assert_bitwise(a_p, b_p, f"{algo} lr_t")
        assert_bitwise(a_m, b_m, f"{algo} lr_t state")


def test_tiger_nan_guard_per_tensor_and_window():
    shapes = [(4, 6), (9,), (5, 3), (7,)]
    roles = [3, 1, 2, 0]
    ps, gs, ms = make_case(shapes, F32, F32, F32, seed=8, hard=False)
    gs[1][4] = float("nan")  # only the gain tensor is guarded
    gs[2][0, 0] = 0.0
    kw = dict(k=3, roles=roles)
    a_p, a_m = run_both("tiger", ps, gs, ms, n_steps=6, **kw)
    # gain: 6 shrinks towards 1, momentum untouched
    expect = ps[1].clone()
    for _ in range(6):
        expect = (expect - 1.0) * torch.tensor(0.99) + 1.0
    assert torch.equal(a_p[1], expect) and torch.equal(a_m[1], ms[1])
    # the others moved (t = 2 and 5 are update calls)
    assert not torch.equal(a_p[0], ps[0]) and not torch.equal(a_p[3], ps[3])


def test_multi_tensor_table_one_launch_and_cache(monkeypatch):
    """148 tensors (GPT-2's count): empty, tiny and odd sizes, several steps, one launch per call
    (Lion), three for Tiger; the table is built once and rebuilt when an address changes."""
    gen = torch.Generator().manual_seed(9)
    sizes = torch.randint(0, 40, (148,), generator=gen).tolist()
    sizes[:4] = [0, 1, 4097, 0]
    shapes = [(s,) for s in sizes]
    launches = []
    for name in ("sign_step_kernel", "tiger_rows_kernel", "tiger_finish_kernel"):
        kern = getattr(K, name)
        orig = kern.run

        def counting(*a, _orig=orig, _name=name, **kw):
            launches.append(_name)
            return _orig(*a, **kw)

        monkeypatch.setattr(kern, "run", counting)
    L.clear_cache()
    ps, gs, ms = make_case(shapes, BF16, F32, BF16, seed=10, hard=False)
    run_both("lion", ps, gs, ms, n_steps=2, sr=True)
    assert launches == ["sign_step_kernel"] * 2
    assert len(L._plans) == 1  # built once, reused on the second step
    gs2 = [g.clone() for g in gs[:6]]  # new grad addresses: new table
    run_both("lion", ps[:6], gs2, ms[:6], n_steps=1)
    assert len(L._plans) == 2
    launches.clear()
    roles = [int(r) if s else 3 for r, s in zip(torch.randint(0, 4, (40,), generator=gen), sizes)]
    run_both("tiger", ps[:40], gs[:40], ms[:40], n_steps=1, k=1, roles=roles)
    assert launches == ["tiger_rows_kernel", "tiger_finish_kernel", "sign_step_kernel"]


@pytest.fixture
def no_captured_plans():
    L._captured_plans.clear()
    yield
    L._captured_plans.clear()


def test_plan_built_while_capturing_is_kept_and_reused(monkeypatch, no_captured_plans):
    """NOTE: [plans in CUDA graphs], the host side (capture itself needs a GPU: the test below):
    a plan built while the stream captures keeps its host table and outlives any number of newer
    plans; eager calls with the same key use it; one found in the LRU at capture moves over."""
    L.clear_cache()
    shapes = [(5,), (4097,), (3, 7)]
    ps, gs, ms = make_case(shapes, F32, F32, F32, seed=3, hard=False)
    steps = steps_of(ps, 0)
    capturing = [True]
    monkeypatch.setattr(L, "_capturing", lambda device: capturing[0])
    call(skt, "lion", ps, gs, ms, steps)
    assert len(L._captured_plans) == 1 and not L._plans
    (plan,) = L._captured_plans.values()
    assert plan.host is not None and torch.equal(plan.host.cpu(), plan.meta.cpu())
    capturing[0] = False
    kept = []  # live clones: each its own address, so its own key
    for i in range(L._PLAN_CACHE_SIZE + 3):  # more parameter sets than the LRU holds
        kept.append(gs[0].clone())
        call(skt, "lion", ps[:1], kept[-1:], ms[:1], steps[:1])
    assert len(L._plans) == L._PLAN_CACHE_SIZE
    assert list(L._captured_plans.values()) == [plan]
    build = L._build_plan
    built = []
    monkeypatch.setattr(L, "_build_plan", lambda *a, **k: built.append(1) or build(*a, **k))
    a_p, a_m = clone(ps), clone(ms)
    call(skt, "lion", ps, gs, ms, steps)  # eager, same key: the captured plan
    assert not built
    call(ref, "lion", a_p, gs, a_m, steps)
    assert_bitwise(ps, a_p, "params")
    assert_bitwise(ms, a_m, "state")
    # a plan already in the LRU when capture begins moves to the kept ones, unchanged
    counts = [torch.zeros(p.shape, dtype=torch.int16, device=DEVICE) for p in ps]
    call(skt, "simba", ps, gs, counts, steps)
    key = next(reversed(L._plans))
    eager = L._plans[key]
    capturing[0] = True
    call(skt, "simba", ps, gs, counts, steps)
    assert L._captured_plans[key] is eager and key not in L._plans
    assert len(built) == 1 and eager.host is None


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graph capture needs a GPU")
@pytest.mark.parametrize("algo", ["lion", "tiger", "simba"])
def test_cuda_graph_capture_builds_its_plan_and_replays_bitwise(algo, no_captured_plans):
    """Capture with the plan missing (new grads, as after zero_grad(set_to_none=True) in a
    whole-network capture; Tiger's key also changes after its first step): the plan is built
    inside the capture without a stream sync, and replays equal eager calls bit for bit."""
    shapes = [(257, 33), (4097,), (8,), (3, 5, 7)]
    sdt = torch.int16 if algo == "simba" else BF16
    ps, gs, ms = make_case(shapes, BF16, F32, sdt, seed=21, hard=False)
    lr_t = torch.tensor(1e-3, device=DEVICE)
    pe, me = clone(ps), clone(ms)
    steps_g, steps_e = steps_of(ps, 0), steps_of(ps, 0)
    L.clear_cache()

    def step(p, g, m, st):
        call(skt, algo, p, g, m, st, lr_t=lr_t, sr=True)
        torch._foreach_add_(st, 1)

    # eager warm-up of both twins: the kernels are compiled (and loaded) outside the capture
    step(ps, gs, ms, steps_g)
    step(pe, gs, me, steps_e)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_static = [g.clone() for g in gs]  # new addresses, from the graph's pool: a missing plan
        step(ps, g_static, ms, steps_g)
    assert len(L._captured_plans) == 1
    for i in range(4):
        graph.replay()
        step(pe, gs, me, steps_e)
        lr_t.mul_(0.5)  # the graph reads the current lr on the device
    torch.cuda.synchronize()
    assert_bitwise(ps, pe, f"{algo} params")
    assert_bitwise(ms, me, f"{algo} state")
    assert [int(s) for s in steps_g] == [int(s) for s in steps_e] == [5] * len(shapes)


# ---------------------------------------------------------------- conversions and SR bits
@triton.jit
def _convert_kernel(x_ptr, bf_ptr, hf_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(bf_ptr + offs, K._bf16_bits(x, 0, False).to(tl.int32), mask=mask)
    tl.store(hf_ptr + offs, K._fp16_bits(x).to(tl.int32), mask=mask)


def test_conversions_round_to_nearest_even():
    gen = torch.Generator().manual_seed(11)
    rnd = torch.randint(-2**31, 2**31, (1 << 16,), generator=gen, dtype=torch.int64).to(torch.int32)
    # ties and near-ties of both formats, fp16 subnormal/overflow edges, specials
    edges = torch.tensor([0x00000000, 0x80000000, 0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001,
                          0x477FEFFF, 0x477FF000, 0x477FE000, 0x387FC000, 0x38800000, 0x33000000,
                          0x33000001, 0x33800000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001,
                          0xFFFFFFFF, 0x7F7FFFFF, 0x00000001], dtype=torch.int64).to(torch.int32)
    x = torch.cat([rnd, edges]).view(F32).to(DEVICE)
    bf = torch.empty(x.numel(), dtype=torch.int32, device=DEVICE)
    hf = torch.empty_like(bf)
    _convert_kernel[(triton.cdiv(x.numel(), 8192),)](x, bf, hf, x.numel(), BLOCK=8192)
    x = x.cpu()
    want_bf = bits(x.to(BF16)).to(torch.int32) & 0xFFFF
    want_hf = bits(x.to(F16)).to(torch.int32) & 0xFFFF
    nan = torch.isnan(x)
    sign = (x.view(torch.int32) < 0).to(torch.int32) << 15
    assert torch.equal(bf.cpu()[~nan], want_bf[~nan])
    assert torch.equal(hf.cpu()[~nan], want_hf[~nan])
    assert torch.equal(bf.cpu()[nan], sign[nan] | 0x7FC0)  # quiet NaN, sign kept
    assert torch.equal(hf.cpu()[nan], sign[nan] | 0x7E00)


@triton.jit
def _sr_bits_kernel(idx_ptr, out_ptr, seed, step, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    idx = tl.load(idx_ptr + offs, mask=mask)
    key = K._sr_key(tl.cast(seed, tl.uint32), tl.cast(step, tl.int64), K.SALT_STATE)
    tl.store(out_ptr + offs, K._sr_bits(key, idx).to(tl.int64), mask=mask)


def test_sr_bits_match_rng_including_high_index_bits():
    idx = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 7, 3 * 2**40 + 5], dtype=torch.int64)
    seed, step = _rng.tensor_seed(77, 3), 2**33 + 11
    out = torch.empty_like(idx, device=DEVICE)
    _sr_bits_kernel[(1,)](idx.to(DEVICE), out, seed, step, idx.numel(), BLOCK=8)
    key = _rng.sr_key(seed, step, _rng.STREAM_STATE)
    want = [_rng.mix32(key ^ _rng.mix32((i & 0xFFFFFFFF) ^ (((i >> 32) * 0x85EBCA6B) & 0xFFFFFFFF)))
            for i in idx.tolist()]
    assert out.cpu().tolist() == want


# ---------------------------------------------------------------- the boring edges
def test_empty_lists_and_all_empty_tensors():
    call(skt, "lion", [], [], [], [])
    ps, gs, ms = make_case([(0,), (0, 3)], F32, F32, F32)
    call(skt, "tiger", ps, gs, ms, steps_of(ps, 0), roles=[3, 2])


def test_rejects_what_the_optimizer_never_sends():
    ps, gs, ms = make_case([(4,), (6,)], F32, F32, F32, hard=False)
    with pytest.raises(TypeError, match="params\\[1\\]"):
        call(skt, "lion", [ps[0], ps[1].to(BF16)], gs, ms, steps_of(ps, 0))
    with pytest.raises(ValueError, match="not contiguous"):
        call(skt, "lion", [ps[0], torch.zeros(12, device=DEVICE)[::2]], gs, ms, steps_of(ps, 0))
    with pytest.raises(ValueError, match="steps\\[0\\]"):
        call(skt, "lion", ps, gs, ms, [torch.tensor(0.0, device=DEVICE)] * 2)
    with pytest.raises(TypeError, match="int16"):
        call(skt, "simba", ps, gs, ms, steps_of(ps, 0))


# ---------------------------------------------------------------- the compiled kernels' paths
def test_full_block_row_and_alignment_paths():
    """The paths the GPU kernels split into (NOTE: [vector hints]), each against the reference:
    full and tail blocks; embedding rows shorter than, equal to and longer than BLOCK (a block
    crossing a row boundary); row lengths that are and are not multiples of 8 in Tiger's
    statistics pass (its vector fast path and its row-at-a-time path), whole statistics tiles
    and a partial last one; and a table with an address that is not 16-byte aligned."""
    blk = L.BLOCK
    shapes = [(2 * blk,), (3, blk), (2, blk + 8), (40, 24), (17, 264), (5, 7), (33, 256)]
    roles = [3, 2, 2, 2, 2, 2, 3]
    for pdt, sdt, sr in ((F32, F32, False), (BF16, BF16, True)):
        ps, gs, ms = make_case(shapes, pdt, pdt, sdt, seed=21, hard=False)
        run_both("tiger", ps, gs, ms, n_steps=2, k=1, roles=roles, sr=sr)
        run_both("lion", ps, gs, ms, n_steps=1, sr=sr)
    # one misaligned grad (a view one element in; run_both copies params and states, not
    # grads) takes every tensor off the aligned path
    ps, gs, ms = make_case([(blk + 3,), (blk,)], F32, F32, F32, seed=22, hard=False)
    buf = torch.zeros(blk + 1, device=DEVICE)
    gs[1] = buf[1:].copy_(gs[1])
    L.clear_cache()
    run_both("simba", ps, gs, [torch.zeros_like(p, dtype=torch.int16) for p in ps], n_steps=1)
    run_both("tiger", ps, gs, ms, n_steps=1, k=1, roles=[3, 2])
    assert not next(reversed(L._plans.values())).aligned
