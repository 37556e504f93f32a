import json
import math

import numpy as np
import pytest
import torch
from _tiny_ctf import tiny_vq

from ctfgen.clustering import CoarseMap
from ctfgen.utils.images import gaussian_window, psnr, ssim, ssim_map
from ctfgen.experiments.redundancy import measure_redundancy, swap_within_clusters


def _imgs(seed, shape=(2, 3, 20, 24)):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_psnr_known_value():
    x = torch.full((1, 1, 4, 4), 0.5, dtype=torch.float64)
    assert psnr(x, x + 0.1).item() == pytest.approx(20.0, abs=1e-6)
    assert math.isinf(psnr(x, x).item())


def test_ssim_matches_direct_formula():
    x, y = _imgs(0), _imgs(1)
    y = 0.6 * x + 0.4 * y  # correlated, so every term matters
    m = ssim_map(x, y)
    assert m.shape == (2, 3, 10, 14)
    w = gaussian_window(11, 1.5).numpy()
    c1, c2 = 0.01**2, 0.03**2
    for b, ch, i, j in [(0, 0, 0, 0), (1, 2, 9, 13), (0, 1, 4, 7)]:
        px, py = x[b, ch, i:i + 11, j:j + 11].numpy(), y[b, ch, i:i + 11, j:j + 11].numpy()
        mx, my = (w * px).sum(), (w * py).sum()
        vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
        cxy = (w * (px - mx) * (py - my)).sum()
        direct = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        assert m[b, ch, i, j].item() == pytest.approx(direct, abs=1e-10)


def test_ssim_properties():
    x = _imgs(2)
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a, b = ssim(x, (x + 0.05 * noise).clamp(0, 1)), ssim(x, (x + 0.3 * noise).clamp(0, 1))
    assert (b < a).all() and (a < 1).all()
    assert torch.allclose(ssim(x, x.flip(0)), ssim(x.flip(0), x))
    w = gaussian_window(7, 1.0)
    assert w.sum().item() == pytest.approx(1.0) and w[3, 3] == w.max()
    assert ssim_map(_imgs(0, (1, 1, 4, 4)), _imgs(1, (1, 1, 4, 4))).shape == (1, 1, 2, 2)  # 3x3 window


def test_swap_within_clusters():
    f2c = torch.tensor([0, 1, 0, 2, 1, 0, 1, 1])  # cluster 2 is a singleton
    codes = torch.arange(8).repeat(500, 1)
    g = torch.Generator().manual_seed(0)
    new = swap_within_clusters(codes, f2c, g)
    assert torch.equal(f2c[new], f2c[codes])
    single = codes == 3
    assert torch.equal(new[single], codes[single])
    assert (new[~single] != codes[~single]).all()
    # every other member of the token's cluster is drawn, roughly uniformly
    picks = new[:, 0]  # token 0, cluster {0, 2, 5}
    counts = torch.bincount(picks, minlength=8)
    assert counts[0] == 0 and counts[2] > 200 and counts[5] > 200


def _redundant_vq(groups=8, per=4, seed=0):
    """A tiny VQ whose codewords come in tight groups of `per` near-duplicates."""
    vq = tiny_vq(codebook_size=groups * per, seed=seed)
    g = torch.Generator().manual_seed(seed)
    d = vq.quantize.embedding.weight.shape[1]
    centers = torch.randn(groups, d, generator=g)
    w = centers.repeat_interleave(per, 0) + 0.02 * torch.randn(groups * per, d, generator=g)
    with torch.no_grad():
        vq.quantize.embedding.weight.copy_(w)
    return vq


def test_measure_redundancy_in_cluster_swaps_are_mild():
    vq = _redundant_vq()
    cmap = CoarseMap.fit(vq, 8, seed=0)
    assert int(cmap.sizes.min()) == int(cmap.sizes.max()) == 4  # the groups were found
    images = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    r = measure_redundancy(vq, cmap, images, seed=0, return_images=True)
    for key in ("in_cluster", "random_map", "whole_codebook"):
        assert set(r[key]) == {"psnr", "ssim", "changed"}
        assert r[key]["changed"] == 1.0
    assert r["in_cluster"]["psnr"] > r["random_map"]["psnr"] + 10
    assert r["in_cluster"]["psnr"] > r["whole_codebook"]["psnr"] + 10
    assert r["in_cluster"]["ssim"] > r["random_map"]["ssim"]
    assert set(r["images"]) == {"original", "reconstruction", "in_cluster", "random_map", "whole_codebook"}
    assert r["images"]["in_cluster"].shape == images.shape
    # deterministic for a seed
    again = measure_redundancy(vq, cmap, images, seed=0)
    assert again["in_cluster"] == r["in_cluster"] and again["whole_codebook"] == r["whole_codebook"]


def test_measure_redundancy_refuses_other_codebook():
    vq = _redundant_vq()
    cmap = CoarseMap.fit(tiny_vq(codebook_size=32, seed=5), 8)
    with pytest.raises(ValueError, match="codebook fingerprint: .* in the coarse map"):
        measure_redundancy(vq, cmap, torch.zeros(1, 1, 8, 8))


def test_cli(tmp_path):
    from ctfgen.data.fashion_mnist import find_fashion_mnist

    try:
        find_fashion_mnist(split="test")
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST not installed")
    from PIL import Image

    from ctfgen.app.cli import main

    vq = _redundant_vq()
    vq.save_pretrained(tmp_path / "vq")
    out, js = tmp_path / "grid.png", tmp_path / "r.json"
    rc = main(["redundancy", "--tokenizer", str(tmp_path / "vq"), "--num-coarse", "8", "--images", "3",
               "--out", str(out), "--json", str(js), "--scale", "1", "--device", "cpu"])
    assert rc == 0
    r = json.loads(js.read_text())
    assert r["num_images"] == 3 and r["num_coarse"] == 8
    assert r["in_cluster"]["psnr"] > r["whole_codebook"]["psnr"]
    img = np.asarray(Image.open(out))
    assert img.shape[:2] == (5 * 30 + 2, 3 * 30 + 2)  # 5 rows of 28x28 images, 2 px padding


def test_cli_with_pipeline_dir(tmp_path, capsys):
    from ctfgen.data.fashion_mnist import find_fashion_mnist

    try:
        find_fashion_mnist(split="test")
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST not installed")
    from _tiny_ctf import tiny_ctf

    from ctfgen.app.cli import main
    from ctfgen.pipeline import CTFPipeline

    parts = tiny_ctf(vocab=32, num_coarse=8, image_tokens=4, vq=_redundant_vq())
    CTFPipeline(*parts).save_pretrained(tmp_path / "ctf")
    js = tmp_path / "r.json"
    assert main(["redundancy", "--model", str(tmp_path / "ctf"), "--images", "2", "--out", str(tmp_path / "g.png"),
                 "--json", str(js), "--device", "cpu"]) == 0
    r = json.loads(js.read_text())
    assert r["coarse_map"] == parts[2].fingerprint  # the pipeline's own map was used
    assert "in-cluster swap" in capsys.readouterr().out
