"""Stage-wise diagnosis: teacher-forced coarse prediction and the decoded stage-wise sample sets."""

import math

import pytest
import torch
from _tiny_ctf import tiny_baseline, tiny_ctf, tiny_vq

from ctfgen.experiments.diagnosis import STAGEWISE_SETS, coarse_prediction, most_frequent_members, stagewise_sets
from ctfgen.pipeline import ARPipeline, CTFPipeline
from ctfgen.sampling import log_prob
from ctfgen.utils.errors import MismatchError, WrongTypeError


@pytest.fixture(scope="module")
def parts():
    vq = tiny_vq(codebook_size=32, seed=1)
    ar, aux, cmap, vq = tiny_ctf(vocab=32, num_coarse=8, image_tokens=16, vq=vq, seed=1)
    base, _ = tiny_baseline(vocab=32, image_tokens=16, vq=vq, seed=1)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 32, (7, 16), generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    return ar, aux, cmap, vq, base, tokens, labels


def test_coarse_prediction_matches_direct_computation(parts):
    ar, aux, cmap, vq, base, tokens, labels = parts
    r = coarse_prediction(ar, base, cmap, tokens, labels, batch_size=3)
    coarse = cmap(tokens)
    # stage 1: the mean per-token bits are the teacher-forced log-likelihood of the coarse sequence
    expected = -log_prob(ar, coarse, labels).mean().item() / 16 / math.log(2)
    assert r["stage1"]["bits_per_token"] == pytest.approx(expected, rel=1e-5)
    # baseline: at each position, the probability of the true cluster is the sum over its members
    logits = base(tokens[:, :-1], labels).softmax(-1)
    total = 0.0
    hits = 0
    for n in range(7):
        for i in range(16):
            per_cluster = torch.stack([logits[n, i, cmap.members(c)].sum() for c in range(8)])
            total += -math.log2(per_cluster[coarse[n, i]].item())
            hits += int(per_cluster.argmax() == coarse[n, i])
    assert r["baseline_cluster_summed"]["bits_per_token"] == pytest.approx(total / (7 * 16), rel=1e-5)
    assert r["baseline_cluster_summed"]["top1"] == pytest.approx(hits / (7 * 16))
    assert r["gap_bits"] == pytest.approx(r["stage1"]["bits_per_token"] - r["baseline_cluster_summed"]["bits_per_token"])
    assert len(r["stage1"]["bits_by_position"]) == 16 and r["images"] == 7
    assert r["stage1"]["first_position_bits"] == pytest.approx(r["stage1"]["bits_by_position"][0])


def test_coarse_prediction_refuses_parts_of_different_runs(parts):
    ar, aux, cmap, vq, base, tokens, labels = parts
    with pytest.raises(ValueError, match="one run"):
        coarse_prediction(base, base, cmap, tokens, labels)
    with pytest.raises(ValueError, match=r"\(N, L\)"):
        coarse_prediction(ar, base, cmap, tokens[0], labels)


def test_most_frequent_members(parts):
    cmap = parts[2]
    tokens = torch.cat([cmap.members(c)[-1].repeat(c + 1) for c in range(8)])  # each cluster's last member
    rep = most_frequent_members(cmap, tokens)
    assert rep.tolist() == [int(cmap.members(c)[-1]) for c in range(8)]
    assert torch.equal(cmap(rep), torch.arange(8))
    none_seen = most_frequent_members(cmap, torch.tensor([], dtype=torch.long))
    assert none_seen.tolist() == [int(cmap.members(c)[0]) for c in range(8)]  # ties: the lowest id


def test_most_frequent_members_refuses_tokens_of_another_vocabulary(parts):
    """A token >= vocab_size was numpy's "all keys need to be the same shape", a negative one bincount's
    RuntimeError, and 1.7 was counted as token 1."""
    cmap = parts[2]
    V = cmap.vocab_size
    for bad, shown in ((torch.tensor([[1, 2, V]]), rf"\[1, {V}\]"), (torch.tensor([[1, -1]]), r"\[-1, 1\]")):
        with pytest.raises(MismatchError, match=rf"tokens must be in \[0, {V}\), got range {shown}"):
            most_frequent_members(cmap, bad)
    with pytest.raises(WrongTypeError, match="tokens must be an integer tensor, got torch.float32"):
        most_frequent_members(cmap, torch.tensor([1.7, 2.0]))


def test_stagewise_sets(parts):
    ar, aux, cmap, vq, base, tokens, labels = parts
    ctf, baseline = CTFPipeline(ar, aux, cmap, vq), ARPipeline(base, vq)
    rep = most_frequent_members(cmap, tokens)
    got = {}
    for name, images, y in stagewise_sets(ctf, baseline, tokens, labels, rep, batch_size=4):
        got.setdefault(name, []).append((images, y))
    assert list(got) == list(STAGEWISE_SETS)
    for name, batches in got.items():
        images = torch.cat([b[0] for b in batches])
        assert images.shape == (7, 1, 8, 8) and images.min() >= -1 and images.max() <= 1, name
        assert torch.equal(torch.cat([b[1] for b in batches]), labels)
    assert torch.equal(torch.cat([b[0] for b in got["reconstruction"]]), ctf.decode(tokens))
    # the control for stage 1's decoding: the real coarse labels through each cluster's representative
    assert torch.equal(torch.cat([b[0] for b in got["real_coarse_representative"]]), ctf.decode(rep[cmap(tokens)]))
    with pytest.raises(ValueError, match="unknown stage-wise"):
        list(stagewise_sets(ctf, baseline, tokens, labels, rep, sets=("nope",)))
