"""`ctfgen sample-many`: N images per class into an ADM-evaluator `.npz` (see ctfgen.sample_sets)."""

from __future__ import annotations

import argparse

from ctfgen.commands._common import add_model_arguments, add_sampling_arguments, load_model, sampling_kwargs


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--per-class", type=int, required=True, help="images per class")
    parser.add_argument("--classes", type=int, nargs="*", default=None, help="class ids (default: all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", required=True, help="output .npz (arr_0: uint8 N,H,W,C; labels: int64 N)")
    parser.add_argument("--png-dir", default=None, help="also write every image as a PNG here")
    add_model_arguments(parser)
    add_sampling_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ctfgen.sample_sets import sample_set
    from ctfgen.train import distributed as D

    device = str(D.init_distributed()) if D.launched_by_torchrun() else args.device
    pipeline = load_model(args.model, device)
    out = sample_set(pipeline, args.out, args.per_class, args.classes, args.batch_size, args.seed,
                     sampling_kwargs(args, pipeline), args.png_dir)
    if D.is_main():
        print(f"{args.out} already exists; delete it to sample again" if out is None else
              f"wrote {out}: {len(args.classes or range(pipeline.num_classes))} classes x {args.per_class} images")
    return 0
