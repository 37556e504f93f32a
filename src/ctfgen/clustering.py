"""Coarse labels for codewords: the clustering that turns a VQ codebook into CTF's stage-1 vocabulary.

A `CoarseMap` assigns each of the V codewords (fine tokens) one of K coarse labels. CTF fits it by
k-means on the codewords as the tokenizer uses them (l2-normalised for LlamaGen), so codewords with
the same label decode to similar patches; `method="random"` gives balanced random groups, the control
the paper argues against.

    >>> cmap = CoarseMap.fit(vq, 512)                 # vq: a VQModel, or its raw embedding weight
    >>> coarse = cmap(fine_tokens)                    # (B, L) fine -> (B, L) coarse
    >>> cmap.check_codebook(other_vq)                 # ValueError if fitted on another codebook
    >>> cmap.save("coarse_map.safetensors"); CoarseMap.load("coarse_map.safetensors")

The map remembers the fingerprint of the codebook it was fitted on (`codebook_fingerprint`) and has
its own identity (`fingerprint`, a hash of the assignment), which models trained on it record in
their configs, so mismatched parts are refused instead of silently producing garbage.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from ctfgen.compat import check_parts
from ctfgen.utils.errors import ConfigError, CorruptFileError, MismatchError, MissingFileError, WrongTypeError
from ctfgen.utils.fileio import atomic_save_safetensors
from ctfgen.utils.fingerprint import codebook_fingerprint, fingerprint_of
from ctfgen.utils.options import tokens_below, whole_numbers

__all__ = ["CoarseMap", "codebook_fingerprint", "fingerprint_of"]

FORMAT = "ctfgen.CoarseMap"
FORMAT_VERSION = 1
METHODS = ("kmeans", "random")


def _codewords(codebook, normalize: bool | None) -> tuple[np.ndarray, str, bool]:
    """(V, D) float64 codewords to cluster, the codebook fingerprint, and whether they were normalised.

    A VQModel gives its codewords as used (`codebook()`), fingerprinted by its raw weight; a tensor is
    taken to be the raw embedding weight, which is what the fingerprint hashes.
    """
    if isinstance(codebook, (torch.Tensor, np.ndarray)):
        weight = torch.as_tensor(codebook)
        if weight.dim() != 2:
            raise MismatchError(f"a codebook is a (V, D) matrix, got shape {tuple(weight.shape)}")
        fp = codebook_fingerprint(weight)
        data = weight.detach().to("cpu", torch.float64)
        normalize = True if normalize is None else normalize
        l2_norm = False  # a raw weight: normalised only when asked
    elif hasattr(codebook, "codebook") and hasattr(codebook, "fingerprint"):
        fp = codebook.fingerprint
        with torch.no_grad():
            data = codebook.codebook().detach().to("cpu", torch.float64)
        l2_norm = bool(getattr(getattr(codebook, "config", None), "codebook_l2_norm", True))
        if normalize is None:
            normalize = l2_norm
    else:
        raise WrongTypeError(f"expected a VQModel or a (V, D) codebook tensor, got {type(codebook).__name__}")
    if normalize:
        data = torch.nn.functional.normalize(data, p=2, dim=-1)
    if not torch.isfinite(data).all():
        raise MismatchError("the codebook contains NaN or inf values")
    # codebook() of an l2-normalising tokenizer is normalised already, so normalize=False clusters normalised
    # codewords all the same; the map records that, for representatives() and readers of its metadata
    return data.numpy(), fp, bool(normalize) or l2_norm


def _map_fingerprint(fine_to_coarse: np.ndarray, num_coarse: int, method: str, codebook_fp: str) -> str:
    h = hashlib.sha256()
    h.update(f"{FORMAT}|{method}|{num_coarse}|{codebook_fp}|".encode())
    h.update(np.ascontiguousarray(fine_to_coarse, dtype="<i8").tobytes())
    return h.hexdigest()[:16]


def _canonical_labels(labels: np.ndarray, k: int) -> np.ndarray:
    """Renumber clusters in order of their smallest member, so equal partitions get equal maps
    whatever order the clustering backend happened to number them in."""
    _, first = np.unique(labels, return_index=True)
    order = labels[np.sort(first)]  # old labels by first appearance
    remap = np.empty(k, dtype=np.int64)
    remap[order] = np.arange(len(order))
    return remap[labels]


def _repair_empty(x: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """Give every empty cluster one point: the point farthest from its centroid among clusters that
    can spare one. sklearn relocates empty clusters during Lloyd, but the final assignment can still
    leave one empty (e.g. duplicate codewords, fewer distinct codewords than clusters)."""
    labels = labels.copy()
    counts = np.bincount(labels, minlength=k)
    repaired = 0
    for c in np.flatnonzero(counts == 0):
        centroids = np.zeros((k, x.shape[1]))
        np.add.at(centroids, labels, x)
        centroids /= np.maximum(counts, 1)[:, None]
        dist = ((x - centroids[labels]) ** 2).sum(1)
        dist[counts[labels] <= 1] = -1.0
        i = int(np.argmax(dist))
        counts[labels[i]] -= 1
        labels[i] = c
        counts[c] = 1
        repaired += 1
    return labels, repaired


def _cluster_stats(x: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    counts = np.bincount(labels, minlength=k)
    centroids = np.zeros((k, x.shape[1]))
    np.add.at(centroids, labels, x)
    centroids /= np.maximum(counts, 1)[:, None]
    sq = ((x - centroids[labels]) ** 2).sum(1)
    spread = np.bincount(labels, weights=sq, minlength=k) / np.maximum(counts, 1)
    return centroids, spread, float(sq.sum())


class CoarseMap:
    """A fine-token -> coarse-label assignment over one codebook. Build with `CoarseMap.fit` or
    `CoarseMap.load`; the constructor takes an existing assignment and checks it."""

    def __init__(
        self,
        fine_to_coarse,
        num_coarse: int,
        *,
        codebook_fingerprint: str,
        method: str = "kmeans",
        seed: int = 0,
        normalize: bool = True,
        centroids=None,
        spread=None,
        inertia: float | None = None,
    ):
        f2c = whole_numbers(fine_to_coarse, "fine_to_coarse must hold whole-number labels", MismatchError)
        f2c = f2c.cpu().reshape(-1).numpy()
        num_coarse = int(num_coarse)
        if method not in METHODS:
            raise MismatchError(f"unknown clustering method {method!r}; choose one of {METHODS}")
        if f2c.size == 0 or f2c.min() < 0 or f2c.max() >= num_coarse:
            raise MismatchError(f"fine_to_coarse must hold labels in [0, {num_coarse}); got range "
                             f"[{f2c.min() if f2c.size else None}, {f2c.max() if f2c.size else None}]")
        sizes = np.bincount(f2c, minlength=num_coarse)
        if (sizes == 0).any():
            empty = np.flatnonzero(sizes == 0)
            raise MismatchError(f"coarse map has {len(empty)} empty cluster(s) (e.g. {empty[:5].tolist()}); "
                             "every coarse label must own at least one codeword")
        self._f2c = f2c
        self.num_coarse = num_coarse
        self.vocab_size = int(f2c.size)
        self.method = method
        self.seed = int(seed)
        self.normalize = bool(normalize)
        self.codebook_fingerprint = str(codebook_fingerprint)
        self.fingerprint = _map_fingerprint(f2c, num_coarse, method, self.codebook_fingerprint)
        self.centroids = None if centroids is None else torch.as_tensor(np.asarray(centroids), dtype=torch.float32)
        self.spread = None if spread is None else torch.as_tensor(np.asarray(spread), dtype=torch.float64)
        self.inertia = None if inertia is None else float(inertia)
        order = np.argsort(f2c, kind="stable")
        self._members = [torch.from_numpy(m) for m in np.split(order, np.cumsum(sizes)[:-1])]
        self._tables: dict[torch.device, torch.Tensor] = {}
        self.fit_seconds: float | None = None
        self.repaired_empty = 0

    # ---------------------------------------------------------------- fitting
    @classmethod
    def fit(
        cls,
        codebook,
        num_coarse: int = 512,
        method: str = "kmeans",
        seed: int = 0,
        *,
        normalize: bool | None = None,
        n_init: int = 4,
        max_iter: int = 300,
        tol: float = 1e-4,
    ) -> "CoarseMap":
        """Cluster `codebook` (a VQModel, or its raw (V, D) embedding weight) into `num_coarse` groups.

        kmeans: scikit-learn Lloyd with k-means++ seeding, `n_init` restarts keeping the lowest
        inertia, fixed `random_state=seed`; then any empty cluster is given a point. random: a seeded
        permutation split into near-equal groups (sizes differ by at most one).
        `normalize` (default: as the tokenizer does, True for a raw weight) l2-normalises the
        codewords first, because LlamaGen's quantiser compares normalised vectors.
        """
        if method not in METHODS:
            raise MismatchError(f"unknown clustering method {method!r}; choose one of {METHODS}")
        x, fp, normalized = _codewords(codebook, normalize)
        v = x.shape[0]
        if not 1 <= num_coarse <= v:
            raise MismatchError(f"num_coarse must be in [1, {v}] (the codebook size), got {num_coarse}")
        repaired = 0
        if method == "kmeans":
            from sklearn.cluster import KMeans  # slow import (seconds), kept out of `fit_seconds`
            from sklearn.exceptions import ConvergenceWarning
        t0 = time.perf_counter()
        if method == "random":
            perm = np.random.default_rng(seed).permutation(v)
            labels = np.empty(v, dtype=np.int64)
            labels[perm] = np.arange(v) % num_coarse
        else:
            km = KMeans(n_clusters=num_coarse, init="k-means++", n_init=n_init, max_iter=max_iter, tol=tol,
                        algorithm="lloyd", random_state=seed)
            with warnings.catch_warnings():
                # "fewer distinct points than clusters": handled by the repair below.
                warnings.simplefilter("ignore", ConvergenceWarning)
                labels = km.fit_predict(x.astype(np.float32)).astype(np.int64)
            labels, repaired = _repair_empty(x, labels, num_coarse)
        labels = _canonical_labels(labels, num_coarse)
        centroids, spread, inertia = _cluster_stats(x, labels, num_coarse)
        cmap = cls(labels, num_coarse, codebook_fingerprint=fp, method=method, seed=seed, normalize=normalized,
                   centroids=centroids, spread=spread, inertia=inertia)
        cmap.fit_seconds = time.perf_counter() - t0
        cmap.repaired_empty = repaired
        return cmap

    # ---------------------------------------------------------------- views
    @property
    def fine_to_coarse(self) -> torch.Tensor:
        """(V,) int64 coarse label of every codeword (a copy; the map is immutable)."""
        return torch.from_numpy(self._f2c.copy())

    @property
    def sizes(self) -> torch.Tensor:
        """(K,) int64 number of codewords per coarse label."""
        return torch.from_numpy(np.bincount(self._f2c, minlength=self.num_coarse))

    @property
    def clusters(self) -> list[torch.Tensor]:
        """Members of every cluster, ascending fine indices."""
        return [m.clone() for m in self._members]

    def members(self, c: int) -> torch.Tensor:
        """(n_c,) int64 fine tokens with coarse label `c`, ascending."""
        if not 0 <= int(c) < self.num_coarse:
            raise ConfigError(f"coarse label {c} out of range [0, {self.num_coarse})")
        return self._members[int(c)].clone()

    def cluster_mask(self, device=None) -> torch.Tensor:
        """(K, V) bool: mask[c, v] is True when codeword v belongs to cluster c."""
        mask = torch.zeros(self.num_coarse, self.vocab_size, dtype=torch.bool)
        mask[torch.from_numpy(self._f2c), torch.arange(self.vocab_size)] = True
        return mask if device is None else mask.to(device)

    def representatives(self, codebook) -> torch.Tensor:
        """(K,) int64: for every coarse label, the member codeword nearest its cluster's centroid.

        `codebook` is the VQModel (or raw embedding weight) the map was fitted on; distances are taken
        in the space the map was fitted in (l2-normalised when `normalize`), ties go to the smallest
        index. The centroid's nearest member needs no training data and is the codeword k-means itself
        considers most typical of the cluster; CTF's coarse preview decodes through it.
        """
        self.check_codebook(codebook, "codebook")
        x, _, _ = _codewords(codebook, self.normalize)
        centroids, _, _ = _cluster_stats(x, self._f2c, self.num_coarse)
        dist = ((x - centroids[self._f2c]) ** 2).sum(1)
        order = np.lexsort((np.arange(self.vocab_size), dist, self._f2c))  # by cluster, then distance, then index
        first = np.searchsorted(self._f2c[order], np.arange(self.num_coarse))
        return torch.from_numpy(order[first].astype(np.int64))

    def __call__(self, fine: torch.Tensor) -> torch.Tensor:
        """Coarse labels of fine tokens, any shape, on the tokens' device."""
        fine = tokens_below(fine, self.vocab_size, "fine tokens", "are these tokens from another tokenizer?")
        table = self._tables.get(fine.device)
        if table is None:
            table = self._tables[fine.device] = torch.from_numpy(self._f2c).to(fine.device)
        return table[fine]

    def stats(self) -> dict:
        sizes = self.sizes.double()
        out = {
            "method": self.method, "num_coarse": self.num_coarse, "vocab_size": self.vocab_size, "seed": self.seed,
            "normalize": self.normalize, "size_min": int(sizes.min()), "size_max": int(sizes.max()),
            "size_mean": float(sizes.mean()), "fingerprint": self.fingerprint,
            "codebook_fingerprint": self.codebook_fingerprint,
        }
        if self.spread is not None:
            out["spread_mean"] = float((self.spread * sizes).sum() / sizes.sum())  # = inertia / V
        if self.inertia is not None:
            out["inertia"] = self.inertia
        return out

    def __repr__(self) -> str:
        s = self.sizes
        return (f"CoarseMap(method={self.method!r}, num_coarse={self.num_coarse}, vocab_size={self.vocab_size}, "
                f"sizes {int(s.min())}..{int(s.max())}, fingerprint={self.fingerprint!r}, "
                f"codebook={self.codebook_fingerprint!r})")

    # ---------------------------------------------------------------- checks
    def check_codebook(self, codebook_or_fingerprint, what: str = "tokenizer") -> None:
        """Raise MismatchError unless the VQModel / raw codebook weight / fingerprint is the one this
        map was fitted on."""
        check_parts(f"coarse map {self.fingerprint} does not fit the {what}", coarse_map=self,
                    tokenizer=codebook_or_fingerprint,
                    hint="Use the tokenizer the map was fitted on, or fit a new map on this one (`ctfgen cluster`).")

    # ---------------------------------------------------------------- files
    def save(self, path) -> Path:
        """A small .safetensors file: fine_to_coarse (+ centroids and spread when known) and metadata."""
        tensors = {"fine_to_coarse": torch.from_numpy(self._f2c.copy())}
        if self.centroids is not None:
            tensors["centroids"] = self.centroids.contiguous()
        if self.spread is not None:
            tensors["spread"] = self.spread.contiguous()
        meta = {
            "format": FORMAT, "format_version": str(FORMAT_VERSION), "num_coarse": str(self.num_coarse),
            "vocab_size": str(self.vocab_size), "method": self.method, "seed": str(self.seed),
            "normalize": json.dumps(self.normalize), "codebook_fingerprint": self.codebook_fingerprint,
            "fingerprint": self.fingerprint, "inertia": json.dumps(self.inertia),
        }
        return atomic_save_safetensors(tensors, path, meta)

    @classmethod
    def load(cls, path) -> "CoarseMap":
        """Load a map written by `save`, checking that the file is whole and consistent."""
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"coarse map file {path} not found (write one with `ctfgen cluster`)")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise CorruptFileError(f"{path} cannot be read as a coarse map ({e}); it is truncated or not a "
                                   "safetensors file, write it again with `ctfgen cluster`") from None
        if meta.get("format") != FORMAT or "fine_to_coarse" not in tensors:
            raise MismatchError(f"{path} is not a ctfgen coarse map (no {FORMAT} metadata / fine_to_coarse tensor)")

        def parsed(key, kinds, what, default=None):
            # hand-edited or damaged metadata: int() and json.loads raised bare ValueErrors naming no file
            text = meta[key] if default is None else meta.get(key, default)
            try:
                value = json.loads(text)
            except ValueError:
                value = ...
            if type(value) not in kinds:  # type(), not isinstance: True is no integer here
                raise CorruptFileError(f"{path}: coarse map metadata {key}={text!r} is not {what}; the file is "
                                       "damaged or was edited, write it again with `ctfgen cluster`")
            return value

        if parsed("format_version", (int,), "an integer", "-1") > FORMAT_VERSION:
            raise MismatchError(f"{path} was written by a newer ctfgen (format {meta['format_version']}); upgrade ctfgen")
        try:
            num_coarse, vocab = parsed("num_coarse", (int,), "an integer"), parsed("vocab_size", (int,), "an integer")
            cmap = cls(tensors["fine_to_coarse"], num_coarse, codebook_fingerprint=meta["codebook_fingerprint"],
                       method=meta["method"], seed=parsed("seed", (int,), "an integer"),
                       normalize=parsed("normalize", (bool,), "true or false"),
                       centroids=tensors.get("centroids"), spread=tensors.get("spread"),
                       inertia=parsed("inertia", (int, float, type(None)), "a number or null", "null"))
        except KeyError as e:
            raise MismatchError(f"{path}: coarse map metadata lacks {e}") from None
        if cmap.vocab_size != vocab:
            raise MismatchError(f"{path}: metadata says {vocab} codewords but fine_to_coarse has {cmap.vocab_size}")
        if cmap.fingerprint != meta.get("fingerprint"):
            raise MismatchError(f"{path}: stored fingerprint {meta.get('fingerprint')} does not match its contents "
                             f"({cmap.fingerprint}); the file is corrupt or was edited")
        return cmap
