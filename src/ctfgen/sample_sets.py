"""Sample sets on disk: a grid of images (`ctfgen sample`), and N images per class into an ADM-evaluator
`.npz` (`ctfgen sample-many`), resumable and torchrun-aware.

Each batch has its own seed and its own part file, so the result does not depend on how many ranks
produced it, and a killed run redoes at most the batches that were in flight.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ctfgen.errors import ConfigError


def _atomic_savez(path: Path, **arrays) -> None:
    from ctfgen.fileio import atomic_path

    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


def sample_many(pipeline, labels: np.ndarray, out: Path, batch_size: int, seed: int, sampling: dict,
                rank: int = 0, world_size: int = 1, png_dir: Path | None = None) -> list[Path]:
    """Sample `labels` in batches into part files under `out.parts/`; returns this rank's parts."""
    import torch
    from tqdm import tqdm

    from ctfgen.images import save_images, to_uint8

    parts_dir = out.with_name(out.name + ".parts")
    parts_dir.mkdir(parents=True, exist_ok=True)
    batches = [(i, labels[s : s + batch_size]) for i, s in enumerate(range(0, len(labels), batch_size))]
    mine = [b for b in batches if b[0] % world_size == rank]
    todo = [b for b in mine if not (parts_dir / f"batch{b[0]:06d}.npz").exists()]
    device = pipeline.device
    bar = tqdm(total=sum(len(b[1]) for b in mine), initial=sum(len(b[1]) for b in mine) - sum(len(b[1]) for b in todo),
               unit="img", desc=f"sampling (rank {rank})", disable=rank != 0)
    for index, batch_labels in todo:
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)
        with torch.inference_mode():
            images = pipeline.sample(torch.as_tensor(batch_labels, device=device), generator=generator, **sampling)
        array = to_uint8(images)
        if png_dir is not None:
            start = index * batch_size
            save_images(array, png_dir, [f"{start + j:06d}_class{int(c)}" for j, c in enumerate(batch_labels)])
        _atomic_savez(parts_dir / f"batch{index:06d}.npz", images=array, labels=np.asarray(batch_labels, np.int64))
        bar.update(len(batch_labels))
    bar.close()
    return [parts_dir / f"batch{i:06d}.npz" for i, _ in mine]


def merge_parts(out: Path, num_batches: int) -> None:
    parts_dir = out.with_name(out.name + ".parts")
    images, labels = [], []
    for i in range(num_batches):
        with np.load(parts_dir / f"batch{i:06d}.npz") as part:
            images.append(part["images"])
            labels.append(part["labels"])
    _atomic_savez(out, arr_0=np.concatenate(images), labels=np.concatenate(labels))
    for i in range(num_batches):
        (parts_dir / f"batch{i:06d}.npz").unlink()
    parts_dir.rmdir()


def sample_set(pipeline, out, per_class: int, classes: list[int] | None = None, batch_size: int = 64, seed: int = 0,
               sampling: dict | None = None, png_dir=None) -> Path | None:
    """`per_class` images of each class (default: all) into `out` (.npz); under torchrun the batches
    are shared out and rank 0 merges them. Returns `out`, or None when it already existed."""
    from ctfgen.train import distributed as D

    out = Path(out)
    if out.suffix != ".npz":
        raise ConfigError(f"--out must end in .npz (the ADM evaluator's format), got {out}")
    if out.exists():
        return None
    classes = classes if classes else list(range(pipeline.num_classes))
    bad = [c for c in classes if not 0 <= c < pipeline.num_classes]
    if bad:
        raise ConfigError(f"class ids {bad} are out of range for a model with {pipeline.num_classes} classes")
    labels = np.repeat(np.asarray(classes, np.int64), per_class)
    sample_many(pipeline, labels, out, batch_size, seed, sampling or {}, D.get_rank(), D.get_world_size(),
                Path(png_dir) if png_dir else None)
    D.barrier()
    if D.is_main():
        merge_parts(out, (len(labels) + batch_size - 1) // batch_size)
    D.barrier()
    return out


def sample_grid(pipeline, classes: list[int], n: int, out, seed: int = 0, nrow: int = 8, scale: int = 4,
                singles: bool = True, sampling: dict | None = None, stages: bool = False, baseline=None) -> dict:
    """`ctfgen sample`: `n` images cycling through `classes`, as a PNG grid at `out` and (with
    `singles`) one PNG each in the folder of the same stem. CTF only: `stages` draws per sample the
    coarse preview, the final image and a heat map of stage 2's changes; a `baseline` pipeline samples
    the same classes from the same seed beside it (a fourth row with `stages`). Returns paths, size,
    timings and, where they apply, the baseline's timings and the share of changed positions."""
    import time

    import torch

    from ctfgen.images import save_grid, save_images
    from ctfgen.pipeline import CTFPipeline

    if n < 1:
        raise ConfigError("--n must be at least 1")
    if (stages or baseline is not None) and not isinstance(pipeline, CTFPipeline):
        raise ConfigError("--stages and --compare-baseline need a CTF model as --model")
    device = pipeline.device
    labels = torch.tensor([classes[i % len(classes)] for i in range(n)], device=device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        result = pipeline(labels, generator=torch.Generator(device=device).manual_seed(seed), preview=stages,
                          **(sampling or {}))
    info = {"seconds": time.perf_counter() - t0, "timings": dict(result.timings), "grid": Path(out),
            "size": tuple(result.images.shape[-2:]), "singles": Path(out).with_suffix("") if singles else None}
    if stages or baseline is not None:
        info.update(_comparison(pipeline, result, baseline, Path(out), seed, nrow, scale, stages, sampling or {}))
    else:
        save_grid(result.images, out, nrow=nrow, scale=scale)
    if singles:
        save_images(result.images, info["singles"], [f"{i:04d}_class{int(c)}" for i, c in enumerate(labels.tolist())])
    return info


def _comparison(pipeline, result, baseline, out: Path, seed: int, nrow: int, scale: int, stages: bool,
                sampling: dict) -> dict:
    """--stages and/or --compare-baseline: the baseline samples the same classes from the same seed."""
    import torch

    from ctfgen.images import to_uint8
    from ctfgen.figures import side_by_side, stage_figure, stage_rows

    info, base = {}, None
    if baseline is not None:
        generator = torch.Generator(device=baseline.device).manual_seed(seed)
        with torch.inference_mode():
            shared = {k: v for k, v in sampling.items() if k in baseline.sampling_defaults}
            base = baseline(result.labels, generator=generator, **shared)
        info["baseline_timings"] = dict(base.timings)
    if stages:
        figure = stage_figure(stage_rows(pipeline, result, None if base is None else base.images), nrow=nrow, scale=scale)
        info["changed"] = float(result.changed.float().mean())
    else:
        rgb = [np.repeat(a, 3, -1) if a.shape[-1] == 1 else a for a in (to_uint8(result.images), to_uint8(base.images))]
        figure = side_by_side([("CTF", stage_figure([("", rgb[0])], nrow=nrow, scale=scale)),
                               ("baseline", stage_figure([("", rgb[1])], nrow=nrow, scale=scale))])
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.save(out)
    return info
