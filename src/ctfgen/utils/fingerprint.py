"""Identities: of a codebook, so that token files, coarse maps and models trained on one tokenizer
are refused by another; and of the running code, so that every experiment record names its commit."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import numpy as np
import torch

from ctfgen.utils.errors import WrongTypeError


def codebook_fingerprint(weight: torch.Tensor) -> str:
    """sha256 over the shape and the float32 contiguous CPU bytes of `weight`; first 16 hex chars.

    Hash the raw embedding weight (not the l2-normalised codewords) so the fingerprint does not
    depend on floating-point details of the normalisation.
    """
    w = weight.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256()
    h.update(repr(tuple(w.shape)).encode())
    h.update(w.numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint_of(obj) -> str:
    """The codebook fingerprint of a VQModel, a raw codebook weight (V, D) or a fingerprint string."""
    if isinstance(obj, str):
        return obj
    if isinstance(obj, torch.Tensor):
        return codebook_fingerprint(obj)
    if isinstance(obj, np.ndarray):
        return codebook_fingerprint(torch.from_numpy(obj))
    fp = getattr(obj, "fingerprint", None)
    if isinstance(fp, str):
        return fp
    raise WrongTypeError(
        f"cannot tell which codebook {type(obj).__name__} is: pass a VQModel, its raw embedding weight "
        "(V, D) tensor, or a codebook fingerprint string"
    )


def directory_fingerprint(path) -> str:
    """sha256 over the relative names and bytes of every file under `path`; first 16 hex chars. Two
    model directories with the same fingerprint hold the same model. A link to a file counts as the
    file, but a linked folder is not entered (rglob's rule): hash a pipeline's own directory (RUN/ctf),
    not a run's root, whose ar/, aux/ and tokenizer/ are links into it. A file (a checkpoint) is
    hashed as a directory holding only it."""
    root = Path(path)
    h = hashlib.sha256()
    for f in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


COMMIT_STAMP = Path(__file__).parents[1] / "COMMIT"  # written by `make pin` into a pinned install


def code_commit() -> str:
    """The git commit of the ctfgen code that is running.

    A pinned install (`make pin`) carries its commit in ctfgen/COMMIT. A source checkout answers
    `git rev-parse HEAD`, with "-dirty" when tracked files have changed since. Anything else: "unknown".
    """
    if COMMIT_STAMP.is_file():
        return COMMIT_STAMP.read_text().strip()
    src = Path(__file__).parents[1]  # ctfgen, not utils/: a change anywhere in its code is "-dirty"
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=10)
        # An install inside another repository (a project's ignored .venv/) is no checkout of ctfgen:
        # that repository's HEAD says nothing about this code.
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", "--", Path(__file__).relative_to(src)],
                                 cwd=src, capture_output=True, text=True, timeout=10)
        if head.returncode != 0 or tracked.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."], cwd=src,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty else "")
