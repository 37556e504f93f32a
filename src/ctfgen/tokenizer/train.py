"""Train a VQ tokenizer: LlamaGen's VQ losses in a plain, resumable loop (one process or torchrun DDP).

    >>> vq = train_tokenizer({"model": {...}, "train": {"steps": 2000}}, FashionMNIST("train"), "runs/tok")

`out_dir` receives
    checkpoints/last.pt   everything needed to continue (written atomically every `checkpoint_every`
                          steps and when the run ends or is interrupted)
    log.csv               losses, codebook usage, learning rate and throughput every `log_every` steps
    tokenizer/            the finished model (config.json + model.safetensors; VQModel.from_pretrained)
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler

from ctfgen.tokenizer.codebook import DeadCodeRestarter, kmeans_init_codebook
from ctfgen.tokenizer.losses import (NLayerDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss, load_lpips,
                                     reconstruction_loss, vanilla_d_loss)
from ctfgen.tokenizer.vq import VQConfig, VQModel
from ctfgen.train.checkpoint import atomic_torch_save

__all__ = ["train_tokenizer", "DEFAULT_TRAIN", "NonFiniteLossError", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "last.pt"
FORMAT = "ctfgen.tokenizer-train/1"

# Defaults follow LlamaGen's train_vq.py where it has one (Adam betas 0.9/0.95, lr 1e-4, no weight
# decay, l2 reconstruction, clip 1.0, hinge PatchGAN with weight 0.5 from step 20000); the perceptual
# and adversarial losses are off by default because they need local weights / long runs.
DEFAULT_TRAIN = dict(
    steps=10000,            # optimizer steps in total (a resumed run continues up to this number)
    batch_size=64,          # images per step per process
    lr=1e-4,
    weight_decay=0.0,       # AdamW decoupled weight decay (LlamaGen's tokenizer uses none)
    betas=(0.9, 0.95),
    grad_clip=1.0,          # max global grad norm; 0 disables clipping
    warmup_steps=0,         # linear lr warm-up, then constant (LlamaGen: constant)
    reconstruction="l2",    # l1 | l2
    reconstruction_weight=1.0,
    perceptual_weight=0.0,  # LPIPS weight (LlamaGen: 1.0); > 0 needs lpips_weights
    lpips_weights=None,     # path to the merged LPIPS-VGG16 file (see ctfgen.tokenizer.losses)
    lpips_vgg_weights=None, # optional separate torchvision vgg16 file if lpips_weights holds only lin*
    disc_weight=0.0,        # adversarial weight (LlamaGen: 0.5); 0 disables the discriminator
    disc_start=20000,       # steps before the adversarial loss starts
    disc_adaptive=False,    # VQGAN adaptive weight |grad rec| / |grad adv| at the decoder's last layer
    disc_loss="hinge",      # hinge | vanilla
    disc_dim=64,
    disc_layers=3,
    disc_lr=None,           # defaults to lr
    mixed_precision="bf16", # bf16 | none; autocast on CUDA only (the quantizer always runs in float32)
    # Keeping the codebook in use (ctfgen.tokenizer.codebook); LlamaGen's entropy loss is model.entropy_loss_ratio.
    codebook_init="random", # random (LlamaGen) | kmeans: k-means centroids of the initial encoder's outputs
    codebook_init_images=4096,  # training images whose encoder outputs the k-means initialisation clusters
    dead_code_steps=0,      # > 0: move codes no batch chose for this many steps onto recent encoder outputs
    checkpoint_every=500,
    log_every=20,
    seed=0,
    num_workers=0,
)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the run stopped without overwriting its checkpoint."""


