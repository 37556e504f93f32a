"""ctfgen: class-conditional autoregressive image generation with coarse-to-fine token prediction.

    >>> import ctfgen
    >>> pipe = ctfgen.pretrained("fashion-mnist")          # shipped CTF model
    >>> images = pipe.sample([7] * 4, generator=0)          # (4, 1, 28, 28) in [-1, 1]

Public names are imported lazily so that `ctfgen --help` and `import ctfgen` stay fast.

The code stands in layers. A module imports only from its own layer and the ones below it, never in
a cycle; tests/test_layers.py reads this table and checks it against the import graph.

    8  front ends    ctfgen.app                       the `ctfgen` commands, web demo, bench, sample sets, figures
    7  experiments   ctfgen.experiments               a pipeline run and its reader, reproduction, study, diagnosis
    6  training      ctfgen.train ctfgen.metrics      the one training loop and what it trains; evaluation
    5  pipelines     ctfgen.pipeline ctfgen.shipped   CTF and the baseline, ready to sample; the shipped models
    4  core          ctfgen.data ctfgen.clustering ctfgen.compat ctfgen.sampling
                                                      datasets and codes, the coarse map, part checks, samplers
    3  settings      ctfgen.config                    every setting, as dataclasses read from YAML
    2  networks      ctfgen.models ctfgen.tokenizer   the GPT, the auxiliary model, the VQ tokenizer
    1  utilities     ctfgen.utils                     errors, atomic files, fingerprints, images, option checks,
                                                      Hub files, threads, torchrun, run directories and records
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
