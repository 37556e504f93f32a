"""The in-cluster output head of a restricted AuxModel: the same distribution as the masked
(B, L, V) softmax, in training, log_prob and stage-2 sampling, with clusters of very different sizes."""

import pytest
import torch
import torch.nn.functional as F

from ctfgen.clustering import CoarseMap
from ctfgen.data.codes import write_codes
from ctfgen.models import AuxConfig, AuxModel, GPT, GPTConfig, cluster_table
from ctfgen.pipeline import CTFPipeline
from ctfgen.sampling import sample_fine
from ctfgen.train.stages import build_stage

V, K, GRID = 48, 5, 3
L = GRID * GRID
SIZES = [1, 2, 5, 10, 30]  # very uneven clusters, the largest 30x the smallest
METHODS = ["grouped", "gather", "full"]


def uneven_map(seed=0):
    g = torch.Generator().manual_seed(seed)
    f2c = torch.repeat_interleave(torch.arange(K), torch.tensor(SIZES))[torch.randperm(V, generator=g)]
    return CoarseMap(f2c, K, codebook_fingerprint="cb-uneven", method="random")


def random_aux(cmap, seed=0, std=0.3, dim=32, **kw):
    torch.manual_seed(seed)
    cfg = AuxConfig(vocab_size=V, num_coarse=K, image_tokens=L, num_classes=3, dim=dim, n_layer=2, n_head=2,
                    multiple_of=16, **kw)
    model = AuxModel(cfg, coarse_map=cmap)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.normal_(0, std)
    return model.eval()


def masked_probs(model, coarse, labels):
    """Today's reference: the full (B, L, V) logits with -inf outside the cluster, softmaxed."""
    return model(coarse, labels).softmax(-1)


def test_cluster_table_lists_every_member_once():
    cmap = uneven_map()
    t = cluster_table(cmap.fine_to_coarse, K)
    assert t.members.shape == (K, 32) and t.valid.shape == (K, 32)  # largest cluster 30, padded to 8s
    assert t.valid.sum(1).tolist() == cmap.sizes.tolist()
    for c in range(K):
        assert torch.equal(t.members[c][t.valid[c]], cmap.members(c))
        assert torch.all(t.members[c][~t.valid[c]] == cmap.members(c)[0])  # padding is a real row
    f2c = cmap.fine_to_coarse
    assert torch.equal(t.members[f2c, t.position], torch.arange(V))
    with pytest.raises(ValueError, match="at least one member"):
        cluster_table(torch.tensor([0, 0, 2]), 3)


@pytest.mark.parametrize("method", METHODS)
def test_in_cluster_probabilities_equal_masked_softmax(method):
    cmap = uneven_map()
    model = random_aux(cmap)
    coarse = torch.randint(0, K, (4, L), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3])
    ref = masked_probs(model, coarse, labels)
    table = model.cluster_table()
    with torch.no_grad():
        h = model.norm(_trunk(model, coarse, labels))
        logits = model._in_cluster_logits(h, coarse, table, method=method)
    logits = logits.masked_fill(~table.valid[coarse], float("-inf"))
    probs = logits.softmax(-1)
    torch.testing.assert_close(probs, ref.gather(-1, table.members[coarse]) * table.valid[coarse], atol=1e-5, rtol=0)
    assert torch.all(probs[~table.valid[coarse]] == 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, L))
    if method == "grouped":  # what forward picks on the CPU
        torch.testing.assert_close(model(coarse, labels, in_cluster=True), logits, atol=0, rtol=0)


def _trunk(model, coarse, labels):
    """The hidden states before the final norm, by running the model with a hook on `norm`."""
    seen = {}
    handle = model.norm.register_forward_hook(lambda m, args, out: seen.setdefault("h", args[0]))
    try:
        model(coarse, labels)
    finally:
        handle.remove()
    return seen["h"]


def test_forward_picks_the_full_head_when_one_cluster_dominates():
    """A map with one cluster holding almost the whole codebook makes the padded table K*M much
    larger than V; forward then gathers from the full logits, still equal to the masked softmax."""
    f2c = torch.zeros(V, dtype=torch.long)
    f2c[: K - 1] = torch.arange(1, K)  # clusters 1..4 own one code each, cluster 0 owns 44
    cmap = CoarseMap(f2c, K, codebook_fingerprint="cb-skew", method="random")
    import ctfgen.models.transformer as T

    model = random_aux(cmap)
    coarse = torch.randint(0, K, (2, L), generator=torch.Generator().manual_seed(2))
    table = model.cluster_table()
    assert table.members.shape == (K, 48)
    old = T._MAX_TABLE_BLOWUP
    try:
        for blowup in (1, 1000):  # the full head, then the table head, both through forward
            T._MAX_TABLE_BLOWUP = blowup
            got = model(coarse, None, in_cluster=True).softmax(-1)
            ref = masked_probs(model, coarse, None).gather(-1, table.members[coarse]) * table.valid[coarse]
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    finally:
        T._MAX_TABLE_BLOWUP = old


