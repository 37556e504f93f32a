"""The commands that measure: `eval` (metrics of a sample set), `compare` (several evaluated runs in one
table), `redundancy` (paper Fig. 1b), `reproduce` (ablations, evaluation and report on a finished
pipeline run) and `study` (the codebook-size study's records, tables and figures)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

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


def configure_eval(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("samples", help="sample set: an ADM-style .npz (uint8 arr_0 (N,H,W,C), labels under "
                                        "'labels' or arr_1) or a folder of images")
    parser.add_argument("--ref", required=True,
                        help="reference: an ADM reference batch .npz (precomputed mu/sigma are used if present) "
                             "or a folder of images; with --metric-set fmnist also 'fashion-mnist-test' "
                             "(or 'test') / 'fashion-mnist-train'")
    parser.add_argument("--metric-set", choices=["inception", "fmnist"], default="inception",
                        help="inception: FID/sFID/IS/precision/recall (needs the Inception weights file); "
                             "fmnist: the same in the shipped Fashion-MNIST classifier's feature space, plus "
                             "class consistency (offline; not comparable to ImageNet FID)")
    parser.add_argument("--out", default=None, help="write the evaluation record to this JSON file")
    parser.add_argument("--name", default=None, help="run name stored in the record (default: the samples' file name)")
    parser.add_argument("--epoch", type=int, default=None, help="training epoch of the evaluated model, for `ctfgen compare`")
    parser.add_argument("--inception-weights", default=None,
                        help="path to weights-inception-2015-12-05-6726825d.pth (default: $CTFGEN_INCEPTION_WEIGHTS, "
                             "then ~/.cache/ctfgen/)")
    parser.add_argument("--k", type=int, default=3, help="nearest neighbour for precision/recall radii")
    parser.add_argument("--splits", type=int, default=10, help="splits for the Inception Score")
    parser.add_argument("--batch-size", type=int, default=50, help="images per feature-extraction batch (default: %(default)s)")
    add_device_argument(parser, None)
    parser.add_argument("--no-sfid", action="store_true", help="skip sFID (saves a little time)")


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
    parser.add_argument("--out", default=None,
                        help="directory for compare.md and one <metric>.png per metric (against training epoch)")


def run_compare(args: argparse.Namespace) -> None:
    table, pngs = compare(args.runs, args.out)
    print(table, end="")
    if args.out:
        print(f"wrote {args.out}/compare.md" + (f" and {len(pngs)} figures" if pngs else
                                                 " (no figures: no record has an epoch)"))


def configure_redundancy(parser: argparse.ArgumentParser) -> None:
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


def run_redundancy(args: argparse.Namespace) -> None:
    """Swaps tokens within k-means clusters, within a random map's clusters and across the whole
    codebook, and reports how much each changes the decoded images."""
    check_args(args, outputs={"out": "image", "json": ".json"})
    result = redundancy_report(args.tokenizer, args.model, args.coarse_map, args.num_coarse, args.images, args.data,
                               args.split, args.image_size, args.out, args.json, args.scale, args.grid_columns,
                               args.seed, args.device)
    print(redundancy_table(result))
    print(f"wrote {result['grid']} (rows: original, reconstruction, in-cluster, random-map, whole-codebook swap)")
    if args.json:
        print(f"wrote {args.json}")


def configure_reproduce(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("settings", nargs="?", default=None,
                        help="YAML of reproduce settings (e.g. configs/fashion_mnist_ablations.yaml); default: built-in")
    parser.add_argument("--run", default=None, help="the finished `ctfgen pipeline` directory (required unless --print-config)")
    parser.add_argument("--independent-only", action="store_true",
                        help="only train the ablations that need no main-run model (they can run beside "
                             "the main run once its codes exist), then stop")
    parser.add_argument("--force", action="store_true",
                        help="recompute evaluation records made from other settings, models or code (refused otherwise)")
    add_print_config(parser, config="settings", overrides="override settings (e.g. steps=100)")


def run_reproduce(args: argparse.Namespace) -> None:
    settings = load_config(ReproduceConfig, args.settings, args.overrides)
    if not print_config(args, settings, "run"):
        reproduce(args.run, settings, independent_only=args.independent_only, force=args.force)


def configure_study(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="*", help="finished pipeline run directories (none: only --report)")
    parser.add_argument("--records", default=None,
                        help="directory of the study's JSON records (required unless --print-config)")
    parser.add_argument("--report", default=None, help="write the markdown tables here (figures beside it)")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.5, 2.0, 3.0],
                        help="guidance scales tried on the validation split (default: %(default)s)")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.9, 1.0, 1.1],
                        help="stage-1 (baseline: the only) temperatures tried on the validation split (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="sampling seeds of the test cells")
    parser.add_argument("--test-per-class", type=int, default=500,
                        help="test samples per class per cell (default: %(default)s)")
    parser.add_argument("--select-per-class", type=int, default=200,
                        help="validation samples per class per grid point (default: %(default)s, 2000 in all)")
    parser.add_argument("--select-seed", type=int, default=1000,
                        help="the selection's sampling seed, apart from the test seeds (default: %(default)s)")
    parser.add_argument("--diagnosis-per-class", type=int, default=500,
                        help="test images per class that the diagnosis sets are made from; the rest are their "
                             "reference (default: %(default)s)")
    parser.add_argument("--diagnosis-seed", type=int, default=2000,
                        help="the diagnosis' sampling seed (default: %(default)s)")
    parser.add_argument("--heldout-images", type=int, default=10000,
                        help="test images for the held-out bits per token at every epoch (default: %(default)s)")
    parser.add_argument("--tokenizer-images", type=int, default=None,
                        help="test images for codebook usage and PSNR (default: the whole test split)")
    parser.add_argument("--batch-size", type=int, default=250,
                        help="sampling batch size; it shapes the random streams (default: %(default)s)")
    parser.add_argument("--baselines-from", default=None, metavar="RUN",
                        help="the finished run whose baselines each RUN without baselines of its own "
                             "(baseline.enabled: false, e.g. the auxiliary model at 1x) is compared with; it must "
                             "share their tokenizer, coarse map and codes, and be studied first")
    parser.add_argument("--force", action="store_true",
                        help="recompute records made from other settings, models or code (refused otherwise)")
    add_print_config(parser)


def run_study(args: argparse.Namespace) -> None:
    """Each RUN is a finished `ctfgen pipeline` run of configs/study/fmnist_v<V>.yaml; every measurement
    is one JSON record under RECORDS/<run>/, computed once; the report is made from the records alone."""
    check_args(args, guidance="cfg_scale", temperatures="temperature", seeds="seed", select_seed="seed",
               diagnosis_seed="seed", test_per_class="per_class", select_per_class="per_class",
               diagnosis_per_class="per_class", heldout_images="per_class")
    settings = StudySettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(StudySettings) if f.name in args})
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
