"""Sampling speed, measured: `ctfgen bench` and every figure of docs/performance.md.

- `run_bench`: images/s of the baseline and CTF, same stage-1 size, same machine, one run, for every
  precision and batch size: the median, minimum and maximum of `repeats` runs. The shipped
  Fashion-MNIST models and the paper's shapes (GPT-B/L stage 1, a GPT-L-sized auxiliary model,
  VQ-16 at 256x256) with random weights: speed does not depend on what the weights are. With
  `llamagen=True`, LlamaGen's own sampler (`ctfgen.models.llamagen_generate`) runs beside the
  baseline at the same shape, batch and precision.
- `profile_decode`: where a decode step's time goes (torch.profiler).
- `decode_speedups`: what each speed-up of the decode step gives, against what it replaced.
- `compile_speedup`: `generate` eager and with the decode step compiled.
- `matmul_rates`: what this machine's matrix multiply reaches per precision, the ceiling the
  decode step's linear layers are judged against.
- `busy_machine`: the same sampling on quiet cores and beside a busy loop holding one core, for
  several thread counts and OpenMP wait policies (each in its own process).
- `sampling_quality`: Fréchet distance and class consistency on the Fashion-MNIST judge, and
  held-out bits/token, per precision and seed.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ctfgen import sampling
from ctfgen.clustering import CoarseMap
from ctfgen.config import DataConfig
from ctfgen.data.extract import extract_dataset
from ctfgen.metrics.evaluate import evaluate_fmnist, sample_per_class
from ctfgen.models import transformer
from ctfgen.models.llamagen import llamagen_generate
from ctfgen.models.transformer import GPT, AuxConfig, AuxModel, GPTConfig, kv_cache_dtype
from ctfgen.pipeline import ARPipeline, CTFPipeline, heldout_bits_per_token
from ctfgen.sampling import cfg_combine, generate, sample_from_logits
from ctfgen.shipped import pretrained, pretrained_path
from ctfgen.tokenizer.vq import VQConfig, VQModel
from ctfgen.utils.errors import ConfigError
from ctfgen.utils.fileio import atomic_write_json
from ctfgen.utils.options import Option
from ctfgen.utils.precision import Int8, cast_weights, drop_casts, dtype_name, resolve_dtype
from ctfgen.utils.threads import SHORT_SPIN, WAITING_VARIABLES, use_sampling_threads

# --------------------------------------------------------------------------------------------
# Images/s of both methods (`ctfgen bench`)


def paper_shape_pipelines(preset: str, image_tokens: int, num_coarse: int, aux_preset: str, decode: bool):
    """Random-weight baseline and CTF pipelines with the paper's ImageNet shapes."""
    torch.manual_seed(0)
    tokenizer = VQModel(VQConfig()) if decode else None
    codebook = tokenizer.quantize.embedding.weight if decode else torch.randn(16384, 8)
    coarse_map = CoarseMap.fit(codebook, num_coarse, method="random", seed=0)
    fp = dict(codebook_fingerprint=coarse_map.codebook_fingerprint, coarse_map_fingerprint=coarse_map.fingerprint)
    baseline = _random_head(GPT(GPTConfig.from_preset(preset, vocab_size=16384, image_tokens=image_tokens, num_classes=1000)))
    stage1 = _random_head(GPT(GPTConfig.from_preset(preset, vocab_size=num_coarse, image_tokens=image_tokens,
                                                     num_classes=1000, **fp)))
    aux = AuxModel(AuxConfig.from_preset(aux_preset, vocab_size=16384, num_coarse=num_coarse,
                                         image_tokens=image_tokens, num_classes=1000, **fp), coarse_map)
    return ARPipeline(baseline, tokenizer), CTFPipeline(stage1, _random_head(aux), coarse_map, tokenizer)


def _random_head(model):
    # LlamaGen's init zeroes the output head: every draw would be uniform, which is not what a
    # trained model samples from (top-k, guidance and the draw would see no structure).
    with torch.no_grad():
        torch.nn.init.normal_(model.output.weight, std=0.02)
    return model


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _summary(runs: list[dict], batch_size: int, image_tokens: int) -> dict:
    """Medians of every timing, images/s as median, min and max, stage-1 tokens/s, and the runs."""
    out = {k: statistics.median(run.get(k, 0.0) for run in runs) for k in runs[0]}
    totals = [run["total"] for run in runs]
    out.update(images_per_s=batch_size / statistics.median(totals), images_per_s_min=batch_size / max(totals),
               images_per_s_max=batch_size / min(totals), repeats=len(runs), runs=runs)
    if out.get("stage1"):
        out["tokens_per_s"] = batch_size * image_tokens / out["stage1"]
    return out


def time_pipeline(pipeline, batch_size: int, repeats: int, cfg_scale: float, device: str, dtype=None,
                  warmup: int = 1) -> dict:
    """Sample `warmup + repeats` batches (seeds 0, 1, ...) and summarise the last `repeats`."""
    labels = torch.arange(batch_size, device=device) % pipeline.num_classes
    runs = []
    for r in range(warmup + repeats):  # a warm-up run fills caches and allocators
        generator = torch.Generator(device=device).manual_seed(r)
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            # Without a tokenizer (--no-decode) only the two token stages are timed.
            sample = pipeline.sample if pipeline.tokenizer is not None else pipeline.sample_tokens
            sample(labels, cfg_scale=cfg_scale, generator=generator, dtype=dtype)
        _sync(device)
        total = time.perf_counter() - t0
        if r >= warmup:
            runs.append({**pipeline.last_timings, "total": total})
    return _summary(runs, batch_size, pipeline.image_tokens)


