"""Train a VQ tokenizer with LlamaGen's VQ losses, through the one training loop (`ctfgen.train.loop`).

    >>> vq = train_tokenizer({"model": {...}, "train": {"steps": 2000}}, FashionMNIST("train"), "runs/tok")

The generator side (reconstruction, perceptual, codebook, commitment and entropy losses, and the
adversarial term once `disc_start` is reached) is the loop's loss; the PatchGAN discriminator is a
second optimiser that steps after each update (`VQTraining.after_step`) and is saved with the
checkpoints. `out_dir` receives what every training run does (checkpoints/, metrics.csv) and
`tokenizer/`, the finished model (config.json + model.safetensors; VQModel.from_pretrained).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
import torch.nn as nn

from ctfgen.config import ExperimentConfig, TokenizerConfig, dump, from_dict, to_dict
from ctfgen.data import make_dataset
from ctfgen.tokenizer.codebook import DeadCodeRestarter, kmeans_init_codebook
from ctfgen.tokenizer.losses import (NLayerDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss, load_lpips,
                                     reconstruction_loss, vanilla_d_loss)
from ctfgen.tokenizer.vq import VQConfig, VQModel
from ctfgen.train.checkpoint import list_checkpoints, seed_everything, settings_kept
from ctfgen.train.loop import refuse_earlier_run, train, training_autocast
from ctfgen.utils import distributed as D
from ctfgen.utils.errors import CheckpointError, NonFiniteLossError
from ctfgen.utils.fileio import atomic_write_text
from ctfgen.utils.rundir import WriterLock

__all__ = ["train_tokenizer", "VQTraining"]

logger = logging.getLogger("ctfgen.train")

MODEL_DIR = "tokenizer"   # out_dir/tokenizer: the finished VQModel


class _DiscriminatorPair(nn.Module):
    """One forward for real and fake batches, so DDP sees a single forward per backward while the
    BatchNorm statistics stay per batch, as in LlamaGen (which calls the discriminator twice)."""

    def __init__(self, disc):
        super().__init__()
        self.disc = disc

    def forward(self, real, fake):
        return self.disc(real), self.disc(fake)


class VQTraining:
    """The tokenizer's part of the loop: `loss(model, batch)` and the discriminator's step."""

    log_columns = ["reconstruction", "perceptual", "codebook", "commitment", "entropy", "generator_adv", "disc",
                   "usage", "codes_restarted"]
    log_sums = ("codes_restarted",)  # per log row, not averaged

    def __init__(self, cfg: TokenizerConfig, model: VQModel):
        self.cfg, L = cfg, cfg.loss
        self.restarter = (DeadCodeRestarter(model.quantize, int(cfg.train.dead_code_steps), seed=cfg.train.seed)
                          if cfg.train.dead_code_steps > 0 else None)
        self.disc = (NLayerDiscriminator(model.config.in_channels, L.disc_dim, L.disc_layers)
                     if L.disc_weight > 0 else None)
        self.lpips = load_lpips(L.lpips_weights, vgg_path=L.lpips_vgg_weights) if L.perceptual_weight > 0 else None
        self.d_loss_fn = hinge_d_loss if L.disc_loss == "hinge" else vanilla_d_loss
        self.step, self.disc_on, self._last = 0, False, None

    def setup(self, device: torch.device, total_steps: int) -> None:
        t = self.cfg.train
        if self.restarter is not None:
            self.restarter.last_step = int(t.dead_code_until * total_steps)
        self.autocast = training_autocast(t.mixed_precision, device)
        if self.lpips is not None:
            self.lpips.to(device)
        if self.disc is not None:
            self.disc.to(device)
            self.disc_pair = D.wrap_model(_DiscriminatorPair(self.disc), device, fsdp=False)
            self.d_opt = torch.optim.AdamW(self.disc.parameters(), lr=self.cfg.loss.disc_lr or t.lr, betas=t.betas,
                                           weight_decay=t.weight_decay)

    def loss(self, model, batch):
        L = self.cfg.loss
        images = (batch[0] if isinstance(batch, (list, tuple)) else batch).float()
        recon, q = model(images)
        recon = recon.float()
        rec = reconstruction_loss(recon, images, L.reconstruction)
        p_loss = g_loss = torch.zeros((), device=images.device)
        if self.lpips is not None:
            p_loss = self.lpips(images, recon).mean()
        nll = L.reconstruction_weight * rec + L.perceptual_weight * p_loss
        loss = nll + q["codebook"] + q["commitment"] + q["entropy"]
        self.disc_on = self.disc is not None and self.step >= L.disc_start
        if self.disc_on:
            self.disc.requires_grad_(False)  # gradients flow through the discriminator, not into its weights
            try:
                g_loss = hinge_g_loss(self.disc(recon))
            finally:
                self.disc.requires_grad_(True)
            w = adaptive_weight(nll, g_loss, D.unwrap(model).decoder.last_layer) if L.disc_adaptive else 1.0
            loss = loss + w * L.disc_weight * g_loss
        self._last = (images, recon.detach())
        metrics = {"reconstruction": rec, "perceptual": p_loss, "codebook": q["codebook"],
                   "commitment": q["commitment"], "entropy": q["entropy"], "generator_adv": g_loss, "usage": q["usage"]}
        return loss, {k: v.detach() if torch.is_tensor(v) else v for k, v in metrics.items()}

    def after_step(self, step: int) -> dict:
        """The discriminator's update on the last batch (real images against the reconstructions)."""
        d_loss = torch.zeros(())
        if self.disc_on:
            images, fake = self._last
            with self.autocast:
                logits_real, logits_fake = self.disc_pair(images, fake)
                d_loss = self.d_loss_fn(logits_real.float(), logits_fake.float())
            self.d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            # An infinite max_norm scales by exactly 1: only the norm, for the check, as the loop does.
            max_norm = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(self.disc.parameters(), max_norm).float()
            bad = D.all_reduce_sum(torch.stack([(~torch.isfinite(d_loss.detach().float())).float(),
                                                (~torch.isfinite(grad_norm)).float()]))  # every rank stops
            if bad.sum() > 0:  # before the update: a NaN discriminator must not reach a checkpoint
                raise NonFiniteLossError("discriminator loss" if bad[0] > 0 else "discriminator gradient norm")
            self.d_opt.step()
        self.step, self._last = step + 1, None
        restarted = self.restarter.step(self.step) if self.restarter is not None else 0
        return {"disc": d_loss.detach(), "codes_restarted": restarted}

    def state_dict(self) -> dict:
        state = {"step": self.step}
        if self.disc is not None:
            state.update(disc=self.disc.state_dict(), disc_optimizer=self.d_opt.state_dict())
        if self.restarter is not None:
            state["dead_codes"] = self.restarter.state_dict()
        return state

    def load_state_dict(self, state: dict | None, source: str) -> None:
        state = state or {}
        self.step = int(state.get("step", 0))
        if self.disc is not None:
            if "disc" not in state:
                raise CheckpointError(f"{source} has no discriminator state but tokenizer.loss.disc_weight > 0 now; "
                                      "resume with disc_weight: 0 or start a new run")
            self.disc.load_state_dict(state["disc"])
            with settings_kept(self.d_opt):  # its lr is constant, set when it is made: a new one must stay
                self.d_opt.load_state_dict(state["disc_optimizer"])
        if self.restarter is not None:
            if "dead_codes" not in state:
                raise CheckpointError(f"{source} has no dead-code restart state but tokenizer.train.dead_code_steps "
                                      "> 0 now; resume with the settings the run started with")
            self.restarter.load_state_dict(state["dead_codes"])


