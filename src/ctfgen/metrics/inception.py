"""Inception-v3 features for FID / sFID / IS / precision-recall, via torch-fidelity, offline.

torch-fidelity's `FeatureExtractorInceptionV3` is a port of the TensorFlow graph
(`pt_inception-2015-12-05`) that the original FID code, ADM's evaluator and LlamaGen's numbers
use, including TF1's bilinear resize to 299x299. We only ever load its weights from a local file:
this project must run on machines without internet.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sys
import threading
import types
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ctfgen.utils.errors import ConfigError, CorruptFileError, MissingFileError

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_ENV = "CTFGEN_INCEPTION_WEIGHTS"
DEFAULT_DIR = Path("~/.cache/ctfgen").expanduser()
# where torch-fidelity itself caches the file after a download, so an existing copy is reused
TORCH_HUB_DIR = Path(torch.hub.get_dir()) / "checkpoints"

FEATURE_DIM = 2048
NUM_LOGITS = 1008
# sFID (Nash et al. 2021, as in ADM's evaluator): the first 7 channels of the 17x17 map of the
# 1x1 branch of TF's `mixed_6` block (torch-fidelity's Mixed_6d), flattened: 7 * 17 * 17 = 2023,
# in ADM's order (its NHWC map reshaped: position-major, channels last), which the mu_s/sigma_s of
# ADM's reference batches are in; a Fréchet distance against them needs the same order.
SPATIAL_CHANNELS = 7


class InceptionWeightsNotFound(MissingFileError):
    """The Inception-v3 weights file is not where it was looked for."""


def _missing_weights_message(searched: list[Path]) -> str:
    where = "\n".join(f"  - {p}" for p in searched)
    return (
        f"Inception-v3 weights not found: expected the file `{WEIGHTS_FILE}`.\n"
        f"Looked in:\n{where}\n"
        "This machine cannot download them. To provide them:\n"
        f"  1. on a machine with internet access, download `{WEIGHTS_FILE}` from the torch-fidelity\n"
        "     GitHub release v0.2.0 (the file torch-fidelity itself uses for FID/IS; ~91 MB);\n"
        f"  2. copy it to {DEFAULT_DIR}/{WEIGHTS_FILE}, or anywhere and set {WEIGHTS_ENV}=/path/to/{WEIGHTS_FILE};\n"
        "  3. or pass it explicitly: `ctfgen eval ... --inception-weights /path/to/the/file`.\n"
        "For Fashion-MNIST no download is needed: use `ctfgen eval ... --metric-set fmnist`."
    )


def find_inception_weights(path: str | Path | None = None) -> Path:
    """The weights file: `path` if given, else $CTFGEN_INCEPTION_WEIGHTS (each a file or a folder
    holding it), else ~/.cache/ctfgen/, else torch-hub's checkpoint cache. Raises a helpful error otherwise."""
    given = path if path is not None else os.environ.get(WEIGHTS_ENV) or None
    candidates = []
    if given is not None:
        given_path = Path(given).expanduser()
        candidates.append(given_path / WEIGHTS_FILE if given_path.is_dir() else given_path)
    if path is None:
        candidates += [DEFAULT_DIR / WEIGHTS_FILE, TORCH_HUB_DIR / WEIGHTS_FILE]
    for c in candidates:
        if c.is_file():
            return c
    raise InceptionWeightsNotFound(_missing_weights_message(candidates))


def _check_hash(path: Path) -> None:
    # Same convention as torch.hub: a `-<8 hex>.pth` suffix is the start of the file's sha256.
    # A truncated copy would otherwise fail later with a confusing unpickling or shape error.
    m = re.search(r"-([0-9a-f]{8})\.pth$", path.name)
    if not m:
        return
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if not h.hexdigest().startswith(m.group(1)):
        raise ConfigError(
            f"{path} is corrupt or not the expected file: its sha256 starts with {h.hexdigest()[:8]}, "
            f"the name says {m.group(1)}. Download `{WEIGHTS_FILE}` again."
        )


