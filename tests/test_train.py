"""The training loop and checkpoints on a toy model (stages are tested at the end, on tiny codes)."""

from __future__ import annotations

import csv
import math
import os
import random
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from _train_toy import Toy as _Toy, toy_dataset, toy_loss
from ctfgen.train import checkpoint as C
from ctfgen.train.loop import NonFiniteLossError, ShardedBatches, TrainConfig, lr_at, make_optimizer, train
from ctfgen.utils import fileio
from ctfgen.utils.fileio import (append_csv_row, atomic_save_safetensors, atomic_write_csv, atomic_write_json,
                                 publish_dir, replace_dir)


def Toy(dropout=0.2, seed=0):  # noqa: N802 - the toy model, initialised the same way every time
    torch.manual_seed(seed)
    return _Toy(dropout)


def small_cfg(**kw):
    base = dict(steps=12, batch_size=16, lr=3e-3, checkpoint_every=4, log_every=1, progress=False)
    base.update(kw)
    return base


# --- checkpoints ------------------------------------------------------------------------------

def test_atomic_save_keeps_newest_and_ignores_partial_files(tmp_path):
    for step in (1, 2, 3):
        C.save_checkpoint({"step": step, "w": torch.full((3,), float(step))}, tmp_path, step, keep=2)
    assert [s for s, _ in C.list_checkpoints(tmp_path)] == [2, 3]
    # A save killed mid-write leaves only a hidden temporary, which is never taken for a checkpoint.
    (tmp_path / ".ckpt-00000004.pt.abc.tmp").write_bytes(b"\x00garbage")
    assert C.latest_checkpoint(tmp_path).name == "ckpt-00000003.pt"
    state, path = C.load_latest_checkpoint(tmp_path)
    assert state["step"] == 3 and torch.equal(state["w"], torch.full((3,), 3.0))


def test_atomic_files_get_the_mode_an_ordinary_file_would(tmp_path):
    """Checkpoints, models and records are readable as the umask allows (not 0600 as a mkstemp file)."""
    old = os.umask(0o022)
    try:
        paths = [C.save_checkpoint({"step": 1}, tmp_path, 1), atomic_write_json(tmp_path / "r.json", {}),
                 atomic_save_safetensors({"w": torch.zeros(2)}, tmp_path / "m.safetensors")]
        os.umask(0o027)
        paths.append(atomic_write_json(tmp_path / "group.json", {}))
    finally:
        os.umask(old)
    assert [oct(p.stat().st_mode & 0o777) for p in paths] == ["0o644", "0o644", "0o644", "0o640"]


def test_publish_dir_that_fails_leaves_the_old_directory_and_no_temporary(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w.txt").write_text("old")

    def killed_half_way(d):
        d.mkdir()
        (d / "w.txt").write_text("new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        publish_dir(killed_half_way, tmp_path / "model")
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (tmp_path / "model" / "w.txt").read_text() == "old"


def test_publish_dir_removes_what_killed_publishers_left_but_not_a_live_ones(tmp_path):
    # only this process's own leftover was removed: every killed run's full model copy stayed for good
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        prefix = fileio.temporary_prefix(tmp_path / "model", "tmp")
        for pid in (dead.pid, alive.pid):
            (tmp_path / f"{prefix}{pid}").mkdir()
            (tmp_path / f"{prefix}{pid}" / "w.txt").write_text("a copy")
        publish_dir(lambda d: d.mkdir(), tmp_path / "model")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{prefix}{alive.pid}", "model"])
    finally:
        alive.kill()
        alive.wait()


def test_publish_dir_syncs_what_write_left_unsynced_before_the_rename(tmp_path, monkeypatch):
    # a writer that does not fsync (shutil.copytree, huggingface_hub's model card) had its folder renamed
    # into place with its bytes maybe still in memory: after a crash, a published model of empty files
    real_fsync, real_replace, events = os.fsync, os.replace, []
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda src, dst: events.append(("replace", str(src))) or real_replace(src, dst))

    def write(d):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "w.txt").write_text("weights")
        (d / "card.md").write_text("card")
        (d / "card.md").chmod(0o444)
        os.symlink("card.md", d / "link.md")

    final = publish_dir(write, tmp_path / "model")
    tmp = f"{fileio.temporary_prefix(tmp_path / 'model', 'tmp')}{os.getpid()}"
    renamed = events.index(("replace", str(tmp_path / tmp)))
    synced_before = {os.path.relpath(p, tmp_path) for kind, p in events[:renamed] if kind == "fsync"}
    assert {f"{tmp}/sub/w.txt", f"{tmp}/card.md", f"{tmp}/sub", tmp} <= synced_before
    assert (final / "sub" / "w.txt").read_text() == "weights" and (final / "link.md").is_symlink()


