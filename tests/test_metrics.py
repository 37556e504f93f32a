"""Metric functions against float64 references written from the definitions, and the Inception wrapper."""

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ctfgen.metrics import core, inception
from ctfgen.utils.errors import ConfigError, CorruptFileError, MissingFileError


def _random_spd(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d + 3))
    return a @ a.T / a.shape[1]


def _reference_frechet(mu1, s1, mu2, s2):
    # tr((S1 S2)^{1/2}) = tr((S1^{1/2} S2 S1^{1/2})^{1/2}); the latter is symmetric PSD, so its
    # square-root trace is a sum of square roots of eigenvalues. A different route from sqrtm(S1 S2).
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def test_frechet_distance_matches_eigen_reference():
    rng = np.random.default_rng(0)
    for d in (1, 5, 32):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
        got = core.frechet_distance(mu1, s1, mu2, s2)
        assert isinstance(got, float)
        assert got == pytest.approx(_reference_frechet(mu1, s1, mu2, s2), rel=1e-9, abs=1e-9)


def test_frechet_distance_of_identical_gaussians_is_zero_and_shift_adds_squared_norm():
    rng = np.random.default_rng(1)
    mu, s = rng.standard_normal(16), _random_spd(rng, 16)
    assert abs(core.frechet_distance(mu, s, mu, s)) < 1e-8
    shift = rng.standard_normal(16)
    assert core.frechet_distance(mu, s, mu + shift, s) == pytest.approx(shift @ shift, rel=1e-8)


def test_frechet_distance_near_singular_is_finite_and_close():
    # fewer samples than dimensions: both covariances have rank 7 in 20 dimensions
    rng = np.random.default_rng(2)
    f1, f2 = rng.standard_normal((8, 20)), rng.standard_normal((8, 20)) + 0.5
    mu1, s1 = core.feature_statistics(f1)
    mu2, s2 = core.feature_statistics(f2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = core.frechet_distance(mu1, s1, mu2, s2)
    assert math.isfinite(got)
    assert got == pytest.approx(_reference_frechet(mu1, s1, mu2, s2), rel=1e-4, abs=1e-4)


def test_frechet_distance_rejects_non_psd_and_bad_shapes():
    with pytest.raises(ValueError, match="imaginary"):
        core.frechet_distance(np.zeros(3), -np.eye(3), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="covariances"):
        core.frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))


def test_feature_statistics_float64_unbiased():
    rng = np.random.default_rng(3)
    f = rng.standard_normal((50, 4)).astype(np.float32)
    mu, sigma = core.feature_statistics(torch.from_numpy(f))
    x = f.astype(np.float64)
    ref_mu = x.sum(0) / len(x)
    ref = sum(np.outer(r - ref_mu, r - ref_mu) for r in x) / (len(x) - 1)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, ref_mu, rtol=1e-12)
    np.testing.assert_allclose(sigma, ref, rtol=1e-10, atol=1e-12)


def _reference_precision_recall(real, fake, k):
    def radii(x):
        out = []
        for i in range(len(x)):
            d = sorted(math.dist(x[i], x[j]) for j in range(len(x)) if j != i)
            out.append(d[k - 1])
        return out

    def coverage(queries, centres, r):
        hits = 0
        for q in queries:
            hits += any(math.dist(q, c) <= rc for c, rc in zip(centres, r))
        return hits / len(queries)

    return coverage(fake, real, radii(real)), coverage(real, fake, radii(fake))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_precision_recall_matches_brute_force(k):
    rng = np.random.default_rng(4 + k)
    real = rng.standard_normal((45, 3))
    fake = rng.standard_normal((35, 3)) * 0.6 + np.array([2.0, 0.0, 0.0])
    ref = _reference_precision_recall(real.tolist(), fake.tolist(), k)
    assert 0 < ref[0] < 1 and 0 < ref[1] < 1  # a test that could fail either way
    assert core.precision_recall(real, fake, k=k) == pytest.approx(ref, abs=1e-12)
    # batching must not change anything
    assert core.precision_recall(real, fake, k=k, batch_size=7) == pytest.approx(ref, abs=1e-12)
    radii = core.knn_radii(real, k)
    assert core.precision_recall(real, fake, k=k, real_radii=radii) == pytest.approx(ref, abs=1e-12)


