"""Tiny random CTF / baseline parts shared by test_pipeline.py, test_likelihood.py, test_redundancy.py."""

import torch

from ctfgen.clustering import CoarseMap
from ctfgen.models.transformer import GPT, AuxConfig, AuxModel, GPTConfig
from ctfgen.tokenizer.vq import VQConfig, VQModel

SMALL = dict(dim=16, n_layer=1, n_head=2, multiple_of=16)


def randomize(model, seed, std=0.5):
    """Random weights everywhere, so no output is trivially uniform (output heads start at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def tiny_vq(codebook_size=4, seed=0, in_channels=1):
    """4x4 images -> 2x2 grids."""
    torch.manual_seed(seed)
    cfg = VQConfig(codebook_size=codebook_size, codebook_embed_dim=4, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2),
                   z_channels=8, base_ch=8, num_res_blocks=1, in_channels=in_channels, norm_groups=4)
    return randomize(VQModel(cfg), seed, std=0.3)


def tiny_ctf(vocab=4, num_coarse=2, image_tokens=4, num_classes=3, seed=0, restrict=True, vq=None, cmap=None):
    vq = vq if vq is not None else tiny_vq(vocab, seed)
    cmap = cmap if cmap is not None else CoarseMap.fit(vq, num_coarse, seed=seed)
    ar = randomize(GPT(GPTConfig(vocab_size=num_coarse, image_tokens=image_tokens, num_classes=num_classes, **SMALL,
                                 codebook_fingerprint=cmap.codebook_fingerprint,
                                 coarse_map_fingerprint=cmap.fingerprint)), seed + 1)
    aux = AuxModel(AuxConfig(vocab_size=vocab, num_coarse=num_coarse, image_tokens=image_tokens,
                             num_classes=num_classes, restrict_to_cluster=restrict, **SMALL), coarse_map=cmap)
    randomize(aux, seed + 2)
    return ar, aux, cmap, vq


def tiny_baseline(vocab=4, image_tokens=4, num_classes=3, seed=0, vq=None):
    vq = vq if vq is not None else tiny_vq(vocab, seed)
    gpt = randomize(GPT(GPTConfig(vocab_size=vocab, image_tokens=image_tokens, num_classes=num_classes, **SMALL,
                                  codebook_fingerprint=vq.fingerprint)), seed + 3)
    return gpt, vq


def all_grids(vocab, length):
    """Every token sequence of `length` over `vocab`: (vocab**length, length) int64."""
    return torch.cartesian_prod(*[torch.arange(vocab)] * length).reshape(-1, length)
