"""`ctfgen extract-codes`: tokenize a dataset into a memory-mapped code directory."""

from __future__ import annotations

import argparse

from ctfgen.app.commands._common import add_device_argument, check_args
from ctfgen.config import DataConfig
from ctfgen.data.extract import extract_dataset
from ctfgen.utils import distributed as D
from ctfgen.utils.errors import ConfigError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", required=True, help="VQModel directory (save_pretrained form)")
    parser.add_argument("--dataset", choices=["fashion_mnist", "image_folder"], default="fashion_mnist",
                        help="Fashion-MNIST's IDX files, or a folder of class sub-folders of images (default: %(default)s)")
    parser.add_argument("--data-root", default=None,
                        help="Fashion-MNIST IDX directory (default: $CTFGEN_FASHION_MNIST, then the Debian "
                             "package's directory) or the class-per-folder image root")
    parser.add_argument("--split", choices=["train", "test"], default="train", help="Fashion-MNIST split")
    parser.add_argument("--image-size", type=int, default=None,
                        help="size the tokenizer sees (default: 28 for fashion_mnist, 256 for image_folder)")
    parser.add_argument("--augment", choices=["none", "flip", "tencrop"], default="none",
                        help="store 1, 2 (image + mirror) or 10 (LlamaGen ten-crop) codes per image")
    parser.add_argument("--crop-range", type=float, default=1.1,
                        help="ten-crop takes crops of image-size from a centre crop of int(image-size * this)")
    parser.add_argument("--out", required=True, help="output code directory (created atomically)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per rank per step")
    parser.add_argument("--limit", type=int, default=None, help="Fashion-MNIST: a class-balanced subset of N images")
    parser.add_argument("--num-workers", type=int, default=0,
                        help="data-loading worker processes; 0 loads in the main process (default: %(default)s)")
    parser.add_argument("--verify", action="store_true", help="image_folder: PIL-verify every file first")
    add_device_argument(parser, None)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    if args.dataset == "image_folder" and args.limit is not None:
        raise ConfigError("--limit applies to fashion_mnist only")
    root = args.data_root
    data = DataConfig(dataset=args.dataset, root=root, test_root=root, image_size=args.image_size,
                      train_limit=args.limit, test_limit=args.limit, augment=args.augment, num_workers=args.num_workers)
    split = args.split if args.dataset == "fashion_mnist" else "train"
    h = extract_dataset(args.tokenizer, data, split, args.out, batch_size=args.batch_size, crop_range=args.crop_range,
                        device=args.device, verify=args.verify, overwrite=args.overwrite)
    if D.is_main():
        skipped = h.get("num_skipped", 0)
        print(f"wrote {h['num_images']} x {h['num_augmentations']} x {h['image_tokens']} codes "
              f"({h['code_dtype']}) to {args.out}" + (f"; skipped {skipped} unreadable images" if skipped else ""))
    return 0
