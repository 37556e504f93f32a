"""generate / filters / guidance / log_prob, checked against hand-built cases and a naive sampler."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from ctfgen.models import GPT, GPTConfig, llamagen_generate
from ctfgen.sampling import as_generator, cfg_combine, filter_logits, generate, log_prob, sample_from_logits
from ctfgen.utils.errors import WrongTypeError
from ctfgen.utils.options import integer_tokens

NEG = float("-inf")


def tiny_gpt(vocab=11, image_tokens=16, num_classes=3, std=0.3, seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig.from_preset("GPT-tiny", vocab_size=vocab, image_tokens=image_tokens, num_classes=num_classes)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


def naive_generate(gpt, labels, cfg_scale=1.0, cfg_steps=None, **kw):
    """LlamaGen's sampler written the slow way: full forward per step, no cache."""
    gpt.eval()
    B, L = len(labels), gpt.config.image_tokens
    n_guided = L if cfg_steps is None else cfg_steps
    null = torch.full_like(labels, gpt.config.num_classes)
    out = torch.empty(B, 0, dtype=torch.long)
    with torch.no_grad():
        for k in range(L):
            cond = gpt(out, labels)[:, -1]
            if cfg_scale != 1.0 and k < n_guided:
                uncond = gpt(out, null)[:, -1]
                logits = uncond + (cond - uncond) * cfg_scale
            else:
                logits = cond
            out = torch.cat([out, sample_from_logits(logits, **kw)[:, None]], dim=1)
    return out


def test_cfg_formula():
    cond, uncond = torch.tensor([1.0, 2.0, -3.0]), torch.tensor([0.5, 4.0, -1.0])
    torch.testing.assert_close(cfg_combine(cond, uncond, 2.0), torch.tensor([1.5, 0.0, -5.0]))
    torch.testing.assert_close(cfg_combine(cond, uncond, 1.0), cond)
    torch.testing.assert_close(cfg_combine(cond, uncond, 0.0), uncond)


def kept(logits):
    return {i for i, v in enumerate(logits.tolist()) if v != NEG}


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 2.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
    out = filter_logits(logits, top_k=2)
    assert kept(out[0]) == {1, 4} and kept(out[1]) == {0, 1}
    assert torch.equal(out[0, [1, 4]], logits[0, [1, 4]])
    assert kept(filter_logits(logits, top_k=99)[0]) == set(range(5))
    ties = torch.tensor([1.0, 2.0, 2.0, 0.0])
    assert kept(filter_logits(ties, top_k=1)) == {1, 2}  # LlamaGen: strictly below the k-th goes
    assert torch.equal(filter_logits(logits), logits)


@pytest.mark.parametrize(
    "p, want",
    [(0.45, {3}), (0.5, {3, 0}), (0.7, {3, 0}), (0.85, {3, 0, 4}), (0.96, {3, 0, 4, 1}), (0.999, {3, 0, 4, 1})],
)
def test_top_p_keeps_the_crossing_token(p, want):
    # probabilities 0.3, 0.05, 0.0 (none), 0.5, 0.15 in shuffled order; sorted cum: .5 .8 .95 1.0
    probs = torch.tensor([0.30, 0.05, 1e-12, 0.50, 0.15], dtype=torch.float64)
    logits = probs.log().float()
    assert kept(filter_logits(logits[None], top_p=p)[0]) == want


def test_top_p_always_keeps_the_top_token_and_combines_with_top_k():
    logits = torch.tensor([[0.0, 10.0, 0.0]])
    assert kept(filter_logits(logits, top_p=0.01)[0]) == {1}
    logits = torch.tensor([[1.0, 0.9, 0.8, -5.0]])
    # top-k=2 first renormalises over {0, 1}, so top-p 0.6 then keeps both (0.525 < 0.6)
    assert kept(filter_logits(logits, top_k=2, top_p=0.6)[0]) == {0, 1}


