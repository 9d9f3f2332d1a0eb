"""The benchmark harness (bench/): byte accounting, parameter sets, result schema, skips.

Small sizes, a few seconds; no timing assertions.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `bench` lives at the repo root

from bench import accounting, cli, contenders, paramsets, report, runner  # noqa: E402
from bench.accounting import DTYPE_SETTINGS  # noqa: E402
from bench.timing import Timing, Workspace  # noqa: E402

CPU = torch.device("cpu")


def _sign_kernels_reference_ok() -> bool:
    return contenders.sign_kernels_backends().get("reference", "missing") is None


# ---- byte accounting ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "algo, dtype, expected",
    [
        ("lion", "fp32", 20), ("lion", "bf16", 10), ("lion", "bf16-fp32m", 14),
        ("tiger", "fp32", 20), ("tiger", "bf16", 10), ("tiger", "bf16-fp32m", 14),
        ("simba", "fp32", 16), ("simba", "bf16", 10),
        ("adamw", "fp32", 28), ("adamw", "bf16", 14),
    ],
)
def test_bytes_per_element(algo, dtype, expected):
    assert accounting.bytes_per_element(algo, DTYPE_SETTINGS[dtype]) == expected


def test_step_bytes_sum_over_tensors():
    ds = DTYPE_SETTINGS["fp32"]
    assert accounting.step_bytes("lion", [3, 5], ds) == 20 * 8
    assert accounting.state_bytes("simba", [3, 5], ds) == 2 * 8
    # the generic form: 2 reads/writes of params, 1 read of grads, read+write of all state
    assert accounting.step_bytes_from_state([10], DTYPE_SETTINGS["bf16"], 40) == 10 * 6 + 80


def _held_state(make, ds_name, pset):
    ds = DTYPE_SETTINGS[ds_name]
    ws = Workspace(pset, ds, CPU, "mix", seed=1)
    opt = make(ws.params, ds)
    opt.step()
    return accounting.measured_state_bytes(opt)


TINY_SET = paramsets.ParamSet("t", (("w", (4, 8)), ("b", (8,)), ("x", (5,))))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("key", ["adamw-fused", "adamw-foreach"])
def test_adamw_state_model_matches_held_state(key, dtype):
    c = next(c for c in contenders.all_contenders(CPU) if c.key == key)
    assert _held_state(c.make, dtype, TINY_SET) == accounting.state_bytes("adamw", TINY_SET.numels, DTYPE_SETTINGS[dtype])


@pytest.mark.skipif(not _sign_kernels_reference_ok(), reason="sign_kernels reference backend not usable")
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "bf16-fp32m"])
@pytest.mark.parametrize("algo", ["lion", "tiger", "simba"])
def test_our_state_model_matches_held_state(algo, dtype):
    c = next(c for c in contenders.all_contenders(CPU, "reference") if c.algo == algo and c.group == "ours")
    if not c.supports(dtype):
        pytest.skip(f"{algo} has no {dtype} setting")
    held = _held_state(c.make, dtype, TINY_SET)
    assert held == accounting.state_bytes(algo, TINY_SET.numels, DTYPE_SETTINGS[dtype])


@pytest.mark.parametrize("key", [k for k in contenders.PEER_KEYS])
def test_peer_state_model_matches_held_state_when_installed(key):
    c = next(c for c in contenders.all_contenders(CPU) if c.key == key)
    reason = c.unavailable(CPU)
    if reason:
        pytest.skip(reason)
    if c.measured_state:
        pytest.skip("bytes come from the held state")
    assert _held_state(c.make, "fp32", TINY_SET) == accounting.state_bytes(c.algo, TINY_SET.numels, DTYPE_SETTINGS["fp32"])


# ---- parameter sets ----------------------------------------------------------------------------


def test_gpt2_small_layout():
    p = paramsets.gpt2_small()
    assert p.n_tensors == 148
    assert p.n_elements == 124_439_808
    assert dict(p.tensors)["wte.weight"] == (50257, 768)


def test_llama_and_tiny_and_flat():
    l1 = paramsets.llama("1B")
    assert l1.n_tensors == 1 + 22 * 9 + 2
    assert 1.0e9 < l1.n_elements < 1.2e9
    assert 100e6 < paramsets.llama("125M").n_elements < 140e6
    assert paramsets.tiny(4096).n_tensors == 4096
    assert paramsets.tiny(4096).n_elements == 4096 * 768
    assert paramsets.flat(paramsets.parse_size("32M")).n_elements == 32 * 2**20
    assert paramsets.parse_size("1G") == 2**30 and paramsets.parse_size("4096") == 4096


def test_workspace_gradients_fresh_and_nonzero():
    ws = Workspace(TINY_SET, DTYPE_SETTINGS["fp32"], CPU, "mix", seed=0)
    g0 = ws.grad_flat.clone()
    assert (g0 != 0).all()
    ws.refill()
    assert not torch.equal(g0, ws.grad_flat)
    for p in ws.params:
        assert p.grad is not None and p.grad.shape == p.shape and p.grad.is_contiguous()
        assert (p.grad.data_ptr() - ws.grad_flat.data_ptr()) % 256 == 0


def test_percentiles():
    t = Timing([float(x) for x in range(1, 12)])
    assert t.median == 6 and t.percentile(10) == 2 and t.percentile(90) == 10


def test_ratio_uses_fused_adamw_at_same_param_dtype():
    def row(key, dtype, ms):
        return dict(key=key, param_set="s", dtype=dtype, ms_median=ms, gbps=1.0)

    rows = [row("adamw-fused", "fp32", 2.0), row("adamw-fused", "bf16", 1.0),
            row("lion[cpu]", "fp32", 1.0), row("lion[cpu]", "bf16-fp32m", 1.5)]
    runner.attach_ratios(rows, {"s/fp32": {"ceiling_gbps": 4.0}})
    assert [r["ratio_vs_fused_adamw"] for r in rows] == [1.0, 1.0, 0.5, 1.5]
    assert rows[2]["fraction"] == 0.25


# ---- skipping ----------------------------------------------------------------------------------


def test_missing_peer_is_skipped_not_an_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lion_pytorch", None)  # import of it now fails: "not installed"
    assert contenders.module_missing("lion_pytorch") == "lion_pytorch not installed"
    rc = cli.main(["--param-sets", "flat", "--size", "4K", "--steps", "2", "--warmup", "1",
                   "--contenders", "lion-pytorch,adamw-fused", "--out", str(tmp_path),
                   "--name", "r", "--no-plot", "--no-progress", "--device", "cpu"])
    assert rc == 0
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    peer = next(r for r in rows if r["key"] == "peer:lion-pytorch")
    assert peer["status"] == "skipped: lion_pytorch not installed"
    assert peer["ms_median"] is None


def test_failing_peer_is_skipped_with_reason():
    def make(params, ds):
        raise RuntimeError("no kernel for this device")

    c = contenders.Contender("peer:broken", "broken Lion", "lion", "torch", make, "peer")
    ds = DTYPE_SETTINGS["fp32"]
    ws = Workspace(TINY_SET, ds, CPU)
    row = runner.run_one(c, ws, TINY_SET, ds, CPU, runner.Config(steps=1, warmup=0))
    assert row["status"] == "skipped: failed on cpu: RuntimeError: no kernel for this device"


def test_unknown_contender_name_raises():
    with pytest.raises(ValueError, match="unknown contender"):
        contenders.select(CPU, "no-such-optimizer")


def test_baseline_always_selected():
    keys = [c.key for c in contenders.select(CPU, "adamw-foreach")]
    assert keys == ["adamw-foreach", "adamw-fused"]


# ---- the result file ---------------------------------------------------------------------------

ROW_KEYS = {
    "contender", "backend", "dtype", "param_set", "n_tensors", "n_elements", "ms_median", "ms_p10",
    "ms_p90", "gbps", "ceiling_gbps", "fraction", "ratio_vs_fused_adamw", "state_bytes_per_param",
    "launches", "bytes_per_step", "status",
}
ENV_KEYS = {"device", "device_name", "cpu_model", "threads", "torch", "triton", "cuda", "git_sha", "date"}


def test_result_file_schema(tmp_path, capsys):
    rc = cli.main(["--param-sets", "flat,tiny", "--size", "4K", "--tiny-count", "8", "--steps", "2",
                   "--warmup", "1", "--contenders", "ours,adamw", "--dtypes", "fp32,bf16",
                   "--out", str(tmp_path), "--name", "run", "--no-progress", "--device", "cpu",
                   "--threads", "1"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "flat-4K" in table and "tiny-8x768" in table
    data = json.loads((tmp_path / "run.json").read_text())
    assert data["schema_version"] == 1
    assert "partial" not in data  # the complete file replaced the partial ones
    assert ENV_KEYS <= set(data["env"])
    assert data["env"]["threads"] == 1
    assert set(data["ceilings"]) == {f"{s}/{d}" for s in ("flat-4K", "tiny-8x768") for d in ("fp32", "bf16")}
    for c in data["ceilings"].values():
        assert c["ceiling_gbps"] > 0
    rows = data["rows"]
    assert rows and all(ROW_KEYS <= set(r) for r in rows)
    timed = [r for r in rows if r["status"] == "ok"]
    assert {r["key"] for r in timed} >= {"adamw-fused", "adamw-foreach"}
    for r in timed:
        assert r["ms_median"] > 0 and r["ms_p10"] <= r["ms_median"] <= r["ms_p90"]
        assert r["ratio_vs_fused_adamw"] is not None and r["fraction"] is not None
        assert r["launches"] is None  # CPU: nothing to count
        numels = [4096] if r["param_set"] == "flat-4K" else [768] * 8
        ds = DTYPE_SETTINGS[r["dtype"]]
        if r["algo"] == "tiger" and r["group"] == "ours":
            # Our Tiger's real traffic, by role (1-d tensors: element-wise, +1 read of g for the NaN guard).
            assert r["bytes_per_step"] == accounting.tiger_step_bytes([(n, "elementwise", n) for n in numels], r["backend"], ds)
            assert r["bytes_per_step"] == accounting.step_bytes("tiger", numels, ds) + sum(numels) * ds.grad.itemsize
            assert set(r["tiger_bytes_per_element"]) == {"elementwise"}
        else:
            assert r["bytes_per_step"] == accounting.step_bytes(r["algo"], numels, ds)
    for r in rows:
        assert r["status"] == "ok" or r["status"].startswith("skipped: ")
    if _sign_kernels_reference_ok():
        assert {"lion", "tiger", "simba"} <= {r["algo"] for r in timed}
    try:
        import matplotlib  # noqa: F401  (the plot is optional: without it the bench says so)
    except ImportError:
        assert not (tmp_path / "run.png").exists()
    else:
        assert (tmp_path / "run.png").stat().st_size > 0


def test_default_stem_is_device_slug_and_date():
    env = dict(device="cpu", device_name="x", cpu_model="AMD EPYC 7B13", threads=2, date="2025-01-02T03:04:05+00:00")
    assert cli.report.default_stem(env) == "cpu-amd-epyc-7b13-2t-2025-01-02"
    env = dict(env, device="cuda:0", device_name="NVIDIA H100 80GB HBM3")
    assert cli.report.default_stem(env) == "nvidia-h100-80gb-hbm3-2025-01-02"


def test_plain_timing_child_runs():
    from bench import check_timing

    cfg = runner.Config(device="cpu", flat_size=4096, steps=2, warmup=1, threads=1)
    assert check_timing.plain_time("adamw-fused", "flat", "fp32", cfg) > 0


def test_merge_split_runs(tmp_path):
    from bench import merge

    for name, extra in (("a", ["--param-sets", "tiny", "--tiny-count", "4"]),
                        ("b", ["--param-sets", "flat", "--size", "4K"])):
        assert cli.main([*extra, "--steps", "2", "--warmup", "1", "--contenders", "adamw",
                         "--out", str(tmp_path), "--name", name, "--no-plot", "--no-progress",
                         "--device", "cpu"]) == 0
    assert merge.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "-o", str(tmp_path / "m")]) == 0
    data = json.loads((tmp_path / "m.json").read_text())
    assert {r["param_set"] for r in data["rows"]} == {"tiny-4x768", "flat-4K"}
    assert set(data["ceilings"]) == {"tiny-4x768/fp32", "flat-4K/fp32"} and len(data["merged_from"]) == 2


def test_a_run_killed_midway_keeps_its_finished_sections(tmp_path, monkeypatch):
    """The rows of every finished section are on disk before the next starts (scripts/gpu_check.sh
    gives each set a time limit): a run ended after its first section leaves a file marked
    partial, and a merge with it says so."""
    from bench import merge

    real = runner.run

    def run_then_die(cfg, on_section=None):
        def once(*a):
            on_section(*a)
            raise KeyboardInterrupt  # what a kill at this point leaves on disk

        return real(cfg, on_section=once)

    monkeypatch.setattr(runner, "run", run_then_die)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["--param-sets", "tiny,flat", "--tiny-count", "4", "--size", "4K", "--steps", "2",
                  "--warmup", "1", "--contenders", "adamw", "--out", str(tmp_path), "--name", "a",
                  "--no-plot", "--no-progress", "--device", "cpu"])
    data = json.loads((tmp_path / "a.json").read_text())
    assert data["partial"] == "the run stopped after tiny-4x768/fp32"
    assert {r["param_set"] for r in data["rows"]} == {"tiny-4x768"} and set(data["ceilings"]) == {"tiny-4x768/fp32"}
    assert any(w.startswith("incomplete: ") for w in report.warnings_for(data))
    monkeypatch.undo()
    assert cli.main(["--param-sets", "flat", "--size", "4K", "--steps", "2", "--warmup", "1", "--contenders",
                     "adamw", "--out", str(tmp_path), "--name", "b", "--no-plot", "--no-progress",
                     "--device", "cpu"]) == 0
    assert merge.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "-o", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m.json").read_text())
    assert merged["partial"] == f"{tmp_path / 'a.json'}: the run stopped after tiny-4x768/fp32"
    assert [("partial" in m) for m in merged["merged_from"]] == [True, False]


def test_row_budget_counts_timed_steps_not_the_warmup():
    """A slow first call (a JIT compile) must not cut a row to its minimum of steps."""
    from bench import timing

    calls = []

    def step():
        calls.append(1)
        time.sleep(0.3 if len(calls) == 1 else 0.001)  # the warm-up step compiles

    t = timing.time_steps(step, lambda: None, torch.device("cpu"), warmup=1, steps=20, budget_s=0.2)
    assert len(t.ms) == 20  # 20 timed steps of ~1 ms fit the budget; the 0.3 s warm-up is not counted
    slow = timing.time_steps(lambda: time.sleep(0.05), lambda: None, torch.device("cpu"), warmup=0, steps=20,
                             budget_s=0.01)
    assert len(slow.ms) == timing.MIN_STEPS  # over budget: stops at the minimum


# ---- schedules ---------------------------------------------------------------------------------


def _run(tmp_path, *extra):
    rc = cli.main(["--param-sets", "flat", "--size", "4K", "--steps", "6", "--warmup", "1",
                   "--contenders", "ours,adamw", "--out", str(tmp_path), "--name", "s", "--no-plot",
                   "--no-progress", "--device", "cpu", "--threads", "1", *extra])
    assert rc == 0
    return json.loads((tmp_path / "s.json").read_text())


def test_interleaved_schedule_pairs_every_row_with_the_same_rounds(tmp_path):
    data = _run(tmp_path, "--schedule", "interleaved")
    assert data["config"]["schedule"] == "interleaved"
    ceil = data["ceilings"]["flat-4K/fp32"]
    rounds = ceil["rounds"]
    assert 5 <= rounds <= 6 and len(ceil["ceiling_gbps_per_round"]) == rounds
    assert ceil["ceiling_gbps"] == pytest.approx(statistics.median(ceil["ceiling_gbps_per_round"]), rel=1e-3)
    timed = [r for r in data["rows"] if r["status"] == "ok"]
    base = next(r for r in timed if r["key"] == "adamw-fused")
    assert base["ratio_vs_fused_adamw"] == 1.0
    for r in timed:
        assert len(r["ms"]) == rounds and r["ratio_paired"]
        want = statistics.median(a / b for a, b in zip(r["ms"], base["ms"]))
        assert r["ratio_vs_fused_adamw"] == pytest.approx(want)
        per_round = [r["bytes_per_step"] / (t * 1e-3) / 1e9 / c for t, c in zip(r["ms"], ceil["ceiling_gbps_per_round"])]
        assert r["fraction"] == pytest.approx(statistics.median(per_round), rel=1e-3)


def test_sequential_schedule_uses_ratio_of_medians(tmp_path):
    data = _run(tmp_path, "--schedule", "sequential")
    assert data["config"]["schedule"] == "sequential"
    timed = [r for r in data["rows"] if r["status"] == "ok"]
    base = next(r for r in timed if r["key"] == "adamw-fused")
    for r in timed:
        assert not r["ratio_paired"]
        assert r["ratio_vs_fused_adamw"] == pytest.approx(r["ms_median"] / base["ms_median"])


def test_paired_ratio_is_median_of_round_ratios_not_ratio_of_medians():
    # Pairs: (1 vs 2), (30 vs 6), (5 vs 60): median round ratio 0.5, ratio of medians 5/6.
    rows = [dict(key="adamw-fused", param_set="s", dtype="fp32", ms_median=6.0, gbps=1.0, ms=[2.0, 6.0, 60.0],
                 fraction_per_round=[1.0, 1.0, 1.0]),
            dict(key="lion[cpu]", param_set="s", dtype="fp32", ms_median=5.0, gbps=1.0, ms=[1.0, 30.0, 5.0],
                 fraction_per_round=[0.5, 0.9, 0.7])]
    runner.attach_ratios(rows, {"s/fp32": {"ceiling_gbps": 4.0}})
    assert rows[1]["ratio_vs_fused_adamw"] == 0.5 and rows[1]["ratio_paired"]
    assert rows[1]["fraction"] == 0.7


def test_schedule_auto_is_interleaved_on_cpu_sequential_on_cuda():
    assert runner.resolve_schedule("auto", CPU) == "interleaved"
    assert runner.resolve_schedule("auto", torch.device("cuda")) == "sequential"
    with pytest.raises(ValueError, match="schedule"):
        runner.resolve_schedule("random", CPU)


def _fake_result(loadavg, loadavg_end, ceilings_per_round, fraction):
    from bench import report

    row = dict(param_set="flat", dtype="fp32", n_tensors=1, n_elements=1000, contender="Lion", backend="cpu",
               key="lion[cpu]", status="ok", steps=7, ms_median=1.0, ms_p10=0.9, ms_p90=1.1, gbps=20.0,
               fraction=fraction, ratio_vs_fused_adamw=0.7, bytes_per_step=20000, state_bytes_per_param=4.0,
               launches=None)
    result = dict(config=dict(steps=20, warmup=3, schedule="interleaved"), rows=[row],
                  env=dict(device="cpu", cpu_count=2, threads=2, loadavg=loadavg, loadavg_end=loadavg_end),
                  ceilings={"flat/fp32": dict(ceiling_gbps=20.0, mul_gbps=20.0, copy_gbps=15.0,
                                              ceiling_gbps_per_round=ceilings_per_round)})
    result["warnings"] = report.warnings_for(result)
    return result, report.table(result)


def test_table_warns_loudly_when_the_machine_was_loaded_or_the_ceiling_drifted():
    quiet, text = _fake_result([0.3, 0.2, 0.1], [2.1, 1.0, 0.5], [20.0 + 0.1 * i for i in range(10)], 0.9)
    assert quiet["warnings"] == [] and "WARNING" not in text and "*" not in text
    loaded, text = _fake_result([5.7, 4.0, 3.0], [6.0, 5.0, 4.0], [8.0, 20.0, 40.0, 9.0, 30.0, 12.0], 1.2)
    assert len(loaded["warnings"]) == 3
    assert text.startswith("WARNING: the machine was loaded when the run started (load average 5.7 on 2 cores)")
    assert "the bandwidth ceiling drifted" in text
    assert "120*" in text and "* above 100 % of the ceiling" in text  # explained, not silent
    assert "   7     1.00 [0.90, 1.10]" in text  # the steps the row really timed, one number format


def test_tiger_bytes_per_role():
    """What our Tiger moves per element (bench/accounting.py): the NaN guard reads g once more;
    θ is read again for the RMS on the first step (cpu, matrices) or every step (GPU kernels)."""
    ds = DTYPE_SETTINGS["fp32"]
    f = accounting.tiger_bytes_per_element
    assert f("matrix", "cpu", ds, steady=True) == 24 and f("matrix", "cpu", ds, steady=False) == 28
    assert f("embedding", "cpu", ds, steady=True, row_len=768) == f("embedding", "cpu", ds, steady=False, row_len=768) == 24
    assert f("embedding", "cpu", ds, row_len=70_000) == 28
    assert f("elementwise", "cpu", ds) == f("gain", "triton", ds) == 24
    assert f("matrix", "triton", ds) == f("embedding", "cuda", ds) == 28
    assert f("matrix", "cpu", ds, update=False) == 16 and f("matrix", "cpu", ds, update=False, steady=False) == 20
    assert f("matrix", "cpu", DTYPE_SETTINGS["bf16"], steady=False) == 14


def test_bench_tiger_gets_the_models_roles():
    """The Tiger contender names its params as the model does, so GPT-2's tables are embeddings."""
    from bench.timing import Workspace

    pset = paramsets.ParamSet("mini-gpt2", (("wte.weight", (10, 4)), ("h.0.ln_1.weight", (4,)),
                                            ("h.0.attn.c_attn.bias", (12,)), ("h.0.attn.c_attn.weight", (4, 12))))
    ds = DTYPE_SETTINGS["fp32"]
    ws = Workspace(pset, ds, torch.device("cpu"))
    opt = contenders._ours("tiger", "reference").make(ws.params, ds)
    assert opt._roles(opt.param_groups[0]) == (2, 1, 0, 3)  # embedding, gain, element-wise, matrix


