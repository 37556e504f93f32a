"""Models that ship inside the package (trained by `make reproduce`, see docs/results.md)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

ASSETS = Path(str(resources.files("ctfgen") / "assets"))

# name -> (pipeline directory, tokenizer directory shared between the two pipelines)
PRETRAINED = {
    "fashion-mnist": "fashion_mnist/ctf",
    "fashion-mnist-baseline": "fashion_mnist/baseline",
}


def pretrained_path(name: str) -> Path:
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained model {name!r}; available: {', '.join(PRETRAINED)}")
    path = ASSETS / PRETRAINED[name]
    if not (path / "pipeline.json").is_file():
        raise FileNotFoundError(
            f"the shipped model {name!r} is missing from {path}. Reinstall ctfgen from a full checkout, "
            "or train your own with `make reproduce` and load it with ctfgen.load_pipeline(DIR)."
        )
    return path


def pretrained(name: str = "fashion-mnist", device: str = "cpu"):
    """The shipped Fashion-MNIST models: "fashion-mnist" (CTF) or "fashion-mnist-baseline".

    Both return a pipeline with `sample(labels, ...) -> (B, 1, 28, 28)` images in [-1, 1].
    """
    from ctfgen.pipeline import load_pipeline

    return load_pipeline(pretrained_path(name)).to(device).eval()
