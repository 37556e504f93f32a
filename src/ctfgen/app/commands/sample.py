"""The commands that sample a trained model: `sample` (a picture: `ctfgen sample --class sneaker --n 16`),
`sample-many` (N images per class into an ADM-evaluator `.npz`, see ctfgen.app.sample_sets) and `demo` (the
interactive web demo, needs ctfgen[demo])."""

from __future__ import annotations

import argparse
import time

from ctfgen.app.commands._common import (add_model_arguments, add_sampling_arguments, check_args, load_baseline,
                                         load_model, resolve_classes, sampling_kwargs)
from ctfgen.app.demo import Limits, build_app, launch
from ctfgen.app.sample_sets import check_picture, check_sample_set, sample_grid, sample_set
from ctfgen.pipeline import CTFPipeline
from ctfgen.utils import distributed as D
from ctfgen.utils.errors import ConfigError
from ctfgen.utils.options import CLASS_ID, COUNTS, cli_help


def configure_sample(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--class", dest="classes", nargs="+", default=["0"], metavar="CLASS",
        help="class names or ids; several are cycled through (default: 0)")
    add("--n", type=int, default=16, help=cli_help(COUNTS["n"]))
    add("--out", default="samples.png", help="the picture (.png, .jpg, ...); single images go to a folder of its stem")
    add("--nrow", type=int, default=8, help="images per row of the picture")
    add("--scale", type=int, default=4, help=cli_help(COUNTS["scale"]))
    add("--batch-size", type=int, default=64, help="images sampled at once; memory follows it, not --n")
    add("--no-singles", action="store_true", help="write only the picture, no single images")
    add("--no-progress", action="store_true", help="no progress bar")
    add("--stages", action="store_true", help="CTF: rows of the coarse preview (stage 1 alone), the final image and a "
        "heat map (with its scale) of where stage 2 chose another codeword than the cluster's representative")
    add("--compare-baseline", action="store_true", help="also sample the baseline for the same classes and seed, "
        "beside CTF's images (with --stages: as a fourth row)")
    add("--baseline", metavar="DIR_OR_REPO", help="baseline for --compare-baseline (default: the shipped one for the "
        "shipped model, else the run's `baseline` directory: inside --model RUN, beside --model RUN/ctf)")
    add_model_arguments(parser)
    add_sampling_arguments(parser)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def _parts(timings: dict) -> str:
    names = {"stage1": "stage 1", "stage2": "stage 2", "coarse_preview": "coarse preview"}
    return "  ".join(f"{names.get(k, k)} {_ms(v)}" for k, v in timings.items() if k != "total")


def run_sample(args: argparse.Namespace) -> None:
    check_args(args, outputs={"out": "image"})
    t0 = time.perf_counter()
    pipeline = load_model(args.model, args.device)
    if (args.stages or args.compare_baseline) and not isinstance(pipeline, CTFPipeline):
        raise ConfigError("--stages and --compare-baseline need a CTF model as --model")
    classes = resolve_classes(args.classes, pipeline.num_classes)
    sampling = sampling_kwargs(args, pipeline)
    rows = (3 if args.stages else 1) + args.compare_baseline
    check_picture(pipeline, args.n, args.out, args.nrow, args.scale, not args.no_singles, rows, args.batch_size)
    baseline = load_baseline(args.model, args.baseline, args.device, pipeline) if args.compare_baseline else None
    load_s = time.perf_counter() - t0
    r = sample_grid(pipeline, classes, args.n, args.out, args.seed, args.nrow, args.scale, not args.no_singles,
                    sampling, stages=args.stages, baseline=baseline, batch_size=args.batch_size,
                    progress=not args.no_progress)
    if "changed" in r:
        print(f"stage 2 chose a codeword other than the representative at {r['changed']:.0%} of positions")
    print(f"wrote {r['grid']} ({args.n} images of {r['size'][0]}x{r['size'][1]})")
    if r["singles"] is not None:
        print(f"wrote {args.n} single images to {r['singles']}/")
    t = r["timings"]
    print(f"timings: {_parts(t)}  = total {_ms(t['total'])} ({args.n / t['total']:,.1f} images/s); "
          f"loading the model{'s' if baseline is not None else ''} took {load_s:.2f} s")
    if "baseline_timings" in r:
        b = r["baseline_timings"]
        print(f"the baseline's part: {_parts(b)}  = {_ms(b['total'])} (one stage: no stage 2)")


def configure_sample_many(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--per-class", type=int, required=True, help="images per class, at least 1")
    add("--classes", type=int, nargs="*", help="class ids (default: all)")
    add("--batch-size", type=int, default=64,
        help="images per batch and per part file; memory follows it, not the set's size")
    add("--out", required=True, help="output .npz (arr_0: uint8 N,H,W,C; labels: int64 N); finished batches wait in "
        "OUT.parts/ until the end, so a killed run continues when run again")
    add("--png-dir", help="also write every image as a PNG here, as it is made")
    add("--no-progress", action="store_true", help="no progress bar")
    add_model_arguments(parser)
    add_sampling_arguments(parser)


def run_sample_many(args: argparse.Namespace) -> None:
    check_args(args, classes=CLASS_ID)
    check_sample_set(args.out, args.per_class, args.batch_size, args.png_dir)
    device = str(D.rank_device(args.device)) if D.launched_by_torchrun() else args.device
    pipeline = load_model(args.model, device)
    out = sample_set(pipeline, args.out, args.per_class, args.classes or None, args.batch_size, args.seed,
                     sampling_kwargs(args, pipeline), args.png_dir, progress=not args.no_progress)
    if D.is_main():
        print(f"{args.out} already exists; delete it to sample again" if out is None else
              f"wrote {out}: {len(args.classes or range(pipeline.num_classes))} classes x {args.per_class} images")


def configure_demo(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add = parser.add_argument
    add("--baseline", metavar="DIR_OR_REPO", help="baseline shown side by side (default: the shipped one for the "
        "shipped model, else the `baseline` directory beside --model; none if there is none)")
    add("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only; another host "
                                            "prints a warning)")
    add("--port", type=int, default=7860, help="TCP port to serve on, 1 to 65535")
    add("--max-images", type=int, default=16, help="images per request at most")
    add("--queue-size", type=int, default=16, help="requests waiting at most; more get a 'busy, try again' message")


def run_demo(args: argparse.Namespace) -> None:
    check_args(args)
    ctf = load_model(args.model, args.device)
    if not isinstance(ctf, CTFPipeline):
        raise ConfigError(f"--model {args.model!r} is a baseline; the demo shows a CTF model (pass the baseline as --baseline)")
    try:
        baseline = load_baseline(args.model, args.baseline, args.device, ctf)
    except ConfigError as e:
        if args.baseline is not None:
            raise
        print(f"no baseline to compare with ({e}); serving CTF only")
        baseline = None
    app = build_app(ctf, baseline, Limits(max_images=args.max_images, queue_size=args.queue_size))
    launch(app, host=args.host, port=args.port)