def test_sample_from_logits_respects_filters_and_distribution():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).log_softmax(-1)
    draws = sample_from_logits(logits.expand(20000, 4), generator=g)
    freq = torch.bincount(draws, minlength=4).double() / 20000
    torch.testing.assert_close(freq, logits.double().softmax(-1), atol=0.015, rtol=0)
    assert set(sample_from_logits(logits.expand(2000, 4), top_k=2, generator=g).tolist()) == {0, 1}
    assert set(sample_from_logits(logits.expand(2000, 4), top_p=0.7, generator=g).tolist()) == {0, 1}
    x = torch.randn(7, 9, 5)
    assert torch.equal(sample_from_logits(x, top_k=1), x.argmax(-1))
    assert torch.equal(sample_from_logits(x, temperature=0.0, generator=g), x.argmax(-1))
    assert sample_from_logits(x, generator=1).shape == (7, 9)


@pytest.mark.parametrize("cfg_scale, cfg_steps", [(1.0, None), (2.0, None), (3.0, 5)])
def test_greedy_generate_matches_naive_sampler(cfg_scale, cfg_steps):
    gpt = tiny_gpt()
    labels = torch.tensor([0, 2, 1])
    got = generate(gpt, labels, cfg_scale=cfg_scale, cfg_steps=cfg_steps, top_k=1)
    want = naive_generate(gpt, labels, cfg_scale=cfg_scale, cfg_steps=cfg_steps, top_k=1)
    assert got.shape == (3, 16) and got.dtype == torch.long
    assert torch.equal(got, want)


def test_sampled_generate_matches_naive_sampler_for_a_seed():
    gpt = tiny_gpt()
    labels = torch.tensor([1, 2])
    kw = dict(temperature=1.1, top_k=8, top_p=0.95)
    got = generate(gpt, labels, cfg_scale=1.5, generator=7, **kw)
    want = naive_generate(gpt, labels, cfg_scale=1.5, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(got, want)


def test_generate_is_reproducible_and_guidance_matters():
    gpt = tiny_gpt()
    labels = [0, 1, 2, 0]
    a = generate(gpt, labels, cfg_scale=2.0, generator=123)
    assert torch.equal(a, generate(gpt, labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(123)))
    assert not torch.equal(a, generate(gpt, labels, cfg_scale=2.0, generator=124))
    # the guided prefix decides the rest: with cfg_steps = all it is full guidance, with 0 none
    assert torch.equal(generate(gpt, labels, cfg_scale=2.0, cfg_steps=16, generator=5),
                       generate(gpt, labels, cfg_scale=2.0, generator=5))
    assert torch.equal(generate(gpt, labels, cfg_scale=2.0, cfg_steps=0, generator=5),
                       generate(gpt, labels, cfg_scale=1.0, generator=5))
    greedy_cfg = generate(gpt, labels, cfg_scale=4.0, top_k=1)
    assert not torch.equal(greedy_cfg, generate(gpt, labels, top_k=1))
    assert not torch.equal(greedy_cfg, generate(gpt, labels, cfg_scale=4.0, cfg_steps=2, top_k=1))


def test_generate_restores_mode_frees_caches_and_checks_labels():
    gpt = tiny_gpt().train()
    generate(gpt, [0], generator=0)
    assert gpt.training and all(layer.attention.kv_cache is None for layer in gpt.layers)
    with pytest.raises(ValueError, match="class labels must be in"):
        generate(gpt, [4])
    null = generate(gpt, [3], top_k=1)  # the null label = unconditional
    assert null.shape == (1, 16)


def test_generate_bf16_autocast_runs():
    gpt = tiny_gpt()
    out = generate(gpt, [0, 1], cfg_scale=2.0, generator=0, dtype="bf16")
    assert out.shape == (2, 16) and out.min() >= 0 and out.max() < 11
    assert gpt.tok_embeddings.weight.dtype == torch.float32


def test_log_prob_is_teacher_forced_sum():
    gpt = tiny_gpt().train()
    tokens = torch.randint(0, 11, (2, 16))
    labels = torch.tensor([2, 0])
    lp = log_prob(gpt, tokens, labels)
    assert lp.dtype == torch.float64 and lp.shape == (2,) and gpt.training
    gpt.eval()
    logits = gpt(tokens, labels)[:, :16].double()
    want = logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1).sum(-1)
    torch.testing.assert_close(lp, want)


