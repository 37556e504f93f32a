"""The one training loop: stage 1, the auxiliary model and the baseline all train through `train()`.

Anything with a model and a `loss_fn(model, batch) -> scalar loss` can use it. It follows LlamaGen's
recipe (AdamW, lr 1e-4, weight decay 0.05 on >=2-D parameters only, betas 0.9/0.95, gradient clip
1.0, bf16 autocast on GPU, optional EMA) and adds what long runs on shared machines need:

* deterministic data order: epoch `e` is a permutation seeded by `seed + e`, cut into global
  batches; each rank takes its slice of every global batch, so N ranks see exactly the samples
  one process would, and the position (epoch, batch) is part of the checkpoint;
* exact resume: weights, optimizer, scheduler, EMA, data position and every rank's RNG states are
  restored, so a resumed run ends with the same weights as an uninterrupted one (on CPU);
* atomic checkpoints every `ckpt_every` steps, at the end, and on SIGINT/SIGTERM (at the next step
  boundary, never half-way through an update);
* a NaN/inf loss or gradient stops the run before it touches the weights, naming the step, and
  leaves the last good checkpoint as it was.
"""

from __future__ import annotations

import csv
import math
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from . import distributed as D
from .checkpoint import (
    CheckpointError,
    get_rng_state,
    list_checkpoints,
    load_latest_checkpoint,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)

CHECKPOINT_FORMAT = 1


class NonFiniteLossError(RuntimeError):
    """The loss or gradient became NaN/inf; the weights of that step were not updated."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM arrived; a checkpoint of the last finished step was written."""


def training_autocast(mixed_precision: str, device: torch.device):
    """bf16 autocast for `train.mixed_precision` ("auto" | "bf16" | "none") on `device`."""
    from ctfgen.precision import resolve_dtype

    use_bf16 = mixed_precision == "bf16" or (
        mixed_precision == "auto" and resolve_dtype("auto", device) == torch.bfloat16)
    if use_bf16 and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


@dataclass
class TrainConfig:
    """Optimisation settings (the `train:` section of a config). Sizes are global, not per rank."""

    steps: int | None = None            # optimizer steps; or give `epochs`
    epochs: int | None = None
    batch_size: int = 256               # global batch per optimizer step (all ranks, all micro-batches)
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0              # 0 disables clipping (the norm is still logged)
    warmup_steps: int = 0
    schedule: str = "constant"          # "constant" (LlamaGen) or "cosine"
    min_lr_ratio: float = 0.0           # cosine decays to lr * min_lr_ratio
    ema: bool = False
    ema_decay: float = 0.9999
    # "auto": bf16 autocast on CUDA and on CPUs with native bf16 matmul, float32 elsewhere;
    # "bf16": bf16 autocast on any device; "none": float32. Loss, optimiser state and master
    # weights stay float32 in every case.
    mixed_precision: str = "auto"
    seed: int = 0
    ckpt_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 10
    snapshot_every_epoch: bool = False  # save_pretrained the (EMA) model after every epoch
    snapshot_every: int = 0             # ... and every N steps, to snapshots/step-<N>/ (0: never)
    num_workers: int = 0
    fsdp: Any = "auto"                  # True, False or "auto" (GPT-L and larger)
    progress: bool = True

    def __post_init__(self):
        # YAML 1.1 reads `3e-4` as a string; accept it (and say so when it is not a number).
        for name in ("lr", "weight_decay", "grad_clip", "min_lr_ratio", "ema_decay"):
            try:
                setattr(self, name, float(getattr(self, name)))
            except (TypeError, ValueError):
                raise ValueError(f"train.{name} must be a number, got {getattr(self, name)!r}") from None
        self.betas = tuple(float(b) for b in self.betas)
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"train.schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.mixed_precision not in ("auto", "bf16", "none"):
            raise ValueError(f"train.mixed_precision must be 'auto', 'bf16' or 'none', got {self.mixed_precision!r}")
        if self.steps is None and self.epochs is None:
            raise ValueError("train needs `steps` or `epochs` (e.g. train.steps=1000)")
        if self.grad_accum < 1 or self.batch_size < 1:
            raise ValueError("train.batch_size and train.grad_accum must be >= 1")

    @classmethod
    def from_dict(cls, d: dict | None) -> "TrainConfig":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown train settings: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


