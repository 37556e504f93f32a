"""Throughput of `ctfgen.generate` (tokens/s) for a GPT preset, with and without guidance.

    python benchmarks/bench_generate.py --preset GPT-B --batch 8 --image-tokens 256 --cfg 1.0 2.0

Random weights (throughput does not depend on them, except that a zero head would make every
draw uniform). Tokens/s counts generated image tokens (batch x image_tokens / seconds); the
guided run also computes the unconditional half, so it does twice the model work per token.
"""

from __future__ import annotations

import argparse
import time

import torch

from ctfgen.models import GPT, GPTConfig
from ctfgen.sampling import generate


@torch.no_grad()
def warm(gpt, labels, scale, steps):
    batch = labels.shape[0] * (2 if scale != 1.0 else 1)
    gpt.setup_caches(batch)
    gpt.prefill(labels.repeat(batch // labels.shape[0]))
    token = torch.zeros(batch, 1, dtype=torch.long, device=labels.device)
    for k in range(1, min(steps, gpt.config.image_tokens) + 1):
        gpt.forward_step(token, k)
    gpt.clear_caches()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="GPT-B")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image-tokens", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--cfg", type=float, nargs="+", default=[1.0, 2.0], help="guidance scales to time")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="auto / float32 / bfloat16 / float16 (default: the weights', float32)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--warmup-steps", type=int, default=4)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    cfg = GPTConfig.from_preset(args.preset, vocab_size=args.vocab, image_tokens=args.image_tokens, num_classes=args.num_classes)
    gpt = GPT(cfg).to(args.device).eval()
    torch.nn.init.normal_(gpt.output.weight, std=0.02)
    labels = torch.randint(0, args.num_classes, (args.batch,), device=args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(f"{args.preset}: {sum(p.numel() for p in gpt.parameters()) / 1e6:.1f}M params, batch {args.batch}, "
          f"{args.image_tokens} tokens, device {args.device}, threads {torch.get_num_threads()}, "
          f"dtype {args.dtype or 'fp32'}, compile {args.compile}", flush=True)
    for scale in args.cfg:
        if args.compile:  # compile outside the timing
            generate(gpt, labels, cfg_scale=scale, generator=0, dtype=args.dtype, compile=True)
        else:  # a few cached steps warm up kernels and allocator
            warm(gpt, labels, scale, args.warmup_steps)
        times = []
        for r in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            out = generate(gpt, labels, cfg_scale=scale, temperature=1.0, generator=r, dtype=args.dtype, compile=args.compile)
            sync()
            times.append(time.perf_counter() - t0)
        best = min(times)
        n = out.numel()
        print(f"cfg_scale={scale}: {n} tokens in {best:.2f}s -> {n / best:.1f} tokens/s "
              f"({best / args.image_tokens * 1e3:.1f} ms per step)", flush=True)


if __name__ == "__main__":
    main()
