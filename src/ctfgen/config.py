"""Every setting of ctfgen: dataclasses, read from YAML by one loader.

    cfg = load_config(ExperimentConfig, "configs/tiny.yaml", ["train.steps=10", "stage1.preset=GPT-mini"])

The loader rejects an unknown key with its full path and the closest valid key, parses
`key.sub=value` overrides as YAML values (`data.train_limit=null`, `train.lr=3e-4`), and checks
every value before a run starts, not an hour into it. One setting has one name in every section.

The experiment config has the sections data, tokenizer, clustering, train, stage1, aux, baseline,
heldout and sampling. `train` is shared: stage1, aux and the baseline inherit it (keys given in
their own `train` win), the top-level `seed` reaches every section that has one, and the baseline
takes stage 1's preset, model and train settings unless it names its own (the paper compares at
the same stage-1 size).
"""

from __future__ import annotations

import copy
import difflib
import os
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
    """`cls(**data)`, recursively for dataclass-typed fields; unknown keys and bad values are
    ConfigErrors naming the full key path."""
    if data is None:
        data = {}
    if is_dataclass(data) and isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'the config'} must be a mapping of settings, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in known:
            raise ConfigError(unknown_key_message(path, key, known))
        sub = hints.get(key)
        if is_dataclass(sub) and (value is None or isinstance(value, dict)):
            value = from_dict(sub, value, path)
        elif key == "model" and hasattr(cls, "model_config_class") and isinstance(value, dict):
            check_keys(value, cls.model_config_class(), path)  # overrides of the model's own config
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except ConfigError as e:  # raised by __post_init__, naming the field relative to `where`
        msg, key = str(e), "unknown config key "
        if where and msg.startswith(key):
            msg = msg.replace(key, f"{key}{where}.", 1).replace("did you mean ", f"did you mean {where}.", 1)
        elif where:
            msg = f"{where}.{msg}"
        raise ConfigError(msg) from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where + ': ' if where else ''}{e}") from None


def unknown_key_message(path: str, key: str, known) -> str:
    close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.5)
    parent = path.rsplit(".", 1)[0] + "." if "." in path else ""
    hint = f"; did you mean {parent}{close[0]}?" if close else ""
    return f"unknown config key {path}{hint} (valid here: {', '.join(sorted(known))})"


def check_keys(given: dict, cls, where: str) -> None:
    """Refuse keys of a free-form override dict (e.g. `stage1.model`) that `cls` does not have."""
    known = {f.name for f in fields(cls)}
    for key in given or {}:
        if key not in known:
            raise ConfigError(unknown_key_message(f"{where}.{key}", key, known))


def to_dict(cfg) -> dict:
    """Plain data (lists for tuples), ready for YAML/JSON."""
    return _plain(asdict(cfg))


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def parse_value(text: str) -> Any:
    """A YAML scalar, except that exponent floats like 3e-4 (strings to YAML 1.1) are floats."""
    if not text.strip():
        return None
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value) if any(c in value.lower() for c in ".e") and value.strip() not in ("e", ".") else value
        except ValueError:
            return value
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
            if node.get(k) is None:
                node[k] = {}
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


def _number(obj, names) -> None:
    # YAML 1.1 reads `3e-4` as a string; accept it, and say so when a value is not a number.
    for name in names:
        value = getattr(obj, name)
        if value is None:
            continue
        try:
            setattr(obj, name, float(value))
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number, got {value!r}") from None


def _at_least(obj, **bounds) -> None:
    """Refuse a setting below its bound (unset optional settings pass)."""
    for name, lo in bounds.items():
        value = getattr(obj, name)
        if value is not None and not value >= lo:  # `not >=` also refuses NaN
            raise ConfigError(f"{name} must be >= {lo}, got {value}")


def _choice(obj, name: str, choices) -> None:
    if getattr(obj, name) not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}, got {getattr(obj, name)!r}")


