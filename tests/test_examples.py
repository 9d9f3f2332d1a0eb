"""The multi-process examples, run as a user runs them (README.md, examples/README.md), at short settings.

* ``examples/train_fsdp.py`` under ``torchrun`` (``python -m torch.distributed.run``) on 2 ranks:
  FSDP2 + each sign optimizer, a DCP save halfway and a resume that must equal the uninterrupted
  run bit for bit; once more with clipping inside the step (``--max-grad-norm``);
* ``examples/train_distributed.py`` (it spawns its own ranks): DistributedLion's votes, Lion and
  AdamW with DDP, replicas bit-identical at the end; once more with ``--max-grad-norm``.

Each script checks its own results and exits non-zero when one fails; here the exit code decides
and the output is shown on failure. Every command gets a fresh temporary directory for what it
writes, ``OMP_NUM_THREADS=1`` and a hard deadline: a hang fails the test (the launcher's process
group is stopped) instead of blocking CI. ``--standalone`` lets torchrun pick a free port, so
parallel runs do not collide (``--master_port 0`` hangs the workers with torch 2.13: they are
told port 0).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 240  # per command; each takes ~5-10 s on 2 idle CPU cores
NPROC = 2

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="torch.distributed with gloo is not available"),
    pytest.mark.skipif(not hasattr(os, "killpg"), reason="needs POSIX process groups to stop a hung run"),
]


def _run(args, tmp_path: Path) -> str:
    """Runs ``args`` from the repository root; returns stdout + stderr, fails on exit code or deadline."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    if torch.cuda.is_available() and torch.cuda.device_count() < NPROC:
        env["CUDA_VISIBLE_DEVICES"] = ""  # one GPU: the ranks could not have a device each; gloo on CPU
    command = " ".join(args)
    t0 = time.monotonic()
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        # torchrun's workers live in sessions of their own: SIGTERM lets it stop them, then the group dies.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=45)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        pytest.fail(f"`{command}` did not finish within {DEADLINE_S} s (hang?); its output:\n{out[-8000:]}")
    seconds = time.monotonic() - t0
    print(f"`{command}`: exit {proc.returncode} after {seconds:.1f} s\n{out}")
    assert proc.returncode == 0, f"`{command}` exited {proc.returncode} after {seconds:.1f} s; output:\n{out[-8000:]}"
    return out


@pytest.mark.parametrize("options", [
    ["--optimizer", "tiger"],  # the default
    ["--optimizer", "tiger", "--max-grad-norm", "0.5"],
    ["--optimizer", "lion"],
    ["--optimizer", "simba", "--max-grad-norm", "0.5"],
], ids=["tiger", "tiger-clip", "lion", "simba-clip"])
def test_train_fsdp_resumes_bit_identical(tmp_path, options):
    ckpt = tmp_path / "ckpt"
    out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(NPROC),
                "examples/train_fsdp.py", "--steps", "12", *options, "--checkpoint-dir", str(ckpt)], tmp_path)
    assert "resumed from a DCP checkpoint at step 6: bit-identical to the uninterrupted run" in out
    assert "all checks passed" in out
    assert any(ckpt.iterdir()), "the DCP checkpoint was not written where --checkpoint-dir said"
    if "--max-grad-norm" in options:
        clipped = re.search(r"clipped in (\d+) of 12 steps", out)
        assert clipped and int(clipped.group(1)) > 0, "the run never clipped: the clipped step was not exercised"


@pytest.mark.parametrize("options", [[], ["--max-grad-norm", "0.5"]], ids=["plain", "clip"])
def test_train_distributed(tmp_path, options):
    out = _run([sys.executable, "examples/train_distributed.py", "--ranks", str(NPROC), "--steps", "10",
                "--model-size", "nano", "--batch-size", "8", "--eval-interval", "5", "--eval-batches", "2",
                *options, "--out", str(tmp_path / "distributed")], tmp_path)
    assert "all checks passed" in out
    for run in ("dlion-majority", "dlion-average", "lion+ddp", "adamw+ddp"):
        assert f"[ok] {run}: the {NPROC} replicas' params are bit-identical" in out
        if options:
            clipped = re.search(rf"\[ok\] {re.escape(run)}: rank 0's gradient norms are finite; clipped in (\d+)", out)
            assert clipped and int(clipped.group(1)) > 0, f"{run} never clipped: the clipped step was not exercised"
    assert (tmp_path / "distributed.json").is_file() and (tmp_path / "distributed.md").is_file()
