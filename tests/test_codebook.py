"""Keeping the codebook in use: k-means initialisation, dead-code restarts, whole-split usage."""

import csv
import subprocess

import pytest
import torch
import torch.nn.functional as F

from ctfgen.utils.errors import CheckpointError
from ctfgen.tokenizer import VQModel
from ctfgen.tokenizer.codebook import DeadCodeRestarter, code_perplexity, evaluate_tokenizer, kmeans_init_codebook
from ctfgen.train.tokenizer import train_tokenizer
from test_tokenizer_train import TINY_MODEL, Blobs, config, read_log, state


def tiny_vq(**over):
    torch.manual_seed(0)
    return VQModel({**TINY_MODEL, **over})


def test_kmeans_init_puts_codewords_on_encoder_outputs():
    data = Blobs(n=16)
    vq = tiny_vq()
    before = evaluate_tokenizer(vq, data)["codes_used"]
    info = kmeans_init_codebook(vq, data, num_images=16, seed=0)
    assert info["vectors"] == 16 * 8 * 8
    w = vq.quantize.embedding.weight
    assert torch.allclose(w.norm(dim=-1), torch.ones(32), atol=1e-5)  # l2-normalised codebook
    after = evaluate_tokenizer(vq, data)["codes_used"]
    # LlamaGen's uniform(-1/V, 1/V) start leaves most codes out of reach; centroids are all chosen.
    assert after == 32 > before


def test_kmeans_init_needs_enough_vectors():
    with pytest.raises(ValueError, match="codebook_init_images"):
        kmeans_init_codebook(tiny_vq(codebook_size=512), Blobs(n=4), num_images=4)


def test_dead_codes_move_onto_recent_encoder_outputs():
    vq = tiny_vq().train()
    restarter = DeadCodeRestarter(vq.quantize, unused_steps=2, pool_size=1000, seed=0)
    images = Blobs(n=4).x
    used = set()
    for step in (1, 2):
        _, codes, _ = vq.quantize(vq.encode_latent(images))
        used |= set(codes.unique().tolist())
        assert restarter.step(step) == (0 if step == 1 else 32 - len(used))
    dead = sorted(set(range(32)) - used)
    assert dead, "the uniform start should leave some codes unused"
    w = vq.quantize.embedding.weight.detach()
    pool = restarter.pool
    assert pool.shape == (2 * 4 * 8 * 8, 8)
    for code in dead:  # each restarted code is exactly one of the recent (normalised) encoder outputs
        assert (pool - w[code]).abs().sum(-1).min() == 0
    assert restarter.total_restarted == len(dead)
    # state round trip
    other = DeadCodeRestarter(tiny_vq().quantize, unused_steps=2)
    other.load_state_dict(restarter.state_dict())
    assert torch.equal(other.last_used, restarter.last_used) and torch.equal(other.pool, pool)
    with pytest.raises(ValueError, match="codes"):
        DeadCodeRestarter(tiny_vq(codebook_size=64).quantize, 2).load_state_dict(restarter.state_dict())
    restarter.remove()
    with pytest.raises(ValueError, match="unused_steps"):
        DeadCodeRestarter(vq.quantize, unused_steps=0)


def test_evaluate_tokenizer_counts_every_code_of_the_split():
    vq = tiny_vq().eval()
    data = Blobs(n=10)
    r = evaluate_tokenizer(vq, data, batch_size=3)
    codes = vq.encode(data.x)
    assert r["codes_used"] == codes.unique().numel() and r["usage"] == r["codes_used"] / 32
    assert r["images"] == 10 and r["psnr"] > 0 and -1 <= r["ssim"] <= 1
    counts = torch.bincount(codes.reshape(-1), minlength=32).double()
    p = counts[counts > 0] / counts.sum()
    assert r["perplexity"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())))
    assert 1 <= r["perplexity"] <= r["codes_used"]


def test_code_perplexity_counts_evenly_used_codes():
    assert code_perplexity(torch.tensor([5.0, 5, 5, 5, 0, 0])) == pytest.approx(4.0)
    assert code_perplexity(torch.tensor([100.0, 0, 0])) == pytest.approx(1.0)
    # one code used 97 times and three used once: usage says 4 codes, perplexity barely above 1
    assert 1 < code_perplexity(torch.tensor([97.0, 1, 1, 1])) < 1.2


def test_restarts_stop_after_last_step():
    vq = tiny_vq().train()
    restarter = DeadCodeRestarter(vq.quantize, unused_steps=1, pool_size=1000, seed=0, last_step=2)
    images = Blobs(n=1).x
    restarted = []
    for step in range(1, 6):
        vq.quantize(vq.encode_latent(images))
        restarted.append(restarter.step(step))
    assert sum(restarted[:2]) > 0 and restarted[2:] == [0, 0, 0]