# ---- clipping rows (NOTE: [clip rows] in bench/contenders.py) --------------------------------------


def test_clip_bytes_per_element():
    """Ours: + one read of g (the norm pass), Tiger + 0 (the norm pass is its NaN guard's read);
    torch's clip_grad_norm_(foreach=True): + a norm pass and a mul_ pass (read, read + write)."""
    ds = DTYPE_SETTINGS["fp32"]
    f = accounting.clip_bytes_per_element
    assert accounting.bytes_per_element("lion", ds) + f("fused", "lion", ds) == 24
    assert accounting.bytes_per_element("simba", ds) + f("fused", "simba", ds) == 20
    assert accounting.tiger_bytes_per_element("matrix", "cpu", ds) + f("fused", "tiger", ds) == 24
    assert accounting.bytes_per_element("adamw", ds) + f("torch", "adamw", ds) == 40
    assert accounting.bytes_per_element("lion", ds) + f("torch", "lion", ds) == 32
    assert f(None, "lion", ds) == 0 and f("torch", "adamw", DTYPE_SETTINGS["bf16"]) == 6


def test_clip_rows_selection():
    keys = lambda names: [c.key for c in contenders.select(CPU, names, "reference")]  # noqa: E731
    assert keys("clip") == ["lion+clip[reference]", "tiger+clip[reference]", "simba+clip[reference]",
                            "clip+adamw-fused", "clip+lion[reference]", "adamw-fused"]
    assert keys("ours+clip") == keys("clip")[:3] + ["adamw-fused"]
    assert keys("torch-clip") == ["clip+adamw-fused", "clip+lion[reference]", "adamw-fused"]
    assert keys("tiger+clip,clip+adamw") == ["tiger+clip[reference]", "clip+adamw-fused", "adamw-fused"]
    assert keys("clip+lion[reference]") == ["clip+lion[reference]", "adamw-fused"]
    # the default run stays quick: no clip rows unless asked for; the full sweep (all) has them
    assert not [k for k in keys("ours,adamw,peers") if "clip" in k]
    assert {"lion+clip[reference]", "clip+adamw-fused"} <= set(keys("all"))


