"""Sampling and exact likelihoods: LlamaGen's KV-cached sampler, CTF stage 2, teacher-forced log p.

`generate` follows LlamaGen's `generate` step for step (prefill with the class token only,
guidance as one [cond; null] batch, the same token fed to both halves, temperature, top-k, top-p
with the shift-right keep rule, multinomial), so `top_k=1` reproduces LlamaGen's greedy tokens
from the same weights. Differences, all deliberate:
- `top_k=1` takes the argmax directly (LlamaGen draws from the one-hot; identical unless logits tie
  exactly) and consumes no random numbers; so does `temperature=0`, which means greedy.
- `top_k > 1` draws among the top-k logits only: LlamaGen's distribution, fewer random numbers, so
  other draws than LlamaGen's for the same seed. Without top-k the draw is LlamaGen's.
- Guidance runs whenever `cfg_scale != 1` (LlamaGen silently ignores scales below 1).
- `cfg_steps=N` guides tokens 0..N-1; LlamaGen's `cfg_interval=I` guides tokens 0..I+1, so
  `cfg_steps = cfg_interval + 2`. After the last guided token the unconditional half is dropped
  from the batch instead of being computed and thrown away.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch
import torch.nn.functional as F

from ctfgen.utils.errors import ConfigError, MismatchError, WrongTypeError
from ctfgen.utils.options import check_sampling, check_seed, integer_tokens, tokens_below, whole_numbers
from ctfgen.utils.precision import cast_weights

GeneratorLike = Union[torch.Generator, int, None]


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + (cond - uncond) * scale (LlamaGen's formula, the same
    rounding: one new tensor, then in place)."""
    return (cond - uncond).mul_(scale).add_(uncond)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """LlamaGen's top-k / top-p filter over the last dim; removed entries become -inf.

    top-k keeps every logit >= the k-th largest. top-p sorts descending, removes tokens whose
    cumulative probability exceeds p, shifted right by one so the token that crosses p stays,
    and always keeps the top token. Returns a new tensor.
    """
    if top_k > 0:
        k = min(int(top_k), logits.size(-1))
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits = logits.masked_fill(remove.scatter(-1, sorted_idx, remove), float("-inf"))
    return logits


def as_generator(generator: GeneratorLike, device) -> Optional[torch.Generator]:
    """An int seeds a fresh generator on `device`; a Generator is used as is; None = global RNG."""
    if generator is None:
        return generator
    if isinstance(generator, torch.Generator):
        # torch.multinomial refuses it later with a bare RuntimeError; torch.Generator() is on the CPU
        if generator.device.type != torch.device(device).type:
            raise ConfigError(f"the generator is on {generator.device.type} but the model is on {device}: make it with "
                              f"torch.Generator(device={str(device)!r}), or pass an int seed")
        return generator
    if isinstance(generator, int):
        return torch.Generator(device=device).manual_seed(check_seed(generator))
    raise WrongTypeError(f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}")


def sample_from_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: GeneratorLike = None,
) -> torch.Tensor:
    """Draw one token per row of (..., V) logits -> (...) int64. `top_k=1` or `temperature=0` is greedy.

    With 1 < top_k < V the draw runs on the (..., k) top-k logits, not the (..., V) masked ones:
    the same distribution as LlamaGen's filter-then-softmax, with k random numbers per row instead
    of V (a different stream from the full draw's for the same generator). Ties at the k-th value,
    which LlamaGen's filter keeps all of, take the full path."""
    if top_k == 1 or temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / max(temperature, 1e-5)
    if 1 < top_k < logits.shape[-1]:
        values, indices = torch.topk(logits, int(top_k), dim=-1)  # sorted, largest first
        if not bool(((logits >= values[..., -1:]).sum(-1) > top_k).any()):
            if top_p < 1.0:
                values = filter_logits(values, top_p=top_p)
            return indices.gather(-1, _draw(values, generator)[..., None]).squeeze(-1)
    if top_k > 0 or top_p < 1.0:
        logits = filter_logits(logits, top_k, top_p)
    return _draw(logits, generator)


def _draw(logits: torch.Tensor, generator: GeneratorLike) -> torch.Tensor:
    # softmax and torch.multinomial, as LlamaGen; the draw costs one exponential per logit
    probs = F.softmax(logits, dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    idx = torch.multinomial(flat, 1, generator=as_generator(generator, flat.device))
    return idx.view(probs.shape[:-1])


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module):
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def check_labels(labels, num_classes: int, device, allow_null: bool = False) -> torch.Tensor:
    """(B,) int64 class ids on `device`; `allow_null` also takes `num_classes`, the unconditional label."""
    labels = whole_numbers(labels, "class labels must be whole numbers").reshape(-1)
    if labels.numel() == 0:
        raise ConfigError("no labels given: pass one class id per image")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes + allow_null:
        raise ConfigError(f"class labels must be in [0, {num_classes})" + (f" or {num_classes}, the null label"
                          if allow_null else "") + f"; got range [{int(labels.min())}, {int(labels.max())}]")
    return labels.to(device)