@dataclass
class TrainResult:
    state_dict: dict                    # final full weights (CPU), on every rank
    ema_state_dict: dict | None         # EMA weights (CPU) when train.ema
    step: int
    epoch: int
    checkpoint: Path | None
    metrics_path: Path
    resumed_from: Path | None = None
    seconds: float = 0.0
    history: list = field(default_factory=list)

    def best_state_dict(self) -> dict:
        """The weights to ship: EMA when it was kept, else the raw weights."""
        return self.ema_state_dict if self.ema_state_dict is not None else self.state_dict


# --- pieces -------------------------------------------------------------------------------

def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then constant or cosine."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # As LlamaGen: every >=2-D tensor (matmul weights, embeddings) decays; biases and norms do not.
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
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
            raise ValueError(
                f"the dataset has {num_items} items, fewer than one global micro-batch of "
                f"{micro * world} ({micro} per rank x {world} ranks); lower train.batch_size"
            )

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.n, generator=g)
        g_size = self.micro * self.world
        for b in range(start, self.per_epoch):
            lo = b * g_size + self.rank * self.micro
            yield perm[lo:lo + self.micro].tolist()


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _batch_size_of(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, (list, tuple)):
        return _batch_size_of(batch[0])
    if isinstance(batch, dict):
        return _batch_size_of(next(iter(batch.values())))
    raise TypeError(f"cannot tell the batch size of a {type(batch).__name__}")


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `ref` (sharded the same way when `ref` is an FSDP DTensor)."""
    if hasattr(ref, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(ref.device, ref.dtype), ref.device_mesh, ref.placements)
    return full.to(ref.device, ref.dtype)


class EMA:
    """Exponential moving average of the parameters (LlamaGen's `update_ema`), kept in fp32."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone().float() for p in self.params]

    @torch.no_grad()
    def update(self):
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {n: _full(s).cpu() for n, s in zip(self.names, self.shadow)}

    def load_state_dict(self, sd: dict):
        missing = [n for n in self.names if n not in sd]
        if missing or len(sd) != len(self.names):
            raise CheckpointError(f"EMA state does not match the model (missing: {missing[:10]})")
        self.shadow = [_like(sd[n], s) for n, s in zip(self.names, self.shadow)]

    def full_model_state(self, model_sd: dict) -> dict:
        """The model state dict with EMA parameters in place of the raw ones (buffers as they are)."""
        out = dict(model_sd)
        for n, s in zip(self.names, self.shadow):
            out[n] = _full(s).detach().to("cpu", model_sd[n].dtype)
        return out


# --- state in and out (plain, DDP and FSDP alike) ------------------------------------------

def _model_state(model: nn.Module, every_rank: bool = True) -> dict:
    """Full (unsharded) CPU state dict. Collective under FSDP; with `every_rank=False` only rank 0
    receives it (the others get {}), which is all a checkpoint needs."""
    if D.is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=not every_rank))
        return {k: v.detach().cpu() for k, v in sd.items()}
    return {k: v.detach().cpu().clone() for k, v in D.unwrap(model).state_dict().items()}


def _load_model_state(model: nn.Module, sd: dict, source: str):
    from ctfgen.hub import check_state_dict, load_state_dict_strict

    if D.is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        check_state_dict(_model_state(model), sd, source=source)
        set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True))
    else:
        load_state_dict_strict(D.unwrap(model), sd, source=source)


def _optim_state(model, opt) -> dict:
    if D.is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return opt.state_dict()


