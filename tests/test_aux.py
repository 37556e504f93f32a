"""AuxModel (CTF stage 2): bidirectional, in-cluster mask, coarse-map checks, sample_fine."""

from types import SimpleNamespace

import pytest
import torch

from ctfgen.models import AUX_PRESETS, AuxConfig, AuxModel
from ctfgen.sampling import sample_fine
from ctfgen.utils.errors import ConfigError, WrongTypeError

V, K, L = 12, 4, 9


def fake_map(vocab=V, num_coarse=K, fingerprint="map0", codebook="cb0"):
    f2c = torch.arange(vocab) % num_coarse  # cluster c = {c, c+K, c+2K}
    return SimpleNamespace(fine_to_coarse=f2c, num_coarse=num_coarse, vocab_size=vocab,
                           fingerprint=fingerprint, codebook_fingerprint=codebook)


def tiny_aux(seed=0, std=0.3, **kw):
    torch.manual_seed(seed)
    cfg = AuxConfig.from_preset("Aux-tiny", vocab_size=V, num_coarse=K, image_tokens=L, num_classes=3, **kw)
    model = AuxModel(cfg, coarse_map=fake_map())
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model.eval()


def test_presets_mirror_gpt():
    assert AUX_PRESETS["Aux-B"] == dict(n_layer=12, n_head=12, dim=768)
    assert set(AUX_PRESETS) == {"Aux-B", "Aux-L", "Aux-XL", "Aux-XXL", "Aux-tiny", "Aux-mini", "Aux-S"}


def test_aux_is_bidirectional():
    model = tiny_aux()
    coarse = torch.randint(0, K, (2, L))
    out = model(coarse, torch.tensor([0, 1]))
    assert out.shape == (2, L, V) and out.dtype == torch.float32
    later = coarse.clone()
    later[:, -1] = (later[:, -1] + 1) % K
    out2 = model(later, torch.tensor([0, 1]))
    assert not torch.allclose(out[:, 0], out2[:, 0])  # a later label changes the first position


def test_in_cluster_mask_puts_zero_mass_outside():
    model = tiny_aux()
    coarse = torch.randint(0, K, (3, L))
    probs = model(coarse, torch.tensor([0, 1, 3])).softmax(-1)
    inside = (torch.arange(V) % K)[None, None, :] == coarse[..., None]
    assert torch.all(probs[~inside] == 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, L))
    assert torch.all(probs[inside] > 0)
    free = model(coarse, torch.tensor([0, 1, 3]), restrict=False)
    assert torch.isfinite(free).all()


def test_class_prefix_and_null_label():
    model = tiny_aux()
    coarse = torch.randint(0, K, (1, L))
    a, b = model(coarse, torch.tensor([0])), model(coarse, torch.tensor([1]))
    assert not torch.allclose(a, b)
    torch.testing.assert_close(model(coarse, None), model(coarse, torch.tensor([3])))
    no_prefix = tiny_aux(class_prefix=False)
    assert not hasattr(no_prefix, "cls_embedding")
    torch.testing.assert_close(no_prefix(coarse, torch.tensor([0])), no_prefix(coarse, torch.tensor([2])))


def test_sampled_fine_tokens_map_back_to_coarse():
    model = tiny_aux()
    coarse = torch.randint(0, K, (4, L))
    labels = torch.tensor([0, 1, 2, 0])
    for kw in (dict(), dict(temperature=1.1), dict(top_k=1), dict(top_k=2, top_p=0.9), dict(cfg_scale=2.0)):
        fine = sample_fine(model, coarse, labels, generator=0, **kw)
        assert fine.shape == (4, L) and fine.dtype == torch.long
        assert torch.equal(fine % K, coarse), kw
    assert torch.equal(sample_fine(model, coarse, labels, top_k=1), model(coarse, labels).argmax(-1))
    assert torch.equal(sample_fine(model, coarse, labels, generator=3), sample_fine(model, coarse, labels, generator=3))


def test_sample_fine_refuses_bad_coarse_labels_and_options():
    """Float coarse labels were truncated (1.7 -> 1), out-of-range ones an IndexError in the embedding, and the
    sampling options were never range-checked (temperature -1 sampled greedily, top_p 0 took the top token)."""
    model = tiny_aux()
    coarse, labels = torch.randint(0, K, (2, L)), [0, 1]
    with pytest.raises(WrongTypeError, match="coarse labels must be an integer tensor"):
        sample_fine(model, coarse.float() + 0.7, labels)
    for bad in (coarse + K, coarse - K):
        with pytest.raises(ConfigError, match=rf"coarse labels must be in \[0, {K}\)"):
            sample_fine(model, bad, labels)
    with pytest.raises(ConfigError, match=r"coarse labels must be \(B, L\)"):
        sample_fine(model, coarse[0], labels)
    for kw, match in ((dict(temperature=-1), "temperature must be between 0 and 10"),
                      (dict(top_p=0), "top_p must be greater than 0"),
                      (dict(top_k=-3), "top_k must be at least 0"),
                      (dict(top_k=1.5), "top_k must be a whole number"),
                      (dict(cfg_scale=float("nan")), "cfg_scale must be between 0 and 20")):
        with pytest.raises(ConfigError, match=match):
            sample_fine(model, coarse, labels, generator=0, **kw)


def test_stage2_guidance_formula():
    model = tiny_aux(restrict_to_cluster=False)
    coarse = torch.randint(0, K, (2, L))
    labels = torch.tensor([0, 2])
    cond, uncond = model(coarse, labels), model(coarse, None)
    want = (uncond + (cond - uncond) * 3.0).argmax(-1)
    assert torch.equal(sample_fine(model, coarse, labels, top_k=1, cfg_scale=3.0), want)


def test_coarse_map_checks():
    cfg = AuxConfig.from_preset("Aux-tiny", vocab_size=V, num_coarse=K, image_tokens=L, num_classes=3)
    with pytest.raises(ValueError, match="num_coarse"):
        AuxModel(cfg, coarse_map=fake_map(num_coarse=3))
    with pytest.raises(ValueError, match="vocab_size"):
        AuxModel(cfg, coarse_map=fake_map(vocab=13))
    pinned = AuxConfig.from_preset("Aux-tiny", vocab_size=V, num_coarse=K, image_tokens=L, num_classes=3,
                                   coarse_map_fingerprint="map0", codebook_fingerprint="cb0")
    with pytest.raises(ValueError, match="fingerprint"):
        AuxModel(pinned, coarse_map=fake_map(fingerprint="other"))
    with pytest.raises(ValueError, match="codebook fingerprint"):
        AuxModel(pinned, coarse_map=fake_map(codebook="cb1"))
    adopted = AuxModel(cfg, coarse_map=fake_map())
    assert adopted.config.coarse_map_fingerprint == "map0" and adopted.config.codebook_fingerprint == "cb0"
    with pytest.raises(RuntimeError, match="no coarse map"):
        AuxModel(cfg)(torch.zeros(1, L, dtype=torch.long))


def test_aux_save_pretrained_round_trip(tmp_path):
    model = tiny_aux()
    model.save_pretrained(tmp_path / "aux")
    loaded = AuxModel.from_pretrained(tmp_path / "aux")
    assert isinstance(loaded.config, AuxConfig) and loaded.config == model.config
    assert loaded.config.coarse_map_fingerprint == "map0"
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert "fine_to_coarse" in sd2 and sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    coarse = torch.randint(0, K, (2, L))
    assert torch.equal(model(coarse, torch.tensor([0, 1])), loaded.eval()(coarse, torch.tensor([0, 1])))