@pytest.mark.skipif(not _sign_kernels_reference_ok(), reason="sign_kernels reference backend not usable")
def test_clip_rows_in_a_run(tmp_path):
    rc = cli.main(["--param-sets", "flat,tiny", "--size", "4K", "--tiny-count", "8", "--steps", "3",
                   "--warmup", "1", "--contenders", "ours,clip", "--out", str(tmp_path), "--name", "c",
                   "--no-plot", "--no-progress", "--device", "cpu", "--threads", "1"])
    assert rc == 0
    data = json.loads((tmp_path / "c.json").read_text())
    rows = {(r["param_set"], r["key"].split("[")[0]): r for r in data["rows"]}
    want = {"lion+clip": 24, "tiger+clip": 24, "simba+clip": 20, "clip+adamw-fused": 40, "clip+lion": 32,
            "lion": 20, "tiger": 24, "simba": 16, "adamw-fused": 28}
    for pset in ("flat-4K", "tiny-8x768"):
        for key, b in want.items():
            r = rows[(pset, key)]
            assert r["status"] == "ok", r["status"]
            assert r["bytes_per_step"] == b * r["n_elements"], key  # 1-d tensors: Tiger's element-wise role
            if "clip" in key:
                # the bench's gradients are far above max norm 1: every step scaled them
                assert r["grad_norm_last"] > 10 * r["max_grad_norm"] and 0 < r["clip_coef_last"] < 0.1
                assert r["writes_grads"] == key.startswith("clip+")
        clip_ratios = rows[(pset, "tiger+clip")]["clip_ratios"]
        assert set(clip_ratios) == {"tiger[reference]", "lion+clip[reference]", "clip+adamw-fused"} or \
            set(clip_ratios) == {"tiger[cpu]", "lion+clip[cpu]", "clip+adamw-fused"}
        lion, lion_clip = rows[(pset, "lion")], rows[(pset, "lion+clip")]
        ref = next(k for k in rows[(pset, "lion+clip")]["clip_ratios"] if k.startswith("lion["))
        assert lion_clip["clip_ratios"][ref] == pytest.approx(
            statistics.median(a / b for a, b in zip(lion_clip["ms"], lion["ms"])))  # paired, per round
        assert rows[(pset, "clip+adamw-fused")]["clip_ratios"] == {
            "adamw-fused": pytest.approx(rows[(pset, "clip+adamw-fused")]["ratio_vs_fused_adamw"])}


