"""Stage pictures: the coarse preview, the representatives it decodes through, the stage figure."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from _tiny_ctf import tiny_baseline, tiny_ctf, tiny_vq
from ctfgen.app.cli import main
from ctfgen.pipeline import ARPipeline, CTFPipeline
from ctfgen.sampling import generate
from ctfgen.app.figures import change_heat, stage_figure, stage_rows
from ctfgen.utils.errors import ConfigError


@pytest.fixture(scope="module")
def ctf16():
    vq = tiny_vq(codebook_size=32, seed=1)
    return tiny_ctf(vocab=32, num_coarse=8, image_tokens=16, vq=vq, seed=1)


def test_representatives_are_the_members_nearest_the_centroids(ctf16):
    _, _, cmap, vq = ctf16
    reps = cmap.representatives(vq)
    e = vq.codebook().detach().double()
    assert reps.shape == (cmap.num_coarse,) and reps.dtype == torch.int64
    for c in range(cmap.num_coarse):
        members = cmap.members(c)
        d = (e[members] - e[members].mean(0)).pow(2).sum(1)
        assert int(reps[c]) == int(members[d.argmin()])
    assert torch.equal(cmap(reps), torch.arange(cmap.num_coarse))
    with pytest.raises(ValueError, match="fingerprint"):
        cmap.representatives(tiny_vq(codebook_size=32, seed=9))


def test_coarse_preview_maps_back_to_the_sampled_coarse_labels(ctf16):
    ar, aux, cmap, vq = ctf16
    pipe = CTFPipeline(ar, aux, cmap, vq)
    labels = torch.tensor([0, 1, 2, 2])
    out = pipe(labels, generator=4)
    # stage 1 draws first from the seeded stream: replaying it gives the coarse labels it sampled
    sampled = generate(ar, labels, cfg_scale=2.0, temperature=1.1, generator=torch.Generator().manual_seed(4))
    assert torch.equal(out.coarse, sampled)
    # the preview's codes are the representatives, which the coarse map sends back to those labels
    assert torch.equal(out.coarse_tokens, pipe.representatives[sampled])
    assert torch.equal(cmap(out.coarse_tokens), sampled)
    assert torch.equal(out.coarse_preview, pipe.decode(out.coarse_tokens))
    assert torch.equal(out.coarse_preview, pipe.coarse_preview(sampled))
    # the final images are exactly what `sample` draws from the same seed
    assert torch.equal(out.images, pipe.sample(labels, generator=4))
    assert torch.equal(out.tokens, pipe.sample_tokens(labels, generator=4))
    assert out.coarse_preview.shape == out.images.shape == (4, 1, 8, 8)
    assert set(out.timings) >= {"stage1", "stage2", "decode", "total", "coarse_preview"}
    assert torch.equal(out.changed, (out.tokens != out.coarse_tokens).reshape(4, 4, 4))
    assert out.changed.any() and not out.changed.all()  # stage 2 sometimes keeps, sometimes leaves the representative


def test_heat_is_zero_exactly_where_stage_2_kept_the_representative(ctf16):
    pipe = CTFPipeline(*ctf16)
    out = pipe([0, 1, 2], generator=1, top_k_fine=0)
    heat = change_heat(pipe, out)
    assert heat.shape == (3, 4, 4) and heat.min() >= 0 and heat.max() <= 1
    assert torch.equal(heat > 0, out.changed)
    rows = stage_rows(pipe, out)
    assert [name for name, _ in rows] == ["coarse", "final", "changed"]
    fig = stage_figure(rows, nrow=2, scale=3)
    assert fig.mode == "RGB" and fig.height > 2 * 3 * 8 * 3  # two blocks of three rows
    # the heat map's colour scale: a gradient through the colour map from 0 to 1 below the samples
    from matplotlib import colormaps

    pixels = np.asarray(fig)
    bar = max(range(pixels.shape[0]), key=lambda y: len({tuple(p) for p in pixels[y]}))
    assert bar > 2 * 3 * 8 * 3 and len({tuple(p) for p in pixels[bar]}) > 50
    ends = [tuple((np.asarray(colormaps["inferno"](v)[:3]) * 255).round().astype(int)) for v in (0.0, 1.0)]
    row = [tuple(int(c) for c in p) for p in pixels[bar]]
    assert all(e in row for e in ends)
    assert stage_figure(rows[:2], nrow=2, scale=3).height < fig.height  # no heat row, no scale


def test_preview_needs_a_tokenizer_and_valid_labels(ctf16):
    ar, aux, cmap, vq = ctf16
    with pytest.raises(ValueError, match="no tokenizer"):
        CTFPipeline(ar, aux, cmap)([0])
    with pytest.raises(ValueError, match=r"coarse labels must be in \[0, 8\)"):
        CTFPipeline(ar, aux, cmap, vq).coarse_preview(torch.full((1, 16), 8))
    out = CTFPipeline(ar, aux, cmap, vq)([0], generator=0, preview=False)
    assert out.coarse_preview is None and out.coarse is not None
    pipe = CTFPipeline(ar, aux, cmap, vq)
    with pytest.raises(ConfigError, match="preview=True"):  # was an AttributeError traceback
        stage_rows(pipe, out)


def test_baseline_call_has_no_stages():
    gpt, vq = tiny_baseline(vocab=8, num_classes=3)
    out = ARPipeline(gpt, vq)([0, 1], generator=0)
    assert out.images.shape == (2, 1, 4, 4) and out.coarse is None and out.changed is None
    with pytest.raises(ConfigError, match="CTF pipeline's output"):  # was an AttributeError traceback
        stage_rows(None, out)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    ar, aux, cmap, vq = tiny_ctf(vocab=8, num_coarse=3, num_classes=10)
    CTFPipeline(ar, aux, cmap, vq).save_pretrained(root / "ctf")
    gpt, _ = tiny_baseline(vocab=8, num_classes=10, vq=vq)
    ARPipeline(gpt, None).save_pretrained(root / "baseline")  # borrows the CTF tokenizer, like the shipped one
    return root


def test_sample_stages_and_compare_baseline(run_dir, tmp_path, capsys):
    ctf = str(run_dir / "ctf")
    out = tmp_path / "stages.png"
    assert main(["sample", "--model", ctf, "--class", "sneaker", "--n", "3", "--stages", "--no-singles",
                 "--out", str(out), "--scale", "8"]) == 0
    assert "other than the representative" in capsys.readouterr().out
    with_base = tmp_path / "both.png"
    assert main(["sample", "--model", ctf, "--class", "sneaker", "--n", "3", "--stages", "--compare-baseline",
                 "--no-singles", "--out", str(with_base), "--scale", "8"]) == 0
    assert Image.open(with_base).height > Image.open(out).height  # a fourth row
    side = tmp_path / "side.png"
    assert main(["sample", "--model", ctf, "--class", "bag", "--n", "2", "--compare-baseline", "--top-k-fine", "1",
                 "--no-singles", "--out", str(side)]) == 0
    assert "the baseline's part: stage 1" in capsys.readouterr().out
    assert main(["sample", "--model", ctf, "--class", "bag", "--n", "2", "--no-singles", "--out", str(tmp_path / "one.png")]) == 0
    assert Image.open(side).width > 1.5 * Image.open(tmp_path / "one.png").width
    assert main(["sample", "--model", str(run_dir / "baseline"), "--stages", "--out", str(tmp_path / "x.png")]) == 2
    assert "need a CTF model" in capsys.readouterr().err
    lone = tmp_path / "lone" / "ctf"
    shutil.copytree(ctf, lone)
    assert main(["sample", "--model", str(lone), "--compare-baseline", "--out", str(tmp_path / "x.png")]) == 2
    assert "pass --baseline" in capsys.readouterr().err
    assert main(["sample", "--model", str(lone), "--compare-baseline", "--baseline", str(run_dir / "baseline"),
                 "--no-singles", "--out", str(tmp_path / "y.png")]) == 0


def test_representatives_can_be_the_most_frequent_members(ctf16):
    from ctfgen.experiments.diagnosis import most_frequent_members

    ar, aux, cmap, vq = ctf16
    pipe = CTFPipeline(ar, aux, cmap, vq)
    codes = torch.tensor([[cmap.members(c)[-1] for c in range(cmap.num_coarse)] * 3])  # each cluster's last member
    pipe.representatives = most_frequent_members(cmap, codes)
    out = pipe([0, 1], generator=2)
    assert torch.equal(out.coarse_tokens, torch.stack([cmap.members(c)[-1] for c in range(8)])[out.coarse])
    with pytest.raises(ValueError, match="the c-th a member of cluster c"):
        pipe.representatives = torch.arange(8)  # codewords 0..7 are not one per cluster in order
