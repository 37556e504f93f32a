"""Saving and loading ctfgen models as `config.json` + `model.safetensors` directories.

`HubMixin` is huggingface_hub's `PyTorchModelHubMixin` with two changes that matter to us:
loading is strict (a half-loaded model is the worst outcome for a user) and never falls back
to unpickling a `pytorch_model.bin`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

import torch
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from safetensors.torch import load_file

from ctfgen.errors import CorruptFileError, MismatchError

SAFETENSORS_FILE = "model.safetensors"


class StateDictMismatch(MismatchError):
    """A checkpoint does not fit the model it is loaded into."""


def check_state_dict(
    model_state: Mapping[str, torch.Tensor],
    loaded: Mapping[str, torch.Tensor],
    ignore: Iterable[str] = (),
    source: str = "checkpoint",
) -> None:
    """Raise `StateDictMismatch` naming every missing, unexpected or mis-shaped tensor."""
    ignore = set(ignore)
    missing = [k for k in model_state if k not in loaded and k not in ignore]
    unexpected = [k for k in loaded if k not in model_state and k not in ignore]
    wrong = [
        f"  {k}: {source} has {tuple(loaded[k].shape)}, model expects {tuple(model_state[k].shape)}"
        for k in model_state
        if k in loaded and tuple(loaded[k].shape) != tuple(model_state[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing from {source} ({len(missing)}): " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
    if unexpected:
        problems.append(f"unexpected in {source} ({len(unexpected)}): " + ", ".join(unexpected[:20]) + (" ..." if len(unexpected) > 20 else ""))
    if wrong:
        problems.append("shape mismatch:\n" + "\n".join(wrong))
    if problems:
        raise StateDictMismatch(
            f"{source} does not match the model:\n" + "\n".join(problems)
            + "\nCheck that the checkpoint and the model configuration (preset, vocabulary, grid size, classes) agree."
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


class HubMixin(PyTorchModelHubMixin):
    """`save_pretrained(dir)` / `from_pretrained(dir)` with strict, safetensors-only loading."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        path = str(pretrained_model_name_or_path)
        if not os.path.isdir(path) and (os.sep in path or path.startswith(".") or os.path.exists(path)):
            # A local path that is not there: say so, rather than trying it as a Hub repo id.
            raise FileNotFoundError(
                f"{path} is not a directory: expected a saved {cls.__name__} "
                f"(config.json and {SAFETENSORS_FILE}, as written by save_pretrained)"
            )
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
                raise FileNotFoundError(
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
