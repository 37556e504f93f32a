"""GPT: LlamaGen layout and numerics, KV cache, checkpoint loading and saving."""

import json
import math
from pathlib import Path

import pytest
import torch

from ctfgen.utils.hub import StateDictMismatch
from ctfgen.utils.errors import ConfigError
from ctfgen.models import GPT, GPTConfig, load_llamagen_gpt
from ctfgen.models.llamagen import extract_state_dict
from ctfgen.models.transformer import apply_rotary_emb, cached_attention, ffn_hidden_dim, precompute_freqs_cis_2d

from conftest import LLAMAGEN_MANIFESTS

MANIFEST = LLAMAGEN_MANIFESTS / "GPT-B.json"


def tiny_gpt(vocab=11, image_tokens=16, num_classes=3, std=0.2, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = GPTConfig.from_preset("GPT-tiny", vocab_size=vocab, image_tokens=image_tokens, num_classes=num_classes, **kw)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():  # non-trivial weights: the real init has a zero head
            p.normal_(0, std)
    return model.eval()


def manifest():
    if not MANIFEST.is_file():
        pytest.skip(f"{MANIFEST} not available")
    return {k: tuple(v) for k, v in json.loads(MANIFEST.read_text()).items()}


def gpt_b_meta():
    cfg = GPTConfig.from_preset("GPT-B", vocab_size=16384, image_tokens=256, num_classes=1000)
    with torch.device("meta"):
        return GPT(cfg)


def test_gpt_b_state_dict_equals_llamagen_manifest():
    model = gpt_b_meta()
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == manifest()
    assert 110e6 < sum(p.numel() for p in model.parameters()) < 112e6  # LlamaGen's "111M"
    assert ffn_hidden_dim(768) == 2048 and ffn_hidden_dim(1024) == 2816


def test_presets_and_config_checks():
    for name, (L, H, D) in {"GPT-L": (24, 16, 1024), "GPT-XL": (36, 20, 1280), "GPT-XXL": (48, 24, 1536)}.items():
        cfg = GPTConfig.from_preset(name, vocab_size=16384, image_tokens=256)
        assert (cfg.n_layer, cfg.n_head, cfg.dim) == (L, H, D)
    with pytest.raises(ValueError, match="square"):
        GPTConfig.from_preset("GPT-tiny", vocab_size=4, image_tokens=15)
    with pytest.raises(ValueError, match="GPT-B"):
        GPTConfig.from_preset("GPT-Q", vocab_size=4, image_tokens=16)


def test_init_matches_llamagen():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("GPT-mini", vocab_size=512, image_tokens=16, num_classes=10))
    assert torch.count_nonzero(model.output.weight) == 0
    assert abs(model.tok_embeddings.weight.std().item() - 0.02) < 2e-3
    assert abs(model.layers[0].attention.wqkv.weight.std().item() - 0.02) < 2e-3
    assert torch.all(model.norm.weight == 1)