def test_replace_dir_that_cannot_rename_the_new_directory_puts_the_old_one_back(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w.txt").write_text("old")
    (tmp_path / "new").mkdir()
    real, calls = os.replace, []

    def second_fails(src, dst):
        calls.append(1)
        if len(calls) == 2:  # the first moves the old version aside, the second renames the new one into place
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(OSError, match="No space left"):
        replace_dir(tmp_path / "new", tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "new"]
    assert (tmp_path / "model" / "w.txt").read_text() == "old"


@pytest.mark.parametrize("kind", ["link", "file", "dangling link"])
def test_replace_dir_over_a_link_or_a_file_leaves_nothing_aside(tmp_path, kind):
    # rmtree(ignore_errors=True) refused the link or file moved aside: a hidden .model.old-* stayed for good
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "w.txt").write_text("kept")
    if kind == "file":
        (tmp_path / "model").write_text("a file")
    else:
        (tmp_path / "model").symlink_to(tmp_path / ("elsewhere" if kind == "link" else "gone"))
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "w.txt").write_text("new")
    replace_dir(tmp_path / "new", tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "model"]
    assert (tmp_path / "model" / "w.txt").read_text() == "new" and not (tmp_path / "model").is_symlink()
    assert (tmp_path / "elsewhere" / "w.txt").read_text() == "kept"  # a link's target is not the old version


def test_a_csv_row_cut_short_by_a_full_disk_is_not_left_in_the_table(tmp_path):
    # the row's head stayed: "...\r\n10,0.5\r\n1", which a run resumed at step 10 kept as a second step 1
    path = tmp_path / "metrics.csv"
    atomic_write_csv(path, ["step", "loss"], [{"step": s, "loss": 0.5} for s in range(1, 11)])
    before = path.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit is then an error, as ENOSPC
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) + 1, hard))  # room for one byte of the row
    try:
        with pytest.raises(OSError):
            append_csv_row(path, ["step", "loss"], {"step": 11, "loss": 0.5})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert path.read_bytes() == before
    append_csv_row(path, ["step", "loss"], {"step": 11, "loss": 0.5})
    assert path.read_bytes() == before + b"11,0.5\r\n"


def test_unreadable_newest_checkpoint_falls_back_to_previous(tmp_path):
    C.save_checkpoint({"step": 1}, tmp_path, 1, keep=0)
    (tmp_path / "ckpt-00000002.pt").write_bytes(b"truncated")
    state, path = C.load_latest_checkpoint(tmp_path)
    assert state["step"] == 1
    with pytest.raises(C.CheckpointError, match="could not read"):
        C.load_checkpoint(tmp_path / "ckpt-00000002.pt")


def test_pruning_keeps_the_checkpoint_just_written_beside_an_unreadable_later_one(tmp_path):
    """A run resumed from ckpt 2 because ckpt 4 is unreadable saves ckpt 3 (e.g. on Ctrl-C): with keep=1
    that checkpoint is the one kept, so the next resume continues from it."""
    C.save_checkpoint({"step": 2}, tmp_path, 2, keep=1)
    (tmp_path / "ckpt-00000004.pt").write_bytes(b"truncated")
    assert C.load_latest_checkpoint(tmp_path)[0]["step"] == 2
    path = C.save_checkpoint({"step": 3}, tmp_path, 3, keep=1)
    assert path.is_file() and [s for s, _ in C.list_checkpoints(tmp_path)] == [3, 4]
    assert C.load_latest_checkpoint(tmp_path)[0]["step"] == 3
    C.save_checkpoint({"step": 1}, tmp_path / "two", 1, keep=2)
    C.save_checkpoint({"step": 2}, tmp_path / "two", 2, keep=2)
    C.save_checkpoint({"step": 3}, tmp_path / "two", 3, keep=2)
    assert [s for s, _ in C.list_checkpoints(tmp_path / "two")] == [2, 3]


def test_pruning_keeps_every_checkpoint_while_there_are_fewer_than_keep(tmp_path):
    """keep=5 with 4 checkpoints keeps all 4 (a negative slice end used to delete the oldest ones)."""
    for step in range(1, 8):
        C.save_checkpoint({"step": step}, tmp_path, step, keep=5)
        assert [s for s, _ in C.list_checkpoints(tmp_path)] == list(range(max(1, step - 4), step + 1))


