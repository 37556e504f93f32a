"""`ctfgen train-tokenizer CONFIG.yaml --out DIR [--resume] [key.sub=value ...]`

CONFIG has three sections:

    model: {VQConfig fields}            e.g. in_channels: 1, base_ch: 32, encoder_ch_mult: [1, 2, 2], ...
    train: {steps, batch_size, lr, ...}  see ctfgen.tokenizer.train.DEFAULT_TRAIN
    data:  {dataset: fashion_mnist | image_folder, root, image_size, limit, split (fashion_mnist: train)}

Overrides after the config replace single values, parsed as YAML: `train.steps=500 model.base_ch=64`.
The resolved config is written to DIR/config.yaml.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ctfgen.commands._common import collect_trailing_overrides

DATA_KEYS = {"dataset", "root", "image_size", "limit", "split"}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML file with model / train / data sections")
    parser.add_argument("--out", required=True, help="output directory (checkpoints, log.csv, tokenizer/)")
    parser.add_argument("--resume", action="store_true", help="continue from DIR/checkpoints/last.pt")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (log.csv is still written)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values")
    collect_trailing_overrides(parser)


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """A copy of `config` with each `a.b.c=value` set (value parsed as YAML, so 3 is an int, [1,2] a list):
    ctfgen.experiment.apply_overrides, with its errors raised as ValueError."""
    from ctfgen.experiment import ExperimentError
    from ctfgen.experiment import apply_overrides as _apply_overrides

    try:
        return _apply_overrides(config, overrides)
    except ExperimentError as e:
        raise ValueError(str(e)) from None


def build_dataset(data: dict, in_channels: int = 1):
    """The training images described by a config's `data` section (loaders imported only when used)."""
    unknown = sorted(set(data) - DATA_KEYS)
    if unknown:
        raise ValueError(f"unknown data keys {unknown}; known keys are {sorted(DATA_KEYS)}")
    kind = data.get("dataset", "fashion_mnist")
    limit = data.get("limit")
    if kind == "fashion_mnist":
        from ctfgen.data.fashion_mnist import FashionMNIST

        return FashionMNIST(data.get("split", "train"), root=data.get("root"), limit=limit,
                            image_size=int(data.get("image_size") or 28))
    if kind == "image_folder":
        import torch
        from torch.utils.data import Subset

        from ctfgen.data.folder import ImageFolder

        if not data.get("root"):
            raise ValueError("data.root is required for dataset: image_folder (a directory of class sub-folders)")
        ds = ImageFolder(data["root"], int(data.get("image_size") or 256), channels=in_channels)
        if limit is not None and limit < len(ds):
            # Folders are sorted by class, so take a seeded random subset rather than the first classes.
            idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:int(limit)]
            ds = Subset(ds, sorted(idx.tolist()))
        return ds
    raise ValueError(f"data.dataset must be fashion_mnist or image_folder, got {kind!r}")


def run(args: argparse.Namespace) -> int:
    import yaml

    from ctfgen.tokenizer.train import NonFiniteLossError, resolve_config, train_tokenizer

    path = Path(args.config)
    if not path.is_file():
        print(f"config {path} does not exist", file=sys.stderr)
        return 2
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    try:
        config = apply_overrides(config, args.overrides)
        vq_config, _ = resolve_config(config)
        dataset = build_dataset(config.get("data") or {}, in_channels=vq_config.in_channels)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    out = Path(args.out)
    from ctfgen.tokenizer.train import CHECKPOINT_NAME
    if (out / "checkpoints" / CHECKPOINT_NAME).is_file() and not args.resume:
        print(f"error: {out} already holds a tokenizer run; pass --resume to continue it or choose another --out",
              file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "config.yaml", "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)
    try:
        train_tokenizer(config, dataset, out, resume=args.resume, device=args.device,
                        progress=not args.no_progress)
    except (NonFiniteLossError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
