"""LlamaGen's class-conditional GPT and CTF's bidirectional auxiliary model.

Read top to bottom: configs and presets, the building blocks (RMSNorm, SwiGLU feed-forward,
2-D rotary embedding, attention with an optional KV cache, the pre-norm block), then `GPT`
(LlamaGen c2i, parameter names identical to its checkpoints) and `AuxModel` (CTF stage 2).

Numerics follow LlamaGen exactly (tests/data/llamagen/README.md, beside the tensor manifests the
tests check our names against): RMSNorm in float32,
RoPE computed in float32 on adjacent pairs with row angles in the first half of the pairs and
column angles in the second, and the class-token position's cos/sin both 0, so its query and key
are multiplied by zero. This module deliberately has no `from __future__ import annotations`:
huggingface_hub's mixin reads the `config` annotation of `__init__` as a real class to turn
config.json back into a `GPTConfig` / `AuxConfig`.
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ctfgen.utils.errors import ConfigError, MismatchError, RunError
from ctfgen.utils.hub import HubMixin

# --------------------------------------------------------------------------------------------
# Configs and presets

GPT_PRESETS = {
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),
    # small presets that train on a CPU
    "GPT-tiny": dict(n_layer=2, n_head=2, dim=64),
    "GPT-mini": dict(n_layer=4, n_head=4, dim=128),
    "GPT-S": dict(n_layer=6, n_head=6, dim=384),
}

AUX_PRESETS = {"Aux" + name[3:]: shape for name, shape in GPT_PRESETS.items()}


def _preset(table, kind, name):
    if name not in table:
        raise ConfigError(f"unknown {kind} preset {name!r}; choose one of {', '.join(table)}")
    return dict(table[name])


class _TransformerConfig:
    """What GPTConfig and AuxConfig share beyond their fields: the shape checks, `grid_size` and
    `from_preset`. The fields themselves stay declared in each dataclass, because a dataclass base's
    fields would come first in `__init__` and AuxConfig's positional order has `num_coarse` between
    `vocab_size` and `image_tokens`."""

    _presets: dict = {}
    _preset_kind = ""

    def __post_init__(self):
        if self.dim % self.n_head:
            raise ConfigError(f"dim {self.dim} is not divisible by n_head {self.n_head}")
        head_dim = self.dim // self.n_head
        if head_dim % 4:
            # 2-D RoPE splits the head's d/2 pairs in two halves (rows, columns).
            raise ConfigError(f"head_dim {head_dim} (dim/n_head) must be a multiple of 4 for 2-D RoPE")
        grid = math.isqrt(self.image_tokens)
        if grid * grid != self.image_tokens:
            raise ConfigError(f"image_tokens={self.image_tokens} is not a square grid (e.g. 256 = 16x16, 49 = 7x7)")

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.image_tokens)

    @classmethod
    def from_preset(cls, name: str, **overrides):
        """`GPTConfig.from_preset("GPT-B", vocab_size=16384, image_tokens=256)`,
        `AuxConfig.from_preset("Aux-B", vocab_size=16384, num_coarse=512, image_tokens=256)`."""
        return cls(**{**_preset(cls._presets, cls._preset_kind, name), **overrides})


@dataclass
class GPTConfig(_TransformerConfig):
    """LlamaGen c2i GPT. `vocab_size` is the token vocabulary (fine codes, or coarse labels in CTF
    stage 1); `num_classes` excludes the null label, which is row `num_classes` of the table."""

    vocab_size: int
    image_tokens: int
    num_classes: int = 1000
    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    token_dropout: float = 0.1
    resid_dropout: float = 0.1
    ffn_dropout: float = 0.1
    class_dropout: float = 0.1
    codebook_fingerprint: Optional[str] = None
    coarse_map_fingerprint: Optional[str] = None

    _presets = GPT_PRESETS
    _preset_kind = "GPT"


@dataclass
class AuxConfig(_TransformerConfig):
    """CTF stage-2 model: coarse labels in, fine-token logits out, all positions in one pass.

    `class_prefix`: prepend the class token (null label = `num_classes`, for guidance).
    `restrict_to_cluster`: logits outside each position's coarse cluster are -inf, so
    p(fine | coarse) is a proper distribution and the likelihood of CTF is exact.
    """

    vocab_size: int
    num_coarse: int
    image_tokens: int
    num_classes: int = 1000
    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    class_prefix: bool = True
    restrict_to_cluster: bool = True
    token_dropout: float = 0.1
    resid_dropout: float = 0.1
    ffn_dropout: float = 0.1
    class_dropout: float = 0.1
    codebook_fingerprint: Optional[str] = None
    coarse_map_fingerprint: Optional[str] = None

    _presets = AUX_PRESETS
    _preset_kind = "Aux"

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.num_coarse <= self.vocab_size:
            raise ConfigError(f"num_coarse={self.num_coarse} must be in 1..vocab_size ({self.vocab_size})")


# --------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # float32 statistics whatever the activation dtype, as LlamaGen.
        xf = x.float()
        out = xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


def ffn_hidden_dim(dim: int, multiple_of: int = 256) -> int:
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, multiple_of: int = 256, dropout: float = 0.0):
        super().__init__()
        hidden = ffn_hidden_dim(dim, multiple_of)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.ffn_dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


def precompute_freqs_cis_2d(grid_size: int, head_dim: int, base: float = 10000.0, cls_token_num: int = 1):
    """(cls_token_num + grid^2, head_dim/2, 2) table of (cos, sin), float32.

    Pair i of grid position p = r*G + c has angle r*f_i for i < h/2 and c*f_{i-h/2} after,
    with h = head_dim/2 and f_j = base^(-2j/h). The class rows are all zero: LlamaGen's quirk,
    which multiplies the class token's q and k by zero instead of leaving them unrotated.
    """
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    t = torch.arange(grid_size, device=freqs.device, dtype=torch.float32)
    freqs = torch.outer(t, freqs)  # (G, h/2)
    grid = torch.cat(
        [freqs[:, None, :].expand(-1, grid_size, -1), freqs[None, :, :].expand(grid_size, -1, -1)], dim=-1
    )  # (G, G, h): rows first, then columns
    cache = torch.stack([torch.cos(grid), torch.sin(grid)], dim=-1).flatten(0, 1)
    return torch.cat([torch.zeros(cls_token_num, half, 2), cache])


def apply_rotary_emb(x, freqs_cis):
    """x (B, T, H, d); freqs_cis (T, d/2, 2). Rotates adjacent pairs in float32, as LlamaGen."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    fc = freqs_cis.view(1, xs.size(1), 1, xs.size(3), 2)
    out = torch.stack(
        [
            xs[..., 0] * fc[..., 0] - xs[..., 1] * fc[..., 1],
            xs[..., 1] * fc[..., 0] + xs[..., 0] * fc[..., 1],
        ],
        dim=-1,
    )
    return out.flatten(3).type_as(x)