def test_baseline_log_prob_sums_to_one_over_all_grids():
    gpt = tiny_gpt(vocab=3, image_tokens=4, std=0.5)
    grids = torch.tensor(list(itertools.product(range(3), repeat=4)))
    for label in (0, 2, 3):
        lp = log_prob(gpt, grids, torch.full((len(grids),), label))
        assert abs(lp.exp().sum().item() - 1.0) < 1e-5
        assert lp.max() - lp.min() > 1.0  # not the uniform distribution


@pytest.mark.parametrize("cfg_scale, cfg_interval", [(1.0, -1), (2.0, -1), (4.0, 3)])
def test_greedy_tokens_equal_llamagen_reference(cfg_scale, cfg_interval):
    gpt = tiny_gpt(image_tokens=25)
    labels = torch.tensor([0, 2, 1, 0])
    want = llamagen_generate(gpt, labels, cfg_scale=cfg_scale, cfg_interval=cfg_interval, top_k=1)
    cfg_steps = None if cfg_interval < 0 else cfg_interval + 2
    got = generate(gpt, labels, cfg_scale=cfg_scale, cfg_steps=cfg_steps, top_k=1)
    assert want.shape == (4, 25) and torch.equal(got, want)


def test_llamagen_reference_stopped_early_is_a_prefix():
    gpt = tiny_gpt(image_tokens=25)
    full = llamagen_generate(gpt, [0, 1], cfg_scale=2.0, top_k=1)
    assert torch.equal(llamagen_generate(gpt, [0, 1], cfg_scale=2.0, top_k=1, decode_steps=5), full[:, :6])
    assert llamagen_generate(gpt, [0, 1], top_k=1, decode_steps=0).shape == (2, 1)


def test_sampled_tokens_equal_llamagen_reference_for_a_seed():
    # one torch.multinomial over the (B, V) guided probabilities per token, as LlamaGen
    gpt = tiny_gpt(image_tokens=25)
    labels = torch.tensor([1, 2, 0])
    torch.manual_seed(11)
    want = llamagen_generate(gpt, labels, cfg_scale=1.5, temperature=1.2)
    got = generate(gpt, labels, cfg_scale=1.5, temperature=1.2, generator=torch.Generator().manual_seed(11))
    assert torch.equal(got, want)


def test_top_k_draws_on_the_top_k_only_with_the_masked_distribution():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.5, 2.0, -1.0, 1.5, 1.0, -3.0])
    want = filter_logits(logits[None], top_k=3).softmax(-1)[0].double()
    draws = sample_from_logits(logits.expand(40000, 6), top_k=3, generator=g)
    assert set(draws.tolist()) == {1, 3, 4}
    torch.testing.assert_close(torch.bincount(draws, minlength=6).double() / 40000, want, atol=0.01, rtol=0)
    # top-p on the top-k keeps what LlamaGen's filter keeps (top-4 probabilities .46 .28 .17 .10)
    for p, want_kept in ((0.7, {1, 3}), (0.8, {1, 3, 4})):
        assert kept(filter_logits(logits[None], top_k=4, top_p=p)[0]) == want_kept
        assert set(sample_from_logits(logits.expand(4000, 6), top_k=4, top_p=p, generator=g).tolist()) == want_kept
    # a tie at the k-th value keeps every tied token, as LlamaGen's filter does
    ties = torch.tensor([3.0, 1.0, 1.0, 1.0, -2.0])
    assert set(sample_from_logits(ties.expand(4000, 5), top_k=2, temperature=0.5, generator=g).tolist()) == {0, 1, 2, 3}
    # greedy, and top_k >= V, are unchanged
    assert torch.equal(sample_from_logits(logits[None], top_k=1), torch.tensor([1]))
    assert set(sample_from_logits(logits.expand(4000, 6), top_k=6, generator=g).tolist()) == set(range(6))


