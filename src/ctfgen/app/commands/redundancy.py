"""`ctfgen redundancy --tokenizer DIR --num-coarse 512 --images 16 --out grid.png`

Swaps tokens within k-means clusters, within a random map's clusters and across the whole codebook,
and reports how much each changes the decoded images (paper Fig. 1b).
"""

from __future__ import annotations

import argparse

from ctfgen.app.commands._common import add_device_argument, check_args
from ctfgen.experiments.redundancy import redundancy_report, redundancy_table
from ctfgen.utils.options import check_output_file


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
    parser.add_argument("--seed", type=int, default=0, help="seed of the swaps, the images chosen and a random map (default: %(default)s)")
    add_device_argument(parser, None)


def run(args: argparse.Namespace) -> int:
    check_args(args)
    check_output_file(args.out, "image", "--out")
    if args.json:
        check_output_file(args.json, ".json", "--json")

    result = redundancy_report(args.tokenizer, args.model, args.coarse_map, args.num_coarse, args.images, args.data,
                               args.split, args.image_size, args.out, args.json, args.scale, args.grid_columns,
                               args.seed, args.device)
    print(redundancy_table(result))
    print(f"wrote {result['grid']} (rows: original, reconstruction, in-cluster, random-map, whole-codebook swap)")
    if args.json:
        print(f"wrote {args.json}")
    return 0
