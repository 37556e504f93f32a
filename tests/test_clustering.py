import numpy as np
import pytest
import torch

from ctfgen.clustering import CoarseMap, _repair_empty, codebook_fingerprint
from ctfgen.tokenizer import VQConfig, VQModel
from ctfgen.utils.errors import ConfigError, MismatchError, WrongTypeError


def _codebook(v=1024, d=8, seed=0):
    return torch.randn(v, d, generator=torch.Generator().manual_seed(seed))


def _reference_kmeans(x, k, seed, n_init=4, iters=300):
    """Plain float64 Lloyd with k-means++ seeding (Arthur & Vassilvitskii), best of n_init."""
    rng = np.random.default_rng(seed)
    best = np.inf
    for _ in range(n_init):
        centers = [x[rng.integers(len(x))]]
        d2 = ((x - centers[0]) ** 2).sum(1)
        for _ in range(k - 1):
            centers.append(x[rng.choice(len(x), p=d2 / d2.sum())])
            d2 = np.minimum(d2, ((x - centers[-1]) ** 2).sum(1))
        c = np.stack(centers)
        for _ in range(iters):
            dist = ((x[:, None, :] - c[None]) ** 2).sum(-1)
            lab = dist.argmin(1)
            new = np.stack([x[lab == j].mean(0) if (lab == j).any() else c[j] for j in range(k)])
            if np.allclose(new, c):
                break
            c = new
        inertia = ((x - c[((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)]) ** 2).sum()
        best = min(best, inertia)
    return best


def test_kmeans_deterministic_for_a_seed():
    w = _codebook()
    a = CoarseMap.fit(w, 32, seed=3)
    b = CoarseMap.fit(w, 32, seed=3)
    assert torch.equal(a.fine_to_coarse, b.fine_to_coarse)
    assert a.fingerprint == b.fingerprint and a.inertia == b.inertia


def test_kmeans_inertia_on_par_with_reference():
    w = _codebook(v=1500)
    cmap = CoarseMap.fit(w, 24, seed=0)
    x = torch.nn.functional.normalize(w.double(), dim=-1).numpy()
    ref = _reference_kmeans(x, 24, seed=0)
    assert cmap.inertia <= ref * 1.03, (cmap.inertia, ref)
    # and clearly better than a random partition of the same sizes
    assert cmap.inertia < 0.5 * CoarseMap.fit(w, 24, method="random").inertia


def test_kmeans_recovers_separated_blobs():
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(8, 8, generator=g) * 10
    truth = torch.arange(400) % 8
    w = centers[truth] + 0.01 * torch.randn(400, 8, generator=g)
    cmap = CoarseMap.fit(w, 8, normalize=False)
    f2c = cmap.fine_to_coarse
    # same partition up to renaming: each true blob maps to exactly one cluster, all distinct
    pairs = set(zip(truth.tolist(), f2c.tolist()))
    assert len(pairs) == 8


def test_kmeans_clusters_normalised_codewords():
    # LlamaGen compares l2-normalised codewords, so rescaling rows must not change the map
    w = _codebook(v=512)
    scale = torch.rand(512, 1, generator=torch.Generator().manual_seed(5)) * 10 + 0.1
    a = CoarseMap.fit(w, 16, seed=0)
    b = CoarseMap.fit(w * scale, 16, seed=0)
    assert torch.equal(a.fine_to_coarse, b.fine_to_coarse)
    assert a.codebook_fingerprint != b.codebook_fingerprint
    c = CoarseMap.fit(w * scale, 16, seed=0, normalize=False)
    assert not c.normalize and not torch.equal(a.fine_to_coarse, c.fine_to_coarse)


def test_the_map_records_that_a_normalising_tokenizer_s_codewords_were_clustered_normalised():
    """fit(vq, normalize=False) clustered vq.codebook(), normalised by the tokenizer, but recorded normalize=False,
    so representatives() of the raw weight measured distances in another space than the one clustered."""
    torch.manual_seed(0)
    vq = VQModel(VQConfig(codebook_size=64, codebook_embed_dim=4, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2),
                          z_channels=8, base_ch=8, num_res_blocks=1, in_channels=1, norm_groups=4))
    with torch.no_grad():
        vq.quantize.embedding.weight.mul_(torch.rand(64, 1) * 10 + 0.1)  # rows of very different lengths
    default, plain = CoarseMap.fit(vq, 8, seed=0), CoarseMap.fit(vq, 8, seed=0, normalize=False)
    assert default.normalize and plain.normalize
    assert plain.fingerprint == default.fingerprint  # maps fitted either way keep their fingerprint
    weight = vq.quantize.embedding.weight.detach()
    assert torch.equal(plain.representatives(weight), default.representatives(vq))
    for fake in (_FakeVQ(weight), vq):  # a duck-typed tokenizer without a config counts as normalising
        assert CoarseMap.fit(fake, 8, seed=0, normalize=False).normalize
    vq.config.codebook_l2_norm = vq.quantize.l2_norm = False
    assert not CoarseMap.fit(vq, 8, seed=0).normalize and not CoarseMap.fit(vq, 8, seed=0, normalize=False).normalize


