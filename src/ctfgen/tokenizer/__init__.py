"""The VQ image tokenizer: LlamaGen's architecture, checkpoint loading, losses and training."""

from pathlib import Path

from ctfgen.tokenizer.llamagen import load_llamagen_vq
from ctfgen.tokenizer.vq import VQConfig, VQModel

__all__ = ["VQConfig", "VQModel", "load_llamagen_vq", "load_tokenizer"]


def load_tokenizer(path) -> VQModel:
    """A VQModel from a saved directory (save_pretrained form) or a LlamaGen VQ checkpoint file
    (e.g. vq_ds16_c2i.pt, the paper's VQ-16)."""
    path = Path(path)
    if path.is_file():
        return load_llamagen_vq(str(path))
    return VQModel.from_pretrained(str(path))
