"""Distributed Lion: the SPEC.md rule on 2, 3 and 4 gloo ranks against an oracle, every local backend.

Each multi-rank test spawns its ranks once (torch.multiprocessing, gloo, a join timeout and a
process-group timeout, so a hang fails instead of blocking) and runs every check in them. Every
rank computes every rank's gradients (seeded by case, step and rank), so it can run the oracle of
SPEC.md "Distributed Lion" -- each rank's own momentum, the vote, the update -- by itself:

* fp64 params on the reference backend must equal the fp64 oracle exactly;
* fp32 params on every backend (reference, cpu, triton under TRITON_INTERPRET=1) must equal the
  same oracle computed in fp32 bit for bit (the kernels' operation order), momentum included;
* identical gradients on every rank give exactly Lion; all-zero gradients and momentum never move
  a parameter but by decay; a GradScaler inf on one rank skips the step on every rank; ranks that
  step different parameters raise on every rank; sharded (DTensor) params are refused.
"""

from __future__ import annotations

import os

# The Triton passes run on CPU tensors in Triton's interpreter; it must be chosen before triton
# is first imported (spawned ranks inherit it), as in test_triton.py.
_INTERPRET_AT_START = os.environ.get("TRITON_INTERPRET") == "1"
os.environ.setdefault("TRITON_INTERPRET", "1")

import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sign_kernels
from sign_kernels import _ops
from sign_kernels.distributed import DistributedLion, local_grad_hook
from sign_kernels.distributed import _wire

JOIN_TIMEOUT_S = 240
PG_TIMEOUT_S = 60
LR, BETAS, WD = 0.01, (0.9, 0.99), 0.1
SIZES = [(0,), (1,), (3,), (4,), (5,), (17,), (33,), (7, 13), (1000,)]
STEPS = 3


def _triton_ok() -> bool:
    # the backend's own verdict: installed, and an interpreter that runs its kernels (>= 3.7)
    return os.environ.get("TRITON_INTERPRET") == "1" and sign_kernels.available_backends()["triton"] is None


def _cpu_ok() -> bool:
    return sign_kernels.available_backends()["cpu"] is None and _ops.has_kernel("dist_lion_pack_", "CPU")


def local_backends():
    out = ["reference"]
    if _cpu_ok():
        out.append("cpu")
    if _triton_ok():
        out.append("triton")
    return out


# ----------------------------------------------------------------------------- the oracle
def grads_of(seed: int, step: int, rank: int, kind: str, dtype: torch.dtype):
    """Gradients of one rank at one step: random with exact zeros, ternary (ties), NaN/Inf."""
    g = torch.Generator().manual_seed(seed * 100003 + step * 101 + rank)
    out = []
    for i, shape in enumerate(SIZES):
        if kind == "zero":
            x = torch.zeros(shape, dtype=torch.float64)
        elif kind == "identical":
            x = torch.randn(shape, generator=torch.Generator().manual_seed(seed * 7 + step * 13 + i),
                            dtype=torch.float64)
        elif i % 3 == 1:
            # Values in {-1, 0, +1}: with zero momentum the first step's d_i are these, and their
            # sums tie (0) often.
            x = torch.randint(-1, 2, shape, generator=g).to(torch.float64)
        else:
            x = torch.randn(shape, generator=g, dtype=torch.float64)
            x[torch.rand(shape, generator=g) < 0.25] = 0.0
        if kind == "random" and rank == 1 and x.numel() >= 17 and step == 1:
            flat = x.view(-1)
            flat[2], flat[5], flat[11] = float("nan"), float("inf"), float("-inf")
        out.append(x.to(dtype))
    return out


def params_of(seed: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in SIZES]


def oracle(seed: int, world: int, vote: str, kind: str, dtype: torch.dtype, lr=LR, wd=WD):
    """SPEC.md "Distributed Lion", every product and sum rounded in ``dtype`` (as the kernels)."""
    def s(v):
        return torch.tensor(v, dtype=dtype)

    one, b1, b2, lr_, wd_ = s(1.0), s(BETAS[0]), s(BETAS[1]), s(lr), s(wd)
    params = params_of(seed, dtype)
    moms = [[torch.zeros(sh, dtype=dtype) for sh in SIZES] for _ in range(world)]
    for step in range(STEPS):
        grads = [grads_of(seed, step, r, kind, dtype) for r in range(world)]
        for i in range(len(SIZES)):
            total = torch.zeros(SIZES[i], dtype=torch.int64)
            for r in range(world):
                m, g = moms[r][i], grads[r][i]
                c = b1 * m + (one - b1) * g
                total += (c > 0).to(torch.int64) - (c < 0).to(torch.int64)
                moms[r][i] = b2 * m + (one - b2) * g
            v = torch.sign(total).to(dtype) if vote == "majority" else total.to(dtype) / s(float(world))
            params[i] = params[i] * (one - lr_ * wd_) - lr_ * v
    return params, moms


