"""`ctfgen study RUN... --records DIR [--report FILE]`: evaluate the codebook-size study's runs.

Each RUN is a finished `ctfgen pipeline` run of configs/study/fmnist_v<V>.yaml. Every measurement is
one JSON record under DIR/<run>/, computed once (a killed study continues where it stopped); the
report's tables and figures are made from the records alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ctfgen.app.commands._common import add_print_config, check_args, print_config, require
from ctfgen.config import StudySettings
from ctfgen.experiments.study import study_run, write_report
from ctfgen.utils.fileio import atomic_write_text
from ctfgen.utils.options import check


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="*", help="finished pipeline run directories (none: only --report)")
    parser.add_argument("--records", default=None,
                        help="directory of the study's JSON records (required unless --print-config)")
    parser.add_argument("--report", default=None, help="write the markdown tables here (figures beside it)")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.5, 2.0, 3.0],
                        help="guidance scales tried on the validation split (default: %(default)s)")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.9, 1.0, 1.1],
                        help="stage-1 (baseline: the only) temperatures tried on the validation split (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="sampling seeds of the test cells")
    parser.add_argument("--test-per-class", type=int, default=500,
                        help="test samples per class per cell (default: %(default)s)")
    parser.add_argument("--select-per-class", type=int, default=200,
                        help="validation samples per class per grid point (default: %(default)s, 2000 in all)")
    parser.add_argument("--select-seed", type=int, default=1000,
                        help="the selection's sampling seed, apart from the test seeds (default: %(default)s)")
    parser.add_argument("--diagnosis-per-class", type=int, default=500,
                        help="test images per class that the diagnosis sets are made from; the rest are their "
                             "reference (default: %(default)s)")
    parser.add_argument("--diagnosis-seed", type=int, default=2000,
                        help="the diagnosis' sampling seed (default: %(default)s)")
    parser.add_argument("--heldout-images", type=int, default=10000,
                        help="test images for the held-out bits per token at every epoch (default: %(default)s)")
    parser.add_argument("--tokenizer-images", type=int, default=None,
                        help="test images for codebook usage and PSNR (default: the whole test split)")
    parser.add_argument("--batch-size", type=int, default=250,
                        help="sampling batch size; it shapes the random streams (default: %(default)s)")
    parser.add_argument("--force", action="store_true",
                        help="recompute records made from other settings, models or code (refused otherwise)")
    add_print_config(parser)


def run(args: argparse.Namespace) -> int:
    check_args(args)
    args.guidance = [check("cfg_scale", g, "--guidance") for g in args.guidance]
    args.temperatures = [check("temperature", t, "--temperatures") for t in args.temperatures]
    args.seeds = [check("seed", s, "--seeds") for s in args.seeds]
    for name in ("select_seed", "diagnosis_seed"):
        setattr(args, name, check("seed", getattr(args, name), "--" + name.replace("_", "-")))
    for name in ("test_per_class", "select_per_class", "diagnosis_per_class", "heldout_images", "batch_size"):
        setattr(args, name, check("per_class" if name != "batch_size" else "batch_size", getattr(args, name),
                                  "--" + name.replace("_", "-")))

    settings = StudySettings(guidance=tuple(args.guidance), temperatures=tuple(args.temperatures), seeds=tuple(args.seeds),
                             test_per_class=args.test_per_class, select_per_class=args.select_per_class,
                             select_seed=args.select_seed, diagnosis_per_class=args.diagnosis_per_class,
                             diagnosis_seed=args.diagnosis_seed, heldout_images=args.heldout_images,
                             tokenizer_images=args.tokenizer_images, batch_size=args.batch_size)
    if args.print_config:
        return print_config(settings)
    require(args, "records")
    for run_dir in args.runs:
        study_run(run_dir, args.records, settings, force=args.force)
    if args.report:
        report = Path(args.report)
        atomic_write_text(report, write_report(args.records, figure_dir=report.parent) + "\n")
        print(f"wrote {report} and its figures")
    return 0
