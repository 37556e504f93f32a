"""Every setting of ctfgen: dataclasses, read from YAML by one loader.

    cfg = load_config(ExperimentConfig, "configs/tiny.yaml", ["train.steps=10", "stage1.preset=GPT-mini"])

The loader rejects an unknown key with its full path and the closest valid key, parses
`key.sub=value` overrides as YAML values (`data.train_limit=null`, `train.lr=3e-4`), and checks
every value's type and bounds (pydantic) before a run starts, not an hour into it. Every mistake
is one ConfigError line naming its key. One setting has one name in every section.

The experiment config has the sections data, tokenizer, clustering, train, stage1, aux, baseline,
matched, heldout and sampling. `train` is shared: the stages inherit it (keys given in their own
`train` win), the top-level `seed` reaches every section that has one, and the baseline takes
stage 1's preset, model and train settings unless it names its own (the paper compares at the
same stage-1 size).
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
import os
import typing
from dataclasses import asdict, field, fields, is_dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import pydantic.dataclasses
import pydantic_core
import yaml

from ctfgen.models.transformer import AuxConfig, GPTConfig
from ctfgen.tokenizer.vq import VQConfig
from ctfgen.utils.errors import ConfigError
from ctfgen.utils.options import SAMPLING, SEED, check_sampling

# --- the loader ------------------------------------------------------------------------------------


def settings(cls):
    """A settings dataclass, checked by pydantic when made: unknown keys and bad values are
    ConfigErrors naming their key path, dicts become the dataclass-typed fields, strings YAML 1.1
    reads numbers as (`3e-4`) become floats, lists become tuples. NaN and infinities are refused: no
    setting means them, and an infinite lr or weight decay makes every weight -inf at AdamW's first step."""
    cls = pydantic.dataclasses.dataclass(cls, config=pydantic.ConfigDict(extra="forbid", allow_inf_nan=False))
    make = cls.__init__

    def __init__(self, *args, **kwargs):
        try:
            make(self, *args, **kwargs)
        except pydantic.ValidationError as e:
            raise ConfigError(_message(cls, e.errors()[0])) from None

    cls.__init__ = functools.wraps(make)(__init__)
    return cls


BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}


def _message(cls, error: dict, where: str = "") -> str:
    """One line for pydantic's first error, in the words of the YAML file."""
    loc, kind, ctx, got = error["loc"], error["type"], error.get("ctx") or {}, error["input"]
    path = ".".join(map(str, ((where,) if where else ()) + loc))
    if kind == "unexpected_keyword_argument":
        for key in loc[:-1]:
            cls = typing.get_type_hints(cls)[key]
        return _unknown_key(path, {f.name for f in fields(cls) if f.init})
    if kind == "unknown_key":
        return _unknown_key(f"{path}.{ctx['key']}", ctx["known"])
    if kind == "dict_value":  # a message about one value of a dict, which starts with its key
        return f"{path}.{ctx['message']}"
    if kind == "value_error":  # a ConfigError of __post_init__
        return str(ctx["error"])
    if kind in ("dataclass_type", "dict_type"):
        return f"{path} must be a mapping of settings, got {got!r}"
    if kind in BOUNDS:
        return f"{path} must be {BOUNDS[kind]} {next(iter(ctx.values()))}, got {got!r}"
    if kind == "literal_error":  # expected: "'constant' or 'cosine'"
        choices = ctx["expected"].replace(" or ", ", ").replace("'", "").lower()
        return f"{path} must be one of {choices}, got {got!r}"
    message = error["msg"].split(", ")[0]  # "Input should be a valid integer", without pydantic's detail
    if message.startswith("Input should be"):
        return f"{path} must be{message.removeprefix('Input should be')}, got {got!r}"
    return f"{path}: {message[0].lower() + message[1:]}, got {got!r}"


def _unknown_key(path: str, known) -> str:
    *parents, key = path.split(".")
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.5)
    hint = f"; did you mean {'.'.join([*parents, close[0]])}?" if close else ""
    return f"unknown config key {path}{hint} (valid here: {', '.join(sorted(known))})"


