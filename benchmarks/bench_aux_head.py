"""The restricted auxiliary model's in-cluster head against the masked full softmax it replaces.

    OMP_NUM_THREADS=2 python benchmarks/bench_aux_head.py --preset Aux-mini --grid 7 --batch 64 --what train stage2
    OMP_NUM_THREADS=2 python benchmarks/bench_aux_head.py --preset Aux-L --grid 16 --batch 8 --what stage2

Times, for V = --vocab fine codes in K = --num-coarse clusters:
- train: one optimiser step of the aux stage (forward, loss, backward, AdamW), with the stage's own
  loss (`build_stage("aux")`, the in-cluster head) against the same model trained with today's loss,
  cross entropy over the (B, L, V) logits masked outside each cluster;
- stage2: `sample_fine` (one pass, sampling every position) against the masked full softmax pass;
- head: the stage-2 head alone (logits from given hidden states, then one draw per position), which
  isolates what the in-cluster head changes when the trunk dominates (the 343M model).
Random weights and random codes (speed does not depend on them). The coarse map is k-means on a
random 8-dim codebook (LlamaGen's VQ-16 codes are 8-dim), so cluster sizes vary as a fitted map's
do; --map random gives equal clusters, --largest-cluster N one cluster of N codes (a skewed map).
The two variants alternate, `--repeats` times after one warm-up; the median and range are printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from ctfgen.clustering import CoarseMap
from ctfgen.data.codes import write_codes
from ctfgen.models import AuxConfig, AuxModel
from ctfgen.sampling import sample_fine, sample_from_logits
from ctfgen.train.stages import build_stage


def coarse_map(vocab: int, num_coarse: int, method: str, largest: int = 0) -> CoarseMap:
    if largest:  # one cluster of `largest` codes, the others share the rest evenly
        rest = torch.arange(vocab - largest) % (num_coarse - 1) + 1
        f2c = torch.cat([torch.zeros(largest, dtype=torch.long), rest])
        return CoarseMap(f2c, num_coarse, codebook_fingerprint=f"synthetic-{vocab}", method="random")
    book = torch.randn(vocab, 8, generator=torch.Generator().manual_seed(0))
    return CoarseMap.fit(book, num_coarse, method=method, seed=0, n_init=1)


def masked_full_loss(model, coarse, x, y):
    """The aux loss before the in-cluster head: cross entropy over all V masked logits."""
    logits = model(coarse, y)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x.reshape(-1))


@torch.no_grad()
def masked_full_stage2(model, coarse, labels, generator):
    """Stage 2 before the in-cluster head: masked (B, L, V) logits, then one draw per position."""
    return sample_from_logits(model(coarse, labels), 1.0, 0, 1.0, generator)


def summary(ts: list[float]) -> dict:
    return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "n": len(ts)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="Aux-mini")
    ap.add_argument("--grid", type=int, default=7)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--num-coarse", type=int, default=512)
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--map", default="kmeans", choices=["kmeans", "random"])
    ap.add_argument("--largest-cluster", type=int, default=0,
                    help="instead of --map: one cluster of this many codes, the rest even (a skewed map)")
    ap.add_argument("--max-table-blowup", type=float, default=None,
                    help="override the K*M/V above which the in-cluster head uses the full logits")
    ap.add_argument("--what", nargs="+", default=["train", "stage2"], choices=["train", "stage2", "head"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    if args.max_table_blowup is not None:
        import ctfgen.models.transformer as T

        T._MAX_TABLE_BLOWUP = args.max_table_blowup
    L = args.grid * args.grid
    cmap = coarse_map(args.vocab, args.num_coarse, args.map, args.largest_cluster)
    if args.largest_cluster:
        args.map = f"skewed-{args.largest_cluster}"
    sizes = cmap.sizes
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, args.vocab, (args.batch, L), generator=g)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=g)
    coarse = cmap(x)
    result = {"preset": args.preset, "grid": args.grid, "batch": args.batch, "vocab": args.vocab,
              "num_coarse": args.num_coarse, "map": args.map, "cluster_size_max": int(sizes.max()),
              "cluster_size_mean": float(sizes.double().mean()), "threads": torch.get_num_threads()}

    with tempfile.TemporaryDirectory() as tmp:
        header = {"tokenizer_fingerprint": cmap.codebook_fingerprint, "grid_size": args.grid, "augment": "none",
                  "dataset": "synthetic", "num_classes": args.num_classes, "codebook_size": args.vocab}
        codes = write_codes(f"{tmp}/codes", x[:, None], y, header)
        torch.manual_seed(0)
        stage = build_stage("aux", codes, cmap, preset=args.preset, num_classes=args.num_classes)
    model = stage.model
    torch.nn.init.normal_(model.output.weight, std=0.02)  # a zero head makes every draw uniform
    n_params = sum(p.numel() for p in model.parameters())
    result["params_M"] = n_params / 1e6
    print(f"{args.preset} ({n_params / 1e6:.1f}M params), {args.grid}x{args.grid} grid, batch {args.batch}, "
          f"V={args.vocab}, K={args.num_coarse} ({args.map} map, cluster sizes {int(sizes.min())}..{int(sizes.max())}, "
          f"table width {model.cluster_table().members.shape[1]}), {torch.get_num_threads()} threads", flush=True)

    if "train" in args.what:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        variants = {"in_cluster": lambda: stage.loss_fn(model, (x, y)),
                    "masked_full": lambda: masked_full_loss(model, coarse, x, y)}
        times = {k: [] for k in variants}
        model.train()
        for r in range(args.repeats + 1):
            for name, loss_of in variants.items():
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss_of().backward()
                opt.step()
                if r:
                    times[name].append(time.perf_counter() - t0)
        result["train"] = {k: summary(v) for k, v in times.items()}
        for k, v in result["train"].items():
            print(f"train step  {k:12s} median {v['median_s'] * 1e3:8.1f} ms  range "
                  f"{v['min_s'] * 1e3:.1f}..{v['max_s'] * 1e3:.1f} ms", flush=True)

    if "stage2" in args.what:
        model.eval()
        variants = {"in_cluster": lambda gen: sample_fine(model, coarse, y, generator=gen),
                    "masked_full": lambda gen: masked_full_stage2(model, coarse, y, gen)}
        times = {k: [] for k in variants}
        with torch.inference_mode():
            for r in range(args.repeats + 1):
                for name, run in variants.items():
                    gen = torch.Generator().manual_seed(r)
                    t0 = time.perf_counter()
                    fine = run(gen)
                    if r:
                        times[name].append(time.perf_counter() - t0)
                    if not torch.equal(cmap(fine), coarse):
                        raise AssertionError(f"{name}: a sampled fine token left its cluster")
        result["stage2"] = {k: summary(v) for k, v in times.items()}
        for k, v in result["stage2"].items():
            print(f"stage-2     {k:12s} median {v['median_s'] * 1e3:8.1f} ms  range "
                  f"{v['min_s'] * 1e3:.1f}..{v['max_s'] * 1e3:.1f} ms", flush=True)

    if "head" in args.what:
        model.eval()
        table = model.cluster_table()
        h = torch.randn(args.batch, L, model.config.dim, generator=g)

        def in_cluster(gen):
            logits = model._in_cluster_logits(h, coarse, table).masked_fill(~table.valid[coarse], float("-inf"))
            return table.members[coarse, sample_from_logits(logits, 1.0, 0, 1.0, gen)]

        def masked_full(gen):
            logits = model.output(h).float().masked_fill(~model.cluster_mask(coarse), float("-inf"))
            return sample_from_logits(logits, 1.0, 0, 1.0, gen)

        times = {"in_cluster": [], "masked_full": []}
        with torch.inference_mode():
            for r in range(args.repeats + 1):
                for name, run in (("in_cluster", in_cluster), ("masked_full", masked_full)):
                    t0 = time.perf_counter()
                    run(torch.Generator().manual_seed(r))
                    if r:
                        times[name].append(time.perf_counter() - t0)
        result["head"] = {k: summary(v) for k, v in times.items()}
        for k, v in result["head"].items():
            print(f"head+draw   {k:12s} median {v['median_s'] * 1e3:8.1f} ms  range "
                  f"{v['min_s'] * 1e3:.1f}..{v['max_s'] * 1e3:.1f} ms", flush=True)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