def test_autocast_bf16_head_runs_close():
    model = random_aux(uneven_map())
    coarse = torch.randint(0, K, (2, L), generator=torch.Generator().manual_seed(3))
    ref = model(coarse, None, in_cluster=True).softmax(-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(coarse, None, in_cluster=True)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.softmax(-1), ref, atol=0.05, rtol=0)


def test_table_follows_the_map_and_is_never_saved(tmp_path):
    cmap, other = uneven_map(0), uneven_map(1)
    model = random_aux(cmap)
    before = model.cluster_table()
    assert model.cluster_table() is before  # cached
    assert set(model.state_dict()) == {n for n, _ in model.named_parameters()} | {"fine_to_coarse"}
    model.save_pretrained(tmp_path / "aux")
    # another map of the same shape: set_coarse_map and load_state_dict both rebuild the table
    moved = random_aux(other)
    assert torch.equal(moved.cluster_table().position, cluster_table(other.fine_to_coarse, K).position)
    moved.load_state_dict(model.state_dict())
    assert torch.equal(moved.cluster_table().members, before.members)
    loaded = AuxModel.from_pretrained(tmp_path / "aux").eval()
    coarse = torch.randint(0, K, (2, L))
    assert torch.equal(loaded(coarse, None, in_cluster=True), model(coarse, None, in_cluster=True))


def make_codes(path, cmap, n=24, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, V, (n, 1, L), generator=g)
    header = {"tokenizer_fingerprint": cmap.codebook_fingerprint, "grid_size": GRID, "augment": "none",
              "dataset": "synthetic", "num_classes": classes, "codebook_size": V}
    return write_codes(path, codes, torch.arange(n) % classes, header)


def test_training_loss_and_gradients_equal_masked_cross_entropy(tmp_path):
    cmap = uneven_map()
    codes = make_codes(tmp_path / "codes", cmap)
    st = build_stage("aux", codes, cmap, preset="Aux-tiny", model=dict(class_dropout=0.0, token_dropout=0.0,
                                                                       resid_dropout=0.0, ffn_dropout=0.0))
    model = st.model.train()
    with torch.no_grad():
        model.output.weight.normal_(0, 0.3)  # the zero-initialised head would make both trivially uniform
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, V, (6, L), generator=g)
    y = torch.arange(6) % 3
    loss = st.loss_fn(model, (x, y))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(cmap(x), y)  # the masked full softmax, as before the in-cluster head
    ref = F.cross_entropy(logits.reshape(-1, V), x.reshape(-1))
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
    # the unrestricted model keeps the full-vocabulary loss
    free = build_stage("aux", codes, cmap, preset="Aux-tiny", model=dict(restrict_to_cluster=False))
    with torch.no_grad():
        free.model.output.weight.normal_(0, 0.3)
    full = free.model.eval()(cmap(x), y)
    torch.testing.assert_close(free.loss_fn(free.model.eval(), (x, y)),
                               F.cross_entropy(full.reshape(-1, V), x.reshape(-1)))


def tiny_pipeline(cmap):
    ar = GPT(GPTConfig(vocab_size=K, image_tokens=L, num_classes=3, dim=16, n_layer=1, n_head=2, multiple_of=16,
                       codebook_fingerprint=cmap.codebook_fingerprint, coarse_map_fingerprint=cmap.fingerprint))
    with torch.no_grad():
        for p in ar.parameters():
            p.normal_(0, 0.3)
    return CTFPipeline(ar.eval(), random_aux(cmap), cmap)


def test_log_prob_equals_masked_softmax():
    cmap = uneven_map()
    pipe = tiny_pipeline(cmap)
    tokens = torch.randint(0, V, (5, L), generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([0, 1, 2, 0, 1])
    from ctfgen.sampling import log_prob as ar_log_prob

    coarse = cmap(tokens)
    ref = ar_log_prob(pipe.ar, coarse, labels) + torch.log_softmax(pipe.aux(coarse, labels).double(), -1).gather(
        -1, tokens[..., None]).squeeze(-1).sum(-1)
    torch.testing.assert_close(pipe.log_prob(tokens, labels), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.7), dict(top_k=3), dict(top_k=100), dict(top_p=0.8),
                                dict(cfg_scale=2.0), dict(top_k=1), dict(top_k=1, cfg_scale=3.0)])
