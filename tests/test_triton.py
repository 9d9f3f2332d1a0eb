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
from conftest import bits, same_bits  # noqa: E402

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


def assert_bitwise(outs, refs, what):
    for i, (a, b) in enumerate(zip(outs, refs)):
        a, b = a.cpu(), b.cpu()
        same = same_bits(a, b)  # NaN payloads may differ only if both are NaN
        n_bad = int((~same).sum())
        assert n_bad == 0, f"{what}[{i}] shape {tuple(a.shape)}: {n_bad} elements differ, e.g. " \
            f"{a.reshape(-1)[~same.reshape(-1)][:4].tolist()} vs {b.reshape(-1)[~same.reshape(-1)][:4].tolist()}"


def clone(ts):
    return [t.clone() for t in ts]


# ---------------------------------------------------------------- the three ops, both backends
def call(backend, algo, ps, gs, ms, steps, *, lr=1e-2, lr_t=None, wd=0.1, betas=(0.9, 0.99),
         beta=0.965, k=2, shrink=0.99, window=16, thr=3, roles=None, scale=None, found=None,
         sr=False, clip=None):
    seeds = [_rng.tensor_seed(1234, i) for i in range(len(ps))]
    extra = {} if clip is None else dict(clip=clip)  # omitted: the call of before `clip` existed
    if algo == "lion":
        backend.lion_(ps, gs, ms, steps, lr, lr_t, betas[0], betas[1], wd, scale, found, seeds, sr, **extra)
    elif algo == "tiger":
        roles = roles if roles is not None else TIGER_ROLES[: len(ps)]
        backend.tiger_(ps, gs, ms, steps, roles, lr, lr_t, beta, wd, k, shrink, scale, found, seeds, sr, **extra)
    else:
        backend.simba_(ps, gs, ms, steps, lr, lr_t, window, thr, wd, scale, found, seeds, sr, **extra)


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
    capturing = [False]
    monkeypatch.setattr(L, "_capturing", lambda device: capturing[0])
    call(skt, "lion", ps, clone(gs), ms, steps)  # the eager warm-up (NOTE: [pinned staging])
    warm = set(L._plans)
    capturing[0] = True
    call(skt, "lion", ps, gs, ms, steps)  # new grads: a new plan, built "in the capture"
    assert len(L._captured_plans) == 1 and set(L._plans) == warm
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


def test_capture_stages_its_table_in_memory_made_before_it(monkeypatch, no_captured_plans):
    """NOTE: [pinned staging]: a plan built while capturing copies its table from a region of the
    staging buffer (pinned on CUDA: torch refuses CPU->CUDA copies from unpinned memory during
    capture, and pinned memory cannot be allocated there), made by an eager call before; a
    parameter set never run eagerly is refused with a message asking for that eager step."""
    L.clear_cache()
    L._staging.clear()
    ps, gs, ms = make_case([(5,), (4097,)], F32, F32, F32, seed=4, hard=False)
    steps = steps_of(ps, 0)
    capturing = [True]
    monkeypatch.setattr(L, "_capturing", lambda device: capturing[0])
    with pytest.raises(RuntimeError, match="eager step with the same parameters"):
        call(skt, "lion", ps, gs, ms, steps)
    assert not L._captured_plans
    allocs = []
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: allocs.append(k.get("pin_memory")) or empty(*a, **k))
    capturing[0] = False
    call(skt, "lion", ps, clone(gs), ms, steps)  # eager: makes room (pinned on CUDA)
    assert allocs[-1] == (DEVICE == "cuda")
    (buf, used), = L._staging.values()
    assert used == 0
    allocs.clear()
    capturing[0] = True
    a_p, a_m = clone(ps), clone(ms)
    call(skt, "lion", ps, gs, ms, steps)
    assert not allocs  # no memory made for the table during capture
    (plan,) = L._captured_plans.values()
    region = plan.host
    assert buf.data_ptr() <= region.data_ptr() < buf.data_ptr() + 8 * buf.numel()
    assert L._staging[str(ps[0].device)][1] == region.numel() == plan.meta.numel()
    call(ref, "lion", a_p, gs, a_m, steps)
    assert_bitwise(ps, a_p, "params")
    # the next eager call grows the room again; the region taken stays as it is
    capturing[0] = False
    saved = region.clone()
    call(skt, "lion", ps, clone(gs), ms, steps)
    st = L._staging[str(ps[0].device)]
    assert st[0].numel() - st[1] >= plan.meta.numel()
    assert torch.equal(region, saved) and torch.equal(plan.host.cpu(), plan.meta.cpu())


