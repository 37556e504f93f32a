"""Code directories: round trip, compact dtypes, atomic writes, header checks, extraction."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ctfgen.data import CodeDataset, CodeWriter, check_codes, extract_codes, read_header, write_codes
from ctfgen.data.extract import augment_views, ten_crop
from ctfgen.data.folder import ImageFolder

HEADER = {"tokenizer_fingerprint": "abc123", "grid_size": 2, "codebook_size": 300, "augment": "flip",
          "dataset": "test", "created_by": "test"}


class _Cfg:
    def __init__(self, codebook_size):
        self.codebook_size = codebook_size


class FakeVQ:
    """Average-pools 4x4 blocks and quantises the mean: codes follow the image, so flips are visible."""

    def __init__(self, codebook_size=64, fingerprint="fake0001"):
        self.config, self.fingerprint, self.calls = _Cfg(codebook_size), fingerprint, 0

    def encode(self, x):
        self.calls += 1
        m = F.avg_pool2d(x.float(), 4).mean(1)
        return ((m + 1) / 2 * (self.config.codebook_size - 1)).round().long().clamp(0, self.config.codebook_size - 1)


class ToyImages(torch.utils.data.Dataset):
    def __init__(self, n=23, size=28, channels=1):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, channels, size, size, generator=g) * 2 - 1
        self.y = torch.arange(n) % 10
        self.classes = [str(i) for i in range(10)]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def test_write_read_round_trip_and_dtype(tmp_path):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 300, (7, 2, 4))
    labels = rng.integers(0, 10, 7)
    out = write_codes(tmp_path / "codes", codes, labels, HEADER)
    assert sorted(p.name for p in out.iterdir()) == ["codes.npy", "header.json", "labels.npy"]
    assert np.load(out / "codes.npy").dtype == np.uint16  # 300 codewords fit in 2 bytes
    h = read_header(out)
    assert h["num_images"] == 7 and h["num_augmentations"] == 2 and h["image_tokens"] == 4
    ds = CodeDataset(out, augmentation=1)
    assert len(ds) == 7 and ds.codes.shape == (7, 2, 4) and isinstance(ds.codes, np.memmap)
    for i in range(7):
        c, y = ds[i]
        assert c.dtype == torch.int64 and c.tolist() == codes[i, 1].tolist() and y == labels[i]
    big = write_codes(tmp_path / "big", np.array([[[69999, 1]]]), [0], dict(HEADER, codebook_size=70000))
    assert np.load(big / "codes.npy").dtype == np.int32 and CodeDataset(big)[0][0].tolist() == [69999, 1]
    with pytest.raises(FileExistsError, match="overwrite"):
        write_codes(tmp_path / "codes", codes, labels, HEADER)
    with pytest.raises(ValueError, match="codebook"):
        write_codes(tmp_path / "oob", np.full((1, 1, 4), 300), [0], HEADER)


def test_write_refuses_non_integer_codes_and_negative_labels(tmp_path):
    # The integer memory maps took float codes truncated (2.7 -> 2) and NaN as code 0, and negative
    # labels reached training, whose class embedding fails on them far from the cause.
    from ctfgen.utils.errors import MismatchError, WrongTypeError
    for name, codes, labels, error, match in (
            ("nan", np.full((1, 1, 4), np.nan), [0], WrongTypeError, "codes must be integers"),
            ("float", np.full((1, 1, 4), 2.7), [0], WrongTypeError, "codes must be integers"),
            ("float_labels", np.zeros((1, 1, 4), int), [1.5], WrongTypeError, "labels must be integers"),
            ("negative", np.zeros((2, 1, 4), int), [0, -1], MismatchError, "labels must be >= 0")):
        with pytest.raises(error, match=match):
            write_codes(tmp_path / name, codes, labels, HEADER)
        assert list(tmp_path.iterdir()) == []
    out = write_codes(tmp_path / "ok", torch.zeros(2, 1, 4, dtype=torch.int32), torch.tensor([0, 3]), HEADER)
    assert CodeDataset(out)[1][1] == 3


def test_writer_refuses_a_header_the_reader_would_refuse(tmp_path):
    # a header without grid_size, augment or dataset was written, and read_header then called the
    # finished directory unusable
    for key in ("tokenizer_fingerprint", "grid_size", "augment", "dataset"):
        header = {k: v for k, v in HEADER.items() if k != key}
        with pytest.raises(ValueError, match=f"header lacks \\['{key}'\\]"):
            write_codes(tmp_path / key, np.zeros((1, 1, 4), int), [0], header)
    assert list(tmp_path.iterdir()) == []
    no_stamp = {k: v for k, v in HEADER.items() if k != "created_by"}
    out = write_codes(tmp_path / "ok", np.zeros((1, 1, 4), int), [0], no_stamp)
    assert read_header(out)["created_by"].startswith("ctfgen")


def test_random_augmentation_is_deterministic_per_epoch(tmp_path):
    n, a = 64, 10
    codes = np.broadcast_to(np.arange(a)[None, :, None], (n, a, 3))  # the code value is the augmentation id
    out = write_codes(tmp_path / "c", codes, np.zeros(n, int), dict(HEADER, codebook_size=16))
    ds = CodeDataset(out, seed=1)
    e0 = [ds[i][0][0].item() for i in range(n)]
    assert e0 == [CodeDataset(out, seed=1)[i][0][0].item() for i in range(n)]
    assert len(set(e0)) > 3  # really random across items
    ds.set_epoch(1)
    e1 = [ds[i][0][0].item() for i in range(n)]
    assert e1 != e0
    codes_b, labels_b = ds.get_batch([5, 2, 9])
    assert codes_b[:, 0].tolist() == [e1[5], e1[2], e1[9]] and labels_b.dtype == torch.int64
    assert CodeDataset(out, seed=2)[0][0][0].item() in range(a)
    # Pickling (DataLoader workers) reopens the memory map rather than copying the array.
    import pickle
    clone = pickle.loads(pickle.dumps(ds))
    assert isinstance(clone.codes, np.memmap) and clone[3][0].tolist() == ds[3][0].tolist()


def test_check_codes_names_each_mismatch(tmp_path):
    out = write_codes(tmp_path / "c", np.zeros((2, 1, 4), int), [0, 1], HEADER)
    check_codes(out, "abc123", codebook_size=300, grid_size=2)
    vq = FakeVQ(codebook_size=512, fingerprint="other")
    with pytest.raises(ValueError) as e:
        check_codes(CodeDataset(out), vq, grid_size=4)
    msg = str(e.value)
    assert "codebook fingerprint: 'abc123' in the codes, 'other' in the tokenizer" in msg
    assert "codebook size: 300 in the codes, 512 in the tokenizer" in msg and "grid size: 2 in the codes, 4 in the request" in msg
    assert "extract-codes" in msg


def test_damaged_arrays_are_a_clear_error(tmp_path):
    import shutil

    from ctfgen.utils.errors import CorruptFileError
    out = write_codes(tmp_path / "c", np.zeros((50, 1, 4), int), np.zeros(50, int), HEADER)
    damage = {"truncated": lambda d: (d / "codes.npy").write_bytes((d / "codes.npy").read_bytes()[:200]),
              "missing": lambda d: (d / "labels.npy").unlink(),
              "garbage": lambda d: (d / "codes.npy").write_bytes(b"xx")}
    for name, act in damage.items():
        shutil.copytree(out, tmp_path / name)
        act(tmp_path / name)
        with pytest.raises(CorruptFileError, match="directory is damaged.*extract-codes"):
            CodeDataset(tmp_path / name)


def test_exception_mid_write_leaves_no_directory(tmp_path):
    target = tmp_path / "codes"
    with pytest.raises(RuntimeError, match="boom"):
        with CodeWriter(target, 10, 1, 4, HEADER) as w:
            w.append(np.ones((5, 1, 4), int), np.zeros(5, int))
            raise RuntimeError("boom")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_failed_commit_leaves_no_partial_directory(tmp_path):
    # commit refusing a directory that appeared meanwhile (or failing on a full disk) left the hidden
    # partial directory, full-size arrays and all, until some later writer after this process's exit
    target = tmp_path / "codes"
    with pytest.raises(FileExistsError, match="appeared while writing"):
        with CodeWriter(target, 10, 1, 4, HEADER) as w:
            w.append(np.ones((5, 1, 4), int), np.zeros(5, int))
            target.mkdir()  # another writer finished first
    assert [p.name for p in tmp_path.iterdir()] == ["codes"] and list(target.iterdir()) == []


def test_sigkill_mid_write_leaves_no_directory(tmp_path):
    target = tmp_path / "codes"
    script = textwrap.dedent(f"""
        import os, signal, numpy as np
        from ctfgen.data.codes import CodeWriter
        w = CodeWriter({str(target)!r}, 10, 1, 4, {HEADER!r})
        w.append(np.ones((5, 1, 4), int), np.zeros(5, int))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(os.path.dirname(__file__), "..", "src"),
                                                      os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert not target.exists()
    leftovers = list(tmp_path.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".codes.partial-")
    # The next writer of the same directory clears the dead writer's leftovers.
    write_codes(target, np.ones((1, 1, 4), int), [0], HEADER)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes"]