def assert_bits(actual, expected, what):
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}, tensor {i}: {m}")


def run_dist_lion(seed, rank, world, vote, kind, dtype, backend, pg, bucket_elements=128):
    params = [torch.nn.Parameter(p) for p in params_of(seed, dtype)]
    opt = DistributedLion(params, lr=LR, betas=BETAS, weight_decay=WD, vote=vote, backend=backend,
                          process_group=pg, bucket_elements=bucket_elements)
    for step in range(STEPS):
        for p, g in zip(params, grads_of(seed, step, rank, kind, dtype)):
            p.grad = g
        opt.step()
    return params, opt


# ----------------------------------------------------------------------------- rank checks
def check_oracle(rank, world, backends, pg):
    for vote in ("majority", "average"):
        for dtype, names in ((torch.float64, ["reference"]), (torch.float32, backends)):
            exp_p, exp_m = oracle(3, world, vote, "random", dtype)
            for backend in names:
                params, opt = run_dist_lion(3, rank, world, vote, "random", dtype, backend, pg)
                what = f"rank {rank}/{world} {vote} {dtype} {backend}"
                assert_bits([p.detach() for p in params], exp_p, what + " params")
                assert_bits([opt.state[p]["exp_avg"] for p in params], exp_m[rank], what + " exp_avg")
                assert all(int(opt.state[p]["step"]) == STEPS for p in params)


def check_identical_is_lion(rank, world, backends, pg):
    for vote in ("majority", "average"):
        for backend in backends:
            for dtype in (torch.float32, torch.bfloat16):
                if dtype == torch.bfloat16 and backend == "reference":
                    continue
                params, opt = run_dist_lion(5, rank, world, vote, "identical", dtype, backend, pg)
                ref = [torch.nn.Parameter(p) for p in params_of(5, dtype)]
                lion = sign_kernels.Lion(ref, lr=LR, betas=BETAS, weight_decay=WD, backend=backend)
                for step in range(STEPS):
                    for p, g in zip(ref, grads_of(5, step, rank, "identical", dtype)):
                        p.grad = g
                    lion.step()
                what = f"identical grads, rank {rank}/{world} {vote} {backend} {dtype}"
                assert_bits([p.detach() for p in params], [p.detach() for p in ref], what)
                assert_bits([opt.state[p]["exp_avg"] for p in params], [lion.state[p]["exp_avg"] for p in ref], what)


def check_zero_moves_by_decay_only(rank, world, backends, pg):
    for vote in ("majority", "average"):
        for backend in backends:
            params, _ = run_dist_lion(7, rank, world, vote, "zero", torch.float32, backend, pg)
            decay = torch.tensor(1.0) - torch.tensor(LR) * torch.tensor(WD)
            expected = params_of(7, torch.float32)
            for _ in range(STEPS):
                expected = [e * decay for e in expected]
            assert_bits([p.detach() for p in params], expected, f"zero grads, {vote} {backend}")


def check_found_inf_skips_everywhere(rank, world, backends, pg):
    for backend in backends:
        params = [torch.nn.Parameter(p) for p in params_of(9, torch.float32)]
        opt = DistributedLion(params, lr=LR, betas=BETAS, weight_decay=WD, backend=backend, process_group=pg)
        before = [p.detach().clone() for p in params]
        for p, g in zip(params, grads_of(9, 0, rank, "random", torch.float32)):
            p.grad = g
        opt.grad_scale = torch.tensor(4.0)
        opt.found_inf = torch.tensor(1.0 if rank == world - 1 else 0.0)
        opt.step()
        del opt.grad_scale, opt.found_inf
        assert_bits([p.detach() for p in params], before, f"found_inf on one rank, {backend}")
        assert all(int(opt.state[p]["step"]) == 0 and not opt.state[p]["exp_avg"].any() for p in params)