def test_plans_are_per_stream(monkeypatch):
    """NOTE: [plans per stream]: the same tensors on another stream get their own plan (tables
    and scratch), so two streams never share Tiger's statistics buffers, and freeing a plan is
    ordered after its last use by its own stream."""
    L.clear_cache()
    ps, gs, ms = make_case([(4, 6), (7,)], F32, F32, F32, seed=5, hard=False)
    stream = [1]
    monkeypatch.setattr(L, "_stream_key", lambda device: stream[0])
    steps = steps_of(ps, 0)
    a_p, a_m = clone(ps), clone(ms)
    call(skt, "tiger", ps, gs, ms, steps, k=1, roles=[3, 0])
    stream[0] = 2
    call(skt, "tiger", ps, gs, ms, steps, k=1, roles=[3, 0])
    for _ in range(2):
        call(ref, "tiger", a_p, gs, a_m, steps, k=1, roles=[3, 0])
    assert_bitwise(ps, a_p, "params")
    a, b = L._plans.values()
    assert a.ident == b.ident and a.meta.data_ptr() != b.meta.data_ptr()
    assert not {t.data_ptr() for t in a.stats} & {t.data_ptr() for t in b.stats}


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



def test_one_misaligned_tensor_keeps_the_others_aligned(monkeypatch):
    """NOTE: [per-tensor alignment]: a misaligned grad (a view one element in; run_both copies
    params and states, not grads) takes only its own tensor off the aligned path: the others'
    blocks run in an aligned launch, its blocks in an unaligned one, with the same results."""
    blk = L.BLOCK
    ps, gs, ms = make_case([(blk + 3,), (blk,), (2, 300)], F32, F32, F32, seed=22, hard=False)
    buf = torch.zeros(blk + 1, device=DEVICE)
    gs[1] = buf[1:].copy_(gs[1])
    launches = []
    for name in ("sign_step_kernel", "tiger_rows_kernel", "tiger_sumsq_kernel"):
        kern = getattr(K, name)
        orig = kern.run

        def recording(*a, _orig=orig, _name=name, **kw):
            launches.append((_name, kw["grid"][0], kw["ALIGNED"]))
            return _orig(*a, **kw)

        monkeypatch.setattr(kern, "run", recording)
    L.clear_cache()
    run_both("simba", ps, gs, [torch.zeros_like(p, dtype=torch.int16) for p in ps], n_steps=1)
    assert launches == [("sign_step_kernel", 3, True), ("sign_step_kernel", 1, False)]
    launches.clear()
    run_both("tiger", ps, gs, ms, n_steps=1, k=1, roles=[3, 3, 2])  # the misaligned one a matrix
    plan = next(reversed(L._plans.values()))
    assert (plan.n_blocks_al, plan.n_blocks) == (3, 4) and not plan.aligned
    assert launches == [("tiger_rows_kernel", 2, True), ("tiger_rows_kernel", 1, False),
                        ("tiger_sumsq_kernel", 3, True), ("tiger_sumsq_kernel", 1, False),
                        ("sign_step_kernel", 3, True), ("sign_step_kernel", 1, False)]
    # the sums out of the split launches (NOTE: [Tiger sums of squares out]) are the next
    # call's own pre-pass sums, bit for bit
    p2, m2, steps = clone(ps), clone(ms), steps_of(ps, 0)
    seeds = [_rng.tensor_seed(1234, i) for i in range(3)]
    out = torch.zeros(4, dtype=torch.float64, device=DEVICE)
    skt.tiger_(p2, gs, m2, steps, [3, 3, 2], 1e-2, None, 0.965, 0.1, 1, 0.99, None, None, seeds, False,
               sumsq_out=out, sumsq_out_at=[0, 1, 2])
    skt.tiger_(p2, gs, m2, steps, [3, 3, 2], 1e-2, None, 0.965, 0.1, 1, 0.99, None, None, seeds, False)
    plan = next(reversed(L._plans.values()))
    row_sumsq, t_sumsq = plan.stats[0], plan.stats[6]
    assert bits(out[:2].cpu()).tolist() == bits(t_sumsq[:2].cpu()).tolist()
    slot = int(plan.tensors.reshape(3, -1)[2, K.F_SLOT.value])
    assert bits(out[2:].cpu()).tolist() == bits(row_sumsq[slot:slot + 2].cpu()).tolist()


# ---------------------------------------------------------------- clipping inside the step
def _clipped(gs, scale, clip):
    """The gradient the ops use with ``clip`` (NOTE: [clipping inside the step]), as torch's
    fp32 ops give it: clip_grad_norm_'s g.mul_(clip) on fp32 gradients (divided by the scale
    first when one is given)."""
    out = []
    for g in gs:
        g = g.float().clone()
        if scale is not None:
            g.div_(scale)
        out.append(g.mul_(clip))
    return out


CLIP_CASES = [pytest.param(F32, F32, F32, False, id="fp32"),
              pytest.param(BF16, BF16, BF16, True, id="bf16-sr"),
              pytest.param(BF16, F32, BF16, False, id="bf16-fp32grads")]