def test_ten_crop_order_matches_torchvision():
    x = torch.arange(2 * 1 * 5 * 6, dtype=torch.float32).reshape(2, 1, 5, 6)
    crops = ten_crop(x, 3)
    assert crops.shape == (2, 10, 1, 3, 3)
    assert torch.equal(crops[:, 0], x[..., :3, :3]) and torch.equal(crops[:, 3], x[..., 2:, 3:])
    assert torch.equal(crops[:, 4], x[..., 1:4, 2:5])  # int(round(2 / 2)) = 1, int(round(3 / 2)) = 2
    assert torch.equal(crops[:, 5], x.flip(-1)[..., :3, :3])
    up = augment_views(torch.zeros(1, 1, 28, 28), "tencrop", 28)  # 28 -> int(30.8) = 30, then crops
    assert up.shape == (1, 10, 1, 28, 28)


def test_extract_flip_doubles_augmentations(tmp_path):
    data, vq = ToyImages(), FakeVQ()
    out = extract_codes(vq, data, tmp_path / "none", augment="none", batch_size=5, progress=False)
    out2 = extract_codes(vq, data, tmp_path / "flip", augment="flip", batch_size=8, progress=False)
    h1, h2 = read_header(out), read_header(out2)
    assert h1["num_augmentations"] == 1 and h2["num_augmentations"] == 2
    assert h2["grid_size"] == 7 and h2["image_tokens"] == 49 and h2["tokenizer_fingerprint"] == "fake0001"
    assert h2["num_images"] == 23 and h2["num_classes"] == 10 and h2["code_dtype"] == "uint16"
    c1, c2 = np.load(out / "codes.npy"), np.load(out2 / "codes.npy")
    assert c2.shape == (23, 2, 49)
    assert np.array_equal(c1[:, 0], c2[:, 0])
    direct = vq.encode(data.x).reshape(23, 49).numpy()
    assert np.array_equal(c2[:, 0], direct)
    flipped = c2[:, 1].reshape(23, 7, 7)
    assert np.array_equal(flipped, direct.reshape(23, 7, 7)[:, :, ::-1])  # the mirror image's codes
    assert np.array_equal(np.load(out2 / "labels.npy"), data.y.numpy())
    check_codes(out2, vq, grid_size=7)
    ten = extract_codes(vq, data, tmp_path / "ten", augment="tencrop", batch_size=16, progress=False)
    assert np.load(ten / "codes.npy").shape == (23, 10, 49)


