"""Sampling precision: dtype names, `auto`, weights cast once, float32 untouched, training autocast."""

import sys

import pytest
import torch

from _tiny_ctf import SMALL, tiny_baseline, tiny_ctf
from ctfgen.models import GPT, GPTConfig
from ctfgen.models.transformer import AuxConfig, AuxModel
from ctfgen.models.transformer import kv_cache_dtype
from ctfgen.pipeline import ARPipeline, CTFPipeline
from ctfgen.utils.errors import ConfigError
from ctfgen.utils.precision import INT8, cast_weights, cpu_has_native_bf16, dtype_name, resolve_dtype
from ctfgen.sampling import generate, log_prob, sample_fine
from ctfgen.train.loop import TrainConfig, training_autocast


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_preset("GPT-tiny", vocab_size=11, image_tokens=16, num_classes=3))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def test_resolve_dtype_names_and_auto(monkeypatch):
    assert resolve_dtype("float32") is torch.float32 and resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("float16") is torch.float16 and resolve_dtype(torch.bfloat16) is torch.bfloat16
    assert resolve_dtype(None) is None
    assert resolve_dtype("auto", "cuda") is torch.bfloat16
    assert resolve_dtype("auto", "cpu") is (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    monkeypatch.setattr("ctfgen.utils.precision.cpu_has_native_bf16", lambda: False)
    assert resolve_dtype("auto", "cpu") is torch.float32
    monkeypatch.setattr("ctfgen.utils.precision.cpu_has_native_bf16", lambda: True)
    assert resolve_dtype("auto", "cpu") is torch.bfloat16
    monkeypatch.setattr("ctfgen.utils.precision.cpu_has_native_bf16", lambda: False)
    assert resolve_dtype("auto", "mps") is torch.float32


@pytest.mark.parametrize("bad", ["float64", "int4", "half-ish", torch.int32, 3])
def test_unsupported_dtype_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="unsupported dtype.*auto, float32, bfloat16, float16, int8, int8-weight, int8-fbgemm"):
        resolve_dtype(bad)
    with pytest.raises(ValueError, match="unsupported dtype"):
        generate(tiny_gpt(), [0], dtype=bad)


def test_float32_is_the_model_itself_and_unchanged():
    gpt = tiny_gpt()
    assert cast_weights(gpt, "float32") is gpt and cast_weights(gpt, None) is gpt
    ref = generate(gpt, [0, 1, 2], cfg_scale=2.0, generator=5)
    assert torch.equal(generate(gpt, [0, 1, 2], cfg_scale=2.0, generator=5, dtype="float32"), ref)
    greedy = generate(gpt, [0, 1], top_k=1)
    # greedy float32 equals argmax of the full teacher-forced forward pass
    logits = gpt.eval()(greedy[:, :-1], torch.tensor([0, 1]))
    assert torch.equal(logits.argmax(-1), greedy)


def test_cast_once_and_original_untouched():
    gpt = tiny_gpt()
    a = cast_weights(gpt, "bfloat16")
    assert a is not gpt and a.tok_embeddings.weight.dtype == torch.bfloat16
    assert a.freqs_cis.dtype == torch.float32  # RoPE table stays float32
    assert cast_weights(gpt, torch.bfloat16) is a  # cached
    assert gpt.tok_embeddings.weight.dtype == torch.float32
    with torch.no_grad():
        gpt.output.weight.add_(1.0)  # weights changed -> a fresh copy
    b = cast_weights(gpt, "bf16")
    assert b is not a and torch.equal(b.output.weight, gpt.output.weight.bfloat16())


def test_cast_copy_follows_the_aux_coarse_map_buffer():
    # the cache key covered parameters only: a new map written into fine_to_coarse (set_coarse_map on a model
    # without fingerprints) kept returning the copy made with the old map
    class Map:
        def __init__(self, f2c):
            self.fine_to_coarse, self.num_coarse, self.vocab_size = torch.tensor(f2c), 2, 4
            self.fingerprint = self.codebook_fingerprint = None

    aux = AuxModel(AuxConfig(vocab_size=4, num_coarse=2, image_tokens=4, num_classes=3, **SMALL))
    aux.set_coarse_map(Map([0, 0, 1, 1]))
    a = cast_weights(aux, "bfloat16")
    assert cast_weights(aux, "bfloat16") is a and a.fine_to_coarse.tolist() == [0, 0, 1, 1]
    aux.set_coarse_map(Map([0, 1, 1, 1]))
    b = cast_weights(aux, "bfloat16")
    assert b is not a and b.fine_to_coarse.tolist() == [0, 1, 1, 1]
    assert cast_weights(aux, "bfloat16") is b  # sampling's KV caches are not part of the key