@pytest.mark.parametrize("schedule", ["interleaved", "sequential"])
def test_torch_clip_rows_get_fresh_gradients_every_step(schedule):
    """clip_grad_norm_ scales p.grad in place: the harness refills the gradients before every
    step, so no step of a torch-clip row sees an already clipped gradient (the scaling does not
    compound); ours leave p.grad as it was."""
    base = next(c for c in contenders.select(CPU, "clip+adamw", "reference") if c.key == "clip+adamw-fused")
    seen = []

    def make(params, ds):
        opt = base.make(params, ds)
        inner_step = opt.step

        def step():
            before = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
            inner_step()
            after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
            seen.append((float(before), float(after)))

        opt.step = step
        return opt

    c = contenders.Contender(base.key, base.label, base.algo, base.backend, make, base.group,
                             clip=base.clip, writes_grads=True)
    pset = paramsets.flat(4096)
    ds = DTYPE_SETTINGS["fp32"]
    ws = Workspace(pset, ds, CPU, "mix", seed=3)
    cfg = runner.Config(steps=4, warmup=1, row_budget_s=None)
    if schedule == "interleaved":
        rows, _ = runner.run_interleaved([c], ws, pset, ds, CPU, cfg)
        row = rows[0]
    else:
        row = runner.run_one(c, ws, pset, ds, CPU, cfg)
    assert row["status"] == "ok" and len(seen) == 5
    for before, after in seen:
        assert before > 30  # fresh: ~sqrt(4096) x [1.03, 4.1]
        assert after == pytest.approx(contenders.CLIP_MAX_NORM, rel=1e-3)  # torch scaled p.grad