def test_rope_rotation_of_a_grid_position():
    G, d, base = 4, 16, 10000.0
    table = precompute_freqs_cis_2d(G, d, base)
    assert table.shape == (1 + G * G, d // 2, 2)
    h = d // 2
    f = [base ** (-(2 * j) / h) for j in range(h // 2)]
    torch.manual_seed(0)
    x = torch.randn(1, 1 + G * G, 1, d)
    out = apply_rotary_emb(x, table)
    for p in (0, 1, 6, 13, 15):
        r, c = divmod(p, G)
        angles = [r * fj for fj in f] + [c * fj for fj in f]
        v = x[0, p + 1, 0]
        want = []
        for i, a in enumerate(angles):
            x0, x1 = v[2 * i].item(), v[2 * i + 1].item()
            want += [x0 * math.cos(a) - x1 * math.sin(a), x1 * math.cos(a) + x0 * math.sin(a)]
        torch.testing.assert_close(out[0, p + 1, 0], torch.tensor(want), atol=1e-5, rtol=1e-5)
    # LlamaGen's quirk: the class position is multiplied by zero, not left unrotated
    assert torch.all(table[0] == 0)
    assert torch.all(out[0, 0] == 0)


def test_rope_table_stays_float32_when_model_is_cast():
    model = tiny_gpt()
    ref = model.freqs_cis.clone()
    model = model.to(torch.bfloat16)
    assert model.freqs_cis.dtype == torch.float32 and torch.equal(model.freqs_cis, ref)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16


def test_forward_shape_causality_and_labels():
    model = tiny_gpt()
    tokens = torch.randint(0, 11, (2, 16))
    labels = torch.tensor([0, 2])
    out = model(tokens, labels)
    assert out.shape == (2, 17, 11) and out.dtype == torch.float32
    changed = tokens.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 11
    out2 = model(changed, labels)
    # position i sees the class and tokens < i: token 9 first matters at position 10
    torch.testing.assert_close(out[:, :10], out2[:, :10])
    assert not torch.allclose(out[:, 10:], out2[:, 10:])
    assert not torch.allclose(model(tokens, torch.tensor([1, 1])), out)
    # shorter prefixes give the same leading logits
    torch.testing.assert_close(model(tokens[:, :5], labels), out[:, :6], atol=1e-5, rtol=1e-5)


def test_class_dropout_in_training_only():
    model = tiny_gpt(token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0, class_dropout=1.0)
    tokens = torch.randint(0, 11, (2, 4))
    null = model(tokens, None)
    model.train()
    torch.testing.assert_close(model(tokens, torch.tensor([0, 1])), null)
    model.eval()
    assert not torch.allclose(model(tokens, torch.tensor([0, 1])), null)


def test_kv_cached_decoding_equals_full_forward():
    model = tiny_gpt()
    tokens = torch.randint(0, 11, (3, 16))
    labels = torch.tensor([0, 1, 3])  # 3 = null label
    full = model(tokens, labels)
    with torch.no_grad():
        model.setup_caches(4)
        steps = [model.prefill(labels)]
        for k in range(1, 16):
            steps.append(model.forward_step(tokens[:, k - 1 : k], torch.tensor([k]))[:, -1])
        torch.testing.assert_close(torch.stack(steps, 1), full[:, :16], atol=1e-5, rtol=1e-5)
        # a chunk after the prefill (prompted decoding) agrees too
        model.prefill(labels)
        chunk = model.forward_step(tokens[:, :7], torch.arange(1, 8))
        torch.testing.assert_close(chunk, full[:, 1:8], atol=1e-5, rtol=1e-5)
    model.clear_caches()
    assert all(layer.attention.kv_cache is None for layer in model.layers)


def test_filled_cache_attention_equals_full_masked_attention():
    torch.manual_seed(0)
    B, H, S, d = 3, 4, 17, 8
    k, v = torch.randn(B, H, S, d), torch.randn(B, H, S, d)
    for filled in (1, 6, 17):
        q = torch.randn(B, H, 1, d)
        mask = (torch.arange(S) < filled)[None, None, None]
        full = cached_attention(q, k, v, mask)
        torch.testing.assert_close(cached_attention(q, k[:, :, :filled], v[:, :, :filled]), full, atol=1e-5, rtol=1e-5)
        # unwritten slots hold garbage in a real cache: the slice never reads them
        junk = k.clone()
        junk[:, :, filled:] = float("nan")
        assert torch.isfinite(cached_attention(q, junk[:, :, :filled], v[:, :, :filled])).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoding_over_the_filled_cache_equals_the_fixed_shape_step(dtype):
    model = tiny_gpt().to(dtype)
    tokens = torch.randint(0, 11, (3, 16))
    labels = torch.tensor([0, 1, 3])
    with torch.no_grad():
        model.setup_caches(3)
        fixed = [model.prefill(labels)]
        for k in range(1, 16):
            fixed.append(model.forward_step(tokens[:, k - 1 : k], torch.tensor([k]))[:, -1])
        model.clear_caches()
        model.setup_caches(3)
        filled = [model.prefill(labels)]
        for k in range(1, 16):
            filled.append(model.forward_step(tokens[:, k - 1 : k], k)[:, -1])
        cache = model.layers[0].attention.kv_cache
        assert cache.k_cache.dtype == torch.float32  # on the CPU the cache is float32 whatever the weights
        assert torch.count_nonzero(cache.k_cache[:, :, 16:]) == 0 < torch.count_nonzero(cache.k_cache[:, :, 15])
        torch.testing.assert_close(torch.stack(filled, 1), torch.stack(fixed, 1), atol=1e-5, rtol=1e-5)
        # a chunk at an int position (T > 1: causal within the chunk) agrees with the full forward
        model.prefill(labels)
        chunk = model.forward_step(tokens[:, :7], 1)
        rest = model.forward_step(tokens[:, 7:12], 8)
    full = model(tokens, labels)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    torch.testing.assert_close(chunk, full[:, 1:8], **tol)
    torch.testing.assert_close(rest, full[:, 8:13], **tol)


def test_save_pretrained_round_trip_is_bit_exact(tmp_path):
    model = tiny_gpt(codebook_fingerprint="abc123")
    model.save_pretrained(tmp_path / "gpt")
    assert {p.name for p in (tmp_path / "gpt").iterdir()} >= {"config.json", "model.safetensors"}
    loaded = GPT.from_pretrained(tmp_path / "gpt")
    assert isinstance(loaded.config, GPTConfig) and loaded.config == model.config
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    tokens = torch.randint(0, 11, (2, 16))
    assert torch.equal(model(tokens, torch.tensor([0, 1])), loaded.eval()(tokens, torch.tensor([0, 1])))


# ---- LlamaGen checkpoints ----


def manifest_state_dict(shapes):
    # Zero-stride tensors: every name and full shape of GPT-B at a few bytes each on disk.
    return {name: torch.full((1,), float(i % 7)).expand(shape) for i, (name, shape) in enumerate(shapes.items())}


@pytest.mark.parametrize("wrapper", ["model", "module", "state_dict", None])
def test_load_llamagen_gpt_b_under_each_wrapper(tmp_path, wrapper):
    shapes = manifest()
    sd = manifest_state_dict(shapes)
    if wrapper == "module":
        sd = {"module." + k: v for k, v in sd.items()}  # DDP prefix inside a DeepSpeed dict
    if wrapper is None:
        sd = {"_orig_mod." + k: v for k, v in sd.items()}  # torch.compile prefix, bare FSDP dict
    sd["freqs_cis"] = torch.zeros(257, 32, 2)  # known non-parameter buffers are ignored
    sd["layers.0.attention.kv_cache.k_cache"] = torch.zeros(1)
    ckpt = sd if wrapper is None else {wrapper: sd, "steps": torch.tensor(5)}
    torch.save(ckpt, tmp_path / "c2i_B_256.pt")
    model = load_llamagen_gpt(tmp_path / "c2i_B_256.pt", "GPT-B", image_tokens=256)
    assert model.config.vocab_size == 16384 and not model.training
    names = list(shapes)
    for i in (0, 5, len(names) - 1):
        assert torch.all(model.state_dict()[names[i]] == float(i % 7))
    assert model.freqs_cis.shape == (257, 32, 2) and model.freqs_cis[1:].abs().sum() > 0


def test_extract_state_dict_strips_nested_wrapper_prefixes():
    # DDP around torch.compile (LlamaGen's own order) saves "module._orig_mod."; only the outer
    # prefix was stripped, and the load failed naming every tensor as unexpected.
    w = torch.ones(2)
    for prefix in ("module._orig_mod.", "_orig_mod.module.", "module.module.", "_orig_mod."):
        assert list(extract_state_dict({"model": {prefix + "norm.weight": w}})) == ["norm.weight"]


def test_load_llamagen_gpt_refuses_wrong_shape_extra_and_missing(tmp_path):
    shapes = manifest()
    bad = manifest_state_dict(shapes)
    bad["layers.3.attention.wo.weight"] = torch.zeros(1).expand(768, 700)
    torch.save({"model": bad}, tmp_path / "bad.pt")
    with pytest.raises(StateDictMismatch, match=r"layers\.3\.attention\.wo\.weight.*\(768, 700\).*\(768, 768\)"):
        load_llamagen_gpt(tmp_path / "bad.pt", "GPT-B", image_tokens=256)

    extra = manifest_state_dict(shapes)
    extra["layers.12.attention.wo.weight"] = torch.zeros(1).expand(768, 768)
    torch.save({"model": extra}, tmp_path / "extra.pt")
    with pytest.raises(StateDictMismatch, match=r"unexpected.*layers\.12\.attention\.wo\.weight"):
        load_llamagen_gpt(tmp_path / "extra.pt", "GPT-B", image_tokens=256)

    missing = manifest_state_dict(shapes)
    del missing["norm.weight"]
    torch.save({"model": missing}, tmp_path / "missing.pt")
    with pytest.raises(StateDictMismatch, match=r"missing.*norm\.weight"):
        load_llamagen_gpt(tmp_path / "missing.pt", "GPT-B", image_tokens=256)

    # a wrong preset is a shape error too, not a half-loaded model
    torch.save({"model": manifest_state_dict(shapes)}, tmp_path / "ok.pt")
    with pytest.raises(StateDictMismatch, match="cls_embedding"):
        load_llamagen_gpt(tmp_path / "ok.pt", "GPT-B", image_tokens=256, num_classes=10)
    with pytest.raises(ValueError, match="square"):
        load_llamagen_gpt(tmp_path / "ok.pt", "GPT-B", image_tokens=250)


def test_load_llamagen_gpt_computes_what_was_saved(tmp_path):
    model = tiny_gpt()
    torch.save({"model": model.state_dict()}, tmp_path / "tiny.pt")
    loaded = load_llamagen_gpt(tmp_path / "tiny.pt", "GPT-tiny", image_tokens=16, num_classes=3)
    tokens = torch.randint(0, 11, (2, 16))
    assert torch.equal(loaded(tokens, torch.tensor([0, 2])), model(tokens, torch.tensor([0, 2])))


def test_load_llamagen_gpt_refuses_overrides_that_the_checkpoint_decides(tmp_path):
    # vocab_size in **overrides reached GPTConfig.from_preset twice: "got multiple values for keyword argument"
    model = tiny_gpt()
    torch.save({"model": model.state_dict()}, tmp_path / "tiny.pt")
    with pytest.raises(ConfigError, match="vocab_size.*tok_embeddings"):
        load_llamagen_gpt(tmp_path / "tiny.pt", "GPT-tiny", image_tokens=16, num_classes=3, vocab_size=11)
    with pytest.raises(ConfigError, match="unknown GPTConfig override.*name"):
        load_llamagen_gpt(tmp_path / "tiny.pt", "GPT-tiny", image_tokens=16, num_classes=3, name="GPT-B")
    loaded = load_llamagen_gpt(tmp_path / "tiny.pt", "GPT-tiny", image_tokens=16, num_classes=3, norm_eps=1e-6)
    assert loaded.config.norm_eps == 1e-6
