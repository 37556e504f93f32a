"""Load LlamaGen class-conditional GPT checkpoints (c2i_B_256.pt, ...) into `GPT`."""

from __future__ import annotations

import math
import re
from typing import Mapping

import torch

from ctfgen.errors import ConfigError
from ctfgen.hub import check_state_dict, llamagen_file_error, load_state_dict_strict, read_llamagen_checkpoint
from ctfgen.models.transformer import GPT, GPT_PRESETS, GPTConfig

# Saved by some LlamaGen versions or training wrappers; they hold no weights.
_NON_PARAMETER = re.compile(r"^(freqs_cis|causal_mask|layers\.\d+\.attention\.kv_cache\.(k_cache|v_cache))$")
_WRAPPER_KEYS = ("model", "module", "state_dict")
_PREFIXES = ("_orig_mod.", "module.")


EXAMPLE = "c2i_B_256.pt"


def extract_state_dict(ckpt: Mapping, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensors of a LlamaGen checkpoint: under "model", "module", "state_dict", or bare (FSDP),
    with torch.compile / DDP prefixes stripped and known non-parameter buffers dropped."""
    if not isinstance(ckpt, Mapping):
        raise llamagen_file_error(source, "GPT", EXAMPLE, f"it holds a {type(ckpt).__name__}, not a dict of tensors")
    for key in _WRAPPER_KEYS:
        if key in ckpt and isinstance(ckpt[key], Mapping):
            ckpt = ckpt[key]
            break
    state = {}
    for name, value in ckpt.items():
        if not isinstance(value, torch.Tensor):
            raise llamagen_file_error(source, "GPT", EXAMPLE, f"entry {name!r} is a {type(value).__name__}, not a "
                                      f"tensor; expected tensors under one of {_WRAPPER_KEYS} or a bare state dict")
        for prefix in _PREFIXES:
            while name.startswith(prefix):
                name = name[len(prefix):]
        if _NON_PARAMETER.match(name):
            continue
        state[name] = value
    return state


def load_llamagen_gpt(path, preset: str = "GPT-B", image_tokens: int = 256, num_classes: int = 1000, **overrides) -> GPT:
    """Load a LlamaGen c2i GPT checkpoint strictly.

    `preset` gives depth/heads/width (heads cannot be read from the tensors); the vocabulary is
    read from `tok_embeddings.weight`; `image_tokens` is the grid (256 for 256px VQ-16, 576 for
    384px). A missing, unexpected or mis-shaped tensor raises `StateDictMismatch` naming it.
    The model is returned in eval mode, in the checkpoint's dtype.
    """
    if preset not in GPT_PRESETS:
        raise KeyError(f"unknown GPT preset {preset!r}; choose one of {', '.join(GPT_PRESETS)}")
    side = math.isqrt(image_tokens)
    if side * side != image_tokens:
        raise ConfigError(f"image_tokens={image_tokens} is not a square grid (256 for 256px, 576 for 384px with VQ-16)")
    source = str(path)
    state = extract_state_dict(read_llamagen_checkpoint(path, "GPT", EXAMPLE), source)
    if "tok_embeddings.weight" not in state:
        vq = any(k.startswith(("encoder.", "quantize.")) or k.startswith("model.encoder.") for k in state)
        raise llamagen_file_error(source, "GPT", EXAMPLE, "it has no tok_embeddings.weight" +
                                  ("; it looks like a VQ tokenizer, load it with ctfgen.load_llamagen_vq" if vq else ""))
    vocab_size = state["tok_embeddings.weight"].shape[0]
    config = GPTConfig.from_preset(preset, vocab_size=vocab_size, image_tokens=image_tokens, num_classes=num_classes, **overrides)
    with torch.device("meta"):
        model = GPT(config)
    # shapes first on the meta model, so a wrong preset fails before allocating anything
    check_state_dict(model.state_dict(), state, source=source)
    model = model.to_empty(device="cpu")
    model.freqs_cis = model._make_freqs()
    dtype = state["tok_embeddings.weight"].dtype
    model = model.to(dtype)
    load_state_dict_strict(model, state, source=source)
    return model.eval()
