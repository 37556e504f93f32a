"""The commands that measure: `eval` (metrics of a sample set), `compare` (several evaluated runs in one
table), `redundancy` (paper Fig. 1b), `reproduce` (ablations, evaluation and report on a finished
pipeline run), `study` (the codebook-size study's records, tables and figures) and `bench` (the speed of
the baseline and CTF, and the other measurements of docs/performance.md, see ctfgen.app.bench)."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

import torch

from ctfgen.app import bench
from ctfgen.app.commands._common import add_device_argument, add_print_config, check_args, print_config
from ctfgen.config import ReproduceConfig, StudySettings, load_config
from ctfgen.experiments.redundancy import redundancy_report, redundancy_table
from ctfgen.experiments.reproduce import reproduce
from ctfgen.experiments.run import FinishedRun
from ctfgen.experiments.study import study_run, write_report
from ctfgen.metrics.compare import compare, record_summary
from ctfgen.metrics.evaluate import evaluate, write_record
from ctfgen.utils.errors import ConfigError
from ctfgen.utils.fileio import atomic_write_text
from ctfgen.utils.options import Option
from ctfgen.utils.precision import DTYPE_CHOICES


def configure_eval(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("samples", help="an ADM-style .npz (uint8 arr_0 N,H,W,C; labels in 'labels' or arr_1) or a folder of images")
    add("--ref", required=True, help="an ADM reference batch .npz (its mu/sigma are used if present) or a folder of "
        "images; with --metric-set fmnist also 'fashion-mnist-test' (or 'test') / 'fashion-mnist-train' (or 'train'), "
        "refused there if a path of that name exists too (write ./NAME for the path; with inception it is the path)")
    add("--metric-set", choices=["inception", "fmnist"], default="inception",
        help="inception: FID/sFID/IS/precision/recall (needs the Inception weights file); fmnist: the same on the "
             "shipped Fashion-MNIST classifier's features, plus class consistency (offline; not comparable to ImageNet FID)")
    add("--out", help="write the evaluation record to this JSON file")
    add("--name", help="run name stored in the record (default: the samples' file name)")
    add("--epoch", type=int, help="training epoch of the evaluated model, for `ctfgen compare`")
    add("--inception-weights", help="path to weights-inception-2015-12-05-6726825d.pth or a folder holding it "
                                    "(default: $CTFGEN_INCEPTION_WEIGHTS, then ~/.cache/ctfgen/)")
    add("--k", type=int, default=3, help="nearest neighbour for precision/recall radii")
    add("--splits", type=int, default=10, help="splits for the Inception Score")
    add("--batch-size", type=int, default=50, help="images per feature-extraction batch")
    add_device_argument(parser, None)
    add("--no-sfid", action="store_true", help="skip sFID (saves a little time)")


def run_eval(args: argparse.Namespace) -> None:
    check_args(args, outputs={"out": ".json"})
    record = evaluate(args.samples, args.ref, metric_set=args.metric_set, name=args.name, epoch=args.epoch,
                      inception_weights=args.inception_weights, k=args.k, splits=args.splits,
                      batch_size=args.batch_size, device=args.device, sfid=not args.no_sfid)
    print(record_summary(record))
    if args.out:
        print(f"wrote {write_record(record, args.out)}")


def configure_compare(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="an evaluation JSON (from `ctfgen eval --out`) or a run directory holding RUN/eval/*.json")
    parser.add_argument("--out", help="directory for compare.md and one <metric>.png per metric (against training epoch)")


def run_compare(args: argparse.Namespace) -> None:
    check_args(args, outputs={"out": "dir"})
    table, pngs = compare(args.runs, args.out)
    print(table, end="")
    if args.out:
        print(f"wrote {args.out}/compare.md" + (f" and {len(pngs)} figures" if pngs else
                                                 " (no figures: no record has an epoch)"))


def configure_redundancy(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokenizer", help="a saved VQModel directory (config.json + model.safetensors)")
    source.add_argument("--model", help="a pipeline directory; its tokenizer (and, for CTF, its coarse map) are used")
    add = parser.add_argument
    add("--coarse-map", help="a coarse_map.safetensors to test (default: the CTF pipeline's, else a k-means map "
                             "fitted now with --num-coarse)")
    add("--num-coarse", type=int, help="clusters for a map fitted now (default: 512, capped at the codebook size)")
    add("--images", type=int, default=16, help="number of images")
    add("--data", default="fashion_mnist", help="'fashion_mnist' or an image folder root/<class>/<image>")
    add("--split", default="test", help="Fashion-MNIST split")
    add("--image-size", type=int, help="image side for a folder (default: 256)")
    add("--out", default="redundancy.png",
        help="image grid: rows original, reconstruction, in-cluster, random-map, whole-codebook swap")
    add("--json", help="also write the numbers here")
    add("--scale", type=int, default=4, help="enlarge the grid by this factor (nearest)")
    add("--grid-columns", type=int, default=16, help="images shown in the grid (the numbers use all)")
    add("--seed", type=int, default=0, help="seed of the swaps, the images chosen and a random map")
    add_device_argument(parser, None)


def run_redundancy(args: argparse.Namespace) -> None:
    check_args(args, outputs={"out": "image", "json": ".json"})
    result = redundancy_report(args.tokenizer, args.model, args.coarse_map, args.num_coarse, args.images, args.data,
                               args.split, args.image_size, args.out, args.json, args.scale, args.grid_columns,
                               args.seed, args.device)
    print(redundancy_table(result))
    print(f"wrote {result['grid']} (rows: original, reconstruction, in-cluster, random-map, whole-codebook swap)")
    if args.json:
        print(f"wrote {args.json}")


def configure_reproduce(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("settings", nargs="?", help="reproduce settings YAML (e.g. configs/fashion_mnist_ablations.yaml; default: built-in)")
    add("--run", help="the finished `ctfgen pipeline` directory (required unless --print-config)")
    add("--independent-only", action="store_true", help="only train the ablations that need no main-run model (they "
        "can run beside the main run once its codes exist), then stop")
    add("--force", action="store_true", help="recompute records made from other settings, models or code (refused otherwise)")
    add_print_config(parser, config="settings", overrides="override settings (e.g. steps=100)")


def run_reproduce(args: argparse.Namespace) -> None:
    settings = load_config(ReproduceConfig, args.settings, args.overrides)
    if not print_config(args, settings, "run"):
        reproduce(args.run, settings, independent_only=args.independent_only, force=args.force)


# The StudySettings fields `ctfgen study` takes as options (type and default: the field's): the rule of
# ctfgen.utils.options their values are checked by, and their help.
STUDY_OPTIONS = {
    "guidance": ("cfg_scale", "guidance scales tried on the validation split"),
    "temperatures": ("temperature", "stage-1 (baseline: the only) temperatures tried on the validation split"),
    "seeds": ("seed", "sampling seeds of the test cells"),
    "test_per_class": ("per_class", "test samples per class per cell"),
    "select_per_class": ("per_class", "validation samples per class (of 10) per grid point"),
    "select_seed": ("seed", "the selection's sampling seed, apart from the test seeds"),
    "diagnosis_per_class": ("per_class", "test images per class that the diagnosis sets are made from; the rest are "
                                         "their reference"),
    "diagnosis_seed": ("seed", "the diagnosis' sampling seed"),
    "epoch_per_class": ("per_class", "samples per class of each epoch snapshot, at the chosen setting, for Fréchet "
                                     "distance against epoch"),
    "epoch_seed": ("seed", "the epoch snapshots' sampling seed"),
    "heldout_images": ("per_class", "test images for the held-out bits per token at every epoch"),
    "tokenizer_images": ("tokenizer_images", "test images for codebook usage and PSNR (default: the whole test split)"),
    "batch_size": ("batch_size", "sampling batch size; it shapes the random streams"),
}


def configure_study(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("runs", nargs="*", help="finished pipeline run directories (none: only --report)")
    add("--records", help="directory of the study's JSON records (required unless --print-config)")
    add("--report", help="write the markdown tables here (figures beside it)")
    defaults, hints = StudySettings(), typing.get_type_hints(StudySettings)
    for name, (_, help_text) in STUDY_OPTIONS.items():
        many = typing.get_origin(hints[name]) is tuple
        kind = (typing.get_args(hints[name]) or [hints[name]])[0]  # float of tuple[float, ...], int of int | None
        add("--" + name.replace("_", "-"), type=kind, nargs="+" if many else None,
            default=list(getattr(defaults, name)) if many else getattr(defaults, name), help=help_text)
    add("--baselines-from", metavar="RUN", help="the finished run whose baselines each RUN without its own "
        "(baseline.enabled: false, e.g. the auxiliary model at 1x) is compared with; it must share their tokenizer, "
        "coarse map and codes, and be studied first")
    add("--force", action="store_true", help="recompute records made from other settings, models or code (refused otherwise)")
    add_print_config(parser)


def run_study(args: argparse.Namespace) -> None:
    """Each RUN is a finished `ctfgen pipeline` run of configs/study/fmnist_v<V>.yaml; every measurement
    is one JSON record under RECORDS/<run>/, computed once; the report is made from the records alone."""
    outputs = {"report": None, **({"records": "dir"} if args.runs else {})}  # a report alone only reads the records
    check_args(args, outputs=outputs, **{name: rule for name, (rule, _) in STUDY_OPTIONS.items()})
    settings = StudySettings(**{name: getattr(args, name) for name in STUDY_OPTIONS})
    if print_config(args, settings, "records"):
        return
    own = {run_dir: FinishedRun(run_dir).settings.baseline.enabled for run_dir in args.runs}
    if args.baselines_from is not None and all(own.values()):
        raise ConfigError(f"--baselines-from {args.baselines_from}: every RUN has baselines of its own; it is for "
                          "a run without (baseline.enabled: false)")
    for run_dir in args.runs:
        study_run(run_dir, args.records, settings, force=args.force,
                  baselines_from=None if own[run_dir] else args.baselines_from)
    if args.report:
        report = Path(args.report)
        atomic_write_text(report, write_report(args.records, figure_dir=report.parent) + "\n")
        print(f"wrote {report} and its figures")


MODES = {  # the measurements other than the default one: --NAME, what it measures
    "profile": "profile the decode steps of a random-weight GPT (the first of --models, default GPT-B) at the first "
               "of --batch-sizes (default 8): ms per step by part",
    "speedups": "what each decode-step speed-up gives against what it replaced (GPT preset and batch as --profile)",
    "compile": "tokens/s of generate eager and with torch.compile of the decode step, per --models, --batch-sizes and "
               "--dtype (the first compiled call is timed apart)",
    "matmul": "GFLOP/s of nn.Linear per --dtype: the ceiling for the decode step's linear layers",
    "busy": "sampling speed on quiet cores and beside a busy loop on one core, per thread setting",
    "quality": "FD, class consistency and held-out bits/token of the shipped models per --dtype and --seeds",
}
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
# --llamagen-steps: the time of 0 decode steps (the prefill and the cache set-up) scaled to a whole image is no speed
ONE_OR_MORE = Option("count", 1, integer=True)


def per_mode(key: str) -> str:
    return "; ".join(f"{mode}: {' '.join(map(str, d[key]))}" for mode, d in DEFAULTS.items() if key in d)


def configure_bench(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group()
    for name, help_text in MODES.items():
        mode.add_argument("--" + name, action="store_const", dest="mode", const=name, help=help_text)
    parser.set_defaults(mode="bench")
    add = parser.add_argument
    add("--models", nargs="+", help="fashion-mnist (shipped models) and/or paper shapes GPT-B, GPT-L, GPT-XL (random "
                                    "weights); default per mode: " + per_mode("models"))
    add("--batch-sizes", type=int, nargs="+",
        help=f"batch sizes to time, each in turn (default per mode: {per_mode('batch_sizes')})")
    add("--repeats", type=int, default=5, help="timed runs per setting, after the warm-up; each figure is their median")
    add("--warmup", type=int, default=1, help="untimed runs before them")
    add("--methods", nargs="+", default=["baseline", "ctf"], choices=["baseline", "ctf"],
        help="which methods to time (default: both; --llamagen adds LlamaGen's sampler either way)")
    add("--llamagen", action="store_true", help="also time LlamaGen's own sampler beside the baseline (float precisions)")
    add("--llamagen-steps", type=int, help="time LlamaGen's sampler over this many decode steps of each image and "
        "scale to the whole image (its steps all cost the same); default: every step")
    add("--image-tokens", type=int, default=256, help="grid of the paper shapes (256 = 16x16)")
    add("--num-coarse", type=int, default=512, help="clusters of the paper shapes' random coarse map (the paper's number)")
    add("--aux-preset", default="Aux-L", help="the paper's main auxiliary model is 343M (GPT-L size)")
    add("--no-decode", action="store_true", help="skip the tokenizer decode for the paper shapes")
    add("--cfg-scale", type=float, default=2.0, help="classifier-free guidance of stage 1 and the baseline")
    add_device_argument(parser)
    add("--dtype", nargs="+", choices=DTYPE_CHOICES,
        help=f"precisions to time, each in turn (default per mode: {per_mode('dtype')})")
    add("--threads", type=_threads, help="CPU threads: a number, or auto = what the ctfgen command would use for each "
        "model (ctfgen.utils.threads); default: torch's, one per core; --busy sets its own per setting")
    add("--per-class", type=int, default=500, help="--quality: samples per class and seed; 0 = held-out bits/token only")
    add("--seeds", type=int, nargs="+", default=[0, 1, 2], help="--quality: seeds")
    add("--sample-dtype", nargs="+", choices=DTYPE_CHOICES, help="--quality: draw samples for these precisions only "
        "(default: every --dtype); the held-out bits/token are scored for every --dtype")
    add("--test-images", type=int, help="--quality: score bits/token on this many Fashion-MNIST test images, "
                                        "class-balanced (default: all 10000)")
    add("--json", help="also write the results here")


def _threads(value: str):
    if value != "auto" and not (value.isdigit() and int(value) >= 1):
        raise argparse.ArgumentTypeError(f"expected a positive number of threads or auto, got {value!r}")
    return value if value == "auto" else int(value)


def run_bench(args: argparse.Namespace) -> None:
    check_args(args, batch_sizes="batch_size", seeds="seed", test_images="images", warmup=ZERO_OR_MORE,
               per_class=ZERO_OR_MORE, llamagen_steps=ONE_OR_MORE, outputs={"json": ".json"})
    for key, value in DEFAULTS[args.mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if isinstance(args.threads, int):
        torch.set_num_threads(args.threads)

    if args.mode in ("profile", "speedups"):
        measure = bench.profile_decode if args.mode == "profile" else bench.decode_speedups
        measure(args.models[0], args.batch_sizes[0], args.cfg_scale, args.dtype, args.image_tokens,
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