@torch.no_grad()
def generate(
    gpt,
    labels,
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    cfg_steps: Optional[int] = None,
    generator: GeneratorLike = None,
    dtype=None,
    compile: bool = False,
) -> torch.Tensor:
    """Sample (B, image_tokens) int64 tokens from a `GPT` for class `labels` (B,).

    KV-cached: the class token is prefilled, then one token per step; the cache and causal mask
    are allocated once. `cfg_scale != 1` runs [cond; null] in one batch and samples from
    uncond + (cond - uncond) * cfg_scale; `cfg_steps` limits guidance to the first N tokens.
    `generator`: a torch.Generator or an int seed, for reproducible draws. `dtype`: "auto",
    "float32", "bfloat16", "float16", or an int8 scheme ("int8", "int8-weight", "int8-fbgemm")
    (None = the weights' dtype): runs a copy of the weights cast once per dtype
    (`ctfgen.utils.precision.cast_weights`); the KV cache is float32 on the CPU and in the weights' dtype
    elsewhere (`kv_cache_dtype`); logits, guidance and the draw stay float32. Each eager step
    attends over the filled part of the cache only. `compile`: torch.compile the decode step,
    which then keeps fixed shapes (the whole cache, masked), and keeps the caches allocated
    afterwards so the compiled graph is reused (`gpt.clear_caches()` frees them).
    """
    o = check_sampling(dict(cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p, cfg_steps=cfg_steps),
                       {"top_k": gpt.config.vocab_size, "cfg_steps": gpt.config.image_tokens})
    cfg_scale, temperature, top_k, top_p, cfg_steps = (o[k] for k in ("cfg_scale", "temperature", "top_k", "top_p", "cfg_steps"))
    gpt = cast_weights(gpt, dtype)
    device = gpt.tok_embeddings.weight.device
    labels = check_labels(labels, gpt.config.num_classes, device, allow_null=True)
    B, L = labels.shape[0], gpt.config.image_tokens
    n_guided = L if cfg_steps is None else max(0, min(int(cfg_steps), L))
    guided = cfg_scale != 1.0 and n_guided > 0
    gen = as_generator(generator, device)

    with _eval_mode(gpt):
        gpt.setup_caches(2 * B if guided else B)
        # Eager steps pass the position as an int, so attention reads only the filled part of the
        # cache; a compiled step gets it as a tensor and keeps fixed shapes (the whole cache, masked).
        step = _compiled_step(gpt) if compile else gpt.forward_step
        positions = torch.arange(1, L + 1, device=device) if compile else None
        out = torch.empty(B, L, dtype=torch.long, device=device)
        try:
            if guided:
                logits = gpt.prefill(torch.cat([labels, torch.full_like(labels, gpt.config.num_classes)]))
            else:
                logits = gpt.prefill(labels)
            for k in range(L):
                use_cfg = guided and k < n_guided
                if k > 0:
                    x = out[:, k - 1 : k]  # tok_{k-1}, at sequence position k
                    logits = step(torch.cat([x, x]) if use_cfg else x, positions[k - 1 : k] if compile else k)[:, -1]
                if use_cfg:
                    cond, uncond = logits.chunk(2)
                    logits = cfg_combine(cond, uncond, cfg_scale)
                out[:, k] = sample_from_logits(logits, temperature, top_k, top_p, gen)
        finally:
            if not compile:
                gpt.clear_caches()
    return out


def _compiled_step(gpt):
    # One compiled graph per model, reused across calls (re-compiling per call costs seconds).
    compiled = getattr(gpt, "_ctfgen_compiled_step", None)
    if compiled is None:
        mode = "reduce-overhead" if gpt.tok_embeddings.weight.is_cuda else None
        compiled = torch.compile(gpt.forward_step, mode=mode, fullgraph=True)
        gpt._ctfgen_compiled_step = compiled
    return compiled


