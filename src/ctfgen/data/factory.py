"""The one place a dataset is built from settings: `make_dataset(DataConfig, split)`."""

from __future__ import annotations

import torch
from torch.utils.data import Subset

from ctfgen.config import DataConfig
from ctfgen.data.fashion_mnist import FashionMNIST
from ctfgen.data.folder import ImageFolder
from ctfgen.utils.errors import ConfigError

TENCROP_RANGE = 1.1  # LlamaGen: ten crops of image_size from a centre crop this much larger


class FolderSubset(Subset):
    """A Subset of an ImageFolder that keeps what code extraction reads from the folder: `load`
    (a plain Subset would serve the next readable image for a corrupt one, so its codes would be
    written twice), `classes` (the header's num_classes) and the names of skipped files."""

    def load(self, i: int):
        return self.dataset.load(self.indices[i])

    @property
    def classes(self) -> list[str]:
        return self.dataset.classes

    @property
    def samples(self) -> list[tuple[str, int]]:
        return [self.dataset.samples[j] for j in self.indices]

    @property
    def skipped_files(self) -> list[str]:
        return self.dataset.skipped_files


def image_size(data: DataConfig) -> int:
    return data.image_size or (28 if data.dataset == "fashion_mnist" else 256)


def make_dataset(data: DataConfig, split: str, channels: int | None = None, for_codes: bool = False, verify=False,
                 crop_range: float = TENCROP_RANGE):
    """Train, val or test images of `data` (items: (C, H, W) in [-1, 1], label), or None where the
    split does not exist (no validation images, an image folder without a test root). `for_codes`
    loads ten-crop train images at the larger size."""
    limit = {"train": data.train_limit, "test": data.test_limit}.get(split)
    if split == "val" and (data.dataset != "fashion_mnist" or not data.validation_images):
        return None
    if data.dataset == "fashion_mnist":
        return FashionMNIST(split, root=data.root, limit=limit, image_size=image_size(data),
                            validation=int(data.validation_images or 0))

    root = data.root if split == "train" else data.test_root
    if root is None:
        if split == "train":
            raise ConfigError("data.root is required for dataset: image_folder (a folder of class sub-folders)")
        return None
    size = image_size(data)
    if split == "train" and data.augment == "tencrop" and for_codes:
        size = int(size * crop_range)
    ds = ImageFolder(root, image_size=size, channels=data.channels or channels or 3, verify=verify)
    if limit is not None and limit < len(ds):
        # Folders are sorted by class: a seeded random subset rather than the first classes.
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:int(limit)]
        ds = FolderSubset(ds, sorted(idx.tolist()))
    return ds
