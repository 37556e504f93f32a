"""The one training loop: the VQ tokenizer, stage 1, the auxiliary model and the baseline all train
through `train()`, on anything with a model and a `loss_fn(model, batch) -> loss` (or
`(loss, {name: value})`). LlamaGen's recipe (AdamW, weight decay on >=2-D parameters only,
gradient clipping, bf16 autocast, optional EMA), plus what long runs on shared machines need:

* deterministic data order: epoch `e` is a permutation seeded by `seed + e`, cut into global
  batches of which each rank takes its slice, so N ranks see exactly the samples one process would;
* exact resume: weights, optimizer, EMA, extra state, data position and every rank's RNG states
  are restored, so a resumed run ends with the same weights as an uninterrupted one (on CPU);
* atomic checkpoints every `checkpoint_every` steps, at the end, and on SIGINT/SIGTERM (at the
  next step boundary, never half-way through an update);
* a NaN/inf loss or gradient stops the run before it touches the weights, naming the step, and
  leaves the last good checkpoint as it was;
* DDP, or FSDP for GPT-L and larger, under torchrun; a progress bar and `metrics.csv`.
"""

from __future__ import annotations

import csv
import logging
import math
import signal
import threading
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils._pytree import tree_map_only
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from ctfgen.config import TrainConfig, from_dict, to_dict
from ctfgen.utils import distributed as D
from ctfgen.utils.errors import CheckpointError, ConfigError, NonFiniteLossError, OutputExistsError, TrainingInterrupted
from ctfgen.utils.fileio import append_csv_row, atomic_write_csv, publish_dir
from ctfgen.utils.hub import load_state_dict_strict
from ctfgen.utils.precision import resolve_dtype
from ctfgen.utils.rundir import WriterLock

from . import checkpoint as C

logger = logging.getLogger("ctfgen.train")

__all__ = ["train", "TrainConfig", "TrainResult", "NonFiniteLossError", "TrainingInterrupted", "lr_at",
           "make_optimizer", "ShardedBatches", "EMA"]


@dataclass
class TrainResult:
    state_dict: dict                    # final full weights (CPU), on every rank
    ema_state_dict: dict | None         # EMA weights (CPU) when train.ema
    step: int
    checkpoint: Path | None             # the last one written
    resumed_from: Path | None
    seconds: float
    history: list                       # the rows this call logged

    def ship(self, model: nn.Module, path: Path) -> nn.Module:
        """`model` (a fresh CPU copy) holding the weights to ship (EMA when kept), in eval mode; rank 0 saves it
        to `path`."""
        best = self.ema_state_dict if self.ema_state_dict is not None else self.state_dict
        load_state_dict_strict(model, best, source="the training result")
        if D.is_main():
            publish_dir(model.save_pretrained, path)
        D.barrier()
        return model.eval()


# --- pieces -------------------------------------------------------------------------------

def training_autocast(mixed_precision: str, device: torch.device):
    """bf16 autocast for `train.mixed_precision` ("auto" | "bf16" | "none") on `device`."""
    bf16 = mixed_precision != "none" and resolve_dtype(mixed_precision, device) == torch.bfloat16
    if bf16 and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if mixed_precision == "bf16":  # asked for by name: training in float32 instead would go unnoticed
        raise ConfigError(f"train.mixed_precision=bf16 autocasts on CUDA and CPU only, not on {device.type}; "
                          "set train.mixed_precision=none (float32) or auto, or train on CUDA or CPU")
    return nullcontext()


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then constant or cosine."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device):
    # As LlamaGen: every >=2-D tensor (matmul weights, embeddings) decays; biases and norms do not.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, **extra)


class ShardedBatches:
    """Deterministic, resumable batches: epoch `e` is `randperm(N, seed + e)` cut into global
    batches of `micro * world` samples (the incomplete tail is dropped), of which rank `r` takes
    the r-th slice of `micro`."""

    def __init__(self, num_items: int, micro: int, world: int, rank: int, seed: int):
        self.n, self.micro, self.world, self.rank, self.seed = num_items, micro, world, rank, seed
        self.per_epoch = num_items // (micro * world)
        if self.per_epoch == 0:
            raise ConfigError(
                f"the dataset has {num_items} items, fewer than one global micro-batch of "
                f"{micro * world} ({micro} per rank x {world} ranks); lower train.batch_size")

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[list[int]]:
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
        for b in range(start, self.per_epoch):
            lo = (b * self.world + self.rank) * self.micro
            yield perm[lo:lo + self.micro].tolist()


