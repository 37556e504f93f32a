"""`ctfgen pipeline CONFIG --out DIR [--resume] [key.sub=value ...]`: a whole experiment."""

from __future__ import annotations

import argparse

from ctfgen.app.commands._common import add_print_config, collect_trailing_overrides, print_config, require
from ctfgen.experiments.run import load_experiment_config, run_experiment


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run tokenizer training, clustering, code extraction, stage 1, the auxiliary model and the "
        "baseline, then assemble DIR as a CTF pipeline (CTFPipeline.from_pretrained(DIR)) and DIR/baseline. "
        "Works under torchrun (DDP or FSDP; only rank 0 writes)."
    )
    parser.add_argument("config", nargs="?", default=None,
                        help="YAML config (configs/*.yaml); with --resume it defaults to the run's DIR/input.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides, values parsed as YAML (e.g. train.steps=100 stage1.preset=GPT-mini)")
    parser.add_argument("--out", default=None, help="experiment directory (required unless --print-config)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out: finished phases are skipped, an interrupted one resumes "
                             "from its checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs still written)")
    add_print_config(parser)
    parser.add_argument("--dry-run", action="store_true",
                        help="shrink the config to two steps of everything with tiny models (checks a recipe on a CPU)")
    collect_trailing_overrides(parser, config="config")


def run(args: argparse.Namespace) -> int:
    config, overrides = args.config, args.overrides
    if args.print_config:
        return print_config(load_experiment_config(config, args.out, args.resume, overrides, args.dry_run)[0])
    require(args, "out")
    run_experiment(config, args.out, resume=args.resume, overrides=overrides, progress=not args.no_progress,
                   dry_run=args.dry_run)
    return 0
