"""ctfgen: class-conditional autoregressive image generation with coarse-to-fine token prediction.

    >>> import ctfgen
    >>> pipe = ctfgen.pretrained("fashion-mnist")          # shipped CTF model
    >>> images = pipe.sample([7] * 4, generator=0)          # (4, 1, 28, 28) in [-1, 1]

Public names are imported lazily so that `ctfgen --help` and `import ctfgen` stay fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # models
    "GPT": "ctfgen.models.transformer",
    "GPTConfig": "ctfgen.models.transformer",
    "AuxModel": "ctfgen.models.transformer",
    "AuxConfig": "ctfgen.models.transformer",
    "GPT_PRESETS": "ctfgen.models.transformer",
    "AUX_PRESETS": "ctfgen.models.transformer",
    "load_llamagen_gpt": "ctfgen.models.llamagen",
    # tokenizer
    "VQModel": "ctfgen.tokenizer.vq",
    "VQConfig": "ctfgen.tokenizer.vq",
    "load_llamagen_vq": "ctfgen.tokenizer.llamagen",
    # coarse-to-fine
    "CoarseMap": "ctfgen.clustering",
    "CTFPipeline": "ctfgen.pipeline",
    "ARPipeline": "ctfgen.pipeline",
    "load_pipeline": "ctfgen.pipeline",
    # sampling and likelihood
    "generate": "ctfgen.sampling",
    "log_prob": "ctfgen.sampling",
    # shipped models
    "pretrained": "ctfgen.shipped",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ctfgen' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