# --- training ------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Optimisation settings (a `train:` section). Sizes are global, not per rank. Defaults follow
    LlamaGen's c2i recipe: AdamW lr 1e-4, betas (0.9, 0.95), weight decay 0.05, clip 1.0, bf16."""

    steps: int | None = None            # optimizer steps; or give `epochs`
    epochs: int | None = None
    batch_size: int = 256               # global batch per optimizer step (all ranks, all micro-batches)
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.05          # on >=2-D parameters only, as LlamaGen
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
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 10
    snapshot_every_epoch: bool = False  # save_pretrained the (EMA) model after every epoch
    snapshot_every: int = 0             # ... and every N steps, to snapshots/step-<N>/ (0: never)
    num_workers: int = 0
    fsdp: Any = "auto"                  # true, false or "auto" (GPT-L size and larger)
    progress: bool = True

    def __post_init__(self):
        _number(self, ("lr", "weight_decay", "grad_clip", "min_lr_ratio", "ema_decay"))
        self.betas = tuple(float(b) for b in self.betas)
        _choice(self, "schedule", ("constant", "cosine"))
        _choice(self, "mixed_precision", ("auto", "bf16", "none"))
        if self.fsdp not in (True, False, "auto"):
            raise ConfigError(f"fsdp must be true, false or auto, got {self.fsdp!r}")
        _at_least(self, steps=1, epochs=1, batch_size=1, grad_accum=1, checkpoint_every=1, log_every=1, warmup_steps=0,
                  keep_checkpoints=0, snapshot_every=0, num_workers=0, weight_decay=0, grad_clip=0, min_lr_ratio=0,
                  ema_decay=0)
        for name, ok, want in (("lr", self.lr > 0, "> 0"), ("min_lr_ratio", self.min_lr_ratio <= 1, "<= 1"),
                               ("ema_decay", self.ema_decay < 1, "< 1")):
            if not ok:
                raise ConfigError(f"{name} must be {want}, got {getattr(self, name)}")

    @property
    def length_given(self) -> bool:
        return self.steps is not None or self.epochs is not None

    def to_dict(self) -> dict:
        return to_dict(self)


@dataclass
class TokenizerTrainConfig(TrainConfig):
    """The tokenizer's `train:` section: the same settings, LlamaGen's train_vq.py defaults."""

    steps: int | None = 10000
    batch_size: int = 64
    weight_decay: float = 0.0
    checkpoint_every: int = 500
    log_every: int = 20
    fsdp: Any = False
    # Keeping the codebook in use (ctfgen.tokenizer.codebook); LlamaGen's entropy loss is model.entropy_loss_ratio.
    codebook_init: str = "random"       # random (LlamaGen) | kmeans: k-means centroids of the initial encoder's outputs
    codebook_init_images: int = 4096    # training images whose encoder outputs the k-means initialisation clusters
    dead_code_steps: int = 0            # > 0: move codes no batch chose for this many steps onto recent encoder outputs
    dead_code_until: float = 0.8        # restarts stop after this fraction of the steps, so that usage is not
                                        # measured on codes that were just moved onto recent encoder outputs

    def __post_init__(self):
        super().__post_init__()
        _choice(self, "codebook_init", ("random", "kmeans"))
        if int(self.dead_code_steps) < 0:
            raise ConfigError(f"dead_code_steps must be >= 0 (0 disables restarts), got {self.dead_code_steps}")
        _number(self, ("dead_code_until",))
        if not 0 < self.dead_code_until <= 1:
            raise ConfigError(f"dead_code_until must be a fraction of the steps in (0, 1], got {self.dead_code_until}")


@dataclass
class VQLossConfig:
    """The tokenizer's losses (LlamaGen's VQLoss). Perceptual and adversarial terms are off by
    default because they need local LPIPS weights and long runs."""

    reconstruction: str = "l2"          # l1 | l2
    reconstruction_weight: float = 1.0
    perceptual_weight: float = 0.0      # LPIPS weight (LlamaGen: 1.0); > 0 needs lpips_weights
    lpips_weights: str | None = None    # the merged LPIPS-VGG16 file (see ctfgen.tokenizer.losses)
    lpips_vgg_weights: str | None = None
    disc_weight: float = 0.0            # adversarial weight (LlamaGen: 0.5); 0: no discriminator
    disc_start: int = 20000             # steps before the adversarial loss starts
    disc_adaptive: bool = False         # VQGAN's |grad rec| / |grad adv| at the decoder's last layer
    disc_loss: str = "hinge"            # hinge | vanilla
    disc_dim: int = 64
    disc_layers: int = 3
    disc_lr: float | None = None        # default: train.lr

    def __post_init__(self):
        _number(self, ("reconstruction_weight", "perceptual_weight", "disc_weight", "disc_lr"))
        _choice(self, "reconstruction", ("l1", "l2"))
        _choice(self, "disc_loss", ("hinge", "vanilla"))
        if self.perceptual_weight > 0 and not self.lpips_weights:
            raise ConfigError(
                "perceptual_weight > 0 needs lpips_weights: a local LPIPS-VGG16 "
                "weights file (see `python -m ctfgen.tokenizer.losses`), or set perceptual_weight: 0")


