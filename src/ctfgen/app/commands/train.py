"""`ctfgen train --stage ar|aux|baseline`: train one model on extracted codes."""

from __future__ import annotations

import argparse
import dataclasses

from ctfgen.app.commands._common import add_print_config, collect_trailing_overrides, print_config, require
from ctfgen.config import load_stage_config
from ctfgen.train.stages import train_stage
from ctfgen.utils import distributed as D
from ctfgen.utils.rundir import MODEL_DIR


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", required=True, choices=["ar", "aux", "baseline"],
                        help="ar: CTF stage 1 over coarse labels; aux: the auxiliary fine-token model; "
                             "baseline: the vanilla GPT over fine tokens")
    parser.add_argument("--codes", default=None, help="code directory from `ctfgen extract-codes` (required unless --print-config)")
    parser.add_argument("--coarse-map", default=None, help="CoarseMap file from `ctfgen cluster` (ar and aux)")
    parser.add_argument("--config", default=None,
                        help="YAML with `preset`, `model` (config overrides) and `train` keys, or an experiment "
                             "config (its stage1 / aux / baseline section is used)")
    parser.add_argument("--preset", default=None, help="model preset (default: GPT-B / Aux-B, or the config's)")
    parser.add_argument("--out", default=None, help="output directory: checkpoints/, metrics.csv, model/ (required unless --print-config)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="overrides of the stage config, e.g. train.steps=1000 train.lr=3e-4 model.dim=256")
    add_print_config(parser)
    collect_trailing_overrides(parser)


def run(args: argparse.Namespace) -> int:
    cfg = load_stage_config(args.config, args.stage, args.overrides)
    if args.preset:
        cfg = dataclasses.replace(cfg, preset=args.preset)
    if args.print_config:
        return print_config(cfg)
    require(args, "codes", "out")
    D.init_distributed()
    _, result = train_stage(
        args.stage, args.codes, args.out, coarse_map=args.coarse_map, preset=cfg.preset,
        model=cfg.model, train_config=cfg.train, resume=args.resume,
        run_config={"command": "train", "codes": args.codes, "coarse_map": args.coarse_map})
    if D.is_main():
        print(f"{args.stage}: {result.step} steps in {result.seconds:.1f}s; model saved to {args.out}/{MODEL_DIR}")
    return 0