def test_rng_state_roundtrip_through_weights_only_file(tmp_path):
    C.seed_everything(3)
    state = C.get_rng_state()
    C.save_checkpoint({"rng": state}, tmp_path, 0)
    a = (random.random(), np.random.rand(), torch.rand(()).item())
    C.seed_everything(99)
    C.set_rng_state(C.load_checkpoint(C.latest_checkpoint(tmp_path))["rng"])
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == a


# --- optimiser pieces -------------------------------------------------------------------------

def test_lr_schedule_warmup_then_cosine_and_constant():
    cfg = TrainConfig(steps=100, lr=1e-3, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(0, cfg, 100) == pytest.approx(1e-4)
    assert lr_at(9, cfg, 100) == pytest.approx(1e-3)
    assert lr_at(10, cfg, 100) == pytest.approx(1e-3)
    assert lr_at(55, cfg, 100) == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    assert lr_at(100, cfg, 100) == pytest.approx(1e-4)
    const = TrainConfig(steps=100, lr=1e-3)
    assert {lr_at(s, const, 100) for s in range(100)} == {1e-3}


def test_weight_decay_only_on_matrices_and_llamagen_defaults():
    model = Toy()
    opt = make_optimizer(model, TrainConfig(steps=1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert decay["betas"] == (0.9, 0.95) and decay["lr"] == 1e-4


def test_config_rejects_unknown_keys_and_missing_length(tmp_path):
    from ctfgen.config import from_dict
    from ctfgen.utils.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown config key train.lrr; did you mean train.lr?"):
        from_dict(TrainConfig, {"steps": 1, "lrr": 1}, "train")
    with pytest.raises(ConfigError, match="steps.*epochs"):
        train(Toy(), toy_loss, toy_dataset(), {}, tmp_path)


def test_sharded_batches_split_each_global_batch_and_resume_mid_epoch():
    one = ShardedBatches(50, micro=8, world=1, rank=0, seed=5)
    r0 = ShardedBatches(50, micro=4, world=2, rank=0, seed=5)
    r1 = ShardedBatches(50, micro=4, world=2, rank=1, seed=5)
    assert one.per_epoch == r0.per_epoch == 6  # 50 // 8, tail dropped
    for g, a, b in zip(one.epoch_batches(2), r0.epoch_batches(2), r1.epoch_batches(2)):
        assert g == a + b and not set(a) & set(b)
    assert list(one.epoch_batches(2, start=4)) == list(one.epoch_batches(2))[4:]
    assert list(one.epoch_batches(0)) != list(one.epoch_batches(1))
    with pytest.raises(ValueError, match="lower train.batch_size"):
        ShardedBatches(7, micro=4, world=2, rank=0, seed=0)


# --- the loop ---------------------------------------------------------------------------------

def test_training_reduces_loss_and_logs_csv(tmp_path):
    res = train(Toy(), toy_loss, toy_dataset(), small_cfg(steps=60, lr=1e-2, checkpoint_every=30), tmp_path,
                tokens_per_item=1)
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 61))
    assert set(rows[0]) == {"step", "epoch", "loss", "lr", "grad_norm", "items_per_s", "tokens_per_s", "elapsed_s"}
    first = np.mean([float(r["loss"]) for r in rows[:5]])
    last = np.mean([float(r["loss"]) for r in rows[-5:]])
    assert last < first - 0.1
    assert [s for s, _ in C.list_checkpoints(tmp_path / "checkpoints")] == [30, 60]
    assert res.step == 60 and res.checkpoint.name == "ckpt-00000060.pt"


def test_in_process_resume_matches_uninterrupted_run(tmp_path):
    cfg = small_cfg(steps=12, ema=True, ema_decay=0.8, grad_accum=2, schedule="cosine", warmup_steps=2)
    full = train(Toy(), toy_loss, toy_dataset(), cfg, tmp_path / "full")
    # The same run stopped after 8 steps (its checkpoint at 8), then resumed with a fresh model.
    part_dir = tmp_path / "part"
    train(Toy(), toy_loss, toy_dataset(), cfg, part_dir)
    for p in C.list_checkpoints(part_dir / "checkpoints"):
        if p[0] > 8:
            p[1].unlink()
    resumed = train(Toy(), toy_loss, toy_dataset(), cfg, part_dir, resume=True)
    assert resumed.resumed_from.name == "ckpt-00000008.pt"
    for k in full.state_dict:
        assert torch.equal(full.state_dict[k], resumed.state_dict[k]), k
        assert torch.equal(full.ema_state_dict[k], resumed.ema_state_dict[k]), k
    with open(part_dir / "metrics.csv") as f:  # rows after the checkpoint were redone, not duplicated
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 13))


