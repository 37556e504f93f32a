"""Identity of a codebook, so that token files, coarse maps and models trained on one tokenizer are
refused by another."""

from __future__ import annotations

import hashlib

import torch


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
