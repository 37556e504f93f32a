"""Inference pipelines: CTF (coarse AR stage + one-pass auxiliary fine stage) and the plain AR baseline.

    >>> pipe = CTFPipeline(ar, aux, coarse_map, tokenizer)
    >>> images = pipe.sample([3, 7], generator=0)           # (2, C, H, W) in [-1, 1]
    >>> tokens = pipe.sample_tokens([3, 7], generator=0)    # (2, image_tokens) fine tokens
    >>> nats = pipe.log_prob(tokens, [3, 7])                # (2,) float64, exact with an in-cluster aux
    >>> out = pipe([3, 7], generator=0)                     # PipelineOutput: images, coarse_preview, tokens, ...
    >>> pipe.save_pretrained("run/ctf"); load_pipeline("run/ctf")

Both pipelines share one interface (`sample_tokens`, `sample`, `log_prob`, `save_pretrained`,
`from_pretrained`, `last_timings`), so benchmarks and evaluation treat them alike. Every part is
checked against the others on construction (vocabularies, grid, classes, codebook and coarse-map
fingerprints): a mismatched part is a ValueError naming both values, never silent garbage.

Pipelines are inference objects: the constructor puts every model in eval mode (dropout and class
dropout off), which `log_prob` and sampling rely on.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ctfgen.clustering import CoarseMap
from ctfgen.compat import check_parts
from ctfgen.config import BASELINE_DEFAULTS, CTF_DEFAULTS
from ctfgen.data.codes import CodeDataset
from ctfgen.models.transformer import GPT, AuxModel
from ctfgen.sampling import (as_generator, check_labels, generate, log_prob as ar_log_prob, sample_fine,
                             token_log_probs)
from ctfgen.tokenizer.vq import VQModel
from ctfgen.utils import distributed as D
from ctfgen.utils.errors import ConfigError, CorruptFileError, MismatchError, MissingFileError, WrongTypeError
from ctfgen.utils.fileio import atomic_write_json, read_json
from ctfgen.utils.hub import download_snapshot, is_repo_id, read_model_card, write_model_card
from ctfgen.utils.options import check_sampling, integer_tokens, tokens_below
from ctfgen.utils.precision import drop_casts

__all__ = ["CTFPipeline", "ARPipeline", "PipelineOutput", "load_pipeline", "pipeline_dir", "bits_per_token",
           "heldout_bits_per_token", "CTF_DEFAULTS", "BASELINE_DEFAULTS"]

PIPELINE_FILE = "pipeline.json"
COARSE_MAP_FILE = "coarse_map.safetensors"
FORMAT_VERSION = 1



def bits_per_token(log_prob: torch.Tensor, image_tokens: int) -> torch.Tensor:
    """Per-image log-probabilities in nats -> bits per token (lower is better)."""
    return -torch.as_tensor(log_prob, dtype=torch.float64) / (image_tokens * math.log(2.0))


def heldout_bits_per_token(pipeline, codes, limit: int | None = None, batch_size: int = 500) -> dict:
    """Exact held-out bits per token of `pipeline` on the first `limit` images of a code directory
    (or CodeDataset), on the pipeline's device; under torchrun the images are shared out and the
    sums all-reduced. Returns nats_per_image (the mean negative log-likelihood), bits_per_token, exact
    (False: an upper bound), images."""
    codes = codes if isinstance(codes, CodeDataset) else CodeDataset(codes, augmentation=0)
    n = len(codes) if limit is None else min(len(codes), int(limit))
    if n < 1:  # the mean over no images would be reported as nan bits per token
        raise ConfigError(f"no images to score: {codes.dir} holds {len(codes)} and the limit is {limit}; "
                          "give a limit of at least 1 and codes with images")
    mine = list(range(D.get_rank(), n, D.get_world_size()))
    device = pipeline.device
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.inference_mode():
        for i in range(0, len(mine), batch_size):
            x, y = codes.get_batch(mine[i:i + batch_size])
            lp = pipeline.log_prob(x.to(device), y.to(device))
            total += torch.stack([lp.sum(), torch.tensor(float(len(lp)), dtype=torch.float64, device=device)])
    D.all_reduce_sum(total)
    log_prob = (total[0] / total[1]).item()
    return {"nats_per_image": -log_prob,  # the negative log-likelihood, a cost like bits per token
            "bits_per_token": bits_per_token(torch.tensor([log_prob]), codes.image_tokens).item(),
            "exact": bool(pipeline.log_prob_is_exact), "images": n, "image_tokens": codes.image_tokens}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device):
    """(fn(), its seconds), the device's queued work included."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


