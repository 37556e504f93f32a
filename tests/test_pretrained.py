"""The models that ship with the package load, agree with each other, and sample."""

import pytest
import torch

import ctfgen
from ctfgen.pipeline import ARPipeline, CTFPipeline
from ctfgen.shipped import ASSETS, SHIPPED_CTF


def test_unknown_name_lists_the_shipped_models():
    with pytest.raises(ValueError, match="fashion-mnist-baseline"):
        ctfgen.pretrained("imagenet")


def test_shipped_models_sample_and_share_one_tokenizer():
    ctf = ctfgen.pretrained("fashion-mnist")
    base = ctfgen.pretrained("fashion-mnist-baseline")
    assert isinstance(ctf, CTFPipeline) and isinstance(base, ARPipeline)
    assert ctf.tokenizer.fingerprint == base.tokenizer.fingerprint == ctf.coarse_map.codebook_fingerprint
    # Stage 1 and the baseline have the same size: only the vocabulary differs.
    a, b = ctf.ar.config, base.gpt.config
    assert (a.dim, a.n_layer, a.n_head) == (b.dim, b.n_layer, b.n_head) and a.vocab_size < b.vocab_size
    labels = torch.tensor([7, 7, 1])
    for pipe in (ctf, base):
        images = pipe.sample(labels, generator=0)
        assert images.shape == (3, 1, 28, 28) and images.min() >= -1 and images.max() <= 1
    tokens = ctf.sample_tokens(labels, generator=1)
    assert torch.equal(tokens, ctf.sample_tokens(labels, generator=1))
    assert ctf.log_prob_is_exact and torch.isfinite(ctf.log_prob(tokens, labels)).all()


def test_shipped_weights_are_small():
    total = sum(p.stat().st_size for p in (ASSETS / "fashion_mnist").rglob("*") if p.is_file())
    assert total < 30 * 2**20, f"shipped models take {total / 2**20:.1f} MiB"
    assert not (ASSETS / "fashion_mnist" / "baseline" / "tokenizer").exists()
    assert (ASSETS / SHIPPED_CTF / "tokenizer" / "model.safetensors").is_file()


def test_ship_replaces_the_assets_with_a_runs_models(tmp_path):
    """`make ship`: a finished run's ctf/ and baseline/ become the assets, the baseline without its tokenizer."""
    import json
    import shutil

    from ctfgen.pipeline import load_pipeline
    from ctfgen.shipped import SHIPPED_BASELINE, ship

    run = tmp_path / "run"
    shutil.copytree(ASSETS / SHIPPED_CTF, run / "ctf")
    ctf = load_pipeline(run / "ctf")
    ARPipeline(ctfgen.pretrained("fashion-mnist-baseline").gpt, ctf.tokenizer).save_pretrained(run / "baseline")
    (tmp_path / "assets" / SHIPPED_BASELINE).mkdir(parents=True)
    (tmp_path / "assets" / SHIPPED_BASELINE / "stale.txt").write_text("from an earlier ship")
    sizes = ship(run, assets=tmp_path / "assets")
    assert set(sizes) == {"ctf", "baseline"} and all(v > 0 for v in sizes.values())
    shipped = tmp_path / "assets" / SHIPPED_BASELINE
    assert not (shipped / "tokenizer").exists() and not (shipped / "stale.txt").exists()
    assert json.loads((shipped / "pipeline.json").read_text())["has_tokenizer"] is False
    assert isinstance(load_pipeline(tmp_path / "assets" / SHIPPED_CTF), CTFPipeline)
