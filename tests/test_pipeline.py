import json

import pytest
import torch
from _tiny_ctf import SMALL, randomize, tiny_baseline, tiny_ctf, tiny_vq

from ctfgen.clustering import CoarseMap
from ctfgen.models.transformer import GPT, AuxConfig, AuxModel, GPTConfig
from ctfgen.pipeline import ARPipeline, CTFPipeline, load_pipeline
from ctfgen.sampling import generate
from ctfgen.utils.errors import CorruptFileError, WrongTypeError


@pytest.fixture(scope="module")
def ctf16():
    """Fine vocab 32, 8 clusters, 4x4 grid, so clusters have several members."""
    vq = tiny_vq(codebook_size=32, seed=1)
    return tiny_ctf(vocab=32, num_coarse=8, image_tokens=16, vq=vq, seed=1)


@pytest.mark.parametrize("cfg_scale_fine", [1.0, 3.0])
def test_fine_tokens_map_back_to_sampled_coarse(ctf16, cfg_scale_fine):
    ar, aux, cmap, vq = ctf16
    pipe = CTFPipeline(ar, aux, cmap, vq)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    fine = pipe.sample_tokens(labels, cfg_scale_fine=cfg_scale_fine, generator=5)
    assert fine.shape == (6, 16) and fine.dtype == torch.int64
    # stage 1 draws first from the same stream, so replaying it gives the coarse labels sampled
    coarse = generate(ar, labels, cfg_scale=2.0, temperature=1.1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(cmap(fine), coarse)
    # and fine tokens vary within clusters (stage 2 really samples)
    assert len(fine.unique()) > len(coarse.unique())


def test_argmax_and_determinism(ctf16):
    ar, aux, cmap, vq = ctf16
    pipe = CTFPipeline(ar, aux, cmap, vq)
    a = pipe.sample_tokens([1, 2], generator=3)
    assert torch.equal(a, pipe.sample_tokens([1, 2], generator=3))
    assert torch.equal(a, pipe.sample_tokens([1, 2], generator=torch.Generator().manual_seed(3)))
    greedy = pipe.sample_tokens([1, 2], top_k_fine=1, generator=3)
    coarse = cmap(greedy)
    assert torch.equal(greedy, aux(coarse, torch.tensor([1, 2])).argmax(-1))


def test_end_to_end_sample_and_timings(ctf16):
    pipe = CTFPipeline(*ctf16)
    images = pipe.sample([0, 2, 1], generator=0)
    assert images.shape == (3, 1, 8, 8)
    assert images.min() >= -1 and images.max() <= 1
    assert set(pipe.last_timings) >= {"stage1", "stage2", "decode"}
    assert all(v >= 0 for v in pipe.last_timings.values())
    assert (pipe.num_classes, pipe.image_tokens, pipe.grid_size, pipe.device.type) == (3, 16, 4, "cpu")
    assert pipe.to("cpu") is pipe and pipe.eval() is pipe


def test_options_and_labels(ctf16):
    pipe = CTFPipeline(*ctf16)
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 3\)"):
        pipe.sample_tokens([3])
    with pytest.raises(TypeError):
        pipe.sample_tokens([0], temperature_fin=1.0)
    ar, aux, cmap, _ = ctf16
    with pytest.raises(ValueError, match="no tokenizer"):
        CTFPipeline(ar, aux, cmap).sample([0])
    assert CTFPipeline(ar, aux, cmap).sample_tokens([0], generator=0).shape == (1, 16)


def test_save_load_round_trip(ctf16, tmp_path):
    pipe = CTFPipeline(*ctf16, sampling_defaults={"temperature_fine": 0.9})
    pipe.save_pretrained(tmp_path / "ctf")
    info = json.loads((tmp_path / "ctf" / "pipeline.json").read_text())
    assert info["type"] == "ctf" and info["sampling_defaults"]["temperature_fine"] == 0.9
    back = load_pipeline(tmp_path / "ctf")
    assert isinstance(back, CTFPipeline)
    assert back.sampling_defaults == pipe.sampling_defaults
    assert back.coarse_map.fingerprint == pipe.coarse_map.fingerprint
    assert torch.equal(back.sample_tokens([0, 1], generator=7), pipe.sample_tokens([0, 1], generator=7))
    assert torch.equal(back.sample([2], generator=1), pipe.sample([2], generator=1))
    tokens = pipe.sample_tokens([0, 1], generator=2)
    assert torch.equal(back.log_prob(tokens, [0, 1]), pipe.log_prob(tokens, [0, 1]))


