"""`ctfgen reproduce SETTINGS --run RUN`: ablations, evaluation and report on a finished pipeline run."""

from __future__ import annotations

import argparse

from ctfgen.commands._common import collect_trailing_overrides


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("settings", nargs="?", default=None,
                        help="YAML of reproduce settings (e.g. configs/fashion_mnist_ablations.yaml); default: built-in")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override settings (e.g. steps=100)")
    parser.add_argument("--run", required=True, help="the finished `ctfgen pipeline` directory")
    parser.add_argument("--independent-only", action="store_true",
                        help="only train the ablations that need no main-run model (they can run beside "
                             "the main run once its codes exist), then stop")
    parser.add_argument("--force", action="store_true",
                        help="recompute evaluation records made from other settings, models or code (refused otherwise)")
    collect_trailing_overrides(parser)


def run(args: argparse.Namespace) -> int:
    from ctfgen.reproduce import reproduce

    reproduce(args.run, args.settings, independent_only=args.independent_only, overrides=args.overrides,
              force=args.force)
    return 0