@dataclass
class PipelineOutput:
    """One pipeline call (`pipe(labels)`). The CTF-only fields are None for the baseline."""

    images: torch.Tensor                          # (B, C, H, W) in [-1, 1]
    tokens: torch.Tensor                          # (B, image_tokens) fine tokens
    labels: torch.Tensor                          # (B,) class ids
    timings: dict = field(default_factory=dict)   # seconds: stage1, stage2, decode, total (+ coarse_preview)
    coarse: torch.Tensor | None = None            # (B, image_tokens) coarse labels stage 1 sampled
    coarse_tokens: torch.Tensor | None = None     # (B, image_tokens) their representative codewords
    coarse_preview: torch.Tensor | None = None    # (B, C, H, W) coarse_tokens decoded (unless preview=False)

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.tokens.shape[1])

    @property
    def changed(self) -> torch.Tensor | None:
        """(B, h, w) bool: where stage 2 chose a codeword other than its cluster's representative."""
        if self.coarse_tokens is None:
            return None
        g = self.grid_size
        return (self.tokens != self.coarse_tokens).reshape(-1, g, g)


def _flat_tokens(tokens, image_tokens: int, device: torch.device) -> torch.Tensor:
    tokens = integer_tokens(tokens).to(device)
    if tokens.dim() == 3:  # (B, h, w) grids as the tokenizer returns them
        tokens = tokens.flatten(1)
    if tokens.dim() != 2 or tokens.shape[1] != image_tokens:
        raise MismatchError(f"expected tokens of shape (B, {image_tokens}) or (B, h, w) grids, got {tuple(tokens.shape)}")
    return tokens.long()


def _grid_size(image_tokens: int) -> int:
    g = math.isqrt(image_tokens)
    if g * g != image_tokens:
        raise MismatchError(f"image_tokens={image_tokens} is not a square grid")
    return g