def test_pipeline_to_drops_the_cast_copies():
    # the bf16/int8 copies of the old device stayed cached on the models after pipeline.to(), holding its memory
    ar, aux, cmap, vq = tiny_ctf()
    pipe = CTFPipeline(ar, aux, cmap, vq)
    pipe.sample_tokens([0, 1], generator=0, dtype="bfloat16")
    assert ar.__dict__.get("_ctfgen_casts") and aux.__dict__.get("_ctfgen_casts")
    assert pipe.to("cpu") is pipe
    assert not ar.__dict__.get("_ctfgen_casts") and not aux.__dict__.get("_ctfgen_casts")


def test_generate_bf16_outputs_and_kv_cache_dtype():
    gpt = tiny_gpt()
    seen = {}
    cast = cast_weights(gpt, "bfloat16")
    orig = cast.forward_step

    def spy(tokens, pos):
        seen["cache"] = cast.layers[0].attention.kv_cache.k_cache.dtype
        seen["weights"] = cast.layers[0].attention.wqkv.weight.dtype
        out = orig(tokens, pos)
        seen["logits"] = out.dtype
        return out

    cast.forward_step = spy
    out = generate(gpt, [0, 1], cfg_scale=2.0, generator=0, dtype="bfloat16")
    assert out.dtype == torch.long and out.shape == (2, 16) and 0 <= out.min() and out.max() < 11
    # bf16 weights; the KV cache and attention stay float32 on the CPU (kv_cache_dtype), the model's dtype elsewhere
    assert seen == {"cache": torch.float32, "weights": torch.bfloat16, "logits": torch.float32}
    assert kv_cache_dtype(torch.bfloat16, "cpu") is torch.float32
    assert kv_cache_dtype(torch.bfloat16, "cuda") is torch.bfloat16
    # float16 runs too (slow on CPU, but valid)
    assert generate(gpt, [2], generator=0, dtype="float16").shape == (1, 16)


def test_pipelines_honour_dtype_and_log_prob_stays_float32():
    ar, aux, cmap, vq = tiny_ctf()
    ctf = CTFPipeline(ar, aux, cmap, vq)
    gpt, vq2 = tiny_baseline()
    base = ARPipeline(gpt, vq2)
    for pipe in (ctf, base):
        t32 = pipe.sample_tokens([0, 1, 2], generator=3)
        assert torch.equal(pipe.sample_tokens([0, 1, 2], generator=3, dtype="float32"), t32)
        tb = pipe.sample_tokens([0, 1, 2], generator=3, dtype="bfloat16")
        assert tb.dtype == torch.long and tb.shape == t32.shape
        images = pipe.sample([0, 1], generator=3, dtype="auto")
        assert images.dtype == torch.float32 and images.shape[0] == 2
        assert all(p.dtype == torch.float32 for m in pipe._models() for p in m.parameters())
        lp = pipe.log_prob(t32, [0, 1, 2])
        assert lp.dtype == torch.float64 and torch.isfinite(lp).all()
    fine = sample_fine(aux, torch.zeros(2, 4, dtype=torch.long), [0, 1], dtype="bfloat16", generator=0)
    assert fine.dtype == torch.long and bool((cmap.fine_to_coarse[fine] == 0).all())


def test_log_prob_float32_model():
    gpt = tiny_gpt()
    tokens = torch.randint(0, 11, (2, 16))
    assert log_prob(gpt, tokens, [0, 1]).dtype == torch.float64


