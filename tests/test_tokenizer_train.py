"""Tokenizer losses and training loop: loss goes down, checkpoint/resume is exact, NaN stops cleanly,
LPIPS/discriminator paths, the command, and 2-rank gloo DDP."""

import csv
import os

import pytest
import torch
import torch.nn.functional as F
import yaml

from _gloo import free_port
from ctfgen.tokenizer import VQModel
from ctfgen.tokenizer.losses import (LPIPS, NLayerDiscriminator, adopt_weight, hinge_d_loss, hinge_g_loss,
                                     load_lpips, merge_lpips_weights, reconstruction_loss)
from ctfgen.utils.errors import CheckpointError, ConfigError
from ctfgen.train.tokenizer import train_tokenizer
from ctfgen.train.loop import NonFiniteLossError
from ctfgen.utils.rundir import WriterLock

TINY_MODEL = dict(in_channels=1, base_ch=16, norm_groups=8, num_res_blocks=1, encoder_ch_mult=[1, 2],
                  decoder_ch_mult=[1, 2], z_channels=16, codebook_size=32)


class Blobs(torch.utils.data.Dataset):
    """Smooth random 16x16 grayscale images (upsampled 4x4 noise) with labels, like a tiny dataset."""

    def __init__(self, n=16, seed=0, nan=False):
        g = torch.Generator().manual_seed(seed)
        low = torch.rand(n, 1, 4, 4, generator=g)
        self.x = F.interpolate(low, size=16, mode="bilinear", align_corners=False) * 2 - 1
        if nan:
            self.x[:] = float("nan")

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], i % 3


def config(**settings):
    """The tokenizer section: `settings` go to `train`, or to `loss` where they are VQLossConfig's."""
    from dataclasses import fields

    from ctfgen.config import VQLossConfig

    loss_keys = {f.name for f in fields(VQLossConfig)}
    t = dict(steps=6, batch_size=4, lr=2e-3, log_every=1, checkpoint_every=3, seed=0)
    t.update({k: v for k, v in settings.items() if k not in loss_keys})
    return {"model": dict(TINY_MODEL), "train": t, "loss": {k: v for k, v in settings.items() if k in loss_keys}}


def read_log(out):
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


def state(out):
    return VQModel.from_pretrained(out / "tokenizer").state_dict()


def test_training_reduces_loss_and_saves_model(tmp_path):
    vq = train_tokenizer(config(steps=30, checkpoint_every=100), Blobs(), tmp_path, progress=False)
    rows = read_log(tmp_path)
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    first = sum(float(r["reconstruction"]) for r in rows[:3]) / 3
    last = sum(float(r["reconstruction"]) for r in rows[-3:]) / 3
    assert last < 0.5 * first
    assert 0 < float(rows[-1]["usage"]) <= 1 and float(rows[-1]["items_per_s"]) > 0
    assert (tmp_path / "checkpoints" / "ckpt-00000030.pt").is_file()  # the final checkpoint, written at exit
    loaded = VQModel.from_pretrained(tmp_path / "tokenizer")
    sd = vq.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in loaded.state_dict().items())
    assert vq.encode(Blobs().x[:2]).shape == (2, 8, 8)


