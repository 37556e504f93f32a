import math

import pytest
import torch
from _tiny_ctf import all_grids, tiny_baseline, tiny_ctf

from ctfgen.pipeline import ARPipeline, CTFPipeline, bits_per_token
from ctfgen.sampling import generate, log_prob
from ctfgen.utils.errors import ConfigError, MismatchError, WrongTypeError


@pytest.fixture(scope="module")
def grids():
    return all_grids(4, 4)  # fine vocab 4, 2x2 grid: 256 token grids


@pytest.mark.parametrize("label", [0, 2])
def test_ctf_likelihood_sums_to_one(grids, label):
    pipe = CTFPipeline(*tiny_ctf(vocab=4, num_coarse=2, image_tokens=4))
    assert pipe.log_prob_is_exact
    lp = pipe.log_prob(grids, torch.full((len(grids),), label))
    assert lp.dtype == torch.float64 and lp.shape == (256,)
    assert torch.isfinite(lp).all()
    assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    # not trivially uniform: the random models prefer some grids
    assert lp.max() - lp.min() > 0.5


def test_baseline_likelihood_sums_to_one(grids):
    gpt, vq = tiny_baseline(vocab=4, image_tokens=4)
    lp = log_prob(gpt, grids, torch.full((len(grids),), 1))
    assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    pipe = ARPipeline(gpt, vq)
    assert torch.equal(pipe.log_prob(grids.view(-1, 2, 2), torch.full((len(grids),), 1)), lp)


def test_unrestricted_aux_gives_a_lower_bound(grids):
    pipe = CTFPipeline(*tiny_ctf(vocab=4, num_coarse=2, image_tokens=4, restrict=False))
    assert not pipe.log_prob_is_exact
    with pytest.warns(UserWarning, match="lower bound"):
        lp = pipe.log_prob(grids, torch.zeros(len(grids), dtype=torch.long))
    total = lp.exp().sum().item()
    assert 0.0 < total < 1.0 - 1e-3


def test_ctf_log_prob_decomposes(grids):
    ar, aux, cmap, vq = tiny_ctf()
    pipe = CTFPipeline(ar, aux, cmap, vq)
    tokens, labels = grids[::17], torch.arange(len(grids[::17])) % 3
    coarse = cmap(tokens)
    expect = log_prob(ar, coarse, labels) + torch.log_softmax(aux(coarse, labels).double(), -1).gather(
        -1, tokens[..., None]).squeeze(-1).sum(-1)
    assert torch.allclose(pipe.log_prob(tokens, labels), expect, atol=1e-10)


def test_sampler_matches_likelihood(grids):
    """Empirical frequencies of the two-stage sampler (temperatures 1, no guidance, no filtering)
    agree with exp(log_prob): the sampler draws from the distribution the likelihood scores."""
    pipe = CTFPipeline(*tiny_ctf(vocab=4, num_coarse=2, image_tokens=4))
    n, label = 20000, 1
    tokens = pipe.sample_tokens([label] * n, cfg_scale=1.0, temperature=1.0, temperature_fine=1.0, generator=0)
    index = (tokens * torch.tensor([64, 16, 4, 1])).sum(-1)
    freq = torch.bincount(index, minlength=256).double() / n
    p = pipe.log_prob(grids, torch.full((256,), label)).exp()
    tv = 0.5 * (freq - p).abs().sum().item()
    assert tv < 0.05, tv


def test_bits_per_token():
    lp = torch.tensor([-4 * math.log(2.0) * 3.0], dtype=torch.float64)
    assert bits_per_token(lp, 4).item() == pytest.approx(3.0)


def test_uniform_models_give_log_vocab():
    # zero output heads (fresh init) are uniform: p(fine) = 1/K^L * prod 1/|cluster|
    from ctfgen.models.transformer import GPT, AuxModel

    ar, aux, cmap, vq = tiny_ctf()
    ar2, aux2 = GPT(ar.config).eval(), AuxModel(aux.config, coarse_map=cmap).eval()
    pipe = CTFPipeline(ar2, aux2, cmap, vq)
    tokens = torch.tensor([[0, 1, 2, 3]])
    expect = -4 * math.log(2) - sum(math.log(int(cmap.sizes[c])) for c in cmap(tokens)[0].tolist())
    assert pipe.log_prob(tokens, [0]).item() == pytest.approx(expect, abs=1e-6)
    coarse = generate(ar2, [0], generator=0)
    assert coarse.shape == (1, 4)


def test_log_prob_ignores_training_mode(grids):
    pipe = CTFPipeline(*tiny_ctf())
    ref = pipe.log_prob(grids[:8], [0] * 8)
    pipe.ar.train(), pipe.aux.train()
    assert torch.equal(pipe.log_prob(grids[:8], [0] * 8), ref)
    assert pipe.aux.training


def test_log_prob_refuses_tokens_and_labels_out_of_range():
    # ARPipeline.log_prob and ctfgen.log_prob raised torch's IndexError/RuntimeError for tokens of
    # another tokenizer or labels past the classes (a device assert on CUDA), and float tokens were
    # truncated to integers and scored without a word.
    gpt, vq = tiny_baseline()
    pipe, ctf = ARPipeline(gpt, vq), CTFPipeline(*tiny_ctf())
    for p in (pipe, ctf):
        with pytest.raises(MismatchError, match=r"tokens must be in \[0, 4\), got range \[0, 4\]"):
            p.log_prob(torch.tensor([[0, 1, 2, 4]]), [0])
        with pytest.raises(WrongTypeError, match="integer tensor"):
            p.log_prob(torch.tensor([[0.5, 1.0, 2.0, 3.0]]), [0])
    with pytest.raises(MismatchError, match=r"got range \[-1, 3\]"):
        pipe.log_prob(torch.tensor([[-1, 1, 2, 3]]), [0])
    with pytest.raises(MismatchError, match="another tokenizer"):
        log_prob(gpt, torch.tensor([[0, 7, 2, 3]]), [0])
    with pytest.raises(ConfigError, match="class labels must be in"):
        log_prob(gpt, torch.tensor([[0, 1, 2, 3]]), [4])
    assert torch.isfinite(log_prob(gpt, torch.tensor([[0, 1, 2, 3]]), [3]))  # the null label is allowed


def test_heldout_bits_per_token_of_no_images_is_refused(tmp_path):
    """A limit of 0 (or codes without images) gave nan bits per token, as if measured."""
    from ctfgen.data.codes import write_codes
    from ctfgen.pipeline import heldout_bits_per_token

    gpt, vq = tiny_baseline()
    header = {"tokenizer_fingerprint": vq.fingerprint, "grid_size": 2, "augment": "none", "dataset": "test",
              "codebook_size": 4, "num_classes": 3}
    codes = write_codes(tmp_path / "codes", torch.zeros(2, 1, 4, dtype=torch.long), [0, 1], header)
    pipe = ARPipeline(gpt, vq)
    assert heldout_bits_per_token(pipe, codes, limit=1)["images"] == 1
    for limit in (0, -3):
        with pytest.raises(ConfigError, match="no images to score"):
            heldout_bits_per_token(pipe, codes, limit=limit)
