"""Coarse-to-fine at work: what stage 1 decided, what stage 2 changed, as tensors and as pictures.

    >>> out = pipe([7, 7, 3], generator=0)       # a pipeline call keeps every stage
    >>> out.images, out.coarse_preview           # (B, C, H, W) final images and stage 1's picture
    >>> out.changed                              # (B, h, w) True where stage 2 left the representative
    >>> stage_figure(stage_rows(pipe, out)).save("stages.png")

The *coarse preview* decodes every coarse label through one codeword of its cluster, its
representative: the member nearest the cluster's k-means centroid (`CoarseMap.representatives`).
It needs no training data and is the codeword k-means itself finds most typical of the cluster;
the frequency-based alternative would need code counts that a shipped coarse map does not carry.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from ctfgen.images import to_uint8

__all__ = ["PipelineOutput", "run_pipeline", "change_heat", "stage_rows", "stage_figure", "side_by_side"]


@dataclass
class PipelineOutput:
    """One pipeline call. The CTF-only fields are None for the baseline."""

    images: torch.Tensor                          # (B, C, H, W) in [-1, 1]
    tokens: torch.Tensor                          # (B, image_tokens) fine tokens
    labels: torch.Tensor                          # (B,) class ids
    timings: dict = field(default_factory=dict)   # seconds: stage1, stage2, decode, total (+ coarse_preview)
    coarse: torch.Tensor | None = None            # (B, image_tokens) coarse labels stage 1 sampled
    coarse_tokens: torch.Tensor | None = None     # (B, image_tokens) their representative codewords
    coarse_preview: torch.Tensor | None = None    # (B, C, H, W) coarse_tokens decoded (unless preview=False)

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.tokens.shape[1])

    @property
    def changed(self) -> torch.Tensor | None:
        """(B, h, w) bool: where stage 2 chose a codeword other than its cluster's representative."""
        if self.coarse_tokens is None:
            return None
        g = self.grid_size
        return (self.tokens != self.coarse_tokens).reshape(-1, g, g)


def _timed(fn, device):
    from ctfgen.pipeline import _sync

    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


@torch.no_grad()
def run_pipeline(pipe, labels, generator=None, preview: bool = True, **kwargs) -> PipelineOutput:
    """`pipe(labels, ...)`: sample tokens, decode them, and for CTF decode the coarse preview too
    (`preview=False` keeps the coarse labels and their representatives but skips decoding them).
    Same options and draws as `pipe.sample`; timings as `pipe.last_timings`, plus `coarse_preview`
    (not counted in `total`, which stays the cost of the final images)."""
    from ctfgen.pipeline import CTFPipeline, _labels

    if pipe.tokenizer is None:
        raise ValueError(f"this {type(pipe).__name__} has no tokenizer, so it cannot decode images; "
                         "pass tokenizer= or use sample_tokens")
    tokens = pipe.sample_tokens(labels, generator=generator, **kwargs)
    timings = dict(pipe.last_timings)
    device = tokens.device
    images, timings["decode"] = _timed(lambda: pipe.decode(tokens), device)
    timings["total"] = timings["stage1"] + timings["stage2"] + timings["decode"]
    out = PipelineOutput(images=images, tokens=tokens, labels=_labels(labels, pipe.num_classes, device),
                         timings=timings)
    if isinstance(pipe, CTFPipeline):
        out.coarse = pipe.last_coarse
        out.coarse_tokens = pipe.representatives.to(device)[out.coarse]
        if preview:
            out.coarse_preview, timings["coarse_preview"] = _timed(lambda: pipe.decode(out.coarse_tokens), device)
    pipe.last_timings = timings
    return out


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
        raise ValueError("a heat map of stage 2's changes needs a CTF pipeline's output")
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
