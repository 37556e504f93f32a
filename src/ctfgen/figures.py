"""Figures of coarse-to-fine at work: what stage 1 decided and what stage 2 changed, as pictures.

    >>> out = pipe([7, 7, 3], generator=0)       # a pipeline call keeps every stage (ctfgen.pipeline.PipelineOutput)
    >>> change_heat(pipe, out)                   # (B, h, w) how far stage 2 moved from the representative
    >>> stage_figure(stage_rows(pipe, out)).save("stages.png")

The *coarse preview* decodes every coarse label through one codeword of its cluster, its
representative: the member nearest the cluster's k-means centroid (`CoarseMap.representatives`).
It needs no training data and is the codeword k-means itself finds most typical of the cluster;
the frequency-based alternative would need code counts that a shipped coarse map does not carry.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from ctfgen.images import to_uint8
from ctfgen.pipeline import PipelineOutput
from ctfgen.errors import ConfigError

__all__ = ["change_heat", "stage_rows", "stage_figure", "side_by_side"]


def _fitted_codewords(pipe) -> torch.Tensor:
    """(V, D) codewords in the space the coarse map was fitted in."""
    e = pipe.tokenizer.codebook().detach().float().cpu()
    return F.normalize(e, dim=-1) if pipe.coarse_map.normalize else e


@torch.no_grad()
def change_heat(pipe, out: PipelineOutput) -> torch.Tensor:
    """(B, h, w) in [0, 1]: how far stage 2's codeword lies from its cluster's representative, in
    units of the model's largest member-to-representative distance. Exactly 0 where stage 2 kept
    the representative, so the non-zero cells are `out.changed`."""
    if out.coarse_tokens is None:
        raise ConfigError("a heat map of stage 2's changes needs a CTF pipeline's output")
    e = _fitted_codewords(pipe)
    rep_of = pipe.representatives[pipe.coarse_map.fine_to_coarse]
    scale = (e - e[rep_of]).norm(dim=-1).max().clamp_min(1e-12)
    dist = (e[out.tokens.cpu()] - e[out.coarse_tokens.cpu()]).norm(dim=-1) / scale
    dist[out.tokens.cpu() == out.coarse_tokens.cpu()] = 0.0
    g = out.grid_size
    return dist.reshape(-1, g, g).clamp(0, 1)


def _rgb(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    x = to_uint8(images)
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def _heat_rgb(heat: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(B, h, w) in [0, 1] -> (B, H, W, 3) uint8 with the inferno colour map, cells as blocks."""
    from matplotlib import colormaps

    up = F.interpolate(heat[:, None].float(), size=size, mode="nearest")[:, 0].numpy()
    return (colormaps["inferno"](up)[..., :3] * 255).round().astype(np.uint8)


def stage_rows(pipe, out: PipelineOutput, baseline_images: torch.Tensor | None = None) -> list[tuple[str, np.ndarray]]:
    """The rows of a stage figure, each (name, (B, H, W, 3) uint8): coarse preview, final image,
    heat map of stage 2's changes, and the baseline's images when given."""
    size = tuple(out.images.shape[-2:])
    rows = [("coarse", _rgb(out.coarse_preview)), ("final", _rgb(out.images)),
            ("changed", _heat_rgb(change_heat(pipe, out), size))]
    if baseline_images is not None:
        rows.append(("baseline", _rgb(baseline_images)))
    return rows


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def stage_figure(rows: list[tuple[str, np.ndarray]], nrow: int = 8, scale: int = 4, padding: int = 2) -> Image.Image:
    """Samples in columns (`nrow` per block), one line per row kind, named on the left; blocks of
    `nrow` samples stack downwards. Images are enlarged `scale` times (nearest)."""
    b, h, w, _ = rows[0][1].shape
    h, w = h * scale, w * scale
    ncol = min(nrow, b)
    nblocks = (b + ncol - 1) // ncol
    font = _font(max(10, h // 5))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = max(probe.textbbox((0, 0), name, font=font)[2] for name, _ in rows) + 3 * padding
    block_h = len(rows) * (h + padding) + 3 * padding
    canvas = Image.new("RGB", (margin + ncol * (w + padding) + padding, nblocks * block_h + padding), "white")
    draw = ImageDraw.Draw(canvas)
    for blk in range(nblocks):
        for r, (name, arr) in enumerate(rows):
            y = padding + blk * block_h + r * (h + padding)
            draw.text((padding, y + h // 2), name, fill="black", font=font, anchor="lm")
            for j in range(ncol):
                i = blk * ncol + j
                if i < b:
                    tile = Image.fromarray(arr[i]).resize((w, h), Image.NEAREST)
                    canvas.paste(tile, (margin + j * (w + padding), y))
    return canvas


def side_by_side(panels: list[tuple[str, Image.Image]], gap: int = 16) -> Image.Image:
    """Figures next to each other, each titled above."""
    font = _font(16)
    title_h = 24
    width = sum(p.width for _, p in panels) + gap * (len(panels) - 1)
    canvas = Image.new("RGB", (width, title_h + max(p.height for _, p in panels)), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for title, panel in panels:
        draw.text((x + panel.width // 2, title_h // 2), title, fill="black", font=font, anchor="mm")
        canvas.paste(panel.convert("RGB"), (x, title_h))
        x += panel.width + gap
    return canvas
