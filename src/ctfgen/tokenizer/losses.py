"""Tokenizer training losses as LlamaGen uses them: reconstruction, LPIPS perceptual loss, and a
PatchGAN discriminator with hinge loss.

LPIPS needs pretrained weights, which ctfgen does not download. `load_lpips(path)` reads them from
one local file (.safetensors, or .pth/.pt read with weights_only=True) holding

    features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.{weight,bias}   torchvision's vgg16().features
    lin{0..4}.model.1.weight  (1, C, 1, 1), C = 64,128,256,512,512  the `lpips` package's v0.1 vgg.pth

`classifier.*` (the rest of a torchvision vgg16 state dict) is ignored. The VGG tensors may also use
the `lpips`/taming module layout (`net.slice{1..5}.<index>.*`, as in a saved LPIPS module), and the
lin layers the `lins.<i>.model.1.weight` alias. To make the file once, on a machine with torchvision
and lpips installed:

    python -m ctfgen.tokenizer.losses merge VGG16.pth LPIPS_VGG.pth OUT.safetensors

where VGG16.pth is torchvision's `vgg16-397923af.pth` and LPIPS_VGG.pth is `lpips/weights/v0.1/vgg.pth`
(or `load_lpips(lin_path, vgg_path=...)` reads the two files directly).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ctfgen.utils.errors import ConfigError, CorruptFileError, MissingFileError
from ctfgen.utils.fileio import atomic_save
from ctfgen.utils.hub import load_state_dict_strict

__all__ = [
    "reconstruction_loss", "VGG16Features", "LPIPS", "load_lpips", "merge_lpips_weights",
    "NLayerDiscriminator", "hinge_d_loss", "vanilla_d_loss", "hinge_g_loss", "adopt_weight",
    "adaptive_weight",
]


def reconstruction_loss(x: torch.Tensor, y: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    if kind == "l1":
        return F.l1_loss(x, y)
    if kind == "l2":
        return F.mse_loss(x, y)
    raise ConfigError(f"reconstruction loss must be 'l1' or 'l2', got {kind!r}")


# --- LPIPS ------------------------------------------------------------------------------------

# torchvision's vgg16 "D" configuration; integers are conv widths, "M" is a 2x2 max-pool.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Indices into `features` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: the LPIPS taps.
LPIPS_TAPS = (3, 8, 15, 22, 29)
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
# taming/lpips slice k covers features[SLICE_START[k]:...]; indices keep their torchvision numbering.
_SLICE_STARTS = (0, 4, 9, 16, 23)


class VGG16Features(nn.Module):
    """torchvision's `vgg16().features[:30]` with the same parameter names (`features.<i>.*`)."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=False)]
                c = v
        self.features = nn.Sequential(*layers)

    def forward(self, x) -> list[torch.Tensor]:
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in LPIPS_TAPS:
                taps.append(x)
        return taps


class _NetLin(nn.Module):
    """lpips' NetLinLayer: (dropout,) 1x1 conv to one channel, no bias. Index 1 keeps its name."""

    def __init__(self, chn: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(chn, 1, 1, bias=False))


