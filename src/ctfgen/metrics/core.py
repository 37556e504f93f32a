"""Metric functions on features: Fréchet distance, kernel distance (KID), precision/recall, Inception Score.

They take features or class probabilities, not images, so the same code serves Inception
(FID, sFID, IS) and the Fashion-MNIST classifier (its Fréchet distance and IS analogue).
Everything that is summed or inverted is done in float64.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import linalg

from ctfgen.utils.errors import ConfigError


def _as_float64(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ConfigError(f"{name} contains NaN or infinite values")
    return x


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D,D) of (N,D) features, in float64 (as pytorch-fid and ADM)."""
    f = _as_float64(features, "features")
    if f.ndim != 2:
        raise ConfigError(f"features must be (N, D), got shape {f.shape}")
    if len(f) < 2:
        raise ConfigError(f"need at least 2 feature vectors for a covariance, got {len(f)}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):

        |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2})

    With few samples relative to the dimension the covariances are singular and `sqrtm` of
    their product may come back non-finite; then, as pytorch-fid and ADM's evaluator do, `eps`
    is added to both diagonals. Round-off gives sqrtm tiny imaginary parts, which are dropped;
    large ones mean the inputs are not valid covariances and raise.
    """
    mu1, mu2 = np.atleast_1d(_as_float64(mu1, "mu1")), np.atleast_1d(_as_float64(mu2, "mu2"))
    sigma1, sigma2 = np.atleast_2d(_as_float64(sigma1, "sigma1")), np.atleast_2d(_as_float64(sigma2, "sigma2"))
    if mu1.shape != mu2.shape:
        raise ConfigError(f"mean vectors have different shapes: {mu1.shape} vs {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ConfigError(f"covariances must be ({d}, {d}); got {sigma1.shape} and {sigma2.shape}")

    diff = mu1 - mu2
    with warnings.catch_warnings():
        # scipy warns on singular products (dead ReLU units, fewer samples than dimensions);
        # pytorch-fid silences this too (disp=False) and handles non-finite results below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"Fréchet distance: product of covariances is singular; adding {eps} to the diagonals")
        offset = np.eye(d) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            worst = np.max(np.abs(covmean.imag))
            raise ConfigError(
                f"Fréchet distance: matrix square root has an imaginary component of {worst:.3g}; "
                "the covariances are not symmetric positive semi-definite (check the feature statistics)"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def frechet_distance_from_features(features1, features2) -> float:
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def kernel_distance(real_features, fake_features, subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """Kernel (Inception) distance of Binkowski et al. (2018): the unbiased MMD² with the cubic
    polynomial kernel k(x, y) = (x·y / D + 1)³, averaged over `subsets` random subsets of
    `subset_size` from each set (as torch-fidelity and the paper): (mean, std).

    Unlike the Fréchet distance it has no small-sample bias, so settings scored on a few thousand
    samples rank as they would on many; its mean can dip just below 0 when the two sets agree.
    """
    real, fake = _as_float64(real_features, "real features"), _as_float64(fake_features, "fake features")
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ConfigError(f"features must be (N, D) with the same D, got {real.shape} and {fake.shape}")
    m = min(int(subset_size), len(real), len(fake))
    if m < 2:
        raise ConfigError(f"the kernel distance needs at least 2 vectors in each set, got {len(real)} and {len(fake)}")
    rng = np.random.default_rng(seed)
    dim = real.shape[1]
    values = []
    for _ in range(int(subsets)):
        x = fake[rng.choice(len(fake), m, replace=False)]
        y = real[rng.choice(len(real), m, replace=False)]
        kxx, kyy, kxy = ((a @ b.T / dim + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values.append(within - 2 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))


def knn_radii(features, k: int = 3, batch_size: int = 1000, device: str | torch.device | None = None) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour within the set (float64, (N,)).

    The radii of a fixed reference set can be computed once and passed to `precision_recall`.
    """
    x = torch.as_tensor(_as_float64(features, "features"), device=device)
    if len(x) <= k:
        raise ConfigError(f"k-NN radii with k={k} need more than {k} points, got {len(x)}")
    radii = torch.empty(len(x), dtype=x.dtype, device=x.device)
    for i in range(0, len(x), batch_size):
        d = torch.cdist(x[i : i + batch_size], x)
        # k + 1 smallest because each point is its own nearest neighbour at distance 0
        radii[i : i + batch_size] = d.topk(k + 1, dim=1, largest=False).values[:, k]
    return radii


