"""`ctfgen cluster`: fit a CoarseMap on a tokenizer's codebook (CTF's stage-1 vocabulary)."""

from __future__ import annotations

import argparse

from ctfgen.app.commands._common import check_args
from ctfgen.clustering import CoarseMap
from ctfgen.tokenizer.vq import VQModel
from ctfgen.utils.errors import ConfigError
from ctfgen.utils.options import check_output_file


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", required=True, help="VQModel directory (save_pretrained form)")
    parser.add_argument("--num-coarse", type=int, default=512, help="number of coarse labels K (paper: 512)")
    parser.add_argument("--method", choices=["kmeans", "random"], default="kmeans",
                        help="kmeans on the codewords as the tokenizer uses them, or balanced random groups")
    parser.add_argument("--seed", type=int, default=0, help="seed of k-means' starts or of the random groups (default: %(default)s)")
    parser.add_argument("--n-init", type=int, default=4, help="k-means restarts (the lowest inertia is kept)")
    parser.add_argument("--out", required=True, help="output file (.safetensors)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    out = check_output_file(args.out, ".safetensors", "--out")
    if out.exists() and not args.overwrite:
        raise ConfigError(f"{out} already exists; pass --overwrite to replace it")
    vq = VQModel.from_pretrained(args.tokenizer)
    cmap = CoarseMap.fit(vq, args.num_coarse, method=args.method, seed=args.seed, n_init=args.n_init)
    cmap.save(out)
    s = cmap.stats()
    extra = f", mean within-cluster spread {s['spread_mean']:.4f}" if "spread_mean" in s else ""
    print(f"{cmap}\ncluster sizes {s['size_min']}..{s['size_max']} (mean {s['size_mean']:.1f}){extra}; "
          f"fitted in {cmap.fit_seconds:.2f}s; saved to {out}")
    return 0
