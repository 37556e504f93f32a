"""Inference and training precision: one name per dtype, `auto`, and weights cast once.

`resolve_dtype("auto", device)` is bfloat16 on CUDA and on CPUs with native bf16 matrix multiply
(AVX512-BF16 or AMX), float32 elsewhere. `cast_weights(model, dtype)` returns a copy of `model`
in `dtype`, made once and cached on the model for as long as its parameters are unchanged, so a
pipeline sampled many times at bf16 casts its weights once and the float32 original is untouched
(`log_prob` and training keep scoring in float32). RMSNorm statistics, RoPE, the logits' softmax,
guidance and the sampling draw stay float32 inside the models and the sampler, as in LlamaGen.

int8 (`--dtype int8`, `int8-weight`, `int8-fbgemm`) quantizes the linear layers of the copy and
keeps everything else in float32 (embeddings, norms, attention over the KV cache, the logits):
- `int8`: dynamic int8 through torchao (`pip install 'ctfgen[quant]'`): int8 weights per output
  channel, activations quantized per token at each call, int8 x int8 matrix multiplies;
- `int8-weight`: weight-only int8 through torchao: int8 weights, float32 activations;
- `int8-fbgemm`: dynamic int8 through PyTorch's own x86 kernels (torch.ao.quantization, fbgemm):
  int8 weights per output channel, activations quantized per tensor (one scale for the whole
  batch) at each call. No extra needed; on this project's CPU it is several times faster than
  torchao's eager int8 (docs/performance.md), but torch.ao.quantization is deprecated upstream.
The auxiliary model's output layer stays float32 in every scheme: its in-cluster head reads rows
of that weight directly.
"""

from __future__ import annotations

import copy
import functools
import logging
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

from ctfgen.utils.errors import ConfigError

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


@dataclass(frozen=True)
class Int8:
    """An int8 scheme for the linear layers; the rest of the model stays float32."""

    name: str
    activations: str  # "dynamic": quantized at each call, int8 matmul; "weight-only": float32
    backend: str  # "torchao" or "fbgemm" (torch.ao.quantization)

    def __str__(self) -> str:
        return self.name


INT8 = {
    "int8": Int8("int8", "dynamic", "torchao"),
    "int8-weight": Int8("int8-weight", "weight-only", "torchao"),
    "int8-fbgemm": Int8("int8-fbgemm", "dynamic", "fbgemm"),
}
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16", *INT8)  # what commands offer

DtypeLike = Union[str, torch.dtype, Int8, None]
Precision = Union[torch.dtype, Int8]


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


def resolve_dtype(dtype: DtypeLike, device="cpu") -> Optional[Precision]:
    """"auto" | "float32" | "bfloat16" | "float16" (or "fp32"/"bf16"/"fp16", or a torch.dtype) ->
    torch.dtype; "int8" | "int8-weight" | "int8-fbgemm" -> an `Int8` scheme. None stays None
    (= the model's own dtype). Raises ConfigError on anything else."""
    if dtype is None or isinstance(dtype, Int8) or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
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
        if name in INT8:
            return INT8[name]
    raise ConfigError(
        f"unsupported dtype {dtype!r}: use one of {', '.join(DTYPE_CHOICES)} "
        "(auto = bfloat16 on CUDA and on CPUs with native bf16, float32 elsewhere; "
        "int8 = dynamic int8 linear layers, int8-weight = weight-only, int8-fbgemm = dynamic through PyTorch's x86 kernels)"
    )


def dtype_name(dtype: Precision) -> str:
    return dtype.name if isinstance(dtype, Int8) else str(dtype).removeprefix("torch.")


def _weights_key(model: torch.nn.Module) -> tuple:
    # Changes when a parameter or persistent buffer (the aux model's fine_to_coarse, which
    # set_coarse_map rewrites in place) is replaced or updated in place (optimiser step,
    # load_state_dict), or the config is replaced; the copy carries all of them. Non-persistent
    # buffers (KV caches, RoPE tables) are left out: sampling rewrites the caches at every step.
    # Inference tensors keep no version counter; only their replacement is seen.
    tensors = model.state_dict(keep_vars=True).values()
    weights = tuple((t.data_ptr(), -1 if t.is_inference() else t._version, t.device) for t in tensors)
    return weights, getattr(model, "config", None)


_NOT_COPIED = ("_ctfgen_casts", "_ctfgen_compiled_step")


def drop_casts(model: torch.nn.Module, dtype: DtypeLike = None) -> None:
    """Free `model`'s cached copy in `dtype` (None: every one), e.g. once it moves to another device."""
    cache = model.__dict__.get("_ctfgen_casts", {})
    if dtype is None:
        cache.clear()
    else:
        cache.pop(resolve_dtype(dtype, next(model.parameters()).device), None)


def cast_weights(model: torch.nn.Module, dtype: DtypeLike) -> torch.nn.Module:
    """`model` itself when it already is in `dtype` (or dtype is None); otherwise an eval-mode copy
    with floating-point weights in `dtype`, or float32 with int8 linear layers for an `Int8`
    scheme, cached on `model` per dtype until its weights change."""
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
    if isinstance(dtype, Int8):
        quantize_linears(cast.to(torch.float32).eval(), dtype)
    else:
        cast.to(dtype).eval()
    cache[dtype] = (key, cast)
    return cast


def quantize_linears(model: torch.nn.Module, scheme: Int8) -> torch.nn.Module:
    """Quantize `model`'s nn.Linear layers in place to `scheme`, except those named in the model's
    `float_linears` (layers whose weight is read directly, as the auxiliary model's output)."""
    keep = set(getattr(model, "float_linears", ()))
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in keep]
    if not names:
        return model
    if scheme.backend == "torchao":
        quantization = _import_torchao(scheme)
        config = (quantization.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
                  if scheme.activations == "dynamic" else quantization.Int8WeightOnlyConfig(set_inductor_config=False))
        chosen = set(names)
        quantization.quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn in chosen)
        return model
    devices = sorted({p.device.type for p in model.parameters()} - {"cpu"})
    if devices:  # its packed int8 weights and kernels exist on the CPU only: a traceback at the first step
        raise ConfigError(f"--dtype {scheme.name} runs on the CPU only (PyTorch's x86 kernels), this model is on "
                          f"{', '.join(devices)}: use --dtype int8 (torchao) or bfloat16 there, or --device cpu")
    engines = torch.backends.quantized.supported_engines
    if not {"fbgemm", "x86"} & set(engines):
        raise ConfigError(f"--dtype {scheme.name} needs PyTorch's x86 quantized engine (fbgemm); this build has "
                          f"{', '.join(engines)}. Use --dtype int8 (torchao) instead.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice, on every call
        quantize_dynamic(model, {n: per_channel_dynamic_qconfig for n in names}, dtype=torch.qint8, inplace=True)
    return model


def _import_torchao(scheme: Int8):
    # torchao logs warnings on import about CUDA-only extensions it cannot load on a CPU build
    quiet = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        import torchao.quantization as quantization
    except ImportError as e:
        raise ConfigError(f"--dtype {scheme.name} quantizes through torchao, which is not installed ({e}): "
                          "pip install 'ctfgen[quant]' (or use --dtype int8-fbgemm, which needs no extra)") from None
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
    return quantization