def test_training_with_remedies_logs_and_resumes_exactly(tmp_path):
    # restarts to the end: the split run's first leg is a 4-step run, whose 80 % cut-off would differ
    remedies = dict(codebook_init="kmeans", codebook_init_images=16, dead_code_steps=2, dead_code_until=1.0)
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_tokenizer(config(steps=6, **remedies), Blobs(), straight, progress=False)
    train_tokenizer(config(steps=4, **remedies), Blobs(), split, progress=False)
    train_tokenizer(config(steps=6, **remedies), Blobs(), split, resume=True, progress=False)
    a, b = state(straight), state(split)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = read_log(straight)
    assert "codes_restarted" in rows[0] and all(int(r["codes_restarted"]) >= 0 for r in rows)
    # resuming with restarts switched on, into a run that had none, is refused rather than guessed
    plain = tmp_path / "plain"
    train_tokenizer(config(steps=3), Blobs(), plain, progress=False)
    with pytest.raises(CheckpointError, match="dead-code"):
        train_tokenizer(config(steps=6, dead_code_steps=2), Blobs(), plain, resume=True, progress=False)


def test_training_stops_restarts_at_dead_code_until(tmp_path):
    train_tokenizer(config(steps=10, dead_code_steps=1, dead_code_until=0.5), Blobs(n=4), tmp_path, progress=False)
    restarted = [int(r["codes_restarted"]) for r in read_log(tmp_path)]
    assert sum(restarted[:5]) > 0 and restarted[5:] == [0] * 5


@pytest.mark.parametrize("bad, match", [({"codebook_init": "pca"}, "codebook_init"),
                                        ({"dead_code_steps": -1}, "dead_code_steps"),
                                        ({"dead_code_until": 0}, "dead_code_until"),
                                        ({"dead_code_until": 1.5}, "dead_code_until")])
def test_remedy_config_errors(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        train_tokenizer(config(**bad), Blobs(), tmp_path, progress=False)


def test_code_commit_names_the_running_code(tmp_path, monkeypatch):
    import ctfgen.utils.fingerprint as fp

    commit = fp.code_commit()
    assert commit == "unknown" or len(commit.removesuffix("-dirty")) == 40
    stamp = tmp_path / "COMMIT"
    stamp.write_text("0123abcd\n")
    monkeypatch.setattr(fp, "COMMIT_STAMP", stamp)  # a pinned install (make pin) carries its stamp
    assert fp.code_commit() == "0123abcd"


def _commit_all(repo):
    """A git repository at `repo` holding what is there, in one commit."""
    for args in (("init", "-q"), ("add", "."), ("commit", "-q", "-m", "c")):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                       capture_output=True)


def test_code_commit_is_dirty_when_any_of_the_package_changed(tmp_path, monkeypatch):
    # it asked git about ctfgen/utils/ alone (the folder of fingerprint.py since the move to utils/):
    # records made by an edited sampling.py were stored, and reused, as made by the clean commit
    import ctfgen.utils.fingerprint as fp

    package = tmp_path / "src" / "ctfgen"
    (package / "utils").mkdir(parents=True)
    for name in ("sampling.py", "utils/fingerprint.py"):
        (package / name).write_text("# code\n")
    (tmp_path / "README.md").write_text("# docs\n")
    _commit_all(tmp_path)
    monkeypatch.setattr(fp, "__file__", str(package / "utils" / "fingerprint.py"))
    monkeypatch.setattr(fp, "COMMIT_STAMP", package / "COMMIT")
    head = fp.code_commit()
    assert len(head) == 40
    (tmp_path / "README.md").write_text("# other docs\n")  # outside the package: the code is unchanged
    assert fp.code_commit() == head
    (package / "sampling.py").write_text("# changed code\n")
    assert fp.code_commit() == head + "-dirty"


def test_code_commit_of_an_install_inside_another_repository_is_unknown(tmp_path, monkeypatch):
    # a non-editable install in a project's ignored .venv/ answered that project's HEAD as ctfgen's commit
    import ctfgen.utils.fingerprint as fp

    package = tmp_path / ".venv" / "site-packages" / "ctfgen"
    (package / "utils").mkdir(parents=True)
    (package / "utils" / "fingerprint.py").write_text("# code\n")
    (tmp_path / ".gitignore").write_text(".venv/\n")
    _commit_all(tmp_path)
    monkeypatch.setattr(fp, "__file__", str(package / "utils" / "fingerprint.py"))
    monkeypatch.setattr(fp, "COMMIT_STAMP", package / "COMMIT")
    assert fp.code_commit() == "unknown"
