"""The shipped Fashion-MNIST classifier and the offline metrics built on it; eval/compare CLIs."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ctfgen.app.cli import main
from ctfgen.metrics import classifier as clf
from ctfgen.metrics.evaluate import evaluate_fmnist, load_images

N = 2000  # enough for stable 128-d statistics, small enough for a 2-core machine


@pytest.fixture(scope="module")
def model():
    return clf.load_default_classifier()


@pytest.fixture(scope="module")
def test_split():
    x, y = clf.load_split("test")
    return x[:N], y[:N]


@pytest.fixture(scope="module")
def train_split():
    x, y = clf.load_split("train")
    return x[:N], y[:N]


def test_shipped_weights_are_small_and_load_strictly(model):
    assert isinstance(model, clf.FMNISTClassifier) and not model.training
    assert sum(p.numel() for p in model.parameters()) < 300_000
    x = torch.zeros(2, 1, 28, 28)
    assert model.features(x).shape == (2, model.config.feature_dim)
    p = model.probs(x)
    assert p.shape == (2, 10) and torch.allclose(p.sum(1), torch.ones(2))


def test_save_and_reload_roundtrip(model, tmp_path):
    model.save_pretrained(tmp_path)
    again = clf.FMNISTClassifier.from_pretrained(str(tmp_path)).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_save_pretrained_writes_through_fileio(model, tmp_path, monkeypatch):
    """huggingface_hub wrote model.safetensors and config.json in place: a run killed meanwhile left half a
    file. They are the library's bytes, now written whole or not at all."""
    from huggingface_hub import PyTorchModelHubMixin

    from ctfgen.utils import fileio
    from ctfgen.utils.hub import HubMixin

    model.save_pretrained(tmp_path / "ours")
    with monkeypatch.context() as m:
        m.setattr(HubMixin, "_save_pretrained", PyTorchModelHubMixin._save_pretrained)
        model.save_pretrained(tmp_path / "library")
    files = lambda d: {p.name: p.read_bytes() for p in d.iterdir()}  # noqa: E731
    assert files(tmp_path / "ours") == files(tmp_path / "library")
    weights = (tmp_path / "ours" / "model.safetensors").read_bytes()

    def killed(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(fileio, "fsync_file", killed)
    other = clf.FMNISTClassifier(model.config)
    with pytest.raises(KeyboardInterrupt):
        other.save_pretrained(tmp_path / "ours")
    assert (tmp_path / "ours" / "model.safetensors").read_bytes() == weights
    assert not [p for p in (tmp_path / "ours").iterdir() if p.name.startswith(".")]


def test_preprocess_accepts_uint8_and_float_layouts(model, test_split):
    u8 = test_split[0][:4]
    a = model.preprocess(u8)
    assert a.shape == (4, 1, 28, 28) and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(model.preprocess(u8[..., None]), a)
    torch.testing.assert_close(model.preprocess(a), a)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        model.preprocess(u8.astype(np.float32))
    with pytest.raises(ValueError, match="28x28"):
        model.preprocess(np.zeros((2, 32, 32), np.uint8))


def test_preprocess_refuses_images_of_another_range_or_dtype(model, test_split):
    # float images in [0, 1] were taken as [-1, 1] ones (black read as mid-grey), int64 ones as floats
    from ctfgen.utils.errors import ConfigError, WrongTypeError

    u8 = test_split[0][:4]
    with pytest.raises(ConfigError, match=r"\[-1, 1\].*\[0, 1\] images"):
        model.preprocess(u8.astype(np.float32) / 255)
    with pytest.raises(ConfigError, match=r"\[0, 1\] images"):
        model.embed(torch.from_numpy(u8).float().div(255))
    with pytest.raises(WrongTypeError, match="uint8.*float.*int64"):
        model.preprocess(u8.astype(np.int64))
    a = model.preprocess(u8)
    assert torch.equal(model.preprocess(a.double()), a) and torch.equal(model.preprocess(a.numpy()), a)


def test_the_0_1_look_is_judged_on_the_whole_set_not_per_batch(model, test_split):
    # a [-1, 1] set whose last batch is uniform grey (no value below 0) was refused as "[0, 1] images"
    x = model.preprocess(test_split[0][:7])
    x[5:] = 0.2
    feats, probs = model.embed(x, batch_size=5)
    whole_feats, whole_probs = model.embed(x, batch_size=7)
    np.testing.assert_allclose(feats, whole_feats, atol=1e-5)
    assert probs.shape == whole_probs.shape == (7, 10)
    with pytest.raises(ValueError, match=r"\[0, 1\] images"):
        model.embed(x.clamp(min=0), batch_size=5)
    with pytest.raises(ValueError, match=r"got values in \[0, 255\]"):  # not "[0, 1] images"
        model.embed(torch.from_numpy(test_split[0][:7]).float(), batch_size=5)
    assert model.embed(np.full((3, 28, 28), 200, np.uint8))[0].shape == (3, 128)  # uint8 has no such look


def test_float_images_holding_nan_are_refused(model, test_split):
    """NaN passed the [-1, 1] range test (comparisons with NaN are false) and gave NaN features and metrics."""
    x = model.preprocess(test_split[0][:4])
    x[2, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        model.embed(x)


def test_class_consistency_of_real_images_equals_test_accuracy(model, test_split, train_split):
    images, labels = test_split
    # accuracy computed directly from the network, batch by batch
    with torch.no_grad():
        x = torch.from_numpy(images.copy()).float().div(127.5).sub(1).unsqueeze(1)
        pred = torch.cat([model(x[i : i + 250]).argmax(1) for i in range(0, len(x), 250)])
    accuracy = (pred.numpy() == labels).mean()
    metrics = evaluate_fmnist(images, labels, ref=train_split[0], classifier=model)
    assert metrics["class_consistency"] == pytest.approx(accuracy, abs=0)
    assert accuracy > 0.9


def test_real_vs_noise_frechet_distance(model, test_split, train_split):
    real = evaluate_fmnist(test_split[0], ref=train_split[0], classifier=model)
    rng = np.random.default_rng(0)
    noise = evaluate_fmnist(rng.integers(0, 256, (N, 28, 28), dtype=np.uint8), ref=train_split[0], classifier=model)
    assert real["fd"] < 0.05 * noise["fd"], (real, noise)
    assert real["precision"] > 0.6 and real["recall"] > 0.6
    # the classifier maps all noise to one or two classes: one tight clump, which real "bag"
    # images may well cover (precision need not be low), but which covers no real data
    assert noise["recall"] < 0.05
    # a good classifier on real, class-balanced data is confident and spread over all 10 classes
    assert real["is"] > 7 and noise["is"] < real["is"]
    assert "class_consistency" not in real


def test_default_reference_is_cached_test_split(model, test_split):
    a = evaluate_fmnist(test_split[0][:300], test_split[1][:300])
    b = evaluate_fmnist(test_split[0][:300], test_split[1][:300], ref="fashion-mnist-test")
    assert a == b
    assert a["precision"] > 0.9  # test images lie on the test-split manifold


def test_train_classifier_smoke(tmp_path):
    model, info = clf.train_classifier(tmp_path, epochs=1, limit=256, eval_limit=256, batch_size=64, log=lambda s: None)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    assert json.loads((tmp_path / "train_info.json").read_text())["epochs"] == 1
    assert 0 <= info["test_accuracy"] <= 1
    clf.FMNISTClassifier.from_pretrained(str(tmp_path))


def test_judge_never_trains_on_the_validation_images(tmp_path, monkeypatch):
    from ctfgen.data.fashion_mnist import validation_indices

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 12)
    images = rng.integers(0, 256, (120, 28, 28), dtype=np.uint8)
    seen = []
    monkeypatch.setattr(clf, "load_split", lambda split, root=None: (images, labels))
    real_preprocess = clf.FMNISTClassifier.preprocess
    monkeypatch.setattr(clf.FMNISTClassifier, "preprocess",
                        staticmethod(lambda x: (seen.append(np.array(x)), real_preprocess(x))[1]))
    _, info = clf.train_classifier(tmp_path, epochs=1, batch_size=200, validation_images=20, log=lambda s: None)
    assert info["train_images"] == 100 and info["validation_images_held_out"] == 20
    trained_on = {bytes(im) for im in seen[0]}
    held = {bytes(images[i]) for i in validation_indices(labels, 20)}
    assert len(trained_on) == 100 and not trained_on & held


def test_shipped_judge_held_out_the_validation_split():
    from importlib import resources

    info = json.loads(resources.files("ctfgen").joinpath(*clf.ASSET_PATH, "train_info.json").read_text())
    assert info["train_images"] == 55000 and info["validation_images_held_out"] == clf.VALIDATION_IMAGES == 5000


# ------------------------------------------------------------------------------------------------
# CLIs


def _write_png_folder(folder, images):
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:05d}.png")


