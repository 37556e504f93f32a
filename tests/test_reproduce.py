"""`ctfgen reproduce` on a seconds-long tiny pipeline run: ablations match the main run's
snapshots where they should, every evaluation record is written, and a rerun redoes nothing."""

import json
from pathlib import Path

import pytest
import torch

from ctfgen.app.cli import main as cli
from conftest import needs_fmnist

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
SMALL = ["data.train_limit=100", "data.test_limit=40", "data.extract_batch_size=50",
         "tokenizer.train.steps=6", "tokenizer.train.batch_size=16", "clustering.num_coarse=8",
         "train.steps=8", "train.batch_size=20", "train.warmup_steps=2", "train.schedule=constant",
         "train.snapshot_every=4", "heldout.limit=40"]


pytestmark = needs_fmnist


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("repro") / "run"
    assert cli(["pipeline", TINY, "--out", str(out), "--no-progress", *SMALL]) == 0
    settings = out.parent / "settings.yaml"
    settings.write_text("steps: 4\nclusters: [4]\nevaluation: {per_class: 2, batch_size: 10, heldout_images: 20, "
                        "temperatures: [1.0]}\n")
    assert cli(["reproduce", str(settings), "--run", str(out)]) == 0
    return out, settings


def test_report_and_records(finished):
    out, _ = finished
    results = json.loads((out / "results.json").read_text())
    assert [r["step"] for r in results["epochs_ctf"]] == [4, 8]
    assert {r["variant"] for r in results["ablations"]} == {"kmeans-k8", "kmeans-k4", "random-k8", "unrestricted-k8",
                                                            "baseline-step4"}
    for group in results.values():
        for r in group:
            assert 0 <= r["metrics"]["class_consistency"] <= 1 and r["metrics"]["fd"] >= 0
    unrestricted = next(r for r in results["ablations"] if r["variant"] == "unrestricted-k8")
    assert unrestricted["metrics"]["bits_per_token_exact"] is False
    assert "(bound)" in (out / "results.md").read_text()
    assert (out / "quality_vs_epoch.png").stat().st_size > 1000


def test_ablation_reuses_the_main_stage1_snapshot(finished):
    from ctfgen.pipeline import load_pipeline
    from ctfgen.experiments.run import FinishedRun

    out, _ = finished
    run = FinishedRun(out)
    unrestricted = load_pipeline(out / "ablations" / "unrestricted-k8" / "ctf")
    snapshot = run.snapshot_model("ar", 4)
    for a, b in zip(unrestricted.ar.state_dict().values(), snapshot.state_dict().values()):
        assert torch.equal(a, b)
    assert unrestricted.aux.config.restrict_to_cluster is False


def test_rerun_redoes_nothing(finished):
    out, settings = finished
    before = {p: p.stat().st_mtime_ns for p in (out / "eval").rglob("*.json")}
    assert cli(["reproduce", str(settings), "--run", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "eval").rglob("*.json")} == before


def test_reproduce_needs_a_main_run(tmp_path, capsys):
    assert cli(["reproduce", "--run", str(tmp_path)]) == 2
    assert "run (or --resume) the experiment first" in capsys.readouterr().err


def test_records_of_other_settings_are_refused_unless_forced(finished, tmp_path, capsys):
    out, settings = finished
    other = tmp_path / "other.yaml"
    other.write_text(settings.read_text().replace("per_class: 2", "per_class: 1"))
    assert cli(["reproduce", str(other), "--run", str(out)]) == 2
    err = capsys.readouterr().err
    assert "was computed from other inputs than today's" in err and "inputs.per_class: 2 then, 1 now" in err
    record = out / "eval" / "main" / "ctf.json"
    assert json.loads(record.read_text())["inputs"]["per_class"] == 2  # refused: nothing was replaced
    assert cli(["reproduce", str(other), "--run", str(out), "--force"]) == 0
    assert json.loads(record.read_text())["inputs"]["per_class"] == 1