def test_no_empty_clusters_even_with_duplicate_codewords():
    # 10 distinct codewords repeated 20 times: fewer distinct points than clusters
    w = _codebook(v=10).repeat(20, 1)
    cmap = CoarseMap.fit(w, 15, seed=0)
    assert (cmap.sizes > 0).all() and int(cmap.sizes.sum()) == 200


def test_repair_moves_the_farthest_point_into_empty_cluster():
    x = np.array([[0.0], [0.1], [5.0], [0.2]])
    labels = np.array([0, 0, 0, 1])
    fixed, n = _repair_empty(x, labels, 3)
    assert n == 1 and np.bincount(fixed, minlength=3).min() == 1
    assert fixed[2] == 2  # the outlier at 5.0 is the one moved


def test_random_map_is_balanced_and_seeded():
    w = _codebook(v=1000)
    a = CoarseMap.fit(w, 64, method="random", seed=1)
    assert int(a.sizes.max()) - int(a.sizes.min()) <= 1
    assert torch.equal(a.fine_to_coarse, CoarseMap.fit(w, 64, method="random", seed=1).fine_to_coarse)
    assert not torch.equal(a.fine_to_coarse, CoarseMap.fit(w, 64, method="random", seed=2).fine_to_coarse)


def test_views_are_consistent():
    w = _codebook(v=300)
    cmap = CoarseMap.fit(w, 12, seed=0)
    f2c = cmap.fine_to_coarse
    assert f2c.dtype == torch.int64 and f2c.shape == (300,)
    mask = cmap.cluster_mask()
    assert mask.shape == (12, 300) and torch.equal(mask.sum(0), torch.ones(300, dtype=torch.long))
    x = torch.nn.functional.normalize(w.double(), dim=-1)
    for c in range(12):
        m = cmap.members(c)
        assert torch.equal(m, torch.nonzero(f2c == c).flatten())
        assert torch.equal(mask[c].nonzero().flatten(), m)
        assert len(m) == int(cmap.sizes[c])
        cen = x[m].mean(0)
        assert torch.allclose(cmap.centroids[c].double(), cen, atol=1e-6)
        assert cmap.spread[c].item() == pytest.approx(((x[m] - cen) ** 2).sum(1).mean().item(), rel=1e-9)
    assert cmap.inertia == pytest.approx(float((cmap.spread * cmap.sizes).sum()), rel=1e-9)
    tokens = torch.randint(0, 300, (3, 7))
    assert torch.equal(cmap(tokens), f2c[tokens])
    with pytest.raises(ValueError, match="fine tokens must be in"):
        cmap(torch.tensor([300]))
    with pytest.raises(ConfigError, match="out of range"):
        cmap.members(12)


def test_fine_tokens_of_every_integer_dtype_are_mapped():
    """int8 (and uint16/uint32) tokens were refused as "fine tokens must be an integer tensor, got torch.int8"."""
    cmap = CoarseMap([0, 1, 1, 0], 2, codebook_fingerprint="x")
    tokens = torch.tensor([[0, 1], [2, 3]])
    want = cmap(tokens)
    dtypes = [torch.int8, torch.uint8, torch.int16, torch.int32] + [getattr(torch, n) for n in ("uint16", "uint32")
                                                                     if hasattr(torch, n)]
    for dtype in dtypes:
        assert torch.equal(cmap(tokens.to(dtype)), want), dtype
    with pytest.raises(MismatchError, match=r"fine tokens must be in \[0, 4\), got range \[-1, "):
        cmap(torch.tensor([-1, 0], dtype=torch.int8))
    for dtype in (torch.bool, torch.float32):
        with pytest.raises(WrongTypeError, match=f"fine tokens must be an integer tensor, got {dtype}"):
            cmap(tokens.to(dtype))


def test_save_load_round_trip(tmp_path):
    w = _codebook(v=256)
    cmap = CoarseMap.fit(w, 16, seed=4)
    path = cmap.save(tmp_path / "map.safetensors")
    assert path.stat().st_size < 64 * 1024
    back = CoarseMap.load(path)
    assert torch.equal(back.fine_to_coarse, cmap.fine_to_coarse)
    assert (back.fingerprint, back.codebook_fingerprint, back.method, back.seed, back.num_coarse) == (
        cmap.fingerprint, cmap.codebook_fingerprint, "kmeans", 4, 16)
    assert torch.equal(back.centroids, cmap.centroids) and back.inertia == cmap.inertia
    back.check_codebook(w)


def test_the_same_map_saves_to_the_same_bytes(tmp_path):
    """Directory fingerprints (which study and reproduction records keep) hash a pipeline's files, so
    saving one map again, here or in another process, must give the same file."""
    import subprocess
    import sys

    cmap = CoarseMap.fit(_codebook(v=64), 4, seed=0)
    files = [cmap.save(tmp_path / f"m{i}.safetensors").read_bytes() for i in range(3)]
    files.append(CoarseMap.load(tmp_path / "m0.safetensors").save(tmp_path / "again.safetensors").read_bytes())
    code = "import sys; from ctfgen.clustering import CoarseMap; CoarseMap.load(sys.argv[1]).save(sys.argv[2])"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "m0.safetensors"), str(tmp_path / "p.safetensors")],
                   check=True)
    files.append((tmp_path / "p.safetensors").read_bytes())
    assert all(f == files[0] for f in files)