def test_training_mixed_precision_auto(monkeypatch):
    assert TrainConfig(steps=1).mixed_precision == "auto"
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(steps=1, mixed_precision="fp8")
    cpu = torch.device("cpu")
    monkeypatch.setattr("ctfgen.utils.precision.cpu_has_native_bf16", lambda: True)
    ctx = training_autocast("auto", cpu)
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16
    assert not isinstance(training_autocast("none", cpu), torch.autocast)
    monkeypatch.setattr("ctfgen.utils.precision.cpu_has_native_bf16", lambda: False)
    assert not isinstance(training_autocast("auto", cpu), torch.autocast)
    assert isinstance(training_autocast("bf16", cpu), torch.autocast)
    # bf16 asked for on a device it has no autocast for here (MPS): an error, not float32 in silence
    mps = torch.device("mps")
    with pytest.raises(ConfigError, match="mixed_precision=bf16 autocasts on CUDA and CPU only, not on mps"):
        training_autocast("bf16", mps)
    assert not isinstance(training_autocast("auto", mps), torch.autocast)


def _needs(scheme):
    if INT8[scheme].backend == "torchao":
        pytest.importorskip("torchao", reason="the quant extra (pip install 'ctfgen[quant]') is not installed")


@pytest.mark.parametrize("scheme", list(INT8))
def test_int8_quantizes_the_linear_layers_of_a_copy(scheme):
    _needs(scheme)
    assert resolve_dtype(scheme) is INT8[scheme] and dtype_name(resolve_dtype(scheme.upper())) == scheme
    gpt = tiny_gpt()
    q = cast_weights(gpt, scheme)
    assert q is not gpt and cast_weights(gpt, scheme) is q  # made once
    linear = q.layers[0].attention.wqkv
    if INT8[scheme].backend == "torchao":
        assert type(linear.weight).__name__ == "Int8Tensor" and linear.weight.qdata.dtype == torch.int8
    else:
        assert type(linear).__module__.startswith("torch.ao.nn.quantized.dynamic")
    # embeddings, norms and the original model stay float32
    assert q.tok_embeddings.weight.dtype == torch.float32 and q.norm.weight.dtype == torch.float32
    assert type(gpt.layers[0].attention.wqkv.weight) is torch.nn.Parameter
    tokens = torch.randint(0, 11, (2, 16))
    want = gpt.eval()(tokens, torch.tensor([0, 1]))
    got = q(tokens, torch.tensor([0, 1]))
    assert got.dtype == torch.float32 and not torch.equal(got, want)
    # int8's error in this small random model: 3 % (weight-only) to 9 % (fbgemm's per-tensor activations)
    assert (got - want).norm() < 0.15 * want.norm()
    out = generate(gpt, [0, 1, 2], cfg_scale=2.0, generator=0, dtype=scheme)
    assert out.shape == (3, 16) and 0 <= out.min() and out.max() < 11


@pytest.mark.parametrize("scheme", list(INT8))
def test_int8_pipelines_keep_the_aux_output_float(scheme):
    _needs(scheme)
    ar, aux, cmap, vq = tiny_ctf()
    ctf = CTFPipeline(ar, aux, cmap, vq)
    q = cast_weights(aux, scheme)
    assert type(q.output) is torch.nn.Linear and type(q.output.weight) is torch.nn.Parameter
    tokens = ctf.sample_tokens([0, 1], generator=1, dtype=scheme)
    assert tokens.shape == (2, ctf.image_tokens) and tokens.dtype == torch.long
    assert ctf.sample([0], generator=1, dtype=scheme).dtype == torch.float32


def test_int8_without_torchao_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "torchao", None)
    with pytest.raises(ConfigError, match=r"pip install 'ctfgen\[quant\]'"):
        cast_weights(tiny_gpt(), "int8")


def test_int8_fbgemm_off_the_cpu_is_a_clear_error():
    # fbgemm's packed weights and dynamic linear exist on the CPU only; "meta" stands in for CUDA here
    with torch.device("meta"):
        gpt = GPT(GPTConfig.from_preset("GPT-tiny", vocab_size=11, image_tokens=16, num_classes=3))
    with pytest.raises(ConfigError, match="int8-fbgemm runs on the CPU only.*meta.*--dtype int8"):
        cast_weights(gpt, "int8-fbgemm")
    assert not gpt.__dict__.get("_ctfgen_casts")