def _inception_module() -> types.ModuleType:
    """Import torch_fidelity.feature_extractor_inceptionv3 even where torchvision is missing.

    torch-fidelity's package __init__ eagerly imports its CLIP/VGG/DINOv2 extractors, which
    import torchvision; torchvision wheels are pinned to one torch version and there is none for
    ours, so `import torch_fidelity` fails although the Inception extractor itself needs only
    torch. If (and only if) the normal import fails, we register an empty package object for
    `torch_fidelity` whose __path__ points at the installed files, so that importing the one
    submodule we need skips the package __init__.
    """
    name = "torch_fidelity.feature_extractor_inceptionv3"
    try:
        return importlib.import_module(name)
    except ImportError as err:
        first_error = err
    if name in sys.modules:  # the failed package import may already have loaded it
        return sys.modules[name]
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "torch-fidelity is not installed; it provides the Inception network for FID/IS. "
            "Install it without its torchvision dependency: pip install --no-deps 'torch-fidelity==0.4.0'"
        ) from first_error
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    package.__file__ = spec.origin
    sys.modules["torch_fidelity"] = package
    return importlib.import_module(name)


_construct_lock = threading.Lock()


def load_inception(weights: str | Path | None = None, device: str | torch.device = "cpu"):
    """torch-fidelity's InceptionV3 with features '2048' and 'logits_unbiased', weights from a local file."""
    path = find_inception_weights(weights)
    _check_hash(path)
    # weights_only: the file is a plain state dict, and unpickling arbitrary objects is unsafe.
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for a bad file
        raise CorruptFileError(f"{path} cannot be read as tensors ({type(e).__name__}): it is truncated, corrupt or "
                               f"not a state dict; download `{WEIGHTS_FILE}` again") from None
    if not isinstance(state_dict, dict):
        raise ConfigError(f"{path} is not a torch-fidelity Inception-v3 state dict (it holds a "
                          f"{type(state_dict).__name__}); download `{WEIGHTS_FILE}` again")
    module = _inception_module()
    # The constructor either downloads (weights path None) or calls torch.load(weights_only=False).
    # We hand it our already-loaded state dict through the download hook instead, which also
    # guarantees no network access; the constructor's own load_state_dict is strict.
    with _construct_lock:
        original = module.load_state_dict_from_url
        module.load_state_dict_from_url = lambda *args, **kwargs: state_dict
        try:
            net = module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
        except RuntimeError as err:
            raise ConfigError(f"{path} is not a torch-fidelity Inception-v3 state dict:\n{err}") from err
        finally:
            module.load_state_dict_from_url = original
    return net.to(device).eval()


def _to_nchw_uint8(images) -> torch.Tensor:
    x = torch.from_numpy(np.array(images)) if isinstance(images, np.ndarray) else torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise ConfigError(f"Inception features take uint8 images (N,H,W,C) in [0,255]; got dtype {x.dtype}")
    if x.dim() == 3:  # (N,H,W) grayscale
        x = x.unsqueeze(-1)
    if x.dim() != 4 or x.shape[-1] not in (1, 3):
        raise ConfigError(f"expected images of shape (N,H,W,C) with C in (1,3); got {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2)
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x.contiguous()


@torch.no_grad()
def inception_features(images, net=None, weights: str | Path | None = None, batch_size: int = 50,
                       device: str | torch.device | None = None, spatial: bool = False,
                       progress: bool = False) -> dict[str, np.ndarray]:
    """Run Inception on uint8 (N,H,W,C) images (grayscale is repeated to RGB; any size is resized
    to 299 inside the network). Returns float64 arrays: 'pool' (N,2048), 'logits' (N,1008; the
    unbiased logits used for IS by ADM and torch-fidelity), and with `spatial` also 'spatial'
    (N,2023) for sFID."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if net is None:
        net = load_inception(weights, device)
    net_device = next(net.parameters()).device
    captured = {}
    hook = None
    if spatial:
        hook = net.Mixed_6d.branch1x1.register_forward_hook(
            lambda mod, inp, out: captured.__setitem__("spatial",
                                                       out[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1))
        )
    pools, logits, spatials = [], [], []
    try:
        starts = range(0, len(images), batch_size)
        if progress:
            starts = tqdm(starts, desc="inception", unit="batch")
        for i in starts:
            x = _to_nchw_uint8(images[i : i + batch_size]).to(net_device)
            pool, logit = net(x)
            pools.append(pool.double().cpu())
            logits.append(logit.double().cpu())
            if spatial:
                spatials.append(captured.pop("spatial").double().cpu())
    finally:
        if hook is not None:
            hook.remove()
    if not pools:
        raise ConfigError("no images given")
    out = {"pool": torch.cat(pools).numpy(), "logits": torch.cat(logits).numpy()}
    if spatial:
        out["spatial"] = torch.cat(spatials).numpy()
    return out
