"""Evaluate a sample set against a reference: image loading, the two metric sets, result files.

Metric sets
- "inception": FID, sFID, Inception Score, precision, recall, in torch-fidelity's port of the
  TF Inception-v3 used by ADM's evaluator (weights from a local file).
- "fmnist": the same quantities in the feature space of the project's Fashion-MNIST classifier,
  plus class-consistency accuracy. Offline, fast, and NOT comparable to ImageNet FID.

An evaluation record (what `ctfgen eval --out` writes and `ctfgen compare` reads) is a JSON object
    {"name": str, "epoch": int|null, "metric_set": str, "samples": str, "reference": str,
     "num_samples": int, "num_reference": int, "metrics": {key: float}}
A run directory for `ctfgen compare` holds such records as RUN/eval/*.json, one per evaluated epoch.
"""

from __future__ import annotations

import time
import zipfile
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ctfgen.data.fashion_mnist import find_fashion_mnist
from ctfgen.metrics.classifier import load_default_classifier, load_split
from ctfgen.metrics.core import (
    feature_statistics,
    frechet_distance,
    inception_score,
    kernel_distance,
    knn_radii,
    precision_recall,
)
from ctfgen.metrics.inception import inception_features, load_inception
from ctfgen.utils.errors import ConfigError, CorruptFileError, MissingFileError
from ctfgen.utils.fileio import atomic_write_json
from ctfgen.utils.images import to_uint8

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
# Samples are often stored sorted by class (N per class); the IS splits must each see all classes.
IS_SHUFFLE_SEED = 0
FMNIST_REFS = {"test": "test", "fashion-mnist-test": "test", "train": "train", "fashion-mnist-train": "train"}

# ------------------------------------------------------------------------------------------------
# loading