def _load_optim_state(model, opt, sd):
    if D.is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, opt, sd, options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(sd)


def _gather_rng() -> list:
    state = get_rng_state()
    if not D.is_distributed():
        return [state]
    out = [None] * D.get_world_size()
    torch.distributed.all_gather_object(out, state)
    return out


def _sync_context(model: nn.Module, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation window."""
    if sync:
        return nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if D.is_fsdp(model):
        @contextmanager
        def _fsdp_no_sync():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        return _fsdp_no_sync()
    return nullcontext()


@contextmanager
def _stop_on_signals(flag: dict):
    """SIGINT/SIGTERM set a flag the loop reads at step boundaries; a second SIGINT aborts at once."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if flag.get("stop") and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["stop"] = signal.Signals(signum).name

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class _CSVLog:
    COLUMNS = ["step", "epoch", "loss", "lr", "grad_norm", "items_per_s", "tokens_per_s", "elapsed_s"]

    def __init__(self, path: Path, resume_step: int | None, enabled: bool):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        if resume_step is not None and path.is_file():
            # Rows logged after the checkpoint we resume from are about to be redone.
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= resume_step]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.COLUMNS)
            w.writeheader()
            w.writerows({k: r.get(k, "") for k in self.COLUMNS} for r in rows)

    def write(self, row: dict):
        if self.enabled:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.COLUMNS).writerow(row)


def _print(msg: str):
    if D.is_main():
        print(msg, file=sys.stderr, flush=True)


# --- the loop ------------------------------------------------------------------------------

