"""Kill-and-resume for real: a training subprocess is SIGKILLed mid-run, after a checkpoint
exists, and resumed; it ends with exactly the weights of a run that was never interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from ctfgen.train.checkpoint import list_checkpoints

TOY_SCRIPT = Path(__file__).with_name("_train_toy.py")
ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
ARGS = ["--steps", "30", "--ema", "--grad-accum", "2"]


def run_toy(out, *extra, **popen):
    return subprocess.Popen([sys.executable, str(TOY_SCRIPT), str(out), *ARGS, *extra], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    ref = run_toy(tmp_path / "ref", "--result", str(tmp_path / "ref_res"))
    victim = run_toy(tmp_path / "run", "--sleep", "0.05", "--checkpoint-every", "4")
    ckpts = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not any(s >= 8 for s, _ in list_checkpoints(ckpts)):
        assert victim.poll() is None, victim.stdout.read()
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    killed_at = max(s for s, _ in list_checkpoints(ckpts))
    assert 8 <= killed_at < 30, "the run should have been killed mid-way"

    resumed = run_toy(tmp_path / "run", "--checkpoint-every", "4", "--resume", "--result", str(tmp_path / "res"))
    out, _ = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, out
    assert f"resumed from" in out and f"at step {killed_at}/30" in out
    ref_out, _ = ref.communicate(timeout=180)
    assert ref.returncode == 0, ref_out

    a = torch.load(f"{tmp_path / 'ref_res'}.rank0", weights_only=True)
    b = torch.load(f"{tmp_path / 'res'}.rank0", weights_only=True)
    assert a["step"] == b["step"] == 30
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
        assert torch.equal(a["ema"][k], b["ema"][k]), k


def test_sigterm_checkpoints_the_last_finished_step_and_resumes_exactly(tmp_path):
    ref = run_toy(tmp_path / "ref", "--result", str(tmp_path / "ref_res"))
    # No periodic checkpoints: whatever is on disk after SIGTERM was written at exit.
    victim = run_toy(tmp_path / "run", "--sleep", "0.05", "--checkpoint-every", "1000")
    metrics = tmp_path / "run" / "metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) > 6):
        assert victim.poll() is None, victim.stdout.read()
        time.sleep(0.05)
    victim.send_signal(signal.SIGTERM)
    out, _ = victim.communicate(timeout=60)
    assert victim.returncode != 0 and "stopped by SIGTERM" in out and "--resume" in out
    (step, path), = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert 5 <= step < 30

    resumed = run_toy(tmp_path / "run", "--checkpoint-every", "1000", "--resume", "--result", str(tmp_path / "res"))
    out, _ = resumed.communicate(timeout=180)
    assert resumed.returncode == 0 and f"at step {step}/30" in out, out
    ref.communicate(timeout=180)
    a = torch.load(f"{tmp_path / 'ref_res'}.rank0", weights_only=True)
    b = torch.load(f"{tmp_path / 'res'}.rank0", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