@pytest.mark.parametrize("algo", ["lion", "tiger", "simba"])
@pytest.mark.parametrize("pdt,gdt,sdt,sr", CLIP_CASES)
@pytest.mark.parametrize("scaled", [False, True], ids=["noscale", "scale"])
def test_clip_is_the_step_on_clipped_grads(algo, pdt, gdt, sdt, sr, scaled):
    """With ``clip`` the step equals the step without it on g / scale * clip (fp32 grads, so
    nothing is rounded twice), bit for bit, and the reference's step with the same ``clip``.
    clip = 0 turns the Inf grads into NaN (0 * Inf): Tiger's guard must see those NaNs."""
    sdt = torch.int16 if algo == "simba" else sdt
    ps, gs, ms = make_case(SHAPES, pdt, gdt, sdt, seed=31, nonfinite=True)
    for i in (3, 4):  # ±Inf and no NaN: Tiger updates them, unless the clip makes a NaN
        gs[i].view(-1)[1] = 0.5
    # a scale that is not a power of two: the division rounds, so its order against the clip shows
    scale = torch.tensor(1000.0, device=DEVICE) if scaled else None
    if scaled:
        gs = [(g.float() * 1000).to(gdt) for g in gs]
    kw = dict(k=1) if algo == "tiger" else {}
    for c in (0.37, 0.0):
        clip = torch.tensor(c, device=DEVICE)
        steps = steps_of(ps, 3)
        a_p, a_m, b_p, b_m = clone(ps), clone(ms), clone(ps), clone(ms)
        call(skt, algo, a_p, gs, a_m, steps, scale=scale, clip=clip, sr=sr, **kw)
        call(skt, algo, b_p, _clipped(gs, scale, clip), b_m, steps, sr=sr, **kw)
        assert_bitwise(a_p, b_p, f"{algo} clip={c} params")
        assert_bitwise(a_m, b_m, f"{algo} clip={c} state")
        if algo == "tiger":
            # tensors 2 and 5 hold a NaN (guarded), 3 and 4 an Inf: NaN once multiplied by 0
            assert [torch.equal(a_m[i], ms[i]) for i in range(2, 6)] == [True, c == 0.0, c == 0.0, True], c
        run_both(algo, ps, gs, ms, n_steps=2, t0=3, scale=scale, clip=clip, sr=sr, **kw)


def test_clip_reads_the_device_value_each_call():
    """``clip`` is read on the device at every call (no host copy: CUDA graphs replay it), and
    clip = 1 is the step without it."""
    ps, gs, ms = make_case(SHAPES, F32, F32, F32, seed=32, hard=False)
    clip = torch.tensor(1.0, device=DEVICE)
    a_p, a_m, b_p, b_m = clone(ps), clone(ms), clone(ps), clone(ms)
    call(skt, "lion", a_p, gs, a_m, steps_of(ps, 0), clip=clip)
    call(skt, "lion", b_p, gs, b_m, steps_of(ps, 0))
    assert_bitwise(a_p, b_p, "clip=1 params")
    assert_bitwise(a_m, b_m, "clip=1 state")
    clip.fill_(0.25)  # same tensor, same plan, new value
    call(skt, "lion", a_p, gs, a_m, steps_of(ps, 1), clip=clip)
    call(skt, "lion", b_p, _clipped(gs, None, clip), b_m, steps_of(ps, 1))
    assert_bitwise(a_m, b_m, "clip=0.25 state")