# --- the experiment ------------------------------------------------------------------------------

@dataclass
class DataConfig:
    dataset: str = "fashion_mnist"      # fashion_mnist | image_folder
    root: str | None = None             # Fashion-MNIST IDX directory, or the train image folder
    test_root: str | None = None        # image_folder: held-out images (class-per-folder)
    image_size: int | None = None       # image_folder: crop size (default 256); fashion_mnist: 28
    channels: int | None = None         # image_folder: 1 or 3 (default: the tokenizer's)
    train_limit: int | None = None      # class-balanced subset sizes (fashion_mnist)
    test_limit: int | None = None
    validation_images: int = 0          # fashion_mnist: class-balanced training images held out as RUN/codes/val
    augment: str = "none"               # none | flip | tencrop, for the train codes
    extract_batch_size: int = 256
    num_workers: int = 0

    def __post_init__(self):
        _at_least(self, image_size=1, channels=1, train_limit=1, test_limit=1, validation_images=0, extract_batch_size=1,
                  num_workers=0)
        _choice(self, "dataset", ("fashion_mnist", "image_folder"))
        _choice(self, "augment", ("none", "flip", "tencrop"))


@dataclass
class TokenizerConfig:
    pretrained: str | None = None       # a VQModel directory or a LlamaGen VQ .pt file, instead of training
    model: dict = field(default_factory=dict)   # VQConfig fields
    train: TokenizerTrainConfig = field(default_factory=TokenizerTrainConfig)
    loss: VQLossConfig = field(default_factory=VQLossConfig)

    def __post_init__(self):
        self.model = dict(self.model or {})

    @staticmethod
    def model_config_class():
        return VQConfig


@dataclass
class ClusteringConfig:
    num_coarse: int = 512
    method: str = "kmeans"              # kmeans | random
    seed: int | None = None             # default: the top-level seed

    def __post_init__(self):
        _at_least(self, num_coarse=1)
        _choice(self, "method", ("kmeans", "random"))


@dataclass
class StageConfig:
    """A model trained on codes: stage 1 (`ar`), the auxiliary model or the baseline."""

    preset: str | None = None
    model: dict = field(default_factory=dict)  # GPTConfig / AuxConfig fields over the preset
    train: TrainConfig = field(default_factory=TrainConfig)
    enabled: bool = True                # CTF needs stage1 and aux; the baseline is optional

    def __post_init__(self):
        self.model = dict(self.model or {})

    @staticmethod
    def model_config_class():
        return GPTConfig


@dataclass
class AuxStageConfig(StageConfig):
    preset: str | None = "Aux-B"

    @staticmethod
    def model_config_class():
        return AuxConfig


@dataclass
class HeldoutConfig:
    enabled: bool = True
    limit: int | None = None            # the first N test images (all by default)
    batch_size: int = 64

    def __post_init__(self):
        _at_least(self, limit=1, batch_size=1)


# The paper's defaults: guidance 2.0, both temperatures 1.1, stage-2 top-k = all, no stage-2 guidance.
CTF_DEFAULTS = dict(cfg_scale=2.0, temperature=1.1, top_k=0, top_p=1.0, cfg_steps=None,
                    temperature_fine=1.1, top_k_fine=0, cfg_scale_fine=1.0)
# LlamaGen's sampler defaults apart from guidance, which matches CTF's so the two compare like for like.
BASELINE_DEFAULTS = dict(cfg_scale=2.0, temperature=1.0, top_k=0, top_p=1.0, cfg_steps=None)


@dataclass
class SamplingConfig:
    """Sampling defaults stored in the finished pipelines (unset: the paper's, see pipeline.py)."""

    ctf: dict = field(default_factory=dict)
    baseline: dict = field(default_factory=dict)

    def __post_init__(self):
        for name, given, known in (("ctf", self.ctf, CTF_DEFAULTS), ("baseline", self.baseline, BASELINE_DEFAULTS)):
            for key in given or {}:
                if key not in known:
                    raise ConfigError(unknown_key_message(f"{name}.{key}", key, known))