@pytest.mark.skipif(not _sign_kernels_reference_ok(), reason="sign_kernels reference backend not usable")
def test_our_clip_rows_leave_grads_alone():
    c = next(c for c in contenders.select(CPU, "lion+clip", "reference") if c.clip == "fused")
    assert not c.writes_grads
    ds = DTYPE_SETTINGS["fp32"]
    ws = Workspace(TINY_SET, ds, CPU, "mix", seed=2)
    g = ws.grad_flat.clone()
    opt = c.make(ws.params, ds)
    opt.step()
    assert torch.equal(g, ws.grad_flat) and float(opt.grad_norm) > 1.0


# ---- 8-bit momentum rows (NOTE: [int8 rows] in bench/contenders.py) --------------------------------

ROW_SETTINGS = accounting.ROW_SETTINGS


def test_int8_bytes_per_element():
    """Lion, fp32 θ and g, int8 m: read θ 4, g 4, m 1 + 2/64; write θ 4, m 1 + 2/64 = 14.0625 B
    per element of a matrix; bf16 θ and g with the correction byte: 2 + 1 + 2 (+ m) read,
    2 + 1 (+ m) written = 10.0625; a 0/1-d tensor keeps an fp32 momentum."""
    fp32, ec, sr = ROW_SETTINGS["fp32-int8"], ROW_SETTINGS["bf16-ec-int8"], ROW_SETTINGS["bf16-sr-int8"]
    mat = [(768, 3072)]
    n = 768 * 3072
    assert accounting.momentum_bytes(n, 2, 3072, fp32) == n + 2 * 768 * 48
    for ds, want in ((fp32, 14.0625), (ec, 10.0625), (sr, 8.0625)):
        state = accounting.state_bytes_of_shapes("lion", mat, ds)
        assert accounting.step_bytes_from_state([n], ds, state) == want * n
    # ragged rows: a shorter last block still has its scale; 1-d: fp32 momentum (+ ρ for bf16)
    assert accounting.state_bytes_of_shapes("lion", [(3, 65)], fp32) == 195 + 2 * 3 * 2
    assert accounting.state_bytes_of_shapes("lion", [(5,)], fp32) == 20
    assert accounting.state_bytes_of_shapes("lion", [(5,)], ec) == 20 + 5
    assert accounting.state_bytes_of_shapes("lion", [(5,)], sr) == 20
    # the plain layouts are unchanged
    assert accounting.state_bytes_of_shapes("lion", [(4, 8), (8,)], DTYPE_SETTINGS["fp32"]) == 4 * 40
    # Tiger: its own passes with m at 1 + 2/64 each way and ρ beside θ
    t = accounting.tiger_tensor_bytes
    assert t(n, "matrix", "cpu", fp32, row_len=3072) == 18.0625 * n  # 24 - 8 + 2.0625
    assert t(n, "matrix", "cpu", fp32, row_len=3072, steady=False) == 22.0625 * n
    assert t(n, "matrix", "cuda", ec, row_len=3072) == (2 + 2 + 2 + 2 + 2 + 2 + 2.0625) * n  # θ, ρ r/w, g x2, pre-pass θ
    assert t(768, "elementwise", "cpu", fp32, row_len=768, ndim=1) == 24 * 768
    assert t(n, "matrix", "cpu", ec, row_len=3072, update=False) == (2 + 2 + 2.0625) * n  # no θ, no ρ
    assert accounting.tiger_step_bytes([(n, "matrix", 3072, 2)], "cpu", DTYPE_SETTINGS["fp32"]) == 24 * n