def load_images(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 (N,H,W,C) images and int64 labels (or None) from an ADM-style .npz or an image folder.

    .npz: images under `arr_0`, labels under `labels` or `arr_1` if present.
    Folder: every image file below it, in sorted path order; labels are None.
    """
    path = Path(path)
    if path.is_dir():
        return _load_folder(path), None
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist (expected an .npz sample/reference batch or an image folder)")
    if path.suffix != ".npz":
        raise ConfigError(f"{path}: expected an .npz file (ADM format, images under arr_0) or a folder of images")
    data, names = _read_npz(path, ("arr_0", "labels", "arr_1"))
    if "arr_0" not in data:
        raise ConfigError(f"{path} has no `arr_0` array (keys: {names}); ADM-style files keep uint8 "
                          "images (N,H,W,C) under arr_0")
    labels = data.get("labels", data.get("arr_1"))
    return _check_images(data["arr_0"], str(path)), (None if labels is None else np.asarray(labels).astype(np.int64))


def _read_npz(path: Path, keys: tuple[str, ...]) -> tuple[dict[str, np.ndarray], list[str]]:
    """({key: array} for those of `keys` the .npz holds, all its names); CorruptFileError for a file that is
    no .npz archive or has a damaged member."""
    try:
        data = np.load(path)
        if not isinstance(data, np.lib.npyio.NpzFile):  # a single .npy array saved under an .npz name
            raise CorruptFileError(f"{path} holds one .npy array, not an .npz archive; save it with np.savez "
                                   "(images under arr_0)")
        with data:
            return {k: data[k] for k in keys if k in data.files}, list(data.files)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        if isinstance(e, CorruptFileError):
            raise
        raise CorruptFileError(f"{path} cannot be read as an .npz file ({type(e).__name__}: {e})") from None


def _load_folder(folder: Path) -> np.ndarray:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ConfigError(f"{folder} contains no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    arrays = []
    for f in files:
        try:
            with Image.open(f) as img:
                a = np.asarray(img.convert("L") if img.mode in ("L", "I;16", "I", "1") else img.convert("RGB"))
        except Exception as e:  # noqa: BLE001 - PIL raises many types for a file it cannot decode
            raise CorruptFileError(f"{f} cannot be read as an image ({type(e).__name__}: {e}); "
                                   f"replace or remove it from {folder}") from None
        arrays.append(a[..., None] if a.ndim == 2 else a)
    if len({a.shape[-1] for a in arrays}) > 1:
        # a few grayscale files among RGB ones (ImageNet has some): RGB, as torch-fidelity's convert("RGB") reads them
        arrays = [np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a for a in arrays]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ConfigError(f"images in {folder} have different shapes {sorted(shapes)[:5]}; resize them to one size first")
    return _check_images(np.stack(arrays), str(folder))


def _check_images(images: np.ndarray, source: str) -> np.ndarray:
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ConfigError(f"{source}: expected images (N,H,W,C) with C in (1,3), got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ConfigError(f"{source}: expected uint8 images, got {images.dtype}")
    if len(images) == 0:
        raise ConfigError(f"{source}: no images")
    return images


# ------------------------------------------------------------------------------------------------
# Fashion-MNIST classifier metrics


@lru_cache(maxsize=2)
def _default_classifier():
    return load_default_classifier()


def _fmnist_split_embedding(split: str):
    return _split_embedding(find_fashion_mnist(split=split).resolve(), split)


def _fmnist_split_radii(split: str, k: int):
    return _split_radii(find_fashion_mnist(split=split).resolve(), split, k)


@lru_cache(maxsize=4)
def _split_embedding(directory: Path, split: str):
    # The reference features of a split in one folder never change for the shipped classifier; the
    # reproduction evaluates many checkpoints against the same split, so compute them once per process.
    # The folder is part of the key: $CTFGEN_FASHION_MNIST may point elsewhere later in the process.
    images, labels = load_split(split, directory)
    feats, probs = _default_classifier().embed(images)
    return feats, probs, labels


@lru_cache(maxsize=4)
def _split_radii(directory: Path, split: str, k: int):
    # k-NN radii of 10k (60k) reference points are the costliest part of precision/recall
    return knn_radii(_split_embedding(directory, split)[0], k)


def fmnist_grayscale(images):
    """Bring (N,28,28,C) RGB-stored grayscale images to one channel; other layouts pass through."""
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[-1] == 3:
        return images.astype(np.float64).mean(-1).round().astype(np.uint8) if images.dtype == np.uint8 else images.mean(-1)
    return images


def evaluate_fmnist(images, labels=None, ref="test", classifier=None, k: int = 3, splits: int = 10,
                    batch_size: int = 500) -> dict[str, float]:
    """Fashion-MNIST classifier-space metrics of `images` against a reference.

    images: uint8 in [0,255] or float in [-1,1]; (N,28,28), (N,28,28,1) or (N,1,28,28).
    labels: the classes the images were conditioned on; adds `class_consistency`.
    ref: "test" / "train" (Fashion-MNIST splits), or uint8 images, or a path to an .npz / folder.
    Returns {"fd", "kid", "kid_std", "is", "is_std", "precision", "recall"[, "class_consistency"]}: the
    Fréchet distance of 128-d classifier features, their kernel distance (KID, unbiased; see
    `kernel_distance`), the IS analogue from classifier probabilities,
    improved precision/recall (k-NN) in the same features, and the fraction of samples the
    classifier assigns to their conditioning label.
    """
    model = classifier if classifier is not None else _default_classifier()
    feats, probs = model.embed(fmnist_grayscale(images), batch_size)
    ref_radii = None
    if isinstance(ref, str) and ref in FMNIST_REFS and classifier is None:
        ref_feats = _fmnist_split_embedding(FMNIST_REFS[ref])[0]
        ref_radii = _fmnist_split_radii(FMNIST_REFS[ref], k)
    else:
        if isinstance(ref, str) and ref in FMNIST_REFS:
            ref_images = load_split(FMNIST_REFS[ref])[0]
        elif isinstance(ref, (str, Path)):
            ref_images = load_images(ref)[0]
        else:
            ref_images = ref
        ref_feats = model.embed(fmnist_grayscale(ref_images), batch_size)[0]
    metrics = {"fd": frechet_distance(*feature_statistics(feats), *feature_statistics(ref_feats))}
    metrics["kid"], metrics["kid_std"] = kernel_distance(ref_feats, feats)
    metrics["is"], metrics["is_std"] = inception_score(probs, splits=min(splits, len(probs)), shuffle_seed=IS_SHUFFLE_SEED)
    metrics["precision"], metrics["recall"] = precision_recall(ref_feats, feats, k=k, real_radii=ref_radii)
    if labels is not None:
        labels = np.asarray(labels).astype(np.int64)
        if labels.shape != (len(probs),):
            raise ConfigError(f"labels must be ({len(probs)},) to match the images, got {labels.shape}")
        metrics["class_consistency"] = float((probs.argmax(1) == labels).mean())
    return metrics


def sample_per_class(pipeline, per_class: int, seed: int = 0, batch_size: int = 500, sampling: dict | None = None
                     ) -> tuple[np.ndarray, np.ndarray, float]:
    """`per_class` samples of every class, sorted by class: (uint8 (N,H,W,C), labels (N,), seconds per image).

    Batch i draws from seed `seed * 1_000_003 + i`, as `ctfgen sample-many` does, so a sample set is
    reproducible from (seed, batch size) alone.
    """
    labels = torch.arange(pipeline.num_classes).repeat_interleave(int(per_class))
    images, seconds = [], 0.0
    for i, start in enumerate(range(0, len(labels), int(batch_size))):
        generator = torch.Generator(device=pipeline.device).manual_seed(int(seed) * 1_000_003 + i)
        t0 = time.perf_counter()
        with torch.inference_mode():
            batch = pipeline.sample(labels[start:start + int(batch_size)], generator=generator, **(sampling or {}))
        seconds += time.perf_counter() - t0
        images.append(to_uint8(batch))
    return np.concatenate(images), labels.numpy(), seconds / max(len(labels), 1)


# ------------------------------------------------------------------------------------------------
# Inception metrics


def _reference_inception(ref, net, batch_size, device, need_spatial):
    """(pool features or None, stats, spatial stats or None) of an ADM reference batch or folder.

    ADM's reference batches carry precomputed `mu`/`sigma` (and `mu_s`/`sigma_s`); they are used
    for FID/sFID as ADM's evaluator does, while precision/recall still need the images' features.
    """
    stats = spatial_stats = None
    path = Path(ref)
    if path.suffix == ".npz" and path.is_file():
        data, _ = _read_npz(path, ("mu", "sigma", "mu_s", "sigma_s"))
        if "mu" in data and "sigma" in data:
            stats = (data["mu"], data["sigma"])
        if "mu_s" in data and "sigma_s" in data:
            spatial_stats = (data["mu_s"], data["sigma_s"])
    images, _ = load_images(path)
    need_spatial = need_spatial and spatial_stats is None
    f = inception_features(images, net=net, batch_size=batch_size, device=device, spatial=need_spatial, progress=True)
    stats = stats or feature_statistics(f["pool"])
    if need_spatial:
        spatial_stats = feature_statistics(f["spatial"])
    return f["pool"], stats, spatial_stats, len(images)


def evaluate_inception(images, ref, weights: str | Path | None = None, k: int = 3, splits: int = 10,
                       batch_size: int = 50, device=None, sfid: bool = True) -> tuple[dict[str, float], int]:
    """FID, sFID, IS, precision, recall of uint8 (N,H,W,C) `images` against `ref` (a .npz or folder).
    Returns (metrics, number of reference images)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    net = load_inception(weights, device)
    f = inception_features(images, net=net, batch_size=batch_size, spatial=sfid, progress=True)
    ref_pool, ref_stats, ref_spatial_stats, n_ref = _reference_inception(ref, net, batch_size, device, sfid)
    metrics = {"fid": frechet_distance(*feature_statistics(f["pool"]), *ref_stats)}
    if sfid:
        metrics["sfid"] = frechet_distance(*feature_statistics(f["spatial"]), *ref_spatial_stats)
    probs = torch.softmax(torch.from_numpy(f["logits"]), dim=1).numpy()
    metrics["is"], metrics["is_std"] = inception_score(probs, splits=min(splits, len(probs)), shuffle_seed=IS_SHUFFLE_SEED)
    metrics["precision"], metrics["recall"] = precision_recall(ref_pool, f["pool"], k=k, device=device)
    return metrics, n_ref


# ------------------------------------------------------------------------------------------------
# records


def evaluate(samples: str | Path, ref: str, metric_set: str = "inception", name: str | None = None,
             epoch: int | None = None, inception_weights=None, k: int = 3, splits: int = 10,
             batch_size: int = 50, device=None, sfid: bool = True) -> dict:
    """Load `samples` (.npz or folder), compute `metric_set` against `ref`, return an evaluation record.

    `ref` names a Fashion-MNIST split (FMNIST_REFS) only with metric_set "fmnist"; there a split name that is
    also an existing path is refused as ambiguous, while with "inception" (which has no splits) it is the path."""
    ambiguous = ref in FMNIST_REFS and Path(ref).exists()
    if ambiguous and metric_set == "fmnist":
        other = [name for name, split in FMNIST_REFS.items() if split == FMNIST_REFS[ref] and not Path(name).exists()]
        for_split = f"{other[0]} for the split" if other else "run from another folder for the split"
        raise ConfigError(f"--ref {ref} is both the Fashion-MNIST {FMNIST_REFS[ref]} split and the path "
                          f"{Path(ref).resolve()}; write ./{ref} for the path, or {for_split}")
    images, labels = load_images(samples)
    if metric_set == "fmnist":
        ref_arg = ref if ref in FMNIST_REFS else load_images(ref)[0]
        metrics = evaluate_fmnist(images, labels, ref=ref_arg, k=k, splits=splits)
        n_ref = len(_fmnist_split_embedding(FMNIST_REFS[ref])[0]) if ref in FMNIST_REFS else len(ref_arg)
    elif metric_set == "inception":
        if ref in FMNIST_REFS and not ambiguous:
            raise ConfigError(f"--ref {ref} is a Fashion-MNIST split; it goes with --metric-set fmnist")
        metrics, n_ref = evaluate_inception(images, ref, weights=inception_weights, k=k, splits=splits,
                                            batch_size=batch_size, device=device, sfid=sfid)
    else:
        raise ConfigError(f"unknown metric set {metric_set!r}; choose 'inception' or 'fmnist'")
    return {
        "name": name or Path(samples).stem,
        "epoch": epoch,
        "metric_set": metric_set,
        "samples": str(samples),
        "reference": str(ref),
        "num_samples": int(len(images)),
        "num_reference": int(n_ref),
        "metrics": metrics,
    }


def write_record(record: dict, path: str | Path) -> Path:
    """Write an evaluation record as JSON, atomically (the reproduction writes RUN/eval/*.json while
    `ctfgen compare` may be reading them)."""
    return atomic_write_json(path, record)
