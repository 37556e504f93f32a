"""Timing the baseline and CTF, same stage-1 size, same machine, one run.

Reports images/s and the time of each stage (stage 1, stage 2, decode) per batch size, for the
shipped Fashion-MNIST models and for the paper's shapes (GPT-B/L stage 1, a GPT-L-sized auxiliary
model, VQ-16 at 256x256) with random weights: speed does not depend on what the weights are.
"""

from __future__ import annotations

import time

import torch

from ctfgen.clustering import CoarseMap
from ctfgen.fileio import atomic_write_json
from ctfgen.models.transformer import GPT, AuxConfig, AuxModel, GPTConfig
from ctfgen.pipeline import ARPipeline, CTFPipeline
from ctfgen.precision import dtype_name, resolve_dtype
from ctfgen.shipped import pretrained
from ctfgen.tokenizer.vq import VQConfig, VQModel


def paper_shape_pipelines(preset: str, image_tokens: int, num_coarse: int, aux_preset: str, decode: bool):
    """Random-weight baseline and CTF pipelines with the paper's ImageNet shapes."""
    torch.manual_seed(0)
    tokenizer = VQModel(VQConfig()) if decode else None
    codebook = tokenizer.quantize.embedding.weight if decode else torch.randn(16384, 8)
    coarse_map = CoarseMap.fit(codebook, num_coarse, method="random", seed=0)
    fp = dict(codebook_fingerprint=coarse_map.codebook_fingerprint, coarse_map_fingerprint=coarse_map.fingerprint)
    baseline = GPT(GPTConfig.from_preset(preset, vocab_size=16384, image_tokens=image_tokens, num_classes=1000))
    stage1 = GPT(GPTConfig.from_preset(preset, vocab_size=num_coarse, image_tokens=image_tokens, num_classes=1000, **fp))
    aux = AuxModel(AuxConfig.from_preset(aux_preset, vocab_size=16384, num_coarse=num_coarse,
                                         image_tokens=image_tokens, num_classes=1000, **fp), coarse_map)
    return ARPipeline(baseline, tokenizer), CTFPipeline(stage1, aux, coarse_map, tokenizer)


def time_pipeline(pipeline, batch_size: int, repeats: int, cfg_scale: float, device: str, dtype=None) -> dict:
    labels = torch.arange(batch_size, device=device) % pipeline.num_classes
    runs = []
    for r in range(repeats + 1):  # the first run warms up caches and allocators
        generator = torch.Generator(device=device).manual_seed(r)
        t0 = time.perf_counter()
        with torch.inference_mode():
            # Without a tokenizer (--no-decode) only the two token stages are timed.
            sample = pipeline.sample if pipeline.tokenizer is not None else pipeline.sample_tokens
            sample(labels, cfg_scale=cfg_scale, generator=generator, dtype=dtype)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        total = time.perf_counter() - t0
        if r > 0:
            runs.append({**pipeline.last_timings, "total": total})
    mean = {k: sum(run.get(k, 0.0) for run in runs) / len(runs) for k in runs[0]}
    mean["images_per_s"] = batch_size / mean["total"]
    return mean


def run_bench(models: list[str], batch_sizes: list[int], repeats: int = 2, image_tokens: int = 256,
              num_coarse: int = 512, aux_preset: str = "Aux-L", decode: bool = True, cfg_scale: float = 2.0,
              device: str = "cpu", dtypes=("float32", "bfloat16"), json_path=None) -> list[dict]:
    """`ctfgen bench`: time both methods for every model, precision and batch size, printing a table
    as it goes (with CTF's speed relative to the baseline at the same shape, batch and precision)."""
    dtypes = [dtype_name(resolve_dtype(d, device)) for d in dict.fromkeys(dtypes)]
    results = []
    print(f"device: {device}  threads: {torch.get_num_threads()}  dtypes: {' '.join(dtypes)}  cfg: {cfg_scale}")
    print(f"{'model':<16}{'dtype':<10}{'method':<10}{'batch':>6}{'img/s':>10}{'stage1 s':>10}{'stage2 s':>10}"
          f"{'decode s':>10}{'total s':>10}{'ctf/base':>10}")
    for name in models:
        with torch.no_grad():  # no autograd to build them; not inference_mode: their buffers stay ordinary tensors
            pipes = _pipelines(name, device, image_tokens, num_coarse, aux_preset, decode)
        for dtype in dtypes:
            for batch_size in batch_sizes:
                for method, pipe in pipes.items():
                    t = time_pipeline(pipe, batch_size, repeats, cfg_scale, device, dtype)
                    results.append({"model": name, "dtype": dtype, "method": method, "batch_size": batch_size, **t})
                    base = next((r for r in results if r["method"] == "baseline" and r["model"] == name
                                 and r["dtype"] == dtype and r["batch_size"] == batch_size), None)
                    ratio = f"{t['images_per_s'] / base['images_per_s']:>10.2f}" if method == "ctf" and base else ""
                    print(f"{name:<16}{dtype:<10}{method:<10}{batch_size:>6}{t['images_per_s']:>10.2f}"
                          f"{t.get('stage1', 0):>10.3f}{_seconds(t.get('stage2'))}{t.get('decode', 0):>10.3f}"
                          f"{t['total']:>10.3f}{ratio}", flush=True)
    if json_path:
        atomic_write_json(json_path, {"device": device, "threads": torch.get_num_threads(), "dtypes": dtypes,
                                      "cfg_scale": cfg_scale, "results": results})
    return results


def _seconds(value) -> str:
    """A table cell; "–" for a stage the method does not have (the baseline's stage 2), not 0."""
    return f"{'–':>10}" if value is None else f"{value:>10.3f}"


def _pipelines(name: str, device: str, image_tokens: int, num_coarse: int, aux_preset: str, decode: bool) -> dict:
    if name == "fashion-mnist":
        return {"baseline": pretrained("fashion-mnist-baseline", device), "ctf": pretrained("fashion-mnist", device)}
    base, ctf = paper_shape_pipelines(name, image_tokens, num_coarse, aux_preset, decode)
    return {"baseline": base.to(device).eval(), "ctf": ctf.to(device).eval()}
