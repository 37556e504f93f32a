"""2-rank gloo training under torchrun on CPU: DDP keeps the ranks identical, and both DDP and
FSDP do the same arithmetic as one process on the same global batches."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _gloo import init_gloo, run_ranks
from _train_toy import Toy, toy_dataset, toy_loss

TOY_SCRIPT = Path(__file__).with_name("_train_toy.py")
ROOT = Path(__file__).resolve().parents[1]


# torch 2.13's gloo ranks now and then abort in C++ ("terminate called without an active exception",
# SIGABRT), a few runs in ten on a loaded 2-core machine, also at commits long before any of today's
# training code; the rank's Python never sees it. Such a run is started again once, from scratch;
# any other failure, and any wrong number, still fails the test.
GLOO_ABORT = "terminate called without an active exception"


def torchrun(args, nproc=2, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(TOY_SCRIPT), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 and GLOO_ABORT in proc.stderr and "--resume" not in args:
        shutil.rmtree(args[0], ignore_errors=True)  # the aborted run's checkpoints, so the rerun starts fresh
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    elif proc.returncode != 0 and GLOO_ABORT in proc.stderr:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)  # resumes again
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def load_results(prefix: Path, n: int = 2):
    return [torch.load(f"{prefix}.rank{r}", weights_only=True) for r in range(n)]


def single_process(tmp_path, steps, dropout, schedule="cosine", **kw):
    from ctfgen.train.loop import train

    torch.manual_seed(0)
    cfg = dict(steps=steps, batch_size=16, lr=3e-3, checkpoint_every=5, log_every=1, ema=True, ema_decay=0.9, mixed_precision="none",
               schedule=schedule, warmup_steps=3, progress=False, **kw)
    return train(Toy(dropout), toy_loss, toy_dataset(), cfg, tmp_path)


def test_ddp_two_ranks_identical_weights_and_equal_to_one_process(tmp_path):
    # With dropout the ranks draw different masks, yet DDP must keep their weights identical.
    torchrun([str(tmp_path / "drop"), "--steps", "8", "--ema", "--result", str(tmp_path / "drop_res")])
    a, b = load_results(tmp_path / "drop_res")
    assert a["step"] == b["step"] == 8
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    # Only rank 0 writes: one metrics file, checkpoints written once.
    assert (tmp_path / "drop" / "metrics.csv").is_file()
    assert sorted(p.name for p in (tmp_path / "drop" / "checkpoints").iterdir()) == ["ckpt-00000005.pt", "ckpt-00000008.pt"]

    # Without dropout, 2 ranks x 8 samples is the same computation as 1 process x 16 samples.
    torchrun([str(tmp_path / "nodrop"), "--steps", "8", "--ema", "--dropout", "0", "--result", str(tmp_path / "nd_res")])
    ddp = load_results(tmp_path / "nd_res")[0]
    one = single_process(tmp_path / "one", 8, 0.0)
    for k in one.state_dict:
        torch.testing.assert_close(ddp["model"][k], one.state_dict[k], rtol=1e-4, atol=1e-5)


def test_fsdp_two_ranks_resume_matches_one_process(tmp_path):
    # FSDP (forced on for the toy) for 5 steps, then resumed to 10 from its checkpoint (a constant
    # lr, so that stopping at 5 and going on to 10 is the same schedule as 10 at once).
    out = str(tmp_path / "fsdp")
    args = ["--fsdp", "--ema", "--dropout", "0", "--grad-accum", "2", "--schedule", "constant"]
    torchrun([out, "--steps", "5", *args, "--snapshot-every", "5", "--result", str(tmp_path / "res5")])
    # The step-5 snapshot: the full EMA weights gathered from both shards, saved once by rank 0.
    snap = load_file(str(Path(out) / "snapshots" / "step-000005" / "model.safetensors"))
    ema5 = load_results(tmp_path / "res5")[0]["ema"]
    assert snap.keys() == ema5.keys()
    for k in snap:
        assert torch.equal(snap[k], ema5[k]), k
    torchrun([out, "--steps", "10", *args, "--resume", "--result", str(tmp_path / "res")])
    a, b = load_results(tmp_path / "res")
    one = single_process(tmp_path / "one", 10, 0.0, schedule="constant", grad_accum=2)
    for k in one.state_dict:
        assert torch.equal(a["model"][k], b["model"][k]), k
        torch.testing.assert_close(a["model"][k], one.state_dict[k], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a["ema"][k], one.ema_state_dict[k], rtol=1e-4, atol=1e-5)


def _failing_save_worker(rank, port, out):
    """A 2-rank gloo run whose rank 0 cannot write its first checkpoint; each rank records what it raised."""
    import torch.distributed as dist

    init_gloo(rank, port, timeout_s=60)
    from ctfgen.train import checkpoint as C
    from ctfgen.train.loop import train

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    C.save_checkpoint = no_space
    cfg = dict(steps=4, batch_size=16, checkpoint_every=2, mixed_precision="none", progress=False)
    t0 = time.time()
    try:
        train(Toy(0.0), toy_loss, toy_dataset(), cfg, out)
        result = ("finished", "", time.time() - t0)
    except BaseException as e:  # noqa: BLE001 - recorded for the test to judge
        result = (type(e).__name__, str(e), time.time() - t0)
    torch.save(result, os.path.join(out, f"result{rank}.pt"))
    # Rank 0 stays alive until rank 1 is done, as NCCL ranks on other nodes see a failed rank: gloo would
    # otherwise wake rank 1 up through the closed connection.
    deadline = time.time() + 120
    while rank == 0 and time.time() < deadline and not os.path.exists(os.path.join(out, "result1.pt")):
        time.sleep(0.1)
    dist.destroy_process_group()


def test_a_checkpoint_rank_0_cannot_write_stops_every_rank_promptly(tmp_path):
    """Rank 0's save failing (disk full) used to leave rank 1 waiting in the barrier after it until the
    process group's timeout (30 minutes under torchrun)."""
    run_ranks(_failing_save_worker, str(tmp_path), timeout=180)
    # Exit codes are not judged (gloo's occasional abort at exit, see GLOO_ABORT); what each rank raised is.
    results = [torch.load(tmp_path / f"result{r}.pt", weights_only=True) for r in range(2)]
    assert results[0][0] == "OSError" and "No space left" in results[0][1]
    assert results[1][0] == "RunError" and "rank 0 failed" in results[1][1], results[1]
    assert results[1][2] < 45


