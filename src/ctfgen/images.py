"""Image tensors <-> uint8 arrays and PNG files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ctfgen.errors import ConfigError


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B,C,H,W) floats in [-1,1] -> (B,H,W,C) uint8, rounding as ADM's sampler does."""
    if images.dim() != 4:
        raise ConfigError(f"expected images of shape (B,C,H,W), got {tuple(images.shape)}")
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def make_grid(images: np.ndarray, nrow: int, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """(B,H,W,C) uint8 -> one (H',W',C) uint8 grid with `nrow` images per row."""
    b, h, w, c = images.shape
    ncol = min(nrow, b)
    nrows = (b + ncol - 1) // ncol
    grid = np.full((nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), pad_value, np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, ncol)
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        grid[y : y + h, x : x + w] = img
    return grid


def save_grid(images: torch.Tensor | np.ndarray, path: str | Path, nrow: int = 8, scale: int = 1) -> Path:
    """Write a PNG grid; `scale` enlarges small images (nearest) so 28x28 samples are visible."""
    array = to_uint8(images) if isinstance(images, torch.Tensor) else images
    img = _pil(make_grid(array, nrow))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def save_images(images: torch.Tensor | np.ndarray, directory: str | Path, names: list[str]) -> list[Path]:
    """One PNG per image, each written under a temporary name and renamed, so a killed run leaves
    whole files only."""
    array = to_uint8(images) if isinstance(images, torch.Tensor) else images
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for img, name in zip(array, names):
        paths.append(directory / f"{name}.png")
        tmp = directory / f".{name}.png.tmp"
        _pil(img).save(tmp, format="PNG")
        os.replace(tmp, paths[-1])
    return paths
