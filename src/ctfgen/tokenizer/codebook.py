"""Keeping a VQ codebook in use: k-means initialisation, dead-code restarts, and whole-split usage.

A large codebook helps CTF only if it is used: with a few hundred live codes out of thousands, the
fine vocabulary the models see is small and coarse-to-fine has nothing to simplify. Two standard
remedies (SoundStream / vector-quantize-pytorch's `kmeans_init`, Jukebox's and VQGAN-LC's code
restarts) and one measurement live here; LlamaGen's entropy loss is `VQConfig.entropy_loss_ratio`.

    >>> kmeans_init_codebook(vq, train_images, num_images=4096, seed=0)   # before the first step
    >>> restarter = DeadCodeRestarter(vq.quantize, unused_steps=200, last_step=2400, seed=0)
    >>> ...; opt.step(); restarted = restarter.step(step)                # after every optimiser step
    >>> evaluate_tokenizer(vq, test_images)                  # {"usage": 0.93, "perplexity": 3500.0, "psnr": 24.1, ...}

Restarts stop at `last_step` (by default 80 % of training): a code restarted in the last steps sits on
a recent encoder output and is all but sure to count as used, so usage measured after a late
restart flatters the codebook. Code perplexity, exp(entropy of the code frequencies over a split),
counts how evenly the codes are used, which a handful of late restarts cannot inflate.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from ctfgen.utils import distributed as D
from ctfgen.utils.errors import ConfigError, MismatchError
from ctfgen.utils.images import psnr, ssim

__all__ = ["kmeans_init_codebook", "DeadCodeRestarter", "evaluate_tokenizer", "code_perplexity"]


def _images(batch):
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def _quantizer_inputs(quantize, latent: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) latents -> (B*h*w, D) float32 vectors in the space the quantizer searches."""
    z = latent.detach().float().permute(0, 2, 3, 1).reshape(-1, latent.shape[1])
    return F.normalize(z, p=2, dim=-1) if quantize.l2_norm else z


@torch.no_grad()
def kmeans_init_codebook(vq, dataset, num_images: int = 4096, seed: int = 0, batch_size: int = 256,
                         max_iter: int = 20, device=None) -> dict:
    """Set `vq`'s codewords to k-means centroids of its encoder outputs on `num_images` images.

    The encoder is the one about to be trained, so the codewords start where the latents are rather
    than in a tiny ball that only a few latents ever reach (LlamaGen's uniform(-1/V, 1/V) start).
    Under torchrun every rank computes the same centroids from the same images (the same seed).
    Returns {"vectors", "seconds", "inertia"} for the log.
    """
    from sklearn.cluster import KMeans

    quantize = vq.quantize
    n_codes = quantize.n_e
    device = device or quantize.embedding.weight.device
    g = torch.Generator().manual_seed(seed)
    take = torch.randperm(len(dataset), generator=g)[:num_images].tolist()
    loader = DataLoader(Subset(dataset, take), batch_size=batch_size, shuffle=False)
    was_training = vq.training
    vq.eval()
    vectors = torch.cat([_quantizer_inputs(quantize, vq.encode_latent(_images(b).to(device).float())).cpu()
                         for b in loader])
    vq.train(was_training)
    if vectors.shape[0] < n_codes:
        raise ConfigError(
            f"k-means codebook initialisation needs at least {n_codes} encoder outputs (one per code), but "
            f"{len(take)} images give {vectors.shape[0]}: raise codebook_init_images (or use codebook_init: random)"
        )
    t0 = time.perf_counter()
    km = KMeans(n_clusters=n_codes, n_init=1, max_iter=max_iter, random_state=seed).fit(vectors.numpy().astype(np.float32))
    centroids = torch.from_numpy(km.cluster_centers_).float()
    if quantize.l2_norm:
        centroids = F.normalize(centroids, p=2, dim=-1)
    quantize.embedding.weight.copy_(centroids.to(quantize.embedding.weight))
    return {"vectors": int(vectors.shape[0]), "seconds": round(time.perf_counter() - t0, 2), "inertia": float(km.inertia_)}


