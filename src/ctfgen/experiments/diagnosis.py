"""Which stage of CTF is the weak one? Stage-wise diagnosis against the same-size baseline.

Two kinds of evidence (issue 9, docs/results.md):

* **Teacher-forced coarse prediction.** Stage 1 predicts the next coarse label from the coarse history
  alone. The baseline predicts the next *fine* token from the fine history; summing its distribution
  within each cluster gives a prediction of the same coarse label from richer history. Comparing the
  two (bits per coarse token, top-1 accuracy), overall and at the first position (where both see only
  the class), separates "coarse history carries less information" from "stage 1 is a worse model":

      >>> coarse_prediction(ctf.ar, base.gpt, ctf.coarse_map, tokens, labels)
      {"stage1": {"bits_per_token": 2.77, "top1": 0.42, ...}, "baseline_cluster_summed": {...}, ...}

* **Decoded stage-wise sample sets**, each scored like any sample set (Fréchet distance etc.):
  the tokenizer's reconstructions (the floor), real coarse sequences through the auxiliary model
  (isolates stage 2), real coarse sequences decoded through each cluster's most frequent member (what
  that decoding costs by itself), stage-1 samples decoded the same way (isolates stage 1, against the
  previous set), the baseline's samples through the auxiliary model, and the two methods' own samples.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ctfgen.clustering import CoarseMap
from ctfgen.sampling import generate, sample_fine
from ctfgen.utils.errors import ConfigError, MismatchError
from ctfgen.utils.options import tokens_below

__all__ = ["coarse_prediction", "most_frequent_members", "stagewise_sets", "STAGEWISE_SETS"]


def _per_position(log_p: torch.Tensor, hit: torch.Tensor) -> dict:
    """log_p, hit: (N, L) -> bits per token overall and at the first position, top-1 accuracy."""
    bits = -log_p.double() / math.log(2)
    return {"bits_per_token": float(bits.mean()), "top1": float(hit.double().mean()),
            "first_position_bits": float(bits[:, 0].mean()), "first_position_top1": float(hit[:, 0].double().mean()),
            "bits_by_position": bits.mean(0).tolist()}


@torch.no_grad()
def coarse_prediction(stage1, baseline, coarse_map: CoarseMap, tokens, labels, batch_size: int = 100) -> dict:
    """Teacher-forced next-coarse-label prediction of stage 1 vs the baseline's cluster-summed distribution.

    tokens: (N, L) fine tokens of real images; labels: (N,) their classes. Both models are scored in
    eval mode (no dropout, no class dropout), in float32. Returns {"stage1", "baseline_cluster_summed"}
    each with bits_per_token / top1 (over all positions), the same at the first position, and
    bits_by_position; plus "gap_bits" = stage 1 minus baseline (positive: the baseline's coarse
    sequences are the likelier ones), and "images".
    """
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    labels = torch.as_tensor(labels, dtype=torch.long)
    if tokens.dim() != 2 or labels.shape != (tokens.shape[0],):
        raise MismatchError(f"tokens must be (N, L) and labels (N,), got {tuple(tokens.shape)} and {tuple(labels.shape)}")
    if stage1.config.vocab_size != coarse_map.num_coarse or baseline.config.vocab_size != coarse_map.vocab_size:
        raise MismatchError(
            f"stage 1 predicts {stage1.config.vocab_size} labels and the baseline {baseline.config.vocab_size} tokens, "
            f"but the coarse map maps {coarse_map.vocab_size} tokens to {coarse_map.num_coarse} labels: pass the "
            "stage 1, baseline and coarse map of one run"
        )
    f2c = coarse_map.fine_to_coarse
    out = {"stage1": ([], []), "baseline_cluster_summed": ([], [])}
    was = stage1.training, baseline.training
    stage1.eval(), baseline.eval()
    try:
        for s in range(0, len(tokens), batch_size):
            fine, y = tokens[s:s + batch_size], labels[s:s + batch_size]
            device = stage1.tok_embeddings.weight.device
            coarse = f2c[fine].to(device)
            lp1 = F.log_softmax(stage1(coarse[:, :-1], y.to(device)).float(), dim=-1)
            out["stage1"][0].append(lp1.gather(-1, coarse[..., None]).squeeze(-1).cpu())
            out["stage1"][1].append((lp1.argmax(-1) == coarse).cpu())
            device = baseline.tok_embeddings.weight.device
            p_fine = F.softmax(baseline(fine[:, :-1].to(device), y.to(device)).float(), dim=-1)
            p_coarse = torch.zeros(*p_fine.shape[:2], coarse_map.num_coarse, device=device)
            p_coarse.index_add_(-1, f2c.to(device), p_fine)
            lp0 = p_coarse.clamp_min(torch.finfo(torch.float32).tiny).log()
            coarse = coarse.to(device)
            out["baseline_cluster_summed"][0].append(lp0.gather(-1, coarse[..., None]).squeeze(-1).cpu())
            out["baseline_cluster_summed"][1].append((lp0.argmax(-1) == coarse).cpu())
    finally:
        stage1.train(was[0]), baseline.train(was[1])
    result = {k: _per_position(torch.cat(lp), torch.cat(hit)) for k, (lp, hit) in out.items()}
    result["gap_bits"] = result["stage1"]["bits_per_token"] - result["baseline_cluster_summed"]["bits_per_token"]
    result["images"] = int(len(tokens))
    return result


def most_frequent_members(coarse_map: CoarseMap, tokens) -> torch.Tensor:
    """(K,) int64: each cluster's most frequent member in `tokens` (any shape of fine tokens, e.g. the
    training codes). Ties go to the lowest token id; a cluster none of whose members occurs takes its
    lowest member, so every label still decodes."""
    # a token >= V would lengthen the counts (a lexsort shape error below), a negative one is bincount's RuntimeError
    tokens = tokens_below(tokens, coarse_map.vocab_size, hint="are these tokens from another tokenizer?")
    counts = torch.bincount(tokens.reshape(-1), minlength=coarse_map.vocab_size)
    f2c = coarse_map.fine_to_coarse
    # Sort by (cluster, -count, id): the first entry of each cluster is its representative.
    order = np.lexsort((np.arange(coarse_map.vocab_size), -counts.numpy(), f2c.numpy()))
    first = np.ones(len(order), dtype=bool)
    first[1:] = f2c.numpy()[order][1:] != f2c.numpy()[order][:-1]
    return torch.from_numpy(order[first]).long()


STAGEWISE_SETS = ("reconstruction", "real_coarse_aux", "real_coarse_representative", "stage1_representative", "ctf",
                  "baseline", "baseline_coarse_aux")


@torch.no_grad()
def stagewise_sets(ctf, baseline, tokens, labels, representatives: torch.Tensor, batch_size: int = 250,
                   seed: int = 0, ctf_sampling: dict | None = None, baseline_sampling: dict | None = None,
                   sets=STAGEWISE_SETS):
    """Yield (name, images (B,C,H,W) in [-1,1], labels) batches of each stage-wise sample set.

    tokens/labels: real images' fine tokens and classes; the sampled sets are drawn for the same
    labels, so every set has the same class balance. Score the sets against images other than
    these (the real-code sets would otherwise be compared with their own sources). `representatives`
    (K,) decodes coarse labels without stage 2 (see `most_frequent_members`). Sampling options default to each
    pipeline's own defaults; stage 2 always uses `ctf`'s stage-2 options.
    """
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    labels = torch.as_tensor(labels, dtype=torch.long)
    unknown = set(sets) - set(STAGEWISE_SETS)
    if unknown:
        raise ConfigError(f"unknown stage-wise sets {sorted(unknown)}; choose from {STAGEWISE_SETS}")
    ctf_o = ctf.resolve_sampling(ctf_sampling or {})
    fine_o = dict(temperature=ctf_o["temperature_fine"], top_k=ctf_o["top_k_fine"], cfg_scale=ctf_o["cfg_scale_fine"])
    cmap = ctf.coarse_map
    for name in sets:
        for i, s in enumerate(range(0, len(tokens), batch_size)):
            fine, y = tokens[s:s + batch_size], labels[s:s + batch_size]
            gen = torch.Generator(device=ctf.device).manual_seed(seed * 1_000_003 + i)
            if name == "reconstruction":
                out = fine
            elif name == "real_coarse_aux":
                out = sample_fine(ctf.aux, cmap(fine).to(ctf.device), y.to(ctf.device), generator=gen, **fine_o)
            elif name == "real_coarse_representative":
                out = representatives[cmap(fine)]
            elif name == "stage1_representative":
                coarse = generate(ctf.ar, y.to(ctf.device), cfg_scale=ctf_o["cfg_scale"], temperature=ctf_o["temperature"],
                                  top_k=ctf_o["top_k"], top_p=ctf_o["top_p"], cfg_steps=ctf_o["cfg_steps"], generator=gen)
                out = representatives.to(coarse.device)[coarse]
            elif name == "ctf":
                out = ctf.sample_tokens(y, generator=gen, **(ctf_sampling or {}))
            elif name == "baseline":
                out = baseline.sample_tokens(y, generator=gen, **(baseline_sampling or {}))
            else:  # baseline_coarse_aux
                base = baseline.sample_tokens(y, generator=gen, **(baseline_sampling or {}))
                out = sample_fine(ctf.aux, cmap(base.cpu()).to(ctf.device), y.to(ctf.device), generator=gen, **fine_o)
            yield name, ctf.decode(out.to(ctf.device)), y
