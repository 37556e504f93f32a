"""How interchangeable are the codewords within a cluster? (CTF paper, Fig. 1b, as a measurement.)

Encode images, replace every token with a random *other* member of its own cluster, decode, and
compare with the plain reconstruction (PSNR, SSIM). Two controls: the same swap under a balanced
random cluster map of equal K, and a swap for a random codeword from the whole codebook. If
k-means clusters hold near-duplicates, the in-cluster swap barely changes the image while the
controls destroy it: that redundancy is what lets CTF predict the coarse label first.

    >>> r = measure_redundancy(vq, coarse_map, images, seed=0)
    >>> r["in_cluster"]["psnr"], r["random_map"]["psnr"], r["whole_codebook"]["psnr"]
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

from ctfgen.clustering import CoarseMap
from ctfgen.config import DataConfig
from ctfgen.data.factory import make_dataset
from ctfgen.metrics.compare import text_table
from ctfgen.pipeline import CTFPipeline, load_pipeline
from ctfgen.tokenizer import load_tokenizer
from ctfgen.utils.errors import ConfigError
from ctfgen.utils.fileio import atomic_write_json
from ctfgen.utils.images import psnr, save_grid, ssim

__all__ = ["swap_within_clusters", "measure_redundancy",
           "redundancy_table", "SWAPS", "load_images", "redundancy_report"]

SWAPS = ("in_cluster", "random_map", "whole_codebook")


def swap_within_clusters(codes: torch.Tensor, fine_to_coarse: torch.Tensor, generator: torch.Generator | None = None
                         ) -> torch.Tensor:
    """Replace every token by a uniformly drawn *other* member of its cluster (itself only when the
    cluster is a singleton), so every swappable token really changes. Any shape; same device."""
    f2c = torch.as_tensor(fine_to_coarse, dtype=torch.long).cpu()
    v = f2c.numel()
    k = int(f2c.max()) + 1
    sizes = torch.bincount(f2c, minlength=k)
    offsets = torch.cumsum(sizes, 0) - sizes
    order = torch.argsort(f2c, stable=True)  # members of cluster c: order[offsets[c] : offsets[c] + sizes[c]]
    rank = torch.empty(v, dtype=torch.long)
    rank[order] = torch.arange(v) - offsets[f2c[order]]

    flat = codes.reshape(-1).long().cpu()
    c = f2c[flat]
    n = sizes[c]
    others = (n - 1).clamp(min=1)
    r = (torch.rand(flat.shape, generator=generator, dtype=torch.float64) * others).long().clamp(max=others - 1)
    r = torch.where(r >= rank[flat], r + 1, r)  # skip the token itself
    new = torch.where(n > 1, order[offsets[c] + r.clamp(max=n - 1)], flat)
    return new.view(codes.shape).to(codes.device)


@torch.no_grad()
def measure_redundancy(vq, coarse_map: CoarseMap, images: torch.Tensor, seed: int = 0,
                       random_map: CoarseMap | None = None, return_images: bool = False) -> dict:
    """Fig. 1(b) numbers for `images` (B, C, H, W) in [-1, 1].

    Returns {"num_images", "num_coarse", "vocab_size", "seed", "reconstruction": {psnr, ssim} (vs the
    originals), and for each of "in_cluster", "random_map", "whole_codebook": {psnr, ssim, changed}
    (vs the plain reconstruction; `changed` = fraction of tokens that differ)}; PSNR/SSIM are means
    over images, computed on [0, 1] intensities. With `return_images`, also "images": the five rows
    original, reconstruction, in_cluster, random_map, whole_codebook.
    """
    coarse_map.check_codebook(vq)
    device = next(vq.parameters()).device
    images = images.to(device)
    gen = torch.Generator().manual_seed(seed)
    if random_map is None:
        random_map = CoarseMap.fit(vq, coarse_map.num_coarse, method="random", seed=seed)
    random_map.check_codebook(vq)

    codes = vq.encode(images)
    recon = vq.decode(codes).clamp(-1, 1)
    swapped = {
        "in_cluster": swap_within_clusters(codes, coarse_map.fine_to_coarse, gen),
        "random_map": swap_within_clusters(codes, random_map.fine_to_coarse, gen),
        "whole_codebook": swap_within_clusters(codes, torch.zeros(coarse_map.vocab_size, dtype=torch.long), gen),
    }

    def unit(t):
        return (t.double().clamp(-1, 1) + 1) / 2

    result = {
        "num_images": int(images.shape[0]), "num_coarse": coarse_map.num_coarse, "vocab_size": coarse_map.vocab_size,
        "seed": seed, "coarse_map": coarse_map.fingerprint, "coarse_map_method": coarse_map.method,
        "reconstruction": {"psnr": float(psnr(unit(recon), unit(images)).mean()),
                           "ssim": float(ssim(unit(recon), unit(images)).mean())},
    }
    rows = {"original": images, "reconstruction": recon}
    for name, new_codes in swapped.items():
        out = vq.decode(new_codes).clamp(-1, 1)
        rows[name] = out
        result[name] = {"psnr": float(psnr(unit(out), unit(recon)).mean()), "ssim": float(ssim(unit(out), unit(recon)).mean()),
                        "changed": float((new_codes != codes).double().mean())}
    if return_images:
        result["images"] = rows
    return result


def redundancy_table(result: dict) -> str:
    k = result["num_coarse"]
    label = {"in_cluster": f"in-cluster swap ({result.get('coarse_map_method', 'kmeans')}, K={k})",
             "random_map": f"random-map swap (balanced, K={k})", "whole_codebook": "whole-codebook swap"}
    rec = result["reconstruction"]
    rows = [["reconstruction vs original", f"{rec['psnr']:.2f}", f"{rec['ssim']:.4f}", ""]]
    finite = lambda p: p if math.isfinite(p) else float("inf")  # noqa: E731 - identical images: infinite PSNR
    rows += [[label[n], f"{finite(result[n]['psnr']):.2f}", f"{result[n]['ssim']:.4f}", f"{result[n]['changed']:.1%}"] for n in SWAPS]
    return (f"{result['num_images']} images, vocab {result['vocab_size']}; swaps compared with the plain reconstruction\n"
            + text_table(["", "PSNR dB", "SSIM", "changed"], rows))


def load_images(data: str, n: int, channels: int, split: str = "test", image_size: int | None = None,
                seed: int = 0) -> torch.Tensor:
    """`n` random images (seeded) of Fashion-MNIST's `split` (data="fashion_mnist") or of an image
    folder, as (n, channels, H, W) in [-1, 1]."""
    fmnist = data == "fashion_mnist"
    cfg = DataConfig(dataset="fashion_mnist" if fmnist else "image_folder", root=None if fmnist else data,
                     test_root=None if fmnist else data, image_size=image_size, channels=None if fmnist else channels)
    ds = make_dataset(cfg, split if fmnist else "train", channels=channels)
    if n > len(ds):
        raise ConfigError(f"--images {n} but the data set has only {len(ds)} images")
    idx = np.sort(np.random.default_rng(seed).choice(len(ds), size=n, replace=False))
    x = torch.stack([ds[int(i)][0] for i in idx])
    if x.shape[1] == 1 and channels == 3:
        x = x.repeat(1, 3, 1, 1)
    if x.shape[1] != channels:
        raise ConfigError(f"the images have {x.shape[1]} channels but the tokenizer expects {channels}")
    return x


def redundancy_report(tokenizer=None, model=None, coarse_map=None, num_coarse: int | None = None, images: int = 16,
                      data: str = "fashion_mnist", split: str = "test", image_size: int | None = None,
                      out="redundancy.png", json_path=None, scale: int = 4, grid_columns: int = 16, seed: int = 0,
                      device=None) -> dict:
    """`ctfgen redundancy`: measure the three swaps on `images` images with the tokenizer (of a
    pipeline directory `model`, or a saved VQModel `tokenizer`) and a coarse map (given, the CTF
    pipeline's, or k-means with `num_coarse` fitted now); write the image grid (rows: original,
    reconstruction, in-cluster, random-map, whole-codebook swap) and, with `json_path`, the numbers."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cmap = None
    if model:
        pipe = load_pipeline(model)
        if pipe.tokenizer is None:
            raise ConfigError(f"{model} has no tokenizer/ directory")
        vq = pipe.tokenizer
        if isinstance(pipe, CTFPipeline) and coarse_map is None and num_coarse is None:
            cmap = pipe.coarse_map
    else:
        vq = load_tokenizer(tokenizer)
    vq = vq.to(device).eval()
    if coarse_map:
        cmap = CoarseMap.load(coarse_map)
        if num_coarse is not None and num_coarse != cmap.num_coarse:
            raise ConfigError(f"--num-coarse {num_coarse} disagrees with {coarse_map} ({cmap.num_coarse} clusters)")
    if cmap is None:
        k = num_coarse or min(512, vq.config.codebook_size)
        cmap = CoarseMap.fit(vq, k, seed=seed)
        logging.getLogger("ctfgen.experiments.redundancy").info(f"fitted k-means with {k} clusters in {cmap.fit_seconds:.1f} s")
    cmap.check_codebook(vq)
    x = load_images(data, images, vq.config.in_channels, split, image_size, seed)
    result = measure_redundancy(vq, cmap, x, seed=seed, return_images=True)
    rows = result.pop("images")
    shown = min(images, grid_columns)
    grid = torch.cat([rows[k][:shown].cpu() for k in ("original", "reconstruction", *SWAPS)])
    result["grid"] = str(save_grid(grid, out, nrow=shown, scale=scale))
    if json_path:
        atomic_write_json(Path(json_path), {k: v for k, v in result.items() if k != "grid"})
    return result
