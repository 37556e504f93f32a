"""The sampling commands end to end on tiny random pipelines saved to disk."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _gloo import free_port
from _tiny_ctf import tiny_baseline, tiny_ctf
from ctfgen.app.cli import main
from ctfgen.app.commands import sample
from ctfgen.pipeline import ARPipeline, CTFPipeline, load_pipeline
from ctfgen.utils import distributed as D
from ctfgen.utils import threads


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
    # one total, and the parts add up to it (each rounded to the millisecond); the baseline has no stage 2
    line = next(line for line in printed.splitlines() if line.startswith("timings:"))
    parts = {name: float(ms.replace(",", "")) for name, ms in re.findall(r"([a-z][a-z 12]*?) ([\d,.]+) ms", line)}
    assert line.count("total") == 1 and "stage 1" in parts and "decode" in parts
    assert ("stage 2" in parts) == (kind == "ctf")
    total = parts.pop("total")
    assert abs(sum(parts.values()) - total) <= len(parts), line


def test_sample_works_in_batches_and_writes_images_as_they_are_made(pipelines, tmp_path, monkeypatch, capsys):
    """The models see at most --batch-size images at once, each batch's single images are on disk before
    the next batch is sampled, and a progress bar counts the images."""
    out = tmp_path / "grid.png"
    seen = []
    real = CTFPipeline.__call__

    def spy(self, labels, *a, **k):
        seen.append((len(labels), len(list((tmp_path / "grid").glob("*.png"))) if (tmp_path / "grid").exists() else 0))
        return real(self, labels, *a, **k)

    monkeypatch.setattr(CTFPipeline, "__call__", spy)
    assert main(["sample", "--model", str(pipelines / "ctf"), "--n", "7", "--batch-size", "3", "--out", str(out)]) == 0
    assert seen == [(3, 0), (3, 3), (1, 6)]
    assert len(list((tmp_path / "grid").glob("*.png"))) == 7 and out.is_file()
    assert "7/7" in capsys.readouterr().err  # the progress bar
    # batching does not change what one call would draw, up to the batch size
    monkeypatch.setattr(CTFPipeline, "__call__", real)
    for name, batch in (("one", "64"), ("same", "3")):
        main(["sample", "--model", str(pipelines / "ctf"), "--n", "3", "--batch-size", batch, "--no-singles",
              "--no-progress", "--out", str(tmp_path / f"{name}.png")])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "one.png")), np.asarray(Image.open(tmp_path / "same.png")))


def test_sample_rejects_unknown_class_and_fine_options_on_baseline(pipelines, tmp_path, capsys):
    assert main(["sample", "--model", str(pipelines / "ctf"), "--class", "spaceship", "--out", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.startswith("error: unknown Fashion-MNIST class 'spaceship'")
    assert main(["sample", "--model", str(pipelines / "baseline"), "--top-k-fine", "1", "--out", str(tmp_path / "x.png")]) == 2
    assert "only apply to a CTF" in capsys.readouterr().err


def test_sample_takes_every_class_id_of_a_model_with_more_classes_than_fashion_mnist(tmp_path, capsys):
    """--class ids are the model's (1000 for the ImageNet recipes), not Fashion-MNIST's 0-9; its names
    mean nothing to another model."""
    ar, aux, cmap, vq = tiny_ctf(vocab=8, num_coarse=3, num_classes=20)
    CTFPipeline(ar, aux, cmap, vq).save_pretrained(tmp_path / "ctf")
    args = ["sample", "--model", str(tmp_path / "ctf"), "--n", "2", "--no-progress", "--out", str(tmp_path / "x.png")]
    assert main(args + ["--class", "15", "19"]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["0000_class15.png", "0001_class19.png"]
    for bad, message in (("20", "out of range for a model with 20 classes"), ("sneaker", "class names are Fashion")):
        assert main(args + ["--class", bad]) == 2
        assert message in capsys.readouterr().err


def test_sample_refuses_a_pipeline_saved_without_a_tokenizer(pipelines, tmp_path, capsys):
    """A baseline saved without its tokenizer (as the shipped one is) ended `ctfgen sample` in an AttributeError
    traceback from image_shape."""
    ARPipeline(load_pipeline(pipelines / "baseline").gpt).save_pretrained(tmp_path / "bare")
    out = tmp_path / "x.png"
    assert main(["sample", "--model", str(tmp_path / "bare"), "--n", "2", "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "without a tokenizer" in err and "Traceback" not in err, err
    assert not out.exists() and not (tmp_path / "x").exists()


@pytest.mark.parametrize("picture", [["--stages"], ["--compare-baseline", "--baseline"]])
def test_sample_writes_its_figures_whole_or_not_at_all(pipelines, tmp_path, monkeypatch, picture):
    """A --stages or --compare-baseline picture killed while being written leaves no half file."""
    def killed_while_writing(self, fp, *a, **k):
        Path(fp).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", killed_while_writing)
    out = tmp_path / "fig.png"
    picture = [*picture, str(pipelines / "baseline")] if "--baseline" in picture else picture
    assert main(["sample", "--model", str(pipelines / "ctf"), "--n", "2", "--no-singles", "--no-progress",
                 "--out", str(out), *picture]) == 130
    assert list(tmp_path.iterdir()) == []


def test_sample_is_reproducible(pipelines, tmp_path):
    for name in ("a", "b"):
        main(["sample", "--model", str(pipelines / "ctf"), "--n", "4", "--seed", "3", "--no-singles",
              "--out", str(tmp_path / f"{name}.png")])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))


def test_compare_baseline_samples_on_the_threads_of_the_larger_model(pipelines, tmp_path, monkeypatch):
    # each load set torch's one thread count for its own model, so the baseline, loaded last, decided it for CTF too
    ctf, baseline = (threads.count_parameters(load_pipeline(pipelines / kind)) for kind in ("ctf", "baseline"))
    assert baseline < ctf
    monkeypatch.setattr(threads, "SMALL_MODEL_PARAMETERS", baseline + 1)  # CTF "large", the baseline "small"
    monkeypatch.setattr(threads, "busy_cores", lambda: 0.0)
    monkeypatch.setattr(threads, "usable_cores", lambda: 3)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    seen = []

    def spy(real):
        def call(self, *a, **k):
            seen.append((type(self).__name__, torch.get_num_threads()))
            return real(self, *a, **k)
        return call

    for cls in (CTFPipeline, ARPipeline):
        monkeypatch.setattr(cls, "__call__", spy(cls.__call__))
    before = torch.get_num_threads()
    try:
        assert main(["sample", "--model", str(pipelines / "ctf"), "--compare-baseline", "--baseline",
                     str(pipelines / "baseline"), "--n", "2", "--no-progress", "--out", str(tmp_path / "g.png")]) == 0
    finally:
        torch.set_num_threads(before)
    assert seen == [("CTFPipeline", 3), ("ARPipeline", 3)]


def test_sample_many_resumes_and_matches_a_fresh_run(pipelines, tmp_path, monkeypatch):
    args = ["sample-many", "--model", str(pipelines / "ctf"), "--per-class", "3", "--classes", "0", "4",
            "--batch-size", "4", "--seed", "1"]
    main(args + ["--out", str(tmp_path / "fresh.npz")])
    fresh = np.load(tmp_path / "fresh.npz")
    assert fresh["arr_0"].dtype == np.uint8 and fresh["arr_0"].shape == (6, 4, 4, 1)
    assert fresh["labels"].tolist() == [0, 0, 0, 4, 4, 4]

    # A run killed after its first batch keeps that batch (whole) and nothing else; running the same
    # command again samples only the rest and gives the same set.
    calls = []
    real = CTFPipeline.sample

    def killed_after_one_batch(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    out = tmp_path / "resumed.npz"
    parts = out.with_name(out.name + ".parts")
    with monkeypatch.context() as m:
        m.setattr(CTFPipeline, "sample", killed_after_one_batch)
        assert main(args + ["--out", str(out)]) == 130  # as Ctrl-C ends it
    assert not out.exists() and sorted(p.name for p in parts.iterdir()) == ["batch000000.npz", "request.json"]
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
    calls.clear()
    with monkeypatch.context() as m:
        m.setattr(CTFPipeline, "sample", killed_after_one_batch)
        assert main(args + ["--out", str(out)]) == 0
    assert len(calls) == 1  # only the missing batch
    resumed = np.load(out)
    assert np.array_equal(resumed["arr_0"], fresh["arr_0"]) and np.array_equal(resumed["labels"], fresh["labels"])
    assert not parts.exists()


def test_sample_many_under_torchrun_keeps_the_device_asked_for(pipelines, tmp_path, monkeypatch):
    # under torchrun --device was ignored: on a CUDA machine --device cpu sampled on the rank's GPU (an NCCL group)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.setenv(var, "1" if var == "WORLD_SIZE" else "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a CUDA machine
    monkeypatch.setattr(torch.cuda, "set_device", lambda *a: pytest.fail("a rank took a GPU"))
    loaded_on = []
    real = sample.load_model

    def spy(*a, **k):
        pipe = real(*a, **k)
        loaded_on.append((pipe.device.type, torch.distributed.get_backend()))
        return pipe

    monkeypatch.setattr(sample, "load_model", spy)
    try:
        assert main(["sample-many", "--model", str(pipelines / "ctf"), "--per-class", "1", "--classes", "0",
                     "--device", "cpu", "--no-progress", "--out", str(tmp_path / "s.npz")]) == 0
    finally:
        D.cleanup()
    assert loaded_on == [("cpu", "gloo")] and (tmp_path / "s.npz").is_file()


def test_sample_many_refuses_to_mix_requests_and_leaves_nothing_when_empty(pipelines, tmp_path, monkeypatch, capsys):
    args = ["sample-many", "--model", str(pipelines / "ctf"), "--classes", "0", "--batch-size", "2"]
    out = tmp_path / "x.npz"
    with monkeypatch.context() as m:
        m.setattr(CTFPipeline, "sample", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        assert main(args + ["--per-class", "4", "--out", str(out)]) == 130
    assert not tmp_path.joinpath("x.npz.parts").exists() and list(tmp_path.iterdir()) == []  # no batch, no folder
    real = CTFPipeline.sample
    calls = []
    with monkeypatch.context() as m:
        m.setattr(CTFPipeline, "sample", lambda self, *a, **k: real(self, *a, **k) if not calls.append(1) and
                  len(calls) < 2 else (_ for _ in ()).throw(KeyboardInterrupt))
        assert main(args + ["--per-class", "4", "--out", str(out)]) == 130
    capsys.readouterr()
    assert main(args + ["--per-class", "4", "--seed", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "another request" in err and "seed: 0 then, 1 now" in err
    (tmp_path / "x.npz.parts" / "request.json").write_text("{not json")  # a request file cut short
    assert main(args + ["--per-class", "4", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "request.json is not valid JSON" in err and "Traceback" not in err
    assert (tmp_path / "x.npz.parts" / "batch000000.npz").is_file()  # the finished batch is kept


def test_sample_many_refuses_to_finish_a_set_with_another_model_or_defaults(pipelines, tmp_path, monkeypatch, capsys):
    """Another model of the same tokenizer (RUN/matched beside RUN/baseline), or the same model with other
    stored sampling defaults, draws other images: it must not finish the batches this one started."""
    base = load_pipeline(pipelines / "baseline")
    gpt, _ = tiny_baseline(vocab=8, num_classes=10, vq=base.tokenizer, seed=5)
    ARPipeline(gpt, base.tokenizer).save_pretrained(tmp_path / "matched")
    ARPipeline(base.gpt, base.tokenizer, sampling_defaults={"temperature": 0.5}).save_pretrained(tmp_path / "cooler")
    out = tmp_path / "x.npz"
    args = ["sample-many", "--classes", "0", "--per-class", "4", "--batch-size", "2", "--out", str(out)]
    real, calls = ARPipeline.sample, []

    def killed_after_one_batch(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(ARPipeline, "sample", killed_after_one_batch)
        assert main(args + ["--model", str(pipelines / "baseline")]) == 130
    capsys.readouterr()
    for other in ("matched", "cooler"):
        assert main(args + ["--model", str(tmp_path / other)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "another request" in err, other
    assert not out.exists()
    assert main(args + ["--model", str(pipelines / "baseline")]) == 0 and out.is_file()


def test_sample_many_refuses_to_finish_a_set_in_another_precision(pipelines, tmp_path, monkeypatch, capsys):
    """--dtype auto is bfloat16 on CUDA and on CPUs with native bf16, float32 elsewhere: a set started on one
    machine must not be finished in another precision on the next."""
    from ctfgen.utils import precision

    out = tmp_path / "x.npz"
    args = ["sample-many", "--model", str(pipelines / "ctf"), "--classes", "0", "--per-class", "4", "--batch-size", "2",
            "--device", "cpu", "--no-progress", "--out", str(out)]
    real, calls = CTFPipeline.sample, []

    def killed_after_one_batch(self, *a, **k):
        calls.append(k.get("dtype"))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(CTFPipeline, "sample", killed_after_one_batch)
        m.setattr(precision, "cpu_has_native_bf16", lambda: True)
        assert main(args) == 130
    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr(precision, "cpu_has_native_bf16", lambda: False)
        assert main(args) == 2
    err = capsys.readouterr().err
    assert "another request" in err and "'dtype': 'bfloat16'" in err and "'dtype': 'float32'" in err, err
    with monkeypatch.context() as m:
        m.setattr(precision, "cpu_has_native_bf16", lambda: True)
        assert main(args) == 0 and out.is_file()


def test_sample_many_streams_the_merge(pipelines, tmp_path):
    """The final .npz is written part by part: it equals np.savez of the whole set."""
    from ctfgen.app import sample_sets as sm

    pipeline = load_pipeline(pipelines / "ctf")
    labels = np.arange(7) % 3
    out = tmp_path / "set.npz"
    sm.sample_many(pipeline, labels, out, 3, seed=0, sampling={}, progress=False)
    parts = [np.load(p) for p in sorted(out.with_name("set.npz.parts").glob("batch*.npz"))]
    whole = np.concatenate([p["images"] for p in parts])
    sm.merge_parts(out, 3)
    merged = np.load(out)
    assert sorted(merged.files) == ["arr_0", "labels"]
    assert np.array_equal(merged["arr_0"], whole) and merged["labels"].tolist() == labels.tolist()


def test_sample_many_shards_across_ranks(pipelines, tmp_path):
    from ctfgen.app import sample_sets as sm

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


def test_sample_many_removes_the_parts_a_run_killed_after_its_merge_left(pipelines, tmp_path, monkeypatch):
    """The merged .npz is written before its parts are removed; the parts of a run killed in between go
    with the next run, which stops at once since the .npz is there."""
    from ctfgen.app import sample_sets as sm

    pipeline = load_pipeline(pipelines / "ctf")
    out = tmp_path / "x.npz"
    parts = out.with_name("x.npz.parts")
    real_unlink = Path.unlink

    def killed_removing_parts(self, *a, **k):
        if self.parent == parts:
            raise KeyboardInterrupt
        return real_unlink(self, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(Path, "unlink", killed_removing_parts)
        with pytest.raises(KeyboardInterrupt):
            sm.sample_set(pipeline, out, 4, classes=[0], batch_size=2, progress=False)
    merged = out.read_bytes()
    assert sorted(p.name for p in parts.iterdir()) == ["batch000000.npz", "batch000001.npz", "request.json"]
    assert sm.sample_set(pipeline, out, 4, classes=[0], batch_size=2, progress=False) is None
    assert list(tmp_path.iterdir()) == [out] and out.read_bytes() == merged


def test_sample_many_finishes_a_set_whose_killed_run_left_a_temporary_file(pipelines, tmp_path, capsys):
    """A run killed (SIGKILL) while writing a part leaves its hidden temporary file in OUT.parts/; the run
    that finishes the set removes it with the folder, rather than ending in "Directory not empty"."""
    from ctfgen.app import sample_sets as sm

    out = tmp_path / "x.npz"
    parts = out.with_name("x.npz.parts")
    sm.sample_many(load_pipeline(pipelines / "ctf"), np.zeros(4, np.int64), out, 2, seed=0, sampling={"dtype": "auto"},
                   progress=False)
    (parts / "batch000001.npz").unlink()
    (parts / ".batch000001.npz.0123456789ab.npz").write_bytes(b"PK half")
    assert main(["sample-many", "--model", str(pipelines / "ctf"), "--classes", "0", "--per-class", "4",
                 "--batch-size", "2", "--no-progress", "--out", str(out)]) == 0
    assert list(tmp_path.iterdir()) == [out] and np.load(out)["arr_0"].shape[0] == 4


def test_sample_many_refuses_a_file_where_its_batches_go_before_any_work(pipelines, tmp_path, monkeypatch, capsys):
    """A file named OUT.parts was a FileExistsError traceback after the first batch had been sampled."""
    (tmp_path / "x.npz.parts").write_text("kept")
    monkeypatch.setattr(CTFPipeline, "sample", lambda *a, **k: pytest.fail("sampling started"))
    assert main(["sample-many", "--model", str(pipelines / "ctf"), "--classes", "0", "--per-class", "2",
                 "--out", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "x.npz.parts is a file, not a directory" in err
    assert (tmp_path / "x.npz.parts").read_text() == "kept"


def test_bench_times_both_methods(pipelines, tmp_path, monkeypatch, capsys):
    from ctfgen.app import bench

    monkeypatch.setattr(bench, "paper_shape_pipelines", lambda *a, **k: (
        ARPipeline.from_pretrained(pipelines / "baseline"), CTFPipeline.from_pretrained(pipelines / "ctf")))
    out = tmp_path / "bench.json"
    assert main(["bench", "--models", "GPT-B", "--batch-sizes", "1", "2", "--repeats", "1", "--json", str(out)]) == 0
    import json

    results = json.loads(out.read_text())["results"]
    assert {(r["method"], r["batch_size"]) for r in results} == {("baseline", 1), ("ctf", 1), ("baseline", 2), ("ctf", 2)}
    assert all(r["images_per_s"] > 0 and r["stage1"] > 0 for r in results)
    assert all(r["stage2"] > 0 for r in results if r["method"] == "ctf")
    assert all("stage2" not in r for r in results if r["method"] == "baseline")  # one stage: no stage 2
    table = capsys.readouterr().out
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines() if "| baseline |" in line]
    assert rows and all(row[7] == "–" for row in rows)  # model dtype method batch img/s tok/s stage1 stage2
    assert torch.is_grad_enabled()  # the command must not leave autograd switched off for its caller


def test_bench_without_tokenizer_times_the_token_stages(pipelines):
    from ctfgen.app.bench import time_pipeline

    ctf = CTFPipeline.from_pretrained(pipelines / "ctf")
    ctf.tokenizer = None  # as with `ctfgen bench --no-decode`
    t = time_pipeline(ctf, 2, 1, 2.0, "cpu")
    assert t["stage1"] > 0 and t["stage2"] > 0 and t.get("decode", 0.0) == 0.0 and t["images_per_s"] > 0