class EMA:
    """Exponential moving average of the trainable parameters (LlamaGen's `update_ema`), kept in fp32."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone().float() for p in self.params]

    @torch.no_grad()
    def update(self):
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {n: D.full_tensor(s).cpu() for n, s in zip(self.names, self.shadow)}

    def load_state_dict(self, sd: dict):
        if set(sd) != set(self.names):
            missing = [n for n in self.names if n not in sd]
            raise CheckpointError(f"EMA state does not match the model (missing: {missing[:10]})")
        self.shadow = [D.like(sd[n], s) for n, s in zip(self.names, self.shadow)]

    def full_model_state(self, model_sd: dict) -> dict:
        """The model state dict with EMA parameters in place of the raw ones (buffers as they are)."""
        return {**model_sd, **{n: s.to(model_sd[n].dtype) for n, s in self.state_dict().items()}}


def _grad_sync(model: nn.Module, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation window."""
    if D.is_fsdp(model):
        model.set_requires_gradient_sync(sync)  # the window's last micro-batch turns it back on
        return nullcontext()
    return model.no_sync() if not sync and hasattr(model, "no_sync") else nullcontext()  # DDP's


@contextmanager
def _stop_on_signals(flag: dict):
    """SIGINT/SIGTERM set a flag the loop reads at step boundaries; a second SIGINT aborts at once.
    (Only the main thread may set handlers; a run in another thread keeps the process's own.)"""
    def handler(signum, frame):
        if flag.get("stop") and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["stop"] = signal.Signals(signum).name

    main_thread = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM) if main_thread}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class Log:
    """metrics.csv (rank 0; rows past a resumed step are dropped, they are about to be redone),
    the progress bar, and averages over each `log_every` window."""

    def __init__(self, run: Run, extra, tokens_per_item: int | None):
        self.path, self.enabled = run.out_dir / "metrics.csv", D.is_main()
        self.columns = ["step", "epoch", "loss", "lr", "grad_norm", "items_per_s", "tokens_per_s", "elapsed_s",
                        *getattr(extra, "log_columns", ())]
        self.sum_columns = set(getattr(extra, "log_sums", ()))  # counts per row (e.g. codes restarted), not averages
        self.cfg, self.total, self.tokens_per_item = run.cfg, run.total, tokens_per_item
        self.history, self.sums, self.n, self.t_start = [], Counter(), 0, time.time()
        self.t0 = self.t_start  # the current window's start
        if self.enabled:
            rows = []
            if run.resumed_from is not None and self.path.is_file():
                with open(self.path, newline="") as f:
                    rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= run.step]
            atomic_write_csv(self.path, self.columns, ({k: r.get(k, "") for k in self.columns} for r in rows))
        self.bar = tqdm(total=run.total, initial=run.step, desc=run.desc, dynamic_ncols=True, leave=True,
                        disable=not (self.cfg.progress and self.enabled))

    def add(self, step: int, loss: float, metrics: dict, lr: float, grad_norm, epoch: float):
        self.sums["loss"] += loss
        self.sums.update({k: v if isinstance(v, int) else float(v) for k, v in metrics.items()})
        self.n += 1
        self.bar.update(1)
        if step % self.cfg.log_every and step != self.total:
            return
        ips = self.n * self.cfg.batch_size / max(time.time() - self.t0, 1e-9)
        row = {"step": step, "epoch": epoch,
               **{k: v if k in self.sum_columns else round(v / self.n, 6) for k, v in self.sums.items()},
               "lr": lr, "grad_norm": round(grad_norm.item(), 6), "items_per_s": round(ips, 2),
               "tokens_per_s": round(ips * self.tokens_per_item, 1) if self.tokens_per_item else "",
               "elapsed_s": round(time.time() - self.t_start, 2)}
        if self.enabled:
            append_csv_row(self.path, self.columns, row)
        self.history.append(row)
        speed = f"{row['tokens_per_s']:.0f} tok/s" if self.tokens_per_item else f"{ips:.1f} items/s"
        self.bar.set_postfix_str(f"loss {row['loss']:.4f} lr {lr:.2e} {speed}", refresh=False)
        self.sums, self.n, self.t0 = Counter(), 0, time.time()


