"""Extracted token codes on disk: a directory with `codes.npy` (N, A, L), `labels.npy` (N,) and
`header.json`. The arrays are memory-mapped, so training never holds the whole set in RAM.

A directory only ever appears under its final name complete: writers fill a hidden temporary
directory beside it and rename it into place at the end.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap
from torch.utils.data import Dataset

from ctfgen import __version__
from ctfgen.compat import check_parts
from ctfgen.utils.errors import (CorruptFileError, MismatchError, MissingFileError, OutputExistsError, RunError,
                                 WrongTypeError)
from ctfgen.utils.fileio import (atomic_write_json, fsync_file, read_json, remove_stale_temporaries, replace_dir,
                                 temporary_prefix)

FORMAT_VERSION = 1
HEADER_KEYS = ("format_version", "tokenizer_fingerprint", "grid_size", "image_tokens", "codebook_size",
               "num_augmentations", "augment", "num_images", "dataset", "created_by")
_FILLED_BY_WRITER = ("format_version", "num_images", "num_augmentations", "image_tokens", "created_by")
_REDO = "re-run `ctfgen extract-codes --tokenizer <the tokenizer you train with>` to make matching codes"


def code_dtype(codebook_size: int) -> np.dtype:
    """The smallest integer type that holds every code: uint16 up to 65536 codewords."""
    return np.dtype(np.uint16) if codebook_size <= 65536 else np.dtype(np.int32)


def _created_by() -> str:
    return f"ctfgen {__version__}"


class CodeWriter:
    """Incremental, atomic writer for `num_images` rows of (num_augmentations, image_tokens) codes.

        with CodeWriter(out, 60000, 2, 49, header) as w:
            for codes, labels in batches:
                w.append(codes, labels)
        # out/ exists only now, complete; an exception (or SIGKILL) leaves no `out/`.

    Fewer rows than `num_images` may be appended (e.g. corrupt images were dropped); the arrays
    are shrunk to the rows written when the writer commits.
    """

    def __init__(self, out_dir: str | os.PathLike, num_images: int, num_augmentations: int,
                 image_tokens: int, header: dict[str, Any], overwrite: bool = False):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not overwrite:
            raise OutputExistsError(f"{self.out_dir} already exists; remove it or pass overwrite=True "
                                  "(--overwrite)")
        if "codebook_size" not in header:
            raise MismatchError("header needs 'codebook_size' to choose the code dtype")
        # read_header refuses a directory without these, so a header lacking one would be written in vain
        missing = [k for k in HEADER_KEYS if k not in header and k not in _FILLED_BY_WRITER]
        if missing:
            raise MismatchError(f"header lacks {missing}; give them to the writer (extract-codes records them)")
        self.num_images, self.num_augmentations, self.image_tokens = num_images, num_augmentations, image_tokens
        self.overwrite = overwrite
        self.header = dict(header)
        self.codebook_size = int(header["codebook_size"])
        self.dtype = code_dtype(self.codebook_size)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.out_dir, "partial")
        self.tmp_dir = self.out_dir.parent / (
            f"{temporary_prefix(self.out_dir, 'partial')}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.tmp_dir.mkdir()
        shape = (num_images, num_augmentations, image_tokens)
        self._codes = open_memmap(self.tmp_dir / "codes.npy", mode="w+", dtype=self.dtype, shape=shape)
        self._labels = open_memmap(self.tmp_dir / "labels.npy", mode="w+", dtype=np.int64, shape=(num_images,))
        self.count = 0
        self.closed = False

    def append(self, codes, labels) -> None:
        codes = np.asarray(codes.cpu() if isinstance(codes, torch.Tensor) else codes)
        labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
        n = codes.shape[0]
        expected = (n, self.num_augmentations, self.image_tokens)
        if codes.shape != expected or labels.shape != (n,):
            raise MismatchError(f"append got codes {codes.shape} and labels {labels.shape}; expected codes "
                             f"{expected} and labels ({n},)")
        if self.count + n > self.num_images:
            raise MismatchError(f"append of {n} rows overflows the {self.num_images} images declared")
        # Assigning into the integer memory maps would truncate 2.7 to 2 and write NaN as 0, silently.
        for name, arr in (("codes", codes), ("labels", labels)):
            if n and not np.issubdtype(arr.dtype, np.integer):
                raise WrongTypeError(f"{name} must be integers, got dtype {arr.dtype}")
        if n and labels.min() < 0:
            raise MismatchError(f"class labels must be >= 0, got {labels.min()}")
        if n and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise MismatchError(f"codes outside [0, {self.codebook_size}) (min {codes.min()}, max {codes.max()}): "
                             "the encoder's codebook does not match header codebook_size")
        self._codes[self.count:self.count + n] = codes
        self._labels[self.count:self.count + n] = labels
        self.count += n

    def _shrink(self) -> None:
        # .npy shapes live in the file header, so dropping rows means copying into smaller arrays.
        for name, arr in (("codes", self._codes), ("labels", self._labels)):
            src = self.tmp_dir / f"{name}.full.npy"
            os.replace(self.tmp_dir / f"{name}.npy", src)
            out = open_memmap(self.tmp_dir / f"{name}.npy", mode="w+", dtype=arr.dtype,
                              shape=(self.count,) + arr.shape[1:])
            step = max(1, (64 << 20) // max(1, arr[0:1].nbytes))
            for s in range(0, self.count, step):
                out[s:s + step] = arr[s:min(s + step, self.count)]
            out.flush()
            del out
            src.unlink()

    def commit(self) -> Path:
        """Finish: write the header and rename the temporary directory to `out_dir`."""
        if self.closed:
            raise RunError("CodeWriter already closed")
        try:
            self._codes.flush()
            self._labels.flush()
            if self.count < self.num_images:
                self._shrink()
            self._codes = self._labels = None
            header = {k: v for k, v in self.header.items()}
            header.update(format_version=FORMAT_VERSION, num_images=self.count,
                          num_augmentations=self.num_augmentations, image_tokens=self.image_tokens,
                          codebook_size=self.codebook_size, code_dtype=self.dtype.name)
            header.setdefault("created_by", _created_by())
            atomic_write_json(self.tmp_dir / "header.json", dict(sorted(header.items())))
            for name in ("codes.npy", "labels.npy"):
                fsync_file(self.tmp_dir / name)
            if self.out_dir.exists() and not self.overwrite:
                raise OutputExistsError(f"{self.out_dir} appeared while writing; refusing to replace it")
            replace_dir(self.tmp_dir, self.out_dir)
        except BaseException:
            self.abort()  # the full-size partial arrays would otherwise stay until this process has exited
            raise
        self.closed = True
        return self.out_dir

    def abort(self) -> None:
        if not self.closed:
            self._codes = self._labels = None
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            self.closed = True

    def __enter__(self) -> "CodeWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_codes(out_dir: str | os.PathLike, codes, labels, header: dict[str, Any],
                overwrite: bool = False) -> Path:
    """Write (N, A, L) codes and (N,) labels in one go (atomically). Returns `out_dir`."""
    codes = np.asarray(codes.cpu() if isinstance(codes, torch.Tensor) else codes)
    if codes.ndim == 2:
        codes = codes[:, None, :]
    if codes.ndim != 3:
        raise MismatchError(f"codes must be (N, A, L) (or (N, L)), got shape {codes.shape}")
    with CodeWriter(out_dir, codes.shape[0], codes.shape[1], codes.shape[2], header, overwrite) as w:
        w.append(codes, labels)
    return Path(out_dir)


def read_header(code_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(code_dir) / "header.json"
    if not path.is_file():
        raise MissingFileError(f"{code_dir} is not a code directory (no header.json); "
                                "make one with `ctfgen extract-codes`")
    header = read_json(path, _REDO)
    if not isinstance(header, dict) or header.get("format_version") != FORMAT_VERSION:
        raise MismatchError(f"{path}: code format version {header.get('format_version')} is not supported "
                         f"(this ctfgen reads version {FORMAT_VERSION}); {_REDO}")
    missing = [k for k in HEADER_KEYS if k not in header]
    if missing:
        raise MismatchError(f"{path}: header lacks {missing}; {_REDO}")
    return header


def _mix(*xs: int) -> int:
    """splitmix64 over the inputs: a cheap, stateless hash for per-(seed, epoch, index) choices."""
    h = 0x9E3779B97F4A7C15
    mask = (1 << 64) - 1
    for x in xs:
        h = (h ^ (x & mask)) & mask
        h = (h + 0x9E3779B97F4A7C15) & mask
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & mask
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & mask
        h ^= h >> 31
    return h


class CodeDataset(Dataset):
    """Items are (codes (L,) int64, label int) from a code directory.

    `augmentation="random"` picks one of the A stored augmentations per item, deterministically from
    (seed, epoch, index), so a resumed run sees the same data; call `set_epoch` each epoch.
    An int always picks that augmentation: 0 is the image itself for `none` and `flip` codes, but the
    top-left crop for `tencrop` ones (4 is their centre crop; see `ten_crop`).
    """

    def __init__(self, code_dir: str | os.PathLike, augmentation: str | int = "random", seed: int = 0):
        self.dir = Path(code_dir)
        self.header = read_header(self.dir)
        self.num_augmentations = int(self.header["num_augmentations"])
        if augmentation != "random":
            if not isinstance(augmentation, (int, np.integer)) or not 0 <= augmentation < self.num_augmentations:
                raise MismatchError(f"augmentation must be 'random' or an int in [0, {self.num_augmentations}), "
                                 f"got {augmentation!r}")
            augmentation = int(augmentation)
        self.augmentation, self.seed, self.epoch = augmentation, int(seed), 0
        self._codes = self._labels = None
        self._open()

    def _open(self) -> None:
        try:
            codes = np.load(self.dir / "codes.npy", mmap_mode="r")
            labels = np.load(self.dir / "labels.npy", mmap_mode="r")
        except (OSError, ValueError) as e:  # missing, truncated ("mmap length is greater ...") or not .npy
            raise CorruptFileError(f"{self.dir}: cannot read the code arrays ({type(e).__name__}: {e}); the "
                                   f"directory is damaged, {_REDO}") from None
        h = self.header
        expected = (h["num_images"], h["num_augmentations"], h["image_tokens"])
        if codes.shape != expected or labels.shape != (h["num_images"],):
            raise MismatchError(f"{self.dir}: arrays do not match header.json (codes {codes.shape}, labels "
                             f"{labels.shape}, header says {expected}); the directory is damaged, {_REDO}")
        self._codes, self._labels = codes, labels

    # Memory maps must not be pickled into DataLoader workers (that would copy the data); reopen instead.
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_codes"] = state["_labels"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()

    @property
    def codes(self) -> np.ndarray:
        return self._codes

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    @property
    def image_tokens(self) -> int:
        return int(self.header["image_tokens"])

    @property
    def grid_size(self) -> int:
        return int(self.header["grid_size"])

    @property
    def codebook_size(self) -> int:
        return int(self.header["codebook_size"])

    @property
    def num_classes(self) -> int | None:
        return self.header.get("num_classes")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def augmentation_for(self, i: int) -> int:
        if self.augmentation != "random":
            return self.augmentation
        if self.num_augmentations == 1:
            return 0
        return _mix(self.seed, self.epoch, int(i)) % self.num_augmentations

    def __len__(self) -> int:
        return int(self.header["num_images"])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if i < 0:
            i += len(self)
        a = self.augmentation_for(i)
        return torch.from_numpy(self._codes[i, a].astype(np.int64)), int(self._labels[i])

    def get_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) int64 codes and (B,) int64 labels in one vectorised read (no DataLoader needed)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        order = np.argsort(idx, kind="stable")  # sorted reads are much faster on a memory map
        sidx = idx[order]
        aug = np.array([self.augmentation_for(int(i)) for i in sidx], dtype=np.int64)
        codes = np.empty((len(idx), self.image_tokens), dtype=np.int64)
        codes[order] = self._codes[sidx, aug]
        labels = np.empty(len(idx), dtype=np.int64)
        labels[order] = self._labels[sidx]
        return torch.from_numpy(codes), torch.from_numpy(labels)


def check_codes(header, vq_or_fingerprint=None, codebook_size: int | None = None,
                grid_size: int | None = None, image_tokens: int | None = None) -> None:
    """Refuse codes that do not belong to a tokenizer / model, saying exactly what differs.

    `header` may be a header dict, a CodeDataset or a code directory. `vq_or_fingerprint` is a
    tokenizer (its `.fingerprint`, `.config.codebook_size` are checked) or a fingerprint string.
    """
    if isinstance(header, CodeDataset):
        where, header = str(header.dir), header.header
    elif isinstance(header, (str, os.PathLike)):
        where, header = str(header), read_header(header)
    else:
        where = str(header.get("path", "the code files"))

    expected = {"codebook_size": codebook_size, "grid_size": grid_size, "image_tokens": image_tokens}
    check_parts(f"{where} do not match", hint=_REDO, codes=header, tokenizer=vq_or_fingerprint,
                expected={k: v for k, v in expected.items() if v is not None})
