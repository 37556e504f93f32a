"""`ctfgen sample --class sneaker --n 16 --out samples.png`"""

from __future__ import annotations

import argparse

from ctfgen.commands._common import add_model_arguments, add_sampling_arguments, load_model, resolve_classes, sampling_kwargs


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--class", dest="classes", nargs="+", default=["0"], metavar="CLASS",
                        help="class names or ids; several are cycled through (default: 0)")
    parser.add_argument("--n", type=int, default=16, help="number of images (default: %(default)s)")
    parser.add_argument("--out", default="samples.png", help="PNG grid; single images go to a folder of the same stem")
    parser.add_argument("--nrow", type=int, default=8)
    parser.add_argument("--scale", type=int, default=4, help="enlarge the grid by this factor (nearest)")
    parser.add_argument("--no-singles", action="store_true", help="write only the grid")
    parser.add_argument("--stages", action="store_true",
                        help="CTF: three rows per sample, the coarse preview (stage 1 alone), the final image, and a "
                             "heat map of where stage 2 chose a codeword other than the cluster's representative")
    parser.add_argument("--compare-baseline", action="store_true",
                        help="also sample the baseline for the same classes and seed and put its images beside CTF's "
                             "(with --stages: as a fourth row)")
    parser.add_argument("--baseline", default=None, metavar="DIR",
                        help="baseline for --compare-baseline (default: the shipped one for the shipped model, "
                             "else the `baseline` directory beside --model)")
    add_model_arguments(parser)
    add_sampling_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import time

    from ctfgen.commands._common import load_baseline
    from ctfgen.errors import ConfigError
    from ctfgen.pipeline import CTFPipeline
    from ctfgen.sample_sets import sample_grid

    t0 = time.perf_counter()
    pipeline = load_model(args.model, args.device)
    if (args.stages or args.compare_baseline) and not isinstance(pipeline, CTFPipeline):
        raise ConfigError("--stages and --compare-baseline need a CTF model as --model")
    baseline = load_baseline(args.model, args.baseline, args.device, pipeline.tokenizer) if args.compare_baseline else None
    load_s = time.perf_counter() - t0
    classes = resolve_classes(args.classes, pipeline.num_classes, getattr(pipeline, "class_names", None))
    r = sample_grid(pipeline, classes, args.n, args.out, args.seed, args.nrow, args.scale, not args.no_singles,
                    sampling_kwargs(args, pipeline), stages=args.stages, baseline=baseline)
    if "baseline_timings" in r:
        print("baseline timings: " + "  ".join(f"{k} {v * 1000:.0f} ms" for k, v in r["baseline_timings"].items()))
    if "changed" in r:
        print(f"stage 2 chose a codeword other than the representative at {r['changed']:.0%} of positions")
    print(f"wrote {r['grid']} ({args.n} images of {r['size'][0]}x{r['size'][1]})")
    if r["singles"] is not None:
        print(f"wrote {args.n} single images to {r['singles']}/")
    stages = "  ".join(f"{k} {v * 1000:.0f} ms" for k, v in r["timings"].items())
    print(f"timings: load {load_s:.2f} s  sampling {r['seconds'] * 1000:.0f} ms ({args.n / r['seconds']:.1f} "
          f"images/s)  {stages}")
    return 0
