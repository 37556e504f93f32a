"""Fashion-MNIST from its standard IDX files (Debian package `dataset-fashion-mnist`)."""

from __future__ import annotations

import functools
import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ctfgen.utils.errors import ConfigError, MissingFileError

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_ALIASES = {
    "tshirt": 0, "t-shirt": 0, "t_shirt": 0, "tshirt/top": 0, "t-shirt/top": 0, "top": 0, "tee": 0,
    "trouser": 1, "trousers": 1, "pants": 1,
    "pullover": 2, "sweater": 2,
    "dress": 3,
    "coat": 4,
    "sandal": 5, "sandals": 5,
    "shirt": 6,
    "sneaker": 7, "sneakers": 7,
    "bag": 8,
    "ankle-boot": 9, "ankle_boot": 9, "ankle boot": 9, "ankleboot": 9, "boot": 9, "boots": 9,
}

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian: dataset-fashion-mnist; the one place it is named
ENV_VAR = "CTFGEN_FASHION_MNIST"
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_HOW_TO_GET = ("run `make data` (or `apt-get install dataset-fashion-mnist`), "
               f"set ${ENV_VAR}, or pass --data-root DIR")


def class_index(name_or_id: int | str) -> int:
    """Class id from an id (7, "7"), an official name ("Sneaker") or an alias ("ankle-boot")."""
    if isinstance(name_or_id, (int, np.integer)) and not isinstance(name_or_id, bool):
        idx = int(name_or_id)
    else:
        key = str(name_or_id).strip()
        if key.lstrip("-").isdigit():
            idx = int(key)
        else:
            lowered = key.lower()
            official = {n.lower(): i for i, n in enumerate(CLASS_NAMES)}
            idx = official.get(lowered, _ALIASES.get(lowered, _ALIASES.get(lowered.replace(" ", "-"))))
            if idx is None:
                raise ConfigError(f"unknown Fashion-MNIST class {name_or_id!r}; use an id 0-9 or one of: "
                                 + ", ".join(f"{i}={n!r}" for i, n in enumerate(CLASS_NAMES))
                                 + " (aliases such as 'tshirt', 'sneaker', 'ankle-boot' also work)")
    if not 0 <= idx < len(CLASS_NAMES):
        raise ConfigError(f"Fashion-MNIST class id {idx} out of range 0-{len(CLASS_NAMES) - 1}")
    return idx


def _split_files(directory: Path, split: str) -> tuple[Path, Path] | None:
    prefix = _SPLIT_PREFIX[split]
    found = []
    for stem in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
        for candidate in (directory / stem, directory / f"{stem}.gz"):
            if candidate.is_file():
                found.append(candidate)
                break
        else:
            return None
    return found[0], found[1]


def _check_split(split: str) -> str:
    if split not in _SPLIT_PREFIX:
        raise ConfigError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    return split


def find_fashion_mnist(root: str | os.PathLike | None = None, split: str | None = None) -> Path:
    """Directory holding the IDX files (plain or .gz) for `split` (both splits when None).

    An explicit `root` is the only place looked at, so a typo never silently falls back to another copy;
    otherwise $CTFGEN_FASHION_MNIST, then DEFAULT_DIR (where the Debian package installs it).
    """
    splits = [_check_split(split)] if split else list(_SPLIT_PREFIX)
    if root is not None:
        candidates = [Path(root)]
    else:
        candidates = ([Path(os.environ[ENV_VAR])] if os.environ.get(ENV_VAR) else []) + [DEFAULT_DIR]
    for directory in candidates:
        if all(_split_files(directory, s) for s in splits):
            return directory
    names = ", ".join(f"{_SPLIT_PREFIX[s]}-{{images-idx3,labels-idx1}}-ubyte[.gz]" for s in splits)
    raise MissingFileError(f"Fashion-MNIST not found: looked for {names} in "
                            + ", ".join(str(c) for c in candidates) + f"; {_HOW_TO_GET}")


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse one IDX file (optionally gzip-compressed), validating its magic number and size."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise ConfigError(f"{path}: cannot read IDX file ({e}); the file is corrupt or truncated, "
                         f"re-download it ({_HOW_TO_GET})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise ConfigError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'}); "
                         f"the file is corrupt, re-download it ({_HOW_TO_GET})")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ConfigError(f"{path}: truncated IDX header; re-download it ({_HOW_TO_GET})")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ConfigError(f"{path}: IDX size mismatch, header says shape {shape} ({expected} bytes) but the "
                         f"file has {len(raw)} bytes; it is truncated or corrupt, re-download it ({_HOW_TO_GET})")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


