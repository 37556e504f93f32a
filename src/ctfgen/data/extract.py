"""Tokenize a dataset into a code directory (see ctfgen.data.codes), as LlamaGen's
extract_codes_c2i.py does, but streaming to disk and sharded across torchrun ranks."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ctfgen.data.codes import read_header
from ctfgen.data.factory import image_size, make_dataset
from ctfgen.tokenizer import load_tokenizer
from ctfgen.utils import distributed as D
from ctfgen.utils.errors import ConfigError, CorruptFileError, OutputExistsError

from .codes import CodeWriter
from .folder import CorruptImageError

log = logging.getLogger(__name__)

AUGMENTATIONS = {"none": 1, "flip": 2, "tencrop": 10}


def ten_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, 10, C, size, size) in torchvision TenCrop order: top-left, top-right,
    bottom-left, bottom-right, centre, then the same five of the horizontally flipped image."""
    H, W = x.shape[-2:]
    if H < size or W < size:
        raise ConfigError(f"ten_crop of {size} needs an image at least that large, got {H}x{W}")
    top, left = int(round((H - size) / 2.0)), int(round((W - size) / 2.0))

    def five(img):
        return [img[..., :size, :size], img[..., :size, W - size:], img[..., H - size:, :size],
                img[..., H - size:, W - size:], img[..., top:top + size, left:left + size]]

    return torch.stack(five(x) + five(x.flip(-1)), dim=1)


def augment_views(x: torch.Tensor, augment: str, image_size: int, crop_range: float = 1.1) -> torch.Tensor:
    """(B, C, H, W) images in [-1, 1] -> (B, A, C, image_size, image_size) views.

    LlamaGen's ten-crop centre-crops the image to int(image_size * crop_range) and takes the ten
    crops of image_size. A dataset that already yields that larger size (ImageFolder built with it)
    is cropped directly; one yielding image_size (e.g. 28x28 Fashion-MNIST) is first resized up.
    """
    if augment not in AUGMENTATIONS:
        raise ConfigError(f"augment must be one of {list(AUGMENTATIONS)}, got {augment!r}")
    H, W = x.shape[-2:]
    if augment != "tencrop":
        if (H, W) != (image_size, image_size):
            raise ConfigError(f"dataset yields {H}x{W} images but image_size is {image_size}")
        return x[:, None] if augment == "none" else torch.stack([x, x.flip(-1)], dim=1)
    if (H, W) == (image_size, image_size):
        big = int(image_size * crop_range)
        x = F.interpolate(x.float(), size=(big, big), mode="bicubic", align_corners=False).clamp_(-1, 1)
    return ten_crop(x, image_size)


class _Tolerant(Dataset):
    """Yields (index, image or None, label) so that corrupt images are dropped, never duplicated."""

    def __init__(self, dataset):
        self.dataset = dataset
        self._load = getattr(dataset, "load", None) or dataset.__getitem__

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        try:
            x, y = self._load(i)
        except CorruptImageError:
            return i, None, None
        return i, x, int(y)


def _collate(items):
    good = [it for it in items if it[1] is not None]
    bad = [it[0] for it in items if it[1] is None]
    if not good:
        return None, None, bad
    return torch.stack([it[1] for it in good]), torch.tensor([it[2] for it in good], dtype=torch.int64), bad


def _fingerprint(vq) -> str:
    fp = getattr(vq, "fingerprint")
    return fp() if callable(fp) else fp


