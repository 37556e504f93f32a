"""`ctfgen sample-many`: N images per class into an ADM-evaluator `.npz` (see ctfgen.app.sample_sets)."""

from __future__ import annotations

import argparse

from ctfgen.app.commands._common import (
    add_model_arguments,
    add_sampling_arguments,
    check_args,
    load_model,
    sampling_kwargs,
)
from ctfgen.app.sample_sets import check_sample_set, sample_set
from ctfgen.utils import distributed as D
from ctfgen.utils.options import CLASS_ID


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--per-class", type=int, required=True, help="images per class, at least 1")
    parser.add_argument("--classes", type=int, nargs="*", default=None, help="class ids (default: all)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="images per batch and per part file; memory follows it, not the set's size "
                             "(default: %(default)s)")
    parser.add_argument("--out", required=True,
                        help="output .npz (arr_0: uint8 N,H,W,C; labels: int64 N); finished batches wait in "
                             "OUT.parts/ until the end, so a killed run continues when run again")
    parser.add_argument("--png-dir", default=None, help="also write every image as a PNG here, as it is made")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_arguments(parser)
    add_sampling_arguments(parser)


def run(args: argparse.Namespace) -> int:
    check_args(args)
    args.classes = [CLASS_ID.check(c, "--classes") for c in args.classes] if args.classes else None
    check_sample_set(args.out, args.per_class, args.batch_size, args.png_dir)
    device = str(D.init_distributed()) if D.launched_by_torchrun() else args.device
    pipeline = load_model(args.model, device)
    out = sample_set(pipeline, args.out, args.per_class, args.classes, args.batch_size, args.seed,
                     sampling_kwargs(args, pipeline), args.png_dir, progress=not args.no_progress)
    if D.is_main():
        print(f"{args.out} already exists; delete it to sample again" if out is None else
              f"wrote {out}: {len(args.classes or range(pipeline.num_classes))} classes x {args.per_class} images")
    return 0
