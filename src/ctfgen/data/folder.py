"""Class-per-folder images (the ImageNet layout) with LlamaGen/ADM centre-crop preprocessing."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ctfgen.utils.errors import ConfigError, CorruptFileError, MissingFileError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


class CorruptImageError(CorruptFileError):
    """An image file that PIL cannot decode."""


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM / LlamaGen centre crop: halve with BOX while the short side is at least twice the target
    (cheap anti-aliasing), BICUBIC-resize the short side to `image_size`, then crop the centre."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size])


def to_tensor(pil_image: Image.Image) -> torch.Tensor:
    """(C, H, W) float32 in [-1, 1], the same numbers as ToTensor + Normalize(0.5, 0.5)."""
    arr = np.array(pil_image, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous().div_(255.0).mul_(2.0).sub_(1.0)


class ImageFolder(Dataset):
    """`root/<class>/<image>`; class ids follow the sorted folder names (as torchvision does).

    A file that cannot be decoded never ends a run: `__getitem__` logs it, counts it in `.skipped`
    and returns the next readable image instead. Code extraction calls `load(i)`, which raises
    `CorruptImageError`, so that the bad image is dropped rather than duplicated. `verify=True`
    additionally runs a quick PIL `verify()` scan at construction and drops what it catches.
    Counts from DataLoader worker processes stay in those processes; the warnings still appear.
    """

    def __init__(self, root: str | os.PathLike, image_size: int = 256, channels: int = 3,
                 verify: bool = False, extensions: tuple[str, ...] = IMAGE_EXTENSIONS):
        self.root = Path(root)
        if not self.root.is_dir():
            raise MissingFileError(f"image folder {self.root} does not exist; pass the directory that "
                                    "holds one sub-folder per class")
        if channels not in (1, 3):
            raise ConfigError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        self.image_size, self.channels = int(image_size), channels
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        if not self.classes:
            raise MissingFileError(f"{self.root} has no class sub-folders; expected root/<class>/<image>")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        exts = tuple(e.lower() for e in extensions)
        self.samples: list[tuple[str, int]] = []
        for c in self.classes:
            for dirpath, _, files in sorted(os.walk(self.root / c, followlinks=True)):
                for f in sorted(files):
                    if f.lower().endswith(exts):
                        self.samples.append((os.path.join(dirpath, f), self.class_to_idx[c]))
        self.skipped_files: list[str] = []
        if verify:
            good = []
            for path, label in self.samples:
                try:
                    with Image.open(path) as im:
                        im.verify()
                    good.append((path, label))
                except Exception as e:  # PIL raises many types for garbage input
                    self._record(path, e)
            self.samples = good
        if not self.samples:
            raise MissingFileError(f"no readable images with extensions {exts} under {self.root}")
        self.targets = [label for _, label in self.samples]

    @property
    def skipped(self) -> int:
        return len(self.skipped_files)

    def _record(self, path: str, error: Exception) -> None:
        if path in self.skipped_files:
            return
        self.skipped_files.append(path)
        if len(self.skipped_files) <= 10:
            log.warning("skipping unreadable image %s (%s: %s)", path, type(error).__name__, error)
        elif len(self.skipped_files) == 11:
            log.warning("more unreadable images are being skipped; see .skipped_files for the full list")

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> tuple[torch.Tensor, int]:
        """Item `i`, or CorruptImageError if its file cannot be decoded."""
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB" if self.channels == 3 else "L")
        except Exception as e:
            self._record(path, e)
            raise CorruptImageError(f"{path}: {type(e).__name__}: {e}") from e
        return to_tensor(center_crop_arr(im, self.image_size)), label

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        n = len(self.samples)
        for k in range(n):
            try:
                return self.load((i + k) % n)
            except CorruptImageError:
                continue
        raise CorruptFileError(f"none of the {n} images under {self.root} can be decoded")

    def report(self) -> str:
        """One line for logs: how many files were skipped and the first few names."""
        if not self.skipped_files:
            return "0 images skipped"
        names = ", ".join(Path(p).name for p in self.skipped_files[:5])
        more = f" and {self.skipped - 5} more" if self.skipped > 5 else ""
        return f"{self.skipped} unreadable images skipped: {names}{more}"