def test_resume_with_another_grad_accum_continues_where_the_data_stopped(tmp_path):
    """The position is in micro-batches of batch_size / grad_accum items: resumed with grad_accum 2 instead
    of 1 (e.g. on fewer GPUs), step 3 used to retrain the items of step 2 rather than take new ones."""
    class Seen(torch.utils.data.Dataset):
        def __init__(self):
            self.data, self.seen = toy_dataset(), []

        def __len__(self):
            return len(self.data)

        def __getitem__(self, i):
            self.seen.append(i)
            return self.data[i]

    cfg = small_cfg(steps=2, checkpoint_every=2)
    first, second = Seen(), Seen()
    train(Toy(), toy_loss, first, cfg, tmp_path)
    train(Toy(), toy_loss, second, {**cfg, "steps": 3, "grad_accum": 2}, tmp_path, resume=True)
    assert len(first.seen) == 32 and len(second.seen) == 16 and not set(first.seen) & set(second.seen)
    # 32 items in are not a whole number of micro-batches of 12: refused rather than skipping or redoing items.
    train(Toy(), toy_loss, toy_dataset(), cfg, tmp_path / "b")
    with pytest.raises(C.CheckpointError, match="32 items into epoch 0.* 12-item micro-batches"):
        train(Toy(), toy_loss, toy_dataset(), {**cfg, "steps": 4, "batch_size": 24, "grad_accum": 2}, tmp_path / "b",
              resume=True)


def test_resume_past_the_steps_asked_for_is_refused_and_a_finished_run_resumes(tmp_path):
    """A run at step 8 resumed with steps=6 used to return at once with the step-8 weights, shipped as a 6-step run."""
    from ctfgen.utils.errors import ConfigError

    done = train(Toy(), toy_loss, toy_dataset(), small_cfg(steps=8), tmp_path)
    metrics = (tmp_path / "metrics.csv").read_text()
    with pytest.raises(ConfigError, match="ckpt-00000008.pt is at step 8, past the train.steps=6.*at least 8"):
        train(Toy(), toy_loss, toy_dataset(), small_cfg(steps=6), tmp_path, resume=True)
    assert [s for s, _ in C.list_checkpoints(tmp_path / "checkpoints")] == [4, 8]
    assert (tmp_path / "metrics.csv").read_text() == metrics
    again = train(Toy(), toy_loss, toy_dataset(), small_cfg(steps=8), tmp_path, resume=True)  # finished: as it was
    assert again.step == 8 and all(torch.equal(done.state_dict[k], v) for k, v in again.state_dict.items())


def test_resume_trains_with_the_betas_and_weight_decay_asked_for_now(tmp_path):
    """Loading the optimizer's state put back the betas and weight decay saved with it: a resume with others was
    logged as changing them but went on with the old ones (the lr, set every step, did change)."""
    train(Toy(), toy_loss, toy_dataset(), small_cfg(steps=2, checkpoint_every=2), tmp_path)
    train(Toy(), toy_loss, toy_dataset(), small_cfg(steps=3, weight_decay=0.0, betas=(0.8, 0.9), lr=1e-3), tmp_path,
          resume=True)
    groups = C.load_checkpoint(C.latest_checkpoint(tmp_path / "checkpoints"))["optimizer"]["param_groups"]
    assert [(g["weight_decay"], tuple(g["betas"]), g["lr"]) for g in groups] == [(0.0, (0.8, 0.9), 1e-3)] * 2


def test_logged_metrics_are_over_all_micro_batches_of_a_step(tmp_path):
    """Under grad_accum the loss's metrics (the tokenizer's reconstruction, ...) were the last micro-batch's alone,
    while the logged loss was the mean over the step's micro-batches."""
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        loss = toy_loss(model, batch)
        return loss, {"call": torch.tensor(float(len(calls))), "loss_again": loss.detach()}

    class Columns:  # an `extra` that only names the metrics' columns
        log_columns = ["call", "loss_again"]
        setup = load_state_dict = lambda *a, **k: None
        after_step = state_dict = lambda *a: {}

    rows = train(Toy(), loss_fn, toy_dataset(), small_cfg(steps=2, grad_accum=4), tmp_path, extra=Columns()).history
    assert [float(r["call"]) for r in rows] == [2.5, 6.5]  # calls 1-4, then 5-8
    assert all(float(r["loss_again"]) == pytest.approx(float(r["loss"]), abs=1e-5) for r in rows)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    a = train(Toy(0.0), toy_loss, toy_dataset(), small_cfg(steps=6, grad_accum=1, mixed_precision="none"), tmp_path / "a")
    b = train(Toy(0.0), toy_loss, toy_dataset(), small_cfg(steps=6, grad_accum=4, mixed_precision="none"), tmp_path / "b")
    for k in a.state_dict:
        torch.testing.assert_close(a.state_dict[k], b.state_dict[k], rtol=1e-4, atol=1e-5)