def keys_of(allowed):
    """A dict field's check (None: empty): its keys must be fields of the dataclass `allowed`, or keys of the dict."""
    known = sorted(f.name for f in fields(allowed)) if is_dataclass(allowed) else sorted(allowed)

    def check(value):
        for key in value or {}:
            if key not in known:
                context = {"key": key, "known": known}
                raise pydantic_core.PydanticCustomError("unknown_key", "unknown key {key}", context)
        return {} if value is None else value

    return pydantic.BeforeValidator(check)


def sampling_values(option: str | None = None):
    """A check of a dict of sampling options, or of a list of values of the one `option`: each in its
    option's range (the model's own bounds, such as top_k against the vocabulary, wait for the model),
    the values kept as given."""

    def check(value):
        items = value.items() if option is None else ((str(i), v) for i, v in enumerate(value))
        for key, v in items:
            try:
                check_sampling({option or key: v}, labels={option or key: key})
            except ConfigError as e:
                raise pydantic_core.PydanticCustomError("dict_value", "{message}", {"message": str(e)}) from None
        return value

    return pydantic.AfterValidator(check)


def sampling_range(name: str):
    """A float in the range of the sampling option `name` (ctfgen.utils.options.SAMPLING)."""
    option = SAMPLING[name]
    return Annotated[float, pydantic.Field(gt=option.lo) if option.lo_open else pydantic.Field(ge=option.lo),
                     pydantic.Field(le=option.hi)]


def from_dict(cls, data: dict | None, where: str = ""):
    """`cls` from a dict, as the settings dataclasses make themselves; for a plain dataclass too (a
    model config), refusing unknown keys. `where` is the key path of `data`, for the messages."""
    data = {} if data is None else data
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'the config'} must be a mapping of settings, got {data!r}")
    try:
        if hasattr(cls, "__pydantic_validator__"):
            return pydantic.TypeAdapter(cls).validate_python(data)
        for key in data:
            if key not in (known := {f.name for f in fields(cls) if f.init}):
                raise ConfigError(_unknown_key(f"{where}.{key}" if where else str(key), known))
        return cls(**data)
    except pydantic.ValidationError as e:
        raise ConfigError(_message(cls, e.errors()[0], where)) from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where + ': ' if where else ''}{e}") from None


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
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}  # YAML files are UTF-8, whatever the locale
    except (yaml.YAMLError, UnicodeDecodeError) as e:
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


# Counts and bounds the settings share (pydantic checks them; NaN and infinities are refused everywhere).
Count = Annotated[int, pydantic.Field(ge=1)]
Natural = Annotated[int, pydantic.Field(ge=0)]
Positive = Annotated[float, pydantic.Field(gt=0)]
NonNegative = Annotated[float, pydantic.Field(ge=0)]
# The range every ctfgen seed has (`--seed`): numpy's RandomState, which scikit-learn's k-means seeds from, refuses
# any other, and a seed far above it overflows torch's generators once the epoch or batch is added to it.
Seed = Annotated[int, pydantic.Field(ge=SEED.lo, le=SEED.hi)]
Beta = Annotated[float, pydantic.Field(ge=0, lt=1)]  # torch's Adam and AdamW refuse any other
Temperature, Guidance = sampling_range("temperature"), sampling_range("cfg_scale")  # as the samplers check them
SAMPLING_VALUES = sampling_values()
Dropout = Annotated[float, pydantic.Field(ge=0, le=1)]  # a probability, as nn.Dropout and the class dropout take it
# What a stage's model settings take: the GPT and the auxiliary model (models/transformer.py) divide by the
# counts, raise the RoPE base to fractional powers, add the norm's eps under a square root.
MODEL_VALUES = dict(vocab_size=Count, num_coarse=Count, image_tokens=Count, num_classes=Count, dim=Count, n_layer=Count,
                    n_head=Count, multiple_of=Count, norm_eps=NonNegative, rope_base=Positive, token_dropout=Dropout,
                    resid_dropout=Dropout, ffn_dropout=Dropout, class_dropout=Dropout, class_prefix=bool,
                    restrict_to_cluster=bool)


def _model_values(value: dict) -> dict:
    """A stage's model settings, each of the type and in the range the model takes; numbers YAML 1.1
    reads as strings (`norm_eps: 1e-6`) become numbers, the rest stay as written."""
    out = dict(value)
    for key, v in value.items():
        if key not in MODEL_VALUES:
            continue
        try:
            checked = pydantic.TypeAdapter(MODEL_VALUES[key], config=pydantic.ConfigDict(allow_inf_nan=False)
                                           ).validate_python(v)
        except pydantic.ValidationError as e:
            message = _message(None, e.errors()[0], key)
            raise pydantic_core.PydanticCustomError("dict_value", "{message}", {"message": message}) from None
        out[key] = checked if isinstance(v, str) else v
    return out