def test_sampling_gives_in_cluster_tokens_reproducibly(kw):
    cmap = uneven_map()
    model = random_aux(cmap)
    coarse = torch.randint(0, K, (4, L), generator=torch.Generator().manual_seed(6))
    labels = torch.tensor([0, 1, 2, 1])
    fine = sample_fine(model, coarse, labels, generator=7, **kw)
    assert fine.shape == coarse.shape and fine.dtype == torch.long
    assert torch.equal(cmap(fine), coarse)
    assert torch.equal(fine, sample_fine(model, coarse, labels, generator=7, **kw))
    if kw.get("top_k") == 1:  # greedy: exactly the masked full softmax's argmax
        scale = kw.get("cfg_scale", 1.0)
        if scale == 1.0:
            want = model(coarse, labels).argmax(-1)
        else:
            cond, uncond = model(coarse, labels, restrict=False), model(coarse, None, restrict=False)
            want = (uncond + (cond - uncond) * scale).masked_fill(~model.cluster_mask(coarse), float("-inf")).argmax(-1)
        assert torch.equal(fine, want)
    if kw.get("top_k", 0) > 1:  # top-k counted among the members, as the masked full softmax does
        ref = model(coarse, labels)
        k = min(kw["top_k"], V)
        kth = torch.topk(ref, k, dim=-1).values[..., -1:]
        assert torch.all(ref.gather(-1, fine[..., None]) >= kth)


def test_sampled_frequencies_match_the_masked_softmax():
    """Many draws at one position: the empirical distribution over fine tokens equals the masked
    full softmax at temperature 0.8 and top-k 4, pooled over positions (total variation, 40000 draws)."""
    cmap = uneven_map()
    model = random_aux(cmap, std=0.15)
    big = int(torch.argmax(cmap.sizes))  # the 30-member cluster
    coarse = torch.full((1, L), big)
    n = 40000
    temperature, top_k = 0.8, 4
    ref = model(coarse, torch.tensor([1]))[0] / temperature  # (L, V): every position has its own
    kth = torch.topk(ref, top_k, dim=-1).values[:, -1:]
    p = ref.masked_fill(ref < kth, float("-inf")).softmax(-1).double().mean(0)  # all positions pooled
    rows = n // L
    fine = sample_fine(model, coarse.expand(rows, L), torch.ones(rows, dtype=torch.long),
                       temperature=temperature, top_k=top_k, generator=8).reshape(-1)
    freq = torch.bincount(fine, minlength=V).double() / fine.numel()
    assert 0.5 * (freq - p).abs().sum().item() < 0.02
    assert torch.all(freq[p == 0] == 0)


def test_bf16_weights_sample_in_cluster():
    """`dtype="bfloat16"` casts the weights once; the head then multiplies in bf16 (grouped_mm on the CPU)."""
    cmap = uneven_map()
    model = random_aux(cmap)
    coarse = torch.randint(0, K, (3, L), generator=torch.Generator().manual_seed(9))
    fine = sample_fine(model, coarse, torch.tensor([0, 1, 2]), generator=1, dtype="bfloat16")
    assert torch.equal(cmap(fine), coarse)
    greedy = sample_fine(model, coarse, torch.tensor([0, 1, 2]), top_k=1, dtype="bfloat16")
    agree = (greedy == model(coarse, torch.tensor([0, 1, 2])).argmax(-1)).float().mean()
    assert agree > 0.8  # bf16 rounding may flip near-ties only


@pytest.mark.parametrize("method", METHODS)
def test_table_made_under_inference_mode_still_trains(method):
    # heldout_bits_per_token and evaluation sample under inference_mode; the table they built was
    # cached as inference tensors, and a later training step failed ("Inference tensors cannot be
    # saved for backward") in the grouped head, the CPU default.
    model = random_aux(uneven_map())
    coarse = torch.randint(0, K, (2, L))
    with torch.inference_mode():
        model(coarse, [0, 1], in_cluster=True)
    h = torch.randn(2, L, 32, requires_grad=True)
    model._in_cluster_logits(h, coarse, model.cluster_table(), method=method).sum().backward()
    assert h.grad is not None and model.output.weight.grad is not None
