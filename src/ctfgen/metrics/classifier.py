"""A small Fashion-MNIST CNN whose feature space stands in for Inception's on small data.

The offline metrics (`ctfgen eval --metric-set fmnist`) need a network that knows what
Fashion-MNIST garments look like and needs no download. This one is trained by the project
(`ctfgen train-classifier`) and its weights ship in `ctfgen/assets/fmnist_classifier/`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ctfgen.data.fashion_mnist import load_fashion_mnist, validation_indices
from ctfgen.utils.errors import ConfigError, MissingFileError, WrongTypeError
from ctfgen.utils.fileio import atomic_write_json
from ctfgen.utils.fingerprint import code_commit
from ctfgen.utils.hub import HubMixin

ASSET_PATH = ("assets", "fmnist_classifier")  # inside the ctfgen package (package-data)
# The validation images the study's configs carve from the training split (data.validation_images):
# the shipped judge never trains on them.
VALIDATION_IMAGES = 5000


@dataclass
class ClassifierConfig:
    num_classes: int = 10
    channels: tuple[int, int, int] = (32, 64, 64)
    feature_dim: int = 128
    dropout: float = 0.2

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)  # JSON round-trips tuples as lists


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FMNISTClassifier(nn.Module, HubMixin):
    """28x28x1 -> 128-d features -> 10 logits.

    Three conv stages (28 -> 14 -> 7 -> 3) and one hidden layer: ~6M multiply-adds per image, so it
    trains to ~92% test accuracy in 5 epochs on one CPU core (docs/evaluation.md), and ~130k
    parameters (~0.5 MB) so the weights can ship inside the package.
    """

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        if isinstance(config, dict):  # from_pretrained passes config.json's content as a dict
            config = ClassifierConfig(**config)
        self.config = config
        c1, c2, c3 = config.channels
        self.body = nn.Sequential(
            _conv_bn(1, c1), nn.MaxPool2d(2),   # 14x14
            _conv_bn(c1, c2), nn.MaxPool2d(2),  # 7x7
            _conv_bn(c2, c3), nn.MaxPool2d(2),  # 3x3
            nn.Flatten(),
        )
        self.feature = nn.Sequential(
            nn.Dropout(config.dropout), nn.Linear(c3 * 9, config.feature_dim), nn.ReLU(inplace=True)
        )
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    @staticmethod
    def preprocess(images) -> torch.Tensor:
        """Accept uint8 in [0,255] or floats in [-1,1]; (N,28,28), (N,28,28,1) or (N,1,28,28).

        Returns float32 (N,1,28,28) in [-1,1], the convention of the rest of the project.
        """
        x = FMNISTClassifier._preprocess_batch(images)
        _refuse_unit_range(images)
        return x

    @staticmethod
    def _preprocess_batch(images) -> torch.Tensor:
        """`preprocess` of a batch of a set whose look of [0, 1] images the caller checks whole."""
        # np.array copies, so read-only inputs (np.load mmap, np.frombuffer) are fine
        x = torch.from_numpy(np.array(images)) if isinstance(images, np.ndarray) else torch.as_tensor(images)
        if x.dim() == 3:
            x = x.unsqueeze(1)
        elif x.dim() == 4 and x.shape[1] != 1 and x.shape[-1] == 1:
            x = x.permute(0, 3, 1, 2)
        if x.dim() != 4 or x.shape[1] != 1 or tuple(x.shape[2:]) != (28, 28):
            raise ConfigError(
                f"the Fashion-MNIST classifier expects grayscale 28x28 images as (N,28,28), (N,28,28,1) "
                f"or (N,1,28,28); got shape {tuple(x.shape)}"
            )
        if x.dtype == torch.uint8:
            return x.float() / 127.5 - 1.0
        if not x.is_floating_point():
            # int64 or bool images were read as floats in [-1, 1], whatever range they were meant in
            raise WrongTypeError(f"the Fashion-MNIST classifier takes uint8 images in [0, 255] or float images in "
                                 f"[-1, 1]; got {x.dtype}")
        x = x.float()
        if not bool(torch.isfinite(x).all()):  # NaN passes the range test below and gives NaN metrics
            raise ConfigError("float images hold NaN or infinite values; check the sampler's output")
        if len(x) and (x.min() < -1.01 or x.max() > 1.01):
            raise ConfigError(
                f"float images must lie in [-1, 1] (got values in [{x.min():.3g}, {x.max():.3g}]); "
                "pass uint8 images in [0, 255] or rescale"
            )
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate (post-ReLU) 128-d features: the space the Fréchet distance is measured in."""
        return self.feature(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.forward(x), dim=-1)

    @torch.no_grad()
    def embed(self, images, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
        """Features (N,128) float64 and class probabilities (N,10) float64 of a whole image set."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        # on the whole set: a batch of it may hold only images without black (a uniform grey one)
        _refuse_unit_range(images)
        feats, probs = [], []
        for i in range(0, len(images), batch_size):
            x = self._preprocess_batch(images[i : i + batch_size]).to(device)
            f = self.features(x)
            feats.append(f.double().cpu())
            probs.append(F.softmax(self.head(f), dim=-1).double().cpu())
        self.train(was_training)
        if not feats:
            raise ConfigError("no images to embed")
        return torch.cat(feats).numpy(), torch.cat(probs).numpy()


def _refuse_unit_range(images) -> None:
    """ConfigError if a whole set of float images in [-1, 1] has no value below 0.

    [0, 1] images passed silently as [-1, 1] ones: black read as mid-grey. In [-1, 1] a Fashion-MNIST
    image's black background is -1, so no value below 0 in a whole set means the other convention.
    Values above 1 are left to the range error of `_preprocess_batch`, which says more."""
    whole = images if isinstance(images, torch.Tensor) else np.asarray(images)
    floating = whole.is_floating_point() if isinstance(whole, torch.Tensor) else whole.dtype.kind == "f"
    if floating and len(whole) and whole.max() <= 1.01 and whole.min() >= 0:
        raise ConfigError("float images must lie in [-1, 1] with black at -1, but none of these is below 0: "
                          "they look like [0, 1] images; pass images * 2 - 1, or uint8 images in [0, 255]")


def load_default_classifier(device: str | torch.device = "cpu") -> FMNISTClassifier:
    """The classifier shipped with the package (trained by `ctfgen train-classifier`, see docs/evaluation.md)."""
    root = resources.files("ctfgen").joinpath(*ASSET_PATH)
    with resources.as_file(root) as path:
        if not (Path(path) / "model.safetensors").is_file():
            raise MissingFileError(
                f"the shipped Fashion-MNIST classifier is missing from {path}; reinstall ctfgen, or train one "
                f"with `ctfgen train-classifier --out DIR` and load it with FMNISTClassifier.from_pretrained(DIR)"
            )
        model = FMNISTClassifier.from_pretrained(str(path))
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# data and training


def load_split(split: str, root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST `split` ("train" or "test") as uint8 (N,28,28) images and int64 (N,) labels."""
    return load_fashion_mnist(split, root=root)


@torch.no_grad()
def accuracy(model: FMNISTClassifier, images: np.ndarray, labels: np.ndarray, batch_size: int = 1000) -> float:
    _, probs = model.embed(images, batch_size)
    return float((probs.argmax(1) == np.asarray(labels)).mean())


def train_classifier(
    out_dir: str | Path,
    epochs: int = 5,
    seed: int = 0,
    batch_size: int = 256,
    lr: float = 3e-3,
    config: ClassifierConfig | None = None,
    data_root: str | Path | None = None,
    limit: int | None = None,
    eval_limit: int | None = None,
    validation_images: int = VALIDATION_IMAGES,
    log=logging.getLogger("ctfgen.metrics").info,
) -> tuple[FMNISTClassifier, dict]:
    """Train on the training split less its `validation_images` validation images (random horizontal
    flips), evaluate on the test split, save to `out_dir` (config.json, model.safetensors,
    train_info.json). Returns (model, info).

    The validation images are the ones `data.validation_images` carves out for choosing sampling
    settings (`validation_indices`): a judge that had trained on them would score those choices on
    images it knows."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train_x, train_y = load_split("train", data_root)
    if validation_images:
        keep = np.setdiff1d(np.arange(len(train_y)), validation_indices(train_y, int(validation_images)))
        train_x, train_y = train_x[keep], train_y[keep]
    test_x, test_y = load_split("test", data_root)
    if limit is not None:
        train_x, train_y = train_x[:limit], train_y[:limit]
    if eval_limit is not None:
        test_x, test_y = test_x[:eval_limit], test_y[:eval_limit]
    model = FMNISTClassifier(config or ClassifierConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps_per_epoch = math.ceil(len(train_x) / batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.15)
    x_all = torch.from_numpy(train_x.copy())
    y_all = torch.from_numpy(train_y.astype(np.int64))
    start = time.time()
    for epoch in range(epochs):
        model.train()
        order = torch.from_numpy(rng.permutation(len(x_all)))
        running, seen = 0.0, 0
        for i in range(steps_per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            x = model.preprocess(x_all[idx])
            flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = F.cross_entropy(model(x), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item() * len(idx)
            seen += len(idx)
        test_acc = accuracy(model, test_x, test_y)
        log(f"epoch {epoch + 1}/{epochs} loss {running / seen:.4f} test acc {test_acc:.4f} ({time.time() - start:.0f}s)")
    model.eval()
    info = {
        "epochs": epochs, "seed": seed, "batch_size": batch_size, "lr": lr,
        "train_images": int(len(train_x)), "validation_images_held_out": int(validation_images),
        "test_images": int(len(test_x)), "test_accuracy": accuracy(model, test_x, test_y),
        "seconds": round(time.time() - start, 1), "config": asdict(model.config),
        "num_parameters": sum(p.numel() for p in model.parameters()), "commit": code_commit(),
    }
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    atomic_write_json(out_dir / "train_info.json", info)
    return model, info