def test_precision_recall_identical_sets_are_perfect_and_disjoint_sets_zero():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((30, 4))
    assert core.precision_recall(x, x.copy()) == (1.0, 1.0)
    assert core.precision_recall(x, x + 100.0) == (0.0, 0.0)
    with pytest.raises(ValueError, match="more than 3"):
        core.precision_recall(x[:3], x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_precision_recall_on_a_gpu_device():
    """`ctfgen eval` passes its device here; the k-NN radii came back on the CPU and comparing them with
    the distances on the GPU was a device-mismatch RuntimeError."""
    rng = np.random.default_rng(4)
    real, fake = rng.standard_normal((45, 3)), rng.standard_normal((35, 3)) * 0.6 + np.array([2.0, 0.0, 0.0])
    assert core.precision_recall(real, fake, device="cuda") == pytest.approx(core.precision_recall(real, fake),
                                                                             abs=1e-12)


def _reference_inception_score(probs, splits):
    scores = []
    n = len(probs)
    bounds = [round(i * n / splits) for i in range(splits + 1)]
    for a, b in zip(bounds, bounds[1:]):
        chunk = probs[a:b]
        py = [sum(p[c] for p in chunk) / len(chunk) for c in range(len(chunk[0]))]
        kls = [sum(p[c] * (math.log(p[c]) - math.log(py[c])) for c in range(len(p)) if p[c] > 0) for p in chunk]
        scores.append(math.exp(sum(kls) / len(kls)))
    mean = sum(scores) / len(scores)
    return mean, math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))


def test_kernel_distance_matches_a_loop_over_pairs():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(7, 3)), rng.normal(0.5, 1.0, size=(6, 3))
    k = lambda a, b: (a @ b / 3 + 1) ** 3  # noqa: E731
    m = 6  # one subset of all 6 fakes and 6 of the 7 reals, drawn as the function draws them
    pick = np.random.default_rng(0)
    x, y = fake[pick.choice(6, m, replace=False)], real[pick.choice(7, m, replace=False)]
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    mean, std = core.kernel_distance(real, fake, subsets=1, subset_size=10, seed=0)
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-12) and std == 0


def test_kernel_distance_is_unbiased_near_zero_and_grows_with_a_shift():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(3000, 16))
    same = core.kernel_distance(real, rng.normal(size=(500, 16)), subsets=50, subset_size=500)[0]
    near = core.kernel_distance(real, rng.normal(0.2, 1, size=(500, 16)), subsets=50, subset_size=500)[0]
    far = core.kernel_distance(real, rng.normal(0.5, 1, size=(500, 16)), subsets=50, subset_size=500)[0]
    assert abs(same) < 0.2 * near and near < far
    with pytest.raises(ValueError, match="same D"):
        core.kernel_distance(real, rng.normal(size=(5, 3)))


def test_inception_score_matches_loops():
    rng = np.random.default_rng(5)
    probs = rng.dirichlet(np.full(7, 0.3), size=100)
    probs[0] = np.eye(7)[2]  # exact zeros must count as 0 * log 0 = 0
    mean, std = core.inception_score(probs, splits=5)
    ref_mean, ref_std = _reference_inception_score(probs.tolist(), 5)
    assert mean == pytest.approx(ref_mean, rel=1e-12)
    assert std == pytest.approx(ref_std, rel=1e-9, abs=1e-12)


def test_inception_score_extremes():
    # confident and perfectly spread over C classes -> C; always the same class -> 1
    onehot = np.eye(10)[np.arange(100) % 10]
    assert core.inception_score(onehot, splits=1) == pytest.approx((10.0, 0.0))
    assert core.inception_score(np.tile(np.eye(10)[3], (50, 1)), splits=2)[0] == pytest.approx(1.0)
    # class-sorted rows: consecutive chunks see one class each, shuffling restores the score
    sorted_onehot = np.eye(10)[np.repeat(np.arange(10), 10)]
    assert core.inception_score(sorted_onehot, splits=10)[0] == pytest.approx(1.0)
    assert core.inception_score(sorted_onehot, splits=10, shuffle_seed=0)[0] > 4
    with pytest.raises(ValueError, match="softmax"):
        core.inception_score(np.ones((10, 3)), splits=1)