def log_prob(gpt, tokens: torch.Tensor, labels=None) -> torch.Tensor:
    """Teacher-forced log p(tokens | label) in nats, (B,) float64 (eval mode: no dropout, no
    class dropout). `labels=None` scores under the null label (unconditional)."""
    device = gpt.tok_embeddings.weight.device
    tokens = integer_tokens(tokens).to(device=device, dtype=torch.long)
    if tokens.dim() != 2:
        raise ConfigError(f"tokens must be (B, L), got shape {tuple(tokens.shape)}")
    # the forward takes tokens[:, :-1], so one token past the grid (or none) would slip past its length check
    n = gpt.config.image_tokens
    if not 1 <= tokens.shape[1] <= n:
        raise MismatchError(f"tokens must hold 1 to {n} tokens per image (the model's grid), got {tokens.shape[1]}")
    tokens_below(tokens, gpt.config.vocab_size, hint="are these tokens from another tokenizer?")
    if labels is not None:
        labels = check_labels(labels, gpt.config.num_classes, device, allow_null=True)
    with _eval_mode(gpt):
        logits = gpt(tokens[:, :-1], labels)  # (B, L, V): position i predicts token i
    return token_log_probs(logits, tokens).sum(-1)


def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor, chunk_bytes: int = 1 << 28) -> torch.Tensor:
    """log softmax(logits)[tokens] per position, float64, without a full float64 copy of logits."""
    V = logits.shape[-1]
    flat, tok = logits.reshape(-1, V), tokens.reshape(-1)
    rows = max(1, chunk_bytes // (8 * V))
    out = torch.empty(flat.shape[0], dtype=torch.float64, device=logits.device)
    for i in range(0, flat.shape[0], rows):
        x = flat[i : i + rows].double()
        out[i : i + rows] = x.gather(-1, tok[i : i + rows, None]).squeeze(-1) - torch.logsumexp(x, dim=-1)
    return out.view(tokens.shape)


@torch.no_grad()
def sample_fine(
    aux,
    coarse: torch.Tensor,
    labels=None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    cfg_scale: float = 1.0,
    generator: GeneratorLike = None,
    dtype=None,
) -> torch.Tensor:
    """CTF stage 2: one `AuxModel` pass over coarse labels (B, L), sample every position's fine
    token -> (B, L) int64. `top_k=1` is argmax (the paper found sampling better). `dtype` as in
    `generate`: the pass runs on weights cast once per dtype; logits and the draw are float32.

    With `cfg_scale != 1` the [cond; null] batch runs unmasked, is combined, and the cluster mask
    (if the model restricts) is applied after, since combining -inf logits would give nan.
    A restricted model samples among each position's cluster members (the in-cluster head), which
    is the masked full softmax's distribution, temperature and top-k/top-p included (top-k counts
    members); the draws differ from the full softmax's for the same generator.
    """
    # stage 2's ranges, named by this function's keywords; no upper bound on top-k: one above a cluster's size
    # has always meant all of its members here (the pipeline bounds it by the largest cluster)
    o = check_sampling(dict(temperature_fine=temperature, top_k_fine=top_k, top_p=top_p, cfg_scale_fine=cfg_scale),
                       labels={"temperature_fine": "temperature", "top_k_fine": "top_k", "cfg_scale_fine": "cfg_scale"})
    temperature, top_k, top_p, cfg_scale = (o[k] for k in ("temperature_fine", "top_k_fine", "top_p", "cfg_scale_fine"))
    aux = cast_weights(aux, dtype)
    device = aux.tok_embeddings.weight.device
    # a cast to int64 alone would truncate 1.7 to label 1, and an out-of-range label is an IndexError in the embedding
    coarse = integer_tokens(coarse, "coarse labels").to(device=device, dtype=torch.long)
    if coarse.dim() != 2:
        raise ConfigError(f"coarse labels must be (B, L), got shape {tuple(coarse.shape)}")
    tokens_below(coarse, aux.config.num_coarse, "coarse labels", "are these labels from another coarse map?",
                 ConfigError)
    B = coarse.shape[0]
    if labels is not None:
        labels = check_labels(labels, aux.config.num_classes, device, allow_null=True)
    in_cluster = bool(aux.config.restrict_to_cluster)
    with _eval_mode(aux):
        if cfg_scale != 1.0:
            if not aux.config.class_prefix:
                raise ConfigError("stage-2 guidance needs an AuxModel with class_prefix=True; use cfg_scale=1.0")
            if labels is None:
                raise ConfigError("stage-2 guidance needs class labels")
            null = torch.full_like(labels, aux.config.num_classes)
            both = aux(torch.cat([coarse, coarse]), torch.cat([labels, null]), restrict=False, in_cluster=in_cluster)
            logits = cfg_combine(both[:B], both[B:], cfg_scale)
            if in_cluster:
                logits = logits.masked_fill(~aux.cluster_table().valid[coarse], float("-inf"))
            elif aux.config.restrict_to_cluster:
                logits = logits.masked_fill(~aux.cluster_mask(coarse), float("-inf"))
        else:
            logits = aux(coarse, labels, in_cluster=in_cluster)
    drawn = sample_from_logits(logits, temperature, top_k, top_p, generator)
    return aux.cluster_table().members[coarse, drawn] if in_cluster else drawn