def test_extract_drops_corrupt_images(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(tmp_path / "img" / c / f"{i}.png")
    (tmp_path / "img" / "a" / "1x.png").write_bytes(b"\x89PNG garbage")
    ds = ImageFolder(tmp_path / "img", image_size=16, channels=1)
    out = extract_codes(FakeVQ(), ds, tmp_path / "codes", batch_size=4, progress=False)
    h = read_header(out)
    assert h["num_images"] == 6 and h["num_skipped"] == 1 and ds.skipped == 1
    assert np.load(out / "labels.npy").tolist() == [0, 0, 0, 1, 1, 1]
    assert np.load(out / "codes.npy").shape == (6, 1, 16)


def test_extract_from_a_limited_folder_drops_corrupt_images_and_keeps_classes(tmp_path):
    from PIL import Image

    from ctfgen.config import DataConfig
    from ctfgen.data import make_dataset
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(tmp_path / "img" / c / f"{i}.png")
    (tmp_path / "img" / "a" / "1x.png").write_bytes(b"\x89PNG garbage")
    data = DataConfig(dataset="image_folder", root=str(tmp_path / "img"), image_size=16, channels=1, train_limit=12)
    ds = make_dataset(data, "train", for_codes=True)
    assert len(ds) == 12 and 2 in ds.indices  # the seeded subset holds the corrupt a/1x.png
    out = extract_codes(FakeVQ(), ds, tmp_path / "codes", batch_size=4, progress=False)
    h = read_header(out)
    assert h["num_images"] == 11 and h["num_skipped"] == 1 and h["num_classes"] == 3
    codes = np.load(out / "codes.npy")[:, 0]
    assert len({c.tobytes() for c in codes}) == 11  # no image's codes written twice


def _dist_worker(rank, world, init_file, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        vq = FakeVQ()
        extract_codes(vq, ToyImages(), out, augment="flip", batch_size=3, progress=False)
        assert os.path.isdir(out)  # every rank returns only after rank 0 has written
        assert vq.calls == 4  # ceil(23 / (3 * 2)) global steps, each rank encodes its share
    finally:
        dist.destroy_process_group()


def test_extract_two_ranks_matches_single_process(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "dist")), nprocs=2)
    single = extract_codes(FakeVQ(), ToyImages(), tmp_path / "single", augment="flip", progress=False)
    assert np.array_equal(np.load(tmp_path / "dist" / "codes.npy"), np.load(single / "codes.npy"))
    assert np.array_equal(np.load(tmp_path / "dist" / "labels.npy"), np.load(single / "labels.npy"))
    assert json.loads((tmp_path / "dist" / "header.json").read_text())["num_images"] == 23


