"""The sampling commands end to end on tiny random pipelines saved to disk."""

import numpy as np
import pytest
import torch
from PIL import Image

from _tiny_ctf import tiny_baseline, tiny_ctf
from ctfgen.cli import main
from ctfgen.pipeline import ARPipeline, CTFPipeline, load_pipeline


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    ar, aux, cmap, vq = tiny_ctf(vocab=8, num_coarse=3, num_classes=10)
    CTFPipeline(ar, aux, cmap, vq).save_pretrained(root / "ctf")
    gpt, vq = tiny_baseline(vocab=8, num_classes=10, vq=vq)
    ARPipeline(gpt, vq).save_pretrained(root / "baseline")
    return root


@pytest.mark.parametrize("kind", ["ctf", "baseline"])
def test_sample_writes_grid_and_singles(pipelines, tmp_path, kind, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", "--model", str(pipelines / kind), "--class", "sneaker", "3", "--n", "5",
                 "--out", str(out), "--scale", "2"]) == 0
    grid = Image.open(out)
    assert grid.size[0] > 4 * 5
    singles = sorted((tmp_path / "grid").glob("*.png"))
    assert [p.name for p in singles][:2] == ["0000_class7.png", "0001_class3.png"]
    assert len(singles) == 5
    printed = capsys.readouterr().out
    assert "stage1" in printed and "decode" in printed


def test_sample_rejects_unknown_class_and_fine_options_on_baseline(pipelines, tmp_path, capsys):
    assert main(["sample", "--model", str(pipelines / "ctf"), "--class", "spaceship", "--out", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.startswith("error: unknown Fashion-MNIST class 'spaceship'")
    assert main(["sample", "--model", str(pipelines / "baseline"), "--top-k-fine", "1", "--out", str(tmp_path / "x.png")]) == 2
    assert "only apply to a CTF" in capsys.readouterr().err


def test_sample_is_reproducible(pipelines, tmp_path):
    for name in ("a", "b"):
        main(["sample", "--model", str(pipelines / "ctf"), "--n", "4", "--seed", "3", "--no-singles",
              "--out", str(tmp_path / f"{name}.png")])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))


def test_sample_many_resumes_and_matches_a_fresh_run(pipelines, tmp_path):
    args = ["sample-many", "--model", str(pipelines / "ctf"), "--per-class", "3", "--classes", "0", "4",
            "--batch-size", "4", "--seed", "1"]
    main(args + ["--out", str(tmp_path / "fresh.npz")])
    fresh = np.load(tmp_path / "fresh.npz")
    assert fresh["arr_0"].dtype == np.uint8 and fresh["arr_0"].shape == (6, 4, 4, 1)
    assert fresh["labels"].tolist() == [0, 0, 0, 4, 4, 4]

    # A run killed after its first batch leaves one part file; resuming redoes only the rest.
    from ctfgen import sample_sets as sm

    pipeline = load_pipeline(pipelines / "ctf")
    out = tmp_path / "resumed.npz"
    labels = np.repeat(np.array([0, 4]), 3)
    parts = sm.sample_many(pipeline, labels[:4], out, 4, seed=1, sampling={})
    assert len(parts) == 1 and parts[0].exists()
    stamp = parts[0].stat().st_mtime_ns
    main(args + ["--out", str(out)])
    resumed = np.load(out)
    assert np.array_equal(resumed["arr_0"], fresh["arr_0"])
    assert not out.with_name(out.name + ".parts").exists()
    assert stamp  # the first part was reused, not resampled (same bytes either way: seeds are per batch)


def test_sample_many_shards_across_ranks(pipelines, tmp_path):
    from ctfgen import sample_sets as sm

    pipeline = load_pipeline(pipelines / "baseline")
    labels = np.arange(10) % 3
    single = tmp_path / "single.npz"
    sm.sample_many(pipeline, labels, single, 3, seed=2, sampling={})
    sm.merge_parts(single, 4)
    sharded = tmp_path / "sharded.npz"
    for rank in range(2):
        sm.sample_many(pipeline, labels, sharded, 3, seed=2, sampling={}, rank=rank, world_size=2)
    sm.merge_parts(sharded, 4)
    assert np.array_equal(np.load(single)["arr_0"], np.load(sharded)["arr_0"])


def test_bench_times_both_methods(pipelines, tmp_path, monkeypatch, capsys):
    from ctfgen import bench

    monkeypatch.setattr(bench, "paper_shape_pipelines", lambda *a, **k: (
        ARPipeline.from_pretrained(pipelines / "baseline"), CTFPipeline.from_pretrained(pipelines / "ctf")))
    out = tmp_path / "bench.json"
    assert main(["bench", "--models", "GPT-B", "--batch-sizes", "1", "2", "--repeats", "1", "--json", str(out)]) == 0
    import json

    results = json.loads(out.read_text())["results"]
    assert {(r["method"], r["batch_size"]) for r in results} == {("baseline", 1), ("ctf", 1), ("baseline", 2), ("ctf", 2)}
    assert all(r["images_per_s"] > 0 and r["stage1"] > 0 for r in results)
    assert all(r["stage2"] > 0 for r in results if r["method"] == "ctf")
    assert torch.is_grad_enabled()  # the command must not leave autograd switched off for its caller


def test_bench_without_tokenizer_times_the_token_stages(pipelines):
    from ctfgen.bench import time_pipeline

    ctf = CTFPipeline.from_pretrained(pipelines / "ctf")
    ctf.tokenizer = None  # as with `ctfgen bench --no-decode`
    t = time_pipeline(ctf, 2, 1, 2.0, "cpu")
    assert t["stage1"] > 0 and t["stage2"] > 0 and t.get("decode", 0.0) == 0.0 and t["images_per_s"] > 0