@functools.lru_cache(maxsize=8)
def _load_cached(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise ConfigError(f"{images_path}: expected uint8 images of shape (N, 28, 28), got "
                         f"{images.dtype} {images.shape}; is this really Fashion-MNIST?")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ConfigError(f"{labels_path}: expected {images.shape[0]} labels (one per image in "
                         f"{images_path.name}), got shape {labels.shape}")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
        raise ConfigError(f"{labels_path}: labels outside 0-{len(CLASS_NAMES) - 1}; the file is corrupt")
    # Shared by every caller through the cache, so nobody may write into them.
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (N, 28, 28), int64 (N,)) read-only arrays; N = 60000 for train, 10000 for test."""
    directory = find_fashion_mnist(root, split=_check_split(split))
    images_path, labels_path = _split_files(directory, split)
    return _load_cached(images_path.resolve(), labels_path.resolve())


def balanced_subset(labels: np.ndarray, limit: int, num_classes: int = len(CLASS_NAMES)) -> np.ndarray:
    """Indices (ascending) of the first `limit // num_classes` images of each class; the remainder goes
    one each to the lowest classes. Deterministic, so a limited run always sees the same images."""
    if limit <= 0:
        raise ConfigError(f"limit must be positive, got {limit}")
    per_class = [limit // num_classes + (1 if c < limit % num_classes else 0) for c in range(num_classes)]
    chosen = []
    for c, k in enumerate(per_class):
        idx = np.flatnonzero(labels == c)[:k]
        if len(idx) < k:
            raise ConfigError(f"limit {limit} asks for {k} images of class {c} but only {len(idx)} exist")
        chosen.append(idx)
    return np.sort(np.concatenate(chosen))


def validation_indices(labels: np.ndarray, count: int, num_classes: int = len(CLASS_NAMES)) -> np.ndarray:
    """Indices (ascending) of the validation images carved from a split: the *last* `count // num_classes`
    images of each class, so they never overlap `balanced_subset`'s first images of each class."""
    if count % num_classes:
        raise ConfigError(f"validation_images must be a multiple of {num_classes} (class-balanced), got {count}")
    per_class = count // num_classes
    chosen = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) <= per_class:
            raise ConfigError(f"validation_images={count} takes {per_class} images of class {c}, which has only {len(idx)}")
        chosen.append(idx[len(idx) - per_class:])
    return np.sort(np.concatenate(chosen))


class FashionMNIST(Dataset):
    """Items are (float32 (1, H, W) in [-1, 1], int label); `limit` keeps a class-balanced subset.

    `validation` > 0 carves that many class-balanced images out of the training images: split "train"
    then leaves them out, and split "val" is exactly them (for choosing sampling settings without
    touching the test split).
    """

    def __init__(self, split: str = "train", root: str | os.PathLike | None = None,
                 limit: int | None = None, image_size: int = 28, validation: int = 0):
        self.split = split
        if split == "val" and validation <= 0:
            raise ConfigError("the val split needs validation > 0: the number of training images to carve out")
        images, labels = load_fashion_mnist("train" if split == "val" else split, root)
        if validation > 0 and split in ("train", "val"):
            held = validation_indices(labels, int(validation))
            if split == "val":
                pool = held
            else:
                pool = np.setdiff1d(np.arange(len(labels)), held)
        else:
            pool = np.arange(len(labels))
        self.indices = pool if limit is None else pool[balanced_subset(labels[pool], limit)]
        self.images, self.labels = images, labels
        self.image_size = int(image_size)
        self.classes = list(CLASS_NAMES)
        self.skipped = 0  # same interface as ImageFolder; IDX data has no per-image corruption

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = int(self.indices[i])
        img = self.images[j]
        if self.image_size != 28:
            img = np.asarray(Image.fromarray(img).resize((self.image_size, self.image_size), Image.BICUBIC))
        x = torch.from_numpy(np.array(img, dtype=np.float32)).div_(255.0).mul_(2.0).sub_(1.0)
        return x.unsqueeze(0), int(self.labels[j])

    @property
    def targets(self) -> np.ndarray:
        return self.labels[self.indices]
