"""Datasets: IDX parsing, Fashion-MNIST, class names, ImageFolder preprocessing and corrupt files."""

import gzip
import logging
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from ctfgen.data import fashion_mnist as fm
from ctfgen.data.fashion_mnist import (CLASS_NAMES, FashionMNIST, class_index, find_fashion_mnist,
                                       load_fashion_mnist, read_idx)
from ctfgen.data.folder import CorruptImageError, ImageFolder, center_crop_arr
from ctfgen.utils.errors import CtfgenError


def _idx_bytes(arr: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08}[arr.dtype]
    return bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _write_split(d, prefix, images, labels, gz=True):
    for stem, arr in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        data = _idx_bytes(arr)
        if gz:
            with gzip.open(d / f"{stem}.gz", "wb") as f:
                f.write(data)
        else:
            (d / stem).write_bytes(data)


@pytest.fixture
def tiny_idx(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    labels = np.tile(np.arange(10, dtype=np.uint8), 3)
    _write_split(tmp_path, "train", images, labels, gz=True)
    _write_split(tmp_path, "t10k", images[:10], labels[:10], gz=False)
    return tmp_path, images, labels


def test_idx_round_trip_gz_and_plain(tiny_idx):
    d, images, labels = tiny_idx
    x, y = load_fashion_mnist("train", root=d)
    assert x.dtype == np.uint8 and x.shape == (30, 28, 28) and np.array_equal(x, images)
    assert y.dtype == np.int64 and np.array_equal(y, labels)
    xt, yt = load_fashion_mnist("test", root=d)
    assert xt.shape == (10, 28, 28) and np.array_equal(xt, images[:10])
    assert not x.flags.writeable  # the cached arrays are shared, so they must be read-only


def test_idx_corrupt_and_truncated_are_clear_errors(tmp_path):
    good = _idx_bytes(np.zeros((4, 28, 28), np.uint8))
    (tmp_path / "trunc").write_bytes(good[:-5])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_idx(tmp_path / "trunc")
    (tmp_path / "magic").write_bytes(b"\x12\x34" + good[2:])
    with pytest.raises(ValueError, match="bad magic"):
        read_idx(tmp_path / "magic")
    (tmp_path / "bad.gz").write_bytes(gzip.compress(good)[:-10])
    with pytest.raises(ValueError, match="corrupt"):
        read_idx(tmp_path / "bad.gz")


def test_labels_count_mismatch_refused(tmp_path):
    _write_split(tmp_path, "train", np.zeros((5, 28, 28), np.uint8), np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match="expected 5 labels"):
        load_fashion_mnist("train", root=tmp_path)


def test_find_missing_says_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="make data"):
        find_fashion_mnist(tmp_path)
    # An explicit root never silently falls back, but the environment variable is honoured.
    _write_split(tmp_path, "train", np.zeros((10, 28, 28), np.uint8), np.arange(10, dtype=np.uint8))
    _write_split(tmp_path, "t10k", np.zeros((10, 28, 28), np.uint8), np.arange(10, dtype=np.uint8))
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path))
    assert find_fashion_mnist() == tmp_path
    with pytest.raises(ValueError, match="unknown Fashion-MNIST split"):
        load_fashion_mnist("val", root=tmp_path)


def test_class_index_aliases():
    assert len(CLASS_NAMES) == 10 and CLASS_NAMES[0] == "T-shirt/top" and CLASS_NAMES[9] == "Ankle boot"
    for name, idx in [("tshirt", 0), ("T-shirt", 0), ("T-shirt/top", 0), ("trouser", 1), ("Sneaker", 7),
                      ("bag", 8), ("ankle-boot", 9), ("Ankle boot", 9), ("boot", 9), (3, 3), ("5", 5),
                      (np.int64(6), 6)]:
        assert class_index(name) == idx, name
    with pytest.raises(ValueError, match="Ankle boot"):
        class_index("hat")
    with pytest.raises(ValueError, match="out of range"):
        class_index(10)