def train(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    dataset: Dataset,
    config: TrainConfig | dict,
    out_dir: str | Path,
    *,
    resume: bool = False,
    tokens_per_item: int | None = None,
    on_epoch_end: Callable[[int, nn.Module], None] | None = None,
    run_config: dict | None = None,
    device: torch.device | str | None = None,
    collate_fn: Callable | None = None,
    desc: str = "train",
) -> TrainResult:
    """Train `model` on `dataset` by minimising `loss_fn(model, batch)`; see the module docstring.

    `out_dir` receives `checkpoints/ckpt-<step>.pt`, `metrics.csv` and, with
    `snapshot_every_epoch`, `epochs/epoch-<n>/` (save_pretrained form). `run_config` (plain data)
    is stored in every checkpoint for the record. With `resume=True` the newest checkpoint in
    `out_dir` is continued (a fresh start when there is none); without it, existing checkpoints
    are refused rather than overwritten. Call under torchrun for DDP/FSDP (see `distributed`);
    every rank must call it. `on_epoch_end(epoch, model)` runs on every rank, with the EMA
    weights in place when EMA is on (not under FSDP), in eval mode.
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    device = torch.device(device) if device is not None else D.default_device()
    rank, world = D.get_rank(), D.get_world_size()
    collate = collate_fn or default_collate
    t_start = time.time()

    if not resume and list_checkpoints(ckpt_dir):
        raise FileExistsError(
            f"{ckpt_dir} already holds checkpoints of an earlier run. Pass --resume (resume=True) to "
            f"continue it, or choose another output directory; nothing was overwritten."
        )

    per_rank = cfg.batch_size // (world * cfg.grad_accum)
    if per_rank * world * cfg.grad_accum != cfg.batch_size or per_rank == 0:
        raise ValueError(
            f"train.batch_size={cfg.batch_size} must be a positive multiple of ranks x grad_accum = "
            f"{world} x {cfg.grad_accum}"
        )
    batches = ShardedBatches(len(dataset), per_rank, world, rank, cfg.seed)
    if cfg.steps is not None:
        total_steps = int(cfg.steps)
    else:
        total_steps = max(1, cfg.epochs * batches.per_epoch // cfg.grad_accum)

    # Same init on every rank (DDP would broadcast anyway; FSDP needs it); dropout differs per rank.
    seed_everything(cfg.seed)
    model.to(device)
    model.train()
    wrapped = D.wrap_model(model, device, cfg.fsdp)
    raw = D.unwrap(wrapped)
    fsdp = D.is_fsdp(wrapped)
    optimizer = make_optimizer(wrapped, cfg, device)
    ema = EMA(raw, cfg.ema_decay) if cfg.ema else None  # names without DDP's "module." prefix
    seed_everything(cfg.seed + 1_000_003 * rank)

    step, epoch, batch_idx, epochs_done = 0, 0, 0, 0
    resumed_from = None
    found = load_latest_checkpoint(ckpt_dir) if resume else None
    if found is not None:
        ck, resumed_from = found
        if ck.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{resumed_from} is not a ctfgen training checkpoint (format {ck.get('format')!r})")
        _load_model_state(wrapped, ck["model"], source=str(resumed_from))
        _load_optim_state(wrapped, optimizer, ck["optimizer"])
        if ema is not None:
            if ck.get("ema") is None:
                raise CheckpointError(f"{resumed_from} has no EMA weights but train.ema is on; resume with train.ema=false")
            ema.load_state_dict(ck["ema"])
        step, epoch, batch_idx, epochs_done = ck["step"], ck["epoch"], ck["batch_in_epoch"], ck["epochs_done"]
        old_cfg = ck.get("train_config", {})
        changed = {k: (old_cfg.get(k), v) for k, v in cfg.to_dict().items() if old_cfg.get(k) != v}
        if changed:
            _print(f"[{desc}] resuming with changed settings: " + ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items()))
        if ck.get("world_size") == world:
            set_rng_state(ck["rng"][rank])
        else:
            _print(f"[{desc}] checkpoint was written by {ck.get('world_size')} ranks, now {world}: "
                   "RNG streams are reseeded, so the run continues but not bit-for-bit")
            seed_everything(cfg.seed + 1_000_003 * rank + step)
        _print(f"[{desc}] resumed from {resumed_from} at step {step}/{total_steps} (epoch {epoch}, batch {batch_idx})")

    log = _CSVLog(out_dir / "metrics.csv", step if resumed_from else None, enabled=D.is_main())
    last_ckpt: Path | None = resumed_from

    def build_state() -> dict:
        # Collective under FSDP and for the RNG gather: every rank calls it, rank 0 writes.
        return {
            "format": CHECKPOINT_FORMAT,
            "model": _model_state(wrapped, every_rank=False),
            "optimizer": _optim_state(wrapped, optimizer),
            # The schedule is a pure function of the step (so a resumed run may change it, e.g. a
            # lower lr after a NaN); recorded for the reader.
            "scheduler": {"step": step, "lr": lr_at(max(step - 1, 0), cfg, total_steps)},
            "ema": ema.state_dict() if ema is not None else None,
            "step": step, "epoch": epoch, "batch_in_epoch": batch_idx, "epochs_done": epochs_done,
            "rng": _gather_rng(),
            "world_size": world,
            "train_config": cfg.to_dict(),
            "run_config": run_config or {},
        }

    def checkpoint():
        nonlocal last_ckpt
        state = build_state()
        if D.is_main():
            last_ckpt = save_checkpoint(state, ckpt_dir, step, keep=cfg.keep_checkpoints)
        D.barrier()

    def with_shipped_weights(fn):
        """Run fn with the weights a snapshot ships (EMA when on) swapped in, in eval mode."""
        backup = None
        if ema is not None and not fsdp:
            backup = {k: v.detach().clone() for k, v in raw.state_dict().items()}
            raw.load_state_dict(ema.full_model_state(backup))
        raw.eval()
        try:
            fn()
        finally:
            raw.train()
            if backup is not None:
                raw.load_state_dict(backup)

    def snapshot(path: Path):
        _snapshot(raw if not fsdp else None, wrapped, path, ema if fsdp else None)

    def run_epoch_end(e: int):
        if on_epoch_end is None and not cfg.snapshot_every_epoch:
            return

        def work():
            if cfg.snapshot_every_epoch:
                snapshot(out_dir / "epochs" / f"epoch-{e:03d}")
            if on_epoch_end is not None:
                on_epoch_end(e, raw)

        with_shipped_weights(work)

    autocast = training_autocast(cfg.mixed_precision, device)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    items_per_step = cfg.batch_size
    epoch_iter: Iterator | None = None

    def next_batch():
        nonlocal epoch, batch_idx, epoch_iter
        if batch_idx >= batches.per_epoch:
            epoch, batch_idx, epoch_iter = epoch + 1, 0, None
        if epoch_iter is None:
            if hasattr(dataset, "set_epoch"):  # e.g. CodeDataset picks its augmentation per epoch
                dataset.set_epoch(epoch)
            idx_iter = batches.epoch_batches(epoch, batch_idx)
            if collate_fn is None and cfg.num_workers == 0 and hasattr(dataset, "get_batch"):
                # One vectorised read per batch (CodeDataset on a memory map) instead of B item reads.
                epoch_iter = (dataset.get_batch(idx) for idx in idx_iter)
            elif cfg.num_workers > 0:
                loader = DataLoader(dataset, batch_sampler=list(idx_iter), num_workers=cfg.num_workers,
                                    collate_fn=collate, pin_memory=device.type == "cuda",
                                    generator=torch.Generator().manual_seed(cfg.seed + epoch))
                epoch_iter = iter(loader)
            else:
                # In-process loading draws dataset randomness (augmentation) from the restored RNGs.
                epoch_iter = (collate([dataset[i] for i in idx]) for idx in idx_iter)
        batch = next(epoch_iter)
        batch_idx += 1
        return batch

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=step, desc=desc, disable=not (cfg.progress and D.is_main()),
               dynamic_ncols=True, leave=True)
    flag: dict = {}
    window_loss, window_steps, window_t = 0.0, 0, time.time()
    history = []
    try:
        with _stop_on_signals(flag):
            while step < total_steps:
                optimizer.zero_grad(set_to_none=True)
                for g in optimizer.param_groups:
                    g["lr"] = lr_at(step, cfg, total_steps)
                loss_acc = torch.zeros((), device=device)
                bad_micro = torch.zeros((), device=device)
                for micro in range(cfg.grad_accum):
                    batch = _to_device(next_batch(), device)
                    with _sync_context(wrapped, micro == cfg.grad_accum - 1):
                        with autocast:
                            loss = loss_fn(wrapped, batch)
                        (loss / cfg.grad_accum).backward()
                    loss = loss.detach().float()
                    bad_micro += (~torch.isfinite(loss)).float()
                    loss_acc += torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0) / cfg.grad_accum
                max_norm = cfg.grad_clip if cfg.grad_clip and cfg.grad_clip > 0 else float("inf")
                grad_norm = _full(torch.nn.utils.clip_grad_norm_(params, max_norm)).float()
                stats = torch.stack([loss_acc, bad_micro, (~torch.isfinite(grad_norm)).float(),
                                     torch.tensor(float(bool(flag.get("stop"))), device=device)])
                D.all_reduce_sum(stats)
                if stats[1] > 0 or stats[2] > 0:
                    what = "loss" if stats[1] > 0 else "gradient norm"
                    kept = list_checkpoints(ckpt_dir)
                    where = (f"the last good checkpoint is {kept[-1][1]} (step {kept[-1][0]}); "
                             f"it was left untouched" if kept else "no checkpoint was written yet")
                    raise NonFiniteLossError(
                        f"[{desc}] the {what} became NaN/inf at step {step + 1} (epoch {epoch}); this step's update "
                        f"was not applied and training stopped. {where}. Try a lower learning rate "
                        f"(train.lr={cfg.lr:g} now), more warm-up (train.warmup_steps) or a smaller grad_clip, "
                        f"then resume with --resume."
                    )
                optimizer.step()
                if ema is not None:
                    ema.update()
                step += 1
                if cfg.snapshot_every and step % cfg.snapshot_every == 0:
                    # Same steps and seed, constant lr: a snapshot at step N equals an N-step run,
                    # which is what lets shorter ablations compare against a longer main run.
                    with_shipped_weights(lambda: snapshot(out_dir / "snapshots" / f"step-{step:06d}"))

                completed = epoch + (1 if batch_idx >= batches.per_epoch else 0)
                while epochs_done < completed:
                    run_epoch_end(epochs_done)
                    epochs_done += 1

                loss_val = stats[0].item() / world
                window_loss += loss_val
                window_steps += 1
                bar.update(1)
                if step % cfg.log_every == 0 or step == total_steps:
                    dt = max(time.time() - window_t, 1e-9)
                    ips = window_steps * items_per_step / dt
                    row = {
                        "step": step, "epoch": round(epoch + batch_idx / batches.per_epoch, 4),
                        "loss": round(window_loss / window_steps, 6), "lr": optimizer.param_groups[0]["lr"],
                        "grad_norm": round(grad_norm.item(), 6), "items_per_s": round(ips, 2),
                        "tokens_per_s": round(ips * tokens_per_item, 1) if tokens_per_item else "",
                        "elapsed_s": round(time.time() - t_start, 2),
                    }
                    log.write(row)
                    history.append(row)
                    speed = f"{row['tokens_per_s']:.0f} tok/s" if tokens_per_item else f"{ips:.1f} items/s"
                    bar.set_postfix_str(f"loss {row['loss']:.4f} lr {row['lr']:.2e} {speed}", refresh=False)
                    window_loss, window_steps, window_t = 0.0, 0, time.time()

                if stats[3] > 0:
                    checkpoint()
                    raise TrainingInterrupted(
                        f"[{desc}] stopped by {flag.get('stop') or 'a signal on another rank'} at step {step}; "
                        f"checkpoint {last_ckpt} written, continue with --resume"
                    )
                if step % cfg.ckpt_every == 0 or step == total_steps:
                    checkpoint()
        if cfg.epochs is not None:
            while epochs_done < cfg.epochs:  # the last epoch's tail did not fill a whole step
                run_epoch_end(epochs_done)
                epochs_done += 1
    finally:
        bar.close()

    final = _model_state(wrapped)
    ema_sd = ema.full_model_state(final) if ema is not None else None
    return TrainResult(
        state_dict=final, ema_state_dict=ema_sd, step=step, epoch=epoch, checkpoint=last_ckpt,
        metrics_path=out_dir / "metrics.csv", resumed_from=resumed_from,
        seconds=time.time() - t_start, history=history,
    )


def _snapshot(raw: nn.Module | None, wrapped: nn.Module, path: Path, ema: EMA | None):
    """save_pretrained a copy of the model as it is now (EMA weights already swapped in for non-FSDP)."""
    if raw is not None:
        if D.is_main() and hasattr(raw, "save_pretrained"):
            raw.save_pretrained(path)
        D.barrier()
        return
    sd = _model_state(wrapped)
    if ema is not None:
        sd = ema.full_model_state(sd)
    if D.is_main():
        from torch.distributed.fsdp import FSDPModule

        # fully_shard swaps in a subclass FSDP<Cls>; rebuild the user's class, unsharded, on CPU.
        cls = next(c for c in type(wrapped).__mro__[1:] if issubclass(c, nn.Module) and not issubclass(c, FSDPModule))
        model = cls(wrapped.config)
        from ctfgen.hub import load_state_dict_strict

        load_state_dict_strict(model, sd, source="FSDP snapshot")
        model.save_pretrained(path)
    D.barrier()
