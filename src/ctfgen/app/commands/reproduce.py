"""`ctfgen reproduce SETTINGS --run RUN`: ablations, evaluation and report on a finished pipeline run."""

from __future__ import annotations

import argparse

from ctfgen.app.commands._common import add_print_config, collect_trailing_overrides, print_config, require
from ctfgen.config import ReproduceConfig, load_config
from ctfgen.experiments.reproduce import reproduce


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("settings", nargs="?", default=None,
                        help="YAML of reproduce settings (e.g. configs/fashion_mnist_ablations.yaml); default: built-in")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override settings (e.g. steps=100)")
    parser.add_argument("--run", default=None, help="the finished `ctfgen pipeline` directory (required unless --print-config)")
    parser.add_argument("--independent-only", action="store_true",
                        help="only train the ablations that need no main-run model (they can run beside "
                             "the main run once its codes exist), then stop")
    parser.add_argument("--force", action="store_true",
                        help="recompute evaluation records made from other settings, models or code (refused otherwise)")
    add_print_config(parser)
    collect_trailing_overrides(parser, config="settings")


def run(args: argparse.Namespace) -> int:
    settings = load_config(ReproduceConfig, args.settings, args.overrides)
    if args.print_config:
        return print_config(settings)
    require(args, "run")
    reproduce(args.run, settings, independent_only=args.independent_only, force=args.force)
    return 0
