"""`ctfgen train-tokenizer CONFIG --out DIR [--resume] [key.sub=value ...]`

CONFIG is an experiment config (configs/*.yaml); its `data` and `tokenizer` sections are used:

    data:      {dataset: fashion_mnist | image_folder, root, image_size, train_limit, ...}
    tokenizer: {model: {VQConfig fields}, train: {steps, batch_size, lr, ...}, loss: {reconstruction, ...}}

Overrides after the config replace single values, parsed as YAML: `tokenizer.train.steps=500`.
DIR receives checkpoints/, metrics.csv, tokenizer/ (the model) and config.yaml (the resolved config).
"""

from __future__ import annotations

import argparse

from ctfgen.app.commands._common import (
    add_device_argument,
    add_print_config,
    check_args,
    collect_trailing_overrides,
    print_config,
    require,
)
from ctfgen.config import ExperimentConfig, load_config
from ctfgen.train.tokenizer import train_tokenizer_from_config


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML (its data and tokenizer sections are used)")
    parser.add_argument("--out", default=None,
                        help="output directory (checkpoints, metrics.csv, tokenizer/); required unless --print-config")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in DIR")
    add_device_argument(parser, None)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (metrics.csv is still written)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values")
    add_print_config(parser)
    collect_trailing_overrides(parser)


def run(args: argparse.Namespace) -> int:
    check_args(args)
    cfg = load_config(ExperimentConfig, args.config, args.overrides)
    if args.print_config:
        return print_config(cfg.tokenizer)
    require(args, "out")
    train_tokenizer_from_config(cfg, args.out, resume=args.resume, device=args.device, progress=not args.no_progress)
    return 0