def test_a_corrupt_heldout_file_is_named_and_the_report_kept(finished):
    from ctfgen.config import ReproduceConfig, load_config
    from ctfgen.experiments.reproduce import write_report
    from ctfgen.experiments.run import FinishedRun
    from ctfgen.utils.errors import CorruptFileError

    out, settings = finished
    kept, report = (out / "heldout.json").read_text(), (out / "results.md").read_text()
    results = json.loads((out / "results.json").read_text())
    try:
        (out / "heldout.json").write_text('{"ctf": ')  # cut short
        with pytest.raises(CorruptFileError, match=r"heldout\.json is not valid JSON.*pipeline --resume"):
            write_report(FinishedRun(out), results, load_config(ReproduceConfig, settings))
        assert (out / "results.md").read_text() == report
    finally:
        (out / "heldout.json").write_text(kept)


def test_ablations_of_another_length_are_refused(finished, tmp_path, capsys):
    """With steps changed the main run's reference snapshot changes, but an ablation's record names only its
    own files: the ablations trained for 4 steps were reused silently beside the snapshot at step 8."""
    import shutil

    out, settings = finished
    run = tmp_path / "run"
    shutil.copytree(out, run, symlinks=True)
    longer = tmp_path / "longer.yaml"
    longer.write_text(settings.read_text().replace("steps: 4", "steps: 8"))
    assert cli(["reproduce", str(longer), "--run", str(run), "--force"]) == 2
    err = capsys.readouterr().err
    assert "was trained for 4 steps, but steps is 8" in err and "ablations/kmeans-k4" in err
    # --independent-only reuses a finished ablation the same way
    assert cli(["reproduce", str(longer), "--run", str(run), "--independent-only"]) == 2
    assert "was trained for 4 steps, but steps is 8" in capsys.readouterr().err


def test_clusters_holding_the_main_runs_k_are_refused_before_any_work(finished, tmp_path, capsys):
    """kmeans-k8 is the record of the main run's snapshot (K = 8): with 8 in clusters an ablation of K = 8 was
    trained, and then its record was refused as one made from other models than the snapshot's."""
    import shutil

    out, settings = finished
    run = tmp_path / "run"
    shutil.copytree(out, run, symlinks=True)
    shutil.rmtree(run / "eval")
    same_k = tmp_path / "same_k.yaml"
    same_k.write_text(settings.read_text().replace("clusters: [4]", "clusters: [4, 8]"))
    for independent in ([], ["--independent-only"]):
        assert cli(["reproduce", str(same_k), "--run", str(run), *independent]) == 2
        assert "holds the main run's num_coarse=8" in capsys.readouterr().err
    assert not (run / "ablations" / "kmeans-k8").exists() and not (run / "eval").exists()


@pytest.mark.parametrize("change,message", [
    (("clusters: [4]", "clusters: [4, 100000]"), "clusters [100000] exceed the run's codebook of"),
    (("steps: 4", "steps: 6"), "steps=6: the main run's ar snapshots (train.snapshot_every=4) hold none"),
])
def test_ablations_that_cannot_be_compared_are_refused_before_any_training(finished, tmp_path, capsys, change,
                                                                             message):
    """A K above the codebook failed at its ablation's clustering, and --independent-only trained ablations for a
    step the main run has no snapshot at, after the ablations before them had trained."""
    import shutil

    out, settings = finished
    run = tmp_path / "run"
    shutil.copytree(out, run, symlinks=True)
    shutil.rmtree(run / "ablations")
    bad = tmp_path / "bad.yaml"
    bad.write_text(settings.read_text().replace(*change))
    for independent in (["--independent-only"], []):
        assert cli(["reproduce", str(bad), "--run", str(run), "--force", *independent]) == 2
        assert message in capsys.readouterr().err
    assert not (run / "ablations").exists()