def test_caches_made_under_inference_mode_are_remade_outside_it():
    # generate(compile=True) keeps its caches between calls; made under inference_mode (as evaluation
    # samples), they were reused by the next plain call, whose in-place cache write then raised.
    gpt = tiny_gpt()
    with torch.inference_mode():
        gpt.setup_caches(4)
    assert torch.equal(generate(gpt, [0, 1], cfg_scale=2.0, generator=0),
                       generate(gpt, [0, 1], cfg_scale=2.0, generator=0))
    with torch.inference_mode():
        gpt.setup_caches(4)
        kept = gpt.layers[0].attention.kv_cache
        gpt.setup_caches(4)  # inside inference_mode the cache stays usable
        assert gpt.layers[0].attention.kv_cache is kept


def test_generator_on_another_device_than_the_model_is_refused():
    # a CPU torch.Generator() for a CUDA model reached torch.multinomial, a bare RuntimeError
    g = torch.Generator()
    assert as_generator(g, "cpu") is g and as_generator(g, torch.device("cpu")) is g
    with pytest.raises(ValueError, match=r"generator is on cpu but the model is on cuda:0.*device='cuda:0'"):
        as_generator(g, torch.device("cuda", 0))
    assert as_generator(None, "cuda") is None


@pytest.mark.parametrize("labels", [[0, 2.5], [True], ["1"], [float("nan")]])
def test_labels_that_are_not_whole_numbers_are_refused(labels):
    # they were cast to int64: 2.5 sampled class 2 and True class 1 without a word; a string was
    # torch's ValueError and nan its RuntimeError
    with pytest.raises(ValueError, match="class labels must be whole numbers"):
        generate(tiny_gpt(), labels)


def test_whole_float_labels_are_classes():
    gpt = tiny_gpt()
    assert torch.equal(generate(gpt, [2.0, 1.0], top_k=1), generate(gpt, [2, 1], top_k=1))


def test_log_prob_refuses_sequences_longer_than_the_grid_or_empty():
    # the forward sees tokens[:, :-1]: grid + 1 tokens were scored (the last from a position past the
    # grid) without a word, grid + 2 were refused as "got grid + 1 tokens", and none was torch's RuntimeError
    gpt = tiny_gpt(image_tokens=4)
    tokens = torch.randint(0, 11, (2, 6))
    with pytest.raises(ValueError, match="tokens must hold 1 to 4 tokens per image .*got 5"):
        log_prob(gpt, tokens[:, :5], [0, 1])
    with pytest.raises(ValueError, match="got 6"):
        log_prob(gpt, tokens, [0, 1])
    with pytest.raises(ValueError, match="got 0"):
        log_prob(gpt, tokens[:, :0], [0, 1])
    assert log_prob(gpt, tokens[:, :4], [0, 1]).shape == (2,)
    assert log_prob(gpt, tokens[:, :1], [0, 1]).shape == (2,)  # a prefix is scored


@pytest.mark.parametrize("tokens", [[[1, 2], [3]], [[1], [2, 3]], ["a"], None])
def test_tokens_torch_cannot_read_are_a_clear_error(tokens):
    # a ragged list was torch.as_tensor's bare ValueError "expected sequence of length 2 at dim 1 (got 1)",
    # None its RuntimeError "Could not infer dtype of NoneType"
    with pytest.raises(WrongTypeError, match="tokens must be an integer tensor or a nested list of integers"):
        integer_tokens(tokens)
    with pytest.raises(WrongTypeError, match="tokens must be an integer tensor or a nested list of integers"):
        log_prob(tiny_gpt(image_tokens=4), tokens, [0, 1])
    assert torch.equal(integer_tokens([[1, 2], [3, 4]]), torch.tensor([[1, 2], [3, 4]]))