def test_int8_rows_selection():
    keys = lambda names: [c.key for c in contenders.select(CPU, names, "reference")]  # noqa: E731
    every = ["lion-int8[reference]", "tiger-int8[reference]", "lion-bf16-ec-int8[reference]",
             "tiger-bf16-ec-int8[reference]", "lion-bf16-sr-int8[reference]"]
    assert keys("int8") == every + ["adamw-fused"]
    assert keys("ec-int8") == [every[2], every[3], "adamw-fused"]
    assert keys("lion-int8,lion-bf16-ec-int8") == [every[0], every[2], "adamw-fused"]
    assert keys("tiger-int8[reference]") == [every[1], "adamw-fused"]
    assert not [k for k in keys("ours,adamw,peers") if "int8" in k]  # not in the quick default
    assert set(every) <= set(keys("all"))  # --full
    for c in contenders.select(CPU, "int8", "reference")[:-1]:
        assert c.group == "int8" and c.supports("fp32") and not c.supports("bf16") and c.setting is not None


def test_int8_row_is_skipped_where_the_backend_has_no_kernels(monkeypatch):
    import sign_kernels

    c = contenders._int8("lion-int8", "reference")
    if c.unavailable(CPU) is not None:
        pytest.skip(c.unavailable(CPU))
    monkeypatch.setattr(sign_kernels.Lion, "_compressed_backends", frozenset({"cpu"}))
    assert "no 8-bit momentum" in c.unavailable(CPU)


