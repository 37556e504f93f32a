"""`ctfgen sample --class sneaker --n 16 --out samples.png`"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ctfgen.commands._common import add_model_arguments, add_sampling_arguments, load_model, resolve_classes, sampling_kwargs
from ctfgen.errors import ConfigError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--class", dest="classes", nargs="+", default=["0"], metavar="CLASS",
                        help="class names or ids; several are cycled through (default: 0)")
    parser.add_argument("--n", type=int, default=16, help="number of images (default: %(default)s)")
    parser.add_argument("--out", default="samples.png", help="PNG grid; single images go to a folder of the same stem")
    parser.add_argument("--nrow", type=int, default=8)
    parser.add_argument("--scale", type=int, default=4, help="enlarge the grid by this factor (nearest)")
    parser.add_argument("--no-singles", action="store_true", help="write only the grid")
    add_model_arguments(parser)
    add_sampling_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import torch

    from ctfgen.images import save_grid, save_images

    if args.n < 1:
        raise ConfigError("--n must be at least 1")
    t0 = time.perf_counter()
    pipeline = load_model(args.model, args.device)
    load_s = time.perf_counter() - t0
    classes = resolve_classes(args.classes, pipeline.num_classes, getattr(pipeline, "class_names", None))
    labels = torch.tensor([classes[i % len(classes)] for i in range(args.n)], device=args.device)

    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    t0 = time.perf_counter()
    with torch.inference_mode():
        images = pipeline.sample(labels, generator=generator, **sampling_kwargs(args, pipeline))
    total_s = time.perf_counter() - t0

    out = Path(args.out)
    save_grid(images, out, nrow=args.nrow, scale=args.scale)
    print(f"wrote {out} ({args.n} images of {images.shape[-2]}x{images.shape[-1]})")
    if not args.no_singles:
        names = [f"{i:04d}_class{int(c)}" for i, c in enumerate(labels.tolist())]
        save_images(images, out.with_suffix(""), names)
        print(f"wrote {args.n} single images to {out.with_suffix('')}/")

    timings = dict(getattr(pipeline, "last_timings", {}) or {})
    stages = "  ".join(f"{k} {v * 1000:.0f} ms" for k, v in timings.items())
    print(f"timings: load {load_s:.2f} s  sampling {total_s * 1000:.0f} ms ({args.n / total_s:.1f} images/s)  {stages}")
    return 0
