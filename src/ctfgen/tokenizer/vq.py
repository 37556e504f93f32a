"""LlamaGen's VQ image tokenizer (`VQModel`), with LlamaGen's exact tensor names and numerics.

    >>> vq = VQModel(VQConfig())                           # VQ-16: 256x256 RGB -> 16x16 codes
    >>> codes = vq.encode(images)                          # (B, 3, 256, 256) in [-1, 1] -> (B, 16, 16) int64
    >>> images = vq.decode(codes)                          # (B, 16, 16) -> (B, 3, 256, 256)
    >>> vq = VQModel(VQConfig(in_channels=1, base_ch=32, encoder_ch_mult=(1, 2, 2),
    ...                       decoder_ch_mult=(1, 2, 2), z_channels=32, codebook_size=4096))
    >>> vq.grid_size(28)                                   # Fashion-MNIST: 28x28 -> 7x7 codes
    7

The architecture follows LlamaGen's `tokenizer/tokenizer_image/vq_model.py`: convolutional encoder
and decoder of ResnetBlocks (GroupNorm(32, eps 1e-6) and swish), self-attention on the lowest
resolution level and in the middle, `quant_conv` / `post_quant_conv`, and a codebook of
l2-normalised codewords with nearest-neighbour lookup and straight-through gradients. The state dict
has exactly the names and shapes of LlamaGen's checkpoints. `quantize.codebook_used` is the window of
recently used code indices behind the codebook-usage statistic: ours holds int64 indices (-1 = empty)
and is saved, so a trained tokenizer still reports its final usage after `from_pretrained`;
LlamaGen's float copy is ignored when loading its checkpoints, and `llamagen_state_dict()` converts
ours back for LlamaGen's own code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ctfgen.utils.errors import ConfigError, WrongTypeError
from ctfgen.utils.fingerprint import codebook_fingerprint
from ctfgen.utils.hub import HubMixin
from ctfgen.utils.options import integer_tokens

__all__ = ["VQConfig", "VQModel", "VectorQuantizer", "Encoder", "Decoder", "compute_entropy_loss"]

LLAMAGEN_USAGE_WINDOW = 65536  # length of LlamaGen's `quantize.codebook_used` buffer


@dataclass
class VQConfig:
    """Shape of a VQModel. Defaults are LlamaGen's VQ-16 (`vq_ds16_c2i.pt`).

    `norm_groups` is the GroupNorm group count (LlamaGen: 32); every channel width
    (`base_ch * mult`) must be divisible by it, so small CPU tokenizers either use `base_ch` a
    multiple of 32 or lower `norm_groups`. `usage_window` is how many recent code indices the
    codebook-usage statistic looks at (LlamaGen: 65536).
    """

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    encoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    decoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    z_channels: int = 256
    base_ch: int = 128
    num_res_blocks: int = 2
    in_channels: int = 3
    dropout_p: float = 0.0
    norm_groups: int = 32
    usage_window: int = LLAMAGEN_USAGE_WINDOW

    def __post_init__(self):
        # config.json stores tuples as lists; normalise so configs compare equal after a round trip.
        self.encoder_ch_mult = tuple(int(m) for m in self.encoder_ch_mult)
        self.decoder_ch_mult = tuple(int(m) for m in self.decoder_ch_mult)
        if len(self.encoder_ch_mult) != len(self.decoder_ch_mult):
            raise ConfigError(
                f"encoder_ch_mult {self.encoder_ch_mult} and decoder_ch_mult {self.decoder_ch_mult} must have "
                "the same length: it sets the number of down- and up-sampling steps, which must agree"
            )
        if not self.encoder_ch_mult or min(self.encoder_ch_mult + self.decoder_ch_mult) < 1:
            raise ConfigError(f"channel multipliers must be positive integers, got {self.encoder_ch_mult} / {self.decoder_ch_mult}")
        for name in ("codebook_size", "codebook_embed_dim", "z_channels", "base_ch", "num_res_blocks",
                     "in_channels", "norm_groups", "usage_window"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"VQConfig.{name} must be >= 1, got {getattr(self, name)}")
        widths = sorted({self.base_ch * m for m in self.encoder_ch_mult + self.decoder_ch_mult})
        bad = [w for w in widths if w % self.norm_groups]
        if bad:
            raise ConfigError(
                f"GroupNorm with norm_groups={self.norm_groups} needs every channel width divisible by it, but "
                f"base_ch={self.base_ch} with multipliers {self.encoder_ch_mult}/{self.decoder_ch_mult} gives {bad}. "
                "Use a base_ch that is a multiple of norm_groups (LlamaGen: 32), or lower norm_groups."
            )

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.encoder_ch_mult) - 1)

    def to_dict(self) -> dict:
        return asdict(self)


def swish(x: torch.Tensor) -> torch.Tensor:
    # x * sigmoid(x), fused: LlamaGen's formula to within float rounding, and ~3x cheaper on CPU.
    return F.silu(x)


def Normalize(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = Normalize(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = Normalize(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, softmax(q^T k / sqrt(c)) v."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = Normalize(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, hh, ww = x.shape
        h = self.norm(x)
        # (B, 1, HW, C): one head of width c, so SDPA's default scale is LlamaGen's c ** -0.5.
        q, k, v = (t.reshape(b, 1, c, hh * ww).transpose(-1, -2) for t in (self.q(h), self.k(h), self.v(h)))
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(-1, -2).reshape(b, c, hh, ww)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x):
        # Asymmetric padding (right and bottom only), as LlamaGen/taming: H -> floor(H / 2).
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x):
        # LlamaGen interpolates in float32 (nearest in bf16 is not supported everywhere).
        x = F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(x.dtype)
        return self.conv(x)


class Encoder(nn.Module):
    def __init__(self, in_channels=3, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, dropout=0.0,
                 z_channels=256, groups=32):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        in_ch_mult = (1,) + tuple(ch_mult)
        self.conv_blocks = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block = nn.Module()
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.res.append(ResnetBlock(block_in, block_out, dropout, groups))
                block_in = block_out
                if i_level == self.num_resolutions - 1:
                    block.attn.append(AttnBlock(block_in, groups))
            if i_level != self.num_resolutions - 1:
                block.downsample = Downsample(block_in)
            self.conv_blocks.append(block)
        self.mid = nn.ModuleList([
            ResnetBlock(block_in, block_in, dropout, groups),
            AttnBlock(block_in, groups),
            ResnetBlock(block_in, block_in, dropout, groups),
        ])
        self.norm_out = Normalize(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for i_level, block in enumerate(self.conv_blocks):
            for i_block in range(self.num_res_blocks):
                h = block.res[i_block](h)
                if len(block.attn) > 0:
                    h = block.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = block.downsample(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, z_channels=256, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, dropout=0.0,
                 out_channels=3, groups=32):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = nn.ModuleList([
            ResnetBlock(block_in, block_in, dropout, groups),
            AttnBlock(block_in, groups),
            ResnetBlock(block_in, block_in, dropout, groups),
        ])
        self.conv_blocks = nn.ModuleList()
        for i_level in range(self.num_resolutions):  # lowest resolution first
            block = nn.Module()
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[self.num_resolutions - i_level - 1]
            for _ in range(num_res_blocks + 1):
                block.res.append(ResnetBlock(block_in, block_out, dropout, groups))
                block_in = block_out
                if i_level == 0:
                    block.attn.append(AttnBlock(block_in, groups))
            if i_level != self.num_resolutions - 1:
                block.upsample = Upsample(block_in)
            self.conv_blocks.append(block)
        self.norm_out = Normalize(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, 1, 1)

    @property
    def last_layer(self) -> torch.Tensor:
        return self.conv_out.weight

    def forward(self, z):
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for i_level, block in enumerate(self.conv_blocks):
            for i_block in range(self.num_res_blocks + 1):
                h = block.res[i_block](h)
                if len(block.attn) > 0:
                    h = block.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = block.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


def compute_entropy_loss(affinity: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """LlamaGen's codebook entropy loss: per-sample entropy minus entropy of the batch average.

    Minimising it makes each vector confident about one code while spreading the batch over many.
    """
    flat = affinity.reshape(-1, affinity.shape[-1]) / temperature
    probs = F.softmax(flat, dim=-1)
    log_probs = F.log_softmax(flat + 1e-5, dim=-1)
    avg_probs = probs.mean(dim=0)
    avg_entropy = -torch.sum(avg_probs * torch.log(avg_probs + 1e-5))
    sample_entropy = -torch.mean(torch.sum(probs * log_probs, dim=-1))
    return sample_entropy - avg_entropy


class VectorQuantizer(nn.Module):
    def __init__(self, n_e: int, e_dim: int, beta: float, entropy_loss_ratio: float, l2_norm: bool,
                 usage_window: int = LLAMAGEN_USAGE_WINDOW):
        super().__init__()
        self.n_e, self.e_dim, self.beta = n_e, e_dim, beta
        self.entropy_loss_ratio, self.l2_norm = entropy_loss_ratio, l2_norm
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)
        if l2_norm:
            self.embedding.weight.data = F.normalize(self.embedding.weight.data, p=2, dim=-1)
        # Sliding window of the most recent code indices seen in training (-1 = empty slot). LlamaGen
        # keeps the same window (as floats, starting at 0); it carries no weights.
        self.register_buffer("codebook_used", torch.full((usage_window,), -1, dtype=torch.int64))

    def codebook(self) -> torch.Tensor:
        """(V, D) codewords as the quantizer uses them (l2-normalised when `l2_norm`)."""
        w = self.embedding.weight
        return F.normalize(w, p=2, dim=-1) if self.l2_norm else w

    def usage(self) -> float:
        """Fraction of the codebook used by the indices in the recent window."""
        seen = self.codebook_used[self.codebook_used >= 0]
        return float(torch.unique(seen).numel()) / self.n_e

    @torch.no_grad()
    def _track(self, indices: torch.Tensor) -> None:
        window = self.codebook_used.numel()
        idx = indices.reshape(-1)[-window:]
        n = idx.numel()
        if n == 0:  # nothing seen; the slices below would read [:-0] as empty and [0:] as the whole window
            return
        if n < window:
            self.codebook_used[:-n] = self.codebook_used[n:].clone()
        self.codebook_used[-n:] = idx

    def distances(self, z_flat: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """(N, V) squared distances, computed LlamaGen's way: |z|^2 + |e|^2 - 2 z.e."""
        return (z_flat.pow(2).sum(dim=1, keepdim=True) + embedding.pow(2).sum(dim=1)
                - 2.0 * z_flat @ embedding.t())

    def forward(self, z: torch.Tensor):
        """z (B, D, h, w) -> (z_q (B, D, h, w) straight-through, indices (B, h, w), losses dict)."""
        # Nearest-neighbour search in float32 even under autocast: bf16 distances pick wrong codes.
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float().permute(0, 2, 3, 1).contiguous()
            if self.l2_norm:
                z = F.normalize(z, p=2, dim=-1)
            z_flat = z.view(-1, self.e_dim)
            embedding = self.codebook().float()
            d = self.distances(z_flat, embedding)
            indices = torch.argmin(d, dim=1)
            z_q = embedding[indices].view(z.shape)
            losses = {}
            if self.training:
                losses["codebook"] = torch.mean((z_q - z.detach()) ** 2)
                losses["commitment"] = self.beta * torch.mean((z_q.detach() - z) ** 2)
                losses["entropy"] = (self.entropy_loss_ratio * compute_entropy_loss(-d) if self.entropy_loss_ratio > 0
                                     else z.new_zeros(()))
                self._track(indices)
                losses["usage"] = self.usage()
            z_q = z + (z_q - z).detach()
        b, h, w, _ = z.shape
        return z_q.permute(0, 3, 1, 2).contiguous(), indices.view(b, h, w), losses

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) int codes -> (B, D, h, w) codewords."""
        codes = integer_tokens(codes, "codes").long()  # int64 before min/max, which torch lacks for uint16..uint64
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.n_e):
            raise ConfigError(f"codes must lie in [0, {self.n_e}), got values in [{int(codes.min())}, {int(codes.max())}]")
        return F.embedding(codes, self.codebook()).permute(0, 3, 1, 2).contiguous()


class VQModel(nn.Module, HubMixin):
    """LlamaGen's VQ tokenizer. `forward(images) -> (reconstruction, losses)`, where `losses` has
    `codebook`, `commitment` and `entropy` (scalar tensors, already weighted by beta / the entropy
    ratio as LlamaGen weights them) and `usage` (float) in training mode, and is empty in eval mode.
    """

    def __init__(self, config: VQConfig):
        super().__init__()
        if isinstance(config, dict):
            config = VQConfig(**config)
        self.config = config
        c = config
        self.encoder = Encoder(c.in_channels, c.base_ch, c.encoder_ch_mult, c.num_res_blocks, c.dropout_p,
                               c.z_channels, c.norm_groups)
        self.decoder = Decoder(c.z_channels, c.base_ch, c.decoder_ch_mult, c.num_res_blocks, c.dropout_p,
                               c.in_channels, c.norm_groups)
        self.quantize = VectorQuantizer(c.codebook_size, c.codebook_embed_dim, c.commit_loss_beta,
                                        c.entropy_loss_ratio, c.codebook_l2_norm, c.usage_window)
        self.quant_conv = nn.Conv2d(c.z_channels, c.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.codebook_embed_dim, c.z_channels, 1)

    # --- shapes -------------------------------------------------------------------------------

    @property
    def downsample(self) -> int:
        return self.config.downsample

    def grid_size(self, image_size: int) -> int:
        """Side of the code grid for square images of side `image_size`."""
        if image_size % self.downsample:
            raise ConfigError(
                f"image size {image_size} is not divisible by the tokenizer's downsampling factor {self.downsample}: "
                "the decoder could not reproduce the input size. Resize or crop the images first."
            )
        return image_size // self.downsample

    @property
    def fingerprint(self) -> str:
        return codebook_fingerprint(self.quantize.embedding.weight)

    def codebook(self) -> torch.Tensor:
        """(V, D) codewords as used for lookup (l2-normalised when codebook_l2_norm)."""
        return self.quantize.codebook()

    def codebook_usage(self) -> float:
        return self.quantize.usage()

    # --- encode / decode ----------------------------------------------------------------------

    def _check_images(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != self.config.in_channels:
            raise ConfigError(
                f"expected images of shape (B, {self.config.in_channels}, H, W), got {tuple(images.shape)}"
            )
        # the encoder's convolutions refuse other dtypes with torch's bare RuntimeError about bias types
        if not images.is_floating_point():
            raise WrongTypeError(f"images must be floats in [-1, 1], got a {images.dtype} tensor; "
                                 "convert 0..255 pixels with images.float() / 127.5 - 1")
        # and another float dtype than the weights' alike; autocast casts the inputs itself, except float64
        weight = self.encoder.conv_in.weight
        autocast = torch.is_autocast_enabled(images.device.type) and images.dtype != torch.float64
        if images.dtype != weight.dtype and not autocast:
            raise WrongTypeError(f"images are {images.dtype} but the tokenizer's weights are {weight.dtype}; "
                                 f"pass images.to({weight.dtype}) (or cast the tokenizer to {images.dtype})")
        # the encoder's padded strided convolutions would drop the last rows/columns and give a smaller grid
        for side in images.shape[-2:]:
            self.grid_size(side)

    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D, h, w) pre-quantisation latents (after quant_conv)."""
        self._check_images(images)
        return self.quant_conv(self.encoder(images))

    def quantize_latent(self, latent: torch.Tensor):
        """(B, D, h, w) latents -> (z_q straight-through, codes (B, h, w), losses)."""
        return self.quantize(latent)

    def decode_latent(self, z_q: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) quantised latents -> (B, C, H, W) images."""
        return self.decoder(self.post_quant_conv(z_q))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) floats in [-1, 1] -> (B, h, w) int64 codes."""
        images = images.to(self.quant_conv.weight.device)
        return self.quantize(self.encode_latent(images))[1]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) int codes -> (B, C, H, W) images (roughly in [-1, 1]; not clamped)."""
        if codes.dim() != 3:
            raise ConfigError(f"expected codes of shape (B, h, w), got {tuple(codes.shape)}; reshape flat token "
                             "sequences (B, h*w) to the grid first")
        z_q = self.quantize.lookup(codes.to(self.quant_conv.weight.device))
        return self.decode_latent(z_q.to(self.post_quant_conv.weight.dtype))

    def forward(self, images: torch.Tensor):
        # the losses are means over the batch: of no image they would be NaN, read as a diverged run
        if self.training and images.numel() == 0:
            raise ConfigError(f"an empty batch (images of shape {tuple(images.shape)}) has no training losses; "
                              "pass at least one image, or call .eval() first to reconstruct nothing")
        z_q, _, losses = self.quantize(self.encode_latent(images))
        return self.decode_latent(z_q.to(self.post_quant_conv.weight.dtype)), losses

    # --- interop ------------------------------------------------------------------------------

    def llamagen_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict that LlamaGen's own `VQModel.load_state_dict` accepts (its float usage window)."""
        sd = {k: v.detach().clone() for k, v in self.state_dict().items()}
        used = self.quantize.codebook_used[-LLAMAGEN_USAGE_WINDOW:].clamp(min=0).float()
        sd["quantize.codebook_used"] = F.pad(used, (LLAMAGEN_USAGE_WINDOW - used.numel(), 0)).cpu()
        return sd