def resolve_config(config: dict) -> tuple[VQConfig, dict]:
    """(VQConfig, train settings with defaults filled in); unknown keys are errors, not typos ignored."""
    model = dict(config.get("model") or {})
    known = {f.name for f in fields(VQConfig)}
    unknown = sorted(set(model) - known)
    if unknown:
        raise ValueError(f"unknown model keys {unknown}; VQConfig fields are {sorted(known)}")
    vq_config = VQConfig(**model)
    train = dict(config.get("train") or {})
    unknown = sorted(set(train) - set(DEFAULT_TRAIN))
    if unknown:
        raise ValueError(f"unknown train keys {unknown}; known keys are {sorted(DEFAULT_TRAIN)}")
    t = {**DEFAULT_TRAIN, **train}
    t["betas"] = tuple(float(b) for b in t["betas"])
    if t["reconstruction"] not in ("l1", "l2"):
        raise ValueError(f"train.reconstruction must be l1 or l2, got {t['reconstruction']!r}")
    if t["disc_loss"] not in ("hinge", "vanilla"):
        raise ValueError(f"train.disc_loss must be hinge or vanilla, got {t['disc_loss']!r}")
    if t["codebook_init"] not in ("random", "kmeans"):
        raise ValueError(f"train.codebook_init must be random or kmeans, got {t['codebook_init']!r}")
    if int(t["dead_code_steps"]) < 0:
        raise ValueError(f"train.dead_code_steps must be >= 0 (0 disables restarts), got {t['dead_code_steps']}")
    if t["mixed_precision"] not in ("bf16", "none"):
        raise ValueError(f"train.mixed_precision must be bf16 or none, got {t['mixed_precision']!r}")
    if t["perceptual_weight"] > 0 and not t["lpips_weights"]:
        raise ValueError(
            "train.perceptual_weight > 0 needs train.lpips_weights: a local LPIPS-VGG16 weights file "
            "(see `python -m ctfgen.tokenizer.losses`), or set perceptual_weight: 0"
        )
    for k in ("steps", "batch_size", "checkpoint_every", "log_every"):
        if int(t[k]) < 1:
            raise ValueError(f"train.{k} must be >= 1, got {t[k]}")
    return vq_config, t


# --- distributed (inline; the shared ctfgen.train.distributed can replace it) -------------------

def _init_distributed(device):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and (device is None or str(device).startswith("cuda")) else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if device is None:
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
    return rank, world, torch.device(device)


def _barrier():
    if dist.is_initialized():
        dist.barrier()


class _ResumableBatches:
    """Batch indices for steps [start, stop): DistributedSampler's per-epoch shuffle (seed + epoch),
    cut into full batches, so step s always sees the same images whether or not the run resumed."""

    def __init__(self, dataset, batch_size, rank, world, seed, start, stop):
        self.sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                          drop_last=True)
        self.batch_size, self.start, self.stop = batch_size, start, stop
        self.per_epoch = self.sampler.num_samples // batch_size
        if self.per_epoch < 1:
            raise ValueError(
                f"the dataset has {len(dataset)} images, {self.sampler.num_samples} per process over {world} "
                f"process(es), fewer than one batch of {batch_size}: lower train.batch_size"
            )

    def __len__(self):
        return self.stop - self.start

    def __iter__(self):
        step = self.start
        while step < self.stop:
            epoch, b = divmod(step, self.per_epoch)
            self.sampler.set_epoch(epoch)
            order = list(self.sampler)
            for i in range(b, self.per_epoch):
                if step >= self.stop:
                    return
                yield order[i * self.batch_size:(i + 1) * self.batch_size]
                step += 1


class _DiscriminatorPair(nn.Module):
    """One forward for real and fake batches, so DDP sees a single forward per backward while the
    BatchNorm statistics stay per batch, as in LlamaGen (which calls the discriminator twice)."""

    def __init__(self, disc):
        super().__init__()
        self.disc = disc

    def forward(self, real, fake):
        return self.disc(real), self.disc(fake)