class DeadCodeRestarter:
    """Re-initialise codes unused for `unused_steps` steps from recent encoder outputs.

    A forward hook on the quantizer records which codes each training batch used and keeps a pool of
    the latest `pool_size` encoder outputs; `step(step)` after the optimiser step moves every code
    that no batch has chosen for `unused_steps` steps onto a random vector of that pool, so it sits
    where the data is and will be chosen again. Under DDP the last-use steps are max-reduced over
    ranks and rank 0's replacements are broadcast, so the codebook stays identical everywhere.
    Its state (last-use steps, pool, RNG) goes into the training checkpoint for exact resumes.
    """

    def __init__(self, quantize, unused_steps: int, pool_size: int = 32768, seed: int = 0,
                 last_step: int | None = None):
        if unused_steps < 1:
            raise ConfigError(f"dead-code restarts need unused_steps >= 1, got {unused_steps}")
        self.quantize = quantize
        self.unused_steps = int(unused_steps)
        self.last_step = last_step  # no restart after this optimiser step (None: until the end)
        self.pool_size = int(pool_size)
        self.last_used = torch.zeros(quantize.n_e, dtype=torch.int64)
        self.pool = torch.empty(0, quantize.e_dim)
        self.generator = torch.Generator().manual_seed(seed)
        self.total_restarted = 0
        self._batch_codes: list[torch.Tensor] = []
        self._hook = quantize.register_forward_hook(self._record)

    def _record(self, module, inputs, output):
        if not module.training:
            return
        vectors = _quantizer_inputs(module, inputs[0]).cpu()
        self.pool = torch.cat([self.pool, vectors])[-self.pool_size:]
        self._batch_codes.append(output[1].reshape(-1).cpu())

    def remove(self) -> None:
        self._hook.remove()

    @torch.no_grad()
    def step(self, step: int) -> int:
        """Call after optimiser step number `step` (1-based count of steps done); returns codes restarted."""
        if self._batch_codes:
            self.last_used[torch.cat(self._batch_codes).unique()] = step
            self._batch_codes.clear()
        if D.is_distributed():
            self.last_used = D.all_reduce_max(self.last_used.to(self.quantize.embedding.weight.device)).cpu()
        if self.last_step is not None and step > self.last_step:
            return 0
        dead = (step - self.last_used >= self.unused_steps).nonzero().squeeze(1)
        if dead.numel() == 0 or self.pool.shape[0] == 0:
            return 0
        weight = self.quantize.embedding.weight
        pick = torch.randint(self.pool.shape[0], (dead.numel(),), generator=self.generator)
        weight[dead.to(weight.device)] = self.pool[pick].to(weight)
        D.broadcast(weight.data)
        # A restarted code gets the same grace period as a new one before it can be declared dead again.
        self.last_used[dead] = step
        self.total_restarted += int(dead.numel())
        return int(dead.numel())

    def state_dict(self) -> dict:
        return {"last_used": self.last_used.clone(), "pool": self.pool.clone(),
                "generator": self.generator.get_state(), "total_restarted": self.total_restarted}

    def load_state_dict(self, state: dict) -> None:
        if state["last_used"].shape != self.last_used.shape:
            raise MismatchError(f"dead-code state is for {state['last_used'].numel()} codes, the codebook has "
                             f"{self.last_used.numel()}")
        self.last_used = state["last_used"].clone()
        self.pool = state["pool"].clone()
        self.generator.set_state(state["generator"])
        self.total_restarted = int(state["total_restarted"])


def code_perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of the code frequencies `counts` (one entry per code): the number of equally
    used codes that would give the same entropy."""
    p = counts.double() / counts.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def evaluate_tokenizer(vq, dataset, batch_size: int = 500, device=None) -> dict:
    """Codebook usage and reconstruction quality over a whole split (every image, not a recent window).

    Returns {"images", "codebook_size", "codes_used", "usage", "perplexity", "psnr", "ssim"}: usage =
    distinct codes over all tokens of the split / codebook size; perplexity = exp(entropy of the
    code frequencies over all tokens of the split), between 1 and codes_used; PSNR/SSIM are means
    over images in [0, 1].
    """
    device = device or vq.quant_conv.weight.device
    was_training = vq.training
    vq.eval()
    counts = torch.zeros(vq.config.codebook_size, dtype=torch.float64)
    psnrs, ssims = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        images = _images(batch).to(device).float()
        codes = vq.encode(images)
        counts += torch.bincount(codes.reshape(-1).cpu(), minlength=vq.config.codebook_size).double()
        recon, images = (vq.decode(codes).double().clamp(-1, 1) + 1) / 2, (images.double() + 1) / 2
        psnrs.append(psnr(recon, images).cpu())
        ssims.append(ssim(recon, images).cpu())
    vq.train(was_training)
    used = int((counts > 0).sum())
    return {"images": len(dataset), "codebook_size": vq.config.codebook_size, "codes_used": used,
            "usage": used / vq.config.codebook_size, "perplexity": code_perplexity(counts),
            "psnr": float(torch.cat(psnrs).mean()),
            "ssim": float(torch.cat(ssims).mean())}