MODEL_CHECK = pydantic.AfterValidator(_model_values)


# --- training ------------------------------------------------------------------------------------

@settings
class TrainConfig:
    """Optimisation settings (a `train:` section). Sizes are global, not per rank. Defaults follow
    LlamaGen's c2i recipe: AdamW lr 1e-4, betas (0.9, 0.95), weight decay 0.05, clip 1.0, bf16."""

    steps: Count | None = None  # optimizer steps; or give `epochs`
    epochs: Count | None = None
    batch_size: Count = 256  # global batch per optimizer step (all ranks, all micro-batches)
    grad_accum: Count = 1
    lr: Positive = 1e-4
    weight_decay: NonNegative = 0.05  # on >=2-D parameters only, as LlamaGen
    betas: tuple[Beta, Beta] = (0.9, 0.95)
    grad_clip: NonNegative = 1.0  # 0 disables clipping (the norm is still logged)
    warmup_steps: Natural = 0
    schedule: Literal["constant", "cosine"] = "constant"  # constant (LlamaGen) or cosine
    min_lr_ratio: Annotated[float, pydantic.Field(ge=0, le=1)] = 0.0  # cosine decays to lr * min_lr_ratio
    ema: bool = False
    ema_decay: Annotated[float, pydantic.Field(ge=0, lt=1)] = 0.9999
    # "auto": bf16 autocast on CUDA and on CPUs with native bf16 matmul, float32 elsewhere;
    # "bf16": bf16 autocast on CUDA and CPU, refused on other devices (MPS, ...); "none": float32.
    # Loss, optimiser state and master weights stay float32 in every case.
    mixed_precision: Literal["auto", "bf16", "none"] = "auto"
    seed: Seed = 0
    checkpoint_every: Count = 1000
    keep_checkpoints: Natural = 2
    log_every: Count = 10
    snapshot_every_epoch: bool = False  # save_pretrained the (EMA) model after every epoch
    snapshot_every: Natural = 0  # ... and every N steps, to snapshots/step-<N>/ (0: never)
    num_workers: Natural = 0
    fsdp: Literal[True, False, "auto"] = "auto"  # GPT-L size and larger under "auto"
    progress: bool = True

    @property
    def length_given(self) -> bool:
        return self.steps is not None or self.epochs is not None


@settings
class TokenizerTrainConfig(TrainConfig):
    """The tokenizer's `train:` section: the same settings, LlamaGen's train_vq.py defaults."""

    steps: Count | None = 10000
    batch_size: Count = 64
    weight_decay: NonNegative = 0.0
    checkpoint_every: Count = 500
    log_every: Count = 20
    fsdp: Literal[True, False, "auto"] = False
    # Keeping the codebook in use (ctfgen.tokenizer.codebook); LlamaGen's entropy loss is model.entropy_loss_ratio.
    codebook_init: Literal["random", "kmeans"] = "random"  # LlamaGen's, or k-means of initial encoder outputs
    codebook_init_images: Count = 4096  # training images whose encoder outputs the k-means initialisation clusters
    # > 0: move codes no batch chose for this many steps onto recent encoder outputs
    dead_code_steps: Natural = 0
    # Restarts stop after this fraction of the steps, so that usage is not measured on codes that were just moved.
    dead_code_until: Annotated[float, pydantic.Field(gt=0, le=1)] = 0.8


