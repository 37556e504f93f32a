"""Saving and loading ctfgen models: local directories, the Hugging Face Hub, model cards, checkpoints.

`HubMixin` is huggingface_hub's `PyTorchModelHubMixin` with two changes that matter to us:
loading is strict (a half-loaded model is the worst outcome for a user) and never falls back
to unpickling a `pytorch_model.bin`.

A pipeline is named by a local directory or a Hub repo id (`org/name`). Repo ids are fetched with
`huggingface_hub.snapshot_download`, so its cache (`HF_HUB_CACHE`), `HF_HUB_OFFLINE` and tokens
apply as for any Hub library; only `*.json`, `*.safetensors` and `*.md` files are fetched, since
ctfgen never unpickles. `save_pretrained` writes a model card (README.md with Hub metadata) beside
the weights, and LlamaGen's released `.pt` checkpoints are read by `read_llamagen_checkpoint`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch
import yaml
from huggingface_hub import (
    ModelCard,
    ModelCardData,
    PyTorchModelHubMixin,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from safetensors.torch import load_file, save_model

from ctfgen import __version__
from ctfgen.utils.errors import ConfigError, CorruptFileError, MismatchError, MissingFileError
from ctfgen.utils.fileio import atomic_save, atomic_save_safetensors, atomic_write_text, read_json

SAFETENSORS_FILE = "model.safetensors"
MODEL_CARD_FILE = "README.md"
PAPER = "2503.16194"   # Coarse-to-fine token prediction (CTF), arXiv
LLAMAGEN_REPO = "FoundationVision/LlamaGen"   # where LlamaGen's released checkpoints are published


# What a floating-point weight may be stored as: it loads into the model's own dtype (load_state_dict
# copies, which casts). Other tensors (integer buffers) must be stored in their own dtype.
STORED_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# What from_pretrained takes from huggingface_hub's signature for a download, besides the revision.
HUB_DOWNLOAD_OPTIONS = ("cache_dir", "token", "force_download", "local_files_only")


class StateDictMismatch(MismatchError):
    """A checkpoint does not fit the model it is loaded into."""


def _loads_into(stored: torch.dtype, expected: torch.dtype) -> bool:
    return stored == expected or (expected.is_floating_point and stored in STORED_FLOAT_DTYPES)


def check_state_dict(
    model_state: Mapping[str, torch.Tensor],
    loaded: Mapping[str, torch.Tensor],
    ignore: Iterable[str] = (),
    source: str = "checkpoint",
) -> None:
    """Raise `StateDictMismatch` naming every missing, unexpected, mis-shaped or unsupported-dtype
    tensor (a floating-point weight may be stored as float32, float16 or bfloat16); names in `ignore`
    are not checked at all."""
    ignore = set(ignore)
    missing = [k for k in model_state if k not in loaded and k not in ignore]
    unexpected = [k for k in loaded if k not in model_state and k not in ignore]
    wrong = [
        f"  {k}: {source} has {tuple(loaded[k].shape)}, model expects {tuple(model_state[k].shape)}"
        for k in model_state
        if k in loaded and k not in ignore and tuple(loaded[k].shape) != tuple(model_state[k].shape)
    ]
    bad_dtype = [
        f"  {k}: {source} stores {str(loaded[k].dtype).removeprefix('torch.')}, model expects "
        f"{str(model_state[k].dtype).removeprefix('torch.')}"
        for k in model_state
        if k in loaded and k not in ignore and not _loads_into(loaded[k].dtype, model_state[k].dtype)
    ]
    problems = []
    if missing:
        problems.append(f"missing from {source} ({len(missing)}): " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
    if unexpected:
        problems.append(f"unexpected in {source} ({len(unexpected)}): " + ", ".join(unexpected[:20]) + (" ..." if len(unexpected) > 20 else ""))
    if wrong:
        problems.append("shape mismatch:\n" + "\n".join(wrong))
    if bad_dtype:
        problems.append("unsupported dtype (floating-point weights load from float32, float16 or bfloat16; other "
                        "tensors need their own dtype):\n" + "\n".join(bad_dtype))
    if problems:
        raise StateDictMismatch(
            f"{source} does not match the model:\n" + "\n".join(problems)
            + ("\nCheck that the checkpoint and the model configuration (preset, vocabulary, grid size, classes) agree."
               if missing or unexpected or wrong else "\nSave the weights again in a supported dtype.")
        )


def load_state_dict_strict(
    model: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    ignore: Iterable[str] = (),
    source: str = "checkpoint",
) -> torch.nn.Module:
    """Check every name and shape first, so the error lists all problems at once, then load."""
    ignore = set(ignore)
    check_state_dict(model.state_dict(), state_dict, ignore, source)
    model.load_state_dict({k: v for k, v in state_dict.items() if k not in ignore}, strict=not ignore)
    return model


def save_weights(model: torch.nn.Module, path, parameters_dtype: torch.dtype = torch.float32) -> Path:
    """Write `model`'s state dict to `path` (safetensors) with its floating-point parameters stored
    in `parameters_dtype`; buffers and integer tensors stay as they are. `from_pretrained` loads
    them back into the model's own (float32) parameters."""
    params = {name for name, _ in model.named_parameters()}
    state = {k: (v.to(parameters_dtype) if k in params and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in model.state_dict().items()}
    return atomic_save_safetensors(state, path)


class HubMixin(PyTorchModelHubMixin):
    """`save_pretrained(dir)` / `from_pretrained(dir)` with strict, safetensors-only loading."""

    def _save_pretrained(self, save_directory: Path) -> None:
        # huggingface_hub writes the weights and config.json in place, where a killed run leaves half a file;
        # these are its bytes, through fileio. config.json written here is one save_pretrained leaves as it is.
        model = self.module if hasattr(self, "module") else self
        atomic_save(lambda tmp: save_model(model, str(tmp)), Path(save_directory) / SAFETENSORS_FILE)
        config = self._hub_mixin_config
        if config is not None:
            config = asdict(config) if is_dataclass(config) else config
            text = json.dumps(config, sort_keys=True, indent=2)
            atomic_write_text(Path(save_directory) / constants.CONFIG_NAME, text)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        path = str(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            if os.path.exists(path) or not is_repo_id(path):
                # A local path that is not there: say so, rather than trying it as a Hub repo id.
                raise MissingFileError(
                    f"{path} is not a directory: expected a saved {cls.__name__} "
                    f"(config.json and {SAFETENSORS_FILE}, as written by save_pretrained)"
                )
            # `org/name` (which holds os.sep, as every repo id does): fetched as the pipelines are, with the
            # download options huggingface_hub's from_pretrained takes (a token, a cache, offline)
            hub = {k: kwargs[k] for k in HUB_DOWNLOAD_OPTIONS if kwargs.get(k) is not None}
            path = pretrained_model_name_or_path = str(download_snapshot(path, kwargs.get("revision"), **hub))
        config = Path(path) / constants.CONFIG_NAME
        if config.is_file():  # huggingface_hub reads any JSON, and a list or null in it was an AttributeError
            read_json(config, f"save the {cls.__name__} again (save_pretrained)")
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except (ValueError, TypeError, UnicodeDecodeError) as e:
            if isinstance(e, MismatchError):
                raise
            raise CorruptFileError(f"{path} is not a readable saved {cls.__name__} (config.json and "
                                   f"{SAFETENSORS_FILE}): {e}") from None

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision=None,
        cache_dir=None,
        force_download: bool = False,
        local_files_only: bool = False,
        token=None,
        map_location: str = "cpu",
        strict: bool = True,
        **model_kwargs,
    ):
        if os.path.isdir(model_id):
            model_file = Path(model_id) / SAFETENSORS_FILE
            if not model_file.is_file():
                raise MissingFileError(
                    f"{model_file} not found: {model_id} is not a saved {cls.__name__} "
                    f"(expected config.json and {SAFETENSORS_FILE}, as written by save_pretrained)."
                )
        else:
            model_file = hf_hub_download(
                repo_id=model_id, filename=SAFETENSORS_FILE, revision=revision, cache_dir=cache_dir,
                force_download=force_download, token=token, local_files_only=local_files_only,
            )
        model = cls(**model_kwargs)
        try:
            state = load_file(str(model_file), device=str(map_location))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise CorruptFileError(f"{model_file} cannot be read as safetensors ({e}); save the model again") from None
        if strict:
            load_state_dict_strict(model, state, source=str(model_file))
        else:  # only reachable by asking for it explicitly
            model.load_state_dict(state, strict=False)
        return model


# --- pipelines by Hub repo id ----------------------------------------------------------------------

def is_repo_id(spec) -> bool:
    """`org/name` as the Hub spells repo ids; paths (./x, /x, a/b/c, ~/x) are not."""
    text = str(spec)
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) or ".." in text:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def download_snapshot(repo_id: str, revision: str | None = None, **options) -> Path:
    """The local folder of a Hub repo's safetensors, JSON and model card, through huggingface_hub
    (its cache, HF_HUB_OFFLINE and token apply; `options`: snapshot_download's HUB_DOWNLOAD_OPTIONS).
    Errors are one line that says what to do."""
    where = f"{repo_id!r} is not a local directory"
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.md"],
                                      library_name="ctfgen", library_version=__version__, **options))
    except LocalEntryNotFoundError:
        offline = " and HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else ""
        cache = options.get("cache_dir") or constants.HF_HUB_CACHE
        raise ConfigError(f"{where}, and as a Hugging Face Hub repo it is not in the cache ({cache})"
                          f"{offline}: download it once with network access, or pass a local directory") from None
    except RevisionNotFoundError:
        raise ConfigError(f"{where}; the Hub repo has no revision {revision!r}") from None
    except GatedRepoError:
        raise ConfigError(f"{where}; the Hub repo is gated: accept its terms on huggingface.co and log in "
                          "(`hf auth login`)") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{where}, nor a Hugging Face Hub repo that this account can see (for a private repo, "
                          "log in with `hf auth login`)") from None
    except (HfHubHTTPError, OSError) as e:
        raise ConfigError(f"{where}, and fetching it from the Hugging Face Hub failed: {str(e).splitlines()[0]}") from None