def test_existing_run_is_refused_without_resume(tmp_path):
    train(Toy(), toy_loss, toy_dataset(), small_cfg(steps=4), tmp_path)
    with pytest.raises(FileExistsError, match="--resume"):
        train(Toy(), toy_loss, toy_dataset(), small_cfg(steps=4), tmp_path)


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss = toy_loss(model, batch)
        return loss * float("nan") if calls["n"] == 7 else loss

    with pytest.raises(NonFiniteLossError) as e:
        train(Toy(), loss_fn, toy_dataset(), small_cfg(steps=20, checkpoint_every=5), tmp_path)
    msg = str(e.value)
    assert "step 7" in msg and "lower learning rate" in msg and "ckpt-00000005.pt" in msg
    assert [s for s, _ in C.list_checkpoints(tmp_path / "checkpoints")] == [5]
    state = C.load_checkpoint(C.latest_checkpoint(tmp_path / "checkpoints"))
    assert state["step"] == 5 and all(torch.isfinite(v).all() for v in state["model"].values())
    # ... and the run resumes from it with a lower learning rate.
    res = train(Toy(), toy_loss, toy_dataset(), small_cfg(steps=8, checkpoint_every=5, lr=1e-3), tmp_path, resume=True)
    assert res.step == 8 and res.resumed_from.name == "ckpt-00000005.pt"


def test_nan_message_names_the_checkpoint_resumed_from_not_an_unreadable_later_one(tmp_path):
    train(Toy(), toy_loss, toy_dataset(), small_cfg(steps=4, checkpoint_every=2), tmp_path)
    (tmp_path / "checkpoints" / "ckpt-00000004.pt").write_bytes(b"truncated")  # the resume falls back to step 2

    def nan_loss(model, batch):
        return toy_loss(model, batch) * float("nan")

    with pytest.raises(NonFiniteLossError, match=r"NaN/inf at step 3 .*ckpt-00000002\.pt \(step 2\)") as e:
        train(Toy(), nan_loss, toy_dataset(), small_cfg(steps=8, checkpoint_every=2), tmp_path, resume=True)
    assert "ckpt-00000004" not in str(e.value)


def test_epoch_hook_runs_only_for_epochs_trained_when_steps_set_the_length(tmp_path):
    """steps=4 with epochs=3 trains 4 steps (`steps` wins), less than one epoch of 6 micro-batches: no epoch
    ended, so no hook. The hooks of epochs 0-2 used to run after the loop, as if all three had been trained."""
    seen = []
    res = train(Toy(), toy_loss, toy_dataset(), small_cfg(steps=4, epochs=3), tmp_path,
                on_epoch_end=lambda epoch, model: seen.append(epoch))
    assert res.step == 4 and seen == []


def test_epochs_too_few_for_one_step_are_refused(tmp_path):
    """20 items in micro-batches of 8 (batch 32, grad_accum 4) are 2 per epoch: epochs=1 used to train one step
    over 4 micro-batches, i.e. two epochs, and run the epoch hook for epoch 1 too."""
    from ctfgen.utils.errors import ConfigError

    seen = []
    with pytest.raises(ConfigError, match="train.epochs=1 over 20 items is 2 micro-batches of 8.*grad_accum=4"):
        train(Toy(), toy_loss, toy_dataset(20), dict(epochs=1, batch_size=32, grad_accum=4, progress=False), tmp_path,
              on_epoch_end=lambda epoch, model: seen.append(epoch))
    assert seen == []


def test_epoch_hook_and_snapshots(tmp_path):
    from ctfgen.utils.hub import HubMixin

    class HubToy(_Toy, HubMixin):
        def __init__(self, config: dict):
            super().__init__(config["dropout"])
            self.config = config

    seen = []

    def hook(epoch, model):
        assert not model.training
        seen.append(epoch)

    # 96 items in micro-batches of 10 -> 9 per epoch; 27 micro-batches / grad_accum 4 -> 6 steps,
    # the last 3 micro-batches of epoch 2 unused; its hook still runs.
    res = train(HubToy({"dropout": 0.1}), toy_loss, toy_dataset(),
                dict(epochs=3, batch_size=40, grad_accum=4, checkpoint_every=100, ema=True, progress=False,
                     snapshot_every_epoch=True), tmp_path, on_epoch_end=hook)
    assert res.step == 6 and seen == [0, 1, 2]
    snap = HubToy.from_pretrained(tmp_path / "epochs" / "epoch-002")
    assert snap.config == {"dropout": 0.1}
