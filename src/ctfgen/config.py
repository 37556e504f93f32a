"""Every setting of ctfgen: dataclasses, read from YAML by one loader.

    cfg = load_config(ExperimentConfig, "configs/tiny.yaml", ["train.steps=10", "stage1.preset=GPT-mini"])

The loader rejects an unknown key with its full path and the closest valid key, parses
`key.sub=value` overrides as YAML values (`data.train_limit=null`, `train.lr=3e-4`), and checks
every value before a run starts, not an hour into it. One setting has one name in every section.

The experiment config has the sections data, tokenizer, clustering, train, stage1, aux, baseline,
matched, heldout and sampling. `train` is shared: the stages inherit it (keys given in their own
`train` win), the top-level `seed` reaches every section that has one, and the baseline takes
stage 1's preset, model and train settings unless it names its own (the paper compares at the
same stage-1 size).
"""

from __future__ import annotations

import copy
import difflib
import json
import numbers
import operator
import os
import re
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from ctfgen.models.transformer import AuxConfig, GPTConfig
from ctfgen.tokenizer.vq import VQConfig
from ctfgen.utils.errors import ConfigError

# --- the loader ------------------------------------------------------------------------------------


def from_dict(cls, data: dict | None, where: str = ""):
    """`cls(**data)`, its dataclass-typed fields made from their dicts too (see Settings); unknown keys
    and bad values are ConfigErrors naming the full key path (`where` is the path of `data`)."""
    data = {} if data is None else data
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'the config'} must be a mapping of settings, got {data!r}")
    _refuse_unknown_keys(data, {f.name for f in fields(cls) if f.init}, where)
    try:
        return cls(**data)
    except ConfigError as e:  # raised by __post_init__, naming keys relative to `where`
        if not where:
            raise
        raise ConfigError(re.sub(r"^(unknown config key )?|did you mean ", rf"\g<0>{where}.", str(e))) from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where + ': ' if where else ''}{e}") from None


def _refuse_unknown_keys(data: dict, known, where: str) -> None:
    """A ConfigError for the first key of `data` not in `known`, with its path and the closest valid key."""
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.5)
            prefix = f"{where}." if where else ""
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            raise ConfigError(f"unknown config key {prefix}{key}{hint} (valid here: {', '.join(sorted(known))})")


def to_dict(cfg) -> dict:
    """Plain data (lists for tuples), ready for YAML/JSON."""
    return json.loads(json.dumps(asdict(cfg)))


def parse_value(text: str) -> Any:
    """A YAML scalar (None for an empty one), except that exponent floats like 3e-4 (strings to YAML 1.1) are floats."""
    value = yaml.safe_load(text)
    try:
        return float(value) if isinstance(value, str) and "e" in value.lower() else value
    except ValueError:
        return value


def apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    """A copy of `raw` with each `a.b.c=value` set (the value parsed as YAML)."""
    raw = copy.deepcopy(raw or {})
    for text in overrides or []:
        if "=" not in text:
            raise ConfigError(f"override {text!r} is not key.sub=value (e.g. train.steps=100)")
        key, value = text.split("=", 1)
        keys = [k for k in key.strip().split(".") if k]
        if not keys:
            raise ConfigError(f"override {text!r} has an empty key")
        node = raw
        for i, k in enumerate(keys[:-1]):
            node[k] = {} if node.get(k) is None else node[k]
            if not isinstance(node[k], dict):
                raise ConfigError(f"override {text!r}: {'.'.join(keys[:i + 1])} is not a section")
            node = node[k]
        node[keys[-1]] = parse_value(value)
    return raw


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found (see configs/*.yaml)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a YAML mapping at the top level")
    return raw


def load_config(cls, source: str | os.PathLike | dict | None, overrides: list[str] | None = None):
    """`cls` from a YAML file (or a dict of the same shape) with overrides applied."""
    raw = source if isinstance(source, dict) else (read_yaml(source) if source is not None else {})
    raw = apply_overrides(raw, overrides)
    return cls.from_raw(raw) if hasattr(cls, "from_raw") else from_dict(cls, raw)


def dump(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# --- checking values -------------------------------------------------------------------------------

def checked(default, *rules, keys=None):
    """A field whose value (unless None) must keep `rules`: bounds like ">= 1", or a tuple of the
    allowed values. A dict field with `keys` (a dataclass or a dict) refuses keys they lack."""
    meta = {"rules": rules, "keys": keys}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=meta)
    return field(default=default, metadata=meta)


def _convert(name: str, value, kind):
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None


class Settings:
    """Every settings dataclass checks itself when made: a dataclass-typed field given as a dict (None:
    the defaults) is made from it, numbers YAML 1.1 reads as strings (`3e-4`) become floats, tuples take their
    element type, dicts their allowed keys, each field its rules."""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            name, value, hint, keys = f.name, getattr(self, f.name), hints[f.name], f.metadata.get("keys")
            if is_dataclass(hint) and not isinstance(value, hint):
                value = from_dict(hint, value, name)
            elif hint is dict:
                value = dict(value or {})
                _refuse_unknown_keys(value, {g.name for g in fields(keys)} if is_dataclass(keys) else set(keys), name)
            elif value is not None and typing.get_origin(hint) is tuple:
                value = tuple(_convert(name, v, typing.get_args(hint)[0]) for v in value)
            elif value is not None and float in (hint, *typing.get_args(hint)):
                value = _convert(name, value, float)
            setattr(self, name, value)
            for rule in f.metadata.get("rules", ()) if value is not None else ():
                if isinstance(rule, tuple) and value not in rule:
                    raise ConfigError(f"{name} must be one of {', '.join(str(c).lower() for c in rule)}, got {value!r}")
                if isinstance(rule, str) and not _holds(value, *rule.split()):
                    raise ConfigError(f"{name} must be {rule}, got {value!r}")


def _holds(value, op: str, bound: str) -> bool:  # False for NaN and for what is not a number
    ops = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
    return isinstance(value, numbers.Real) and ops[op](value, float(bound))


# --- training ------------------------------------------------------------------------------------

@dataclass
class TrainConfig(Settings):
    """Optimisation settings (a `train:` section). Sizes are global, not per rank. Defaults follow
    LlamaGen's c2i recipe: AdamW lr 1e-4, betas (0.9, 0.95), weight decay 0.05, clip 1.0, bf16."""

    steps: int | None = checked(None, ">= 1")         # optimizer steps; or give `epochs`
    epochs: int | None = checked(None, ">= 1")
    batch_size: int = checked(256, ">= 1")            # global batch per optimizer step (all ranks, all micro-batches)
    grad_accum: int = checked(1, ">= 1")
    lr: float = checked(1e-4, "> 0")
    weight_decay: float = checked(0.05, ">= 0")       # on >=2-D parameters only, as LlamaGen
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = checked(1.0, ">= 0")           # 0 disables clipping (the norm is still logged)
    warmup_steps: int = checked(0, ">= 0")
    schedule: str = checked("constant", ("constant", "cosine"))  # constant (LlamaGen) or cosine
    min_lr_ratio: float = checked(0.0, ">= 0", "<= 1")  # cosine decays to lr * min_lr_ratio
    ema: bool = False
    ema_decay: float = checked(0.9999, ">= 0", "< 1")
    # "auto": bf16 autocast on CUDA and on CPUs with native bf16 matmul, float32 elsewhere;
    # "bf16": bf16 autocast on any device; "none": float32. Loss, optimiser state and master
    # weights stay float32 in every case.
    mixed_precision: str = checked("auto", ("auto", "bf16", "none"))
    seed: int = 0
    checkpoint_every: int = checked(1000, ">= 1")
    keep_checkpoints: int = checked(2, ">= 0")
    log_every: int = checked(10, ">= 1")
    snapshot_every_epoch: bool = False  # save_pretrained the (EMA) model after every epoch
    snapshot_every: int = checked(0, ">= 0")          # ... and every N steps, to snapshots/step-<N>/ (0: never)
    num_workers: int = checked(0, ">= 0")
    fsdp: Any = checked("auto", (True, False, "auto"))  # GPT-L size and larger under "auto"
    progress: bool = True

    @property
    def length_given(self) -> bool:
        return self.steps is not None or self.epochs is not None


@dataclass
class TokenizerTrainConfig(TrainConfig):
    """The tokenizer's `train:` section: the same settings, LlamaGen's train_vq.py defaults."""

    steps: int | None = checked(10000, ">= 1")
    batch_size: int = checked(64, ">= 1")
    weight_decay: float = checked(0.0, ">= 0")
    checkpoint_every: int = checked(500, ">= 1")
    log_every: int = checked(20, ">= 1")
    fsdp: Any = checked(False, (True, False, "auto"))
    # Keeping the codebook in use (ctfgen.tokenizer.codebook); LlamaGen's entropy loss is model.entropy_loss_ratio.
    codebook_init: str = checked("random", ("random", "kmeans"))  # LlamaGen's, or k-means of initial encoder outputs
    codebook_init_images: int = 4096    # training images whose encoder outputs the k-means initialisation clusters
    # > 0: move codes no batch chose for this many steps onto recent encoder outputs
    dead_code_steps: int = checked(0, ">= 0")
    # Restarts stop after this fraction of the steps, so that usage is not measured on codes that were just moved.
    dead_code_until: float = checked(0.8, "> 0", "<= 1")


@dataclass
class VQLossConfig(Settings):
    """The tokenizer's losses (LlamaGen's VQLoss). Perceptual and adversarial terms are off by
    default because they need local LPIPS weights and long runs."""

    reconstruction: str = checked("l2", ("l1", "l2"))
    reconstruction_weight: float = 1.0
    perceptual_weight: float = 0.0      # LPIPS weight (LlamaGen: 1.0); > 0 needs lpips_weights
    lpips_weights: str | None = None    # the merged LPIPS-VGG16 file (see ctfgen.tokenizer.losses)
    lpips_vgg_weights: str | None = None
    disc_weight: float = 0.0            # adversarial weight (LlamaGen: 0.5); 0: no discriminator
    disc_start: int = 20000             # steps before the adversarial loss starts
    disc_adaptive: bool = False         # VQGAN's |grad rec| / |grad adv| at the decoder's last layer
    disc_loss: str = checked("hinge", ("hinge", "vanilla"))
    disc_dim: int = 64
    disc_layers: int = 3
    disc_lr: float | None = None        # default: train.lr

    def __post_init__(self):
        super().__post_init__()
        if self.perceptual_weight > 0 and not self.lpips_weights:
            raise ConfigError(
                "perceptual_weight > 0 needs lpips_weights: a local LPIPS-VGG16 "
                "weights file (see `python -m ctfgen.tokenizer.losses`), or set perceptual_weight: 0")


# --- the experiment ------------------------------------------------------------------------------

@dataclass
class DataConfig(Settings):
    dataset: str = checked("fashion_mnist", ("fashion_mnist", "image_folder"))
    root: str | None = None             # Fashion-MNIST IDX directory, or the train image folder
    test_root: str | None = None        # image_folder: held-out images (class-per-folder)
    image_size: int | None = checked(None, ">= 1")  # image_folder: crop size (default 256); fashion_mnist: 28
    channels: int | None = checked(None, ">= 1")    # image_folder: 1 or 3 (default: the tokenizer's)
    train_limit: int | None = checked(None, ">= 1")  # class-balanced subset sizes (fashion_mnist)
    test_limit: int | None = checked(None, ">= 1")
    validation_images: int = checked(0, ">= 0")     # fashion_mnist: class-balanced train images held out: RUN/codes/val
    augment: str = checked("none", ("none", "flip", "tencrop"))  # for the train codes
    extract_batch_size: int = checked(256, ">= 1")
    num_workers: int = checked(0, ">= 0")


@dataclass
class TokenizerConfig(Settings):
    pretrained: str | None = None       # a VQModel directory or a LlamaGen VQ .pt file, instead of training
    model: dict = checked({}, keys=VQConfig)
    train: TokenizerTrainConfig = field(default_factory=TokenizerTrainConfig)
    loss: VQLossConfig = field(default_factory=VQLossConfig)


@dataclass
class ClusteringConfig(Settings):
    num_coarse: int = checked(512, ">= 1")
    method: str = checked("kmeans", ("kmeans", "random"))
    seed: int | None = None             # default: the top-level seed


@dataclass
class StageConfig(Settings):
    """A model trained on codes: stage 1 (`ar`), the auxiliary model or the baseline."""

    preset: str | None = None
    model: dict = checked({}, keys=GPTConfig)  # fields over the preset's
    train: TrainConfig = field(default_factory=TrainConfig)
    enabled: bool = True                # CTF needs stage1 and aux; the baseline is optional


@dataclass
class AuxStageConfig(StageConfig):
    preset: str | None = "Aux-B"
    model: dict = checked({}, keys=AuxConfig)


@dataclass
class HeldoutConfig(Settings):
    enabled: bool = True
    limit: int | None = checked(None, ">= 1")  # the first N test images (all by default)
    batch_size: int = checked(64, ">= 1")


# The paper's defaults: guidance 2.0, both temperatures 1.1, stage-2 top-k = all, no stage-2 guidance.
CTF_DEFAULTS = dict(cfg_scale=2.0, temperature=1.1, top_k=0, top_p=1.0, cfg_steps=None,
                    temperature_fine=1.1, top_k_fine=0, cfg_scale_fine=1.0)
# LlamaGen's sampler defaults apart from guidance, which matches CTF's so the two compare like for like.
BASELINE_DEFAULTS = dict(cfg_scale=2.0, temperature=1.0, top_k=0, top_p=1.0, cfg_steps=None)


@dataclass
class SamplingConfig(Settings):
    """Sampling defaults stored in the finished pipelines (unset: the paper's, see pipeline.py)."""

    ctf: dict = checked({}, keys=CTF_DEFAULTS)
    baseline: dict = checked({}, keys=BASELINE_DEFAULTS)


STAGE_SECTIONS = {"ar": "stage1", "aux": "aux", "baseline": "baseline", "matched": "matched"}


@dataclass
class ExperimentConfig(Settings):
    name: str | None = None
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stage1: StageConfig = field(default_factory=lambda: StageConfig(preset="GPT-B"))
    aux: AuxStageConfig = field(default_factory=AuxStageConfig)
    baseline: StageConfig = field(default_factory=StageConfig)
    # The parameter-matched baseline: the baseline's GPT made deeper at the same width until its
    # parameters are within 10 % of CTF's (stage 1 + auxiliary model); trained with the baseline's
    # steps, data order and seed. `matched.model.n_layer` fixes the depth instead.
    matched: StageConfig = field(default_factory=lambda: StageConfig(enabled=False))
    heldout: HeldoutConfig = field(default_factory=HeldoutConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    @classmethod
    def from_raw(cls, raw: dict) -> "ExperimentConfig":
        """Validate `raw` as written (errors name the keys the user wrote), then fill in what the
        sections inherit and validate again."""
        from_dict(cls, raw)
        return from_dict(cls, inherit(raw))

    def stage(self, stage: str) -> StageConfig:
        return getattr(self, STAGE_SECTIONS[stage])

    @property
    def ctf_enabled(self) -> bool:
        return self.stage1.enabled and self.aux.enabled


def inherit(raw: dict) -> dict:
    """The raw experiment dict with the top-level seed, the shared `train` section and stage 1's
    settings (for the baseline, and through it the matched baseline) copied to where they apply."""
    raw = copy.deepcopy(raw)
    seed, shared = raw.get("seed", 0), raw.get("train") or {}
    for section in ("tokenizer", "clustering", "stage1", "aux", "baseline", "matched"):
        raw[section] = dict(raw.get(section) or {})
    tok, s1, base, matched = raw["tokenizer"], raw["stage1"], raw["baseline"], raw["matched"]
    tok["train"] = {"seed": seed, **(tok.get("train") or {})}
    if raw["clustering"].get("seed") is None:
        raw["clustering"]["seed"] = seed
    if s1.get("preset") is None:
        s1["preset"] = "GPT-B"
    matched.setdefault("enabled", False)  # off unless asked for, as when the section is absent
    # `enabled` is each section's own, and the matched baseline's model is the baseline's with its own keys over it
    for section, source, keys in ((base, s1, ("preset", "model", "train")), (matched, base, ("preset", "train"))):
        for key in keys:
            if section.get(key) is None:
                section[key] = copy.deepcopy(source.get(key))
    matched["model"] = {**copy.deepcopy(base.get("model") or {}), **(matched.get("model") or {})}
    for section in ("stage1", "aux", "baseline", "matched"):
        raw[section]["train"] = {"seed": seed, **shared, **(raw[section].get("train") or {})}
    return raw


def check_experiment(cfg: ExperimentConfig) -> None:
    """What the dataclasses cannot see alone."""
    if cfg.stage1.enabled != cfg.aux.enabled:
        raise ConfigError("stage1 and aux make CTF together: enable both or neither")
    if not (cfg.ctf_enabled or cfg.baseline.enabled):
        raise ConfigError("nothing to train: stage1 and aux, or the baseline, must be enabled")
    if cfg.matched.enabled and not (cfg.ctf_enabled and cfg.baseline.enabled):
        raise ConfigError("matched.enabled needs CTF (stage1 and aux) and the baseline: it matches the one to the "
                          "other")
    for stage, section in STAGE_SECTIONS.items():
        if cfg.stage(stage).enabled and not cfg.stage(stage).train.length_given:
            raise ConfigError(f"{section}.train needs steps or epochs (e.g. train.steps=1000)")
    if cfg.data.dataset == "image_folder" and not cfg.data.root:
        raise ConfigError("data.root is required for dataset: image_folder (a folder of class sub-folders)")


def dry_run_overrides() -> list[str]:
    """Overrides that shrink a recipe to two steps of everything on a CPU in seconds: the tiny
    presets, 32x32 images, batch 4, four clusters, no FSDP or bf16. Data and tokenizer paths stay
    as given (point them at small local files)."""
    train = ["steps=2", "epochs=null", "batch_size=4", "grad_accum=1", "fsdp=false", "mixed_precision=none",
             "checkpoint_every=1", "log_every=1", "snapshot_every=0", "warmup_steps=0", "progress=false"]
    stages = ("stage1", "aux", "baseline", "matched")
    return ([f"{section}.{t}" for section in ("train", *(f"{s}.train" for s in stages)) for t in train]
            + [f"{s}.preset={'Aux' if s == 'aux' else 'GPT'}-tiny" for s in stages]
            + [f"{s}.model.multiple_of=32" for s in stages]
            + ["tokenizer.train.steps=2", "tokenizer.train.batch_size=4", "tokenizer.train.progress=false",
               "clustering.num_coarse=4", "data.image_size=32", "data.extract_batch_size=4", "data.num_workers=0",
               "heldout.limit=4", "heldout.batch_size=4"])


def load_stage_config(path, stage: str, overrides: list[str] | None = None) -> StageConfig:
    """One stage's settings (`ctfgen train`) from a stage YAML ({preset, model, train}) or an
    experiment YAML (its stage1 / aux / baseline / matched section, with what it inherits); the
    overrides apply to the stage's section (`train.steps=5`, `model.dim=256`)."""
    raw = read_yaml(path) if path is not None else {}
    if set(raw) <= {"preset", "model", "train"}:
        return from_dict(AuxStageConfig if stage == "aux" else StageConfig, apply_overrides(raw, overrides))
    ExperimentConfig.from_raw(raw)  # errors name the keys as written
    section = STAGE_SECTIONS[stage]  # the overrides apply after the section has inherited its settings
    raw = apply_overrides(inherit(raw), [f"{section}.{o}" for o in overrides or []])
    return from_dict(ExperimentConfig, raw).stage(stage)


# --- reproduction --------------------------------------------------------------------------------

@dataclass
class EvaluationConfig(Settings):
    per_class: int = checked(100, ">= 1")   # samples per class for every evaluation
    batch_size: int = checked(500, ">= 1")
    seed: int = checked(0, ">= 0")
    heldout_images: int = checked(2000, ">= 1")  # test images for the exact bits per token
    temperatures: list = field(default_factory=lambda: [0.9, 1.0, 1.1])


@dataclass
class ReproduceConfig(Settings):
    """`ctfgen reproduce` settings (configs/fashion_mnist_ablations.yaml)."""

    steps: int = checked(470, ">= 1")   # ablation training steps; the main run must have a snapshot there
    clusters: list = field(default_factory=lambda: [64, 1024])  # besides the main run's
    random_clusters: bool = True        # k-means vs balanced random groups, at the main run's K
    unrestricted_aux: bool = True       # aux model over the whole codebook vs restricted to the cluster
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def __post_init__(self):
        super().__post_init__()
        if any(not int(k) >= 1 for k in self.clusters):
            raise ConfigError(f"clusters must be numbers of coarse labels >= 1, got {self.clusters}")


# --- the codebook-size study --------------------------------------------------------------------

@dataclass
class StudySettings(Settings):
    """`ctfgen study` settings (see ctfgen.experiments.study): the sampling grid, the sample counts and the seeds."""

    guidance: tuple[float, ...] = (1.5, 2.0, 3.0)
    temperatures: tuple[float, ...] = (0.9, 1.0, 1.1)  # stage 1 for CTF, the only one for the baselines
    select_per_class: int = checked(200, ">= 1")  # validation samples per class for each grid point (2000 in all)
    select_seed: int = 1000             # the selection's sampling stream, apart from every test seed
    test_per_class: int = checked(500, ">= 1")  # test samples per class for each reported cell (5000 in all)
    seeds: tuple[int, ...] = (0,)       # sampling seeds of the test cells (two: a spread to judge noise by)
    tokenizer_images: int | None = checked(None, ">= 1")  # test images for codebook usage and PSNR (None: all)
    heldout_images: int = checked(10000, ">= 1")  # test images for bits/token at every epoch
    coarse_images: int = checked(2000, ">= 1")  # test images for the teacher-forced coarse prediction
    # Test images per class whose codes make the diagnosis sets; the other test images of each class: their reference.
    diagnosis_per_class: int = checked(500, ">= 1")
    diagnosis_seed: int = 2000          # the diagnosis' sampling stream
    # FD against epoch: samples per class of each epoch snapshot at the chosen setting, on their own stream.
    epoch_per_class: int = checked(200, ">= 1")
    epoch_seed: int = 3000
    batch_size: int = checked(250, ">= 1")

    def __post_init__(self):
        super().__post_init__()
        if not (self.guidance and self.temperatures and self.seeds):
            raise ConfigError("the study needs at least one guidance scale, temperature and seed")
        streams = (self.select_seed, self.diagnosis_seed, self.epoch_seed)
        if set(streams) & set(self.seeds) or len(set(streams)) < len(streams):
            raise ConfigError(f"the test seeds {list(self.seeds)}, select_seed {self.select_seed}, diagnosis_seed "
                              f"{self.diagnosis_seed} and epoch_seed {self.epoch_seed} must all differ: each sample "
                              "set gets its own stream")