@settings
class VQLossConfig:
    """The tokenizer's losses (LlamaGen's VQLoss). Perceptual and adversarial terms are off by
    default because they need local LPIPS weights and long runs."""

    reconstruction: Literal["l1", "l2"] = "l2"
    reconstruction_weight: float = 1.0
    perceptual_weight: float = 0.0      # LPIPS weight (LlamaGen: 1.0); > 0 needs lpips_weights
    lpips_weights: str | None = None    # the merged LPIPS-VGG16 file (see ctfgen.tokenizer.losses)
    lpips_vgg_weights: str | None = None
    disc_weight: float = 0.0            # adversarial weight (LlamaGen: 0.5); 0: no discriminator
    disc_start: int = 20000             # steps before the adversarial loss starts
    disc_adaptive: bool = False         # VQGAN's |grad rec| / |grad adv| at the decoder's last layer
    disc_loss: Literal["hinge", "vanilla"] = "hinge"
    disc_dim: Count = 64                # 0 would leave the discriminator no weights but its last bias
    disc_layers: Natural = 3            # its stride-2 convolutions (NLayerDiscriminator's n_layers)
    disc_lr: Positive | None = None     # default: train.lr

    def __post_init__(self):
        if self.perceptual_weight > 0 and not self.lpips_weights:
            raise ConfigError(
                "perceptual_weight > 0 needs lpips_weights: a local LPIPS-VGG16 "
                "weights file (see `python -m ctfgen.tokenizer.losses`), or set perceptual_weight: 0")


# --- the experiment ------------------------------------------------------------------------------

@settings
class DataConfig:
    dataset: Literal["fashion_mnist", "image_folder"] = "fashion_mnist"
    root: str | None = None             # Fashion-MNIST IDX directory, or the train image folder
    test_root: str | None = None        # image_folder: held-out images (class-per-folder)
    image_size: Count | None = None  # image_folder: crop size (default 256); fashion_mnist: 28
    channels: Count | None = None  # image_folder: 1 or 3 (default: the tokenizer's)
    train_limit: Count | None = None  # class-balanced subset sizes (fashion_mnist)
    test_limit: Count | None = None
    validation_images: Natural = 0  # fashion_mnist: class-balanced train images held out: RUN/codes/val
    augment: Literal["none", "flip", "tencrop"] = "none"  # for the train codes
    extract_batch_size: Count = 256
    num_workers: Natural = 0


@settings
class TokenizerConfig:
    pretrained: str | None = None       # a VQModel directory or a LlamaGen VQ .pt file, instead of training
    model: Annotated[dict, keys_of(VQConfig)] = field(default_factory=dict)
    train: TokenizerTrainConfig = field(default_factory=TokenizerTrainConfig)
    loss: VQLossConfig = field(default_factory=VQLossConfig)


@settings
class ClusteringConfig:
    num_coarse: Count = 512
    method: Literal["kmeans", "random"] = "kmeans"
    seed: Seed | None = None            # default: the top-level seed


@settings
class StageConfig:
    """A model trained on codes: stage 1 (`ar`), the auxiliary model or the baseline."""

    preset: str | None = None
    model: Annotated[dict, keys_of(GPTConfig), MODEL_CHECK] = field(default_factory=dict)  # over the preset's
    train: TrainConfig = field(default_factory=TrainConfig)
    enabled: bool = True                # CTF needs stage1 and aux; the baseline is optional


@settings
class AuxStageConfig(StageConfig):
    preset: str | None = "Aux-B"
    model: Annotated[dict, keys_of(AuxConfig), MODEL_CHECK] = field(default_factory=dict)


@settings
class HeldoutConfig:
    enabled: bool = True
    limit: Count | None = None  # the first N test images (all by default)
    batch_size: Count = 64


# The paper's defaults: guidance 2.0, both temperatures 1.1, stage-2 top-k = all, no stage-2 guidance.
CTF_DEFAULTS = dict(cfg_scale=2.0, temperature=1.1, top_k=0, top_p=1.0, cfg_steps=None,
                    temperature_fine=1.1, top_k_fine=0, cfg_scale_fine=1.0)
# LlamaGen's sampler defaults apart from guidance, which matches CTF's so the two compare like for like.
BASELINE_DEFAULTS = dict(cfg_scale=2.0, temperature=1.0, top_k=0, top_p=1.0, cfg_steps=None)


@settings
class SamplingConfig:
    """Sampling defaults stored in the finished pipelines (unset: the paper's, see pipeline.py)."""

    ctf: Annotated[dict, keys_of(CTF_DEFAULTS), SAMPLING_VALUES] = field(default_factory=dict)
    baseline: Annotated[dict, keys_of(BASELINE_DEFAULTS), SAMPLING_VALUES] = field(default_factory=dict)


STAGE_SECTIONS = {"ar": "stage1", "aux": "aux", "baseline": "baseline", "matched": "matched"}