@pytest.mark.parametrize("gdt,mdt", [(F32, F32), (BF16, BF16), (BF16, F32)])
def test_dist_lion_pack_clip(gdt, mdt):
    """Distributed Lion's pack pass: ``clip`` is the pass on g / scale * clip."""
    from sign_kernels.triton import _dist_lion as tri

    _, gs, ms = make_case([(4097,), (5,), (3, 7)], F32, gdt, mdt, seed=33, nonfinite=True)
    gs = [(g.float() * 64).to(gdt) for g in gs]
    scale, clip = torch.tensor(64.0, device=DEVICE), torch.tensor(0.3, device=DEVICE)
    a_m, b_m = clone(ms), clone(ms)
    a_o = [torch.zeros((g.numel() + 3) // 4, dtype=torch.uint8, device=DEVICE) for g in gs]
    b_o = clone(a_o)
    tri.dist_lion_pack_(gs, a_m, a_o, 0.9, 0.99, scale, None, clip)
    tri.dist_lion_pack_(_clipped(gs, scale, clip), b_m, b_o, 0.9, 0.99, None, None)
    assert_bitwise(a_m, b_m, "pack exp_avgs")
    assert_bitwise(a_o, b_o, "packed")
    assert any(not torch.equal(x, y) for x, y in zip(a_m, ms))


# ---------------------------------------------------------------- the norm pass (sumsq_)
def _sumsq(tensors, scale=None):
    out = torch.full((len(tensors),), -1.0, dtype=torch.float64, device=DEVICE)
    skt.sumsq_(tensors, scale, out)
    return out.cpu()


def _sumsq_order(x, scale=None):
    """NOTE: [Triton norm sums] in numpy: blocks of BLOCK from element 0, each a pairwise tree
    (adjacent pairs, level by level; zeros past the end), then runs of FINISH_BLOCK partials,
    each a pairwise tree, added left to right."""
    import numpy as np

    q = x.detach().cpu().float().reshape(-1)
    if scale is not None:
        q = q / scale.cpu()
    sq = q.double().square().numpy()

    def tree(v, width):
        v = np.concatenate([v, np.zeros(width - v.size)])
        while v.size > 1:
            v = v[0::2] + v[1::2]
        return v[0]

    parts = np.array([tree(sq[i:i + L.BLOCK], L.BLOCK) for i in range(0, sq.size, L.BLOCK)])
    total = np.float64(0.0)
    for c in range(0, parts.size, L.FINISH_BLOCK):
        total = total + tree(parts[c:c + L.FINISH_BLOCK], L.FINISH_BLOCK)
    return float(total)


NORM_SHAPES = [(0,), (1,), (5,), (3, 7), (4097,), (2, 3, 5), (3 * 2048 + 5,), (37 * 2048 + 11,)]


@pytest.mark.parametrize("dt", [F32, BF16, F16])
@pytest.mark.parametrize("scaled", [False, True], ids=["noscale", "scale"])
def test_sumsq_matches_fp64_and_its_order(dt, scaled):
    """sumsq_ = sum of (fp32(x) / scale)**2 in fp64: within 1e-12 of torch's fp64 sum (and of the
    reference backend's), and bit for bit the documented order."""
    gen = torch.Generator().manual_seed(41)
    xs = [(torch.randn(s, generator=gen) * 3).to(dt).to(DEVICE) for s in NORM_SHAPES]
    scale = torch.tensor(3.0, device=DEVICE) if scaled else None
    got = _sumsq(xs, scale)
    want = torch.empty(len(xs), dtype=torch.float64, device=DEVICE)
    ref.sumsq_(xs, scale, want)
    for i, x in enumerate(xs):
        q = x.float() / scale if scaled else x.float()
        exact = float(q.double().square().sum())
        assert abs(float(got[i]) - exact) <= 1e-12 * exact, (i, float(got[i]), exact)
        assert abs(float(got[i]) - float(want[i])) <= 1e-12 * exact, (i, float(got[i]), float(want[i]))
        assert float(got[i]) == _sumsq_order(x, scale), i
    assert float(got[0]) == 0.0  # the empty tensor


def test_sumsq_bits_depend_on_the_tensor_alone():
    """The same tensor gives the same bits whatever its companions in the call (their sizes, its
    position, their alignment) and whether it takes the aligned launch or not."""
    gen = torch.Generator().manual_seed(42)
    x = torch.randn(5 * 2048 + 77, generator=gen).to(DEVICE) * 1e3
    others = [torch.randn(n, generator=gen).to(DEVICE) for n in (3, 4097, 1000)]
    alone = _sumsq([x])[0]
    mixed = _sumsq([others[0], x, others[1], others[2]])[1]
    buf = torch.empty(x.numel() + 1, device=DEVICE)
    shifted = buf[1:].copy_(x)  # the same values, 4 bytes off 16-byte alignment
    odd = _sumsq([others[2], shifted])[1]
    first = _sumsq([shifted, others[2]])  # its blocks after those of the aligned tensor
    assert bits(alone) == bits(mixed) == bits(odd) == bits(first[0])
    assert float(first[1]) == _sumsq_order(others[2])
    assert float(alone) == _sumsq_order(x)
    # more block partials than one run of FINISH_BLOCK, of mixed magnitudes: the order of the
    # second pass shows in the bits
    n = (L.FINISH_BLOCK + 40) * L.BLOCK + 3
    y = (torch.randn(n, generator=gen) * torch.exp2(torch.randint(-30, 30, (n,), generator=gen).float())).to(DEVICE)
    got = _sumsq([x, y, others[0]])
    assert float(got[1]) == _sumsq_order(y) and bits(got[0]) == bits(alone)


def test_sumsq_nan_inf_empty():
    nan, inf = float("nan"), float("inf")
    a = torch.tensor([1.0, nan, 2.0], device=DEVICE)
    b = torch.tensor([1.0, -inf, 2.0], device=DEVICE)
    c = torch.tensor([inf, nan], device=DEVICE)
    big = torch.full((10,), 3e38, device=DEVICE)  # squares beyond fp32, fine in fp64
    e = torch.empty(0, device=DEVICE)
    got = _sumsq([a, b, c, big, e, torch.zeros(3, 4, device=DEVICE)])
    assert torch.isnan(got[0]) and torch.isnan(got[2])
    assert got[1] == inf and got[4] == 0.0 and got[5] == 0.0
    assert float(got[3]) == pytest.approx(10 * 9e76, rel=1e-6)
    # a quotient that overflows fp32 is +inf; a NaN in a later block still wins
    long = torch.ones(3 * L.BLOCK, device=DEVICE)
    long[5] = inf
    long[-1] = nan
    got = _sumsq([big, long], torch.tensor(1e-3, device=DEVICE))
    assert got[0] == inf and torch.isnan(got[1])
    got = _sumsq([e, e])
    assert got.tolist() == [0.0, 0.0]
    skt.sumsq_([], None, torch.empty(0, dtype=torch.float64, device=DEVICE))


def test_sumsq_bf16_and_plan_reuse(monkeypatch):
    """One cached table per tensor list: two launches a call, no new table while the tensors
    stay; out is written on the device (a CUDA graph replays it)."""
    gen = torch.Generator().manual_seed(43)
    xs = [torch.randn(n, generator=gen).to(BF16).to(DEVICE) for n in (7, 2 * 2048 + 1, 0)]
    L.clear_cache()
    launches = []
    for name in ("sumsq_blocks_kernel", "sumsq_total_kernel"):
        kern = getattr(K, name)
        orig = kern.run

        def counting(*a, _orig=orig, _name=name, **kw):
            launches.append(_name)
            return _orig(*a, **kw)

        monkeypatch.setattr(kern, "run", counting)
    first = _sumsq(xs)
    xs[0].mul_(2)
    second = _sumsq(xs)
    assert len(L._plans) == 1
    assert launches == ["sumsq_blocks_kernel", "sumsq_total_kernel"] * 2
    assert float(second[0]) == _sumsq_order(xs[0]) == 4 * float(first[0])
    assert float(second[1]) == float(first[1]) == _sumsq_order(xs[1])


def test_sumsq_rejects():
    x = torch.ones(4, device=DEVICE)
    out = torch.zeros(2, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="out must be"):
        skt.sumsq_([x], None, out)
    with pytest.raises(ValueError, match="out must be"):
        skt.sumsq_([x, x], None, out.float())
    with pytest.raises(TypeError, match="tensors\\[1\\]"):
        skt.sumsq_([x, x.to(BF16)], None, out)
    with pytest.raises(ValueError, match="not contiguous"):
        skt.sumsq_([x, torch.ones(8, device=DEVICE)[::2]], None, out)
    with pytest.raises(TypeError, match="fp32, bf16, fp16"):
        skt.sumsq_([x.double(), x.double()], None, out)


# ---------------------------------------------------------------- Tiger's NaN flags
def test_tiger_nan_flags_are_ored_not_summed():
    """NOTE: [NaN flags]: the per-row NaN results are combined by OR. Summed in int32, counts of
    2**31 - 1 and 1 NaNs (a tensor with 2**31 NaNs) wrap to -2**31 and read as no NaN."""
    p = torch.zeros(4 * L.STAT_COLS, device=DEVICE)  # a matrix: 4 virtual stats rows
    steps = steps_of([p], 0)
    plan = L._build_plan(L.ALGO_TIGER, [p], [p], [p], steps, [3], [0], p.device)
    row_sumsq, row_nan, t_nan, t_rms, row_rms, blk, t_sumsq = plan.stats
    for counts, want in (([0, 0, 0, 0], 0), ([2**31 - 1, 1, 0, 0], 1), ([0, 0, 0, 1], 1),
                         ([2**30] * 4, 1)):
        row_nan.copy_(torch.tensor(counts, dtype=torch.int32))
        K.tiger_finish_kernel[(1,)](plan.tensors, row_nan, row_sumsq, blk, 1, t_nan, t_rms, row_rms,
                                    t_sumsq, row_sumsq, **L.finish_config())
        assert int(t_nan[0]) == want, counts


# ---------------------------------------------------------------- 8-bit momentum and the correction byte
# NOTE: [int8 momentum] and NOTE: [correction byte] in csrc/core/sign_math.h; the ops' arguments:
# NOTE: [8-bit momentum and the correction byte] in sign_kernels/_ops.py. Every case is compared
# with the reference bit for bit: θ, the codes, the bf16 block scales and the correction bytes.
# Shapes: ragged last blocks, whole blocks, rows of 1, 3-d, several tiles of QROWS blocks on the
# any-row-length path (40 x 130) and on the whole-block path with a partial last tile (70 x 64).
Q8_SHAPES = [(5, 130), (9, 64), (3, 1), (2, 3, 70), (40, 130), (70, 64)]
Q8_ROLES = [3, 2, 2, 3, 1, 0]  # Tiger: matrix and embedding (rows of 1 too), gain, element-wise


def q8_case(shapes, pdt, q8, ec, mdt=F32, seed=0):
    """(params, momenta, scales or None, residuals or None) on DEVICE. Int8 momenta start from a
    quantized momentum over 8 decades; the first block of each first row is all zero (scale 0)."""
    from sign_kernels import _quant

    gen = torch.Generator().manual_seed(seed)
    ps, ms, scs, rs = [], [], [], []
    for s in shapes:
        ps.append((torch.randn(s, generator=gen) * 4).to(pdt).to(DEVICE))
        m = torch.randn(s, generator=gen) * torch.pow(10.0, -8 * torch.rand(s, generator=gen))
        if q8:
            codes, sc = _quant.quantize(m, 77)
            codes.view(-1, s[-1])[0, :64] = 0
            sc.view(-1, sc.shape[-1])[0, 0] = 0.0
            ms.append(codes.to(DEVICE))
            scs.append(sc.to(DEVICE))
        else:
            ms.append(m.to(mdt).to(DEVICE))
        rs.append(torch.randint(-127, 128, s, generator=gen, dtype=torch.int8).to(DEVICE))
    return ps, ms, (scs if q8 else None), (rs if ec else None)


def q8_grads(shapes, gdt, gen, t, nonfinite=None):
    """Gradients over 40 binades; t = 0: the all-zero first blocks stay zero; t = 2: one huge
    outlier in a block; t = 3: ``nonfinite`` in the first, fourth and fifth tensors (Tiger: two
    matrices, one of 3 dims, and a gain)."""
    out = []
    for i, s in enumerate(shapes):
        g = torch.randn(s, generator=gen) * torch.pow(2.0, torch.randint(-20, 20, s, generator=gen).float())
        rows = g.view(-1, s[-1])
        if t == 0:
            rows[0, :64] = 0.0
        if t == 2 and g.numel() > 3:
            g.view(-1)[3] = 3e30
        if t == 3 and nonfinite is not None and i in (0, 3, 4):
            g.view(-1)[5 if i == 0 else -1] = nonfinite
        out.append(g.to(gdt).to(DEVICE))
    return out


def q8_call(backend, algo, ps, gs, ms, scs, rs, steps, *, roles=Q8_ROLES, lr=1e-2, lr_t=None, k=1, scale=None,
            found=None, sr=False, clip=None, **tiger_kw):
    seeds = [_rng.tensor_seed(99, i) for i in range(len(ps))]
    kw = dict(exp_avg_scales=scs, residuals=rs)
    if clip is not None:
        kw["clip"] = clip
    if algo == "lion":
        backend.lion_(ps, gs, ms, steps, lr, lr_t, 0.9, 0.99, 0.1, scale, found, seeds, sr, **kw)
    else:
        backend.tiger_(ps, gs, ms, steps, roles[: len(ps)], lr, lr_t, 0.9, 0.01, k, 0.99, scale, found, seeds, sr,
                       **tiger_kw, **kw)


def clone_at_offset(ts):
    """Copies at the same storage offsets (a misaligned buffer stays misaligned)."""
    out = []
    for t in ts:
        base = torch.empty(t.numel() + t.storage_offset(), dtype=t.dtype, device=t.device)
        out.append(base[t.storage_offset():].view(t.shape).copy_(t))
    return out


def q8_run_both(algo, case, gdt, n_steps=4, nonfinite=None, shapes=Q8_SHAPES, seed=0, **kw):
    """n_steps calls of both backends on copies of ``case``; everything compared after each."""
    a = [None if x is None else clone_at_offset(x) for x in case]
    b = [None if x is None else clone(x) for x in case]
    gen = torch.Generator().manual_seed(seed + 1)
    steps = steps_of(shapes, 0)
    for t in range(n_steps):
        gs = q8_grads(shapes, gdt, gen, t, nonfinite)
        q8_call(skt, algo, a[0], gs, *a[1:], steps, **kw)
        q8_call(ref, algo, b[0], gs, *b[1:], steps, **kw)
        torch._foreach_add_(steps, 1)
        for what, x, y in zip(("params", "momenta", "scales", "residuals"), a, b):
            if x is not None:
                assert_bitwise(x, y, f"{algo} {what} t={t}")
    return a


# (param, grad, int8 momentum, correction byte, float momentum dtype, SR)
Q8_COMBOS = [
    (F32, F32, True, False, None, False), (BF16, BF16, True, False, None, False),
    (BF16, F32, True, False, None, True), (BF16, BF16, True, False, None, True),
    (F16, F16, True, False, None, False), (F16, F32, True, False, None, False),
    (BF16, BF16, True, True, None, False), (F16, F16, True, True, None, False), (BF16, F32, True, True, None, False),
    (BF16, BF16, False, True, F32, False), (BF16, F32, False, True, BF16, False),
    (F16, F16, False, True, F16, False), (F16, F32, False, True, F32, False),
]


def _q8_id(c):
    p, g, q8, ec, mdt, sr = c
    m = "int8" if q8 else str(mdt).replace("torch.", "")
    return f"p{p}-g{g}-m{m}-ec{int(ec)}-sr{int(sr)}".replace("torch.", "")


@pytest.mark.parametrize("algo", ["lion", "tiger"])
@pytest.mark.parametrize("combo", Q8_COMBOS, ids=_q8_id)
def test_compressed_bitwise(algo, combo):
    pdt, gdt, q8, ec, mdt, sr = combo
    case = q8_case(Q8_SHAPES, pdt, q8, ec, mdt or F32, seed=31)
    # Tiger, k = 2: micro-step, update, micro-step, update (the outlier at t = 2 in a micro-step)
    q8_run_both(algo, case, gdt, sr=sr, k=2)


@pytest.mark.parametrize("algo", ["lion", "tiger"])
@pytest.mark.parametrize("hard", ["nan", "inf", "-inf", "scale_clip", "lr_t_found0", "k3"])
def test_compressed_hard_cases_bitwise(algo, hard):
    """NaN / ±Inf gradients (an infinity zeroes its block and the next step reads NaN from it;
    Tiger's NaN guard shrinks θ, gain role towards 1, and leaves the codes and scales alone),
    grad_scale with clip, lr_t with found_inf = 0 read on the device, accumulation over 3."""
    kw = dict(nan=dict(nonfinite=float("nan")), inf=dict(nonfinite=float("inf")),
              **{"-inf": dict(nonfinite=float("-inf"))},
              scale_clip=dict(scale=torch.tensor(-3.0, device=DEVICE), clip=torch.tensor(0.3, device=DEVICE)),
              lr_t_found0=dict(lr_t=torch.tensor(3e-3, device=DEVICE), found=torch.tensor(0.0, device=DEVICE)),
              k3=dict(k=3))[hard]
    if algo == "lion" and hard == "k3":
        pytest.skip("Lion has no accumulation")
    for pdt, gdt, q8, ec in ((F32, F32, True, False), (BF16, BF16, True, True), (F16, F32, False, True)):
        case = q8_case(Q8_SHAPES, pdt, q8, ec, seed=32)
        q8_run_both(algo, case, gdt, n_steps=5, **kw)


def test_compressed_found_inf_changes_nothing():
    for algo in ("lion", "tiger"):
        ps, ms, scs, rs = q8_case(Q8_SHAPES, BF16, True, True, seed=33)
        before = [clone(x) for x in (ps, ms, scs, rs)]
        gs = q8_grads(Q8_SHAPES, BF16, torch.Generator().manual_seed(0), 1)
        q8_call(skt, algo, ps, gs, ms, scs, rs, steps_of(Q8_SHAPES, 1), found=torch.tensor(1.0, device=DEVICE))
        for x, y in zip((ps, ms, scs, rs), before):
            assert_bitwise(x, y, f"{algo} skipped")


def test_compressed_misaligned_buffers_bitwise():
    """Every buffer one element past an aligned address: the unaligned launches (no hints, the
    any-row-length path even for whole blocks), next to aligned tensors in the same call."""
    shapes = [(9, 64), (5, 130), (70, 64)]

    def off(x):
        base = torch.empty(x.numel() + 1, dtype=x.dtype, device=DEVICE)
        v = base[1:].view(x.shape)
        v.copy_(x)
        return v

    for algo in ("lion", "tiger"):
        ps, ms, scs, rs = q8_case(shapes, BF16, True, True, seed=34)
        ps[0], ms[0], rs[0] = off(ps[0]), off(ms[0]), off(rs[0])
        ps[2] = off(ps[2])
        L.clear_cache()
        q8_run_both(algo, (ps, ms, scs, rs), BF16, n_steps=2, shapes=shapes, roles=[3, 2, 3])
        plan = next(reversed(L._plans.values()))
        assert 0 < plan.n_qtasks_al < plan.n_qtasks and not plan.aligned


def _q8_tiger_sums(ps, gs, ms, scs, rs, roles, step, k=1, found=None, **kw):
    at, size = [], 0
    for p, r in zip(ps, roles):
        at.append(size if r >= 2 else -1)
        size += p.numel() // p.shape[-1] if r == 2 else 1
    out = torch.full((size,), -7.0, dtype=torch.float64, device=DEVICE)
    q8_call(skt, "tiger", ps, gs, ms, scs, rs, steps_of(ps, step), roles=roles, k=k, found=found,
            sumsq_out=out, sumsq_out_at=at, **kw)
    return out, at


@pytest.mark.parametrize("pdt,q8,ec", [(F32, True, False), (BF16, True, True), (F16, True, True), (BF16, False, True),
                                      (F16, False, True)])
def test_compressed_tiger_sums_out_and_given_stats(pdt, q8, ec):
    """Tiger with int8 momentum and/or the correction byte (NOTE: [Tiger sums of squares out]): the
    sums out (of θ16) of an update (and of the NaN guard) equal, bit for bit, the sums a skipped
    step and an accumulation micro-step read from θ (no write) and the next call's own pre-pass
    (given them as stats, its θ is the same bits); they are the fp64 sums of θ16 up to rounding.
    With given statistics (sums and a NaN flag) Triton and the reference agree bit for bit."""
    shapes = [(5, 130), (33, 70), (2, 2049), (3, 1), (4, 64)]
    roles = [3, 2, 2, 2, 3]
    ps, ms, scs, rs = q8_case(shapes, pdt, q8, ec, seed=35)
    gen = torch.Generator().manual_seed(36)
    gs = q8_grads(shapes, pdt, gen, 1)
    gs[4].view(-1)[7] = float("nan")  # the NaN guard on one matrix
    written, at = _q8_tiger_sums(ps, gs, ms, scs, rs, roles, step=0)
    gs[4].view(-1)[7] = 0.0
    state = [clone(x) if x is not None else None for x in (ps, ms, scs, rs)]
    skipped, _ = _q8_tiger_sums(ps, gs, ms, scs, rs, roles, step=1, found=torch.tensor(1.0, device=DEVICE))
    for x, y in zip((ps, ms, scs, rs), state):
        if x is not None:
            assert_bitwise(x, y, "skipped step")
    assert bits(skipped.cpu()).tolist() == bits(written.cpu()).tolist()
    micro, _ = _q8_tiger_sums(ps, gs, ms, scs, rs, roles, step=0, k=2)  # θ not written
    assert_bitwise(ps, state[0], "micro-step θ")
    assert bits(micro.cpu()).tolist() == bits(written.cpu()).tolist()
    want = torch.cat([(p.double() ** 2).reshape(-1, p.shape[-1]).sum(1) if r == 2 else (p.double() ** 2).sum().reshape(1)
                      for p, r in zip(ps, roles)]).cpu()
    torch.testing.assert_close(written.cpu(), want, rtol=1e-12, atol=0)
    # the next call given those sums: θ as its own pre-pass gives it
    n = [p.numel() if r == 3 else p.shape[-1] for p, r in zip(ps, roles)]
    stats = dict(stats=written, stats_nan=[-1] * len(ps), stats_sumsq=at, stats_n=n)
    gs = q8_grads(shapes, pdt, gen, 2)
    own = [None if x is None else clone(x) for x in (ps, ms, scs, rs)]
    q8_call(skt, "tiger", own[0], gs, *own[1:], steps_of(ps, 1), roles=roles)
    given = [None if x is None else clone(x) for x in (ps, ms, scs, rs)]
    q8_call(skt, "tiger", given[0], gs, *given[1:], steps_of(ps, 1), roles=roles, **stats)
    for x, y in zip(given, own):
        if x is not None:
            assert_bitwise(x, y, "given sums vs own pre-pass")
    # given statistics, Triton and the reference: bit for bit (a given NaN count fires the guard)
    st = torch.cat([written, torch.tensor([0.0, 3.0], dtype=torch.float64, device=DEVICE)])
    nan_at = [len(written), len(written) + 1, -1, len(written), -1]
    kw = dict(stats=st, stats_nan=nan_at, stats_sumsq=at, stats_n=n)
    tri = [None if x is None else clone(x) for x in (ps, ms, scs, rs)]
    rf = [None if x is None else clone(x) for x in (ps, ms, scs, rs)]
    q8_call(skt, "tiger", tri[0], gs, *tri[1:], steps_of(ps, 1), roles=roles, **kw)
    q8_call(ref, "tiger", rf[0], gs, *rf[1:], steps_of(ps, 1), roles=roles, **kw)
    for x, y in zip(tri, rf):
        if x is not None:
            assert_bitwise(x, y, "given stats vs reference")
    assert torch.equal(tri[1][1], ms[1]) and not torch.equal(tri[1][0], ms[0]), "the given NaN guard"


def test_compressed_rejects():
    ps, ms, scs, rs = q8_case([(4, 70)], BF16, True, True, seed=37)
    gs = [torch.zeros_like(ps[0])]
    steps = steps_of(ps, 0)
    with pytest.raises(ValueError, match="together"):
        q8_call(skt, "lion", ps, gs, ms, None, None, steps)
    with pytest.raises(ValueError, match="scales of shape"):
        q8_call(skt, "lion", ps, gs, ms, [scs[0][:, :1]], None, steps)
    with pytest.raises(ValueError, match="exclusive"):
        q8_call(skt, "lion", ps, gs, ms, scs, rs, steps, sr=True)
    with pytest.raises(ValueError, match="correction byte needs"):
        q8_call(skt, "lion", [ps[0].float()], [gs[0].float()], ms, scs, rs, steps)
    with pytest.raises(ValueError, match=">= 2 dims"):
        q8_call(skt, "lion", [ps[0][0]], [gs[0][0]], [ms[0][0]], [scs[0][0]], None, steps)


@triton.jit
def _ec_kernel(x_ptr, b_ptr, r_ptr, n, P_DT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    K._st_p(b_ptr.to(tl.pointer_type(tl.uint16), bitcast=True), r_ptr, offs, x, offs < n, 0, 0, 0,
            P_DT, False, True)


def test_correction_byte_encoding_every_binade():
    """θ16 and ρ of fp32 values over every binade, subnormals, ties of the rounding, ±0, ±Inf,
    NaN and values that overflow fp16: the reference's bits (_quant.ec_encode)."""
    from sign_kernels import _quant

    gen = torch.Generator().manual_seed(38)
    x = hard_values(4096, gen)
    ties = torch.tensor([1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, 2.0 ** -133, 1.0 + 2.0 ** -11 + 2.0 ** -19,
                         1.0 + 2.0 ** -11 + 2.0 ** -20, 65519.0, 65520.0, 70000.0, 6e-8, 3e-8])
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 3.4e38, -1e-45])
    x = torch.cat([x, ties, -ties, special])
    for dt, code in ((BF16, 1), (F16, 2)):
        xd = x.to(DEVICE)
        b = torch.empty(x.numel(), dtype=dt, device=DEVICE)
        r = torch.empty(x.numel(), dtype=torch.int8, device=DEVICE)
        _ec_kernel[(1,)](xd, b.view(torch.int16), r, x.numel(), P_DT=code, BLOCK=8192)
        v, rho = _quant.ec_encode(x, dt)
        assert_bitwise([b, r], [v.to(DEVICE), rho.to(DEVICE)], f"ec_encode {dt}")