# ------------------------------------------------------------------------------------------------
# Inception wrapper (no download: random weights the test makes itself)


def test_missing_inception_weights_error_names_file_and_how_to_provide(tmp_path, monkeypatch):
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(tmp_path))
    monkeypatch.setattr(inception, "DEFAULT_DIR", tmp_path / "nothing-here")
    monkeypatch.setattr(inception, "TORCH_HUB_DIR", tmp_path / "nor-here")
    with pytest.raises(MissingFileError) as info:  # the project's error base, so library callers catch it as such
        inception.load_inception()
    msg = str(info.value)
    assert "weights-inception-2015-12-05-6726825d.pth" in msg
    assert str(tmp_path / "weights-inception-2015-12-05-6726825d.pth") in msg
    assert "CTFGEN_INCEPTION_WEIGHTS" in msg and "--inception-weights" in msg
    assert "torch-fidelity" in msg
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05-6726825d.pth"):
        inception.load_inception(tmp_path / "missing.pth")


def test_inception_weights_option_given_a_folder_looks_inside_it(tmp_path, monkeypatch):
    # as $CTFGEN_INCEPTION_WEIGHTS does: the folder itself was tried as the file and named as "looked in"
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(inception, "DEFAULT_DIR", tmp_path / "nothing-here")
    monkeypatch.setattr(inception, "TORCH_HUB_DIR", tmp_path / "nor-here")
    with pytest.raises(FileNotFoundError) as info:
        inception.find_inception_weights(tmp_path)
    assert f"  - {tmp_path / inception.WEIGHTS_FILE}\n" in str(info.value)
    (tmp_path / inception.WEIGHTS_FILE).write_bytes(b"")
    assert inception.find_inception_weights(tmp_path) == tmp_path / inception.WEIGHTS_FILE
    assert inception.find_inception_weights(str(tmp_path)) == tmp_path / inception.WEIGHTS_FILE


def test_corrupt_weights_file_detected_by_hash(tmp_path):
    bad = tmp_path / inception.WEIGHTS_FILE
    bad.write_bytes(b"not the weights")
    with pytest.raises(ValueError, match="corrupt"):
        inception.load_inception(bad)


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    mod = inception._inception_module()
    cls = mod.FeatureExtractorInceptionV3
    with pytest.MonkeyPatch.context() as mp:
        # build the network without any weights: no download, keep the random initialisation
        mp.setattr(mod, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(cls, "load_state_dict", lambda self, sd, *a, **k: None)
        net = cls("random", ["2048"])
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return path


def test_inception_features_shapes_with_local_weights(random_inception_weights):
    net = inception.load_inception(random_inception_weights)
    rng = np.random.default_rng(6)
    rgb = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    out = inception.inception_features(rgb, net=net, batch_size=2, spatial=True)
    assert out["pool"].shape == (3, 2048) and out["pool"].dtype == np.float64
    assert out["logits"].shape == (3, 1008)
    assert out["spatial"].shape == (3, 7 * 17 * 17)
    assert np.isfinite(out["pool"]).all() and out["pool"].std() > 0
    # grayscale is repeated to RGB
    gray = rgb[..., :1]
    a = inception.inception_features(gray, net=net)["pool"]
    b = inception.inception_features(np.repeat(gray, 3, axis=-1), net=net)["pool"]
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_unreadable_or_non_dict_weights_file_is_a_clear_error(tmp_path):
    # a name without the hash suffix skips the hash check: torch.load itself meets the bad file
    garbage = tmp_path / "inception.pth"
    garbage.write_bytes(b"not the weights")
    with pytest.raises(CorruptFileError, match="cannot be read as tensors"):
        inception.load_inception(garbage)
    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(2), tensor)
    with pytest.raises(ConfigError, match="not a torch-fidelity Inception-v3 state dict"):
        inception.load_inception(tensor)