STAGE_SECTIONS = {"ar": "stage1", "aux": "aux", "baseline": "baseline", "matched": "matched"}


@dataclass
class ExperimentConfig:
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
    settings (for the baseline) copied to where they apply."""
    raw = copy.deepcopy(raw)
    seed = raw.get("seed", 0)
    tok = raw.setdefault("tokenizer", {}) or {}
    raw["tokenizer"] = tok
    tok["train"] = {"seed": seed, **(tok.get("train") or {})}
    clustering = raw.setdefault("clustering", {}) or {}
    raw["clustering"] = clustering
    if clustering.get("seed") is None:
        clustering["seed"] = seed
    s1 = raw.get("stage1") or {}
    base = dict(raw.get("baseline") or {})
    for key in ("preset", "model", "train"):  # `enabled` is the baseline's own
        if base.get(key) is None:
            base[key] = copy.deepcopy(s1.get(key))
    raw["baseline"] = base
    matched = dict(raw.get("matched") or {})
    matched.setdefault("enabled", False)  # off unless asked for, as when the section is absent
    if matched.get("preset") is None:
        matched["preset"] = copy.deepcopy(base.get("preset"))
    matched["model"] = {**(copy.deepcopy(base.get("model")) or {}), **(matched.get("model") or {})}
    if matched.get("train") is None:
        matched["train"] = copy.deepcopy(base.get("train"))
    raw["matched"] = matched
    shared = raw.get("train") or {}
    for section in ("stage1", "aux", "baseline", "matched"):
        st = dict(raw.get(section) or {})
        st["train"] = {"seed": seed, **shared, **(st.get("train") or {})}
        raw[section] = st
    if raw["stage1"].get("preset") is None:
        raw["stage1"]["preset"] = "GPT-B"
        for section in ("baseline", "matched"):
            if raw[section].get("preset") is None:
                raw[section]["preset"] = "GPT-B"
    return raw


def check_experiment(cfg: ExperimentConfig) -> None:
    """What the dataclasses cannot see alone."""
    if cfg.stage1.enabled != cfg.aux.enabled:
        raise ConfigError("stage1 and aux make CTF together: enable both or neither")
    if not (cfg.ctf_enabled or cfg.baseline.enabled):
        raise ConfigError("nothing to train: stage1 and aux, or the baseline, must be enabled")
    if cfg.matched.enabled and not (cfg.ctf_enabled and cfg.baseline.enabled):
        raise ConfigError("matched.enabled needs CTF (stage1 and aux) and the baseline: it matches the one to the other")
    for stage, section in STAGE_SECTIONS.items():
        if not cfg.stage(stage).enabled:
            continue
        if not cfg.stage(stage).train.length_given:
            raise ConfigError(f"{section}.train needs steps or epochs (e.g. train.steps=1000)")
    if cfg.data.dataset == "image_folder" and not cfg.data.root:
        raise ConfigError("data.root is required for dataset: image_folder (a folder of class sub-folders)")


def dry_run_overrides() -> list[str]:
    """Overrides that shrink a recipe to two steps of everything on a CPU in seconds: the tiny
    presets, 32x32 images, batch 4, four clusters, no FSDP or bf16. Data and tokenizer paths stay
    as given (point them at small local files)."""
    train = ["steps=2", "epochs=null", "batch_size=4", "grad_accum=1", "fsdp=false", "mixed_precision=none",
             "checkpoint_every=1", "log_every=1", "snapshot_every=0", "warmup_steps=0", "progress=false"]
    out = [f"{section}.train.{t}" for section in ("train", "stage1", "aux", "baseline", "matched") for t in train]
    out = [o.replace("train.train.", "train.") for o in out]
    return out + [
        "tokenizer.train.steps=2", "tokenizer.train.batch_size=4", "tokenizer.train.progress=false",
        "stage1.preset=GPT-tiny", "aux.preset=Aux-tiny", "baseline.preset=GPT-tiny", "matched.preset=GPT-tiny",
        "stage1.model.multiple_of=32", "aux.model.multiple_of=32", "baseline.model.multiple_of=32",
        "matched.model.multiple_of=32",
        "clustering.num_coarse=4", "data.image_size=32", "data.extract_batch_size=4", "data.num_workers=0",
        "heldout.limit=4", "heldout.batch_size=4"]


# --- reproduction --------------------------------------------------------------------------------

@dataclass
class EvaluationConfig:
    per_class: int = 100                # samples per class for every evaluation
    batch_size: int = 500
    seed: int = 0
    heldout_images: int = 2000          # test images for the exact bits per token
    temperatures: list = field(default_factory=lambda: [0.9, 1.0, 1.1])

    def __post_init__(self):
        _at_least(self, per_class=1, batch_size=1, seed=0, heldout_images=1)


@dataclass
class ReproduceConfig:
    """`ctfgen reproduce` settings (configs/fashion_mnist_ablations.yaml)."""

    steps: int = 470                    # ablation training steps; the main run must have a snapshot there
    clusters: list = field(default_factory=lambda: [64, 1024])  # besides the main run's
    random_clusters: bool = True        # k-means vs balanced random groups, at the main run's K
    unrestricted_aux: bool = True       # aux model over the whole codebook vs restricted to the cluster
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def __post_init__(self):
        _at_least(self, steps=1)
        if any(not int(k) >= 1 for k in self.clusters):
            raise ConfigError(f"clusters must be numbers of coarse labels >= 1, got {self.clusters}")


# --- the codebook-size study --------------------------------------------------------------------

@dataclass
class StudySettings:
    """`ctfgen study` settings (see ctfgen.experiments.study): the sampling grid, the sample counts and the seeds."""

    guidance: tuple[float, ...] = (1.5, 2.0, 3.0)
    temperatures: tuple[float, ...] = (0.9, 1.0, 1.1)  # stage 1 for CTF, the only one for the baselines
    select_per_class: int = 200         # validation samples per class for each grid point (2000 in all)
    select_seed: int = 1000             # the selection's sampling stream, apart from every test seed
    test_per_class: int = 500           # test samples per class for each reported cell (5000 in all)
    seeds: tuple[int, ...] = (0,)       # sampling seeds of the test cells (two: a spread to judge noise by)
    tokenizer_images: int | None = None  # test images for codebook usage and PSNR (None: the whole split)
    heldout_images: int = 10000         # test images for bits/token at every epoch
    coarse_images: int = 2000           # test images for the teacher-forced coarse prediction
    diagnosis_per_class: int = 500      # test images per class whose codes make the diagnosis sets; the
                                        # other test images of each class are their reference
    diagnosis_seed: int = 2000          # the diagnosis' sampling stream
    batch_size: int = 250

    def __post_init__(self):
        for name in ("select_per_class", "test_per_class", "heldout_images", "coarse_images", "diagnosis_per_class",
                     "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"study setting {name} must be >= 1, got {getattr(self, name)}")
        if self.tokenizer_images is not None and int(self.tokenizer_images) < 1:
            raise ConfigError(f"study setting tokenizer_images must be >= 1, got {self.tokenizer_images}")
        self.guidance, self.temperatures = tuple(map(float, self.guidance)), tuple(map(float, self.temperatures))
        self.seeds = tuple(map(int, self.seeds))
        if not (self.guidance and self.temperatures and self.seeds):
            raise ConfigError("the study needs at least one guidance scale, temperature and seed")
        shared = {self.select_seed, self.diagnosis_seed} & set(self.seeds)
        if shared or self.select_seed == self.diagnosis_seed:
            raise ConfigError(f"the test seeds {list(self.seeds)}, select_seed {self.select_seed} and diagnosis_seed "
                              f"{self.diagnosis_seed} must all differ: each sample set gets its own stream")


def load_stage_config(path, stage: str, overrides: list[str] | None = None) -> StageConfig:
    """One stage's settings (`ctfgen train`) from a stage YAML ({preset, model, train}) or an
    experiment YAML (its stage1 / aux / baseline / matched section, with what it inherits); the
    overrides apply to the stage's section (`train.steps=5`, `model.dim=256`)."""
    raw = read_yaml(path) if path is not None else {}
    if set(raw) <= {"preset", "model", "train"}:
        return from_dict(AuxStageConfig if stage == "aux" else StageConfig, apply_overrides(raw, overrides))
    ExperimentConfig.from_raw(raw)  # errors name the keys as written
    section = STAGE_SECTIONS[stage]  # the overrides apply after the section has inherited its settings
    return from_dict(ExperimentConfig, apply_overrides(inherit(raw), [f"{section}.{o}" for o in overrides or []])).stage(stage)
