"""Stage 1 (`ar`), the auxiliary model (`aux`) and the baseline, trained on extracted codes.

`ar` and `baseline` are one code path: a `GPT` trained by teacher forcing,
`logits = gpt(x[:, :-1], labels)` -> (B, L, V) against `x`, where `x` is the coarse labels of
the codes (ar, V = num_coarse) or the codes themselves (baseline, V = codebook size).
`aux` is an `AuxModel` fed the ground-truth coarse labels, trained with cross entropy on the
fine tokens (with `restrict_to_cluster`, over each position's cluster members only: the exact
-log p(fine | coarse, class) the likelihood uses). Every model records where its vocabulary came
from (fingerprints); parts that do not belong together are refused before training.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ctfgen.clustering import CoarseMap
from ctfgen.compat import check_parts
from ctfgen.config import TrainConfig, from_dict
from ctfgen.data.codes import CodeDataset
from ctfgen.models.transformer import GPT, AuxConfig, AuxModel, GPTConfig, cluster_table
from ctfgen.utils import distributed as D
from ctfgen.utils.errors import ConfigError, MismatchError as StageMismatchError
from ctfgen.utils.fileio import atomic_write_json
from ctfgen.utils.rundir import MODEL_DIR

from . import checkpoint as C
from .loop import TrainResult, train

STAGES = ("ar", "aux", "baseline")
DEFAULT_PRESETS = {"ar": "GPT-B", "aux": "Aux-B", "baseline": "GPT-B"}


class Stage(NamedTuple):
    model: nn.Module  # freshly initialised
    loss_fn: Callable  # loss_fn(model, batch)


def _code_dataset(codes, seed: int = 0):
    return codes if isinstance(codes, CodeDataset) else CodeDataset(codes, seed=seed)


def build_stage(stage: str, codes, coarse_map=None, preset: str | None = None,
                model: dict | None = None, num_classes: int | None = None) -> Stage:
    """The model (freshly initialised) and `loss_fn(model, batch)` of one stage.

    `model` overrides preset fields (dim, dropouts, restrict_to_cluster, ...). Vocabulary, grid
    and fingerprints come from the codes and the map; giving them in `model` with other values
    is an error rather than a silently mis-sized model.
    """
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    dataset = _code_dataset(codes)
    header = dataset.header
    cmap = coarse_map if coarse_map is None or isinstance(coarse_map, CoarseMap) else CoarseMap.load(coarse_map)
    if stage in ("ar", "aux"):
        if cmap is None:
            raise ConfigError(f"stage {stage!r} needs a coarse map (--coarse-map FILE from `ctfgen cluster`)")
        check_parts(f"coarse map and codes ({dataset.dir}) do not belong together", coarse_map=cmap, codes=header,
                    hint="Fit a map on this tokenizer (`ctfgen cluster --tokenizer <dir>`) or use codes of the map's "
                         "tokenizer.")
    elif cmap is not None:
        raise ConfigError("the baseline trains on fine tokens and takes no coarse map; drop --coarse-map")
    seen = int(dataset.labels.max()) + 1 if len(dataset) else 1  # the class labels the codes hold
    num_classes = int(next(n for n in (num_classes, header.get("num_classes"), seen) if n is not None))
    if seen > num_classes:
        raise StageMismatchError(f"the codes hold class labels up to {seen - 1} but the model has "
                                 f"num_classes={num_classes}")

    codebook = int(header["codebook_size"])
    derived = dict(vocab_size=cmap.num_coarse if stage == "ar" else codebook, image_tokens=int(header["image_tokens"]),
                   num_classes=num_classes, codebook_fingerprint=header["tokenizer_fingerprint"],
                   coarse_map_fingerprint=cmap.fingerprint if stage != "baseline" else None,
                   **({"num_coarse": cmap.num_coarse} if stage == "aux" else {}))
    model = model or {}
    clash = [f"{k}={model[k]!r} (the data needs {v!r})" for k, v in derived.items() if k in model and model[k] != v]
    if clash:
        raise StageMismatchError(f"model settings do not fit the {stage} data: " + ", ".join(clash)
                                 + "; leave them out, they are taken from the codes and the coarse map")
    fields = {**model, **derived}
    preset = preset or DEFAULT_PRESETS[stage]
    f2c = cmap.fine_to_coarse if cmap is not None else None
    if stage == "aux":
        net = AuxModel(AuxConfig.from_preset(preset, **fields), coarse_map=cmap)
        # The restricted model's loss is over each position's cluster members only (the same
        # value as the masked full softmax); the target is the token's place in its cluster.
        in_cluster = net.config.restrict_to_cluster
        target_of = cluster_table(f2c, cmap.num_coarse).position if in_cluster else torch.arange(codebook)
    else:
        net = GPT(GPTConfig.from_preset(preset, **fields))

    def loss_fn(m, batch):
        x, y = batch
        if stage == "aux":
            logits, target = m(f2c.to(x.device)[x], y, in_cluster=in_cluster), target_of.to(x.device)[x]
        else:  # ar predicts the coarse labels, the baseline the codes themselves
            target = f2c.to(x.device)[x] if stage == "ar" else x
            logits = m(target[:, :-1], y)  # position i predicts token i (position 0 sees only the class)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))

    return Stage(net, loss_fn)


def parameter_count(stage: str, codes, coarse_map=None, preset: str | None = None, model: dict | None = None) -> int:
    """Parameters of the model `build_stage` would make."""
    st = build_stage(stage, codes, coarse_map if stage != "baseline" else None, preset, model)
    return sum(p.numel() for p in st.model.parameters())


MATCH_TOLERANCE = 0.10  # the matched baseline's parameters are within 10 % of CTF's


def matched_depth(codes, coarse_map, ar: tuple[str, dict], aux: tuple[str, dict],
                  baseline: tuple[str, dict], n_layer: int | None = None) -> dict:
    """The baseline's depth whose parameter count is closest to CTF's (stage 1 + auxiliary model).

    Each of `ar`, `aux`, `baseline` is (preset, model overrides). Returns {"n_layer", "params",
    "ctf_params", "ratio"}; a depth outside MATCH_TOLERANCE is refused, since the comparison it
    exists for would then not be at equal size. A given `n_layer` (the user's own choice) is only
    counted, not searched for or refused.
    """
    ctf = parameter_count("ar", codes, coarse_map, *ar) + parameter_count("aux", codes, coarse_map, *aux)
    preset, model = baseline[0], {k: v for k, v in (baseline[1] or {}).items() if k != "n_layer"}
    count = lambda n: parameter_count("baseline", codes, None, preset, {**model, "n_layer": n})  # noqa: E731
    chosen = n_layer is not None
    if not chosen:  # the count is affine in the depth: rest + n * per_layer
        one, two = count(1), count(2)
        n_layer = max(1, round((ctf - (2 * one - two)) / (two - one)))
    params = count(n_layer)
    ratio = params / ctf
    if not chosen and abs(ratio - 1) > MATCH_TOLERANCE:
        raise ConfigError(f"no depth of the {preset} baseline comes within {MATCH_TOLERANCE:.0%} of CTF's {ctf:,} "
                          f"parameters (closest: {n_layer} layers, {params:,}); set matched.model.dim or n_layer "
                          "yourself")
    return {"n_layer": int(n_layer), "params": int(params), "ctf_params": int(ctf), "ratio": round(ratio, 4)}


def train_stage(stage: str, codes, out_dir, *, coarse_map=None, preset: str | None = None,
                model: dict | None = None, train_config: dict | TrainConfig | None = None,
                num_classes: int | None = None, resume: bool = False, on_epoch_end=None,
                run_config: dict | None = None, desc: str | None = None) -> tuple[nn.Module, TrainResult]:
    """Train one stage on a code directory; the finished model (EMA weights when EMA is on) is
    written to `out_dir/model` (save_pretrained) by rank 0 and returned on every rank (CPU)."""
    tcfg = train_config if isinstance(train_config, TrainConfig) else from_dict(TrainConfig, train_config, "train")
    dataset = _code_dataset(codes, tcfg.seed)  # the seed also picks each item's augmentation
    # The initial weights are a function of the seed alone (and identical on every rank).
    torch.manual_seed(tcfg.seed)
    st = build_stage(stage, dataset, coarse_map, preset, model, num_classes)
    out_dir, model_config = Path(out_dir), asdict(st.model.config)
    # An existing run keeps its own record: a run refused (no --resume, or another model) must leave it as it was,
    # and a resume that goes ahead has the checkpoint's model config, which is the one recorded.
    if D.is_main() and not (C.list_checkpoints(out_dir / "checkpoints") and (out_dir / "stage.json").is_file()):
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / "stage.json", {
            "stage": stage, "preset": preset or DEFAULT_PRESETS[stage],
            "params": sum(p.numel() for p in st.model.parameters()), "codes": str(dataset.dir),
            "model_config": model_config})
    result = train(st.model, st.loss_fn, dataset, tcfg, out_dir, resume=resume, on_epoch_end=on_epoch_end,
                   tokens_per_item=st.model.config.image_tokens, desc=desc or stage, run_config={
                       "stage": stage, "preset": preset, "model": model or {}, "model_config": model_config,
                       **(run_config or {})})
    return result.ship(type(st.model)(st.model.config), out_dir / MODEL_DIR), result


def load_stage_model(stage: str, path) -> nn.Module:
    """A trained stage's model (`RUN/runs/<stage>/model`), eval mode."""
    return (AuxModel if stage == "aux" else GPT).from_pretrained(str(path)).eval()
