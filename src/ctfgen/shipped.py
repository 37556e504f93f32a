"""Models that ship inside the package, trained by `make reproduce` (docs/results.md).

The CTF pipeline and the baseline share one tokenizer; it is stored once, under the CTF pipeline,
and the baseline's `pipeline.json` says so (`has_tokenizer: false`).
"""

from __future__ import annotations

import json
import shutil
import sys
from importlib import resources
from pathlib import Path

from ctfgen.pipeline import ARPipeline, load_pipeline
from ctfgen.tokenizer.vq import VQModel
from ctfgen.utils.errors import ConfigError, MissingFileError
from ctfgen.utils.fileio import atomic_write_json, publish_dir
from ctfgen.utils.hub import is_repo_id
from ctfgen.utils.options import check_device
from ctfgen.utils.rundir import RunDir

ASSETS = Path(str(resources.files("ctfgen") / "assets"))
SHIPPED_CTF = "fashion_mnist/ctf"
SHIPPED_BASELINE = "fashion_mnist/baseline"
PRETRAINED = {"fashion-mnist": SHIPPED_CTF, "fashion-mnist-baseline": SHIPPED_BASELINE}


def pretrained_path(name: str) -> Path:
    if name not in PRETRAINED:
        raise ConfigError(f"{name!r} is neither a shipped model ({', '.join(PRETRAINED)}), a directory, nor a "
                          "Hugging Face Hub repo id (org/name)")
    path = ASSETS / PRETRAINED[name]
    if not (path / "pipeline.json").is_file():
        raise MissingFileError(
            f"the shipped model {name!r} is missing from {path}. Reinstall ctfgen from a full checkout, "
            "or train your own with `make reproduce` and load it with ctfgen.load_pipeline(DIR)."
        )
    return path


def pretrained(name: str = "fashion-mnist", device: str = "cpu", revision: str | None = None):
    """A pipeline by name, on `device`: the shipped Fashion-MNIST models "fashion-mnist" (CTF) and
    "fashion-mnist-baseline", a saved pipeline directory (or a `ctfgen pipeline` run's root), or a
    Hugging Face Hub repo id `org/name` (fetched through huggingface_hub: its cache, HF_HUB_OFFLINE
    and token apply; `revision` picks a branch, tag or commit).

    The shipped models sample `(B, 1, 28, 28)` images in [-1, 1] with `pipe.sample(labels, ...)`.
    """
    device = check_device(device) or "cpu"
    if Path(name).exists() or (name not in PRETRAINED and is_repo_id(name)):
        return load_pipeline(name, revision=revision).to(device).eval()
    pipe = load_pipeline(pretrained_path(name))  # which refuses a name that is none of these
    if pipe.tokenizer is None:
        tokenizer = VQModel.from_pretrained(str(pretrained_path("fashion-mnist") / "tokenizer"))
        pipe = ARPipeline(pipe.gpt, tokenizer, sampling_defaults=pipe.sampling_defaults)  # checks the fingerprint
    return pipe.to(device).eval()


def ship(run_dir: str | Path, assets: Path = ASSETS) -> dict[str, int]:
    """Copy a finished run's CTF pipeline and baseline into the package (the baseline without its
    own tokenizer copy). Returns the bytes written per model."""
    run = RunDir(run_dir)
    sizes = {}
    for src, sub in ((run.ctf, SHIPPED_CTF), (run.baseline, SHIPPED_BASELINE)):
        run.require(src / "pipeline.json")

        def copy(tmp: Path, src=src):
            shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("tokenizer") if src.name == "baseline" else None)
            if src.name == "baseline":
                info = json.loads((tmp / "pipeline.json").read_text())
                info["has_tokenizer"] = False
                info["tokenizer"] = f"shared with ctfgen.pretrained('fashion-mnist') ({SHIPPED_CTF}/tokenizer)"
                atomic_write_json(tmp / "pipeline.json", info)

        dest = publish_dir(copy, assets / sub)
        sizes[src.name] = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    return sizes


if __name__ == "__main__":  # python -m ctfgen.shipped RUN_DIR
    print(ship(sys.argv[1]))