@torch.no_grad()
def extract_codes(vq, dataset, out_dir: str | os.PathLike, augment: str = "none", batch_size: int = 256,
                  device: str | torch.device = "cpu", num_workers: int = 0, image_size: int | None = None,
                  crop_range: float = 1.1, dataset_name: str | None = None, overwrite: bool = False,
                  progress: bool = True, extra_header: dict | None = None) -> Path:
    """Encode every image of `dataset` (items (C, H, W) in [-1, 1], label) with `vq` and write a code
    directory with A = 1 (none), 2 (flip) or 10 (tencrop) augmentations per image.

    `vq` needs `.encode(images) -> (B, h, w)` codes, `.fingerprint` and `.config.codebook_size`.
    Under torchrun each rank encodes its share of every global batch and rank 0 gathers and writes;
    all ranks return `out_dir` once it exists. Corrupt images (ImageFolder) are dropped and counted.
    """
    if augment not in AUGMENTATIONS:
        raise ConfigError(f"augment must be one of {list(AUGMENTATIONS)}, got {augment!r}")
    out_dir = Path(out_dir)
    rank, world = D.get_rank(), D.get_world_size()
    device = torch.device(device)
    n = len(dataset)
    if n == 0:
        raise ConfigError("the dataset is empty; nothing to extract")
    if rank == 0 and out_dir.exists() and not overwrite:
        raise OutputExistsError(f"{out_dir} already exists; remove it or pass --overwrite")
    codebook_size = int(vq.config.codebook_size)
    num_aug = AUGMENTATIONS[augment]

    global_batch = batch_size * world
    steps = math.ceil(n / global_batch)
    mine = [list(range(min(n, s * global_batch + rank * batch_size), min(n, s * global_batch + (rank + 1) * batch_size)))
            for s in range(steps)]
    loader = DataLoader(_Tolerant(dataset), batch_sampler=[b for b in mine if b], num_workers=num_workers,
                        collate_fn=_collate, pin_memory=device.type == "cuda")
    batches = iter(loader)

    was_training = getattr(vq, "training", False)
    if isinstance(vq, torch.nn.Module):
        vq.eval()
    writer: CodeWriter | None = None
    skipped: list[int] = []
    bar = None
    if rank == 0 and progress:
        bar = tqdm(total=n, desc=f"extract-codes ({augment})", unit="img", dynamic_ncols=True)
    try:
        for s in range(steps):
            payload = (np.zeros((0, num_aug, 0), np.int64), np.zeros(0, np.int64), [], None)
            if mine[s]:
                x, y, bad = next(batches)
                if x is not None:
                    size = image_size or x.shape[-1]
                    views = augment_views(x.to(device, non_blocking=True), augment, size, crop_range)
                    B = views.shape[0]
                    codes = vq.encode(views.flatten(0, 1))
                    if codes.dim() != 3:
                        raise ConfigError(f"vq.encode must return (B, h, w) codes, got shape {tuple(codes.shape)}")
                    grid = (codes.shape[1], codes.shape[2], size)
                    codes = codes.reshape(B, num_aug, -1).cpu().numpy()
                    payload = (codes, y.numpy(), bad, grid)
                else:
                    payload = (payload[0], payload[1], bad, None)
            parts = D.gather_object(payload)
            if rank != 0:
                continue
            for codes, labels, bad, grid in parts:  # rank order == dataset order within a step
                skipped.extend(bad)
                if grid is None:
                    continue
                if writer is None:
                    if grid[0] != grid[1]:
                        raise ConfigError(f"the tokenizer produced a non-square {grid[0]}x{grid[1]} grid; "
                                         "use square images")
                    header = {"tokenizer_fingerprint": _fingerprint(vq), "grid_size": grid[0],
                              "image_tokens": grid[0] * grid[1], "codebook_size": codebook_size,
                              "num_augmentations": num_aug, "augment": augment,
                              "dataset": dataset_name or type(dataset).__name__,
                              "image_size": int(grid[2])}
                    if augment == "tencrop":
                        header["crop_range"] = crop_range
                    classes = getattr(dataset, "classes", None)
                    if classes is not None:
                        header["num_classes"] = len(classes)
                    header.update(extra_header or {})
                    writer = CodeWriter(out_dir, n, num_aug, grid[0] * grid[1], header, overwrite=overwrite)
                writer.append(codes, labels)
            if bar is not None:
                bar.update(sum(len(p[1]) + len(p[2]) for p in parts))
        if rank == 0:
            if writer is None:
                raise CorruptFileError(f"none of the {n} images could be read; nothing was written")
            if skipped:
                writer.header["num_skipped"] = len(skipped)
                samples = getattr(dataset, "samples", None)
                names = [str(samples[i][0]) if samples is not None else f"index {i}" for i in sorted(skipped)]
                recorded = getattr(dataset, "skipped_files", None)
                if isinstance(recorded, list):
                    recorded.extend(p for p in names if p not in recorded)
                log.warning("extract-codes skipped %d unreadable images: %s%s", len(names), ", ".join(names[:5]),
                            " ..." if len(names) > 5 else "")
            writer.commit()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
        if isinstance(vq, torch.nn.Module) and was_training:
            vq.train()
    D.barrier()  # other ranks return only once the directory exists
    return out_dir


def extract_dataset(tokenizer, data, split: str, out_dir, batch_size: int = 256, crop_range: float = 1.1,
                    device=None, verify: bool = False, overwrite: bool = False) -> dict:
    """`ctfgen extract-codes`: the codes of split `split` of `data` (a DataConfig, whose `augment`
    applies) by the tokenizer saved at `tokenizer`; returns the written header (on every rank)."""
    if Path(out_dir).exists() and not overwrite:
        raise OutputExistsError(f"{out_dir} already exists; remove it or pass --overwrite")
    device = D.rank_device(device)
    vq = load_tokenizer(tokenizer).to(device).eval()
    dataset = make_dataset(data, split, channels=vq.config.in_channels, for_codes=True, verify=verify,
                           crop_range=crop_range)
    if dataset is None:
        raise ConfigError(f"there is no {split} split in this data (set its root)")
    if vq.config.in_channels != dataset[0][0].shape[0]:
        raise ConfigError(f"the tokenizer takes {vq.config.in_channels}-channel images but the dataset "
                          f"yields {dataset[0][0].shape[0]}")
    limit = data.train_limit if split == "train" else data.test_limit
    name = (f"fashion_mnist/{split}" + (f"[:{limit}]" if limit else "") if data.dataset == "fashion_mnist"
            else f"image_folder:{data.root if split == 'train' else data.test_root}")
    out = extract_codes(vq, dataset, out_dir, augment=data.augment, batch_size=batch_size, device=device,
                        num_workers=data.num_workers, image_size=image_size(data), crop_range=crop_range,
                        dataset_name=name, overwrite=overwrite)
    return read_header(out)