def time_llamagen(gpt, batch_size: int, repeats: int, cfg_scale: float, device: str, dtype=None,
                  decode_steps: int | None = None, warmup: int = 1) -> dict:
    """`time_pipeline` for LlamaGen's sampler on the baseline's GPT (tokens only, no decode), with
    the baseline's sampling options (temperature 1, no top-k / top-p) and its weights in `dtype`:
    `warmup + repeats` runs (seeds 0, 1, ...), the last `repeats` summarised.

    `decode_steps` times only that many decode steps of a full-size run and scales the time of
    its tokens to the whole image: each of LlamaGen's steps attends over the whole cache, so they
    all cost the same (`llamagen_generate`). Allocating the caches, mask and RoPE table is paid
    once per image, as the baseline's `setup_caches` is in its timing, so it is added unscaled."""
    model = cast_weights(gpt, dtype)
    labels = torch.arange(batch_size, device=device) % gpt.config.num_classes
    L = gpt.config.image_tokens
    runs = []
    for r in range(warmup + repeats):  # a warm-up run fills caches and allocators, as in `time_pipeline`
        torch.manual_seed(r)  # LlamaGen draws from the global generator
        timings = {}
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            tokens = llamagen_generate(model, labels, cfg_scale=cfg_scale, decode_steps=decode_steps, timings=timings)
        _sync(device)
        steps = time.perf_counter() - t0 - timings["setup"]
        total = timings["setup"] + steps * L / tokens.shape[1]
        if r >= warmup:
            runs.append({"stage1": total, "total": total})  # tokens only: no stage 2, no decode
    out = _summary(runs, batch_size, L)
    out["tokens_timed"] = tokens.shape[1]
    return out


def _precisions(dtypes, device="cpu") -> list[str]:
    """The precisions asked for, each once: "auto" resolved first, since it may name one given too."""
    return list(dict.fromkeys(dtype_name(resolve_dtype(d, device)) for d in dtypes))


def _row(name, dtype, method, batch_size, t, ratio="", versus=""):
    span = f"{t['images_per_s']:.3g} [{t['images_per_s_min']:.3g}, {t['images_per_s_max']:.3g}]"
    stage2 = f"{t['stage2']:.3f}" if method == "ctf" else "–"
    decode = f"{t['decode']:.3f}" if t.get("decode") else "–"
    return (f"| {name} | {dtype} | {method} | {batch_size} | {span} | {t.get('tokens_per_s', 0):.1f} | "
            f"{t['stage1']:.3f} | {stage2} | {decode} | {t['total']:.3f} | {ratio} | {versus} |")


