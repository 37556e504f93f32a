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

from ctfgen.pipeline import PipelineOutput
from ctfgen.utils.errors import ConfigError
from ctfgen.utils.images import to_uint8

__all__ = ["change_heat", "stage_rows", "stage_figure", "side_by_side", "heat_legend", "rgb", "rgb_array", "heat_rgb"]

HEAT_ROW = "changed"      # the stage-figure row of stage 2's changes, drawn with HEAT_MAP and a colour scale
HEAT_MAP = "inferno"


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


def rgb_array(x: np.ndarray) -> np.ndarray:
    """(B, H, W, 1 or 3) uint8 -> (B, H, W, 3) uint8."""
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def rgb(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return rgb_array(to_uint8(images))


def _colours(values: np.ndarray) -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps[HEAT_MAP](values)[..., :3] * 255).round().astype(np.uint8)


def heat_rgb(heat: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(B, h, w) in [0, 1] -> (B, H, W, 3) uint8 in HEAT_MAP's colours, cells as blocks."""
    return _colours(F.interpolate(heat[:, None].float().cpu(), size=size, mode="nearest")[:, 0].numpy())


def heat_legend(width: int = 360, font_size: int = 12, padding: int = 4) -> Image.Image:
    """The heat map's colour scale: what 0 and 1 mean, as a gradient with ticks (at least `width` wide)."""
    font = _font(font_size)
    title = "changed: how far stage 2's codeword lies from its cluster's representative"
    ticks = [(0.0, "0 = kept the representative", "la"), (0.5, "0.5", "ma"), (1.0, "1 = the cluster's farthest member", "ra")]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = lambda t: probe.textbbox((0, 0), t, font=font)[2]  # noqa: E731
    text_h = probe.textbbox((0, 0), "Ag", font=font)[3]
    width = max(width, text_w(title), text_w(ticks[0][1]) + text_w(ticks[2][1]) + text_w(ticks[1][1]) + 6 * padding)
    bar_h = max(8, font_size)
    bar_w = width - 2 * padding
    canvas = Image.new("RGB", (width, 3 * padding + 2 * text_h + bar_h + 4), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((padding, padding), title, fill="black", font=font)
    y = 2 * padding + text_h
    gradient = np.repeat(_colours(np.linspace(0.0, 1.0, bar_w))[None], bar_h, axis=0)
    canvas.paste(Image.fromarray(gradient), (padding, y))
    for value, label, anchor in ticks:
        x = padding + round(value * (bar_w - 1))
        draw.line([(x, y + bar_h), (x, y + bar_h + 3)], fill="black")
        draw.text((x, y + bar_h + 4), label, fill="black", font=font, anchor=anchor)
    return canvas


def stage_rows(pipe, out: PipelineOutput, baseline_images: torch.Tensor | None = None) -> list[tuple[str, np.ndarray]]:
    """The rows of a stage figure, each (name, (B, H, W, 3) uint8): coarse preview, final image,
    heat map of stage 2's changes, and the baseline's images when given."""
    # a baseline's output, or a CTF call with preview=False, was an AttributeError traceback in rgb(None)
    if out.coarse_tokens is None:
        raise ConfigError("a stage figure needs a CTF pipeline's output; a baseline has no coarse stage")
    if out.coarse_preview is None:
        raise ConfigError("a stage figure needs the coarse preview: call the pipeline with preview=True (the default)")
    size = tuple(out.images.shape[-2:])
    rows = [("coarse", rgb(out.coarse_preview)), ("final", rgb(out.images)),
            (HEAT_ROW, heat_rgb(change_heat(pipe, out), size))]
    if baseline_images is not None:
        rows.append(("baseline", rgb(baseline_images)))
    return rows


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def stage_figure(rows: list[tuple[str, np.ndarray]], nrow: int = 8, scale: int = 4, padding: int = 2) -> Image.Image:
    """Samples in columns (`nrow` per block), one line per row kind, named on the left; blocks of
    `nrow` samples stack downwards. Images are enlarged `scale` times (nearest). A HEAT_ROW row
    gets its colour scale (`heat_legend`) at the bottom."""
    b, h, w, _ = rows[0][1].shape
    h, w = h * scale, w * scale
    ncol = min(nrow, b)
    nblocks = (b + ncol - 1) // ncol
    font = _font(max(10, h // 5))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = max(probe.textbbox((0, 0), name, font=font)[2] for name, _ in rows) + 3 * padding
    block_h = len(rows) * (h + padding) + 3 * padding
    width, height = margin + ncol * (w + padding) + padding, nblocks * block_h + padding
    legend = None
    if any(name == HEAT_ROW for name, _ in rows):
        legend = heat_legend(width - margin - padding, font_size=max(10, min(h // 5, 16)))
        width, height = max(width, margin + legend.width + padding), height + legend.height + padding
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if legend is not None:
        canvas.paste(legend, (margin, nblocks * block_h + padding))
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