def test_dataset_range_limit_and_resize(tiny_idx):
    d, images, labels = tiny_idx
    ds = FashionMNIST("train", root=d, limit=12)
    assert len(ds) == 12
    counts = np.bincount(ds.targets, minlength=10)
    assert counts.tolist() == [2, 2] + [1] * 8  # balanced, remainder to the lowest classes
    x, y = ds[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and isinstance(y, int)
    assert torch.allclose(x[0], torch.from_numpy(images[0]).float() / 127.5 - 1, atol=1e-6)
    assert FashionMNIST("train", root=d, limit=12).indices.tolist() == ds.indices.tolist()
    x32, _ = FashionMNIST("train", root=d, image_size=32)[0]
    assert x32.shape == (1, 32, 32) and x32.min() >= -1 and x32.max() <= 1
    with pytest.raises(ValueError, match="only 3 exist"):
        FashionMNIST("train", root=d, limit=50)


def test_validation_split_is_carved_from_train(tiny_idx):
    d, _, labels = tiny_idx
    val = FashionMNIST("val", root=d, validation=10)
    train = FashionMNIST("train", root=d, validation=10)
    assert len(val) == 10 and len(train) == 20
    assert np.bincount(val.targets, minlength=10).tolist() == [1] * 10  # class-balanced
    assert not set(val.indices.tolist()) & set(train.indices.tolist())
    assert sorted(val.indices.tolist() + train.indices.tolist()) == list(range(30))
    assert val.indices.tolist() == list(range(20, 30))  # the last image of each class
    limited = FashionMNIST("train", root=d, validation=10, limit=10)  # a limit applies to what is left
    assert set(limited.indices.tolist()) <= set(train.indices.tolist()) and len(limited) == 10
    assert len(FashionMNIST("test", root=d, validation=10)) == 10  # the test split is never touched
    with pytest.raises(ValueError, match="multiple of 10"):
        FashionMNIST("val", root=d, validation=15)
    with pytest.raises(ValueError, match="validation > 0"):
        FashionMNIST("val", root=d)
    with pytest.raises(ValueError, match="has only 3"):
        FashionMNIST("val", root=d, validation=30)


def test_real_fashion_mnist():
    try:
        find_fashion_mnist()
    except FileNotFoundError as e:
        pytest.skip(f"Fashion-MNIST not installed; run `make data` ({e})")
    x, y = load_fashion_mnist("train")
    assert x.shape == (60000, 28, 28) and y.shape == (60000,)
    assert sorted(np.unique(y).tolist()) == list(range(10)) and np.bincount(y).tolist() == [6000] * 10
    xt, yt = load_fashion_mnist("test")
    assert xt.shape == (10000, 28, 28) and np.bincount(yt).tolist() == [1000] * 10
    assert load_fashion_mnist("train")[0] is x  # parsed once per process
    img, label = FashionMNIST("test", limit=20)[3]
    assert img.shape == (1, 28, 28) and -1 <= img.min() < img.max() <= 1 and 0 <= label < 10


def test_center_crop_matches_adm_and_range():
    rng = np.random.default_rng(1)
    big = Image.fromarray(rng.integers(0, 256, (300, 700, 3), dtype=np.uint8))
    out = center_crop_arr(big, 64)
    assert out.size == (64, 64)
    # Reference: two BOX halvings (300 -> 150 -> 75), bicubic to short side 64, centre crop.
    ref = big.resize((350, 150), Image.BOX).resize((175, 75), Image.BOX)
    ref = ref.resize((round(175 * 64 / 75), 64), Image.BICUBIC)
    left = (ref.size[0] - 64) // 2
    assert np.array_equal(np.array(out), np.array(ref)[:, left:left + 64])
    small = center_crop_arr(Image.fromarray(rng.integers(0, 256, (20, 30), dtype=np.uint8)), 40)
    assert small.size == (40, 40)


def _make_folder(root, bad=True):
    rng = np.random.default_rng(2)
    for c, n in (("cat", 2), ("ant", 3)):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    if bad:
        (root / "ant" / "1b_garbage.png").write_bytes(b"this is not a png" * 10)
    (root / "ant" / "notes.txt").write_text("ignored")


def test_image_folder_layout_and_range(tmp_path):
    _make_folder(tmp_path, bad=False)
    ds = ImageFolder(tmp_path, image_size=16)
    assert ds.classes == ["ant", "cat"] and len(ds) == 5 and ds.targets == [0, 0, 0, 1, 1]
    x, y = ds[4]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 1
    assert -1 <= x.min() and x.max() <= 1 and x.std() > 0.1
    gray = ImageFolder(tmp_path, image_size=8, channels=1)[0][0]
    assert gray.shape == (1, 8, 8)
    batch = torch.utils.data.default_collate([ds[i] for i in range(3)])
    assert batch[0].shape == (3, 3, 16, 16) and batch[1].dtype == torch.int64


def test_image_folder_skips_corrupt_and_counts(tmp_path, caplog):
    _make_folder(tmp_path)
    ds = ImageFolder(tmp_path, image_size=16)
    assert len(ds) == 6 and ds.skipped == 0
    bad = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("1b_garbage.png")][0]
    with pytest.raises(CorruptImageError) as info:
        ds.load(bad)
    assert isinstance(info.value, CtfgenError)  # one `error:` line if it reaches a command; it was a bare Exception
    with caplog.at_level(logging.WARNING, logger="ctfgen.data.folder"):
        seen = [ds[i] for i in range(len(ds))]  # iterating never raises
    assert len(seen) == 6 and ds.skipped == 1 and "1b_garbage.png" in ds.report()
    assert torch.equal(seen[bad][0], ds[bad + 1][0])  # the next readable image stands in
    assert "1b_garbage.png" in caplog.text
    # verify=True drops it at construction instead.
    scanned = ImageFolder(tmp_path, image_size=16, verify=True)
    assert len(scanned) == 5 and scanned.skipped == 1


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no class sub-folders"):
        ImageFolder(tmp_path)