def test_resume_continues_exactly(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_tokenizer(config(steps=6), Blobs(), straight, progress=False)
    train_tokenizer(config(steps=4), Blobs(), split, progress=False)  # checkpoints at 3 and at exit (4)
    with pytest.raises(FileExistsError, match="--resume"):
        train_tokenizer(config(steps=6), Blobs(), split, progress=False)
    train_tokenizer(config(steps=6), Blobs(), split, resume=True, progress=False)
    a, b = state(straight), state(split)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [int(r["step"]) for r in read_log(split)] == list(range(1, 7))
    # a different model cannot resume this run
    other = config(steps=8)
    other["model"]["codebook_size"] = 64
    with pytest.raises(ValueError, match="quantize.embedding.weight"):
        train_tokenizer(other, Blobs(), split, resume=True, progress=False)
    # nor one with other settings of the same shapes
    other = config(steps=8)
    other["model"]["commit_loss_beta"] = 0.5
    with pytest.raises(CheckpointError, match="commit_loss_beta"):
        train_tokenizer(other, Blobs(), split, resume=True, progress=False)


def test_nan_stops_and_keeps_last_checkpoint(tmp_path):
    train_tokenizer(config(steps=3), Blobs(), tmp_path, progress=False)
    ckpt = tmp_path / "checkpoints" / "ckpt-00000003.pt"
    before = ckpt.read_bytes()
    with pytest.raises(NonFiniteLossError, match=r"NaN/inf at step 4.*ckpt-00000003\.pt \(step 3\)"):
        train_tokenizer(config(steps=6), Blobs(nan=True), tmp_path, resume=True, progress=False)
    assert ckpt.read_bytes() == before
    assert not list(ckpt.parent.glob("*.tmp"))


def test_nan_discriminator_stops_before_its_update_reaches_a_checkpoint(tmp_path, monkeypatch):
    """The discriminator's loss was not checked: a NaN one stepped, was saved in the step-3 checkpoint, and the
    run only stopped at step 4, when the generator's adversarial loss went through it."""
    import ctfgen.train.tokenizer as T

    calls = {"n": 0}

    def d_loss_nan_at_step_3(real, fake):
        calls["n"] += 1
        loss = hinge_d_loss(real, fake)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(T, "hinge_d_loss", d_loss_nan_at_step_3)
    cfg = config(steps=6, checkpoint_every=1, disc_weight=0.5, disc_start=0, disc_dim=8, disc_layers=2)
    with pytest.raises(NonFiniteLossError, match=r"discriminator loss became NaN/inf at step 3 .*"
                                                 r"ckpt-00000002\.pt \(step 2\)"):
        train_tokenizer(cfg, Blobs(), tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["ckpt-00000001.pt", "ckpt-00000002.pt"]
    disc = torch.load(tmp_path / "checkpoints" / "ckpt-00000002.pt", weights_only=True)["extra"]["disc"]
    assert all(torch.isfinite(v).all() for v in disc.values() if v.is_floating_point())


def test_a_resume_trains_the_discriminator_with_the_settings_asked_for_now(tmp_path):
    """Loading the discriminator's optimizer state put back its lr, betas and weight decay: resumed with a lower
    train.lr after a discriminator NaN, as the message advises, it went on at the old lr."""
    cfg = dict(checkpoint_every=2, disc_weight=0.5, disc_start=0, disc_dim=8, disc_layers=2)
    train_tokenizer(config(steps=2, **cfg), Blobs(), tmp_path, progress=False)
    train_tokenizer(config(steps=3, lr=1e-4, betas=(0.8, 0.9), weight_decay=0.01, **cfg), Blobs(), tmp_path,
                    resume=True, progress=False)
    extra = torch.load(tmp_path / "checkpoints" / "ckpt-00000003.pt", weights_only=True)["extra"]
    groups = extra["disc_optimizer"]["param_groups"]
    assert [(g["lr"], tuple(g["betas"]), g["weight_decay"]) for g in groups] == [(1e-4, (0.8, 0.9), 0.01)]


def test_existing_run_is_refused_before_the_kmeans_initialisation(tmp_path, monkeypatch):
    """The k-means codebook initialisation (minutes on real data) used to run before the refusal."""
    import ctfgen.train.tokenizer as T

    train_tokenizer(config(steps=2), Blobs(), tmp_path, progress=False)
    calls = []
    monkeypatch.setattr(T, "kmeans_init_codebook", lambda *a, **k: calls.append(1) or {"vectors": 0, "seconds": 0})
    with pytest.raises(FileExistsError, match="--resume"):
        train_tokenizer(config(steps=2, codebook_init="kmeans"), Blobs(), tmp_path, progress=False)
    assert calls == []


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key tokenizer.train.stepz; did you mean tokenizer.train.steps"):
        train_tokenizer({"model": TINY_MODEL, "train": {"stepz": 3}}, Blobs(), tmp_path)
    with pytest.raises(ValueError, match="lpips_weights"):
        train_tokenizer(config(perceptual_weight=1.0), Blobs(), tmp_path)
    with pytest.raises(ConfigError, match="fewer than one global micro-batch"):
        train_tokenizer(config(batch_size=32), Blobs(), tmp_path, progress=False)


# --- losses -----------------------------------------------------------------------------------

def random_lpips_file(path, layout="merged"):
    torch.manual_seed(0)
    model = LPIPS()
    for p in model.parameters():
        p.data = p.data.abs() if p.dim() == 4 and p.shape[0] == 1 else p.data  # lin weights are >= 0 in lpips
    sd = model.state_dict()
    if layout == "merged":
        from safetensors.torch import save_file
        save_file({k.removeprefix("net."): v.contiguous() for k, v in sd.items()}, str(path))
        return path, None
    # torchvision vgg16 file (with its classifier) + lpips' vgg.pth
    vgg = {k.removeprefix("net."): v for k, v in sd.items() if k.startswith("net.")}
    vgg["classifier.0.weight"] = torch.zeros(4, 4)
    lin = {k: v for k, v in sd.items() if k.startswith("lin")}
    torch.save(vgg, path.with_suffix(".vgg.pth"))
    torch.save(lin, path.with_suffix(".lin.pth"))
    return path.with_suffix(".lin.pth"), path.with_suffix(".vgg.pth")


def test_lpips_from_local_files(tmp_path):
    lin, vgg = random_lpips_file(tmp_path / "w", layout="split")
    lp = load_lpips(lin, vgg_path=vgg)
    merged = merge_lpips_weights(vgg, lin, tmp_path / "merged.safetensors")
    lp2 = load_lpips(merged)
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_()
    d = lp(x, y)
    assert d.shape == (2,) and (d > 0).all()
    torch.testing.assert_close(lp2(x, y), d)
    torch.testing.assert_close(lp(x, x), torch.zeros(2))
    d.sum().backward()
    assert y.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in lp.parameters())
    lp.train()
    assert not lp.training  # never leaves eval mode (its dropout must stay off)


def test_lpips_errors_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="merge"):
        load_lpips(tmp_path / "missing.safetensors")
    lin, vgg = random_lpips_file(tmp_path / "w", layout="split")
    with pytest.raises(ValueError, match=r"missing.*features\.0\.weight"):
        load_lpips(lin)  # lin weights without the VGG file
    bad = torch.load(lin, weights_only=True)
    bad["something.else"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="something.else"):
        load_lpips(tmp_path / "bad.pth", vgg_path=vgg)