class _Pipeline:
    kind = ""
    models: tuple[str, ...] = ()  # its trained models: each an attribute, saved in the sub-directory of that name
    _defaults: dict = {}

    # ------------------------------------------------------------ shared plumbing
    def _models(self) -> list:
        return [getattr(self, name) for name in self.models]

    @property
    def device(self) -> torch.device:
        return next(self._models()[0].parameters()).device

    def to(self, device):
        for m in self._models():
            m.to(device)
            drop_casts(m)  # the cast copies (cast_weights) stay on the old device and would hold its memory
        if self.tokenizer is not None:
            self.tokenizer.to(device)
        return self

    def eval(self):
        for m in self._models():
            m.eval()
        if self.tokenizer is not None:
            self.tokenizer.eval()
        return self

    @property
    def grid_size(self) -> int:
        return _grid_size(self.image_tokens)

    @property
    def sampling_limits(self) -> dict:
        """The model's bounds on its sampling options (ctfgen.utils.options checks the rest)."""
        raise NotImplementedError

    def _set_sampling_defaults(self, given: dict | None) -> None:
        if given is not None and not isinstance(given, dict):
            raise WrongTypeError(f"sampling_defaults must be a dict of sampling options, got {type(given).__name__}")
        # None = unset, as in sample_tokens: a None stored as the default reached the sampler (cfg_scale=None
        # was a TypeError at every call); cfg_steps' own None (every token) is its default anyway.
        self.sampling_defaults = {**self._defaults, **{k: v for k, v in (given or {}).items() if v is not None}}
        self.resolve_sampling(self.sampling_defaults)

    def resolve_sampling(self, kwargs: dict, labels: dict | None = None) -> dict:
        """The options a call samples with: `kwargs` (None = unset) over `sampling_defaults`, each
        checked against its range (ctfgen.utils.options); `labels` names them in messages."""
        unknown = set(kwargs) - set(self._defaults)
        if unknown:
            raise WrongTypeError(f"{type(self).__name__}.sample_tokens got unknown options {sorted(unknown)}; "
                            f"valid: {sorted(self._defaults)}")
        out = dict(self.sampling_defaults)
        out.update({k: v for k, v in kwargs.items() if v is not None})
        return check_sampling(out, self.sampling_limits, labels)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, image_tokens) fine tokens -> (B, C, H, W) images in [-1, 1]."""
        if self.tokenizer is None:
            raise MismatchError(f"this {type(self).__name__} has no tokenizer; pass tokenizer= to decode images "
                             "(sample_tokens works without one)")
        g = self.grid_size
        # checked before the reshape: (B, 4 * image_tokens) tokens would otherwise decode to 4B images
        tokens = _flat_tokens(tokens, self.image_tokens, self.device)
        return self.tokenizer.decode(tokens.reshape(-1, g, g)).clamp(-1, 1)

    def _sample_and_decode(self, labels, generator, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tokenizer is None:
            raise MismatchError(f"this {type(self).__name__} has no tokenizer, so it cannot decode images; "
                                "pass tokenizer= or use sample_tokens")
        tokens = self.sample_tokens(labels, generator=generator, **kwargs)
        images, self.last_timings["decode"] = _timed(lambda: self.decode(tokens), tokens.device)
        self.last_timings["total"] = sum(self.last_timings.get(k, 0.0) for k in ("stage1", "stage2", "decode"))
        return tokens, images

    def sample(self, labels, generator=None, **kwargs) -> torch.Tensor:
        """Sample tokens for `labels` (see `sample_tokens` for the options) and decode them to
        (B, C, H, W) images in [-1, 1]. `last_timings` gets stage1/stage2/decode seconds."""
        return self._sample_and_decode(labels, generator, kwargs)[1]

    @torch.no_grad()
    def __call__(self, labels, generator=None, preview: bool = True, **kwargs) -> "PipelineOutput":
        """Sample and decode, keeping every stage: a `PipelineOutput` with the images, the tokens and
        the timings, and for CTF the sampled coarse labels, their representative codewords and (unless
        `preview=False`) the coarse preview decoded from them. Same options and draws as `sample`;
        timings as `last_timings`, plus `coarse_preview` (not counted in `total`, which stays the cost
        of the final images)."""
        tokens, images = self._sample_and_decode(labels, generator, kwargs)
        device = tokens.device
        out = PipelineOutput(images=images, tokens=tokens, labels=check_labels(labels, self.num_classes, device),
                             timings=self.last_timings)
        if self.kind == "ctf":
            out.coarse = self.last_coarse
            out.coarse_tokens = self.representatives.to(device)[out.coarse]
            if preview:
                out.coarse_preview, out.timings["coarse_preview"] = _timed(lambda: self.decode(out.coarse_tokens),
                                                                           device)
        return out

    def _write_json(self, directory: Path, extra: dict) -> None:
        info = {"type": self.kind, "format_version": FORMAT_VERSION, "image_tokens": self.image_tokens,
                "num_classes": self.num_classes, "has_tokenizer": self.tokenizer is not None,
                "sampling_defaults": self.sampling_defaults, **extra}
        atomic_write_json(directory / PIPELINE_FILE, info)

    @staticmethod
    def _read_json(directory: Path, kind: str) -> dict:
        info = _read_pipeline_json(directory)
        if info.get("type") != kind:
            raise MismatchError(f"{directory} holds a {info.get('type')!r} pipeline, not {kind!r}; use load_pipeline()")
        return info

    @staticmethod
    def _load_tokenizer(directory: Path, info: dict, map_location):
        if info.get("has_tokenizer") is False:  # a tokenizer/ beside it is left from an earlier save
            return None
        if not (directory / "tokenizer").is_dir():
            if info.get("has_tokenizer"):
                raise MissingFileError(f"{directory}/tokenizer is missing but pipeline.json says it was saved")
            return None

        return VQModel.from_pretrained(str(directory / "tokenizer"), map_location=map_location)


class CTFPipeline(_Pipeline):
    """Coarse-to-fine generation: `ar` (a GPT over coarse labels) samples the coarse sequence,
    `aux` (AuxModel) predicts every fine token from it in one pass, `tokenizer` decodes."""

    kind = "ctf"
    models = ("ar", "aux")
    _defaults = CTF_DEFAULTS

    def __init__(self, ar, aux, coarse_map: CoarseMap, tokenizer=None, sampling_defaults: dict | None = None):
        if not isinstance(coarse_map, CoarseMap):
            raise WrongTypeError(f"coarse_map must be a ctfgen.CoarseMap, got {type(coarse_map).__name__}")
        self.ar, self.aux, self.coarse_map, self.tokenizer = ar, aux, coarse_map, tokenizer
        self._check_parts()
        self._set_sampling_defaults(sampling_defaults)
        self.last_timings: dict = {}
        self.model_card: dict = {}  # training_config and metrics of the card it was loaded with (hub.read_model_card)
        self.eval()

    def _check_parts(self) -> None:
        check_parts("CTFPipeline parts do not belong together", stage1=self.ar.config, aux=self.aux.config,
                    coarse_map=self.coarse_map, tokenizer=self.tokenizer)
        cmap, aux = self.coarse_map, self.aux.config
        f2c = self.aux.fine_to_coarse.detach().cpu()
        if bool((f2c < 0).all()):
            self.aux.set_coarse_map(cmap)  # an aux built without a map adopts (after checking) this one
        elif not torch.equal(f2c, cmap.fine_to_coarse):
            n = int((f2c != cmap.fine_to_coarse).sum())
            raise MismatchError(f"the aux model's fine_to_coarse differs from the coarse map's at {n} of {cmap.vocab_size} "
                             f"codewords (coarse map {cmap.fingerprint}, aux config "
                             f"{aux.coarse_map_fingerprint}); the aux model was trained with another coarse map")

    @property
    def num_classes(self) -> int:
        return self.ar.config.num_classes

    @property
    def image_tokens(self) -> int:
        return self.ar.config.image_tokens

    @property
    def sampling_limits(self) -> dict:
        # Stage-2 top-k counts a cluster's members when the aux model samples within clusters.
        fine = int(self.coarse_map.sizes.max()) if self.aux.config.restrict_to_cluster else self.coarse_map.vocab_size
        return {"top_k": self.ar.config.vocab_size, "top_k_fine": fine, "cfg_steps": self.image_tokens}

    def resolve_sampling(self, kwargs: dict, labels: dict | None = None) -> dict:
        o = super().resolve_sampling(kwargs, labels)
        # checked here, before stage 1 runs, and when the defaults are set (sample_fine would refuse it later)
        if o["cfg_scale_fine"] != 1.0 and not self.aux.config.class_prefix:
            name = (labels or {}).get("cfg_scale_fine", "cfg_scale_fine")
            raise ConfigError(f"{name} {o['cfg_scale_fine']}: stage-2 guidance needs an auxiliary model with "
                              "class_prefix=True, and this one has none; use 1.0")
        return o

    @property
    def log_prob_is_exact(self) -> bool:
        """True when `log_prob` is the exact log-likelihood (in-cluster aux); otherwise it is a lower bound."""
        return bool(self.aux.config.restrict_to_cluster)

    @property
    def representatives(self) -> torch.Tensor:
        """(num_coarse,) int64 codeword standing for each coarse label in the coarse preview, on the CPU.
        By default the member nearest its cluster's k-means centroid (`CoarseMap.representatives`),
        which needs no data; assign another choice, e.g. the most frequent member in training codes
        (`ctfgen.experiments.diagnosis.most_frequent_members`), and it is checked to hold one member per cluster."""
        reps = self.__dict__.get("_representatives")
        if reps is None:
            if self.tokenizer is None:
                raise ConfigError("this CTFPipeline has no tokenizer, so it has no codewords to pick representatives "
                                 "from; pass tokenizer=")
            reps = self._representatives = self.coarse_map.representatives(self.tokenizer)
        return reps

    @representatives.setter
    def representatives(self, reps) -> None:
        reps = torch.as_tensor(reps, dtype=torch.long).cpu().reshape(-1)
        k = self.coarse_map.num_coarse
        if reps.numel() != k or int(reps.min()) < 0 or int(reps.max()) >= self.coarse_map.vocab_size \
                or not torch.equal(self.coarse_map(reps), torch.arange(k)):
            raise ConfigError(f"representatives must be {k} codewords, the c-th a member of cluster c "
                             "(as CoarseMap.representatives or diagnosis.most_frequent_members return them)")
        self._representatives = reps

    @torch.no_grad()
    def coarse_preview(self, coarse: torch.Tensor) -> torch.Tensor:
        """(B, image_tokens) coarse labels -> (B, C, H, W) images: each label decoded through its
        cluster's representative codeword, i.e. what stage 1 alone decided."""
        coarse = _flat_tokens(coarse, self.image_tokens, self.device)
        tokens_below(coarse, self.coarse_map.num_coarse, "coarse labels", error=ConfigError)
        return self.decode(self.representatives.to(coarse.device)[coarse])

    @torch.no_grad()
    def sample_tokens(self, labels, cfg_scale=None, temperature=None, top_k=None, top_p=None, cfg_steps=None,
                      temperature_fine=None, top_k_fine=None, cfg_scale_fine=None, generator=None,
                      dtype=None) -> torch.Tensor:
        """(B, image_tokens) int64 fine tokens for class `labels`.

        Options left as None take `sampling_defaults` (the paper's: cfg_scale 2.0, temperature 1.1,
        top_k 0 (all), top_p 1.0, cfg_steps None (guide every step), temperature_fine 1.1,
        top_k_fine 0 (all; 1 = argmax), cfg_scale_fine 1.0 (no stage-2 guidance)).
        `generator`: an int seed or a torch.Generator on the pipeline's device; one stream feeds
        both stages, so a seed reproduces the whole sample. `dtype`: "auto", "float32", "bfloat16" or
        "float16" for both stages (None = the weights' dtype, float32 as loaded); weights are cast
        once per dtype and cached (`ctfgen.utils.precision.cast_weights`), `log_prob` stays float32.
        """
        o = self.resolve_sampling(dict(cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                               cfg_steps=cfg_steps, temperature_fine=temperature_fine, top_k_fine=top_k_fine,
                               cfg_scale_fine=cfg_scale_fine))
        device = self.device
        labels = check_labels(labels, self.num_classes, device)
        gen = as_generator(generator, device)
        _sync(device)
        t0 = time.perf_counter()
        coarse = generate(self.ar, labels, cfg_scale=o["cfg_scale"], temperature=o["temperature"], top_k=o["top_k"],
                          top_p=o["top_p"], cfg_steps=o["cfg_steps"], generator=gen, dtype=dtype)
        _sync(device)
        t1 = time.perf_counter()
        fine = sample_fine(self.aux, coarse, labels, temperature=o["temperature_fine"], top_k=o["top_k_fine"],
                           cfg_scale=o["cfg_scale_fine"], generator=gen, dtype=dtype)
        _sync(device)
        self.last_timings = {"stage1": t1 - t0, "stage2": time.perf_counter() - t1, "decode": 0.0}
        self.last_timings["total"] = self.last_timings["stage1"] + self.last_timings["stage2"]
        self.last_coarse = coarse  # the stage-1 draw, for the coarse preview (PipelineOutput)
        return fine

    @torch.no_grad()
    def log_prob(self, tokens, labels) -> torch.Tensor:
        """(B,) float64 log p(tokens | label) in nats per image.

        log p(fine) = log p_AR(coarse(fine)) + sum_i log p_aux(fine_i | coarse, label): exact because
        the coarse sequence is a function of the fine one and the in-cluster aux puts all its mass on
        fine tokens that map back to it. With `restrict_to_cluster=False` (see `log_prob_is_exact`)
        the aux also spends mass on fine grids with other coarse sequences, so this is only a LOWER
        BOUND on log p(fine), and a warning says so.
        """
        if not self.log_prob_is_exact:
            warnings.warn("aux model is not restricted to clusters: CTFPipeline.log_prob is a lower bound on the "
                          "log-likelihood, not the exact value", stacklevel=2)
        device = self.device
        tokens = _flat_tokens(tokens, self.image_tokens, device)
        labels = check_labels(labels, self.num_classes, device)
        coarse = self.coarse_map(tokens)
        lp_coarse = ar_log_prob(self.ar, coarse, labels).to(torch.float64)
        was_training = self.aux.training
        self.aux.eval()  # dropout or class dropout would make the value random
        try:
            # the restricted model scores each token among its cluster's members only
            logits = self.aux(coarse, labels, in_cluster=self.log_prob_is_exact)
        finally:
            self.aux.train(was_training)
        targets = self.aux.cluster_table().position[tokens] if self.log_prob_is_exact else tokens
        lp_fine = token_log_probs(logits, targets).sum(-1)
        return lp_coarse + lp_fine

    def save_pretrained(self, directory, training_config: dict | None = None, metrics: dict | None = None) -> Path:
        """Write the pipeline (ar/, aux/, tokenizer/, the coarse map, pipeline.json) and its model card
        (README.md: Hub metadata, and `training_config` and `metrics` when the run recorded them; a
        loaded pipeline keeps those of the card it was loaded with)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in self.models:
            getattr(self, name).save_pretrained(str(directory / name))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(directory / "tokenizer"))
        self.coarse_map.save(directory / COARSE_MAP_FILE)
        self._write_json(directory, {"coarse_map_fingerprint": self.coarse_map.fingerprint,
                                     "codebook_fingerprint": self.coarse_map.codebook_fingerprint,
                                     "num_coarse": self.coarse_map.num_coarse, "vocab_size": self.coarse_map.vocab_size})
        card = self.model_card
        write_model_card(directory, training_config or card.get("training_config"), metrics or card.get("metrics"))
        return directory

    @classmethod
    def from_pretrained(cls, directory, map_location="cpu", revision: str | None = None) -> "CTFPipeline":
        """Load a saved CTF pipeline: a directory, a `ctfgen pipeline` run's root, or a Hub repo id
        (`org/name`, fetched through huggingface_hub's cache; `revision` picks a branch, tag or commit)."""
        directory = pipeline_dir(directory, cls.kind, revision)
        info = cls._read_json(directory, cls.kind)
        cmap = CoarseMap.load(directory / COARSE_MAP_FILE)
        check_parts(f"{directory} is inconsistent", coarse_map=cmap, **{"pipeline.json": {
            "coarse_map_fingerprint": info.get("coarse_map_fingerprint"), "codebook_fingerprint": info.get("codebook_fingerprint")}})
        ar = GPT.from_pretrained(str(directory / "ar"), map_location=map_location)
        aux = AuxModel.from_pretrained(str(directory / "aux"), map_location=map_location)
        tok = cls._load_tokenizer(directory, info, map_location)
        pipe = cls(ar, aux, cmap, tok, sampling_defaults=info.get("sampling_defaults"))
        pipe.model_card = read_model_card(directory)
        return pipe

    def __repr__(self) -> str:
        return (f"CTFPipeline(classes={self.num_classes}, image_tokens={self.image_tokens}, "
                f"coarse {self.coarse_map.num_coarse} -> fine {self.coarse_map.vocab_size}, "
                f"tokenizer={'yes' if self.tokenizer is not None else 'no'}, device={self.device})")


class ARPipeline(_Pipeline):
    """The vanilla LlamaGen baseline: one GPT over the fine vocabulary, same interface as CTFPipeline."""

    kind = "baseline"
    models = ("gpt",)
    _defaults = BASELINE_DEFAULTS

    def __init__(self, gpt, tokenizer=None, sampling_defaults: dict | None = None):
        self.gpt, self.tokenizer = gpt, tokenizer
        cfg = gpt.config
        if cfg.coarse_map_fingerprint is not None:
            raise MismatchError(f"the GPT was trained on coarse labels (coarse_map_fingerprint {cfg.coarse_map_fingerprint!r}); "
                                "it is a CTF stage-1 model, use CTFPipeline")
        check_parts("ARPipeline parts do not belong together", baseline=cfg, tokenizer=tokenizer)
        self._set_sampling_defaults(sampling_defaults)
        self.last_timings: dict = {}
        self.model_card: dict = {}  # training_config and metrics of the card it was loaded with (hub.read_model_card)
        self.eval()

    @property
    def num_classes(self) -> int:
        return self.gpt.config.num_classes

    @property
    def image_tokens(self) -> int:
        return self.gpt.config.image_tokens

    log_prob_is_exact = True

    @property
    def sampling_limits(self) -> dict:
        return {"top_k": self.gpt.config.vocab_size, "cfg_steps": self.image_tokens}

    @torch.no_grad()
    def sample_tokens(self, labels, cfg_scale=None, temperature=None, top_k=None, top_p=None, cfg_steps=None,
                      generator=None, dtype=None) -> torch.Tensor:
        """(B, image_tokens) int64 tokens; options left as None take `sampling_defaults`
        (cfg_scale 2.0, temperature 1.0, top_k 0, top_p 1.0, guidance on every step).
        `dtype` as in `CTFPipeline.sample_tokens`."""
        o = self.resolve_sampling(dict(cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                               cfg_steps=cfg_steps))
        device = self.device
        labels = check_labels(labels, self.num_classes, device)
        _sync(device)
        t0 = time.perf_counter()
        tokens = generate(self.gpt, labels, generator=as_generator(generator, device), dtype=dtype, **o)
        _sync(device)
        t = time.perf_counter() - t0
        self.last_timings = {"stage1": t, "decode": 0.0, "total": t}  # one stage: no stage-2 entry
        return tokens

    @torch.no_grad()
    def log_prob(self, tokens, labels) -> torch.Tensor:
        """(B,) float64 exact log p(tokens | label) in nats per image."""
        device = self.device
        tokens = _flat_tokens(tokens, self.image_tokens, device)
        return ar_log_prob(self.gpt, tokens, check_labels(labels, self.num_classes, device)).to(torch.float64)

    def save_pretrained(self, directory, training_config: dict | None = None, metrics: dict | None = None) -> Path:
        """Write the pipeline (gpt/, tokenizer/, pipeline.json) and its model card, as CTFPipeline does."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in self.models:
            getattr(self, name).save_pretrained(str(directory / name))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(directory / "tokenizer"))
        self._write_json(directory, {"codebook_fingerprint": self.gpt.config.codebook_fingerprint
                                     or (self.tokenizer.fingerprint if self.tokenizer is not None else None),
                                     "vocab_size": self.gpt.config.vocab_size})
        card = self.model_card
        write_model_card(directory, training_config or card.get("training_config"), metrics or card.get("metrics"))
        return directory

    @classmethod
    def from_pretrained(cls, directory, map_location="cpu", revision: str | None = None) -> "ARPipeline":
        """Load a saved baseline: a directory, a run's root (its baseline/), or a Hub repo id."""
        directory = pipeline_dir(directory, cls.kind, revision)
        info = cls._read_json(directory, cls.kind)
        gpt = GPT.from_pretrained(str(directory / "gpt"), map_location=map_location)
        tok = cls._load_tokenizer(directory, info, map_location)
        check_parts(f"{directory} is inconsistent", tokenizer=tok,
                    **{"pipeline.json": {"codebook_fingerprint": info.get("codebook_fingerprint")}})
        pipe = cls(gpt, tok, sampling_defaults=info.get("sampling_defaults"))
        pipe.model_card = read_model_card(directory)
        return pipe

    def __repr__(self) -> str:
        return (f"ARPipeline(classes={self.num_classes}, image_tokens={self.image_tokens}, "
                f"vocab {self.gpt.config.vocab_size}, tokenizer={'yes' if self.tokenizer is not None else 'no'}, "
                f"device={self.device})")


def _read_pipeline_json(directory: Path) -> dict:
    path = Path(directory) / PIPELINE_FILE
    if not path.is_file():
        raise MissingFileError(f"{path} not found: {directory} is not a saved pipeline "
                                "(written by CTFPipeline/ARPipeline.save_pretrained or `ctfgen pipeline`)")
    info = read_json(path, "save the pipeline again")
    try:
        version = int(info.get("format_version", 0))
    except (TypeError, ValueError, OverflowError):
        raise CorruptFileError(f"{path} has format_version {info['format_version']!r}, not a number; "
                               "save the pipeline again") from None
    if version > FORMAT_VERSION:
        raise MismatchError(f"{path} was written by a newer ctfgen (format {info['format_version']}); upgrade ctfgen")
    if not isinstance(info.get("sampling_defaults") or {}, dict):
        raise CorruptFileError(f"{path} has sampling_defaults {info['sampling_defaults']!r}, not an object of "
                               "sampling options; save the pipeline again")
    return info


def pipeline_dir(spec, kind: str | None = None, revision: str | None = None) -> Path:
    """The local directory of a saved pipeline named by `spec`: a directory; the root of a `ctfgen
    pipeline` run (itself the CTF pipeline, or its `kind` sub-directory ctf/ or baseline/); or a
    Hugging Face Hub repo id `org/name`, fetched through huggingface_hub (its cache and HF_HUB_OFFLINE)."""
    path = Path(spec)
    if not path.is_dir():
        return download_snapshot(str(spec), revision) if is_repo_id(spec) else path
    subs = [kind] if kind else ["ctf", "baseline"]
    if (path / PIPELINE_FILE).is_file():
        if kind is None or _read_pipeline_json(path).get("type") == kind:
            return path
    for sub in subs:  # a run's root: its pipelines are ctf/ and baseline/
        if (path / sub / PIPELINE_FILE).is_file():
            return path / sub
    return path


def load_pipeline(directory, map_location="cpu", revision: str | None = None):
    """Load whichever pipeline `directory` holds (pipeline.json "type": "ctf" or "baseline"):
    a directory, a run's root, or a Hub repo id (see `pipeline_dir`)."""
    directory = pipeline_dir(directory, revision=revision)
    info = _read_pipeline_json(directory)
    kinds = {"ctf": CTFPipeline, "baseline": ARPipeline}
    if info.get("type") not in kinds:
        raise MismatchError(f"{directory}/{PIPELINE_FILE} has unknown type {info.get('type')!r}; expected one of {list(kinds)}")
    return kinds[info["type"]].from_pretrained(directory, map_location=map_location)