def test_workspace_for_setting_gives_own_params_and_fresh_grads():
    ws = Workspace(TINY_SET, DTYPE_SETTINGS["fp32"], CPU, "mix", seed=4)
    assert ws.for_setting(None)[0] is ws.params and ws.for_setting(ROW_SETTINGS["fp32-int8"])[0] is ws.params
    params, refill = ws.for_setting(ROW_SETTINGS["bf16-ec-int8"])
    again, _ = ws.for_setting(ROW_SETTINGS["bf16-sr-int8"])
    assert [p is q for p, q in zip(params, again)] == [True] * 3  # one bf16 copy per dtype pair
    for p, q in zip(params, ws.params):
        assert p.dtype == p.grad.dtype == torch.bfloat16 and p.shape == q.shape and p.data_ptr() != q.data_ptr()
        assert torch.equal(p.detach(), q.detach().to(torch.bfloat16))
    before = [p.grad.clone() for p in params]
    main = ws.grad_flat.clone()
    refill()
    assert all(not torch.equal(a, p.grad) and p.grad.abs().sum() > 0 for a, p in zip(before, params))
    assert torch.equal(main, ws.grad_flat)  # the section's gradients are the section's refill's


@pytest.mark.skipif(not _sign_kernels_reference_ok(), reason="sign_kernels reference backend not usable")
@pytest.mark.parametrize("schedule", ["interleaved", "sequential"])
def test_int8_rows_in_a_run(tmp_path, schedule):
    rc = cli.main(["--param-sets", "tiny", "--tiny-count", "4", "--steps", "3", "--warmup", "1",
                   "--contenders", "lion,tiger,int8", "--dtypes", "fp32,bf16", "--out", str(tmp_path),
                   "--name", "q", "--no-plot", "--no-progress", "--device", "cpu", "--threads", "1",
                   "--schedule", schedule])
    assert rc == 0
    data = json.loads((tmp_path / "q.json").read_text())
    rows = {(r["dtype"], r["key"].split("[")[0]): r for r in data["rows"]}
    assert not [k for k in rows if k[0] == "bf16" and "int8" in k[1]]  # int8 rows: the fp32 section only
    # tiny: 4 tensors of 768, 1-d (fp32 momentum for int8; Tiger's element-wise role)
    want = {"lion": 20, "lion-int8": 20, "lion-bf16-ec-int8": 2 + 1 + 2 + 4 + 2 + 1 + 4,
            "lion-bf16-sr-int8": 2 + 2 + 4 + 2 + 4, "tiger": 24, "tiger-int8": 24,
            "tiger-bf16-ec-int8": 2 + 1 + 2 + 2 + 4 + 2 + 1 + 4}
    for key, b in want.items():
        r = rows[("fp32", key)]
        assert r["status"] == "ok", (key, r["status"])
        assert r["bytes_per_step"] == b * r["n_elements"], key
        assert r["state_bytes_model"] == r["state_bytes_held"], key
    ec = rows[("fp32", "lion-bf16-ec-int8")]
    assert ec["param_dtype"] == ec["grad_dtype"] == "bfloat16" and ec["error_correction"] and ec["setting"] == "bf16-ec-int8"
    assert ec["state_bytes_per_param"] == 5  # fp32 momentum of 1-d tensors + ρ
    assert rows[("fp32", "lion-int8")]["param_dtype"] == "float32"
    ratios = ec["int8_ratios"]
    backend = ec["backend"]
    assert set(ratios) == {f"lion[{backend}]", f"lion-int8[{backend}]"}
    lion = rows[("fp32", "lion")]
    if schedule == "interleaved":
        assert ratios[f"lion[{backend}]"] == pytest.approx(statistics.median(a / b for a, b in zip(ec["ms"], lion["ms"])))
    else:
        assert ratios[f"lion[{backend}]"] == pytest.approx(ec["ms_median"] / lion["ms_median"])
    assert set(rows[("fp32", "tiger-bf16-ec-int8")]["int8_ratios"]) == {
        f"lion[{backend}]", f"tiger[{backend}]", f"tiger-int8[{backend}]"}
    assert "Lion bf16+ec+int8 time / Lion" in report.table(data)