# --- the loop ------------------------------------------------------------------------------

def train(model: nn.Module, loss_fn: Callable, dataset: Dataset, config: TrainConfig | dict, out_dir: str | Path, *,
          resume: bool = False, tokens_per_item: int | None = None, on_epoch_end: Callable | None = None,
          run_config: dict | None = None, device: torch.device | str | None = None, desc: str = "train",
          extra: Any = None) -> TrainResult:
    """Train `model` on `dataset` by minimising `loss_fn(model, batch)`; see the module docstring.

    `out_dir` receives `checkpoints/ckpt-<step>.pt`, `metrics.csv` and, with snapshots,
    `epochs/epoch-<n>/` and `snapshots/step-<n>/` (save_pretrained form). With `resume=True` the
    newest checkpoint in `out_dir` is continued (a fresh start when there is none); without it,
    existing checkpoints are refused rather than overwritten. Every rank must call it (torchrun).
    `on_epoch_end(epoch, model)` runs on every rank with the EMA weights in place (not under
    FSDP), in eval mode. `extra` (optional) has `setup(device, total_steps)`, `after_step(step) -> metrics` (raising
    NonFiniteLossError(what) when its own loss became NaN/inf, before updating),
    `state_dict()`, `load_state_dict(sd, source)` and `log_columns`: a second optimiser's part
    (the tokenizer's discriminator), saved with the checkpoints.
    """
    cfg = config if isinstance(config, TrainConfig) else from_dict(TrainConfig, config, "train")
    device = torch.device(device) if device is not None else D.default_device()
    with WriterLock(out_dir, "train", hold=D.is_main()):  # one process writes a run directory
        run = Run(model, dataset, cfg, Path(out_dir), resume, device, extra, run_config or {}, desc)
        log = Log(run, extra, tokens_per_item)
        wrapped, optimizer, batches = run.wrapped, run.optimizer, run.micro_batches()
        autocast = training_autocast(cfg.mixed_precision, device)
        params = [p for p in wrapped.parameters() if p.requires_grad]
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        flag: dict = {}
        try:
            with _stop_on_signals(flag):
                while run.step < run.total:
                    optimizer.zero_grad(set_to_none=True)
                    for g in optimizer.param_groups:
                        g["lr"] = lr_at(run.step, cfg, run.total)
                    loss_sum, bad, metrics = torch.zeros((), device=device), torch.zeros((), device=device), {}
                    for micro in range(cfg.grad_accum):
                        batch = next(batches)
                        with _grad_sync(wrapped, micro == cfg.grad_accum - 1):
                            with autocast:
                                loss = loss_fn(wrapped, batch)
                            if isinstance(loss, tuple):
                                loss, parts = loss
                                # The step's values, as its loss: over all its micro-batches, not the last one's.
                                for k, v in parts.items():
                                    metrics[k] = metrics.get(k, 0) + (v if isinstance(v, int) else v / cfg.grad_accum)
                            (loss / cfg.grad_accum).backward()
                        loss = loss.detach().float()
                        bad += (~torch.isfinite(loss)).float()
                        loss_sum += torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0) / cfg.grad_accum
                    grad_norm = D.full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm)).float()
                    stats = torch.stack([loss_sum, bad, (~torch.isfinite(grad_norm)).float(),
                                         torch.tensor(float(bool(flag.get("stop"))), device=device)])
                    D.all_reduce_sum(stats)  # every rank takes the same decision to stop
                    if stats[1] > 0 or stats[2] > 0:
                        raise NonFiniteLossError(run.nan_message("loss" if stats[1] > 0 else "gradient norm"))
                    optimizer.step()
                    if run.ema is not None:
                        run.ema.update()
                    if extra is not None:
                        try:
                            metrics = {**metrics, **extra.after_step(run.step)}
                        except NonFiniteLossError as e:  # extra names what became NaN; the message is the run's
                            raise NonFiniteLossError(run.nan_message(str(e))) from None
                    run.step += 1
                    if cfg.snapshot_every and run.step % cfg.snapshot_every == 0:
                        # With constant lr a snapshot at step N equals an N-step run (ablations use it).
                        run.snapshot(run.out_dir / "snapshots" / f"step-{run.step:06d}")
                    run.end_epochs(on_epoch_end)
                    log.add(run.step, stats[0].item() / D.get_world_size(), metrics, optimizer.param_groups[0]["lr"],
                            grad_norm, round(run.epoch + run.batch / run.batches.per_epoch, 4))
                    if stats[3] > 0:
                        run.save()
                        raise TrainingInterrupted(f"[{desc}] stopped by "
                                                  f"{flag.get('stop') or 'a signal on another rank'} at step "
                                                  f"{run.step}; checkpoint {run.last_checkpoint} written, continue "
                                                  "with --resume")
                    if run.step % cfg.checkpoint_every == 0 or run.step == run.total:
                        run.save()
            if cfg.steps is None and cfg.epochs is not None:  # `steps` sets the length when both are given
                run.end_epochs(on_epoch_end, cfg.epochs)  # a last tail shorter than a step
        finally:
            log.bar.close()
        final = D.model_state(wrapped)
        return TrainResult(state_dict=final, ema_state_dict=run.ema.full_model_state(final) if run.ema else None,
                           step=run.step, checkpoint=run.last_checkpoint, resumed_from=run.resumed_from,
                           seconds=time.time() - log.t_start, history=log.history)