def test_inception_weights_with_wrong_names_rejected(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ValueError, match="not a torch-fidelity Inception-v3 state dict"):
        inception.load_inception(path)



def test_sfid_against_an_adm_reference_batch_uses_adms_feature_order(random_inception_weights, tmp_path):
    # ADM's evaluator reshapes TF's NHWC `mixed_6/conv` map[..., :7] (position-major, channels last);
    # its reference batches carry mu_s/sigma_s in that order, which the samples' features must share.
    from ctfgen.metrics.evaluate import evaluate_inception

    net = inception.load_inception(random_inception_weights)
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    samples, ref_images = images[:4], images[4:]
    maps = []
    hook = net.Mixed_6d.branch1x1.register_forward_hook(lambda mod, inp, out: maps.append(out))
    try:
        with torch.no_grad():
            pool = net(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())[0].double().numpy()
    finally:
        hook.remove()
    adm_spatial = maps[0].permute(0, 2, 3, 1)[..., :7].reshape(len(images), -1).double().numpy()
    np.testing.assert_allclose(inception.inception_features(images, net=net, spatial=True)["spatial"], adm_spatial,
                               rtol=1e-5, atol=1e-12)
    mu_s, sigma_s = core.feature_statistics(adm_spatial[4:])
    ref = tmp_path / "VIRTUAL_ref.npz"
    mu, sigma = core.feature_statistics(pool[4:])
    np.savez(ref, arr_0=ref_images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    got, _ = evaluate_inception(samples, ref, weights=random_inception_weights, device="cpu")
    want = core.frechet_distance(*core.feature_statistics(adm_spatial[:4]), mu_s, sigma_s)
    assert got["sfid"] == pytest.approx(want, rel=1e-3)


def test_a_damaged_reference_batch_is_a_corrupt_file_error(random_inception_weights, tmp_path):
    # reading its mu/sigma went past load_images' checks: a zipfile.BadZipFile traceback; and a lone .npy
    # under an .npz name was a TypeError from `with np.load(...)`
    from ctfgen.metrics.evaluate import evaluate_inception, load_images

    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    ref = tmp_path / "VIRTUAL_ref.npz"
    np.savez(ref, arr_0=images, mu=np.zeros(3), sigma=np.eye(3))
    ref.write_bytes(ref.read_bytes()[: ref.stat().st_size // 2])
    with pytest.raises(CorruptFileError, match="VIRTUAL_ref.npz cannot be read as an .npz file"):
        evaluate_inception(images, ref, weights=random_inception_weights, device="cpu", sfid=False)
    one = tmp_path / "one.npz"
    with open(one, "wb") as f:
        np.save(f, images)
    with pytest.raises(CorruptFileError, match="not an .npz archive"):
        load_images(one)


def test_fashion_mnist_reference_features_follow_the_data_folder(tmp_path, monkeypatch):
    # Two copies of the test split with different images: pointing $CTFGEN_FASHION_MNIST at the second
    # within one process must not reuse the first one's cached reference features or radii.
    import importlib

    from ctfgen.data.fashion_mnist import ENV_VAR

    evaluate = importlib.import_module("ctfgen.metrics.evaluate")  # the package exports a function of that name

    rng = np.random.default_rng(0)
    refs = {}
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        images = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
        labels = np.tile(np.arange(10, dtype=np.uint8), 2)
        for stem, arr in (("t10k-images-idx3-ubyte", images), ("t10k-labels-idx1-ubyte", labels)):
            (folder / stem).write_bytes(bytes([0, 0, 0x08, arr.ndim]) + np.array(arr.shape, ">u4").tobytes()
                                        + arr.tobytes())
        monkeypatch.setenv(ENV_VAR, str(folder))
        refs[name] = (evaluate._fmnist_split_embedding("test")[0], evaluate._fmnist_split_radii("test", 3))
    assert not np.allclose(refs["a"][0], refs["b"][0])
    assert not np.allclose(refs["a"][1], refs["b"][1])
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "a"))
    assert np.array_equal(evaluate._fmnist_split_embedding("test")[0], refs["a"][0])
