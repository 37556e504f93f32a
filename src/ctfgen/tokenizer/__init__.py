"""The VQ image tokenizer: LlamaGen's architecture, checkpoint loading, losses and training."""

from ctfgen.tokenizer.llamagen import load_llamagen_vq
from ctfgen.tokenizer.vq import VQConfig, VQModel

__all__ = ["VQConfig", "VQModel", "load_llamagen_vq"]