# --- model cards -----------------------------------------------------------------------------------

def _card_body(info: dict, training_config: dict | None, metrics: dict | None) -> str:
    kind = info.get("type")
    title = "CTF (coarse-to-fine token prediction)" if kind == "ctf" else "Autoregressive baseline (LlamaGen GPT)"
    if kind == "ctf":
        method = (f"Class-conditional image generation with **coarse-to-fine token prediction** "
                  f"([arXiv {PAPER}](https://arxiv.org/abs/{PAPER})) on LlamaGen: stage 1, a GPT, samples "
                  f"{info.get('image_tokens')} coarse labels ({info.get('num_coarse')} k-means clusters of the "
                  f"{info.get('vocab_size')}-word codebook) autoregressively; stage 2, a bidirectional auxiliary "
                  "model, picks every fine token in one pass; the VQ tokenizer decodes them.")
    else:
        method = (f"The vanilla autoregressive baseline of [arXiv {PAPER}](https://arxiv.org/abs/{PAPER}): a "
                  f"LlamaGen GPT that samples {info.get('image_tokens')} tokens of a {info.get('vocab_size')}-word "
                  "codebook one at a time.")
    lines = [f"# {title}", "", method, "", "## Use", "", "```python", "import ctfgen",
             'pipe = ctfgen.load_pipeline("REPO_OR_DIR")          # a Hub repo id or this directory',
             f"images = pipe.sample([0] * 8, generator=0)          # (8, C, H, W) in [-1, 1]; {info.get('num_classes')} classes",
             "```", "", "```bash", "ctfgen sample --model REPO_OR_DIR --class 0 --n 16 --out samples.png", "```", "",
             "## Model", "", "| | |", "|---|---|"]
    facts = {"pipeline": kind, "classes": info.get("num_classes"), "image tokens": info.get("image_tokens"),
             "codebook": info.get("vocab_size"), "coarse labels": info.get("num_coarse"),
             "tokenizer included": info.get("has_tokenizer"), "parameters stored as": info.get("weights_dtype")}
    lines += [f"| {k} | {v} |" for k, v in facts.items() if v is not None]
    if info.get("weights_dtype") not in (None, "float32"):
        lines += ["", f"The models' parameters are stored in {info['weights_dtype']}, rounded from the float32 weights "
                  "the run trained, and load as float32; the tokenizer's stay float32."
                  + (" The metrics below were measured before the rounding." if metrics else "")]
    lines += ["", "Sampling defaults: " + ", ".join(f"`{k}={v}`" for k, v in (info.get("sampling_defaults") or {}).items())]
    if metrics:
        lines += ["", "## Metrics recorded by the run", "", "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in _flatten(metrics).items()]
    if training_config:
        lines += ["", "## Training config", "", "```yaml", yaml.safe_dump(training_config, sort_keys=False).rstrip(), "```"]
    lines += ["", "## Citation", "", f"Coarse-to-fine token prediction: [arXiv {PAPER}](https://arxiv.org/abs/{PAPER}). "
              "LlamaGen: [arXiv 2406.06525](https://arxiv.org/abs/2406.06525).", ""]
    return "\n".join(lines)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif v is not None:
            out[f"{prefix}{k}"] = v
    return out


def write_model_card(directory, training_config: dict | None = None, metrics: dict | None = None) -> Path:
    """README.md beside a saved pipeline: Hub metadata (library, tags, the paper, the training config
    and the run's metrics) and a human-readable card. Reads the directory's pipeline.json."""
    directory = Path(directory)
    info = read_json(directory / "pipeline.json", "save the pipeline again (save_pretrained)")
    kind = info.get("type")
    # plain JSON types only, so the YAML front matter reads back as written
    training_config = json.loads(json.dumps(training_config, default=str)) if training_config else None
    metrics = json.loads(json.dumps(metrics, default=str)) if metrics else None
    data = ModelCardData(
        library_name="ctfgen",
        tags=["ctfgen", "image-generation", "class-conditional", "autoregressive", "llamagen",
              *(["coarse-to-fine"] if kind == "ctf" else ["baseline"]), f"arxiv:{PAPER}"],
        ctfgen={"pipeline": kind, "paper": f"https://arxiv.org/abs/{PAPER}",
                **({"training_config": training_config} if training_config else {}),
                **({"metrics": metrics} if metrics else {})},
    )
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_card_body(info, training_config, metrics)}")
    return atomic_write_text(directory / MODEL_CARD_FILE, str(card))


