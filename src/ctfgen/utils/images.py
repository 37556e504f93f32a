"""Image tensors <-> uint8 arrays and PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ctfgen.utils.errors import ConfigError
from ctfgen.utils.fileio import atomic_save


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B,C,H,W) floats in [-1,1] -> (B,H,W,C) uint8, rounded to the nearest level: LlamaGen's sample
    writer (127.5x + 128, truncated) but for exact halves, which go to the even level here. ADM's
    sampler truncates (x + 1) * 127.5, half a level darker on average."""
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
    return atomic_save(img.save, path)


def save_images(images: torch.Tensor | np.ndarray, directory: str | Path, names: list[str]) -> list[Path]:
    """One PNG per image, each written under a temporary name and renamed, so a killed run leaves
    whole files only."""
    array = to_uint8(images) if isinstance(images, torch.Tensor) else images
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for img, name in zip(array, names):
        paths.append(atomic_save(_pil(img).save, directory / f"{name}.png"))
    return paths


# --- image quality ----------------------------------------------------------------------------------

def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """(B,) PSNR in dB of (B, C, H, W) images; identical images give +inf."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """(size, size) float64 normalised Gaussian, the window of Wang et al. (2004)."""
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window_size: int = 11, sigma: float = 1.5,
             k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """(B, C, H', W') local SSIM, per channel, over valid window positions (no padding).

    Gaussian-weighted means, variances and covariance, C1 = (k1 L)^2, C2 = (k2 L)^2 (Wang et al.
    2004). Images smaller than the window use the largest odd window that fits.
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ConfigError(f"ssim needs two (B, C, H, W) tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    win = min(window_size, x.shape[-2], x.shape[-1])
    win -= 1 - win % 2
    c = x.shape[1]
    w = gaussian_window(win, sigma).to(x.device)[None, None].repeat(c, 1, 1, 1)
    x, y = x.double(), y.double()

    def filt(t):
        return F.conv2d(t, w, groups=c)

    mu_x, mu_y = filt(x), filt(y)
    var_x = filt(x * x) - mu_x**2
    var_y = filt(y * y) - mu_y**2
    cov = filt(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, **kwargs) -> torch.Tensor:
    """(B,) mean SSIM over channels and window positions."""
    return ssim_map(x, y, data_range, **kwargs).flatten(1).mean(1)
