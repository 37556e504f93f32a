"""The commands that make models: `train-tokenizer`, `extract-codes`, `cluster`, `train` (one stage on
extracted codes), `pipeline` (all of them from one experiment config) and `train-classifier`.

An experiment config (configs/*.yaml) has `data`, `tokenizer` ({model, train, loss}), `clustering`,
`stage1`, `aux`, `baseline` ... sections; overrides after it replace single values, parsed as YAML
(`tokenizer.train.steps=500`)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ctfgen.app.commands._common import add_device_argument, add_print_config, check_args, print_config
from ctfgen.clustering import CoarseMap
from ctfgen.config import DataConfig, ExperimentConfig, load_config, load_stage_config
from ctfgen.data.extract import extract_dataset
from ctfgen.experiments.run import load_experiment_config, run_experiment
from ctfgen.metrics.classifier import train_classifier
from ctfgen.tokenizer.vq import VQModel
from ctfgen.train.stages import train_stage
from ctfgen.train.tokenizer import train_tokenizer_from_config
from ctfgen.utils import distributed as D
from ctfgen.utils.errors import ConfigError
from ctfgen.utils.rundir import MODEL_DIR


def configure_train_tokenizer(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("config", help="experiment YAML (its data and tokenizer sections are used)")
    add("--out", help="output directory: checkpoints/, metrics.csv, tokenizer/ (the model), config.yaml (required "
                      "unless --print-config)")
    add("--resume", action="store_true", help="continue from the newest checkpoint in DIR")
    add_device_argument(parser, None)
    add("--no-progress", action="store_true", help="no progress bar (metrics.csv is still written)")
    add_print_config(parser, overrides="override config values")


def run_train_tokenizer(args: argparse.Namespace) -> None:
    check_args(args, outputs={"out": "dir"})
    cfg = load_config(ExperimentConfig, args.config, args.overrides)
    if not print_config(args, cfg.tokenizer, "out"):
        train_tokenizer_from_config(cfg, args.out, resume=args.resume, device=args.device, progress=not args.no_progress)


def configure_extract_codes(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--tokenizer", required=True, help="VQModel directory (save_pretrained form)")
    add("--dataset", choices=["fashion_mnist", "image_folder"], default="fashion_mnist",
        help="Fashion-MNIST's IDX files, or a folder of class sub-folders of images")
    add("--data-root", help="Fashion-MNIST IDX directory (default: $CTFGEN_FASHION_MNIST, then the Debian "
                            "package's directory) or the class-per-folder image root")
    add("--split", choices=["train", "test"], default="train", help="Fashion-MNIST split")
    add("--image-size", type=int, help="size the tokenizer sees (default: 28 for fashion_mnist, 256 for image_folder)")
    add("--augment", choices=["none", "flip", "tencrop"], default="none",
        help="store 1, 2 (image + mirror) or 10 (LlamaGen ten-crop) codes per image")
    add("--crop-range", type=float, default=1.1,
        help="ten-crop takes crops of image-size from a centre crop of int(image-size * this)")
    add("--out", required=True, help="output code directory (created atomically)")
    add("--batch-size", type=int, default=256, help="images per rank per step")
    add("--limit", type=int, help="Fashion-MNIST: a class-balanced subset of N images")
    add("--num-workers", type=int, default=0, help="data-loading worker processes; 0 loads in the main process")
    add("--verify", action="store_true", help="image_folder: PIL-verify every file first")
    add_device_argument(parser, None)
    add("--overwrite", action="store_true", help="replace an existing --out directory")


def run_extract_codes(args: argparse.Namespace) -> None:
    check_args(args, outputs={"out": "dir"})
    if args.dataset == "image_folder" and args.limit is not None:
        raise ConfigError("--limit applies to fashion_mnist only")
    data = DataConfig(dataset=args.dataset, root=args.data_root, test_root=args.data_root, image_size=args.image_size,
                      train_limit=args.limit, test_limit=args.limit, augment=args.augment, num_workers=args.num_workers)
    split = args.split if args.dataset == "fashion_mnist" else "train"
    h = extract_dataset(args.tokenizer, data, split, args.out, batch_size=args.batch_size, crop_range=args.crop_range,
                        device=args.device, verify=args.verify, overwrite=args.overwrite)
    if D.is_main():
        skipped = h.get("num_skipped", 0)
        print(f"wrote {h['num_images']} x {h['num_augmentations']} x {h['image_tokens']} codes "
              f"({h['code_dtype']}) to {args.out}" + (f"; skipped {skipped} unreadable images" if skipped else ""))


def configure_cluster(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--tokenizer", required=True, help="VQModel directory (save_pretrained form)")
    add("--num-coarse", type=int, default=512, help="number of coarse labels K (default: %(default)s, the paper's)")
    add("--method", choices=["kmeans", "random"], default="kmeans",
        help="kmeans on the codewords as the tokenizer uses them, or balanced random groups")
    add("--seed", type=int, default=0, help="seed of k-means' starts or of the random groups")
    add("--n-init", type=int, default=4, help="k-means restarts (the lowest inertia is kept)")
    add("--out", required=True, help="output file (.safetensors)")
    add("--overwrite", action="store_true", help="replace an existing --out file")


def run_cluster(args: argparse.Namespace) -> None:
    check_args(args, outputs={"out": ".safetensors"})
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ConfigError(f"{out} already exists; pass --overwrite to replace it")
    cmap = CoarseMap.fit(VQModel.from_pretrained(args.tokenizer), args.num_coarse, method=args.method, seed=args.seed,
                         n_init=args.n_init)
    cmap.save(out)
    s = cmap.stats()
    extra = f", mean within-cluster spread {s['spread_mean']:.4f}" if "spread_mean" in s else ""
    print(f"{cmap}\ncluster sizes {s['size_min']}..{s['size_max']} (mean {s['size_mean']:.1f}){extra}; "
          f"fitted in {cmap.fit_seconds:.2f}s; saved to {out}")


def configure_train(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--stage", required=True, choices=["ar", "aux", "baseline"], help="ar: CTF stage 1 over coarse labels; aux: "
        "the auxiliary fine-token model; baseline: the vanilla GPT over fine tokens")
    add("--codes", help="code directory from `ctfgen extract-codes` (required unless --print-config)")
    add("--coarse-map", help="CoarseMap file from `ctfgen cluster` (ar and aux)")
    add("--config", help="YAML with `preset`, `model` (config overrides) and `train` keys, or an experiment config "
                         "(its stage1 / aux / baseline section is used)")
    add("--preset", help="model preset (default: GPT-B / Aux-B, or the config's)")
    add("--out", help="output directory: checkpoints/, metrics.csv, model/ (required unless --print-config)")
    add("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    add_print_config(parser, overrides="overrides of the stage config, e.g. train.steps=1000 train.lr=3e-4 model.dim=256")


def run_train(args: argparse.Namespace) -> None:
    check_args(args, outputs={"out": "dir"})
    cfg = load_stage_config(args.config, args.stage, args.overrides)
    if args.preset:
        cfg = dataclasses.replace(cfg, preset=args.preset)
    if print_config(args, cfg, "codes", "out"):
        return
    D.init_distributed()
    _, result = train_stage(
        args.stage, args.codes, args.out, coarse_map=args.coarse_map, preset=cfg.preset,
        model=cfg.model, train_config=cfg.train, resume=args.resume,
        run_config={"command": "train", "codes": args.codes, "coarse_map": args.coarse_map})
    if D.is_main():
        print(f"{args.stage}: {result.step} steps in {result.seconds:.1f}s; model saved to {args.out}/{MODEL_DIR}")


def configure_pipeline(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Run tokenizer training, clustering, code extraction, stage 1, the auxiliary model and the "
                          "baseline, then assemble DIR as a CTF pipeline (CTFPipeline.from_pretrained(DIR)) and "
                          "DIR/baseline. Works under torchrun (DDP or FSDP; only rank 0 writes).")
    add = parser.add_argument
    add("config", nargs="?", help="YAML config (configs/*.yaml); with --resume it defaults to the run's DIR/input.yaml")
    add("--out", help="experiment directory (required unless --print-config)")
    add("--resume", action="store_true", help="continue the run in --out: skip finished phases, resume an interrupted one")
    add("--no-progress", action="store_true", help="no progress bars (logs still written)")
    add_print_config(parser, config="config",
                     overrides="config overrides, values parsed as YAML (e.g. train.steps=100 stage1.preset=GPT-mini)")
    add("--dry-run", action="store_true", help="two steps of everything with tiny models (checks a recipe on a CPU)")


def run_pipeline(args: argparse.Namespace) -> None:
    check_args(args, outputs={"out": "dir"})
    cfg = load_experiment_config(args.config, args.out, args.resume, args.overrides, args.dry_run)[0] if args.print_config else None
    if not print_config(args, cfg, "out"):
        run_experiment(args.config, args.out, resume=args.resume, overrides=args.overrides,
                       progress=not args.no_progress, dry_run=args.dry_run)


def configure_train_classifier(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--out", required=True, help="output directory (config.json, model.safetensors, train_info.json)")
    add("--epochs", type=int, default=5, help="passes over the training split")
    add("--seed", type=int, default=0, help="seed of the initial weights and the data order")
    add("--batch-size", type=int, default=256, help="images per step")
    add("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule")
    add("--data-root", help="folder with the Fashion-MNIST *.gz IDX files (default: the usual locations)")
    add("--limit", type=int, help="train on the first N training images only (smoke tests)")
    add("--validation-images", type=int, default=5000, help="class-balanced training images left out, as "
        "data.validation_images leaves them out of the models (0 trains on all 60k)")


def run_train_classifier(args: argparse.Namespace) -> None:
    check_args(args, outputs={"out": "dir"})
    _, info = train_classifier(args.out, epochs=args.epochs, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
                               data_root=args.data_root, limit=args.limit, validation_images=args.validation_images)
    print(f"test accuracy {info['test_accuracy']:.4f}; saved to {args.out} "
          "(load with FMNISTClassifier.from_pretrained(DIR); to ship it, copy config.json and "
          "model.safetensors into src/ctfgen/assets/fmnist_classifier/)")