def check_mismatch_raises(rank, world, pg):
    params = [torch.nn.Parameter(p) for p in params_of(11, torch.float32)]
    opt = DistributedLion(params, lr=LR, backend="reference", process_group=pg)
    for j, (p, g) in enumerate(zip(params, grads_of(11, 0, rank, "random", torch.float32))):
        p.grad = None if (rank == 0 and j == 4) else g
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="different parameters"):
        opt.step()
    assert_bits([p.detach() for p in params], before, "mismatch")
    assert not opt.state


def check_wire_bytes(rank, world, pg):
    n = 1 << 16
    for vote, field_bits in (("majority", 2), ("average", _wire.sum_bits(world))):
        p = torch.nn.Parameter(torch.randn(n))
        opt = DistributedLion([p], lr=LR, vote=vote, backend="reference", process_group=pg)
        p.grad = torch.randn(n)
        opt.step()
        wb = opt.wire_bytes()
        padded = -(-(n // 4) // world) * world
        data = (world - 1) * padded // world * (1 + field_bits // 2)
        assert wb["sent"] == data + 2 * (world - 1) * 24 // world
        assert wb["fp32_allreduce"] == 2 * (world - 1) * 4 * n // world
        assert wb["sent"] * 8 <= wb["fp32_allreduce"], wb


def check_ddp_hook_and_broadcast(rank, world, pg):
    torch.manual_seed(100 + rank)  # different init per rank: DDP (and sync_params) must equalise it
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    ddp = torch.nn.parallel.DistributedDataParallel(model, process_group=pg)
    ddp.register_comm_hook(None, local_grad_hook)
    opt = DistributedLion(ddp.parameters(), lr=0.05, weight_decay=0.01, process_group=pg)
    for step in range(3):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step * 10 + rank))
        ddp(x).square().sum().backward()
        local = [p.grad.clone() for p in model.parameters()]
        ref = [torch.autograd.grad(model(x).square().sum(), list(model.parameters()))]
        for a, b in zip(local, ref[0]):
            torch.testing.assert_close(a, b)  # the hook left each rank its own gradient
        opt.step()
        opt.zero_grad()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(everyone, flat, group=pg)
    for other in everyone:
        assert torch.equal(other, flat), "replicas diverged"
    # A plain model: sync_params broadcasts rank 0's parameters once.
    torch.manual_seed(200 + rank)
    plain = torch.nn.Linear(3, 2)
    DistributedLion(plain.parameters(), process_group=pg)
    w = plain.weight.detach().clone()
    dist.broadcast(w, 0, group=pg)
    assert torch.equal(w, plain.weight.detach())