def read_model_card(directory) -> dict:
    """The training config and metrics a saved pipeline's model card records ({} when it has none), so
    a pipeline saved again keeps them."""
    path = Path(directory) / MODEL_CARD_FILE
    if not path.is_file():
        return {}
    lines = path.read_text(errors="replace").splitlines()
    # The front matter runs from a first line `---` to the next line that is exactly `---`; a `---` inside a
    # value (a run name, a path) is no end of it.
    if not lines or lines[0].rstrip() != "---" or "---" not in lines[1:]:
        return {}
    try:
        meta = yaml.safe_load("\n".join(lines[1:lines.index("---", 1)])) or {}
    except yaml.YAMLError:
        return {}
    recorded = meta.get("ctfgen") if isinstance(meta, dict) else None
    if not isinstance(recorded, dict):
        return {}
    return {k: recorded[k] for k in ("training_config", "metrics") if isinstance(recorded.get(k), dict)}


# --- LlamaGen checkpoints --------------------------------------------------------------------------

def llamagen_file_error(path, kind: str, example: str, reason: str | None = None) -> ConfigError:
    """The one message for a LlamaGen checkpoint that is missing (`reason` None) or is not one."""
    where = (f"LlamaGen's checkpoints are published on the Hugging Face Hub in {LLAMAGEN_REPO} "
             f"(e.g. huggingface_hub.hf_hub_download({LLAMAGEN_REPO!r}, {example!r}))")
    if reason is None:
        return ConfigError(f"{path} does not exist: expected a LlamaGen {kind} checkpoint such as {example}. {where}")
    return ConfigError(f"{path} is not a LlamaGen {kind} checkpoint ({reason}); expected a file such as {example}. "
                       f"{where}")


def read_llamagen_checkpoint(path, kind: str, example: str):
    """torch.load of a LlamaGen `.pt` file, tensors only (weights_only; LlamaGen's argparse.Namespace
    of training arguments is the one plain-data class allowed)."""
    source = os.fspath(path)
    if not os.path.exists(source):
        raise llamagen_file_error(source, kind, example)
    if not os.path.isfile(source):
        raise llamagen_file_error(source, kind, example, "it is a directory")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for a file that is not a checkpoint
        text = str(e).strip()
        if "Unsupported global" in text:
            reason = "it holds Python objects other than tensors, which ctfgen never unpickles"
        else:  # torch's own detail, without its advice to unpickle untrusted code
            detail = text.split("WeightsUnpickler error:", 1)[-1].strip() if text else type(e).__name__
            reason = f"torch.load failed: {detail.splitlines()[0][:200]}"
        raise llamagen_file_error(source, kind, example, reason) from None
