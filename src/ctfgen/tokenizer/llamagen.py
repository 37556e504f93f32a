"""Load LlamaGen VQ checkpoints (`vq_ds16_c2i.pt`, `vq_ds8_c2i.pt`, or any LlamaGen VQ) as a VQModel.

    >>> vq = load_llamagen_vq("vq_ds16_c2i.pt")              # config inferred from the tensors
    >>> vq.config.encoder_ch_mult, vq.grid_size(256)
    ((1, 1, 2, 2, 4), 16)

Nothing is taken on trust: every tensor name and shape is checked against the model built from the
inferred configuration, and any missing, unexpected or mis-shaped tensor is an error that names it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch

from ctfgen.tokenizer.vq import VQConfig, VQModel
from ctfgen.utils.hub import StateDictMismatch, check_state_dict, llamagen_file_error, read_llamagen_checkpoint

__all__ = ["load_llamagen_vq", "infer_vq_config", "read_llamagen_vq_state"]

# Buffers LlamaGen saves that carry no weights.
IGNORED = ("quantize.codebook_used",)
EXAMPLE = "vq_ds16_c2i.pt"


def read_llamagen_vq_state(path_or_checkpoint, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The VQ state dict from a LlamaGen checkpoint file (or an already loaded checkpoint dict).

    LlamaGen keeps the weights under "model" and an EMA copy under "ema"; a bare state dict (as
    written by `VQModel.llamagen_state_dict`) is accepted too.
    """
    source = "checkpoint"
    if isinstance(path_or_checkpoint, (str, os.PathLike)):
        source = os.fspath(path_or_checkpoint)
        ckpt = read_llamagen_checkpoint(source, "VQ", EXAMPLE)
    else:
        ckpt = path_or_checkpoint
    if not isinstance(ckpt, Mapping):
        raise llamagen_file_error(source, "VQ", EXAMPLE, f"it holds a {type(ckpt).__name__}, not a dict of tensors")
    key = "ema" if use_ema else "model"
    if key in ckpt:
        sd = ckpt[key]
    elif not use_ema and "encoder.conv_in.weight" in ckpt:
        sd = ckpt
    else:
        hint = "; load without use_ema to get the training weights" if use_ema and "model" in ckpt else ""
        raise llamagen_file_error(source, "VQ", EXAMPLE, f"it has no {key!r} entry (it has: "
                                  f"{', '.join(map(str, list(ckpt.keys())[:10]))}){hint}")
    if not isinstance(sd, Mapping):
        raise llamagen_file_error(source, "VQ", EXAMPLE, f"its {key!r} entry is a {type(sd).__name__}, not a state dict")
    # Checkpoints saved from a DDP-wrapped model prefix every name with "module.".
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if "encoder.conv_in.weight" not in sd:
        gpt = "tok_embeddings.weight" in sd or any(k.startswith("layers.") for k in sd)
        raise llamagen_file_error(source, "VQ", EXAMPLE, "it has no encoder.conv_in.weight" +
                                  ("; it looks like a GPT, load it with ctfgen.load_llamagen_gpt" if gpt else ""))
    return dict(sd)


def _level_indices(sd: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := pat.match(k))})


def _shape(sd: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    if name not in sd:
        raise StateDictMismatch(f"cannot infer the VQ configuration: the checkpoint has no tensor {name!r}")
    return tuple(sd[name].shape)


def infer_vq_config(sd: Mapping[str, torch.Tensor], **overrides) -> VQConfig:
    """VQConfig from tensor names and shapes. Values the tensors cannot tell (codebook_l2_norm,
    norm_groups, loss weights) take LlamaGen's defaults unless given in `overrides`."""
    conv_in = _shape(sd, "encoder.conv_in.weight")
    base_ch, in_channels = conv_in[0], conv_in[1]
    enc_levels = _level_indices(sd, "encoder.conv_blocks.")
    dec_levels = _level_indices(sd, "decoder.conv_blocks.")
    if not enc_levels or enc_levels != list(range(len(enc_levels))):
        raise StateDictMismatch(f"cannot infer the VQ configuration: encoder levels {enc_levels} are not 0..n-1")
    if dec_levels != list(range(len(dec_levels))):
        raise StateDictMismatch(f"cannot infer the VQ configuration: decoder levels {dec_levels} are not 0..n-1")

    def mult(width: int, name: str) -> int:
        if width % base_ch:
            raise StateDictMismatch(f"{name} has {width} channels, not a multiple of the base width {base_ch}")
        return width // base_ch

    enc_mult = tuple(mult(_shape(sd, f"encoder.conv_blocks.{i}.res.0.conv1.weight")[0],
                          f"encoder.conv_blocks.{i}.res.0.conv1.weight") for i in enc_levels)
    # The decoder runs from the lowest resolution up, so its levels list the multipliers reversed.
    dec_mult = tuple(mult(_shape(sd, f"decoder.conv_blocks.{i}.res.0.conv1.weight")[0],
                          f"decoder.conv_blocks.{i}.res.0.conv1.weight") for i in reversed(dec_levels))
    num_res_blocks = len(_level_indices(sd, "encoder.conv_blocks.0.res."))
    emb = _shape(sd, "quantize.embedding.weight")
    cfg = dict(
        codebook_size=emb[0], codebook_embed_dim=emb[1], encoder_ch_mult=enc_mult, decoder_ch_mult=dec_mult,
        z_channels=_shape(sd, "encoder.conv_out.weight")[0], base_ch=base_ch, num_res_blocks=num_res_blocks,
        in_channels=in_channels,
    )
    cfg.update(overrides)
    return VQConfig(**cfg)


def load_llamagen_vq(path, use_ema: bool = False, **config_overrides) -> VQModel:
    """A VQModel with the weights of a LlamaGen VQ checkpoint (a path, or a loaded checkpoint dict).

    The configuration is inferred from the tensors; `config_overrides` set VQConfig fields the
    tensors cannot tell (e.g. `codebook_l2_norm=False` for a tokenizer trained without it). Loading
    is strict; `quantize.codebook_used` is accepted and ignored. Returns the model in eval mode.
    """
    sd = read_llamagen_vq_state(path, use_ema=use_ema)
    source = f"{os.fspath(path)}[{'ema' if use_ema else 'model'}]" if isinstance(path, (str, os.PathLike)) else "checkpoint"
    config = infer_vq_config(sd, **config_overrides)
    # Build on the meta device and adopt the checkpoint's tensors: no random init of ~70M
    # parameters that would be overwritten at once, and no second copy in memory.
    with torch.device("meta"):
        model = VQModel(config)
    check_state_dict(model.state_dict(), sd, ignore=IGNORED, source=source)
    weights = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in sd.items() if k not in IGNORED}
    # LlamaGen's usage window (floats, zero-initialised) cannot tell used code 0 from an empty slot;
    # start ours empty instead.
    weights["quantize.codebook_used"] = torch.full((config.usage_window,), -1, dtype=torch.int64)
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval()