def test_load_rejects_edited_file(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = CoarseMap.fit(_codebook(v=64), 4, seed=0).save(tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    f2c = tensors["fine_to_coarse"]
    f2c[0] = (f2c[0] + 1) % 4
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="does not match its contents"):
        CoarseMap.load(tmp_path / "bad.safetensors")
    save_file(tensors, str(tmp_path / "nometa.safetensors"))
    with pytest.raises(ValueError, match="not a ctfgen coarse map"):
        CoarseMap.load(tmp_path / "nometa.safetensors")


def test_load_of_a_damaged_file_is_a_clear_error(tmp_path):
    from ctfgen.utils.errors import CorruptFileError

    data = CoarseMap.fit(_codebook(v=64), 4, seed=0).save(tmp_path / "m.safetensors").read_bytes()
    for name, damaged in (("truncated", data[: len(data) // 2]), ("text", b"not a map"), ("empty", b"")):
        (tmp_path / name).write_bytes(damaged)
        with pytest.raises(CorruptFileError, match="cannot be read as a coarse map"):
            CoarseMap.load(tmp_path / name)


@pytest.mark.parametrize("key,text", [("format_version", "one"), ("seed", "4.5"), ("normalize", "yes"),
                                      ("normalize", "1"), ("num_coarse", ""), ("inertia", "{")])
def test_load_of_edited_metadata_is_a_clear_error(tmp_path, key, text):
    # int() and json.loads of hand-edited metadata raised bare ValueError / JSONDecodeError tracebacks
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from ctfgen.utils.errors import CorruptFileError

    path = CoarseMap.fit(_codebook(v=64), 4, seed=0).save(tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file(load_file(str(path)), str(tmp_path / "edited.safetensors"), metadata={**meta, key: text})
    with pytest.raises(CorruptFileError, match=f"edited.safetensors.*{key}=.*write it again with `ctfgen cluster`"):
        CoarseMap.load(tmp_path / "edited.safetensors")


class _FakeVQ:
    def __init__(self, weight):
        self.weight = weight

    def codebook(self):
        return torch.nn.functional.normalize(self.weight, dim=-1)

    @property
    def fingerprint(self):
        return codebook_fingerprint(self.weight)


def test_refuses_other_codebook():
    w, other = _codebook(v=128), _codebook(v=128, seed=1)
    cmap = CoarseMap.fit(_FakeVQ(w), 8)
    assert cmap.codebook_fingerprint == codebook_fingerprint(w)
    cmap.check_codebook(_FakeVQ(w))
    cmap.check_codebook(w)
    cmap.check_codebook(codebook_fingerprint(w))
    for bad in (other, _FakeVQ(other), codebook_fingerprint(other)):
        with pytest.raises(ValueError, match=f"codebook fingerprint: '{cmap.codebook_fingerprint}' in the coarse map"):
            cmap.check_codebook(bad)
    with pytest.raises(TypeError):
        cmap.check_codebook(3)


def test_bad_arguments():
    w = _codebook(v=16)
    with pytest.raises(ValueError, match="num_coarse"):
        CoarseMap.fit(w, 17)
    with pytest.raises(ValueError, match="method"):
        CoarseMap.fit(w, 4, method="spectral")
    with pytest.raises(ValueError, match="empty cluster"):
        CoarseMap(torch.zeros(16, dtype=torch.long), 2, codebook_fingerprint="x")


def test_labels_that_are_not_whole_numbers_are_refused():
    """1.7 was truncated to label 1 without a word."""
    with pytest.raises(MismatchError, match="fine_to_coarse must hold whole-number labels, got 1.7"):
        CoarseMap(torch.tensor([0.0, 1.7, 1.0, 0.0]), 2, codebook_fingerprint="x")
    with pytest.raises(MismatchError, match="fine_to_coarse must hold whole-number labels, got a torch.bool tensor"):
        CoarseMap(torch.tensor([False, True, True, False]), 2, codebook_fingerprint="x")
    whole = CoarseMap(np.array([0.0, 1.0, 1.0, 0.0]), 2, codebook_fingerprint="x")
    assert whole.fingerprint == CoarseMap([0, 1, 1, 0], 2, codebook_fingerprint="x").fingerprint


def test_fingerprint_spec():
    w = _codebook(v=4, d=2)
    import hashlib

    h = hashlib.sha256(repr((4, 2)).encode() + w.numpy().astype(np.float32).tobytes()).hexdigest()[:16]
    assert codebook_fingerprint(w) == h == codebook_fingerprint(w.double())
    assert codebook_fingerprint(w) != codebook_fingerprint(w.reshape(2, 4))
