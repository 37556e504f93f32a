"""`ctfgen bench`: the baseline and CTF, same stage-1 size, same machine, one run (see ctfgen.bench)."""

from __future__ import annotations

import argparse

from ctfgen.bench import run_bench
from ctfgen.commands._common import add_device_argument, check_args
from ctfgen.options import check, check_output_file
from ctfgen.precision import DTYPE_CHOICES


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=["fashion-mnist", "GPT-B"],
                        help="fashion-mnist (shipped models) and/or paper shapes GPT-B, GPT-L, GPT-XL (random weights)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64],
                        help="batch sizes to time, each in turn (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per setting (after one warm-up)")
    parser.add_argument("--image-tokens", type=int, default=256, help="grid of the paper shapes (256 = 16x16)")
    parser.add_argument("--num-coarse", type=int, default=512,
                        help="coarse labels (clusters) of the paper shapes' random coarse map (default: %(default)s, the paper's)")
    parser.add_argument("--aux-preset", default="Aux-L", help="the paper's main auxiliary model is 343M (GPT-L size)")
    parser.add_argument("--no-decode", action="store_true", help="skip the tokenizer decode for the paper shapes")
    parser.add_argument("--cfg-scale", type=float, default=2.0,
                        help="classifier-free guidance of stage 1 and the baseline (default: %(default)s)")
    add_device_argument(parser)

    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=DTYPE_CHOICES,
                        help="precisions to time, each in turn (default: %(default)s)")
    parser.add_argument("--json", default=None, help="also write the results here")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    args.cfg_scale = check("cfg_scale", args.cfg_scale, "--cfg-scale")
    args.batch_sizes = [check("batch_size", b, "--batch-sizes") for b in args.batch_sizes]
    if args.json:
        check_output_file(args.json, ".json", "--json")

    run_bench(args.models, args.batch_sizes, args.repeats, args.image_tokens, args.num_coarse, args.aux_preset,
              not args.no_decode, args.cfg_scale, args.device, args.dtype, args.json)
    return 0