def test_eval_cli_fmnist_on_tiny_npz(tmp_path, test_split, train_split, capsys):
    images, labels = test_split
    npz = tmp_path / "samples.npz"
    np.savez(npz, arr_0=images[:200, :, :, None], labels=labels[:200])
    _write_png_folder(tmp_path / "ref", train_split[0][:300])
    out = tmp_path / "eval.json"
    rc = main(["eval", str(npz), "--ref", str(tmp_path / "ref"), "--metric-set", "fmnist", "--out", str(out),
               "--name", "tiny", "--epoch", "3"])
    assert rc == 0
    record = json.loads(out.read_text())
    assert record["name"] == "tiny" and record["epoch"] == 3 and record["metric_set"] == "fmnist"
    assert record["num_samples"] == 200 and record["num_reference"] == 300
    assert set(record["metrics"]) == {"fd", "kid", "kid_std", "is", "is_std", "precision", "recall", "class_consistency"}
    assert "FD (classifier)" in capsys.readouterr().out
    # the npz and the folder load to the same arrays
    loaded, lab = load_images(npz)
    assert loaded.shape == (200, 28, 28, 1) and lab.tolist() == labels[:200].tolist()
    assert np.array_equal(load_images(tmp_path / "ref")[0][..., 0], train_split[0][:300])