class LPIPS(nn.Module):
    """LPIPS-VGG16 distance (B,) between images in [-1, 1]; always frozen and in eval mode."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.net = VGG16Features()
        for i, c in enumerate(LPIPS_CHANNELS):
            setattr(self, f"lin{i}", _NetLin(c))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        # The dropout in the lin layers is never meant to be active: LPIPS is a fixed metric.
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:  # grayscale: VGG sees the same image in all three channels
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        fx = self.net((x - self.shift) / self.scale)
        fy = self.net((y - self.shift) / self.scale)
        total = 0.0
        for i, (a, b) in enumerate(zip(fx, fy)):
            a = a / (a.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            total = total + getattr(self, f"lin{i}").model((a - b) ** 2).mean(dim=(2, 3))
        return total.view(-1)


_HOW_TO = (
    "LPIPS needs local weights: one file with torchvision's vgg16 `features.*` tensors and the lpips "
    "package's `lin0..4.model.1.weight` (v0.1 vgg.pth). Make it once with\n"
    "  python -m ctfgen.tokenizer.losses merge vgg16-397923af.pth lpips_v0.1_vgg.pth lpips_vgg16.safetensors\n"
    "or set perceptual_weight: 0 to train without the perceptual loss."
)


def _read_tensors(path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"LPIPS weights file {path} does not exist.\n{_HOW_TO}")
    try:
        if path.suffix == ".safetensors":
            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - safetensors and torch.load raise many types for a bad file
        raise CorruptFileError(f"LPIPS weights file {path} cannot be read as tensors ({type(e).__name__}): it is "
                               f"truncated, corrupt or a pickled object rather than a state dict.\n{_HOW_TO}") from None
    for key in ("state_dict", "model"):  # common wrappers of a .pth file
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ConfigError(f"{path} does not hold a state dict of tensors.\n{_HOW_TO}")
    return dict(sd)


def _canonical_lpips_names(sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Map the accepted layouts to LPIPS-module names (`net.features.<i>.*`, `lin<i>.model.1.weight`)."""
    out, unknown = {}, []
    for k, v in sd.items():
        if m := re.fullmatch(r"(?:module\.)?(?:net\.)?features\.(\d+)\.(weight|bias)", k):
            out[f"net.features.{m.group(1)}.{m.group(2)}"] = v
        elif m := re.fullmatch(r"(?:module\.)?net\.slice[1-5]\.(\d+)\.(weight|bias)", k):
            out[f"net.features.{m.group(1)}.{m.group(2)}"] = v
        elif m := re.fullmatch(r"(?:module\.)?lins?\.?(\d)\.model\.1\.weight", k):
            out[f"lin{m.group(1)}.model.1.weight"] = v
        elif re.match(r"(?:module\.)?(classifier\.|scaling_layer\.)", k):
            continue  # vgg16's classifier head and lpips' constant scaling layer are not weights we use
        else:
            unknown.append(k)
    if unknown:
        raise ConfigError(f"unexpected tensors in LPIPS weights {source}: {', '.join(unknown[:10])}.\n{_HOW_TO}")
    return out


def load_lpips(path, vgg_path=None, device="cpu") -> LPIPS:
    """LPIPS-VGG16 from one merged file, or from the lpips lin weights `path` plus torchvision's
    vgg16 weights `vgg_path`. Strict: every tensor must be present with the right shape."""
    sd = _canonical_lpips_names(_read_tensors(path), str(path))
    source = str(path)
    if vgg_path is not None:
        sd.update(_canonical_lpips_names(_read_tensors(vgg_path), str(vgg_path)))
        source = f"{path} + {vgg_path}"
    model = LPIPS()
    try:
        load_state_dict_strict(model, {k: v.float() for k, v in sd.items()}, source=source)
    except ValueError as e:
        raise ConfigError(f"{e}\n{_HOW_TO}") from e
    return model.to(device)


def merge_lpips_weights(vgg_path, lin_path, out_path) -> Path:
    """Write the one-file LPIPS weights (.safetensors) from torchvision's vgg16 and lpips' vgg.pth."""
    model = load_lpips(lin_path, vgg_path=vgg_path)
    sd = {}
    for k, v in model.state_dict().items():
        sd[k[len("net."):] if k.startswith("net.") else k] = v.contiguous()
    return atomic_save(lambda tmp: save_file(sd, str(tmp), metadata={"format": "ctfgen.lpips_vgg16"}), out_path)


# --- PatchGAN discriminator -------------------------------------------------------------------

class NLayerDiscriminator(nn.Module):
    """taming/LlamaGen PatchGAN: 4x4 convs, stride 2 for the first `n_layers`, BatchNorm, LeakyReLU(0.2).

    Output is a map of real/fake logits, one per overlapping patch: 30x30 at 256x256 with n_layers=3.
    At 28x28, n_layers=3 leaves a single 1x1 patch (the whole image); n_layers=2 gives 5x5 patches.
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(input_nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2 ** n, 8)
            seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * mult),
                    nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2 ** n_layers, 8)
        seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, 1, 1, bias=False), nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True), nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
        self.main = nn.Sequential(*seq)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def adopt_weight(weight: float, step: int, start: int) -> float:
    """The adversarial weight is 0 before `start` steps (LlamaGen's warm-up), `weight` after."""
    return weight if step >= start else 0.0


def adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """VQGAN's balance: |grad nll| / |grad g| at the decoder's last layer, clamped to [0, 1e4]."""
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return torch.clamp(nll_grads.norm() / (g_grads.norm() + 1e-4), 0.0, 1e4).detach()


def _main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[0] != "merge":
        print("usage: python -m ctfgen.tokenizer.losses merge VGG16.pth LPIPS_VGG.pth OUT.safetensors", file=sys.stderr)
        return 2
    out = merge_lpips_weights(argv[1], argv[2], argv[3])
    print(f"wrote {out} ({os.path.getsize(out) / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