def check_refuses_dtensor(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    p = torch.nn.Parameter(distribute_tensor(torch.randn(world * 2, 3), mesh, [Shard(0)]))
    with pytest.raises(TypeError, match="DTensor"):
        DistributedLion([p])


def _worker(rank, world, port, backends):
    """All checks, in one spawn of ``world`` ranks: groups of 2, 3, ... ranks are subgroups
    (one spawn instead of one per rank count: starting a rank costs seconds on a small machine)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=PG_TIMEOUT_S))
    try:
        groups = {n: (dist.new_group(list(range(n))) if n < world else None) for n in range(2, world + 1)}
        for n, pg in groups.items():
            if rank < n:
                # The exchange does not depend on the backend, and the Triton interpreter is
                # slow: Triton runs in the 2-rank group, reference and cpu in every group.
                local = [b for b in backends if b != "triton" or n == 2]
                check_oracle(rank, n, local, pg)
                check_zero_moves_by_decay_only(rank, n, local, pg)
                check_wire_bytes(rank, n, pg)
                if n == 2:
                    check_identical_is_lion(rank, n, local, pg)
                    check_found_inf_skips_everywhere(rank, n, local, pg)
                    check_mismatch_raises(rank, n, pg)
                    check_ddp_hook_and_broadcast(rank, n, pg)
            dist.barrier()
        check_refuses_dtensor(rank, world)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world: int) -> None:
    ctx = mp.start_processes(_worker, args=(world, _free_port(), local_backends()), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"{world} ranks did not finish within {JOIN_TIMEOUT_S} s (a hang?)")


def test_ranks_2_3_4():
    """Every check on 2 ranks, the oracle on 3 and 4 (subgroups of one 4-rank spawn)."""
    spawn(4)


# ----------------------------------------------------------------------------- one process
def test_wire_roundtrip_and_vote():
    g = torch.Generator().manual_seed(0)
    for bits in (2, 4, 8):
        lo, hi = -(1 << (bits - 1)), 1 << (bits - 1)
        v = torch.randint(lo, hi, (8 * 37,), generator=g)
        assert torch.equal(_wire.unpack_fields(_wire.pack_fields(v, bits), bits).long(), v)
    # Three ranks, four elements: (+1,+1,-1) -> +1, (+1,-1,0) tie -> 0, (0,0,0) -> 0, (-1,-1,0) -> -1.
    d = torch.tensor([[1, 1, 0, -1], [1, -1, 0, -1], [-1, 0, 0, 0]])
    recv = torch.stack([_wire.pack_fields(r, 2) for r in d])
    kernels = [False] + ([True] if _ops.has_kernel("dist_lion_vote_", "CPU") else [])
    for kernel in kernels:
        out = torch.empty(1, dtype=torch.uint8)
        _wire.vote(recv, "majority", out, kernel=kernel)
        assert _wire.unpack_fields(out, 2).tolist() == [1, 0, 0, -1]
        out = torch.empty(2, dtype=torch.uint8)
        _wire.vote(recv, "average", out, kernel=kernel)
        assert _wire.unpack_fields(out, 4).tolist() == [1, 0, 0, -2]
    # Random slices: the compiled vote equals the torch one, which equals the definition.
    for n in (1, 2, 3, 5, 8, 127):
        d = torch.randint(-1, 2, (n, 4 * 301), generator=g)
        recv = _wire.pack_fields(d, 2)
        s = d.sum(0)
        for mode, bits, want in (("majority", 2, torch.sign(s)), ("average", _wire.sum_bits(n), s)):
            for kernel in kernels:
                out = torch.empty(301 * bits // 2, dtype=torch.uint8)
                _wire.vote(recv, mode, out, kernel=kernel)
                assert torch.equal(_wire.unpack_fields(out, bits).long(), want), (n, mode, kernel)


@pytest.mark.parametrize("backend", local_backends())
@pytest.mark.parametrize("vote", ["majority", "average"])
def test_one_process_is_lion(backend, vote):
    if backend == "triton":
        pytest.importorskip("triton")
        if not _INTERPRET_AT_START:
            pytest.skip("in this process triton may have been imported before TRITON_INTERPRET=1 was set "
                        "(the spawned ranks of test_ranks test the Triton passes)")
    for dtype in (torch.float32, torch.bfloat16):
        a = [torch.nn.Parameter(p) for p in params_of(1, dtype)]
        b = [torch.nn.Parameter(p) for p in params_of(1, dtype)]
        o1 = DistributedLion(a, lr=LR, betas=BETAS, weight_decay=WD, vote=vote, backend=backend, bucket_elements=50)
        o2 = sign_kernels.Lion(b, lr=LR, betas=BETAS, weight_decay=WD, backend=backend)
        sched = torch.optim.lr_scheduler.StepLR(o1, 1, gamma=0.5)
        sched2 = torch.optim.lr_scheduler.StepLR(o2, 1, gamma=0.5)
        for step in range(STEPS):
            for p, q, g in zip(a, b, grads_of(2, step, 0, "random", dtype)):
                p.grad, q.grad = g, g.clone()
            o1.step(), o2.step(), sched.step(), sched2.step()
        assert_bits([p.detach() for p in a], [q.detach() for q in b], f"{backend} {vote} {dtype}")
        sd = o1.state_dict()
        assert set(sd["state"][0]) == {"exp_avg", "step"}
        o3 = DistributedLion([torch.nn.Parameter(p.detach().clone()) for p in a], lr=LR, backend=backend)
        o3.load_state_dict(sd)
        assert_bits([o3.state[p]["exp_avg"] for p in o3.param_groups[0]["params"]],
                    [o1.state[p]["exp_avg"] for p in a], "state_dict round trip")


def test_validation():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="vote"):
        DistributedLion([p], vote="median")
    with pytest.raises(ValueError, match="bucket_elements"):
        DistributedLion([p], bucket_elements=0)
    with pytest.raises(ValueError, match="betas"):
        DistributedLion([p], betas=(1.0, 0.9))
    opt = DistributedLion([p])
    with pytest.raises(ValueError, match="stochastic_rounding"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "stochastic_rounding": True})


@pytest.mark.skipif(not _cpu_ok(), reason="no CPU kernels of dist_lion_pack_")
def test_opcheck_cpu():
    g = [torch.randn(9), torch.randn(4)]
    m = [torch.randn(9), torch.randn(4)]
    packed = [torch.zeros(3, dtype=torch.uint8), torch.zeros(1, dtype=torch.uint8)]
    torch.library.opcheck(_ops.op("dist_lion_pack_").default, (g, m, packed, 0.9, 0.99, None, None))
    votes = [torch.randint(0, 256, (5,), dtype=torch.uint8), torch.randint(0, 256, (2,), dtype=torch.uint8)]
    torch.library.opcheck(_ops.op("dist_lion_apply_").default, ([torch.randn(9), torch.randn(4)], votes, 4, 3,
                                                                 0.01, None, 0.1, None))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_passes_match_reference(backend):
    """The CUDA (compiled) and Triton (compiled) passes write the reference's bits."""
    if backend == "cuda" and not _ops.has_kernel("dist_lion_pack_", "CUDA"):
        pytest.skip("sign_kernels._C has no CUDA kernels of dist_lion_pack_")
    if backend == "triton":
        if _INTERPRET_AT_START or os.environ.get("TRITON_INTERPRET") == "1":
            pytest.skip("run with TRITON_INTERPRET=0 for the compiled Triton kernels")
        from sign_kernels.triton import _dist_lion as tri

        pack, apply = tri.dist_lion_pack_, tri.dist_lion_apply_
    else:
        pack, apply = _ops.op("dist_lion_pack_"), _ops.op("dist_lion_apply_")
    for dtype, mdt in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)):
        gs = [g.to(dtype) for g in grads_of(3, 1, 1, "random", torch.float64)]
        ms = [torch.randn(g.shape, dtype=torch.float64).to(mdt) for g in gs]
        outs = [torch.zeros(_wire.nbytes(g.numel(), 2), dtype=torch.uint8) for g in gs]
        ms_d, outs_d = [m.cuda() for m in ms], [o.cuda() for o in outs]
        scale = torch.tensor(2.0)
        _wire.dist_lion_pack_(gs, ms, outs, 0.9, 0.99, scale, None)
        pack([g.cuda() for g in gs], ms_d, outs_d, 0.9, 0.99, scale.cuda(), None)
        assert_bits([m.cpu() for m in ms_d], ms, f"{backend} pack exp_avg {dtype}/{mdt}")
        assert_bits([o.cpu() for o in outs_d], outs, f"{backend} packed {dtype}/{mdt}")
        for bits, divisor in ((2, 1), (4, 3), (8, 100)):
            ps = [torch.randn(g.shape, dtype=torch.float64).to(dtype) for g in gs]
            vs = [torch.randint(0, 256, (_wire.nbytes(p.numel(), bits),), dtype=torch.uint8) for p in ps]
            ps_d = [p.cuda() for p in ps]
            lr_t = torch.tensor(0.01)
            _wire.dist_lion_apply_(ps, vs, bits, divisor, 0.0, lr_t, 0.1, None)
            apply(ps_d, [v.cuda() for v in vs], bits, divisor, 0.0, lr_t.cuda(), 0.1, torch.zeros((), device="cuda"))
            assert_bits([p.cpu() for p in ps_d], ps, f"{backend} apply {dtype} bits {bits}")


def test_grad_scaler_matches_lion():
    """torch.amp.GradScaler drives DistributedLion as it drives Lion (unscale in the pass, inf skip)."""
    results = []
    for cls in (DistributedLion, sign_kernels.Lion):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 4)
        opt = cls(model.parameters(), lr=LR, betas=BETAS, weight_decay=WD)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for step in range(4):
            x = torch.randn(5, 8, generator=torch.Generator().manual_seed(step))
            loss = model(x).square().sum()
            if step == 2:
                loss = loss * float("inf")  # an inf gradient: the step is skipped
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        results.append(([p.detach().clone() for p in model.parameters()],
                        [int(opt.state[p]["step"]) for p in model.parameters()]))
    assert_bits(results[0][0], results[1][0], "GradScaler: DistributedLion vs Lion")
    assert results[0][1] == results[1][1] == [3, 3]