@contextmanager
def _frozen(module: nn.Module):
    """Gradients flow through `module` to its input but not into its weights."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


def _images(batch):
    return batch[0] if isinstance(batch, (list, tuple)) else batch


LOG_FIELDS = ["step", "loss", "reconstruction", "perceptual", "codebook", "commitment", "entropy", "generator_adv",
              "disc", "usage", "codes_restarted", "lr", "img_per_s"]


def train_tokenizer(config: dict, dataset, out_dir, resume: bool = False, device=None, progress: bool = True) -> VQModel:
    """Train a VQModel on `dataset` (items are images (C,H,W) in [-1, 1], or (image, label) pairs).

    config:
      model: VQConfig fields (codebook_size, codebook_embed_dim, encoder_ch_mult, decoder_ch_mult,
             z_channels, base_ch, num_res_blocks, in_channels, norm_groups, commit_loss_beta,
             entropy_loss_ratio, codebook_l2_norm, dropout_p, usage_window)
      train: steps, batch_size, lr, weight_decay, betas, grad_clip, warmup_steps,
             reconstruction (l1|l2), reconstruction_weight, perceptual_weight, lpips_weights,
             lpips_vgg_weights, disc_weight, disc_start, disc_adaptive, disc_loss (hinge|vanilla),
             disc_dim, disc_layers, disc_lr, mixed_precision (bf16|none), checkpoint_every, log_every,
             seed, num_workers -- see DEFAULT_TRAIN for defaults and meaning.
    Other top-level keys (e.g. `data`) are ignored here.

    With `resume`, continues from out_dir/checkpoints/last.pt (model, optimizers, step, RNG; the data
    order is a function of the step); without it, an existing checkpoint is an error rather than
    silently overwritten. A NaN/inf loss raises NonFiniteLossError and leaves the last checkpoint as
    it was. Under torchrun (WORLD_SIZE > 1) trains with DDP and only rank 0 writes files.
    Returns the trained model (unwrapped, eval mode), also saved to out_dir/tokenizer.
    """
    vq_config, t = resolve_config(config)
    out_dir = Path(out_dir)
    ckpt_path = out_dir / "checkpoints" / CHECKPOINT_NAME
    rank, world, device = _init_distributed(device)
    main = rank == 0
    say = print if main else (lambda *a, **k: None)

    state = None
    if ckpt_path.is_file():
        if not resume:
            raise FileExistsError(
                f"{ckpt_path} exists: {out_dir} already holds a tokenizer run. Pass --resume (resume=True) "
                "to continue it, or choose another output directory."
            )
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if state.get("format") != FORMAT:
            raise ValueError(f"{ckpt_path} is not a ctfgen tokenizer checkpoint (format {state.get('format')!r})")
        saved_model = VQConfig(**json.loads(state["model_config"]))
        if saved_model != vq_config:
            diff = {k: (v, getattr(vq_config, k)) for k, v in asdict(saved_model).items() if getattr(vq_config, k) != v}
            raise ValueError(f"{ckpt_path} was trained with another model config (checkpoint, now): {diff}")
        if state["dataset_len"] != len(dataset):
            raise ValueError(
                f"{ckpt_path} was trained on {state['dataset_len']} images but the dataset now has {len(dataset)}: "
                "the data position cannot be restored. Use the same data (root, limit) to resume."
            )
    elif resume:
        say(f"no checkpoint at {ckpt_path}; starting a new run")

    torch.manual_seed(t["seed"])
    model = VQModel(vq_config).to(device)
    disc = None
    if t["disc_weight"] > 0:
        disc = NLayerDiscriminator(vq_config.in_channels, t["disc_dim"], t["disc_layers"]).to(device)
    lpips = None
    if t["perceptual_weight"] > 0:
        lpips = load_lpips(t["lpips_weights"], vgg_path=t["lpips_vgg_weights"], device=device)

    opt = torch.optim.AdamW(model.parameters(), lr=t["lr"], betas=t["betas"], weight_decay=t["weight_decay"])
    d_opt = None
    if disc is not None:
        d_opt = torch.optim.AdamW(disc.parameters(), lr=t["disc_lr"] or t["lr"], betas=t["betas"],
                                  weight_decay=t["weight_decay"])
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if disc is not None:
            if "disc" not in state:
                raise ValueError(f"{ckpt_path} has no discriminator state but train.disc_weight > 0 now")
            disc.load_state_dict(state["disc"])
            d_opt.load_state_dict(state["disc_optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        start = int(state["step"])
        if state["world_size"] != world:
            say(f"note: checkpoint was written with {state['world_size']} processes, now {world}; data order changes")
        say(f"resumed from {ckpt_path} at step {start}")
    elif t["codebook_init"] == "kmeans":
        info = kmeans_init_codebook(model, dataset, num_images=int(t["codebook_init_images"]), seed=t["seed"],
                                    device=device)
        say(f"codebook initialised by k-means on {info['vectors']} encoder outputs ({info['seconds']} s)")
    restarter = None
    if int(t["dead_code_steps"]) > 0:
        restarter = DeadCodeRestarter(model.quantize, int(t["dead_code_steps"]), seed=t["seed"])
        if state is not None:
            if "dead_codes" not in state:
                raise ValueError(f"{ckpt_path} has no dead-code restart state but train.dead_code_steps > 0 now; "
                                 "resume with the settings the run started with")
            restarter.load_state_dict(state["dead_codes"])

    steps = int(t["steps"])
    def ddp(m: nn.Module) -> nn.Module:
        if world == 1:
            return m
        return nn.parallel.DistributedDataParallel(m, device_ids=[device.index] if device.type == "cuda" else None)

    ddp_model = ddp(model)
    disc_pair = ddp(_DiscriminatorPair(disc)) if disc is not None else None

    batches = _ResumableBatches(dataset, t["batch_size"], rank, world, t["seed"], start, steps)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=t["num_workers"],
                        pin_memory=device.type == "cuda")
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                if device.type == "cuda" and t["mixed_precision"] == "bf16" else nullcontext())
    d_loss_fn = hinge_d_loss if t["disc_loss"] == "hinge" else vanilla_d_loss
    params = list(model.parameters())

    log_path = out_dir / "log.csv"
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _trim_log(log_path, start)

    def checkpoint(step: int) -> None:
        if not main:
            return
        ckpt = {
            "format": FORMAT, "step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "model_config": json.dumps(asdict(vq_config)), "train_config": json.dumps(t, default=list),
            "dataset_len": len(dataset), "world_size": world, "rng": {"torch": torch.get_rng_state()},
        }
        if device.type == "cuda":
            ckpt["rng"]["cuda"] = torch.cuda.get_rng_state(device)
        if disc is not None:
            ckpt["disc"], ckpt["disc_optimizer"] = disc.state_dict(), d_opt.state_dict()
        if restarter is not None:
            ckpt["dead_codes"] = restarter.state_dict()
        atomic_torch_save(ckpt, ckpt_path)

    bar = None
    if main and progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, initial=start, desc="tokenizer", unit="step", dynamic_ncols=True)

    step = start
    last_saved = start if state is not None else None
    tick, tick_step = time.perf_counter(), start
    restarted = 0  # codes restarted since the last log row
    global_batch = t["batch_size"] * world
    model.train()
    try:
        for batch in loader:
            images = _images(batch).to(device, non_blocking=True).float()
            if step == start:
                model.grid_size(images.shape[-1])  # fails early with a clear message on unfit sizes
            lr = t["lr"] * min(1.0, (step + 1) / t["warmup_steps"]) if t["warmup_steps"] > 0 else t["lr"]
            for g in opt.param_groups:
                g["lr"] = lr

            with autocast:
                recon, q = ddp_model(images)
                recon = recon.float()
                rec = reconstruction_loss(recon, images, t["reconstruction"])
                nll = t["reconstruction_weight"] * rec
                p_loss = torch.zeros((), device=device)
                if lpips is not None:
                    p_loss = lpips(images, recon).mean()
                    nll = nll + t["perceptual_weight"] * p_loss
                loss = nll + q["codebook"] + q["commitment"] + q["entropy"]
                disc_on = disc is not None and step >= t["disc_start"]
                g_loss = torch.zeros((), device=device)
                if disc_on:
                    with _frozen(disc):
                        g_loss = hinge_g_loss(disc(recon))
                    w = adaptive_weight(nll, g_loss, model.decoder.last_layer) if t["disc_adaptive"] else 1.0
                    loss = loss + w * t["disc_weight"] * g_loss

            check = loss.detach().clone()
            if world > 1:
                dist.all_reduce(check)  # every rank must take the same decision to stop
            if not torch.isfinite(check):
                raise NonFiniteLossError(_nan_message("loss", float(check), step, ckpt_path, last_saved))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(params, t["grad_clip"] if t["grad_clip"] > 0 else math.inf)
            if not torch.isfinite(gnorm):
                raise NonFiniteLossError(_nan_message("gradient norm", float(gnorm), step, ckpt_path, last_saved))
            opt.step()

            d_loss = torch.zeros((), device=device)
            if disc_on:
                with autocast:
                    logits_real, logits_fake = disc_pair(images, recon.detach())
                    d_loss = d_loss_fn(logits_real.float(), logits_fake.float())
                d_opt.zero_grad(set_to_none=True)
                d_loss.backward()
                if t["grad_clip"] > 0:
                    torch.nn.utils.clip_grad_norm_(disc.parameters(), t["grad_clip"])
                d_opt.step()
            step += 1
            if restarter is not None:
                restarted += restarter.step(step)

            if step % t["log_every"] == 0 or step == steps:
                now = time.perf_counter()
                ips = global_batch * (step - tick_step) / max(now - tick, 1e-9)
                tick, tick_step = now, step
                row = dict(step=step, loss=_num(loss), reconstruction=_num(rec), perceptual=_num(p_loss),
                           codebook=_num(q["codebook"]), commitment=_num(q["commitment"]),
                           entropy=_num(q["entropy"]), generator_adv=_num(g_loss), disc=_num(d_loss),
                           usage=q["usage"], codes_restarted=restarted, lr=lr, img_per_s=ips)
                restarted = 0
                if main:
                    _append_log(log_path, row)
                    if bar is not None:
                        bar.set_postfix(loss=f"{row['loss']:.4f}", rec=f"{row['reconstruction']:.4f}",
                                        usage=f"{row['usage']:.1%}", img_s=f"{ips:.0f}", refresh=False)
            if bar is not None:
                bar.update(1)
            if step % t["checkpoint_every"] == 0 and step < steps:
                checkpoint(step)
                last_saved = step
    except KeyboardInterrupt:
        if step > start:
            checkpoint(step)
            say(f"\ninterrupted: saved {ckpt_path} at step {step}; continue with --resume")
        raise
    finally:
        if bar is not None:
            bar.close()

    if last_saved != step:
        checkpoint(step)
    model.eval()
    if main:
        model.save_pretrained(out_dir / "tokenizer")
        usage = model.codebook_usage()
        say(f"tokenizer saved to {out_dir / 'tokenizer'} after {step} steps; codebook usage "
            f"{usage:.1%} of {vq_config.codebook_size} codes over the last {vq_config.usage_window} indices")
    _barrier()
    return model


def _num(x) -> float:
    return float(x.detach()) if torch.is_tensor(x) else float(x)


def _nan_message(what: str, value: float, step: int, ckpt_path: Path, last_saved) -> str:
    kept = (f"The last good checkpoint, {ckpt_path} (step {last_saved}), is untouched; rerun with --resume after "
            "lowering train.lr or checking the data." if last_saved is not None else
            "No checkpoint was written yet; lower train.lr or check the data and start again.")
    return f"training stopped: {what} became {value} at step {step + 1}. {kept}"


def _trim_log(path: Path, upto: int) -> None:
    """Drop rows past the resumed step: a killed run may have logged steps its checkpoint lacks."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= upto]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        w.writeheader()
        w.writerows(rows)


def _append_log(path: Path, row: dict) -> None:
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        if new:
            w.writeheader()
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