def refuse_earlier_run(out_dir: Path, resume: bool) -> None:
    """Without `resume`, an `out_dir` holding checkpoints is an error (callers may ask before long set-up work)."""
    if not resume and C.list_checkpoints(out_dir / "checkpoints"):
        raise OutputExistsError(f"{out_dir / 'checkpoints'} already holds checkpoints of an earlier run. Pass "
                                "--resume (resume=True) to continue it, or choose another output directory; "
                                "nothing was overwritten.")


class Run:
    """One training run's moving parts (the model as trained, optimizer, EMA, `extra`, the position
    in the data), set up and, when resuming, restored from the newest checkpoint."""

    def __init__(self, model, dataset, cfg: TrainConfig, out_dir: Path, resume: bool, device, extra, run_config: dict,
                 desc: str):
        refuse_earlier_run(out_dir, resume)
        if not cfg.length_given:
            raise ConfigError("train needs `steps` or `epochs` (e.g. train.steps=1000)")
        world = D.get_world_size()
        per_rank = cfg.batch_size // (world * cfg.grad_accum)
        if per_rank * world * cfg.grad_accum != cfg.batch_size or per_rank == 0:
            raise ConfigError(f"train.batch_size={cfg.batch_size} must be a positive multiple of ranks x grad_accum = "
                              f"{world} x {cfg.grad_accum}")
        self.batches = ShardedBatches(len(dataset), per_rank, world, D.get_rank(), cfg.seed)
        if cfg.steps is None and cfg.epochs * self.batches.per_epoch < cfg.grad_accum:
            # One step would take more epochs of data than asked for (and run their epoch hooks).
            raise ConfigError(f"train.epochs={cfg.epochs} over {len(dataset)} items is "
                              f"{cfg.epochs * self.batches.per_epoch} micro-batches of {per_rank * world}, fewer than "
                              f"one step's train.grad_accum={cfg.grad_accum}; raise train.epochs, or lower "
                              "train.grad_accum or train.batch_size")
        self.total = (int(cfg.steps) if cfg.steps is not None
                      else max(1, cfg.epochs * self.batches.per_epoch // cfg.grad_accum))
        self.cfg, self.out_dir, self.dataset, self.device = cfg, out_dir, dataset, device
        self.extra, self.run_config, self.desc = extra, run_config, desc
        self.wrapped = D.wrap_model(model.to(device).train(), device, cfg.fsdp)
        self.optimizer = make_optimizer(self.wrapped, cfg, device)
        self.ema = EMA(D.unwrap(self.wrapped), cfg.ema_decay) if cfg.ema else None  # names without DDP's "module."
        if extra is not None:
            extra.setup(device, self.total)
        C.seed_everything(cfg.seed + 1_000_003 * D.get_rank())  # dropout differs per rank
        self.step = self.epoch = self.batch = self.epochs_done = 0  # the position: epoch, batch in it, epochs ended
        self.last_checkpoint = self.resumed_from = None
        found = C.load_latest_checkpoint(out_dir / "checkpoints") if resume else None
        if found is not None:
            self.restore(*found)

    def micro_batches(self) -> Iterator:
        """This rank's micro-batches on the device, from the current position on (which they advance)."""
        ds, cfg = self.dataset, self.cfg
        while True:
            if self.batch >= self.batches.per_epoch:
                self.epoch, self.batch = self.epoch + 1, 0
            if hasattr(ds, "set_epoch"):  # e.g. CodeDataset picks its augmentation per epoch
                ds.set_epoch(self.epoch)
            idx_iter = self.batches.epoch_batches(self.epoch, self.batch)
            if cfg.num_workers > 0:
                items = DataLoader(ds, batch_sampler=list(idx_iter), num_workers=cfg.num_workers,
                                   pin_memory=self.device.type == "cuda",
                                   generator=torch.Generator().manual_seed(cfg.seed + self.epoch))
            elif hasattr(ds, "get_batch"):
                items = (ds.get_batch(idx) for idx in idx_iter)  # one vectorised read (memory-mapped codes)
            else:  # in-process loading draws dataset randomness (augmentation) from the restored RNGs
                items = (default_collate([ds[i] for i in idx]) for idx in idx_iter)
            for item in items:
                self.batch += 1
                yield tree_map_only(torch.Tensor, lambda t: t.to(self.device, non_blocking=True), item)

    def save(self) -> None:
        ckpt = {  # collective (FSDP, RNG gather): every rank builds it, rank 0 writes
            "format": C.CHECKPOINT_FORMAT,
            "model": D.model_state(self.wrapped, every_rank=False),
            "optimizer": D.optimizer_state(self.wrapped, self.optimizer),
            # The schedule is a pure function of the step (a resumed run may change it, e.g. a lower lr
            # after a NaN); recorded for the reader.
            "scheduler": {"step": self.step, "lr": lr_at(max(self.step - 1, 0), self.cfg, self.total)},
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "extra": self.extra.state_dict() if self.extra is not None else None,
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch, "epochs_done": self.epochs_done,
            "dataset_len": self.batches.n, "rng": D.gather_object(C.get_rng_state()),
            "world_size": D.get_world_size(), "train_config": to_dict(self.cfg), "run_config": self.run_config,
        }
        with D.main_first() as first:  # a failed save (disk full) stops every rank, not only rank 0
            if first:
                self.last_checkpoint = C.save_checkpoint(ckpt, self.out_dir / "checkpoints", self.step,
                                                         keep=self.cfg.keep_checkpoints)
        self.last_checkpoint = D.broadcast_object(self.last_checkpoint)  # every rank's messages name it

    def restore(self, ck: dict, path: Path) -> None:
        if ck.get("format") != C.CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path} is not a ctfgen training checkpoint (format {ck.get('format')!r})")
        if ck["step"] > self.total:  # the loop would not run and the later weights would ship as these
            asked = (f"train.steps={self.cfg.steps}" if self.cfg.steps is not None
                     else f"{self.total} steps from train.epochs={self.cfg.epochs}")
            raise ConfigError(f"{path} is at step {ck['step']}, past the {asked} asked for now; raise train.steps to "
                              f"at least {ck['step']} to continue this run, or start a new run in another directory")
        if ck.get("dataset_len", self.batches.n) != self.batches.n:
            raise CheckpointError(f"{path} was trained on {ck['dataset_len']} items but the dataset now has "
                                  f"{self.batches.n}: the data position cannot be restored. Resume with the same data.")
        D.load_model_state(self.wrapped, ck["model"], source=str(path))  # names and shapes first, all listed
        then, now = ck.get("run_config", {}).get("model_config"), self.run_config.get("model_config")
        if then is not None and now is not None and then != now:
            diff = {k: (then.get(k), now.get(k)) for k in set(then) | set(now) if then.get(k) != now.get(k)}
            raise CheckpointError(f"{path} was trained with another model config (checkpoint, now): {diff}; "
                                  "resume with the same model settings or start a new run")
        with C.settings_kept(self.optimizer):  # settings changed for this resume are logged below, and used
            D.load_optimizer_state(self.wrapped, self.optimizer, ck["optimizer"])
        if self.ema is not None:
            if ck.get("ema") is None:
                raise CheckpointError(f"{path} has no EMA weights but train.ema is on; resume with train.ema=false")
            self.ema.load_state_dict(ck["ema"])
        if self.extra is not None:
            self.extra.load_state_dict(ck.get("extra"), source=str(path))
        self.epoch, self.batch, self.epochs_done = ck["epoch"], ck["batch_in_epoch"], ck["epochs_done"]
        # The position counts global micro-batches of batch_size / grad_accum items as they were then; with
        # another grad_accum or batch_size now, the same count would point elsewhere in the epoch (redoing data).
        old_cfg = ck.get("train_config") or {}
        then = old_cfg.get("batch_size", self.cfg.batch_size) // old_cfg.get("grad_accum", self.cfg.grad_accum)
        now = self.batches.micro * self.batches.world
        if then != now:
            items = self.batch * then
            if self.batch >= self.batches.n // then:  # that epoch was finished
                self.batch = self.batches.per_epoch
            elif items % now:
                raise CheckpointError(f"{path} stopped {items} items into epoch {self.epoch}, not a whole number "
                                      f"of the {now}-item micro-batches (train.batch_size / train.grad_accum) "
                                      f"asked for now; resume with micro-batches of {then} items, as the run had, "
                                      f"or a size dividing {items}")
            else:
                self.batch = items // now
        self.step, self.last_checkpoint, self.resumed_from = ck["step"], path, path
        old, new = ck.get("train_config", {}), to_dict(self.cfg)
        changed = ", ".join(f"{k}: {old.get(k)} -> {v}" for k, v in new.items() if old and old.get(k) != v)
        if changed:
            logger.info(f"[{self.desc}] resuming with changed settings: {changed}")
        rank, world = D.get_rank(), D.get_world_size()
        if ck.get("world_size") == world:
            C.set_rng_state(ck["rng"][rank])
        else:
            logger.info(f"[{self.desc}] checkpoint was written by {ck.get('world_size')} ranks, now {world}: "
                        "RNG streams are reseeded, so the run continues but not bit-for-bit")
            C.seed_everything(self.cfg.seed + 1_000_003 * rank + ck["step"])
        logger.info(f"[{self.desc}] resumed from {path} at step {ck['step']}/{self.total} "
                    f"(epoch {self.epoch}, batch {self.batch})")

    def nan_message(self, what: str) -> str:
        # The one resumed from or written: a higher-numbered file may be one the resume could not read.
        path = self.last_checkpoint
        where = (f"the last good checkpoint is {path} (step {int(C.CKPT_PATTERN.match(path.name).group(1))}); it "
                 "was left untouched" if path is not None else "no checkpoint was written yet")
        return (f"[{self.desc}] the {what} became NaN/inf at step {self.step + 1} (epoch {self.epoch}); this step's "
                f"update was not applied and training stopped. {where}. Try a lower learning rate (train.lr="
                f"{self.cfg.lr:g} now), more warm-up (train.warmup_steps) or a smaller grad_clip, then resume with "
                "--resume.")

    def snapshot(self, path: Path) -> None:
        """save_pretrained the weights the run ships (EMA when on): rank 0 saves an unsharded copy."""
        sd = D.model_state(self.wrapped)  # full weights, gathered on every rank under FSDP
        sd = self.ema.full_model_state(sd) if self.ema is not None else sd
        raw = D.unwrap(self.wrapped)
        if D.is_main() and hasattr(raw, "save_pretrained"):
            with torch.random.fork_rng(devices=[]):  # building the copy must not move the run's RNG
                ship = load_state_dict_strict(D.unsharded_class(raw)(raw.config), sd, source="snapshot")
            publish_dir(ship.save_pretrained, path)
        D.barrier()

    def end_epochs(self, on_epoch_end: Callable | None, upto: int | None = None) -> None:
        """Snapshot and run the epoch hook for each epoch ended (by default: those the data position has passed).
        The hook runs in eval mode with the EMA weights swapped in (not under FSDP, where only snapshots have them)."""
        if upto is None:
            upto = self.epoch + (1 if self.batch >= self.batches.per_epoch else 0)
        raw = D.unwrap(self.wrapped)
        for epoch in range(self.epochs_done, upto):
            if self.cfg.snapshot_every_epoch:
                self.snapshot(self.out_dir / "epochs" / f"epoch-{epoch:03d}")
            if on_epoch_end is not None:
                backup = D.model_state(raw) if self.ema is not None and not D.is_fsdp(raw) else None
                if backup is not None:
                    raw.load_state_dict(self.ema.full_model_state(backup))
                raw.eval()
                try:
                    on_epoch_end(epoch, raw)
                finally:
                    raw.train()
                    if backup is not None:
                        raw.load_state_dict(backup)
            self.epochs_done = epoch + 1
