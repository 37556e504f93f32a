"""Models that ship inside the package, trained by `make reproduce` (docs/results.md).

The CTF pipeline and the baseline share one tokenizer; it is stored once, under the CTF pipeline,
and the baseline's `pipeline.json` says so (`has_tokenizer: false`). `ship` may store the GPTs' and
the auxiliary model's parameters in 16 bits (`weights_dtype`), which halves them; they load back as
float32. The tokenizer and coarse map stay float32, so the codebook fingerprint every part checks
is the one the models were trained with.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from importlib import resources
from pathlib import Path

import torch

from ctfgen.pipeline import PIPELINE_FILE, ARPipeline, load_pipeline
from ctfgen.tokenizer.vq import VQModel
from ctfgen.utils.errors import ConfigError, CorruptFileError, CtfgenError, MismatchError, MissingFileError
from ctfgen.utils.fileio import atomic_write_json, publish_dir, read_json
from ctfgen.utils.fingerprint import directory_fingerprint
from ctfgen.utils.hub import MODEL_CARD_FILE, SAFETENSORS_FILE, is_repo_id, read_model_card, save_weights, write_model_card
from ctfgen.utils.options import check_device
from ctfgen.utils.rundir import Records, RunDir

ASSETS = Path(str(resources.files("ctfgen") / "assets"))
SHIPPED_CTF = "fashion_mnist/ctf"
SHIPPED_BASELINE = "fashion_mnist/baseline"
PRETRAINED = {"fashion-mnist": SHIPPED_CTF, "fashion-mnist-baseline": SHIPPED_BASELINE}
WEIGHTS_DTYPES = ("float32", "float16", "bfloat16")  # how `ship` may store the models' parameters


def pretrained_path(name: str) -> Path:
    if name not in PRETRAINED:
        raise ConfigError(f"{name!r} is neither a shipped model ({', '.join(PRETRAINED)}), a directory, nor a "
                          "Hugging Face Hub repo id (org/name)")
    path = ASSETS / PRETRAINED[name]
    if not (path / PIPELINE_FILE).is_file():
        raise MissingFileError(f"the shipped model {name!r} is missing from {path}. Reinstall ctfgen from a full "
                               "checkout, or train your own with `make reproduce` and load it with "
                               "ctfgen.load_pipeline(DIR).")
    return path


def pretrained(name: str = "fashion-mnist", device: str = "cpu", revision: str | None = None):
    """A pipeline by name, on `device`: the shipped Fashion-MNIST models "fashion-mnist" (CTF) and
    "fashion-mnist-baseline", a saved pipeline directory (or a `ctfgen pipeline` run's root), or a
    Hugging Face Hub repo id `org/name` (fetched through huggingface_hub: its cache, HF_HUB_OFFLINE
    and token apply; `revision` picks a branch, tag or commit).

    The shipped models sample `(B, 1, 28, 28)` images in [-1, 1] with `pipe.sample(labels, ...)`.
    """
    device = check_device(device) or "cpu"
    from_hub = not Path(name).exists() and name not in PRETRAINED and is_repo_id(name)
    if revision is not None and not from_hub:  # it would be ignored: the user would get another version than asked
        raise ConfigError(f"revision {revision!r} picks a version of a Hugging Face Hub repo, but {name!r} is "
                          f"{'a local path' if Path(name).exists() else 'a shipped model'}; leave revision unset")
    if from_hub or Path(name).exists():
        return load_pipeline(name, revision=revision).to(device).eval()
    pipe = load_pipeline(pretrained_path(name))  # which refuses a name that is none of these
    if pipe.tokenizer is None:
        tokenizer = VQModel.from_pretrained(str(pretrained_path("fashion-mnist") / "tokenizer"))
        pipe = ARPipeline(pipe.gpt, tokenizer, sampling_defaults=pipe.sampling_defaults)  # checks the fingerprint
    return pipe.to(device).eval()


def chosen_sampling(records_dir: str | Path, method: str, pipeline_dir: Path, pipeline) -> dict:
    """The sampling setting `ctfgen study` chose for `method` on the validation split
    (RECORDS/select-<method>.json), refused unless the record was made from this very pipeline
    (`pipeline`, loaded from `pipeline_dir`) and that pipeline accepts it."""
    records, name = Records(records_dir), f"select-{method}"
    path, record = records.path(name), records.read(name)
    if record is None:
        raise MissingFileError(f"{path} is missing: pass the study's records of this run (ctfgen study RUN --records DIR)")
    if "chosen" not in record:
        raise CorruptFileError(f"{path} is not a selection record of `ctfgen study` (it has no 'chosen' setting)")
    made_from = (record.get("inputs") or {}).get("models", {}).get(method)
    shipping = directory_fingerprint(pipeline_dir)
    if made_from != shipping:
        raise MismatchError(f"{path} chose a setting for the {method} model with fingerprint {made_from}, but "
                            f"{pipeline_dir} has {shipping}: pass the records of the run being shipped")
    chosen = record["chosen"]
    if not isinstance(chosen, dict):
        raise CorruptFileError(f"{path} has chosen {chosen!r}, not an object of sampling options; run the study again")
    try:  # as the shipped pipeline will check them when it loads, but before anything is written
        pipeline.resolve_sampling(chosen)
    except CtfgenError as e:
        raise CorruptFileError(f"{path} chose sampling settings the {method} pipeline refuses ({e}); "
                               "run the study again") from None
    return chosen


def ship(run_dir: str | Path, assets: Path = ASSETS, weights_dtype: str = "float32",
         sampling_from: str | Path | None = None) -> dict[str, int]:
    """Copy a finished run's CTF pipeline and baseline into the package (the baseline without its
    own tokenizer copy). Returns the bytes written per model.

    `weights_dtype` (recorded in each `pipeline.json`) rounds the models' floating-point parameters;
    buffers and integer tensors stay as they are. `sampling_from`, a directory of `ctfgen study` records
    of this run, makes the setting the study chose on the validation split (select-<method>.json) each
    pipeline's sampling default."""
    if weights_dtype not in WEIGHTS_DTYPES:
        raise ConfigError(f"weights_dtype must be one of {', '.join(WEIGHTS_DTYPES)}, got {weights_dtype!r}")
    run = RunDir(run_dir)
    sources = {run.ctf: SHIPPED_CTF, run.baseline: SHIPPED_BASELINE}
    run.require(*(src / PIPELINE_FILE for src in sources))
    # Every check before anything is written: a refused ship leaves the assets' pair as it was.
    # Loaded (strictly checked) when they are needed: to check the chosen settings, or to round the parameters.
    needed = sampling_from is not None or weights_dtype != "float32"
    pipes = {src: load_pipeline(src) if needed else None for src in sources}
    chosen = {src: {} if sampling_from is None else chosen_sampling(sampling_from, src.name, src, pipes[src])
              for src in sources}
    infos = {src: read_json(src / PIPELINE_FILE, "assemble the run's pipelines again (ctfgen pipeline --resume)")
             for src in sources}
    sizes = {}
    for src, sub in sources.items():
        def copy(tmp: Path, src=src, pipe=pipes[src]):
            shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("tokenizer") if src.name == "baseline" else None)
            info = {**infos[src], "weights_dtype": weights_dtype}
            info["sampling_defaults"] = {**info["sampling_defaults"], **chosen[src]}
            if src.name == "baseline":
                info["has_tokenizer"] = False
                info["tokenizer"] = f"shared with ctfgen.pretrained('fashion-mnist') ({SHIPPED_CTF}/tokenizer)"
            atomic_write_json(tmp / PIPELINE_FILE, info)
            if weights_dtype != "float32":
                for name in pipe.models:
                    save_weights(getattr(pipe, name), tmp / name / SAFETENSORS_FILE, getattr(torch, weights_dtype))
            if (tmp / MODEL_CARD_FILE).is_file():  # the card says what pipeline.json now says (weights, sampling ...)
                write_model_card(tmp, **read_model_card(tmp))

        dest = publish_dir(copy, assets / sub)
        sizes[src.name] = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    return sizes


def main(argv: list[str] | None = None) -> int:
    """`python -m ctfgen.shipped RUN_DIR [--weights-dtype bfloat16]` (`make ship`)."""
    parser = argparse.ArgumentParser(prog="python -m ctfgen.shipped", description=ship.__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a finished `ctfgen pipeline` run (its ctf/ and baseline/)")
    parser.add_argument("--weights-dtype", default="float32", metavar="|".join(WEIGHTS_DTYPES),
                        help="how the GPTs' and the auxiliary model's parameters are stored (default float32)")
    parser.add_argument("--sampling-from", metavar="RECORDS",
                        help="the run's `ctfgen study` records: ship the sampling setting it chose on the validation split")
    args = parser.parse_args(argv)
    try:
        print(ship(args.run_dir, ASSETS, weights_dtype=args.weights_dtype, sampling_from=args.sampling_from))
    except CtfgenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
