"""`ctfgen sample --class sneaker --n 16 --out samples.png`"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

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
    import torch

    from ctfgen.commands._common import load_baseline
    from ctfgen.images import save_grid, save_images
    from ctfgen.pipeline import CTFPipeline

    if args.n < 1:
        raise SystemExit("--n must be at least 1")
    t0 = time.perf_counter()
    pipeline = load_model(args.model, args.device)
    if (args.stages or args.compare_baseline) and not isinstance(pipeline, CTFPipeline):
        raise SystemExit("--stages and --compare-baseline need a CTF model as --model")
    baseline = load_baseline(args.model, args.baseline, args.device, pipeline.tokenizer) if args.compare_baseline else None
    load_s = time.perf_counter() - t0
    classes = resolve_classes(args.classes, pipeline.num_classes, getattr(pipeline, "class_names", None))
    labels = torch.tensor([classes[i % len(classes)] for i in range(args.n)], device=args.device)

    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    t0 = time.perf_counter()
    with torch.inference_mode():
        result = pipeline(labels, generator=generator, preview=args.stages, **sampling_kwargs(args, pipeline))
    images = result.images
    total_s = time.perf_counter() - t0

    out = Path(args.out)
    if args.stages or baseline is not None:
        write_comparison(args, pipeline, result, baseline, out)
    else:
        save_grid(images, out, nrow=args.nrow, scale=args.scale)
    print(f"wrote {out} ({args.n} images of {images.shape[-2]}x{images.shape[-1]})")
    if not args.no_singles:
        names = [f"{i:04d}_class{int(c)}" for i, c in enumerate(labels.tolist())]
        save_images(images, out.with_suffix(""), names)
        print(f"wrote {args.n} single images to {out.with_suffix('')}/")

    timings = dict(result.timings)
    stages = "  ".join(f"{k} {v * 1000:.0f} ms" for k, v in timings.items())
    print(f"timings: load {load_s:.2f} s  sampling {total_s * 1000:.0f} ms ({args.n / total_s:.1f} images/s)  {stages}")
    return 0


def write_comparison(args, pipeline, result, baseline, out: Path) -> None:
    """--stages and/or --compare-baseline: the baseline samples the same classes from the same seed."""
    import numpy as np
    import torch

    from ctfgen.images import to_uint8
    from ctfgen.stages import side_by_side, stage_figure, stage_rows

    base = None
    if baseline is not None:
        generator = torch.Generator(device=args.device).manual_seed(args.seed)
        with torch.inference_mode():
            shared = {k: v for k, v in sampling_kwargs(args, pipeline).items() if k in baseline.sampling_defaults}
            base = baseline(result.labels, generator=generator, **shared)
        print("baseline timings: " + "  ".join(f"{k} {v * 1000:.0f} ms" for k, v in base.timings.items()))
    if args.stages:
        figure = stage_figure(stage_rows(pipeline, result, None if base is None else base.images),
                              nrow=args.nrow, scale=args.scale)
        print(f"stage 2 chose a codeword other than the representative at {float(result.changed.float().mean()):.0%} of positions")
    else:
        rgb = [np.repeat(a, 3, -1) if a.shape[-1] == 1 else a for a in (to_uint8(result.images), to_uint8(base.images))]
        figure = side_by_side([("CTF", stage_figure([("", rgb[0])], nrow=args.nrow, scale=args.scale)),
                               ("baseline", stage_figure([("", rgb[1])], nrow=args.nrow, scale=args.scale))])
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.save(out)