def test_lpips_weights_wrapped_in_a_state_dict_key_load(tmp_path):
    lin, vgg = random_lpips_file(tmp_path / "w", layout="split")
    torch.save({"state_dict": torch.load(lin, weights_only=True)}, tmp_path / "wrapped.pth")
    torch.save({"model": torch.load(vgg, weights_only=True)}, tmp_path / "wrapped_vgg.pth")
    x, y = torch.rand(2, 1, 28, 28) * 2 - 1, torch.rand(2, 1, 28, 28) * 2 - 1
    torch.testing.assert_close(load_lpips(tmp_path / "wrapped.pth", vgg_path=tmp_path / "wrapped_vgg.pth")(x, y),
                               load_lpips(lin, vgg_path=vgg)(x, y))


def test_lpips_damaged_file_is_a_clear_error(tmp_path):
    from ctfgen.utils.errors import CorruptFileError
    lin, vgg = random_lpips_file(tmp_path / "w", layout="split")
    (tmp_path / "cut.pth").write_bytes(lin.read_bytes()[:100])  # an interrupted download
    (tmp_path / "text.safetensors").write_bytes(b"not weights")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")  # a pickled module, not a state dict
    for name in ("cut.pth", "text.safetensors", "module.pth"):
        with pytest.raises(CorruptFileError, match="(?s)cannot be read as tensors.*merge"):
            load_lpips(tmp_path / name, vgg_path=vgg)