def test_eval_ref_named_like_a_split_that_is_also_a_folder(tmp_path, monkeypatch, capsys):
    # --ref test always meant the Fashion-MNIST split: with fmnist a ./test folder was silently not used, with
    # inception it was refused as "a Fashion-MNIST split" although inception has no splits
    from ctfgen.metrics import inception

    monkeypatch.chdir(tmp_path)
    _write_png_folder(tmp_path / "test", np.full((12, 28, 28), 90, np.uint8))
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((20, 28, 28, 1), np.uint8))
    assert main(["eval", "s.npz", "--ref", "test", "--metric-set", "fmnist"]) == 2
    err = capsys.readouterr().err
    assert "both the Fashion-MNIST test split and the path" in err and "./test" in err and "fashion-mnist-test" in err
    assert main(["eval", "s.npz", "--ref", "./test", "--metric-set", "fmnist", "--out", "e.json"]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["num_reference"] == 12
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(tmp_path / "absent.pth"))
    monkeypatch.setattr(inception, "DEFAULT_DIR", tmp_path)
    monkeypatch.setattr(inception, "TORCH_HUB_DIR", tmp_path)
    capsys.readouterr()
    assert main(["eval", "s.npz", "--ref", "test"]) == 2  # got past the split check: no weights here
    err = capsys.readouterr().err
    assert "Inception-v3 weights not found" in err and "Fashion-MNIST split" not in err


def test_eval_folder_with_an_unreadable_image_is_one_error_line(tmp_path, capsys):
    # PIL's UnidentifiedImageError (an OSError) went up as a traceback, naming no way out
    _write_png_folder(tmp_path / "ref", np.zeros((3, 28, 28), np.uint8))
    (tmp_path / "ref" / "00001.png").write_bytes(b"not a png")
    npz = tmp_path / "s.npz"
    np.savez(npz, arr_0=np.zeros((20, 28, 28, 1), np.uint8))
    assert main(["eval", str(npz), "--ref", str(tmp_path / "ref"), "--metric-set", "fmnist"]) == 2
    assert "00001.png cannot be read as an image" in capsys.readouterr().err


def test_eval_folder_mixing_grayscale_and_rgb_images_reads_them_as_rgb(tmp_path):
    # they were refused as images "of different shapes" to be resized, although all had one size
    rng = np.random.default_rng(0)
    gray, rgb = rng.integers(0, 256, (28, 28), dtype=np.uint8), rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
    (tmp_path / "ref").mkdir()
    Image.fromarray(gray).save(tmp_path / "ref" / "a.png")
    Image.fromarray(rgb).save(tmp_path / "ref" / "b.jpg", quality=100)
    images, _ = load_images(tmp_path / "ref")
    assert images.shape == (2, 28, 28, 3)
    assert np.array_equal(images[0], np.repeat(gray[..., None], 3, axis=-1))
    assert np.array_equal(images[1], np.asarray(Image.open(tmp_path / "ref" / "b.jpg").convert("RGB")))