def _fraction_inside(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch_size: int) -> float:
    inside = 0
    for i in range(0, len(queries), batch_size):
        d = torch.cdist(queries[i : i + batch_size], centres)
        inside += int((d <= radii[None, :]).any(dim=1).sum())
    return inside / len(queries)


def precision_recall(real_features, fake_features, k: int = 3, batch_size: int = 1000,
                     device: str | torch.device | None = None, real_radii=None) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019).

    Each set's manifold is the union of balls around its points, each ball reaching to that
    point's k-th nearest neighbour within the set. Precision is the fraction of fake points
    inside the real manifold; recall the fraction of real points inside the fake manifold.
    Distances are computed in float64 (cdist's matrix-product shortcut loses too much in float32
    for near-ties), `batch_size` rows at a time so memory stays at batch_size x N.
    `real_radii` may be given (from `knn_radii(real_features, k)`) to skip recomputing them.
    """
    real = torch.as_tensor(_as_float64(real_features, "real_features"), device=device)
    fake = torch.as_tensor(_as_float64(fake_features, "fake_features"), device=device)
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ConfigError(f"features must be (N, D) with the same D; got {tuple(real.shape)} and {tuple(fake.shape)}")
    if min(len(real), len(fake)) <= k:
        raise ConfigError(f"precision/recall with k={k} needs more than {k} real and fake samples; "
                         f"got {len(real)} and {len(fake)}")
    # knn_radii goes through numpy, so without the device its radii came back on the CPU and
    # comparing them with distances on `device` raised a device-mismatch RuntimeError
    if real_radii is None:
        real_radii = knn_radii(real, k, batch_size, device=real.device)
    real_radii = torch.as_tensor(real_radii, dtype=torch.float64, device=real.device)
    if real_radii.shape != (len(real),):
        raise ConfigError(f"real_radii must be ({len(real)},), got {tuple(real_radii.shape)}")
    fake_radii = knn_radii(fake, k, batch_size, device=fake.device)
    precision = _fraction_inside(fake, real, real_radii, batch_size)
    recall = _fraction_inside(real, fake, fake_radii, batch_size)
    return precision, recall


def inception_score(probs, splits: int = 10, shuffle_seed: int | None = None) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))) over `splits` disjoint chunks: (mean, std).

    Chunks are consecutive, as in the original implementation and ADM's evaluator, which assume
    samples in random class order. Files written N-per-class are sorted by class, so each chunk
    would hold one or two classes and score near 1: pass `shuffle_seed` (torch-fidelity shuffles
    too) to permute the rows first. `probs` are (N, C) class probabilities (rows summing to 1).
    """
    p = _as_float64(probs, "probs")
    if p.ndim != 2:
        raise ConfigError(f"probs must be (N, C), got shape {p.shape}")
    if (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
        raise ConfigError("probs must be non-negative rows summing to 1 (apply softmax to logits first)")
    if not 1 <= splits <= len(p):
        raise ConfigError(f"splits must be between 1 and the number of samples ({len(p)}), got {splits}")
    if shuffle_seed is not None:
        p = p[np.random.default_rng(shuffle_seed).permutation(len(p))]
    scores = []
    for chunk in np.array_split(p, splits):
        py = chunk.mean(axis=0, keepdims=True)
        # 0 * log 0 = 0: classes with zero probability contribute nothing
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(chunk > 0, chunk * (np.log(chunk) - np.log(py)), 0.0).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))
