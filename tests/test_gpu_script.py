"""scripts/gpu_check.sh, the one call a GPU machine gets, kept working on CPU: its argument
handling, and its --dry-run (every stage's plumbing: timeouts, logs, the summary, the junit
file, a tiny CPU bench merged into bench.json/.png, at most 8 files out)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STAGES = ["peers", "build", "native", "memcheck", "racecheck", "pytest", "bench-flat", "bench-merge"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def _run(*args, timeout=60, **env_extra):
    env = dict(os.environ, PYTHON=sys.executable, **env_extra)
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("args", [[], ["--dry-run"], ["a", "b"], ["{out}", "--frobnicate"]],
                         ids=["nothing", "no-outdir", "two-outdirs", "unknown-option"])
def test_bad_arguments_exit_2_with_usage(tmp_path, args):
    r = _run(*[a.format(out=tmp_path / "o") for a in args])
    assert r.returncode == 2, r.stdout + r.stderr
    assert "usage:" in r.stderr
    assert not (tmp_path / "o" / "summary.txt").exists()


def test_refuses_a_non_empty_outdir(tmp_path):
    (tmp_path / "old.log").write_text("x")
    r = _run(tmp_path, "--dry-run")
    assert r.returncode == 2 and "not empty" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["old.log"]


def test_without_a_gpu_it_asks_for_dry_run(tmp_path):
    if shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0:
        pytest.skip("this machine has a GPU")
    r = _run(tmp_path / "o")
    assert r.returncode == 2 and "--dry-run" in r.stderr


def _status(summary):
    status = {}
    for line in summary.splitlines():
        name, _, rest = line.partition(" ")
        if name in STAGES:
            status[name] = rest.strip()
    return status


def test_the_deadline_cuts_stages_and_fails_the_call(tmp_path):
    out = tmp_path / "out"
    t0 = time.monotonic()
    r = _run(out, "--dry-run", timeout=120, GPU_CHECK_DEADLINE_S="10")
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    status = _status((out / "summary.txt").read_text())
    assert status["bench-flat"].startswith("TIMEOUT"), status
    assert status["bench-merge"] == "skipped (no bench result to merge)"
    assert time.monotonic() - t0 < 60


@pytest.mark.slow
def test_dry_run_exercises_every_stage(tmp_path):
    out = tmp_path / "out"
    r = _run(out, "--dry-run", timeout=400)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    expected = {"summary.txt", "build.log", "pytest.log", "pytest.xml", "bench.log", "bench.json"}
    if importlib.util.find_spec("matplotlib") is not None:  # the plot is optional
        expected.add("bench.png")
    assert expected <= set(files)

    summary = (out / "summary.txt").read_text()
    status = _status(summary)
    assert list(status) == STAGES, summary
    assert status["memcheck"] == status["racecheck"] == "skipped (no GPU)"
    for name in ("build", "pytest", "bench-flat", "bench-merge"):
        assert status[name].startswith("ok "), (name, summary)
    assert "DRY RUN" in summary and "0 stage(s) failed" in summary
    assert "pytest: " in summary  # the junit totals

    result = json.loads((out / "bench.json").read_text())
    timed = {r["key"]: r for r in result["rows"] if r["status"] == "ok" and r["ms_median"] is not None}
    want = {"lion[cpu]", "adamw-fused", "lion+clip[cpu]", "lion-int8[cpu]"}  # + a clip and an int8 row
    assert want <= set(timed), [(r["key"], r["status"]) for r in result["rows"]]
    assert timed["lion+clip[cpu]"]["clip_ratios"] and timed["lion-int8[cpu]"]["int8_ratios"]
    assert [m["file"].rsplit("/", 1)[-1] for m in result["merged_from"]] == ["flat.json"]


def test_gpu_bench_sets_name_known_contenders():
    """The GPU-only bench lines (NOTE: [gpu bench rows]) run nowhere else: every --contenders list
    there must select (a typo would cost the one GPU call its set), the tiny line has Lion+clip
    (its host-time acceptance: <= 1.3x Lion) and the sets have the 8-bit momentum rows."""
    import re

    import torch

    sys.path.insert(0, str(ROOT))
    from bench import contenders

    text = SCRIPT.read_text()
    gpu = text[text.index("sets=(flat gpt2 llama tiny)"):text.index('i=0\nfor s in "${sets[@]}"')]
    lists = re.findall(r"--contenders ([^\s\"]+)", gpu)
    assert len(lists) >= 4, lists
    picked = {}
    for names in lists:
        picked[names] = {c.key for c in contenders.select(torch.device("cpu"), names, "cuda,triton")}
    extra = dict(re.findall(r'\[(\d)\]="([^"]*)"', gpu[gpu.index("extra=("):]))
    tiny = re.search(r"--contenders (\S+)", extra["3"]).group(1)
    assert {"lion[cuda]", "lion+clip[cuda]", "lion+clip[triton]", "adamw-fused"} <= picked[tiny]
    every = set().union(*picked.values())
    assert {"lion-int8[cuda]", "lion-bf16-ec-int8[cuda]", "tiger-int8[cuda]", "tiger-bf16-ec-int8[cuda]",
            "lion+clip[cuda]", "clip+adamw-fused"} <= every