@settings
class ExperimentConfig:
    name: str | None = None
    seed: Seed = 0
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
    trained = {} if cfg.tokenizer.pretrained else {"tokenizer": cfg.tokenizer.train}
    trained.update({section: cfg.stage(stage).train for stage, section in STAGE_SECTIONS.items()
                    if cfg.stage(stage).enabled})
    for section, t in trained.items():
        if t.batch_size % t.grad_accum:  # the training loop splits the batch into grad_accum micro-batches
            raise ConfigError(f"{section}.train.batch_size={t.batch_size} must be a multiple of {section}.train."
                              f"grad_accum={t.grad_accum} (and of that times the ranks under torchrun)")
    for stage, section in STAGE_SECTIONS.items():
        # The preset and the model's shape, checked now rather than when the stage's turn comes after the
        # stages before it have trained; the sizes the data gives (vocabulary, tokens) stand in as placeholders.
        s = cfg.stage(stage)
        if s.enabled:
            kind = AuxConfig if stage == "aux" else GPTConfig
            data = {"vocab_size": 2**31, "image_tokens": 1, **({"num_coarse": 1} if stage == "aux" else {})}
            try:
                kind.from_preset(s.preset or ("Aux-B" if stage == "aux" else "GPT-B"), **{**data, **s.model})
            except ConfigError as e:
                raise ConfigError(f"{section}: {e}") from None
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

@settings
class EvaluationConfig:
    per_class: Count = 100  # samples per class for every evaluation
    batch_size: Count = 500
    seed: Seed = 0
    heldout_images: Count = 2000  # test images for the exact bits per token
    # each the stage-1 and the stage-2 temperature of a sampling ablation (reproduce.py:146), sampled last
    # (as written: they name the records, `temperature-1`)
    temperatures: Annotated[list, sampling_values("temperature")] = field(default_factory=lambda: [0.9, 1.0, 1.1])


@settings
class ReproduceConfig:
    """`ctfgen reproduce` settings (configs/fashion_mnist_ablations.yaml)."""

    steps: Count = 470  # ablation training steps; the main run must have a snapshot there
    clusters: list[Count] = field(default_factory=lambda: [64, 1024])  # besides the main run's
    random_clusters: bool = True        # k-means vs balanced random groups, at the main run's K
    unrestricted_aux: bool = True       # aux model over the whole codebook vs restricted to the cluster
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)


# --- the codebook-size study --------------------------------------------------------------------

@settings
class StudySettings:
    """`ctfgen study` settings (see ctfgen.experiments.study): the sampling grid, the sample counts and the seeds."""

    guidance: tuple[Guidance, ...] = (1.5, 2.0, 3.0)
    temperatures: tuple[Temperature, ...] = (0.9, 1.0, 1.1)  # stage 1 for CTF, the only one for the baselines
    select_per_class: Count = 200  # validation samples per class for each grid point (2000 in all)
    select_seed: Seed = 1000            # the selection's sampling stream, apart from every test seed
    test_per_class: Count = 500  # test samples per class for each reported cell (5000 in all)
    seeds: tuple[Seed, ...] = (0,)      # sampling seeds of the test cells (two: a spread to judge noise by)
    tokenizer_images: Count | None = None  # test images for codebook usage and PSNR (None: all)
    heldout_images: Count = 10000  # test images for bits/token at every epoch
    coarse_images: Count = 2000  # test images for the teacher-forced coarse prediction
    # Test images per class whose codes make the diagnosis sets; the other test images of each class: their reference.
    diagnosis_per_class: Count = 500
    diagnosis_seed: Seed = 2000         # the diagnosis' sampling stream
    # FD against epoch: samples per class of each epoch snapshot at the chosen setting, on their own stream.
    epoch_per_class: Count = 200
    epoch_seed: Seed = 3000
    batch_size: Count = 250

    def __post_init__(self):
        if not (self.guidance and self.temperatures and self.seeds):
            raise ConfigError("the study needs at least one guidance scale, temperature and seed")
        streams = (self.select_seed, self.diagnosis_seed, self.epoch_seed)
        if set(streams) & set(self.seeds) or len(set(streams)) < len(streams):
            raise ConfigError(f"the test seeds {list(self.seeds)}, select_seed {self.select_seed}, diagnosis_seed "
                              f"{self.diagnosis_seed} and epoch_seed {self.epoch_seed} must all differ: each sample "
                              "set gets its own stream")
