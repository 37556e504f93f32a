"""The paper's ImageNet recipes (configs/imagenet/): each loads through the one loader with the
paper's settings, and each runs end to end for two steps on a CPU with `--dry-run` on a tiny
synthetic image folder and a tiny VQ-16-shaped tokenizer (16x downsampling)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ctfgen.app.cli import main as cli
from ctfgen.config import ExperimentConfig, load_config
from ctfgen.tokenizer.vq import VQConfig, VQModel

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs" / "imagenet").glob("*.yaml"))


def test_there_is_a_recipe_for_each_method_and_size():
    assert [p.stem for p in RECIPES] == sorted(f"{m}_gpt_{s}" for m in ("ctf", "baseline") for s in ("b", "l", "xl"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_has_the_paper_settings(recipe):
    cfg = load_config(ExperimentConfig, recipe)
    size = {"b": "GPT-B", "l": "GPT-L", "xl": "GPT-XL"}[recipe.stem.split("_")[-1]]
    ctf = recipe.stem.startswith("ctf")
    assert cfg.ctf_enabled == ctf and cfg.baseline.enabled == (not ctf)
    assert cfg.tokenizer.pretrained.endswith("vq_ds16_c2i.pt") and cfg.data.augment == "tencrop"
    assert cfg.clustering.num_coarse == 512 and cfg.aux.preset == "Aux-L"
    stage = cfg.stage1 if ctf else cfg.baseline
    assert stage.preset == size and stage.model["class_dropout"] == 0.1
    t = stage.train
    assert (t.batch_size, t.lr, t.betas, t.weight_decay, t.grad_clip, t.mixed_precision) == (
        256, 1e-4, (0.9, 0.95), 0.05, 1.0, "bf16")
    assert t.fsdp == (True if size == "GPT-XL" else "auto" if size == "GPT-L" else False)
    if ctf:
        assert cfg.sampling.ctf["cfg_scale"] == 2.0 and cfg.sampling.ctf["temperature_fine"] == 1.1


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory):
    """Two class folders of random 40x40 RGB images, and a saved VQ with VQ-16's 16x downsampling."""
    root = tmp_path_factory.mktemp("tiny_imagenet")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for c in ("n01", "n02"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    torch.manual_seed(0)
    vq = VQModel(VQConfig(codebook_size=16, codebook_embed_dim=4, encoder_ch_mult=(1, 1, 1, 1, 1),
                          decoder_ch_mult=(1, 1, 1, 1, 1), z_channels=8, base_ch=8, num_res_blocks=1, norm_groups=4))
    vq.save_pretrained(root / "vq")
    return root


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_dry_run_on_tiny_images(recipe, tiny_imagenet, tmp_path):
    out = tmp_path / "run"
    d = tiny_imagenet
    assert cli(["pipeline", str(recipe), "--out", str(out), "--dry-run", "--no-progress",
                f"data.root={d / 'train'}", f"data.test_root={d / 'val'}", f"tokenizer.pretrained={d / 'vq'}"]) == 0
    held = json.loads((out / "heldout.json").read_text())
    method = "ctf" if recipe.stem.startswith("ctf") else "baseline"
    assert set(held) == {method, "images", "image_tokens"} and held["image_tokens"] == 4
    assert json.loads((out / "codes" / "train" / "header.json").read_text())["num_augmentations"] == 10
    assert json.loads((out / "phases" / f"{'ar' if method == 'ctf' else 'baseline'}.json").read_text())["steps"] == 2