def test_single_process_helpers_without_torchrun(monkeypatch):
    from ctfgen.utils import distributed as D

    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert D.init_distributed() == torch.device("cpu")
    assert (D.get_rank(), D.get_world_size(), D.is_main()) == (0, 1, True)
    D.barrier()
    model = Toy()
    assert D.wrap_model(model, torch.device("cpu")) is model
    with D.main_first() as first:
        assert first


@pytest.mark.parametrize("asked", ["cpu", None])
def test_a_rank_works_on_the_device_asked_for(asked, monkeypatch, tmp_path):
    """Under torchrun on a CUDA machine, `--device cpu` joined an NCCL group (train-tokenizer) or was ignored
    for the rank's GPU (extract-codes); now the CPU it asked for, in a gloo group."""
    from _gloo import free_port
    from ctfgen.train.tokenizer import train_tokenizer
    from ctfgen.utils import distributed as D
    from test_tokenizer_train import Blobs, config

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.setenv(var, "1" if var == "WORLD_SIZE" else "0")
    if asked == "cpu":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a CUDA machine
    monkeypatch.setattr(torch.cuda, "set_device", lambda *a: pytest.fail("a rank took a GPU"))
    try:
        assert D.rank_device(asked) == torch.device("cpu") and torch.distributed.get_backend() == "gloo"
        if asked == "cpu":  # the training entry point joins the same way
            D.cleanup()
            vq = train_tokenizer(config(steps=1, batch_size=2), Blobs(n=4), tmp_path, device="cpu", progress=False)
            assert torch.distributed.get_backend() == "gloo" and vq.quantize.embedding.weight.device.type == "cpu"
    finally:
        D.cleanup()