def test_discriminator_and_gan_losses():
    d = NLayerDiscriminator(1, ndf=8, n_layers=2)
    assert d(torch.zeros(2, 1, 28, 28)).shape == (2, 1, 5, 5)
    assert NLayerDiscriminator(3, ndf=8, n_layers=3)(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0])
    # 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))) = 0.5 * (0.25 + 0.5)
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(0.375))
    torch.testing.assert_close(hinge_g_loss(fake), torch.tensor(1.5))
    assert adopt_weight(0.5, 9, 10) == 0.0 and adopt_weight(0.5, 10, 10) == 0.5
    with pytest.raises(ValueError):
        reconstruction_loss(real, fake, "l3")


def test_training_with_perceptual_and_adversarial_losses(tmp_path):
    merged, _ = random_lpips_file(tmp_path / "lpips.safetensors")
    cfg = config(steps=3, perceptual_weight=0.5, lpips_weights=str(merged), disc_weight=0.5, disc_start=1,
                 disc_adaptive=True, disc_dim=8, disc_layers=2, reconstruction="l1")
    train_tokenizer(cfg, Blobs(), tmp_path / "run", progress=False)
    rows = read_log(tmp_path / "run")
    assert float(rows[0]["generator_adv"]) == 0.0 and float(rows[0]["disc"]) == 0.0  # before disc_start
    assert float(rows[-1]["perceptual"]) > 0 and float(rows[-1]["disc"]) > 0
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "ckpt-00000003.pt", weights_only=True)
    assert "disc" in ckpt["extra"] and "disc_optimizer" in ckpt["extra"] and ckpt["step"] == 3


# --- command ----------------------------------------------------------------------------------

def test_command_with_overrides(tmp_path):
    from ctfgen.app.cli import main
    from ctfgen.data import make_dataset
    from ctfgen.config import DataConfig

    cfg = {"data": {"dataset": "fashion_mnist", "train_limit": 20},
           "tokenizer": {"model": dict(TINY_MODEL), "train": {"steps": 50, "batch_size": 4}}}
    path = tmp_path / "tok.yaml"
    path.write_text(yaml.safe_dump(cfg))
    try:
        make_dataset(DataConfig(**cfg["data"]), "train")
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST files are not installed (make data)")
    out = tmp_path / "out"
    args = ["train-tokenizer", str(path), "--out", str(out), "--no-progress"]
    assert main(args + ["tokenizer.train.steps=2", "tokenizer.train.log_every=1"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["tokenizer"]["train"]["steps"] == 2
    assert VQModel.from_pretrained(out / "tokenizer").grid_size(28) == 14
    assert main(args) == 2  # exists, no --resume
    assert main(args + ["--resume", "tokenizer.train.steps=3"]) == 0
    assert int(read_log(out)[-1]["step"]) == 3
    recorded = (out / "config.yaml").read_text()
    assert yaml.safe_load(recorded)["tokenizer"]["train"]["steps"] == 3  # the resumed run's config
    # A resume refused (another model, or a second writer) leaves the run's config.yaml as it was.
    assert main(args + ["--resume", "tokenizer.train.steps=4", "tokenizer.model.base_ch=32"]) == 2
    with WriterLock(out, "train-tokenizer"):
        assert main(args + ["--resume", "tokenizer.train.steps=4"]) == 2
    assert (out / "config.yaml").read_text() == recorded
    assert main(args + ["tokenizer.train.stepz=3"]) == 2


# --- DDP --------------------------------------------------------------------------------------

def _ddp_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist
    vq = train_tokenizer(config(steps=2, batch_size=2), Blobs(), out, device="cpu", progress=False)
    torch.save(vq.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_two_ranks_keep_identical_weights(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    # Parameters agree on both ranks; only the usage window (local statistics) may differ.
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert differ in ([], ["quantize.codebook_used"])
    torch.manual_seed(0)  # train.seed: the weights both ranks started from
    start = VQModel(VQModel.from_pretrained(tmp_path / "tokenizer").config).state_dict()
    assert not torch.equal(a["encoder.conv_in.weight"], start["encoder.conv_in.weight"])
    assert [int(r["step"]) for r in read_log(tmp_path)] == [1, 2]  # only rank 0 logs
