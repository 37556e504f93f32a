"""Sample sets on disk: a picture of up to `options.MAX_SAMPLE_IMAGES` images (`ctfgen sample`), and N
images per class into an ADM-evaluator `.npz` (`ctfgen sample-many`), resumable and torchrun-aware.

Both work in batches with a progress bar and write images as they are made, so the models' memory
is a batch's whatever the count. `sample` keeps only the picture's uint8 pixels (capped); a set
of any size streams through `sample-many`: each batch has its own seed and its own part file, so
the result does not depend on how many ranks produced it, a killed run redoes at most the batches
that were in flight, and the final `.npz` is written part by part, never held whole in memory.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ctfgen.app.figures import HEAT_ROW, change_heat, heat_rgb, rgb, rgb_array, side_by_side, stage_figure
from ctfgen.pipeline import CTFPipeline
from ctfgen.utils import distributed as D
from ctfgen.utils.errors import ConfigError
from ctfgen.utils.fileio import atomic_path, atomic_save, atomic_write_json, read_json
from ctfgen.utils.images import save_grid, save_images, to_uint8
from ctfgen.utils.options import MAX_GRID_PIXELS, check, check_output_dir, check_output_file, fmt
from ctfgen.utils.precision import dtype_name, resolve_dtype

PARTS_REQUEST = "request.json"


def _parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def _part(parts_dir: Path, index: int) -> Path:
    return parts_dir / f"batch{index:06d}.npz"


def _atomic_savez(path: Path, **arrays) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


def _weights_sha1(pipeline) -> str:
    """sha1 over every tensor of the pipeline's models and tokenizer. The codebook fingerprints alone
    would let another model of the same tokenizer (RUN/matched for RUN/baseline, or the same model
    trained further) finish a set that this one started."""
    h = hashlib.sha1()
    for module in [*(getattr(pipeline, name) for name in pipeline.models), pipeline.tokenizer]:
        if module is None:
            continue
        for name, t in module.state_dict().items():
            t = t.detach().cpu().contiguous().reshape(-1)
            h.update(f"{name}:{t.dtype}:{t.numel()}".encode())
            h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def _request(pipeline, labels: np.ndarray, batch_size: int, seed: int, sampling: dict) -> dict:
    """What a set of part files was made from; resuming with anything else would mix two sets."""
    model = {"type": pipeline.kind, "num_classes": pipeline.num_classes, "image_tokens": pipeline.image_tokens}
    for name, part in (("coarse_map", getattr(pipeline, "coarse_map", None)), ("tokenizer", pipeline.tokenizer)):
        if part is not None:
            model[name] = part.fingerprint
    model["weights_sha1"] = _weights_sha1(pipeline)
    # the options the batches are drawn with: unset ones take the pipeline's stored defaults, which differ by model
    sampling = {**sampling, **pipeline.resolve_sampling({k: v for k, v in sampling.items() if k != "dtype"})}
    if sampling.get("dtype") is not None:  # what it draws in: "auto" is bfloat16 on one machine, float32 on another
        sampling["dtype"] = dtype_name(resolve_dtype(sampling["dtype"], pipeline.device))
    return {"model": model, "images": int(len(labels)), "labels_sha1": hashlib.sha1(labels.tobytes()).hexdigest(),
            "batch_size": int(batch_size), "seed": int(seed),
            "sampling": json.loads(json.dumps(sampling, sort_keys=True, default=str))}


def _check_request(parts_dir: Path, request: dict) -> None:
    path = parts_dir / PARTS_REQUEST
    if not path.is_file():
        return
    then = read_json(path, f"delete {parts_dir} to sample the set again")
    if then != request:
        changed = [f"{k}: {then.get(k)!r} then, {request.get(k)!r} now" for k in request if then.get(k) != request.get(k)]
        raise ConfigError(f"{parts_dir} holds batches of another request ({'; '.join(changed)}); repeat that command "
                          "to finish it, or delete the folder to start this one")


def sample_many(pipeline, labels: np.ndarray, out: Path, batch_size: int, seed: int, sampling: dict,
                rank: int = 0, world_size: int = 1, png_dir: Path | None = None, progress: bool = True,
                request: dict | None = None) -> list[Path]:
    """Sample `labels` in batches into part files under `out.parts/`; returns this rank's parts.
    Finished parts are kept (and skipped when run again); the folder appears with the first part.
    `request`: what `_request` makes of these arguments, when the caller has checked it already."""
    parts_dir = _parts_dir(out)
    if request is None:  # it hashes every weight
        request = _request(pipeline, labels, batch_size, seed, sampling)
        _check_request(parts_dir, request)
    batches = [(i, labels[s : s + batch_size]) for i, s in enumerate(range(0, len(labels), batch_size))]
    mine = [b for b in batches if b[0] % world_size == rank]
    todo = [b for b in mine if not _part(parts_dir, b[0]).exists()]
    device = pipeline.device
    bar = tqdm(total=sum(len(b[1]) for b in mine), initial=sum(len(b[1]) for b in mine) - sum(len(b[1]) for b in todo),
               unit="img", desc=f"sampling (rank {rank})" if world_size > 1 else "sampling",
               disable=rank != 0 or not progress)
    try:
        for index, batch_labels in todo:
            generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)
            with torch.inference_mode():
                images = pipeline.sample(torch.as_tensor(batch_labels, device=device), generator=generator, **sampling)
            array = to_uint8(images)
            if png_dir is not None:
                start = index * batch_size
                save_images(array, png_dir, [f"{start + j:06d}_class{int(c)}" for j, c in enumerate(batch_labels)])
            if not (parts_dir / PARTS_REQUEST).is_file():
                atomic_write_json(parts_dir / PARTS_REQUEST, request)
            _atomic_savez(_part(parts_dir, index), images=array, labels=np.asarray(batch_labels, np.int64))
            bar.update(len(batch_labels))
    finally:
        bar.close()
    return [_part(parts_dir, i) for i, _ in mine]


def _npy_header(zf: zipfile.ZipFile, name: str) -> tuple[tuple, np.dtype]:
    with zf.open(name) as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return shape, dtype


def _stream_array(zf: zipfile.ZipFile, name: str, parts: list[Path], key: str) -> None:
    """One array of the output .npz, written part by part: memory is one part's, whatever the total."""
    shapes = []
    for p in parts:
        with zipfile.ZipFile(p) as part:
            shapes.append(_npy_header(part, f"{key}.npy"))
    (first, dtype) = shapes[0]
    if any(s[1:] != first[1:] or d != dtype for s, d in shapes):
        raise ConfigError(f"the part files in {parts[0].parent} do not share one shape and dtype; delete the folder "
                          "and sample again")
    shape = (sum(s[0] for s, _ in shapes), *first[1:])
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    with zf.open(name, "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, header)
        for p in parts:
            with np.load(p) as part:
                f.write(np.ascontiguousarray(part[key]).tobytes())


def merge_parts(out: Path, num_batches: int) -> None:
    """`out` (.npz: arr_0 images, labels) from the part files, streamed, then the parts removed."""
    parts_dir = _parts_dir(out)
    parts = [_part(parts_dir, i) for i in range(num_batches)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise ConfigError(f"{parts_dir} lacks {len(missing)} of {num_batches} batches ({', '.join(missing[:3])} ...); "
                          "run the same command again to make them")
    with atomic_path(out, suffix=".npz") as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            _stream_array(zf, "arr_0.npy", parts, "images")
            _stream_array(zf, "labels.npy", parts, "labels")
    for p in parts:
        p.unlink()
    # with request.json, whatever a run killed inside _atomic_savez left there (its hidden temporary file)
    shutil.rmtree(parts_dir)


def check_sample_set(out, per_class: int, batch_size: int, png_dir=None) -> Path:
    """`ctfgen sample-many`'s counts and paths, checked before any work."""
    out = check_output_file(out, ".npz", "--out")
    check("per_class", per_class, "--per-class")
    check("batch_size", batch_size, "--batch-size")
    if png_dir is not None:
        check_output_dir(png_dir, "--png-dir")
    check_output_dir(_parts_dir(out), "the folder of finished batches")  # a file there failed after a batch
    return out


def sample_set(pipeline, out, per_class: int, classes: list[int] | None = None, batch_size: int = 64, seed: int = 0,
               sampling: dict | None = None, png_dir=None, progress: bool = True) -> Path | None:
    """`per_class` images of each class (default: all) into `out` (.npz); under torchrun the batches
    are shared out and rank 0 merges them. Returns `out`, or None when it already existed. A run
    that stops keeps its finished batches in `out.parts/` (run again to continue); one that made
    no batch leaves nothing behind."""
    out = check_sample_set(out, per_class, batch_size, png_dir)
    if out.exists():
        parts_dir = _parts_dir(out)
        if parts_dir.is_dir() and D.is_main():
            # out appears (atomically) only once merged from every part, so these are the parts of a run killed
            # before it removed them; no other run would remove them, as each stops here
            shutil.rmtree(parts_dir)
        return None
    classes = classes if classes else list(range(pipeline.num_classes))
    bad = [c for c in classes if not 0 <= c < pipeline.num_classes]
    if bad:
        raise ConfigError(f"class ids {bad} are out of range for a model with {pipeline.num_classes} classes")
    twice = sorted({c for c in classes if classes.count(c) > 1})
    if twice:  # each would get a multiple of per_class images: a set skewed towards them, not N per class
        raise ConfigError(f"class ids {twice} are given more than once; give each class once (--per-class sets "
                          "how many images it gets)")
    sampling = sampling or {}
    pipeline.resolve_sampling({k: v for k, v in sampling.items() if k != "dtype"})  # every option checked before work
    labels = np.repeat(np.asarray(classes, np.int64), per_class)
    num_batches = (len(labels) + batch_size - 1) // batch_size
    parts_dir = _parts_dir(out)
    request = _request(pipeline, labels, batch_size, seed, sampling)
    _check_request(parts_dir, request)  # before the try: another request's folder is not this run's to clean up
    try:
        sample_many(pipeline, labels, out, batch_size, seed, sampling, D.get_rank(), D.get_world_size(),
                    Path(png_dir) if png_dir else None, progress, request)
    except BaseException:
        done = len(list(parts_dir.glob("batch*.npz"))) if parts_dir.is_dir() else 0
        if done == 0 and parts_dir.is_dir() and D.is_main():
            for f in parts_dir.iterdir():
                f.unlink()
            parts_dir.rmdir()
        elif done:
            print(f"{done} of {num_batches} batches are saved in {parts_dir}; run the same command again to continue",
                  file=sys.stderr)
        raise
    D.barrier()
    if D.is_main():
        merge_parts(out, num_batches)
    D.barrier()
    return out


# --- `ctfgen sample`: one picture ----------------------------------------------------------------

def image_shape(pipeline) -> tuple[int, int, int]:
    """(H, W, C) of the images a pipeline decodes, known before sampling."""
    side = pipeline.grid_size * pipeline.tokenizer.downsample
    return side, side, pipeline.tokenizer.config.in_channels


def check_picture(pipeline, n: int, out, nrow: int = 8, scale: int = 4, singles: bool = True, rows: int = 1,
                  batch_size: int = 64) -> Path:
    """`ctfgen sample`'s counts, output paths and picture size, checked before any work."""
    if pipeline.tokenizer is None:  # image_shape reads the tokenizer: an AttributeError traceback otherwise
        raise ConfigError(f"this {pipeline.kind} pipeline was saved without a tokenizer, so it cannot decode images: "
                          "save it with one, or sample a baseline that shares its CTF model's beside that model "
                          "(--model CTF --compare-baseline --baseline DIR)")
    out = check_output_file(out, "image", "--out")
    n = check("n", n, "--n")
    nrow, scale = check("nrow", nrow, "--nrow"), check("scale", scale, "--scale")
    check("batch_size", batch_size, "--batch-size")
    if singles:
        check_output_dir(out.with_suffix(""), "the single images' folder (--no-singles writes none)")
    h, w, _ = image_shape(pipeline)
    ncol = min(nrow, n)
    pixels = ((n + ncol - 1) // ncol) * rows * (h * scale + 2) * ncol * (w * scale + 2)
    if pixels > MAX_GRID_PIXELS:
        raise ConfigError(f"the picture would have {fmt(round(pixels / 2**20))} megapixels ({fmt(n)} images of "
                          f"{h}x{w} at --scale {scale}), more than {fmt(MAX_GRID_PIXELS // 2**20)}: lower --n or --scale, "
                          "or use `ctfgen sample-many` for a large set")
    return out


def sample_grid(pipeline, classes: list[int], n: int, out, seed: int = 0, nrow: int = 8, scale: int = 4,
                singles: bool = True, sampling: dict | None = None, stages: bool = False, baseline=None,
                batch_size: int = 64, progress: bool = True) -> dict:
    """`ctfgen sample`: `n` images cycling through `classes`, as a picture at `out` and (with
    `singles`) one PNG each in the folder of the same stem, written batch by batch as they are made.
    CTF only: `stages` draws per sample the coarse preview, the final image and a heat map of stage
    2's changes; a `baseline` pipeline samples the same classes from its own generator with the
    same seed beside it (a fourth row with `stages`). One generator per pipeline runs through the
    batches, so `n` up to `batch_size` draws what one call would.

    Returns paths, image size, `timings` (seconds per part, parts adding up to `total`, the wall
    time from the first batch to the written picture), the baseline's own timings and the share of
    positions stage 2 changed, where they apply."""
    if (stages or baseline is not None) and not isinstance(pipeline, CTFPipeline):
        raise ConfigError("--stages and --compare-baseline need a CTF model as --model")
    rows = (3 if stages else 1) + (baseline is not None)
    out = check_picture(pipeline, n, out, nrow, scale, singles, rows, batch_size)
    sampling = sampling or {}
    pipeline.resolve_sampling({k: v for k, v in sampling.items() if k != "dtype"})  # every option checked before work
    device = pipeline.device
    labels = [classes[i % len(classes)] for i in range(n)]
    generator = torch.Generator(device=device).manual_seed(seed)
    base_generator = torch.Generator(device=baseline.device).manual_seed(seed) if baseline is not None else None
    shared = {k: v for k, v in sampling.items() if baseline is not None and k in {*baseline.sampling_defaults, "dtype"}}
    parts = {"stage1": 0.0, "stage2": 0.0, "decode": 0.0, "coarse_preview": 0.0, "baseline": 0.0, "writing": 0.0}
    base_parts: dict = {}
    picture: dict[str, list[np.ndarray]] = {}
    changed = []
    singles_dir = out.with_suffix("") if singles else None
    bar = tqdm(total=n, unit="img", desc="sampling", disable=not progress)
    t_all = time.perf_counter()
    try:
        for start in range(0, n, batch_size):
            batch = torch.tensor(labels[start:start + batch_size], device=device)
            with torch.inference_mode():
                result = pipeline(batch, generator=generator, preview=stages, **sampling)
                base = baseline(batch.to(baseline.device), generator=base_generator, **shared) if baseline else None
            for k, v in result.timings.items():
                if k != "total":
                    parts[k] = parts.get(k, 0.0) + v
            if base is not None:
                parts["baseline"] += base.timings["total"]
                for k, v in base.timings.items():
                    base_parts[k] = base_parts.get(k, 0.0) + v
            t0 = time.perf_counter()
            final = to_uint8(result.images)
            if stages:
                changed.append(result.changed.float().mean().item() * len(batch))
                _add(picture, "coarse", rgb(result.coarse_preview))
                _add(picture, "final", rgb(result.images))
                _add(picture, HEAT_ROW, heat_rgb(change_heat(pipeline, result), tuple(result.images.shape[-2:])))
            else:
                _add(picture, "final", final)
            if base is not None:
                _add(picture, "baseline", rgb(base.images) if stages else to_uint8(base.images))
            if singles:
                save_images(final, singles_dir, [f"{start + i:04d}_class{c}" for i, c in enumerate(labels[start:start + len(batch)])])
            parts["writing"] += time.perf_counter() - t0
            bar.update(len(batch))
    finally:
        bar.close()
    t0 = time.perf_counter()
    _save_picture(picture, out, nrow, scale, stages)
    parts["writing"] += time.perf_counter() - t0
    total = time.perf_counter() - t_all
    if baseline is None:
        parts.pop("baseline")
    if not stages:
        parts.pop("coarse_preview")
    if not isinstance(pipeline, CTFPipeline):
        parts.pop("stage2")
    parts["other"] = max(0.0, total - sum(parts.values()))
    parts["total"] = total
    info = {"grid": out, "size": image_shape(pipeline)[:2], "singles": singles_dir, "timings": parts, "n": n}
    if base_parts:
        info["baseline_timings"] = base_parts
    if stages:
        info["changed"] = sum(changed) / n
    return info


def _add(picture: dict, row: str, array: np.ndarray) -> None:
    picture.setdefault(row, []).append(array)


def _save_picture(picture: dict, out: Path, nrow: int, scale: int, stages: bool) -> None:
    """The grid (one row kind), the stage figure (--stages), or CTF beside the baseline."""
    rows = {k: np.concatenate(v) for k, v in picture.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    if stages:
        atomic_save(stage_figure(list(rows.items()), nrow=nrow, scale=scale).save, out)
    elif "baseline" in rows:
        figure = side_by_side([("CTF", stage_figure([("", rgb_array(rows["final"]))], nrow=nrow, scale=scale)),
                               ("baseline", stage_figure([("", rgb_array(rows["baseline"]))], nrow=nrow, scale=scale))])
        atomic_save(figure.save, out)
    else:
        save_grid(rows["final"], out, nrow=nrow, scale=scale)
