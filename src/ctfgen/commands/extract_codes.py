"""`ctfgen extract-codes`: tokenize a dataset into a memory-mapped code directory."""

from __future__ import annotations

from ctfgen.errors import ConfigError

import argparse
import logging


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", required=True, help="VQModel directory (save_pretrained form)")
    parser.add_argument("--dataset", choices=["fashion_mnist", "image_folder"], default="fashion_mnist")
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
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--verify", action="store_true", help="image_folder: PIL-verify every file first")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")


def run(args: argparse.Namespace) -> int:
    import torch

    from ctfgen.data import FashionMNIST, ImageFolder, extract_codes
    from ctfgen.tokenizer import VQModel
    from ctfgen.train import distributed as D

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from pathlib import Path
    if Path(args.out).exists() and not args.overwrite:
        raise ConfigError(f"{args.out} already exists; remove it or pass --overwrite")
    started_here = D.launched_by_torchrun() and not D.is_distributed()
    device = D.init_distributed() if D.launched_by_torchrun() else torch.device(
        args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        vq = VQModel.from_pretrained(args.tokenizer).to(device).eval()
        if args.dataset == "fashion_mnist":
            size = args.image_size or 28
            dataset = FashionMNIST(args.split, root=args.data_root, limit=args.limit, image_size=size)
            name = f"fashion_mnist/{args.split}" + (f"[:{args.limit}]" if args.limit else "")
        else:
            if args.data_root is None:
                raise ConfigError("--dataset image_folder needs --data-root DIR (one sub-folder per class)")
            if args.limit is not None:
                raise ConfigError("--limit applies to fashion_mnist only")
            size = args.image_size or 256
            # LlamaGen ten-crop: centre-crop (PIL) to the larger size first, then crop tensors.
            load_size = int(size * args.crop_range) if args.augment == "tencrop" else size
            dataset = ImageFolder(args.data_root, image_size=load_size, channels=vq.config.in_channels,
                                  verify=args.verify)
            name = f"image_folder:{args.data_root}"
        if vq.config.in_channels != dataset[0][0].shape[0]:
            raise ConfigError(f"the tokenizer takes {vq.config.in_channels}-channel images but the dataset "
                             f"yields {dataset[0][0].shape[0]}")
        out = extract_codes(vq, dataset, args.out, augment=args.augment, batch_size=args.batch_size,
                            device=device, num_workers=args.num_workers, image_size=size,
                            crop_range=args.crop_range, dataset_name=name, overwrite=args.overwrite)
        if D.is_main():
            from ctfgen.data import read_header
            h = read_header(out)
            skipped = h.get("num_skipped", 0)
            print(f"wrote {h['num_images']} x {h['num_augmentations']} x {h['image_tokens']} codes "
                  f"({h['code_dtype']}) to {out}" + (f"; skipped {skipped} unreadable images" if skipped else ""))
    finally:
        if started_here:
            D.cleanup()
    return 0