class KVCache(nn.Module):
    """Preallocated keys/values (max_batch, n_head, max_seq, head_dim); written in place.

    Buffers are non-persistent so they never enter a state dict or checkpoint."""

    def __init__(self, max_batch: int, max_seq: int, n_head: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (max_batch, n_head, max_seq, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):
        """Write k, v (b, n_head, T, head_dim) at `input_pos` and return the keys and values to attend over.

        `input_pos` an int: the T positions start there; returns only the filled part, positions
        0 .. input_pos + T - 1 (a slice, no copy). A (T,) tensor: returns the whole fixed-shape cache,
        for a compiled step whose shapes must not change (the caller masks the unwritten slots).
        A batch smaller than max_batch uses the leading rows: generate drops the unconditional half
        this way once guidance stops, without touching the conditional half's cache."""
        b = k.shape[0]
        if isinstance(input_pos, int):
            end = input_pos + k.shape[2]
            self.k_cache[:b, :, input_pos:end] = k  # a strided copy; casts to the cache's dtype
            self.v_cache[:b, :, input_pos:end] = v
            return self.k_cache[:b, :, :end], self.v_cache[:b, :, :end]
        self.k_cache[:b, :, input_pos] = k.to(self.k_cache.dtype)
        self.v_cache[:b, :, input_pos] = v.to(self.v_cache.dtype)
        return self.k_cache[:b], self.v_cache[:b]


def cached_attention(q, k, v, mask=None):
    """Softmax attention of q (B, H, T, d) over cached k, v (B, H, S, d) -> (B, H, T, d) in v's dtype.

    `mask` (.., T, S) bool, True = may attend; None when every cached slot is visible (one new
    token over the filled part of the cache). On the CPU this is the plain math, not SDPA:
    PyTorch's CPU flash kernel is slower for one query, and much slower with a mask (measured:
    16 ms vs 1 ms per layer for GPT-B, batch 8)."""
    if q.dtype != k.dtype:
        q = q.to(k.dtype)
    if q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int, resid_dropout: float = 0.0):
        super().__init__()
        self.n_head = n_head
        self.head_dim = dim // n_head
        self.dim = dim
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.resid_dropout = nn.Dropout(resid_dropout)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x, freqs_cis, causal: bool = True, input_pos=None, mask=None):
        B, T, _ = x.shape
        qkv = self.wqkv(x)
        # q and k rotated in one call: (B, T, 2 * n_head, head_dim), a view of qkv's first two thirds
        qk = apply_rotary_emb(qkv[..., : 2 * self.dim].view(B, T, 2 * self.n_head, self.head_dim), freqs_cis)
        q, k = qk.transpose(1, 2).split(self.n_head, dim=1)
        v = qkv[..., 2 * self.dim :].view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
            y = cached_attention(q, k, v, mask).to(x.dtype)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        y = y.transpose(1, 2).reshape(B, T, self.dim)
        return self.resid_dropout(self.wo(y))


class TransformerBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attention = Attention(cfg.dim, cfg.n_head, cfg.resid_dropout)
        self.feed_forward = FeedForward(cfg.dim, cfg.multiple_of, cfg.ffn_dropout)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, freqs_cis, causal: bool = True, input_pos=None, mask=None):
        h = x + self.attention(self.attention_norm(x), freqs_cis, causal, input_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row, the null label, and class dropout in training."""

    def __init__(self, num_classes: int, dim: int, dropout: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout = dropout
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels):
        if self.training and self.dropout > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


def _labels_tensor(labels, batch: int, num_classes: int, device) -> torch.Tensor:
    """None -> null labels; ints/lists -> int64 tensor on `device`."""
    if labels is None:
        return torch.full((batch,), num_classes, dtype=torch.long, device=device)
    labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
    if labels.shape[0] != batch:
        raise ConfigError(f"got {labels.shape[0]} labels for a batch of {batch}")
    return labels


class _Backbone(nn.Module):
    """What GPT and AuxModel share: weight init and the RoPE table kept in float32."""

    def init_weights(self):
        """LlamaGen's init: N(0, 0.02) linears and embeddings, RMSNorm 1, output head zero."""
        if self.output.weight.is_meta:
            return  # shape-only model (checkpoint loading): first-use of meta init costs seconds
        self.apply(self._init_weights)
        nn.init.zeros_(self.output.weight)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def _make_freqs(self, device=None):
        cfg = self.config
        table = precompute_freqs_cis_2d(cfg.grid_size, cfg.dim // cfg.n_head, cfg.rope_base, cls_token_num=1)
        return table.to(device) if device is not None else table

    def _apply(self, fn, recurse=True):
        # .half()/.to(bf16) would also cast the RoPE table; LlamaGen keeps it in float32 (a plain
        # attribute there), so rebuild it in float32 on whatever device it moved to.
        super()._apply(fn, recurse)
        if self.freqs_cis.dtype != torch.float32:
            self.freqs_cis = self._make_freqs(self.freqs_cis.device)
        return self


# --------------------------------------------------------------------------------------------
# GPT


class GPT(_Backbone, HubMixin):
    """LlamaGen's class-conditional GPT (c2i).

    Sequence `[class, tok_0 .. tok_{L-1}]`; `forward` returns (B, L+1, V) float32 logits and
    position i predicts tok_i. State-dict names and shapes equal LlamaGen's checkpoints.
    The RoPE table `freqs_cis` and the KV cache are non-persistent buffers.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        if isinstance(config, dict):
            config = GPTConfig(**config)
        self.config = config
        self.cls_embedding = LabelEmbedder(config.num_classes, config.dim, config.class_dropout)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.register_buffer("freqs_cis", self._make_freqs(), persistent=False)
        self.max_batch = 0
        self.init_weights()

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def image_tokens(self) -> int:
        return self.config.image_tokens

    def forward(self, tokens, labels=None):
        """tokens (B, L) int64, L <= image_tokens; labels (B,) (None = null label).
        Returns (B, L+1, vocab) float32; class dropout applies in training mode."""
        B, L = tokens.shape
        if L > self.config.image_tokens:
            raise ConfigError(f"got {L} tokens, the model's grid holds {self.config.image_tokens}")
        labels = _labels_tensor(labels, B, self.config.num_classes, tokens.device)
        cls = self.cls_embedding(labels)[:, None]
        h = self.tok_dropout(torch.cat([cls, self.tok_embeddings(tokens)], dim=1))
        freqs = self.freqs_cis[: L + 1]
        for layer in self.layers:
            h = layer(h, freqs, causal=True)
        return self.output(self.norm(h)).float()

    # ---- KV-cached generation (gpt-fast style) ----

    def setup_caches(self, max_batch: int, dtype=None, device=None) -> None:
        """Preallocate every layer's KV cache for `max_batch` sequences of image_tokens + 1.

        `dtype` None = `kv_cache_dtype` of the weights' dtype and device: float32 on the CPU."""
        device = device or self.tok_embeddings.weight.device
        dtype = dtype or kv_cache_dtype(self.tok_embeddings.weight.dtype, device)
        cached = self.layers[0].attention.kv_cache if len(self.layers) else None
        # A cache made under torch.inference_mode (kept by a compiled generate) cannot be written outside it.
        usable = cached is not None and (torch.is_inference_mode_enabled() or not cached.k_cache.is_inference())
        if usable and self.max_batch >= max_batch and cached.k_cache.dtype == dtype \
                and cached.k_cache.device == torch.device(device):
            return
        max_seq = self.config.image_tokens + 1
        head_dim = self.config.dim // self.config.n_head
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(max_batch, max_seq, self.config.n_head, head_dim, dtype, device)
        mask = torch.tril(torch.ones(max_seq, max_seq, dtype=torch.bool, device=device))
        self.register_buffer("causal_mask", mask, persistent=False)
        self.max_batch = max_batch

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None
        if hasattr(self, "causal_mask"):
            del self.causal_mask
        self.max_batch = 0

    def _cached(self, h, input_pos):
        if self.max_batch < h.shape[0]:
            raise RunError(f"KV cache holds {self.max_batch} sequences, got {h.shape[0]}: call setup_caches(max_batch) first")
        T = h.shape[1]
        if isinstance(input_pos, int):
            # attend over the filled part of the cache only; one new token sees all of it
            freqs = self.freqs_cis[input_pos : input_pos + T]
            mask = None if T == 1 else self.causal_mask[input_pos : input_pos + T, : input_pos + T]
        else:
            # fixed shapes for torch.compile: the whole cache, the causal mask row hides unwritten slots
            freqs = self.freqs_cis[input_pos]
            mask = self.causal_mask[None, None, input_pos]
        for layer in self.layers:
            h = layer(h, freqs, input_pos=input_pos, mask=mask)
        return self.output(self.norm(h)).float()

    def prefill(self, labels):
        """Write the class token at sequence position 0; returns the logits of tok_0, (B, V)."""
        labels = _labels_tensor(labels, len(labels), self.config.num_classes, self.freqs_cis.device)
        return self._cached(self.cls_embedding(labels)[:, None], 0)[:, -1]

    def forward_step(self, tokens, input_pos):
        """tokens (B, T) sitting at sequence positions `input_pos` (tok_k is at k+1).
        Returns (B, T, V) float32 logits; the last row predicts the next token.

        `input_pos` an int, the first of T consecutive positions: attention reads only the filled
        part of the cache (eager decoding). A (T,) int64 tensor: every call has the same shapes,
        the whole cache masked (what a compiled step needs), as LlamaGen and gpt-fast do."""
        if not isinstance(input_pos, torch.Tensor):
            input_pos = int(input_pos)  # numpy and other integers take the int path too
        return self._cached(self.tok_embeddings(tokens), input_pos)


def kv_cache_dtype(weight_dtype: torch.dtype, device) -> torch.dtype:
    """The KV cache's dtype for weights in `weight_dtype`: float32 on the CPU, where attention over
    a bf16 cache is slower than over a float32 one (bf16 batched matmul over the cache's strided
    slices; docs/performance.md) and float32 is also the more exact; the weights' dtype elsewhere."""
    if torch.device(device).type == "cpu":
        return torch.float32
    return weight_dtype


# --------------------------------------------------------------------------------------------
# AuxModel (CTF stage 2)


class ClusterTable(NamedTuple):
    """Each coarse cluster's members as one padded table, for the in-cluster head.

    members (K, M) int64: row c holds cluster c's fine tokens, ascending, then copies of its
    first member up to M (the largest cluster, rounded up to a multiple of 8).
    valid (K, M) bool: False at the padding.
    position (V,) int64: where each fine token sits in its cluster's row, so
    members[fine_to_coarse[v], position[v]] == v.
    """

    members: torch.Tensor
    valid: torch.Tensor
    position: torch.Tensor


def cluster_table(fine_to_coarse: torch.Tensor, num_coarse: int, multiple_of: int = 8) -> ClusterTable:
    """Build the `ClusterTable` of a (V,) fine -> coarse map, on the map's device."""
    f2c = fine_to_coarse.long().reshape(-1)
    V = f2c.numel()
    sizes = torch.bincount(f2c, minlength=num_coarse)
    if sizes.numel() != num_coarse or bool((sizes == 0).any()):
        raise MismatchError(f"fine_to_coarse must give each of the {num_coarse} clusters at least one member")
    # padded to a multiple of 8: grouped_mm wants 16-byte aligned rows, in bf16 too
    M = -(-int(sizes.max()) // multiple_of) * multiple_of
    order = torch.argsort(f2c, stable=True)  # fine tokens by cluster, ascending within each
    start = torch.cumsum(sizes, 0) - sizes
    position = torch.empty_like(f2c)
    position[order] = torch.arange(V, device=f2c.device) - start[f2c[order]]
    slot = torch.arange(M, device=f2c.device)
    valid = slot[None, :] < sizes[:, None]
    members = order[start[:, None] + torch.where(valid, slot[None, :], 0)]
    return ClusterTable(members, valid, position)


# Above this many padded table rows per codeword (K * M / V: one cluster holding a large part of
# the codebook) the gathered table stops paying for itself, and the in-cluster logits are taken
# from the full (B, L, V) logits instead. Aux-mini train step on the CPU (docs/method.md): the
# table is 2.8x faster than the full head at 8, and as fast as the full-logits fallback at 32.
_MAX_TABLE_BLOWUP = 16




class AuxModel(_Backbone, HubMixin):
    """Bidirectional transformer: coarse labels (B, L) -> fine-token logits (B, L, V), one pass.

    Same blocks and 2-D RoPE as `GPT`; attention is non-causal. Choices:
    - `tok_embeddings` has `num_coarse` rows: the input tokens are coarse labels.
    - With `class_prefix`, the class token sits at sequence position 0 with the same LlamaGen
      RoPE quirk as GPT (cos = sin = 0, q and k zeroed), so it contributes through its value only
      and every image token sees it identically; image token k is at position k+1, grid
      position k. Without the prefix, token k is at sequence position k and `labels` is unused.
    - `fine_to_coarse` (V,) int64 is a persistent buffer so `from_pretrained` restores the map
      with the weights; it is -1 until a coarse map is attached.
    - With `restrict_to_cluster`, logits of codes outside the position's coarse cluster are -inf.
      The mask compares `fine_to_coarse[None, None, :] == coarse[..., None]`; no (K, V) table.
    - `in_cluster=True` computes only the logits of each position's cluster members, (B, L, M)
      in `cluster_table()` order: the same probabilities as the masked (B, L, V) softmax at a
      fraction of the head's cost when V >> M. Training, `log_prob` and stage-2 sampling of a
      restricted model use it. The table is derived from `fine_to_coarse` and never saved.
    - Output head zero-initialised as GPT's, so training starts from uniform (in-cluster) logits.
    """

    # int8 schemes keep this layer float (ctfgen.utils.precision.quantize_linears): the in-cluster head
    # gathers rows of output.weight instead of calling the layer.
    float_linears = ("output",)

    def __init__(self, config: AuxConfig, coarse_map=None):
        super().__init__()
        if isinstance(config, dict):
            config = AuxConfig(**config)
        self.config = config
        if config.class_prefix:
            self.cls_embedding = LabelEmbedder(config.num_classes, config.dim, config.class_dropout)
        self.tok_embeddings = nn.Embedding(config.num_coarse, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.register_buffer("freqs_cis", self._make_freqs(), persistent=False)
        self.register_buffer("fine_to_coarse", torch.full((config.vocab_size,), -1, dtype=torch.long))
        self._map_checked = False
        self._table_cache = None  # (device, fine_to_coarse version, copy of the map, ClusterTable)
        self.init_weights()
        if coarse_map is not None:
            self.set_coarse_map(coarse_map)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def set_coarse_map(self, coarse_map) -> None:
        """Attach a coarse map (duck-typed: .fine_to_coarse, .num_coarse, .vocab_size,
        .fingerprint, .codebook_fingerprint). Refused unless it fits the config; a config without
        fingerprints adopts the map's."""
        cfg = self.config
        problems = []
        if coarse_map.vocab_size != cfg.vocab_size:
            problems.append(f"vocab_size {coarse_map.vocab_size} != model's {cfg.vocab_size}")
        if coarse_map.num_coarse != cfg.num_coarse:
            problems.append(f"num_coarse {coarse_map.num_coarse} != model's {cfg.num_coarse}")
        fp, cb = getattr(coarse_map, "fingerprint", None), getattr(coarse_map, "codebook_fingerprint", None)
        if cfg.coarse_map_fingerprint is not None and fp != cfg.coarse_map_fingerprint:
            problems.append(f"map fingerprint {fp} != model's {cfg.coarse_map_fingerprint}")
        if cfg.codebook_fingerprint is not None and cb is not None and cb != cfg.codebook_fingerprint:
            problems.append(f"codebook fingerprint {cb} != model's {cfg.codebook_fingerprint}")
        f2c = torch.as_tensor(coarse_map.fine_to_coarse, dtype=torch.long).reshape(-1)
        if f2c.numel() != cfg.vocab_size or int(f2c.min()) < 0 or int(f2c.max()) >= cfg.num_coarse:
            problems.append(f"fine_to_coarse must be ({cfg.vocab_size},) with values in 0..{cfg.num_coarse - 1}")
        if problems:
            raise ConfigError(
                "coarse map does not belong to this AuxModel:\n  " + "\n  ".join(problems)
                + "\nUse the coarse map the model was trained with (the pipeline directory's coarse_map.safetensors)."
            )
        if cfg.coarse_map_fingerprint is None or (cfg.codebook_fingerprint is None and cb is not None):
            self.config = dataclasses.replace(
                cfg, coarse_map_fingerprint=cfg.coarse_map_fingerprint or fp,
                codebook_fingerprint=cfg.codebook_fingerprint or cb,
            )
            self._hub_mixin_config = self.config  # what save_pretrained writes to config.json
        self.fine_to_coarse.copy_(f2c.to(self.fine_to_coarse.device))
        self._map_checked = True

    def _require_map(self):
        if not self._map_checked:
            if bool((self.fine_to_coarse < 0).any()):
                raise RunError(
                    "AuxModel has no coarse map: pass coarse_map= to AuxModel(...) or call "
                    "set_coarse_map(map); from_pretrained restores it from the checkpoint."
                )
            self._map_checked = True

    def cluster_mask(self, coarse):
        """(B, L, V) bool: True where fine code v belongs to the cluster coarse[b, l]."""
        self._require_map()
        return self.fine_to_coarse[None, None, :] == coarse[..., None]

    def cluster_table(self) -> ClusterTable:
        """The members table of the attached coarse map, on the model's device; rebuilt only when
        the map changes (set_coarse_map, load_state_dict, DDP's buffer broadcast of the same map
        keeps it) or the model moves."""
        self._require_map()
        f2c = self.fine_to_coarse
        # Tensors made under inference_mode carry no version counter; they are then compared by value.
        version = None if f2c.is_inference() else f2c._version
        cache = self._table_cache
        if cache is not None and cache[0] == f2c.device:
            if version is not None and cache[1] == version:
                return cache[3]
            if torch.equal(cache[2], f2c):
                self._table_cache = (f2c.device, version, cache[2], cache[3])
                return cache[3]
        # Built as ordinary tensors even under inference_mode: the grouped head saves `members` for
        # backward, and an inference tensor there would make every later training step of this model fail.
        with torch.inference_mode(False):
            table = cluster_table(f2c, self.config.num_coarse)
            self._table_cache = (f2c.device, version, f2c.clone(), table)
        return table

    def forward(self, coarse, labels=None, restrict: Optional[bool] = None, in_cluster: bool = False):
        """coarse (B, L) int64 labels, L <= image_tokens; labels (B,) (None = null label).
        Returns (B, L, vocab) float32; with `in_cluster`, (B, L, M) float32 logits of the members
        of each position's cluster (`cluster_table().members[coarse]`), padding -inf.
        `restrict` overrides config.restrict_to_cluster (guidance combines unrestricted logits
        and masks after, since -inf - -inf is nan; with `in_cluster` it leaves the padding finite)."""
        B, L = coarse.shape
        cfg = self.config
        if L > cfg.image_tokens:
            raise ConfigError(f"got {L} coarse labels, the model's grid holds {cfg.image_tokens}")
        h = self.tok_embeddings(coarse)
        if cfg.class_prefix:
            labels = _labels_tensor(labels, B, cfg.num_classes, coarse.device)
            h = torch.cat([self.cls_embedding(labels)[:, None], h], dim=1)
            freqs = self.freqs_cis[: L + 1]
        else:
            freqs = self.freqs_cis[1 : L + 1]
        h = self.tok_dropout(h)
        for layer in self.layers:
            h = layer(h, freqs, causal=False)
        if cfg.class_prefix:
            h = h[:, 1:]
        restrict = cfg.restrict_to_cluster if restrict is None else restrict
        if in_cluster:
            table = self.cluster_table()
            logits = self._in_cluster_logits(self.norm(h), coarse, table)
            return logits.masked_fill(~table.valid[coarse], float("-inf")) if restrict else logits
        logits = self.output(self.norm(h)).float()
        if restrict:
            logits = logits.masked_fill(~self.cluster_mask(coarse), float("-inf"))
        return logits

    def _in_cluster_logits(self, h, coarse, table: ClusterTable, method: Optional[str] = None):
        """h (B, L, D) normed states -> (B, L, M) float32 logits h . W[members[coarse]].

        method (None = pick): "grouped" sorts the positions by cluster and multiplies each group
        by its cluster's (M, D) block of the gathered (K, M, D) weights in one `grouped_mm`,
        so the weights are gathered once per cluster, not once per position (the CPU default);
        "gather" gathers (B, L, M, D) per position and does a batched matvec (other devices,
        where grouped_mm's dtypes vary); "full" computes the (B, L, V) logits and gathers the
        members' columns, used when the table is much larger than the codebook.
        """
        w = self.output.weight
        device_type = h.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else w.dtype
        h, w = h.to(dtype), w.to(dtype)
        members = table.members
        K, M = members.shape
        B, L, D = h.shape
        if method is None:
            if K * M > _MAX_TABLE_BLOWUP * w.shape[0]:
                method = "full"
            elif device_type == "cpu" and hasattr(F, "grouped_mm") and (D * h.element_size()) % 16 == 0:
                method = "grouped"
            else:
                method = "gather"
        if method == "full":
            return F.linear(h, w).float().gather(-1, members[coarse])
        if method == "gather":
            return (F.embedding(members[coarse], w) @ h[..., None]).squeeze(-1).float()
        if method != "grouped":
            raise ConfigError(f"unknown in-cluster head method {method!r}")
        flat = coarse.reshape(-1)
        order = torch.argsort(flat)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        ends = torch.cumsum(torch.bincount(flat, minlength=K), 0).to(torch.int32)
        blocks = F.embedding(members, w).transpose(1, 2)  # (K, D, M)
        out = F.grouped_mm(h.reshape(-1, D)[order], blocks, offs=ends)
        return out[inverse].view(B, L, M).float()