def train_tokenizer(config: TokenizerConfig | dict, dataset, out_dir, resume: bool = False, device=None,
                    progress: bool = True) -> VQModel:
    """Train a VQModel on `dataset` (items are images (C,H,W) in [-1, 1], or (image, label) pairs)
    and save it to out_dir/tokenizer; returns it (CPU, eval mode). `config` is the experiment's
    `tokenizer:` section (model: VQConfig fields; train: TrainConfig; loss: VQLossConfig)."""
    cfg = config if isinstance(config, TokenizerConfig) else from_dict(TokenizerConfig, config, "tokenizer")
    vq_config = from_dict(VQConfig, cfg.model, "tokenizer.model")
    device = D.rank_device(device)  # joins torchrun's group, if it started us
    out_dir = Path(out_dir)
    refuse_earlier_run(out_dir, resume)  # before the k-means initialisation, which can take long
    seed_everything(cfg.train.seed)  # the initial weights are a function of the seed alone
    model = VQModel(vq_config)
    first = dataset[0]
    model.grid_size((first[0] if isinstance(first, (list, tuple)) else first).shape[-1])  # unfit sizes fail now
    task = VQTraining(cfg, model)
    if cfg.train.codebook_init == "kmeans" and not (resume and list_checkpoints(out_dir / "checkpoints")):
        info = kmeans_init_codebook(model.to(device), dataset, num_images=int(cfg.train.codebook_init_images),
                                    seed=cfg.train.seed, device=device)
        logger.info(f"codebook initialised by k-means on {info['vectors']} encoder outputs ({info['seconds']} s)")
    train_cfg = dataclasses.replace(cfg.train, progress=progress and cfg.train.progress)
    result = train(model, task.loss, dataset, train_cfg, out_dir, resume=resume, device=device, desc="tokenizer",
                   extra=task, run_config={"model_config": to_dict(vq_config), "loss_config": to_dict(cfg.loss)})
    final = result.ship(VQModel(vq_config), out_dir / MODEL_DIR)
    if D.is_main():
        logger.info(f"tokenizer saved to {out_dir / MODEL_DIR} after {result.step} steps; codebook usage "
                    f"{final.codebook_usage():.1%} of {vq_config.codebook_size} codes over the last "
                    f"{vq_config.usage_window} indices")
    return final


def train_tokenizer_from_config(cfg: ExperimentConfig, out_dir, resume: bool = False, device=None,
                                progress: bool = True) -> VQModel:
    """`ctfgen train-tokenizer`: the `data` and `tokenizer` sections of an experiment config; the
    resolved config is kept as out_dir/config.yaml."""
    dataset = make_dataset(cfg.data, "train", channels=cfg.tokenizer.model.get("in_channels", 3))
    device = D.rank_device(device)  # the group joined before the lock: rank 0 alone takes it and writes
    out_dir = Path(out_dir)
    # The config.yaml of a run that a second writer, a missing --resume or another model stops stays as it was:
    # a new run records its config before it trains, a resumed one once it has gone ahead and finished.
    with WriterLock(out_dir, "train-tokenizer", hold=D.is_main()):
        fresh = not list_checkpoints(out_dir / "checkpoints")
        if D.is_main() and fresh:
            atomic_write_text(out_dir / "config.yaml", dump(cfg))
        vq = train_tokenizer(cfg.tokenizer, dataset, out_dir, resume=resume, device=device, progress=progress)
        if D.is_main() and not fresh:
            atomic_write_text(out_dir / "config.yaml", dump(cfg))
    return vq