def test_extract_with_real_vq_and_cli(tmp_path):
    pytest.importorskip("ctfgen.tokenizer.vq")
    from ctfgen.app.cli import main
    from ctfgen.data import FashionMNIST, find_fashion_mnist
    from ctfgen.tokenizer import VQConfig, VQModel
    try:
        find_fashion_mnist()
    except FileNotFoundError as e:
        pytest.skip(f"Fashion-MNIST not installed; run `make data` ({e})")
    torch.manual_seed(0)
    vq = VQModel(VQConfig(codebook_size=32, codebook_embed_dim=4, encoder_ch_mult=(1, 2, 2),
                          decoder_ch_mult=(1, 2, 2), z_channels=8, base_ch=8, num_res_blocks=1,
                          in_channels=1, norm_groups=4)).eval()
    vq.save_pretrained(tmp_path / "vq")
    rc = main(["extract-codes", "--tokenizer", str(tmp_path / "vq"), "--dataset", "fashion_mnist",
               "--split", "test", "--limit", "20", "--augment", "flip", "--out", str(tmp_path / "codes"),
               "--batch-size", "8", "--device", "cpu"])
    assert rc == 0
    ds = CodeDataset(tmp_path / "codes", augmentation=0)
    assert len(ds) == 20 and ds.grid_size == 7 and ds.header["tokenizer_fingerprint"] == vq.fingerprint
    check_codes(ds, vq)
    images = torch.stack([x for x, _ in FashionMNIST("test", limit=20)])
    with torch.no_grad():
        expected = vq.encode(images).reshape(20, 49)
    assert torch.equal(ds.get_batch(range(20))[0], expected)
