"""Inference and training precision: one name per dtype, `auto`, and weights cast once.

`resolve_dtype("auto", device)` is bfloat16 on CUDA and on CPUs with native bf16 matrix multiply
(AVX512-BF16 or AMX), float32 elsewhere. `cast_weights(model, dtype)` returns a copy of `model`
in `dtype`, made once and cached on the model for as long as its parameters are unchanged, so a
pipeline sampled many times at bf16 casts its weights once and the float32 original is untouched
(`log_prob` and training keep scoring in float32). RMSNorm statistics, RoPE, the logits' softmax,
guidance and the sampling draw stay float32 inside the models and the sampler, as in LlamaGen.
"""

from __future__ import annotations

import copy
import functools
from typing import Optional, Union

import torch

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")  # what commands offer

DtypeLike = Union[str, torch.dtype, None]


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX); checked once."""
    cpu = torch.cpu
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(cpu, probe, None)
        if fn is not None:
            try:
                if fn():
                    return True
            except RuntimeError:
                pass
    return False


def resolve_dtype(dtype: DtypeLike, device="cpu") -> Optional[torch.dtype]:
    """"auto" | "float32" | "bfloat16" | "float16" (or "fp32"/"bf16"/"fp16", or a torch.dtype) ->
    torch.dtype. None stays None (= the model's own dtype). Raises ValueError on anything else."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str):
        name = dtype.strip().lower()
        if name == "auto":
            device = torch.device(device)
            if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
                return torch.bfloat16
            return torch.float32
        if name in DTYPES:
            return DTYPES[name]
    raise ValueError(
        f"unsupported dtype {dtype!r}: use one of {', '.join(DTYPE_CHOICES)} "
        "(auto = bfloat16 on CUDA and on CPUs with native bf16, float32 elsewhere)"
    )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _weights_key(model: torch.nn.Module) -> tuple:
    # Changes when a parameter is replaced or updated in place (optimiser step, load_state_dict).
    # Inference tensors keep no version counter; only their replacement is seen.
    return tuple((p.data_ptr(), -1 if p.is_inference() else p._version, p.device) for p in model.parameters())


_NOT_COPIED = ("_ctfgen_casts", "_ctfgen_compiled_step")


def cast_weights(model: torch.nn.Module, dtype: DtypeLike) -> torch.nn.Module:
    """`model` itself when it already is in `dtype` (or dtype is None); otherwise an eval-mode copy
    with floating-point weights in `dtype`, cached on `model` per dtype until its weights change."""
    dtype = resolve_dtype(dtype, next(model.parameters()).device)
    if dtype is None or next(model.parameters()).dtype == dtype:
        return model
    cache = model.__dict__.setdefault("_ctfgen_casts", {})
    key = _weights_key(model)
    hit = cache.get(dtype)
    if hit is not None and hit[0] == key:
        return hit[1]
    cache.pop(dtype, None)  # free a stale copy before making the new one
    # Copy without the casts made earlier, a compiled step, or any KV cache.
    saved = {k: model.__dict__.pop(k) for k in _NOT_COPIED if k in model.__dict__}
    try:
        cast = copy.deepcopy(model)
    finally:
        model.__dict__.update(saved)
    if hasattr(cast, "clear_caches"):
        cast.clear_caches()
    cast.to(dtype).eval()
    cache[dtype] = (key, cast)
    return cast