def test_eval_cli_missing_inception_weights(tmp_path, monkeypatch, capsys):
    from ctfgen.metrics import inception

    monkeypatch.setenv(inception.WEIGHTS_ENV, str(tmp_path / "absent.pth"))
    monkeypatch.setattr(inception, "DEFAULT_DIR", tmp_path)
    monkeypatch.setattr(inception, "TORCH_HUB_DIR", tmp_path)
    npz = tmp_path / "s.npz"
    np.savez(npz, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    assert main(["eval", str(npz), "--ref", str(npz)]) == 2
    err = capsys.readouterr().err
    assert "weights-inception-2015-12-05-6726825d.pth" in err and "--inception-weights" in err


def test_compare_renders_table_and_figures(tmp_path, capsys):
    for run, base in (("ctf", 10.0), ("baseline", 14.0)):
        for epoch in (1, 2, 4):
            rec = {"name": run, "epoch": epoch, "metric_set": "fmnist", "num_samples": 100,
                   "metrics": {"fd": base / epoch, "is": 5 + epoch, "is_std": 0.1, "precision": 0.5, "recall": 0.4}}
            (tmp_path / run / "eval").mkdir(parents=True, exist_ok=True)
            (tmp_path / run / "eval" / f"epoch_{epoch:04d}.json").write_text(json.dumps(rec))
    single = tmp_path / "single.json"
    single.write_text(json.dumps({"name": "other", "metrics": {"fd": 1.0}}))
    out = tmp_path / "cmp"
    assert main(["compare", str(tmp_path / "ctf"), str(tmp_path / "baseline"), str(single), "--out", str(out)]) == 0
    table = (out / "compare.md").read_text()
    lines = table.strip().splitlines()
    assert len(lines) == 2 + 7
    assert lines[0].startswith("| run | epoch |") and "FD (classifier) ↓" in lines[0]
    assert "| baseline | 4 | fmnist | 100 | 3.5000 |" in table and "| other | – |" in table
    assert table in capsys.readouterr().out
    for key in ("fd", "is", "precision", "recall"):
        png = out / f"{key}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "is_std.png").exists()
    with pytest.raises(FileNotFoundError, match="eval"):
        from ctfgen.metrics.compare import load_records

        (tmp_path / "empty").mkdir()
        load_records(tmp_path / "empty")


def test_compare_orders_mixed_epochs_and_missing_is_std():
    """Epochs 3 and "final" in one run, or equal epoch and IS with one is_std missing, were TypeErrors."""
    from ctfgen.metrics.compare import _epoch_lines, markdown_table

    rec = lambda epoch, **m: {"name": "run", "epoch": epoch, "metrics": m}  # noqa: E731
    table = markdown_table([rec("final", fd=1.0), rec(None, fd=4.0), rec(10, fd=2.0), rec(3, fd=3.0)])
    assert [line.split("|")[2].strip() for line in table.splitlines()[2:]] == ["3", "10", "final", "–"]
    lines = _epoch_lines([rec(2, **{"is": 5.0}), rec(1, **{"is": 5.0, "is_std": 0.1}), rec(1, **{"is": 5.0})], "is")
    assert lines == [("run", (1, 1, 2), (5.0, 5.0, 5.0), None)]
    # what sorted before still sorts the same
    lines = _epoch_lines([rec(2, **{"is": 4.0, "is_std": 0.3}), rec(1, **{"is": 5.0, "is_std": 0.2}),
                          rec(1, **{"is": 5.0, "is_std": 0.1})], "is")
    assert lines == [("run", (1, 1, 2), (5.0, 5.0, 4.0), (0.1, 0.2, 0.3))]


def test_compare_skips_flags_that_are_not_metrics(tmp_path):
    """`ctfgen reproduce` records carry bits_per_token_exact (a bool): it was a column of dashes and a figure of
    True/False against epoch."""
    from ctfgen.metrics.compare import compare

    (tmp_path / "ctf").mkdir()
    for epoch in (1, 2):
        rec = {"name": "ctf", "epoch": epoch, "metrics": {"fd": 1.0 / epoch, "bits_per_token": 4.0,
                                                          "bits_per_token_exact": False}}
        (tmp_path / "ctf" / f"step-{epoch}.json").write_text(json.dumps(rec))
    table, pngs = compare([tmp_path / "ctf"], tmp_path / "out")
    assert "bits_per_token_exact" not in table and "| 4.0000 (bound) |" in table
    assert sorted(p.name for p in pngs) == ["bits_per_token.png", "fd.png"]


def test_compare_names_a_record_that_is_not_utf8(tmp_path, capsys):
    """A record saved as UTF-16 (with a byte-order mark) was a UnicodeDecodeError traceback."""
    (tmp_path / "run" / "eval").mkdir(parents=True)
    (tmp_path / "run" / "eval" / "epoch_0001.json").write_bytes('{"metrics": {"fd": 1.0}}'.encode("utf-16"))
    assert main(["compare", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "epoch_0001.json is not valid JSON" in err and "Traceback" not in err


def test_compare_takes_records_whose_name_is_null_or_a_number(tmp_path):
    """`"name": null` was kept by setdefault and sorting the runs' names was a TypeError."""
    from ctfgen.metrics.compare import compare

    for stem, name in (("a", None), ("b", 7), ("c", "ctf")):
        (tmp_path / f"{stem}.json").write_text(json.dumps({"name": name, "epoch": 1, "metrics": {"fd": 1.0}}))
    table, _ = compare([tmp_path / f"{s}.json" for s in "abc"], None)
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == ["7", "a", "ctf"]