def test_saved_without_tokenizer_over_an_earlier_save_loads_without_it(tmp_path):
    """pipeline.json decides: the tokenizer/ an earlier save left in the directory (another codebook
    here) is not taken for the pipeline's own."""
    CTFPipeline(*tiny_ctf(vocab=8, num_coarse=3, seed=0)).save_pretrained(tmp_path / "ctf")
    ar, aux, cmap, _ = tiny_ctf(vocab=8, num_coarse=3, seed=1)
    CTFPipeline(ar, aux, cmap).save_pretrained(tmp_path / "ctf")
    back = load_pipeline(tmp_path / "ctf")
    assert back.tokenizer is None and back.coarse_map.fingerprint == cmap.fingerprint


def test_baseline_round_trip(tmp_path):
    gpt, vq = tiny_baseline(vocab=32, image_tokens=16, vq=tiny_vq(32, seed=1))
    pipe = ARPipeline(gpt, vq)
    images = pipe.sample([0, 1], generator=0)
    assert images.shape == (2, 1, 8, 8) and "stage2" not in pipe.last_timings  # one stage, no stage-2 entry
    pipe.save_pretrained(tmp_path / "base")
    back = load_pipeline(tmp_path / "base")
    assert isinstance(back, ARPipeline) and back.log_prob_is_exact
    assert torch.equal(back.sample_tokens([2, 1], generator=4), pipe.sample_tokens([2, 1], generator=4))
    with pytest.raises(ValueError, match="not 'ctf'"):
        CTFPipeline.from_pretrained(tmp_path / "base")


def test_refuses_map_of_another_codebook(ctf16):
    ar, aux, cmap, vq = ctf16
    other = tiny_vq(codebook_size=32, seed=9)
    with pytest.raises(ValueError, match=f"codebook fingerprint: '{cmap.codebook_fingerprint}' in the coarse map, '{other.fingerprint}' in the tokenizer"):
        CTFPipeline(ar, aux, cmap, other)


def test_refuses_aux_trained_with_another_map(ctf16):
    ar, aux, cmap, vq = ctf16
    other = CoarseMap.fit(vq, 8, method="random", seed=0)  # same codebook and K, other assignment
    with pytest.raises(ValueError, match="coarse map fingerprint: .* in the aux model, .* in the coarse map"):
        CTFPipeline(ar, aux, other, vq)
    # even with fingerprints absent from the configs, the aux's own fine_to_coarse gives it away
    ar2 = GPT(GPTConfig(vocab_size=8, image_tokens=16, num_classes=3, **SMALL))
    aux2 = AuxModel(AuxConfig(vocab_size=32, num_coarse=8, image_tokens=16, num_classes=3, **SMALL))
    aux2.fine_to_coarse.copy_(cmap.fine_to_coarse)
    with pytest.raises(ValueError, match="fine_to_coarse differs"):
        CTFPipeline(ar2, aux2, other, vq)
    # an aux with no map at all adopts the pipeline's
    aux3 = AuxModel(AuxConfig(vocab_size=32, num_coarse=8, image_tokens=16, num_classes=3, **SMALL))
    CTFPipeline(ar2, aux3, other, vq)
    assert torch.equal(aux3.fine_to_coarse, other.fine_to_coarse)


def test_refuses_stage1_vocab_not_k(ctf16):
    ar, aux, cmap, vq = ctf16
    bad = GPT(GPTConfig(vocab_size=16, image_tokens=16, num_classes=3, **SMALL))
    with pytest.raises(ValueError, match=r"number of coarse labels \(K\): 16 in the stage-1 GPT, 8 in the aux model"):
        CTFPipeline(bad, aux, cmap, vq)
    grid = GPT(GPTConfig(vocab_size=8, image_tokens=4, num_classes=3, **SMALL))
    with pytest.raises(ValueError, match="image tokens: 4 in the stage-1 GPT, 16 in the aux model"):
        CTFPipeline(grid, aux, cmap, vq)


def test_baseline_refuses_mismatches(ctf16):
    ar, aux, cmap, vq = ctf16
    with pytest.raises(ValueError, match="CTF stage-1 model"):
        ARPipeline(ar)
    gpt, _ = tiny_baseline(vocab=32, image_tokens=16, vq=vq)
    with pytest.raises(ValueError, match="codebook fingerprint: .* in the baseline GPT, .* in the tokenizer"):
        ARPipeline(gpt, tiny_vq(codebook_size=32, seed=9))
    small = randomize(GPT(GPTConfig(vocab_size=16, image_tokens=16, num_classes=3, **SMALL)), 0)
    with pytest.raises(ValueError, match="codebook size: 16 in the baseline GPT, 32 in the tokenizer"):
        ARPipeline(small, vq)


