"""The multi-process cases of tests/test_sharded.py: each runs on every rank of a gloo group.

Every case compares a sharded run with the single-process run of the same optimizer on the
same global gradients, which each rank computes by itself (the oracle needs no collective).
Gradients are generated per step from a seed, identical on every rank; the sharded run gets
each rank's slice of them as a DTensor with the param's placements. So the comparison tests
the optimizer alone, bit for bit (Lion, Simba) or to the summation order of Tiger's sums.
"""

from __future__ import annotations

import copy
import datetime
import faulthandler
import os
import sys
import traceback
from typing import Callable, Dict, List

import torch
import torch.distributed as dist
from torch import nn

STEPS = 6
NAN_STEP = 3  # Tiger cases: a NaN in one rank's shard of `lin1.weight` at this step


class Net(nn.Module):
    """Every Tiger role, uneven shards over 2 and 4 ranks, and tensors smaller than the world."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)   # 11 rows: uneven over 2 and 4 ranks
        self.lin1 = nn.Linear(8, 10)     # 10 rows: (3, 3, 3, 1) over 4 ranks
        self.norm = nn.LayerNorm(10)
        self.lin2 = nn.Linear(10, 3)     # 3 rows < 4 ranks: an empty shard
        self.tiny = nn.Parameter(torch.randn(1))  # smaller than any world size here

    def forward(self, idx):
        h = self.norm(torch.relu(self.lin1(self.emb(idx))))
        return self.lin2(h).sum(-1) * self.tiny


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape) * 0.1)  # norm gains away from 1, biases away from 0
    return net


def full_grads(net: nn.Module, step: int, nan: bool) -> Dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    out = {}
    for name, p in net.named_parameters():
        g = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
        if name == "emb.weight":
            g[2] = 0  # an untouched row
        out[name] = g
    if nan and step == NAN_STEP:
        out["lin1.weight"][9, 1] = float("nan")  # row 9 lives on the last rank (2 or 4 ranks)
    return out


def make_opt(kind: str, net: nn.Module, backend: str, **kw):
    import sign_kernels as sk

    if kind == "lion":
        return sk.Lion(net.parameters(), lr=1e-2, weight_decay=0.1, backend=backend, **kw)
    if kind == "simba":
        return sk.Simba(net.parameters(), lr=1e-2, window_size=8, threshold=0.25, weight_decay=0.1,
                        backend=backend, **kw)
    return sk.Tiger(sk.tiger_param_groups(net), lr=1e-2, weight_decay=0.01, backend=backend, **kw)


def _set_grads(net, grads, placements_of=None):
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, p in net.named_parameters():
        g = grads[name]
        if isinstance(p, DTensor):
            g = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
        p.grad = g


SKIP_STEP = 4  # GradScaler cases: the step whose found_inf is 1


def _scaler_protocol(opt, grads, t):
    """What GradScaler.step gives an optimizer that unscales in its kernels: g times the scale
    (4: exact), grad_scale, and found_inf (1 at SKIP_STEP: nothing changes; 0 otherwise: the
    gradients are finite, so Tiger's guard cannot fire and is not evaluated)."""
    opt.grad_scale = torch.tensor(4.0)
    opt.found_inf = torch.tensor(1.0 if t == SKIP_STEP else 0.0)
    return {name: g * 4 for name, g in grads.items()}


def single_run(kind, backend, steps=STEPS, nan=False, scaler=False, **kw):
    net = make_net()
    opt = make_opt(kind, net, backend, **kw)
    for t in range(steps):
        grads = full_grads(net, t, nan)
        _set_grads(net, _scaler_protocol(opt, grads, t) if scaler else grads)
        opt.step()
    return net, opt


def _full(t):
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t
    if t.dtype == torch.int16:  # gloo (and NCCL) have no int16 collectives
        return t.to(torch.int32).full_tensor().to(torch.int16)
    return t.full_tensor()


def compare(kind, ref_net, ref_opt, net, opt, what: str):
    """Params and state of the sharded run against the single-process run."""
    ref = dict(ref_net.named_parameters())
    for name, p in net.named_parameters():
        name = name.replace("_fsdp_wrapped_module.", "").replace("module.", "", 1) if name not in ref else name
        a, b = _full(p.detach()), ref[name].detach()
        _close(kind, a, b, f"{what}: param {name}")
        sa, sb = opt.state[p], ref_opt.state[ref[name]]
        assert sorted(sa) == sorted(sb), (what, name, sorted(sa), sorted(sb))
        for key in sa:
            x, y = _full(sa[key]), sb[key]
            assert x.dtype == y.dtype, f"{what}: state {name}.{key} dtype {x.dtype} != {y.dtype}"
            if key == "step":
                assert torch.equal(x, y), (what, name, x, y)
            else:
                _close(kind, x, y, f"{what}: state {name}.{key}")


def _close(kind, a, b, what):
    """Bit for bit, Tiger too: its statistics are fp64 sums from the op's own order, and what
    the step reads of them is rounded to fp32 (NOTE: [sharded statistics] in
    sign_kernels/distributed/_dtensor.py)."""
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
    if not torch.equal(a, b):
        err = ((a.double() - b.double()).abs() / b.double().abs().clamp_min(1e-30)).max().item() if a.numel() else 0
        raise AssertionError(f"{what} ({kind}): not bit-identical, max relative difference {err:.3g}")


# ------------------------------------------------------------------ the cases
KINDS = "lion,simba,tiger"


class _CountAllReduce:
    """Counts torch.distributed.all_reduce calls per process group while active."""

    def __enter__(self):
        self.calls: Dict[object, int] = {}
        self._orig = dist.all_reduce

        def counting(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
            self.calls[group] = self.calls.get(group, 0) + 1
            return self._orig(tensor, op=op, group=group, async_op=async_op)

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._orig


def _sharded_vs_single(shard: Callable[[nn.Module], None], what: str, backend: str, kinds: str,
                       scaler: bool = False, **kw):
    for kind in kinds.split(","):
        nan = kind == "tiger" and not scaler  # under GradScaler a NaN step is a skipped step
        ref_net, ref_opt = single_run(kind, backend, nan=nan, scaler=scaler, **kw)
        net = make_net()
        shard(net)
        opt = make_opt(kind, net, backend, **kw)
        used = []  # Tiger: local sums of squares taken from the previous write pass, per call
        if kind == "tiger":
            real = opt.cached_local_sums

            def spy(group, bucket):
                out = real(group, bucket)
                used.append(0 if out is None else sum(a >= 0 for a in out[1]))
                return out

            opt.cached_local_sums = spy
        for t in range(STEPS):
            grads = full_grads(net, t, nan)
            _set_grads(net, _scaler_protocol(opt, grads, t) if scaler else grads)
            with _CountAllReduce() as counter:
                opt.step()
            # Tiger, or any optimizer clipping: one all-reduce per process group per step (the
            # clipping norm travels in Tiger's statistics collective); Lion, Simba: none.
            if kind == "tiger" or kw.get("max_grad_norm") is not None:
                assert counter.calls and all(n == 1 for n in counter.calls.values()), (what, counter.calls)
            else:
                assert not counter.calls, (what, kind, counter.calls)
        if kind == "tiger" and backend in ("cpu", "reference") and used:
            # NOTE: [cached sums in the collective]: no pass over θ before the all-reduce after the first step.
            assert used[0] == 0 and sum(used) > 0, (what, used)
        compare(kind, ref_net, ref_opt, net, opt, f"{what} {kind} {backend}")


def case_fsdp(backend: str, kinds: str = KINDS):
    """FSDP2 on a 1-D mesh: every param Shard(0), uneven, some shards empty."""
    from torch.distributed.fsdp import fully_shard

    _sharded_vs_single(lambda net: fully_shard(net), "fsdp", backend, kinds)


def case_fsdp_scaler(backend: str, kinds: str = KINDS):
    """GradScaler's protocol on FSDP2 shards: scaled gradients, grad_scale, found_inf (a skipped
    step included); Tiger's NaN flags are then found_inf's (NOTE: [GradScaler's flag as the NaN
    guard] in sign_kernels/optim/tiger.py)."""
    from torch.distributed.fsdp import fully_shard

    _sharded_vs_single(lambda net: fully_shard(net), "fsdp scaler", backend, kinds, scaler=True)
    if "tiger" in kinds.split(","):
        # The flag, not a read of g: a NaN that found_inf does not report reaches the momentum
        # (the norms of g would have fired the guard on every rank).
        net = make_net()
        fully_shard(net)
        opt = make_opt("tiger", net, backend)
        _set_grads(net, _scaler_protocol(opt, full_grads(net, NAN_STEP, True), 0))
        opt.step()
        m = _full(opt.state[net.lin1.weight]["exp_avg"])
        assert m.isnan().sum().item() == 1, "fsdp scaler: the guard read g although found_inf was given"


def case_fsdp_bf16_momentum(backend: str, kinds: str = "lion,tiger"):
    """bf16 momentum of fp32 params stays bf16 in DTensor state."""
    from torch.distributed.fsdp import fully_shard

    _sharded_vs_single(lambda net: fully_shard(net), "fsdp bf16-momentum", backend, kinds,
                       momentum_dtype=torch.bfloat16)


def case_fsdp_accum(backend: str, kinds: str = "tiger"):
    """Tiger accumulating 2 micro-batches in its momentum: statistics read on update steps only."""
    from torch.distributed.fsdp import fully_shard

    _sharded_vs_single(lambda net: fully_shard(net), "fsdp accum-2", backend, kinds, grad_accum_steps=2)


def case_hsdp(backend: str, kinds: str = KINDS):
    """FSDP2 on a 2-D (replicate, shard) mesh: statistics reduced over the shard dim only."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    _sharded_vs_single(lambda net: fully_shard(net, mesh=mesh), "hsdp", backend, kinds)


def case_tp(backend: str, kinds: str = KINDS):
    """Tensor parallel: Shard(0) (colwise), Shard(1) (rowwise weight, embedding columns: split
    rows), Replicate (rowwise bias), and plain params the plan leaves alone."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    plan = {"emb": ColwiseParallel(), "lin1": ColwiseParallel(), "lin2": RowwiseParallel()}
    _sharded_vs_single(lambda net: parallelize_module(net, mesh, plan), "tp", backend, kinds)


def case_fsdp_clip(backend: str, kinds: str = KINDS):
    """max_grad_norm on FSDP2 shards: the global norm from the step's one collective (merged
    with Tiger's statistics), Tiger's NaN flags from the norm pass."""
    from torch.distributed.fsdp import fully_shard

    _sharded_vs_single(lambda net: fully_shard(net), "fsdp clip", backend, kinds, max_grad_norm=1.0)


def case_tp_clip(backend: str, kinds: str = KINDS):
    """max_grad_norm under tensor parallelism: Shard(0), Shard(1), Replicate (counted once) and
    plain params in one norm."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    plan = {"emb": ColwiseParallel(), "lin1": ColwiseParallel(), "lin2": RowwiseParallel()}
    _sharded_vs_single(lambda net: parallelize_module(net, mesh, plan), "tp clip", backend, kinds,
                       max_grad_norm=1.0)


def case_fsdp_tp_clip(backend: str, kinds: str = KINDS):
    """max_grad_norm with FSDP2 over TP on a 2x2 mesh (two process groups, three reduction sets)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (2, dist.get_world_size() // 2), mesh_dim_names=("dp", "tp"))
    plan = {"emb": ColwiseParallel(), "lin1": ColwiseParallel(), "lin2": RowwiseParallel()}

    def shard(net):
        parallelize_module(net, mesh["tp"], plan)
        fully_shard(net, mesh=mesh["dp"])

    _sharded_vs_single(shard, "fsdp+tp clip", backend, kinds, max_grad_norm=1.0)


def case_fsdp_int8(backend: str, kinds: str = "lion,tiger"):
    """8-bit momentum on FSDP2 shards (rows whole on every rank: the blocks never cross ranks,
    and the rounding's random bits are a function of the value): bit for bit the single run."""
    from torch.distributed.fsdp import fully_shard

    _sharded_vs_single(lambda net: fully_shard(net), "fsdp int8", backend, kinds, momentum_dtype=torch.int8)


class NetQ(nn.Module):
    """Last dims split at multiples of 64 by TP (on 2 and 4 ranks): int8 blocks stay whole."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 128)   # ColwiseParallel: Shard(1), 64 columns per rank on 2 ranks
        self.lin1 = nn.Linear(128, 256)    # ColwiseParallel: Shard(0), rows whole
        self.lin2 = nn.Linear(256, 4)      # RowwiseParallel: Shard(1) at 128 (2 ranks) or 64 (4 ranks)

    def forward(self, idx):
        return self.lin2(torch.relu(self.lin1(self.emb(idx)))).sum(-1)


def case_tp_int8(backend: str, kinds: str = "lion,tiger"):
    """8-bit momentum under TP: a last dim split at a multiple of 64 is bitwise the single run;
    one split inside a block (the embedding's 128 columns over 4 ranks: 32 each) is refused by
    name before anything changes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    import sign_kernels as sk

    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    plan = {"lin1": ColwiseParallel(), "lin2": RowwiseParallel()}
    if world == 2:
        plan["emb"] = ColwiseParallel()  # 128 columns: 64 per rank
    for kind in kinds.split(","):
        def make(net):
            if kind == "lion":
                return sk.Lion(net.parameters(), lr=1e-2, weight_decay=0.1, backend=backend, momentum_dtype=torch.int8)
            return sk.Tiger(sk.tiger_param_groups(net), lr=1e-2, backend=backend, momentum_dtype=torch.int8)
        torch.manual_seed(0)
        ref = NetQ()
        net = copy.deepcopy(ref)
        parallelize_module(net, mesh, plan)
        ro, so = make(ref), make(net)
        for t in range(STEPS):
            grads = full_grads(ref, t, False)
            _set_grads(ref, grads)
            _set_grads(net, grads)
            ro.step()
            so.step()
        compare(kind, ref, ro, net, so, f"tp int8 {kind} {backend}")
    if world == 4:
        torch.manual_seed(0)
        net = NetQ()
        parallelize_module(net, mesh, {"emb": ColwiseParallel()})
        opt = sk.Lion(net.parameters(), lr=1e-2, backend=backend, momentum_dtype=torch.int8)
        _set_grads(net, full_grads(net, 0, False))
        _expect_refusal(opt, ["param 0", "multiple of 64"], "tp int8 split inside a block")


def run_cases(rank: int, world: int, init_file: str, cases: List[str], result_dir: str):
    # A rank that dies of a signal (a rare SIGABRT seen about once in 80 runs, cause unknown)
    # leaves no Python traceback: faulthandler writes every thread's stack to rank<r>.fault,
    # which _spawn prints, and each case's name goes there first to say where it was.
    fault = open(os.path.join(result_dir, f"rank{rank}.fault"), "w")
    faulthandler.enable(file=fault, all_threads=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the triton cases run the interpreter on CPU
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for spec in cases:
            print("case", spec, file=fault, flush=True)
            name, *args = spec.split(":")
            globals()["case_" + name](*args)
        print("cases done; barrier and teardown", file=fault, flush=True)
        dist.barrier()
    except Exception:
        with open(os.path.join(result_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()
        # past this line, a SIGABRT is the process's exit (C++ destructors), not our cases
        print("process group destroyed; exiting", file=fault, flush=True)
    # Every case passed and the group is gone: leave without the interpreter's teardown. About
    # once in a few runs that teardown aborted a rank ("terminate called without an active
    # exception", no Python frame) after the line above, i.e. in a C++ destructor at exit (a
    # joinable std::thread; sign_kernels starts none); it says nothing about the cases.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def case_fsdp_tp(backend: str, kinds: str = KINDS):
    """FSDP2 over TP on a 2x2 (dp, tp) mesh: tensors sharded over both dims, over dp only
    (norms), and embedding rows split over tp only: three reduction sets, two process groups."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (2, dist.get_world_size() // 2), mesh_dim_names=("dp", "tp"))
    plan = {"emb": ColwiseParallel(), "lin1": ColwiseParallel(), "lin2": RowwiseParallel()}

    def shard(net):
        parallelize_module(net, mesh["tp"], plan)
        fully_shard(net, mesh=mesh["dp"])

    _sharded_vs_single(shard, "fsdp+tp", backend, kinds)


# ------------------------------------------------------------------ checkpoints
SAVE_AT = 3


def _fsdp_pair(kind, backend):
    from torch.distributed.fsdp import fully_shard

    net = make_net()
    fully_shard(net)
    return net, make_opt(kind, net, backend, **_CKPT_KW.get(kind, {}))


# bf16 momentum for Lion: a dtype that differs from the param's must survive every path; int8
# momentum for Tiger: codes and block scales (DTensors of their own shape) through every path,
# DCP's 2 -> 4 rank resharding included.
_CKPT_KW = {"lion": {"momentum_dtype": torch.bfloat16}, "tiger": {"momentum_dtype": torch.int8}}


def _train(net, opt, t0, t1, nan):
    for t in range(t0, t1):
        _set_grads(net, full_grads(net, t, nan))
        opt.step()


def _check_dtypes(opt, what):
    group_of = {p: g for g in opt.param_groups for p in g["params"]}
    for p, st in opt.state.items():
        key = opt._state_key
        want = opt._state_dtype(group_of[p], p)  # int16 counters; the momentum_dtype (int8: fp32 for 0/1-d)
        assert st[key].dtype == want, f"{what}: {key} came back as {st[key].dtype}, not {want}"
        if want == torch.int8:
            assert st["exp_avg_scale"].dtype == torch.bfloat16, f"{what}: exp_avg_scale is {st['exp_avg_scale'].dtype}"
        assert st["step"].dtype == torch.int64, f"{what}: step came back as {st['step'].dtype}"


def _resume_and_compare(kind, backend, net, opt, what):
    nan = kind == "tiger"
    _check_dtypes(opt, what)
    _train(net, opt, SAVE_AT, STEPS, nan)
    ref_net, ref_opt = single_run(kind, backend, nan=nan, **_CKPT_KW.get(kind, {}))
    compare(kind, ref_net, ref_opt, net, opt, what)


def _dcp_load(kind, backend, path, options=None):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    net, opt = _fsdp_pair(kind, backend)
    sd = {"model": get_model_state_dict(net, options=options), "optim": get_optimizer_state_dict(net, opt, options=options)}
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(net, sd["model"], options=options)
    set_optimizer_state_dict(net, opt, sd["optim"], options=options)
    return net, opt


def case_dcp_save(backend, ckpt_dir, kinds=KINDS):
    """Save a sharded DCP checkpoint after SAVE_AT steps (loaded by case_dcp_load, any world)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    for kind in kinds.split(","):
        net, opt = _fsdp_pair(kind, backend)
        _train(net, opt, 0, SAVE_AT, kind == "tiger")
        sd = {"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, opt)}
        dcp.save(sd, checkpoint_id=os.path.join(ckpt_dir, kind))


def case_dcp_load(backend, ckpt_dir, kinds=KINDS):
    """Resume from case_dcp_save's checkpoint (saved with another world size): bit-identical."""
    for kind in kinds.split(","):
        net, opt = _dcp_load(kind, backend, os.path.join(ckpt_dir, kind))
        _resume_and_compare(kind, backend, net, opt, f"dcp resharded {kind} {backend}")


def _dcp_full_roundtrip(kind, backend, full):
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    net, opt = _fsdp_pair(kind, backend)
    _train(net, opt, 0, SAVE_AT, kind == "tiger")
    msd, osd = get_model_state_dict(net, options=full), get_optimizer_state_dict(net, opt, options=full)
    for v in osd["state"].values():
        assert not hasattr(v[opt._state_key], "device_mesh"), "a full state dict holds whole tensors"
    net2, opt2 = _fsdp_pair(kind, backend)
    set_model_state_dict(net2, msd, options=full)
    set_optimizer_state_dict(net2, opt2, osd, options=full)
    _resume_and_compare(kind, backend, net2, opt2, f"dcp full {kind} {backend}")


def case_checkpoints(backend, ckpt_dir, kinds=KINDS):
    """Same-world resumes: DCP sharded, DCP full state dict, plain state_dict() of the shards,
    and a single-process checkpoint loaded into the sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)

    full = StateDictOptions(full_state_dict=True)
    for kind in kinds.split(","):
        nan = kind == "tiger"
        path = os.path.join(ckpt_dir, f"same-{kind}")
        # DCP, sharded (the default).
        case_dcp_save(backend, path, kind)
        net, opt = _dcp_load(kind, backend, os.path.join(path, kind))
        _resume_and_compare(kind, backend, net, opt, f"dcp sharded {kind} {backend}")
        # DCP full state dicts, in memory. Not Simba: torch gathers each DTensor with an
        # all-gather in its own dtype, and neither gloo nor NCCL has int16 collectives.
        if kind != "simba":
            _dcp_full_roundtrip(kind, backend, full)
        # Plain state_dict() of the sharded optimizer, into another of the same layout.
        net, opt = _fsdp_pair(kind, backend)

        net, opt = _fsdp_pair(kind, backend)
        _train(net, opt, 0, SAVE_AT, nan)
        osd = copy.deepcopy(opt.state_dict())
        net2, opt2 = _fsdp_pair(kind, backend)
        with torch.no_grad():
            for a, b in zip(net2.parameters(), net.parameters()):
                a.copy_(b)
        opt2.load_state_dict(osd)
        _resume_and_compare(kind, backend, net2, opt2, f"state_dict {kind} {backend}")
        # A single-process checkpoint into the sharded optimizer: each rank takes its shard.
        ref_net, ref_opt = single_run(kind, backend, steps=SAVE_AT, nan=nan, **_CKPT_KW.get(kind, {}))
        net2, opt2 = _fsdp_pair(kind, backend)
        set_model_state_dict(net2, ref_net.state_dict(), options=full)
        opt2.load_state_dict(ref_opt.state_dict())
        _resume_and_compare(kind, backend, net2, opt2, f"single-process checkpoint {kind} {backend}")


# ------------------------------------------------------------------ DDP and bad input
def case_ddp(backend, kinds=KINDS):
    """DDP with a real backward: every rank sees the same batch, so the averaged gradient
    equals the single-process one bit for bit on 2 ranks ((g + g) / 2 is exact)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    assert dist.get_world_size() == 2, "the bitwise DDP comparison needs exactly 2 ranks"
    idx = torch.arange(12).remainder(11).reshape(3, 4)
    for kind in kinds.split(","):
        ref = make_net()
        ref_opt = make_opt(kind, ref, backend)
        net = DDP(make_net())
        opt = make_opt(kind, net.module, backend)
        for _ in range(STEPS):
            for m, o in ((ref, ref_opt), (net, opt)):
                o.zero_grad()
                m(idx).square().mean().backward()
                o.step()
        compare(kind, ref, ref_opt, net.module, opt, f"ddp {kind} {backend}")


def _expect_refusal(opt, words, what):
    before = [[_full(p.detach()).clone() for p in g["params"]] for g in opt.param_groups]
    state_before = len(opt.state)
    try:
        opt.step()
    except (ValueError, RuntimeError) as exc:
        msg = str(exc)
        assert all(w in msg for w in words), f"{what}: message {msg!r} lacks {words}"
    else:
        raise AssertionError(f"{what}: step() did not refuse")
    after = [[_full(p.detach()) for p in g["params"]] for g in opt.param_groups]
    assert all(torch.equal(a, b) for ga, gb in zip(before, after) for a, b in zip(ga, gb)), f"{what}: params changed"
    assert len(opt.state) == state_before, f"{what}: state changed"


def case_bad_input(backend):
    """Placements the kernels cannot honour exactly are refused by name before anything changes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    import sign_kernels as sk

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for cls in (sk.Lion, sk.Simba, sk.Tiger):
        ok = nn.Parameter(DTensor.from_local(torch.randn(4), mesh, [Shard(0)]))
        ok.grad = DTensor.from_local(torch.randn(4), mesh, [Shard(0)])
        # A Partial param: its value is a pending sum, no rank holds it.
        part = nn.Parameter(DTensor.from_local(torch.randn(3, 2), mesh, [Partial()]))
        part.grad = DTensor.from_local(torch.randn(3, 2), mesh, [Partial()])
        opt = cls([ok, part], backend=backend)
        _expect_refusal(opt, ["param 1", "Partial"], f"{cls.__name__} Partial param")
        # A Partial (unreduced) grad of a replicated param.
        rep = nn.Parameter(DTensor.from_local(torch.randn(5), mesh, [Replicate()]))
        rep.grad = DTensor.from_local(torch.randn(5), mesh, [Partial()])
        opt = cls([ok, rep], backend=backend)
        _expect_refusal(opt, ["param 1", "Replicate", "Partial"], f"{cls.__name__} Partial grad")
        # A plain grad for a DTensor param.
        rep.grad = torch.randn(5)
        _expect_refusal(opt, ["param 1", "plain"], f"{cls.__name__} plain grad")


def case_fsdp_backward(backend: str, kinds: str = KINDS):
    """step_in_backward on FSDP2 params, each rank with its own data (a real reduce-scatter):
    the same params as backward(); step(); zero_grad(), and no gradient left after a backward.
    Tiger's statistics collective then runs once per flushed bucket, on every rank alike."""
    import sign_kernels as sk
    from torch.distributed.fsdp import fully_shard

    for kind in kinds.split(","):
        runs = []
        for in_backward in (False, True):
            net = make_net()
            fully_shard(net)
            opt = make_opt(kind, net, backend)
            handle = sk.step_in_backward(opt) if in_backward else None
            for t in range(STEPS):
                gen = torch.Generator().manual_seed(2000 + 17 * t + dist.get_rank())
                net(torch.randint(0, 11, (4, 5), generator=gen)).square().mean().backward()
                if in_backward:
                    assert all(p.grad is None for p in net.parameters()), f"fsdp backward {kind}: a grad survived"
                else:
                    opt.step()
                    opt.zero_grad()
            if handle is not None:
                handle.remove()
            runs.append(net)
        for (name, p), (_, q) in zip(runs[0].named_parameters(), runs[1].named_parameters()):
            _close(kind, _full(q.detach()), _full(p.detach()), f"fsdp step_in_backward {kind} {backend}: {name}")
