"""Load LlamaGen class-conditional GPT checkpoints (c2i_B_256.pt, ...) into `GPT`, and LlamaGen's sampler as a reference."""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Mapping

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ctfgen.models.transformer import GPT, GPT_PRESETS, GPTConfig, apply_rotary_emb, precompute_freqs_cis_2d
from ctfgen.utils.errors import ConfigError
from ctfgen.utils.hub import check_state_dict, llamagen_file_error, load_state_dict_strict, read_llamagen_checkpoint

# Saved by some LlamaGen versions or training wrappers; they hold no weights.
_NON_PARAMETER = re.compile(r"^(freqs_cis|causal_mask|layers\.\d+\.attention\.kv_cache\.(k_cache|v_cache))$")
_WRAPPER_KEYS = ("model", "module", "state_dict")
_PREFIXES = ("_orig_mod.", "module.")


EXAMPLE = "c2i_B_256.pt"


def extract_state_dict(ckpt: Mapping, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensors of a LlamaGen checkpoint: under "model", "module", "state_dict", or bare (FSDP),
    with torch.compile / DDP prefixes stripped and known non-parameter buffers dropped."""
    if not isinstance(ckpt, Mapping):
        raise llamagen_file_error(source, "GPT", EXAMPLE, f"it holds a {type(ckpt).__name__}, not a dict of tensors")
    for key in _WRAPPER_KEYS:
        if key in ckpt and isinstance(ckpt[key], Mapping):
            ckpt = ckpt[key]
            break
    state = {}
    for name, value in ckpt.items():
        if not isinstance(value, torch.Tensor):
            raise llamagen_file_error(source, "GPT", EXAMPLE, f"entry {name!r} is a {type(value).__name__}, not a "
                                      f"tensor; expected tensors under one of {_WRAPPER_KEYS} or a bare state dict")
        # in any order and nesting: DDP around a compiled model saves "module._orig_mod."
        while name.startswith(_PREFIXES):
            name = name[len(next(p for p in _PREFIXES if name.startswith(p))):]
        if _NON_PARAMETER.match(name):
            continue
        state[name] = value
    return state


def load_llamagen_gpt(path, preset: str = "GPT-B", image_tokens: int = 256, num_classes: int = 1000, **overrides) -> GPT:
    """Load a LlamaGen c2i GPT checkpoint strictly.

    `preset` gives depth/heads/width (heads cannot be read from the tensors); the vocabulary is
    read from `tok_embeddings.weight`; `image_tokens` is the grid (256 for 256px VQ-16, 576 for
    384px). A missing, unexpected or mis-shaped tensor raises `StateDictMismatch` naming it.
    The model is returned in eval mode, in the checkpoint's dtype.
    """
    if preset not in GPT_PRESETS:
        raise ConfigError(f"unknown GPT preset {preset!r}; choose one of {', '.join(GPT_PRESETS)}")
    if "vocab_size" in overrides:
        # the embedding table's rows are the vocabulary; any other value could only fail the shape check
        raise ConfigError("vocab_size cannot be overridden: it is read from the checkpoint's tok_embeddings.weight; "
                          "leave it out")
    fields = {f.name for f in dataclasses.fields(GPTConfig)} - {"vocab_size", "image_tokens", "num_classes"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"unknown GPTConfig override(s) {', '.join(unknown)}; choose from "
                          f"{', '.join(sorted(fields))} (image_tokens and num_classes are arguments of their own)")
    side = math.isqrt(image_tokens)
    if side * side != image_tokens:
        raise ConfigError(f"image_tokens={image_tokens} is not a square grid (256 for 256px, 576 for 384px with VQ-16)")
    source = str(path)
    state = extract_state_dict(read_llamagen_checkpoint(path, "GPT", EXAMPLE), source)
    if "tok_embeddings.weight" not in state:
        vq = any(k.startswith(("encoder.", "quantize.")) or k.startswith("model.encoder.") for k in state)
        raise llamagen_file_error(source, "GPT", EXAMPLE, "it has no tok_embeddings.weight" +
                                  ("; it looks like a VQ tokenizer, load it with ctfgen.load_llamagen_vq" if vq else ""))
    vocab_size = state["tok_embeddings.weight"].shape[0]
    config = GPTConfig.from_preset(preset, vocab_size=vocab_size, image_tokens=image_tokens, num_classes=num_classes, **overrides)
    with torch.device("meta"):
        model = GPT(config)
    # shapes first on the meta model, so a wrong preset fails before allocating anything
    check_state_dict(model.state_dict(), state, source=source)
    model = model.to_empty(device="cpu")
    model.freqs_cis = model._make_freqs()
    dtype = state["tok_embeddings.weight"].dtype
    model = model.to(dtype)
    load_state_dict_strict(model, state, source=source)
    return model.eval()


# --------------------------------------------------------------------------------------------
# LlamaGen's sampler, as the reference that ctfgen.generate is timed and checked against


@torch.no_grad()
def llamagen_generate(gpt: GPT, labels, cfg_scale: float = 1.0, cfg_interval: int = -1, temperature: float = 1.0,
                      top_k: int = 0, top_p: float = 1.0, decode_steps: int | None = None,
                      timings: dict | None = None) -> torch.Tensor:
    """LlamaGen's `generate` (autoregressive/models/generate.py) with its model's KV-cached forward
    (autoregressive/models/gpt.py), step for step, on a ctfgen `GPT`'s weights -> (B, image_tokens) int64.

    What LlamaGen does and `ctfgen.generate` does not: a cache of max_seq rounded up to a multiple
    of 8 and a (batch, seq, seq) causal mask; every step attends over the whole cache through
    `F.scaled_dot_product_attention` with a boolean mask, under the math backend (LlamaGen's
    `sdp_kernel(enable_flash=False, enable_mem_efficient=False, enable_math=True)`, written with
    the current `sdpa_kernel` API); keys and values pass through `repeat_interleave` (a copy even
    for one group); the unconditional half is computed to the end even after `cfg_interval`;
    guidance only when `cfg_scale > 1`; LlamaGen's filter and `torch.multinomial` on the global RNG
    (seed it with torch.manual_seed). Its blocks (RMSNorm, RoPE, SwiGLU) are the model's own,
    which follow LlamaGen's numerics exactly. `cfg_interval=I` guides tokens 0..I+1, i.e.
    `ctfgen.generate(cfg_steps=I + 2)`. For benchmarks and tests; `ctfgen.generate` is the sampler.

    `decode_steps` (timing only) stops after that many decode steps, the cache and mask keeping their
    full size, and returns (B, 1 + decode_steps) tokens: every LlamaGen step attends over the
    whole cache, so each costs the same wherever it is in the image. `timings` (timing only), a dict,
    gets "setup": the seconds spent allocating the caches, the mask and the RoPE table, a cost paid
    once per image however many steps are timed.
    """
    t0 = time.perf_counter()
    cfg = gpt.config
    device, dtype = gpt.tok_embeddings.weight.device, gpt.tok_embeddings.weight.dtype
    cond = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
    cond_combined = torch.cat([cond, torch.ones_like(cond) * cfg.num_classes]) if cfg_scale > 1.0 else cond
    T, max_new_tokens = 1, cfg.image_tokens
    max_seq = -(-(T + max_new_tokens) // 8) * 8  # find_multiple(T_new, 8)
    batch, n_head, head_dim, dim = cond_combined.shape[0], cfg.n_head, cfg.dim // cfg.n_head, cfg.dim
    caches = [(torch.zeros(batch, n_head, max_seq, head_dim, dtype=dtype, device=device),
               torch.zeros(batch, n_head, max_seq, head_dim, dtype=dtype, device=device)) for _ in gpt.layers]
    causal_mask = torch.tril(torch.ones(max_seq, max_seq, dtype=torch.bool, device=device)).unsqueeze(0).repeat(batch, 1, 1)
    freqs_cis = precompute_freqs_cis_2d(cfg.grid_size, head_dim, cfg.rope_base, cls_token_num=T).to(device)
    if timings is not None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings["setup"] = time.perf_counter() - t0

    def model(idx, cond_idx, input_pos):
        if cond_idx is not None:  # prefill
            h = gpt.cls_embedding.embedding_table(cond_idx).unsqueeze(1)[:, :T]
        else:
            h = gpt.tok_embeddings(idx)
        bs = h.shape[0]
        mask = causal_mask[:bs, None, input_pos]
        freqs = freqs_cis[input_pos]
        for layer, (k_cache, v_cache) in zip(gpt.layers, caches):
            x = layer.attention_norm(h)
            bsz, seqlen, _ = x.shape
            xq, xk, xv = layer.attention.wqkv(x).split([dim, dim, dim], dim=-1)
            xq = apply_rotary_emb(xq.view(bsz, seqlen, n_head, head_dim), freqs)
            xk = apply_rotary_emb(xk.view(bsz, seqlen, n_head, head_dim), freqs)
            xv = xv.view(bsz, seqlen, n_head, head_dim)
            xq, xk, xv = (t.transpose(1, 2) for t in (xq, xk, xv))
            k_cache[:, :, input_pos] = xk
            v_cache[:, :, input_pos] = xv
            keys, values = k_cache.repeat_interleave(1, dim=1), v_cache.repeat_interleave(1, dim=1)
            out = F.scaled_dot_product_attention(xq, keys, values, attn_mask=mask, is_causal=False)
            h = h + layer.attention.wo(out.transpose(1, 2).contiguous().view(bsz, seqlen, dim))
            h = h + layer.feed_forward(layer.ffn_norm(h))
        return gpt.output(gpt.norm(h)).float()

    def sample(logits):
        logits = logits[:, -1, :] / max(temperature, 1e-5)
        if top_k > 0 or top_p < 1.0:
            logits = _llamagen_top_k_top_p_filtering(logits, top_k, top_p)
        return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)

    def guided(logits, cfg_flag=True):
        if cfg_scale > 1.0:
            cond_logits, uncond_logits = torch.split(logits, len(logits) // 2, dim=0)
            return uncond_logits + (cond_logits - uncond_logits) * cfg_scale if cfg_flag else cond_logits
        return logits

    was_training = gpt.training
    gpt.eval()
    try:
        seq = torch.empty((cond.shape[0], T + max_new_tokens), dtype=torch.int, device=device)
        next_token = sample(guided(model(None, cond_combined, torch.arange(0, T, device=device))))
        seq[:, T:T + 1] = next_token
        input_pos = torch.tensor([T], device=device, dtype=torch.int)
        cur_token, new_tokens, cfg_flag = next_token, [], True
        n = max_new_tokens - 1 if decode_steps is None else min(int(decode_steps), max_new_tokens - 1)
        for i in range(n):
            with sdpa_kernel(SDPBackend.MATH):
                if cfg_interval > -1 and i > cfg_interval:
                    cfg_flag = False
                x = torch.cat([cur_token, cur_token]) if cfg_scale > 1.0 else cur_token
                next_token = sample(guided(model(x, None, input_pos), cfg_flag))
                input_pos += 1
                new_tokens.append(next_token.clone())
                cur_token = next_token.view(-1, 1)
        if new_tokens:
            seq[:, T + 1:T + 1 + n] = torch.cat(new_tokens, dim=1)
    finally:
        gpt.train(was_training)
    return seq[:, T:T + 1 + n].long()


def _llamagen_top_k_top_p_filtering(logits, top_k: int = 0, top_p: float = 1.0, filter_value: float = -float("Inf")):
    """LlamaGen's filter (from Hugging Face's), in place on `logits` as there."""
    if top_k > 0:
        top_k = min(max(top_k, 1), logits.size(-1))
        logits[logits < torch.topk(logits, top_k)[0][..., -1, None]] = filter_value
    if top_p < 1.0:
        sorted_logits, sorted_indices = torch.sort(logits, descending=True)
        cumulative_probs = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        sorted_indices_to_remove = cumulative_probs > top_p
        sorted_indices_to_remove[..., 1:] = sorted_indices_to_remove[..., :-1].clone()
        sorted_indices_to_remove[..., 0] = 0
        logits[sorted_indices_to_remove.scatter(1, sorted_indices, sorted_indices_to_remove)] = filter_value
    return logits
