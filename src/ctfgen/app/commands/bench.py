"""`ctfgen bench`: the baseline and CTF, same stage-1 size, same machine, one run; with --profile,
--speedups, --matmul, --busy, --quality or --compile, the other measurements of
docs/performance.md (see ctfgen.app.bench)."""

from __future__ import annotations

import argparse

import torch

from ctfgen.app import bench
from ctfgen.app.commands._common import add_device_argument, check_args
from ctfgen.utils.options import Option
from ctfgen.utils.precision import DTYPE_CHOICES

# What each mode measures when --models / --batch-sizes / --dtype are not given.
DEFAULTS = {
    "bench": dict(models=["fashion-mnist", "GPT-B"], batch_sizes=[1, 8, 64], dtype=["float32", "bfloat16"]),
    "profile": dict(models=["GPT-B"], batch_sizes=[8], dtype=["float32", "bfloat16"]),
    "speedups": dict(models=["GPT-B"], batch_sizes=[8], dtype=["float32", "bfloat16"]),
    "compile": dict(models=["fashion-mnist", "GPT-B"], batch_sizes=[8], dtype=["float32"]),
    "matmul": dict(dtype=["float32", "bfloat16", "int8", "int8-weight", "int8-fbgemm"]),
    "busy": dict(models=["fashion-mnist", "GPT-B"], dtype=["bfloat16"]),
    "quality": dict(models=["fashion-mnist", "fashion-mnist-baseline"], dtype=["float32", "bfloat16", "int8"]),
}
ZERO_OR_MORE = Option("count", 0, integer=True)


def configure_bench(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--profile", action="store_const", dest="mode", const="profile",
                      help="profile the decode steps of a random-weight GPT (the first of --models, default GPT-B) "
                           "at the first of --batch-sizes (default 8): ms per step by part")
    mode.add_argument("--speedups", action="store_const", dest="mode", const="speedups",
                      help="what each decode-step speed-up gives against what it replaced (GPT preset and batch as --profile)")
    mode.add_argument("--compile", action="store_const", dest="mode", const="compile",
                      help="tokens/s of generate eager and with torch.compile of the decode step, per --models, "
                           "--batch-sizes and --dtype (the first compiled call is timed apart)")
    mode.add_argument("--matmul", action="store_const", dest="mode", const="matmul",
                      help="GFLOP/s of nn.Linear per --dtype: the ceiling for the decode step's linear layers")
    mode.add_argument("--busy", action="store_const", dest="mode", const="busy",
                      help="sampling speed on quiet cores and beside a busy loop on one core, per thread setting")
    mode.add_argument("--quality", action="store_const", dest="mode", const="quality",
                      help="FD, class consistency and held-out bits/token of the shipped models per --dtype and --seeds")
    parser.set_defaults(mode="bench")
    parser.add_argument("--models", nargs="+", default=None,
                        help="fashion-mnist (shipped models) and/or paper shapes GPT-B, GPT-L, GPT-XL (random weights); "
                             "default per mode: " + "; ".join(f"{m}: {' '.join(d['models'])}" for m, d in DEFAULTS.items() if "models" in d))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="batch sizes to time, each in turn (default: 1 8 64; --profile, --speedups, --compile: 8)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed runs per setting, after the warm-up; each figure is their median (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before them (default: %(default)s)")
    parser.add_argument("--methods", nargs="+", default=["baseline", "ctf"], choices=["baseline", "ctf"],
                        help="which methods to time (default: both; --llamagen adds LlamaGen's sampler either way)")
    parser.add_argument("--llamagen", action="store_true",
                        help="also time LlamaGen's own sampler beside the baseline (float precisions)")
    parser.add_argument("--llamagen-steps", type=int, default=None,
                        help="time LlamaGen's sampler over this many decode steps of each image and scale to the "
                             "whole image (its steps all cost the same); default: every step")
    parser.add_argument("--image-tokens", type=int, default=256, help="grid of the paper shapes (256 = 16x16)")
    parser.add_argument("--num-coarse", type=int, default=512,
                        help="coarse labels (clusters) of the paper shapes' random coarse map (default: %(default)s, the paper's)")
    parser.add_argument("--aux-preset", default="Aux-L", help="the paper's main auxiliary model is 343M (GPT-L size)")
    parser.add_argument("--no-decode", action="store_true", help="skip the tokenizer decode for the paper shapes")
    parser.add_argument("--cfg-scale", type=float, default=2.0,
                        help="classifier-free guidance of stage 1 and the baseline (default: %(default)s)")
    add_device_argument(parser)
    parser.add_argument("--dtype", nargs="+", default=None, choices=DTYPE_CHOICES,
                        help="precisions to time, each in turn (default per mode: "
                             + "; ".join(f"{m}: {' '.join(d['dtype'])}" for m, d in DEFAULTS.items()) + ")")
    parser.add_argument("--threads", type=_threads, default=None,
                        help="CPU threads: a number, or auto = what the ctfgen command would use for each model "
                             "(ctfgen.utils.threads); default: torch's, one per core; --busy sets its own per setting")
    parser.add_argument("--per-class", type=int, default=500,
                        help="--quality: samples per class and seed; 0 = held-out bits/token only (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="--quality: seeds (default: %(default)s)")
    parser.add_argument("--sample-dtype", nargs="+", default=None, choices=DTYPE_CHOICES,
                        help="--quality: draw samples for these precisions only (default: every --dtype); "
                             "the held-out bits/token are scored for every --dtype")
    parser.add_argument("--test-images", type=int, default=None,
                        help="--quality: score bits/token on this many Fashion-MNIST test images, class-balanced "
                             "(default: all 10000)")
    parser.add_argument("--json", default=None, help="also write the results here")


def _threads(value: str):
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of threads or auto, got {value!r}")
    return int(value)


def run_bench(args: argparse.Namespace) -> None:
    check_args(args, batch_sizes="batch_size", seeds="seed", test_images="images", warmup=ZERO_OR_MORE,
               per_class=ZERO_OR_MORE, llamagen_steps=ZERO_OR_MORE, outputs={"json": ".json"})
    for key, value in DEFAULTS[args.mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if isinstance(args.threads, int):
        torch.set_num_threads(args.threads)

    if args.mode == "profile":
        bench.profile_decode(args.models[0], args.batch_sizes[0], args.cfg_scale, args.dtype, args.image_tokens,
                             device=args.device, json_path=args.json)
    elif args.mode == "speedups":
        bench.decode_speedups(args.models[0], args.batch_sizes[0], args.cfg_scale, args.dtype, args.image_tokens,
                              device=args.device, json_path=args.json)
    elif args.mode == "compile":
        bench.compile_speedup(args.models, args.batch_sizes, args.dtype, args.cfg_scale, args.repeats, args.device,
                              json_path=args.json)
    elif args.mode == "matmul":
        bench.matmul_rates(args.dtype, json_path=args.json)
    elif args.mode == "busy":
        bench.busy_machine(args.models, dtype=args.dtype[0], repeats=args.repeats, json_path=args.json)
    elif args.mode == "quality":
        bench.sampling_quality(args.models, args.dtype, args.seeds, args.per_class, test_images=args.test_images,
                               sample_dtypes=args.sample_dtype, json_path=args.json)
    else:
        bench.run_bench(args.models, args.batch_sizes, args.repeats, args.image_tokens, args.num_coarse,
                        args.aux_preset, not args.no_decode, args.cfg_scale, args.device, args.dtype, args.json,
                        llamagen=args.llamagen, warmup=args.warmup, llamagen_steps=args.llamagen_steps,
                        threads=args.threads, methods=args.methods)
