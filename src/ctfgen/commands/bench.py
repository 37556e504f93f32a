"""`ctfgen bench`: the baseline and CTF, same stage-1 size, same machine, one run.

Reports images/s and the time of each stage (stage 1, stage 2, decode) per batch size, for the
shipped Fashion-MNIST models and for the paper's shapes (GPT-B/L stage 1, a GPT-L-sized auxiliary
model, VQ-16 at 256x256) with random weights: speed does not depend on what the weights are.
"""

from __future__ import annotations

import argparse
import json
import time


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=["fashion-mnist", "GPT-B"],
                        help="fashion-mnist (shipped models) and/or paper shapes GPT-B, GPT-L, GPT-XL (random weights)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per setting (after one warm-up)")
    parser.add_argument("--image-tokens", type=int, default=256, help="grid of the paper shapes (256 = 16x16)")
    parser.add_argument("--num-coarse", type=int, default=512)
    parser.add_argument("--aux-preset", default="Aux-L", help="the paper's main auxiliary model is 343M (GPT-L size)")
    parser.add_argument("--no-decode", action="store_true", help="skip the tokenizer decode for the paper shapes")
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    from ctfgen.precision import DTYPE_CHOICES

    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=DTYPE_CHOICES,
                        help="precisions to time, each in turn (default: %(default)s)")
    parser.add_argument("--json", default=None, help="also write the results here")


def paper_shape_pipelines(preset: str, image_tokens: int, num_coarse: int, aux_preset: str, decode: bool):
    """Random-weight baseline and CTF pipelines with the paper's ImageNet shapes."""
    import torch

    from ctfgen.clustering import CoarseMap
    from ctfgen.models.transformer import GPT, AuxConfig, AuxModel, GPTConfig
    from ctfgen.pipeline import ARPipeline, CTFPipeline
    from ctfgen.tokenizer.vq import VQConfig, VQModel

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
    import torch

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


def run(args: argparse.Namespace) -> int:
    import torch

    from ctfgen.precision import dtype_name, resolve_dtype

    dtypes = [dtype_name(resolve_dtype(d, args.device)) for d in dict.fromkeys(args.dtype)]
    results = []
    print(f"device: {args.device}  threads: {torch.get_num_threads()}  dtypes: {' '.join(dtypes)}  cfg: {args.cfg_scale}")
    header = (f"{'model':<16}{'dtype':<10}{'method':<10}{'batch':>6}{'img/s':>10}{'stage1 s':>10}{'stage2 s':>10}"
              f"{'decode s':>10}{'total s':>10}{'ctf/base':>10}")
    print(header)
    for name in args.models:
        with torch.inference_mode():  # building random-weight models needs no autograd either
            pipes = _pipelines(name, args)
        for dtype in dtypes:
            for batch_size in args.batch_sizes:
                for method, pipe in pipes.items():
                    t = time_pipeline(pipe, batch_size, args.repeats, args.cfg_scale, args.device, dtype)
                    results.append({"model": name, "dtype": dtype, "method": method, "batch_size": batch_size, **t})
                    # CTF's speed relative to the baseline at the same shape, batch and precision
                    base = next((r for r in results if r["method"] == "baseline" and r["model"] == name
                                 and r["dtype"] == dtype and r["batch_size"] == batch_size), None)
                    ratio = f"{t['images_per_s'] / base['images_per_s']:>10.2f}" if method == "ctf" and base else ""
                    print(f"{name:<16}{dtype:<10}{method:<10}{batch_size:>6}{t['images_per_s']:>10.2f}"
                          f"{t.get('stage1', 0):>10.3f}{t.get('stage2', 0):>10.3f}{t.get('decode', 0):>10.3f}"
                          f"{t['total']:>10.3f}{ratio}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "threads": torch.get_num_threads(), "dtypes": dtypes,
                       "cfg_scale": args.cfg_scale, "results": results}, f, indent=2)
    return 0


def _pipelines(name: str, args: argparse.Namespace) -> dict:
    from ctfgen.shipped import pretrained

    if name == "fashion-mnist":
        return {"baseline": pretrained("fashion-mnist-baseline", args.device), "ctf": pretrained("fashion-mnist", args.device)}
    base, ctf = paper_shape_pipelines(name, args.image_tokens, args.num_coarse, args.aux_preset, not args.no_decode)
    return {"baseline": base.to(args.device).eval(), "ctf": ctf.to(args.device).eval()}

