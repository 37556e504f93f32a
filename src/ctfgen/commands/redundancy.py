"""`ctfgen redundancy --tokenizer DIR --num-coarse 512 --images 16 --out grid.png`

Swaps tokens within k-means clusters, within a random map's clusters and across the whole codebook,
and reports how much each changes the decoded images (paper Fig. 1b).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ctfgen.errors import ConfigError


def configure(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--tokenizer", help="a saved VQModel directory (config.json + model.safetensors)")
    src.add_argument("--model", help="a pipeline directory; its tokenizer (and, for CTF, its coarse map) are used")
    parser.add_argument("--coarse-map", help="a coarse_map.safetensors to test (default: the CTF pipeline's, "
                                             "else a k-means map fitted now with --num-coarse)")
    parser.add_argument("--num-coarse", type=int, default=None,
                        help="clusters for a map fitted now (default: 512, capped at the codebook size)")
    parser.add_argument("--images", type=int, default=16, help="number of images (default: %(default)s)")
    parser.add_argument("--data", default="fashion_mnist",
                        help="'fashion_mnist' or an image folder root/<class>/<image> (default: %(default)s)")
    parser.add_argument("--split", default="test", help="Fashion-MNIST split (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=None, help="image side for a folder (default: 256)")
    parser.add_argument("--out", default="redundancy.png", help="image grid: rows original, reconstruction, "
                                                                "in-cluster, random-map, whole-codebook swap")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    parser.add_argument("--scale", type=int, default=4, help="enlarge the grid by this factor (nearest)")
    parser.add_argument("--grid-columns", type=int, default=16, help="images shown in the grid (the numbers use all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)


def _load_images(args, n: int, channels: int):
    import numpy as np
    import torch

    rng = np.random.default_rng(args.seed)
    if args.data == "fashion_mnist":
        from ctfgen.data.fashion_mnist import FashionMNIST

        ds = FashionMNIST(args.split, image_size=args.image_size or 28)
    else:
        from ctfgen.data.folder import ImageFolder

        ds = ImageFolder(args.data, image_size=args.image_size or 256, channels=channels)
    if n > len(ds):
        raise ConfigError(f"--images {n} but the data set has only {len(ds)} images")
    idx = np.sort(rng.choice(len(ds), size=n, replace=False))
    x = torch.stack([ds[int(i)][0] for i in idx])
    if x.shape[1] == 1 and channels == 3:
        x = x.repeat(1, 3, 1, 1)
    if x.shape[1] != channels:
        raise ConfigError(f"the images have {x.shape[1]} channels but the tokenizer expects {channels}")
    return x


def run(args: argparse.Namespace) -> int:
    import torch

    from ctfgen.clustering import CoarseMap
    from ctfgen.images import save_grid
    from ctfgen.redundancy import SWAPS, format_table, measure_redundancy

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cmap = None
    if args.model:
        from ctfgen.pipeline import CTFPipeline, load_pipeline

        pipe = load_pipeline(args.model)
        if pipe.tokenizer is None:
            raise ConfigError(f"{args.model} has no tokenizer/ directory")
        vq = pipe.tokenizer
        if isinstance(pipe, CTFPipeline) and args.coarse_map is None and args.num_coarse is None:
            cmap = pipe.coarse_map
    else:
        from ctfgen.tokenizer.vq import VQModel

        vq = VQModel.from_pretrained(args.tokenizer)
    vq = vq.to(device).eval()
    if args.coarse_map:
        cmap = CoarseMap.load(args.coarse_map)
        if args.num_coarse is not None and args.num_coarse != cmap.num_coarse:
            raise ConfigError(f"--num-coarse {args.num_coarse} disagrees with {args.coarse_map} ({cmap.num_coarse} clusters)")
    if cmap is None:
        k = args.num_coarse or min(512, vq.config.codebook_size)
        cmap = CoarseMap.fit(vq, k, seed=args.seed)
        print(f"fitted k-means with {k} clusters in {cmap.fit_seconds:.1f} s")
    try:
        cmap.check_codebook(vq)
    except ValueError as e:
        raise ConfigError(str(e)) from None

    images = _load_images(args, args.images, vq.config.in_channels)
    result = measure_redundancy(vq, cmap, images, seed=args.seed, return_images=True)
    rows = result.pop("images")
    print(format_table(result))
    shown = min(args.images, args.grid_columns)
    grid = torch.cat([rows[k][:shown].cpu() for k in ("original", "reconstruction", *SWAPS)])
    out = save_grid(grid, args.out, nrow=shown, scale=args.scale)
    print(f"wrote {out} (rows: original, reconstruction, in-cluster, random-map, whole-codebook swap)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