@pytest.mark.skipif(not _sign_kernels_reference_ok(), reason="sign_kernels reference backend not usable")
@pytest.mark.parametrize("name", list(contenders.INT8_NAMES))
def test_int8_state_model_matches_held_state_by_shape(name):
    """Matrices (blocks of 64 per row, a ragged last block), a 1-d tensor: the model by shape is
    what the optimizer holds (codes, scales, fp32 momentum of 1-d tensors, residuals)."""
    pset = paramsets.ParamSet("m", (("h.0.attn.c_attn.weight", (3, 130)), ("h.0.ln_1.weight", (7,)),
                                    ("wte.weight", (5, 64))))
    c = contenders._int8(name, "reference")
    ws = Workspace(pset, DTYPE_SETTINGS["fp32"], CPU, "mix", seed=5)
    params, refill = ws.for_setting(c.setting)
    opt = c.make(params, c.setting)
    opt.step()
    assert accounting.measured_state_bytes(opt) == accounting.state_bytes_of_shapes(
        c.algo, [s for _, s in pset.tensors], c.setting)


# ---- bench.memory: the whole training memory per parameter ------------------------------------------


@pytest.mark.skipif(not _sign_kernels_reference_ok(), reason="sign_kernels reference backend not usable")
def test_memory_rows_per_param(tmp_path, capsys):
    from bench import memory

    out = tmp_path / "m.json"
    assert memory.main(["--modes", "adamw,lion,lion-bwd,lion-4byte-bwd", "--n-layer", "1", "--n-head", "2",
                        "--d-model", "64", "--vocab-size", "128", "--seq", "8", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "bytes per parameter" in text and "lion-4byte-bwd (bfloat16)" in text
    rows = {r["mode"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"adamw", "lion", "lion-bwd", "lion-4byte-bwd"}
    four, lion, adamw = rows["lion-4byte-bwd"]["per_param"], rows["lion"]["per_param"], rows["adamw"]["per_param"]
    assert rows["lion-4byte-bwd"]["weight_dtype"] == "bfloat16" and rows["lion"]["weight_dtype"] == "float32"
    assert four["weights"] == 2 and four["residual"] == 1 and lion["weights"] == adamw["weights"] == 4
    assert lion["residual"] == adamw["residual"] == 0
    # int8 momentum: 1 B + a bf16 scale per 64 of a row (+ fp32 for 0/1-d tensors, step counters)
    assert 1.03 < four["optimizer_state"] < 1.5 and 4 <= lion["optimizer_state"] < 4.1
    assert 8 <= adamw["optimizer_state"] < 8.1
    for pp in (four, lion, adamw):
        assert pp["total"] == pytest.approx(pp["weights"] + pp["residual"] + pp["optimizer_state"] + pp["peak_above"])
        assert pp["peak_above"] > 0
    assert four["total"] < lion["total"] < adamw["total"]