def test_load_refuses_swapped_coarse_map(ctf16, tmp_path):
    ar, aux, cmap, vq = ctf16
    CTFPipeline(ar, aux, cmap, vq).save_pretrained(tmp_path / "p")
    CoarseMap.fit(vq, 8, method="random", seed=0).save(tmp_path / "p" / "coarse_map.safetensors")
    with pytest.raises(ValueError, match="is inconsistent:\n  coarse map fingerprint: .* in the coarse map, .* in the pipeline.json"):
        load_pipeline(tmp_path / "p")
    with pytest.raises(FileNotFoundError, match="pipeline.json"):
        load_pipeline(tmp_path)


@pytest.mark.parametrize("text", ["[]", "3", "null", '{"type": "ctf", "format_version": "one"}',
                                  '{"type": "ctf", "format_version": 1, "sampling_defaults": [2.0]}',
                                  '{"type": "ctf", "format_version": [1]}', '{"type": "ctf", "format_version": NaN}'])
def test_pipeline_json_of_the_wrong_shape_is_a_corrupt_file(ctf16, tmp_path, text):
    CTFPipeline(*ctf16).save_pretrained(tmp_path / "p")
    (tmp_path / "p" / "pipeline.json").write_text(text)
    with pytest.raises(CorruptFileError, match=r"p/pipeline\.json .*; save the pipeline again"):
        load_pipeline(tmp_path / "p")


def test_unset_sampling_defaults_keep_the_paper_s(ctf16):
    # a config's `top_k:` left empty (YAML null) became a stored default of None, and every later
    # sample_tokens call failed inside the sampler (TypeError); None means unset, as per call
    for cls, args in ((CTFPipeline, ctf16), (ARPipeline, tiny_baseline(vocab=32, image_tokens=16))):
        pipe = cls(*args, sampling_defaults={"cfg_scale": None, "top_k": None, "temperature": 0.5})
        assert pipe.sampling_defaults == {**cls._defaults, "temperature": 0.5}
        assert pipe.sample_tokens([0], generator=0).shape == (1, 16)
        with pytest.raises(TypeError, match="must be a dict"):
            cls(*args, sampling_defaults=[("cfg_scale", 2.0)])


def test_decode_refuses_tokens_of_another_grid(ctf16):
    # decode reshaped whatever it got to (-1, g, g): two rows of 64 tokens (an 8x8 grid) decoded
    # to eight 4x4 images without a word, and 15 tokens were torch's RuntimeError
    for pipe in (CTFPipeline(*ctf16), ARPipeline(*tiny_baseline(vocab=32, image_tokens=16))):
        with pytest.raises(ValueError, match=r"expected tokens of shape \(B, 16\) or \(B, h, w\) grids, got \(2, 64\)"):
            pipe.decode(torch.zeros(2, 64, dtype=torch.long))
        with pytest.raises(ValueError, match=r"got \(2, 15\)"):
            pipe.decode(torch.zeros(2, 15, dtype=torch.long))
        assert pipe.decode(torch.zeros(2, 16, dtype=torch.long)).shape == (2, 1, 8, 8)
        assert pipe.decode(torch.zeros(2, 4, 4, dtype=torch.long)).shape == (2, 1, 8, 8)


def test_bool_tokens_are_refused(ctf16):
    """A bool tensor was taken for tokens 0 and 1: a mask passed by mistake decoded and scored without a word."""
    pipe = CTFPipeline(*ctf16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, ::2] = True
    for call in (lambda: pipe.decode(mask), lambda: pipe.log_prob(mask, [0, 1]), lambda: pipe.coarse_preview(mask)):
        with pytest.raises(WrongTypeError, match="must be an integer tensor, got torch.bool"):
            call()


def test_stage_2_guidance_without_a_class_prefix_is_refused_before_stage_1(ctf16, monkeypatch):
    """It was accepted as a default and refused by sample_fine at every call, after stage 1 had run."""
    ar, aux, cmap, vq = ctf16
    plain = AuxModel(AuxConfig(**{**aux.config.__dict__, "class_prefix": False}), coarse_map=cmap)
    with pytest.raises(ValueError, match=r"cfg_scale_fine 2.0: stage-2 guidance needs .*class_prefix=True"):
        CTFPipeline(ar, plain, cmap, vq, sampling_defaults={"cfg_scale_fine": 2.0})
    pipe = CTFPipeline(ar, plain, cmap, vq)
    monkeypatch.setattr("ctfgen.pipeline.generate", lambda *a, **k: pytest.fail("stage 1 ran"))
    with pytest.raises(ValueError, match=r"--cfg-scale-fine 3.0: stage-2"):  # as the commands name it
        pipe.resolve_sampling({"cfg_scale_fine": 3.0}, {"cfg_scale_fine": "--cfg-scale-fine"})
    with pytest.raises(ValueError, match=r"cfg_scale_fine 3.0: stage-2"):
        pipe.sample_tokens([0], cfg_scale_fine=3.0)