def run_bench(models: list[str], batch_sizes: list[int], repeats: int = 5, image_tokens: int = 256,
              num_coarse: int = 512, aux_preset: str = "Aux-L", decode: bool = True, cfg_scale: float = 2.0,
              device: str = "cpu", dtypes=("float32", "bfloat16"), json_path=None, llamagen: bool = False,
              warmup: int = 1, llamagen_steps: int | None = None, threads: int | str | None = None,
              methods=("baseline", "ctf")) -> list[dict]:
    """`ctfgen bench`: time both methods for every model, precision and batch size, printing a
    markdown table as it goes: images/s as the median [min, max] of `repeats` runs, stage 1's
    tokens/s, the median seconds of each stage, CTF's speed relative to the baseline at the same
    shape, batch and precision, and with `llamagen` the baseline's tokens/s relative to LlamaGen's
    sampler (float precisions only: LlamaGen has no int8; `llamagen_steps`: see `time_llamagen`).
    `threads`: None keeps torch's setting, an int sets it, "auto" gives each model what the ctfgen
    command would (`ctfgen.utils.threads.use_sampling_threads`: one for the shipped models). `methods`:
    which of "baseline" and "ctf" to time (LlamaGen's sampler runs beside the baseline's GPT either way)."""
    if llamagen and cfg_scale < 1.0:  # ctfgen guides at any scale but 1, LlamaGen above 1 only
        raise ConfigError(f"--llamagen needs --cfg-scale 1 or above, got {cfg_scale:g}: LlamaGen ignores scales "
                          "below 1 and samples without the unconditional half, half the rows the baseline runs")
    dtypes = _precisions(dtypes, device)
    results = []
    print(_machine_line(device) + f"  cfg: {cfg_scale}  repeats: {repeats} (+{warmup} warm-up)")
    print("| model | dtype | method | batch | img/s median [min, max] | stage-1 tok/s | stage 1 s | stage 2 s "
          "| decode s | total s | ctf/base | base/LlamaGen |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in models:
        with torch.no_grad():  # no autograd to build them; not inference_mode: their buffers stay ordinary tensors
            pipes = _pipelines(name, device, image_tokens, num_coarse, aux_preset, decode)
        if threads == "auto":
            use_sampling_threads(pipes["ctf"])
        elif threads is not None:
            torch.set_num_threads(int(threads))
        print(f"| {name}: {torch.get_num_threads()} thread(s) | | | | | | | | | | | |", flush=True)
        for dtype in dtypes:
            for batch_size in batch_sizes:
                row = dict(model=name, dtype=dtype, batch_size=batch_size, threads=torch.get_num_threads())
                reference = None
                if llamagen and not isinstance(resolve_dtype(dtype), Int8):
                    reference = time_llamagen(pipes["baseline"].gpt, batch_size, repeats, cfg_scale, device, dtype,
                                              llamagen_steps, warmup)
                    results.append({**row, "method": "llamagen", **reference})
                    print(_row(name, dtype, "llamagen", batch_size, reference), flush=True)
                base = None
                for method, pipe in pipes.items():
                    if method not in methods:
                        continue
                    t = time_pipeline(pipe, batch_size, repeats, cfg_scale, device, dtype, warmup)
                    results.append({**row, "method": method, **t})
                    ratio = versus = ""
                    if method == "baseline":
                        base = t
                        if reference is not None:
                            versus = f"{t['tokens_per_s'] / reference['tokens_per_s']:.2f}x"
                    elif base is not None:
                        ratio = f"{t['images_per_s'] / base['images_per_s']:.2f}"
                    print(_row(name, dtype, method, batch_size, t, ratio, versus), flush=True)
    if json_path:
        atomic_write_json(json_path, {"device": device, "threads": torch.get_num_threads(), "dtypes": dtypes,
                                      "cfg_scale": cfg_scale, "openmp_waiting": openmp_waiting(),
                                      "results": results})
    return results


def openmp_waiting(environ=os.environ) -> str:
    """How waiting OpenMP threads behave here, as the environment set it (see ctfgen.utils.threads)."""
    chosen = [f"{k}={environ[k]}" for k in WAITING_VARIABLES if k in environ]
    return " ".join(chosen) or "OpenMP's default"


def _machine_line(device) -> str:
    return (f"device: {device}  threads: {torch.get_num_threads()}  "
            f"waiting: {openmp_waiting()}  torch {torch.__version__}")


def _pipelines(name: str, device: str, image_tokens: int, num_coarse: int, aux_preset: str, decode: bool) -> dict:
    if name == "fashion-mnist":
        return {"baseline": pretrained("fashion-mnist-baseline", device), "ctf": pretrained("fashion-mnist", device)}
    base, ctf = paper_shape_pipelines(name, image_tokens, num_coarse, aux_preset, decode)
    return {"baseline": base.to(device).eval(), "ctf": ctf.to(device).eval()}


# --------------------------------------------------------------------------------------------
# Where a decode step's time goes


PARTS = {
    "linear": "linear layers of the blocks",
    "head": "output head",
    "attention": "attention over the KV cache (write + read)",
    "norms": "RMSNorm",
    "rope": "RoPE",
    "guidance": "guidance (combine the two halves)",
    "sampling": "sampling (softmax and draw)",
}


class _StopDecoding(Exception):
    pass


def random_gpt(preset: str = "GPT-B", vocab_size: int = 16384, image_tokens: int = 256, num_classes: int = 1000,
               device: str = "cpu") -> GPT:
    """A GPT of `preset` with random weights (and a random output head), in eval mode."""
    torch.manual_seed(0)
    with torch.no_grad():
        gpt = GPT(GPTConfig.from_preset(preset, vocab_size=vocab_size, image_tokens=image_tokens, num_classes=num_classes))
    return _random_head(gpt).to(device).eval()


def linear_flops_per_row(gpt) -> tuple[int, int]:
    """Multiply-add FLOPs per row of one forward step: (the blocks' linear layers, the output head)."""
    cfg = gpt.config
    hidden = gpt.layers[0].feed_forward.w1.out_features if len(gpt.layers) else 0
    blocks = 2 * cfg.n_layer * (cfg.dim * 3 * cfg.dim + cfg.dim * cfg.dim + 3 * cfg.dim * hidden)
    return blocks, 2 * cfg.dim * cfg.vocab_size


@contextlib.contextmanager
def _named_parts(head):
    """Wrap each part of the decode step in a torch.profiler scope named after PARTS, for as long
    as the context lasts (the library's functions are patched back afterwards)."""
    record = torch.profiler.record_function

    def scoped(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with record(name):
                return fn(*args, **kwargs)
        return wrapper

    def linear_scoped(fn):
        @functools.wraps(fn)
        def wrapper(self, *args, **kwargs):
            with record("head" if self is head else "linear"):
                return fn(self, *args, **kwargs)
        return wrapper

    patches = [(transformer.RMSNorm, "forward", scoped("norms", transformer.RMSNorm.forward)),
               (transformer, "apply_rotary_emb", scoped("rope", transformer.apply_rotary_emb)),
               (transformer, "cached_attention", scoped("attention", transformer.cached_attention)),
               (transformer.KVCache, "update", scoped("attention", transformer.KVCache.update)),
               (sampling, "cfg_combine", scoped("guidance", sampling.cfg_combine)),
               (sampling, "sample_from_logits", scoped("sampling", sampling.sample_from_logits))]
    linear_classes = [torch.nn.Linear]
    fbgemm = sys.modules.get("torch.ao.nn.quantized.dynamic.modules.linear")
    if fbgemm is not None:
        linear_classes.append(fbgemm.Linear)
    patches += [(cls, "forward", linear_scoped(cls.forward)) for cls in linear_classes]
    saved = [(obj, attr, obj.__dict__[attr]) for obj, attr, _ in patches]
    try:
        for obj, attr, new in patches:
            setattr(obj, attr, new)
        yield
    finally:
        for obj, attr, old in saved:
            setattr(obj, attr, old)


def _decode_window(model, labels, cfg_scale: float, window: tuple[int, int], profiler=None) -> float:
    """Run `generate` on `model` and return the seconds from decode step window[0] to window[1]
    (each step: forward, guidance, draw), under `profiler` if given; stops after the window."""
    lo, hi = window
    marks = {}
    forward_step = model.forward_step

    def step(tokens, input_pos):
        if input_pos == lo:
            if profiler is not None:
                profiler.__enter__()
            marks["start"] = time.perf_counter()
        elif input_pos == hi:
            marks["end"] = time.perf_counter()
            if profiler is not None:
                profiler.__exit__(None, None, None)
            raise _StopDecoding
        return forward_step(tokens, input_pos)

    previous = model.__dict__.get("forward_step")  # a wrapper of the caller's stays in place
    model.forward_step = step
    try:
        generate(model, labels, cfg_scale=cfg_scale, generator=0)
    except _StopDecoding:
        pass
    finally:
        if previous is None:
            del model.forward_step
        else:
            model.forward_step = previous
    return marks["end"] - marks["start"]


WARMUP_WINDOW = (1, 4)  # the decode steps both profiles run first, untimed
# a window ends when its last step is called, so both windows must end within the image's decode steps 1..L-1
DECODE_TOKENS = Option("image_tokens", WARMUP_WINDOW[1] + 1, integer=True,
                       meaning=f"--profile and --speedups warm up on decode steps {WARMUP_WINDOW[0]} to "
                               f"{WARMUP_WINDOW[1]}; 9 = 3x3 is the smallest square grid they take")


def _decode_setup(preset: str, vocab_size: int, image_tokens: int, batch_size: int, cfg_scale: float, device):
    """A random-weight GPT, the decode window both profiles time (the middle quarter of the image,
    whose average cache fill is the whole image's), the batch's labels and its rows with guidance."""
    DECODE_TOKENS.check(image_tokens, "--image-tokens")
    gpt = random_gpt(preset, vocab_size, image_tokens, device=device)
    window = (max(1, 3 * image_tokens // 8), max(2, 5 * image_tokens // 8))
    labels = torch.arange(batch_size, device=device) % gpt.config.num_classes
    return gpt, window, labels, 2 * batch_size if cfg_scale != 1.0 else batch_size


def profile_decode(preset: str = "GPT-B", batch_size: int = 8, cfg_scale: float = 2.0,
                   dtypes=("float32", "bfloat16"), image_tokens: int = 256, vocab_size: int = 16384,
                   device: str = "cpu", json_path=None) -> dict:
    """Profile `generate`'s decode steps for a random-weight GPT `preset` at `batch_size` with
    guidance, per precision, and print a markdown table of milliseconds per step by part.

    The profiled window is the middle quarter of the image (steps 3L/8 to 5L/8), whose average
    cache fill is the whole image's. Parts: PARTS, timed as torch.profiler scopes around the
    library's own functions; "other ops" are the aten ops outside them (embedding, residual adds,
    SwiGLU's silu and product, casts, the token concatenation); "Python and dispatch" is the rest
    of the wall time. The unprofiled step time is measured over the same window in its own run.
    """
    gpt, window, labels, rows = _decode_setup(preset, vocab_size, image_tokens, batch_size, cfg_scale, device)
    L, steps = image_tokens, window[1] - window[0]
    block_flops, head_flops = linear_flops_per_row(gpt)
    results = {}
    for dtype in _precisions(dtypes, device):
        model = cast_weights(gpt, dtype)
        with torch.inference_mode():
            _decode_window(model, labels, cfg_scale, WARMUP_WINDOW)  # warm-up: kernels, allocator
            plain = _decode_window(model, labels, cfg_scale, window)
            profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            with _named_parts(model.output):
                wall = _decode_window(model, labels, cfg_scale, window, profiler)
        parts = dict.fromkeys(PARTS, 0.0)
        other = 0.0
        for event in profiler.events():
            if event.name in parts:
                parts[event.name] += event.cpu_time_total
            elif event.cpu_parent is None and not event.name.startswith("["):
                other += event.cpu_time_total
        ms = {k: v / 1e3 / steps for k, v in parts.items()}  # µs in total -> ms per step
        ms["other"] = other / 1e3 / steps
        ms["python"] = max(0.0, wall * 1e3 / steps - sum(ms.values()))
        ms["profiled"] = wall * 1e3 / steps
        ms["step"] = plain * 1e3 / steps
        linear_s = (ms["linear"] + ms["head"]) / 1e3
        results[dtype] = {"ms_per_step": ms,
                          "linear_gflops": rows * (block_flops + head_flops) / linear_s / 1e9 if linear_s else 0.0,
                          "tokens_per_s": batch_size / (ms["step"] / 1e3)}
        if model is not gpt:
            drop_casts(gpt, dtype)  # free the copy
    print(f"{preset}, batch {batch_size}, guidance {cfg_scale}, {L} tokens, steps {window[0]}-{window[1] - 1} "
          f"profiled; {_machine_line(device)}")
    print(format_profile(results))
    if json_path:
        atomic_write_json(json_path, {"preset": preset, "batch_size": batch_size, "cfg_scale": cfg_scale,
                                      "image_tokens": L, "window": window, "threads": torch.get_num_threads(),
                                      "gflop_per_step": rows * (block_flops + head_flops) / 1e9, "results": results})
    return results


def decode_speedups(preset: str = "GPT-B", batch_size: int = 8, cfg_scale: float = 2.0,
                    dtypes=("float32", "bfloat16"), image_tokens: int = 256, vocab_size: int = 16384,
                    top_k: int = 2000, repeats: int = 20, device: str = "cpu", json_path=None) -> dict:
    """What each decode-path speed-up gives, each against what it replaced, in one run:
    - attention over the filled part of the cache, against the whole fixed-shape cache with the
      causal mask (the previous eager step, and what a compiled step still does): ms per step
      over `profile_decode`'s window, both through `generate`;
    - the KV cache in float32 on the CPU, against the cache in the weights' dtype (reduced
      precisions only), the same way;
    - RoPE on q and k in one call, against one call each (ms per step at the step's shape);
    - the top-k draw on the (B, k) top-k logits, against LlamaGen's filter and a draw over all V
      (ms per step at LlamaGen's default top-k 2000; the default top_k=0 draws over V either way);
    - guidance combined in place, against LlamaGen's expression (ms per step)."""
    gpt, window, labels, rows = _decode_setup(preset, vocab_size, image_tokens, batch_size, cfg_scale, device)
    L, steps = image_tokens, window[1] - window[0]
    cfg, head_dim = gpt.config, gpt.config.dim // gpt.config.n_head
    results = {}
    for dtype in _precisions(dtypes, device):
        model = cast_weights(gpt, dtype)
        r = results[dtype] = {}
        with torch.inference_mode():
            _decode_window(model, labels, cfg_scale, WARMUP_WINDOW)
            r["filled cache (as shipped)"] = _decode_window(model, labels, cfg_scale, window) * 1e3 / steps
            forward_step = model.forward_step
            model.forward_step = lambda tokens, pos: forward_step(tokens, torch.tensor([pos], device=device))
            try:
                r["whole cache, masked"] = _decode_window(model, labels, cfg_scale, window) * 1e3 / steps
            finally:
                del model.forward_step
            weights_dtype = model.tok_embeddings.weight.dtype
            if weights_dtype != kv_cache_dtype(weights_dtype, device):
                model.setup_caches = functools.partial(type(model).setup_caches, model, dtype=weights_dtype)
                try:
                    r[f"KV cache in {dtype_name(weights_dtype)}"] = _decode_window(model, labels, cfg_scale, window) * 1e3 / steps
                finally:
                    del model.setup_caches
            act = weights_dtype if weights_dtype in (torch.bfloat16, torch.float16) else torch.float32
            qkv = torch.randn(rows, 1, 3 * cfg.dim, dtype=act, device=device)
            freqs = model.freqs_cis[L // 2 : L // 2 + 1]
            both = qkv[..., : 2 * cfg.dim].view(rows, 1, 2 * cfg.n_head, head_dim)
            q, k = (t.view(rows, 1, cfg.n_head, head_dim) for t in qkv[..., : 2 * cfg.dim].split(cfg.dim, -1))
            per_layer = cfg.n_layer * 1e3
            r["RoPE, q and k in one call"] = _median_seconds(lambda: transformer.apply_rotary_emb(both, freqs), repeats) * per_layer
            r["RoPE, one call each"] = _median_seconds(lambda: (transformer.apply_rotary_emb(q, freqs),
                                                                transformer.apply_rotary_emb(k, freqs)), repeats) * per_layer
            logits = torch.randn(batch_size, vocab_size, device=device) * 3
            gen = torch.Generator(device=device).manual_seed(0)
            r[f"top-{top_k} draw on the top-k"] = _median_seconds(
                lambda: sample_from_logits(logits, top_k=top_k, generator=gen), repeats) * 1e3
            r[f"top-{top_k} draw, filter and draw over V"] = _median_seconds(
                lambda: sampling._draw(sampling.filter_logits(logits, top_k=top_k), gen), repeats) * 1e3
            both_halves = torch.randn(2 * batch_size, vocab_size, device=device)
            cond, uncond = both_halves.chunk(2)
            r["guidance in place"] = _median_seconds(lambda: cfg_combine(cond, uncond, cfg_scale), repeats) * 1e3
            r["guidance, LlamaGen's expression"] = _median_seconds(
                lambda: uncond + (cond - uncond) * cfg_scale, repeats) * 1e3
        if model is not gpt:
            drop_casts(gpt, dtype)
    keys = list(max(results.values(), key=len))  # a reduced precision has the extra KV-cache row
    print(f"{preset}, batch {batch_size}, guidance {cfg_scale}: ms per decode step, steps {window[0]}-{window[1] - 1} "
          f"(the whole step for the first rows; the part alone for the others); {_machine_line(device)}")
    print("| ms per decode step | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for key in keys:
        print(f"| {key} | " + " | ".join(f"{results[d][key]:.3f}" if key in results[d] else "–" for d in results) + " |")
    if json_path:
        atomic_write_json(json_path, {"preset": preset, "batch_size": batch_size, "cfg_scale": cfg_scale,
                                      "threads": torch.get_num_threads(), "results": results})
    return results


def format_profile(results: dict) -> str:
    """The markdown table of `profile_decode`: ms per decode step (share of the profiled step)."""
    names = list(results)
    lines = ["| ms per decode step | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]

    def line(label, key):
        cells = []
        for n in names:
            ms = results[n]["ms_per_step"]
            cells.append(f"{ms[key]:.1f} ({100 * ms[key] / ms['profiled']:.0f} %)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    lines.append("| whole step, no profiler | " + " | ".join(f"{results[n]['ms_per_step']['step']:.1f}" for n in names) + " |")
    lines.append("| whole step, profiled | " + " | ".join(f"{results[n]['ms_per_step']['profiled']:.1f}" for n in names) + " |")
    for key, label in PARTS.items():
        line(label, key)
    line("other ops (embedding, residuals, SwiGLU product, casts)", "other")
    line("Python and dispatch", "python")
    lines.append("| linear layers + head, GFLOP/s | " + " | ".join(f"{results[n]['linear_gflops']:.0f}" for n in names) + " |")
    lines.append("| tokens/s (no profiler) | " + " | ".join(f"{results[n]['tokens_per_s']:.0f}" for n in names) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# torch.compile of the decode step


def compile_speedup(models=("fashion-mnist", "GPT-B"), batch_sizes=(8,), dtypes=("float32",), cfg_scale: float = 2.0,
                    repeats: int = 5, device: str = "cpu", json_path=None) -> list[dict]:
    """Tokens/s of `generate` eager and with `compile=True` (the whole decode step compiled, the
    fixed-shape full-cache path), median [min, max] of `repeats` runs each; the first compiled
    call, compilation included, is reported apart. Models: "fashion-mnist" (the shipped
    baseline's GPT) or a GPT preset with random weights."""
    results = []
    print(f"torch.compile of the decode step; {_machine_line(device)}")
    print("| model | dtype | batch | eager tok/s | compiled tok/s | compiled/eager | first compiled call s |")
    print("|---|---|---|---|---|---|---|")
    for name in models:
        gpt = pretrained("fashion-mnist-baseline", device).gpt if name == "fashion-mnist" else random_gpt(name, device=device)
        for dtype in _precisions(dtypes, device):
            model = cast_weights(gpt, dtype)
            for batch_size in batch_sizes:
                labels = torch.arange(batch_size, device=device) % gpt.config.num_classes
                row = dict(model=name, dtype=dtype, batch_size=batch_size)

                def run(compiled, seed):
                    _sync(device)
                    t0 = time.perf_counter()
                    with torch.inference_mode():
                        generate(model, labels, cfg_scale=cfg_scale, generator=seed, compile=compiled)
                    _sync(device)
                    return time.perf_counter() - t0

                try:
                    first = run(True, 0)
                    compiled = [run(True, r) for r in range(1, repeats + 1)]
                except Exception as e:  # a scheme dynamo cannot trace: say so and go on
                    first, compiled = None, None
                    row["compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                model.__dict__.pop("_ctfgen_compiled_step", None)
                model.clear_caches()
                run(False, 0)  # warm-up
                eager = [run(False, r) for r in range(1, repeats + 1)]
                tokens = batch_size * gpt.config.image_tokens
                row["eager"] = _summary([{"total": t} for t in eager], batch_size, gpt.config.image_tokens)
                cells = [f"{tokens / statistics.median(eager):.1f} [{tokens / max(eager):.1f}, {tokens / min(eager):.1f}]"]
                if compiled:
                    row["compiled"] = _summary([{"total": t} for t in compiled], batch_size, gpt.config.image_tokens)
                    row["first_compiled_call_s"] = first
                    cells += [f"{tokens / statistics.median(compiled):.1f} [{tokens / max(compiled):.1f}, {tokens / min(compiled):.1f}]",
                              f"{statistics.median(eager) / statistics.median(compiled):.2f}x", f"{first:.1f}"]
                else:
                    cells += [row["compile_error"], "–", "–"]
                results.append(row)
                print(f"| {name} | {dtype} | {batch_size} | " + " | ".join(cells) + " |", flush=True)
            drop_casts(gpt)
    if json_path:
        atomic_write_json(json_path, {"threads": torch.get_num_threads(), "cfg_scale": cfg_scale, "results": results})
    return results


# --------------------------------------------------------------------------------------------
# This machine's matrix multiply


def _median_seconds(fn, repeats: int, min_seconds: float = 0.2) -> float:
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _block_linears(preset: str, fused_gate_up: bool = False) -> torch.nn.ModuleList:
    cfg = GPTConfig.from_preset(preset, vocab_size=16384, image_tokens=256)
    gpt = GPT(cfg)  # its own init: N(0, 0.02)
    layers = torch.nn.ModuleList()
    for block in gpt.layers:
        a, f = block.attention, block.feed_forward
        if fused_gate_up:
            w13 = torch.nn.Linear(cfg.dim, 2 * f.w1.out_features, bias=False)
            with torch.no_grad():
                w13.weight.copy_(torch.cat([f.w1.weight, f.w3.weight]))
            layers.extend([a.wqkv, a.wo, w13, f.w2])
        else:
            layers.extend([a.wqkv, a.wo, f.w1, f.w3, f.w2])
    return layers


def matmul_rates(dtypes=("float32", "bfloat16", "int8", "int8-weight", "int8-fbgemm"), rows=(16, 2048),
                 in_features: int = 768, out_features: int = 3072, repeats: int = 10, preset: str = "GPT-B",
                 json_path=None) -> dict:
    """GFLOP/s of nn.Linear per precision (cast by `cast_weights`, as sampling does): one
    `in_features` x `out_features` layer at each of `rows`, whose weight stays in cache, and
    the block linear layers of `preset` in turn at 16 rows (a decode step's batch 8 with guidance),
    whose weights (340 MB in float32 for GPT-B) come from memory as in a real step; also with w1
    and w3 fused into one layer, to see whether fusing the gate and up projections pays."""
    torch.manual_seed(0)
    single = torch.nn.Sequential(torch.nn.Linear(in_features, out_features, bias=False))
    blocks, fused = _block_linears(preset), _block_linears(preset, fused_gate_up=True)
    with torch.inference_mode():  # a fresh process is slow for its first fraction of a second: the
        # first precision timed read 29 GFLOP/s in float32 at 16 rows, 98 when timed last
        _median_seconds(lambda: single(torch.randn(16, in_features)), 1, min_seconds=1.0)
    results = {}
    for dtype in _precisions(dtypes):
        act = getattr(torch, dtype) if dtype in ("bfloat16", "float16") else torch.float32
        r = results[dtype] = {}
        with torch.inference_mode():
            layer = cast_weights(single, dtype)
            for n in rows:
                x = torch.randn(n, in_features, dtype=act)
                r[f"{in_features}x{out_features}, {n} rows"] = 2 * n * in_features * out_features / _median_seconds(
                    lambda: layer(x), repeats) / 1e9
            for label, stack in ((f"{preset} block linears in turn, 16 rows", blocks),
                                 ("same, w1 and w3 fused", fused)):
                layers = cast_weights(stack, dtype)
                inputs = {f: torch.randn(16, f, dtype=act) for f in {m.in_features for m in stack}}
                flops = sum(2 * 16 * m.in_features * m.out_features for m in stack)
                pairs = list(zip(layers, (inputs[m.in_features] for m in stack)))
                r[label] = flops / _median_seconds(lambda: [layer(x) for layer, x in pairs], max(3, repeats // 3)) / 1e9
            for m in (single, blocks, fused):
                drop_casts(m)
    keys = list(next(iter(results.values())))
    print(f"nn.Linear GFLOP/s, median of {repeats}+ calls; {_machine_line('cpu')}")
    print("| GFLOP/s | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for key in keys:
        print(f"| {key} | " + " | ".join(f"{results[d][key]:.0f}" for d in results) + " |")
    if json_path:
        atomic_write_json(json_path, {"threads": torch.get_num_threads(), "results": results})
    return results


# --------------------------------------------------------------------------------------------
# A busy machine

# (label, threads, environment): threads None = torch's default (one per core), "auto" =
# ctfgen.utils.threads.use_sampling_threads, what the ctfgen command does; the environment sets how
# waiting OpenMP threads behave ({}: OpenMP's default, 300000 spins in libgomp).
# (One thread under any waiting is not listed apart: a single thread never waits at a barrier.)
BUSY_SETTINGS = (
    ("torch default: a thread per core, OpenMP's default waiting", None, {}),
    ("a thread per core, passive waiting", None, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ("a thread per core, a short spin", None, {"GOMP_SPINCOUNT": SHORT_SPIN}),
    ("ctfgen's choice (the ctfgen command)", "auto", {"GOMP_SPINCOUNT": SHORT_SPIN}),
)


# The busy loop: one core's worth of pure spinning, which also ends when this process does (were it
# killed before it could stop the loop, the loop's parent changes).
_SPIN = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    pass\n"


def _busy_worker(spec: dict) -> dict:
    """Run in a fresh process (OpenMP reads its waiting settings when torch loads it): time one workload."""
    workload, threads = spec["workload"], spec["threads"]
    if workload == "fashion-mnist":
        model = pretrained("fashion-mnist")
    else:
        model = cast_weights(random_gpt(workload), spec["dtype"])
    if threads == "auto":
        use_sampling_threads(model)
    elif threads is not None:
        torch.set_num_threads(int(threads))
    times = []
    with torch.inference_mode():
        # `make demo`'s 16 sneakers, but in float32, as the published runs measured them: `make demo` samples
        # with --dtype auto, bf16 on CPUs with native bf16
        if workload == "fashion-mnist":
            for r in range(1 + spec["repeats"]):
                t0 = time.perf_counter()
                model.sample([7] * 16, generator=r, dtype="float32")
                times.append(time.perf_counter() - t0)
            times = times[1:]
        else:  # decode steps of batch 8 with guidance
            labels = torch.arange(8) % model.config.num_classes
            model.setup_caches(16)
            logits = model.prefill(torch.cat([labels, torch.full_like(labels, model.config.num_classes)]))
            token = torch.zeros(8, 1, dtype=torch.long)
            for k in range(1, 1 + spec["warmup_steps"] + spec["steps"]):
                t0 = time.perf_counter()
                logits = model.forward_step(torch.cat([token, token]), k)[:, -1]
                token = sample_from_logits(cfg_combine(*logits.chunk(2), 2.0), generator=k)[:, None]
                if k > spec["warmup_steps"]:
                    times.append(time.perf_counter() - t0)
            model.clear_caches()
    return {"seconds": statistics.median(times), "min": min(times), "max": max(times),
            "threads": torch.get_num_threads(), "waiting": openmp_waiting()}


def busy_machine(workloads=("fashion-mnist", "GPT-B"), settings=BUSY_SETTINGS, dtype: str = "bfloat16",
                 steps: int = 16, warmup_steps: int = 4, repeats: int = 3, timeout: float = 300.0,
                 json_path=None) -> list[dict]:
    """Each workload under each setting, on quiet cores and beside a busy loop (a Python process
    spinning, started and stopped here), each run in its own process. Workloads: "fashion-mnist"
    (`make demo`'s 16 images from the shipped CTF model, in float32 whatever `dtype`: `make demo` itself
    samples at --dtype auto; seconds per call) or a GPT preset (random weights in
    `dtype`, decode steps of batch 8 with guidance at the start of an image; ms per step)."""
    results = []
    for busy in (False, True):
        spinner = subprocess.Popen([sys.executable, "-c", _SPIN]) if busy else None
        try:
            if spinner is not None:
                time.sleep(1.0)  # let the scheduler settle it on a core
            for workload in workloads:
                for label, threads, waiting in settings:
                    spec = dict(workload=workload, threads=threads, dtype=dtype, steps=steps,
                                warmup_steps=warmup_steps, repeats=repeats)
                    env = {k: v for k, v in os.environ.items() if k not in (*WAITING_VARIABLES, "OMP_NUM_THREADS")}
                    env.update(waiting or {})
                    code = ("import json, sys; from ctfgen.app.bench import _busy_worker; "
                            "print(json.dumps(_busy_worker(json.loads(sys.argv[1]))))")
                    try:
                        done = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], env=env,
                                              capture_output=True, text=True, timeout=timeout)
                        out = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else \
                            {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
                    except subprocess.TimeoutExpired:
                        out = {"error": f"over {timeout:.0f} s"}
                    results.append({"workload": workload, "setting": label, "busy": busy, **out})
                    print(f"  {'busy ' if busy else 'quiet'} {workload}: {label}: {out}", flush=True)
        finally:
            if spinner is not None:
                spinner.terminate()
                spinner.wait()
    print(format_busy(results))
    if json_path:
        atomic_write_json(json_path, {"dtype": dtype, "steps": steps, "results": results})
    return results


def format_busy(results: list[dict]) -> str:
    lines = ["| workload | setting | threads (quiet / busy) | quiet | beside a busy core | slowdown |",
             "|---|---|---|---|---|---|"]

    def cell(r):
        if "error" in r:
            return r["error"]
        scale, unit = (1e3, "ms/step") if r["workload"] != "fashion-mnist" else (1.0, "s")
        return f"{r['seconds'] * scale:.3g} {unit}"

    for quiet in (r for r in results if not r["busy"]):
        busy = next((r for r in results if r["busy"] and r["workload"] == quiet["workload"]
                     and r["setting"] == quiet["setting"]), None)
        if busy is None:
            continue
        slowdown = f"{busy['seconds'] / quiet['seconds']:.1f}x" if "seconds" in quiet and "seconds" in busy else "–"
        lines.append(f"| {quiet['workload']} | {quiet['setting']} | {quiet.get('threads', '?')} / {busy.get('threads', '?')} "
                     f"| {cell(quiet)} | {cell(busy)} | {slowdown} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Sample quality per precision


def in_precision(pipeline, dtype):
    """A pipeline of the same parts with its models cast to `dtype` (`cast_weights`, cached), so
    that its `log_prob` scores in that precision."""
    if isinstance(pipeline, CTFPipeline):
        return CTFPipeline(cast_weights(pipeline.ar, dtype), cast_weights(pipeline.aux, dtype), pipeline.coarse_map,
                           pipeline.tokenizer, sampling_defaults=pipeline.sampling_defaults)
    return ARPipeline(cast_weights(pipeline.gpt, dtype), pipeline.tokenizer, sampling_defaults=pipeline.sampling_defaults)


def sampling_quality(models=("fashion-mnist", "fashion-mnist-baseline"), dtypes=("float32", "bfloat16", "int8"),
                     seeds=(0, 1, 2), per_class: int = 500, batch_size: int = 500, test_images: int | None = None,
                     sample_dtypes=None, json_path=None) -> list[dict]:
    """Per shipped model and precision: the Fréchet distance and class consistency of
    `per_class` samples of every class on the Fashion-MNIST judge (`evaluate_fmnist`) for each
    seed, and the held-out bits/token of Fashion-MNIST's test images (coded by the shipped
    tokenizer; `heldout_bits_per_token`; the first `test_images`, class-balanced, or all 10000),
    with its change from float32. Samples are drawn for `sample_dtypes` (default: every one of
    `dtypes`; `per_class=0`: none), the bits/token are scored for all `dtypes`."""
    sampled = {dtype_name(resolve_dtype(d)) for d in (dtypes if sample_dtypes is None else sample_dtypes)}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        codes = Path(tmp) / "test_codes"
        extract_dataset(pretrained_path("fashion-mnist") / "tokenizer", DataConfig(test_limit=test_images), "test", codes)
        for name in models:
            pipe = pretrained(name)
            for dtype in _precisions(dtypes):
                scored = in_precision(pipe, dtype)
                bits = heldout_bits_per_token(scored, codes)["bits_per_token"]
                draw = per_class > 0 and dtype in sampled
                if not draw or not seeds:  # held-out bits/token only
                    results.append({"model": name, "dtype": dtype, "seed": None, "bits_per_token": bits})
                    print(f"  {name} {dtype}: bits/token {bits:.4f}", flush=True)
                for seed in seeds if draw else ():
                    images, labels, seconds = sample_per_class(pipe, per_class, seed=seed, batch_size=batch_size,
                                                               sampling={"dtype": dtype})
                    metrics = evaluate_fmnist(images, labels)
                    results.append({"model": name, "dtype": dtype, "seed": seed, "images": len(images),
                                    "fd": metrics["fd"], "class_consistency": metrics["class_consistency"],
                                    "bits_per_token": bits, "seconds_per_image": seconds})
                    print(f"  {name} {dtype} seed {seed}: FD {metrics['fd']:.3f}  consistency "
                          f"{metrics['class_consistency']:.4f}  bits/token {bits:.4f}", flush=True)
    print(format_quality(results))
    if json_path:
        atomic_write_json(json_path, {"per_class": per_class, "seeds": list(seeds), "results": results})
    return results


def format_quality(results: list[dict]) -> str:
    lines = ["| model | dtype | FD, mean [min, max] over seeds | class consistency, mean [min, max] | bits/token | change from float32 |",
             "|---|---|---|---|---|---|"]
    groups = {}
    for r in results:
        groups.setdefault((r["model"], r["dtype"]), []).append(r)
    def spread(values, digits):
        return f"{statistics.mean(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]" if values else "–"

    for (model, dtype), rs in groups.items():
        fd = [r["fd"] for r in rs if r.get("fd") is not None]
        cc = [r["class_consistency"] for r in rs if r.get("class_consistency") is not None]
        ref = groups.get((model, "float32"))
        change = f"{rs[0]['bits_per_token'] - ref[0]['bits_per_token']:+.5f}" if ref else "–"
        lines.append(f"| {model} | {dtype} | {spread(fd, 3)} | {spread(cc, 4)} | {rs[0]['bits_per_token']:.4f} | {change} |")
    return "\n".join(lines)
