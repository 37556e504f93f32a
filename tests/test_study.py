"""`ctfgen study` on a seconds-long tiny pipeline run with a validation split: every record, the
selection on the validation split, and a report from the records alone; a rerun redoes nothing."""

import json
from pathlib import Path

import pytest

from conftest import needs_fmnist
from ctfgen.app.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
SMALL = ["data.train_limit=100", "data.test_limit=40", "data.validation_images=30", "data.extract_batch_size=50",
         "tokenizer.train.steps=6", "tokenizer.train.batch_size=16", "tokenizer.train.codebook_init=kmeans",
         "tokenizer.train.codebook_init_images=60", "tokenizer.train.dead_code_steps=2", "clustering.num_coarse=8",
         "train.steps=8", "train.batch_size=20", "train.warmup_steps=2", "train.schedule=constant",
         "train.snapshot_every=5", "heldout.limit=40", "matched.enabled=true"]

pytestmark = needs_fmnist


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    base = tmp_path_factory.mktemp("study")
    out = base / "v256"
    assert cli(["pipeline", TINY, "--out", str(out), "--no-progress", *SMALL]) == 0
    records = base / "records"
    args = ["study", str(out), "--records", str(records), "--seeds", "0", "1", "--test-per-class", "3",
            "--select-per-class", "2", "--heldout-images", "20", "--tokenizer-images", "50", "--batch-size", "30",
            "--guidance", "2", "3", "--temperatures", "1.0", "--diagnosis-per-class", "2", "--epoch-per-class", "2",
            "--report", str(base / "report.md")]
    assert cli(args) == 0
    return out, records, base, args


def test_pipeline_trains_the_matched_baseline(study):
    out = study[0]
    match = json.loads((out / "phases" / "matched.json").read_text())["match"]
    assert abs(match["ratio"] - 1) <= 0.10 and match["n_layer"] > 1
    config = json.loads((out / "matched" / "gpt" / "config.json").read_text())
    assert config["n_layer"] == match["n_layer"]
    assert set(json.loads((out / "heldout.json").read_text())) >= {"ctf", "baseline", "matched"}


def test_records(study):
    out, records, _, _ = study
    names = sorted(p.stem for p in (records / "v256").glob("*.json"))
    cells = [f"test-{m}-{s}-seed{seed}" for m in ("baseline", "ctf", "matched") for s in ("chosen", "default")
             for seed in (0, 1)]
    curve = [f"fd-{m}-epoch-1.00" for m in ("baseline", "ctf", "matched")]
    assert names == ["diagnosis", "epoch-1.00", *curve, "select-baseline", "select-ctf", "select-matched", *cells,
                     "tokenizer"]
    rec = lambda n: json.loads((records / "v256" / f"{n}.json").read_text())  # noqa: E731
    tok = rec("tokenizer")
    assert tok["images"] == 40 and 0 < tok["usage"] <= 1  # the run's own test split (data.test_limit=40) and tok["codebook_size"] == 256
    assert 1 <= tok["perplexity"] <= tok["codes_used"]
    epoch = rec("epoch-1.00")  # step 5 = one epoch (the 100 training images left after the validation split, batch 20)
    assert epoch["step"] == 5 and epoch["heldout"]["ctf"]["exact"] and epoch["heldout"]["ctf"]["images"] == 20
    assert "gap_bits" in epoch["coarse_prediction"] and set(epoch["heldout"]) == {"ctf", "baseline", "matched"}
    select = rec("select-ctf")
    assert len(select["grid"]) == 2 and select["chosen"] in [g["sampling"] for g in select["grid"]]
    # its own stream, apart from the test seeds; a two-point grid's choice is always at an edge
    assert select["seed"] == 1000 and select["at_edge"] == ["cfg_scale"] and "kid" in select["grid"][0]
    assert select["commit"] and select["inputs"]["models"]["ctf"]
    assert select["chosen"]["cfg_scale"] == min(select["grid"], key=lambda g: g["fd"])["sampling"]["cfg_scale"]
    assert "validation split (30 training images" in select["reference"]
    curve = rec("fd-ctf-epoch-1.00")  # the epoch-1 snapshot at the chosen setting, on its own stream
    assert curve["step"] == 5 and curve["inputs"]["seed"] == 3000 and curve["per_class"] == 2
    assert curve["inputs"]["sampling"] == select["chosen"] and curve["metrics"]["fd"] > 0
    assert set(curve["inputs"]["models"]) == {"ar", "aux"}  # the snapshots' files, not the finished pipeline's
    chosen = rec("test-ctf-chosen-seed1")
    assert chosen["sampling"]["cfg_scale"] == select["chosen"]["cfg_scale"] and chosen["per_class"] == 3
    assert rec("test-ctf-default-seed0")["sampling"]["temperature"] == 1.1  # the paper's default
    d = rec("diagnosis")
    assert set(d["sets"]) == {"reconstruction", "real_coarse_aux", "real_coarse_representative", "stage1_representative",
                              "ctf", "baseline", "baseline_coarse_aux"}
    # made from two test images of each class, scored against the other two, never against themselves
    assert d["images"] == 20 and d["reference_images"] == 20


def test_report_from_records(study):
    _, _, base, _ = study
    md = (base / "report.md").read_text()
    assert "| 256 | 8 |" in md and "±" in md  # two seeds give a spread
    assert "| matched |" in md and "at the edge of the grid" in md
    assert "Stage-wise diagnosis" in md and "teacher-forced" in md
    fds = [json.loads((study[1] / "v256" / f"fd-{m}-epoch-1.00.json").read_text())["metrics"]["fd"]
           for m in ("ctf", "baseline", "matched")]
    assert " / ".join(f"{fd:.2f}" for fd in fds) in next(r for r in md.splitlines() if r.startswith("| 256 | 1.00 |"))
    assert (base / "study_vs_codebook.png").stat().st_size > 1000
    assert (base / "study_vs_epoch.png").stat().st_size > 1000


def test_rerun_redoes_nothing(study, capsys):
    _, records, _, args = study
    before = {p: p.stat().st_mtime_ns for p in records.rglob("*.json")}
    assert cli(args) == 0
    assert {p: p.stat().st_mtime_ns for p in records.rglob("*.json")} == before


def test_records_of_other_inputs_are_refused(study, tmp_path, capsys, monkeypatch):
    import shutil

    out, records, _, args = study
    copy = tmp_path / "records"
    shutil.copytree(records, copy)
    rerun = [a if a != str(records) else str(copy) for a in args]
    # another sample count: the tokenizer and epoch records still hold, the first test cell does not
    assert cli([*rerun, "--test-per-class", "4"]) == 2
    assert "test_per_class" not in (err := capsys.readouterr().err) and "per_class: 3 then, 4 now" in err
    assert json.loads((copy / "v256" / "test-ctf-default-seed0.json").read_text())["per_class"] == 3  # kept
    # --force recomputes what changed and keeps the rest
    tokenizer = (copy / "v256" / "tokenizer.json").stat().st_mtime_ns
    assert cli([*rerun, "--test-per-class", "4", "--force"]) == 0
    assert json.loads((copy / "v256" / "test-ctf-default-seed0.json").read_text())["per_class"] == 4
    assert (copy / "v256" / "tokenizer.json").stat().st_mtime_ns == tokenizer
    shutil.rmtree(copy)
    shutil.copytree(records, copy)
    # another commit of the code
    import ctfgen.utils.rundir

    monkeypatch.setattr(ctfgen.utils.rundir, "code_commit", lambda: "0" * 40)
    assert cli(rerun) == 2
    assert "commit:" in capsys.readouterr().err
    monkeypatch.undo()
    # another model: the matched baseline's files change, so its records are refused
    run = tmp_path / out.name
    shutil.copytree(out, run, symlinks=True)
    (run / "matched" / "pipeline.json").write_text((run / "matched" / "pipeline.json").read_text() + "\n")
    assert cli([*[a if a != str(out) else str(run) for a in rerun]]) == 2
    assert "models.matched" in capsys.readouterr().err


# --- a run without baselines of its own (the auxiliary model at 1x) -------------------------------

@pytest.fixture(scope="module")
def ctf_only(study):
    """A CTF-only run on the full run's tokenizer, studied with the full run's baselines. Its auxiliary
    model has half stage 1's depth (the full run's has stage 1's): everything else being the same, it
    would be the full run's auxiliary model again."""
    full, records, base, args = study
    run = base / "v256_ctf_only"
    assert cli(["pipeline", TINY, "--out", str(run), "--no-progress", *SMALL, "baseline.enabled=false",
                "matched.enabled=false", "aux.model.n_layer=1", f"tokenizer.pretrained={full / 'runs' / 'tokenizer' / 'tokenizer'}"]) == 0
    before = {p: p.stat().st_mtime_ns for p in (records / full.name).glob("*.json")}
    report = base / "report_ctf_only.md"
    study_args = [str(run) if a == str(full) else a for a in args[:args.index("--report")]]
    assert cli([*study_args, "--baselines-from", str(full), "--report", str(report)]) == 0
    return run, before, report, study_args


def test_ctf_only_run_makes_ctf_records_beside_the_reference(study, ctf_only):
    full, records, _, _ = study
    run, before, _, _ = ctf_only
    rec = lambda r, n: json.loads((records / r / f"{n}.json").read_text())  # noqa: E731
    names = sorted(p.stem for p in (records / run.name).glob("*.json"))
    cells = [f"test-ctf-{s}-seed{seed}" for s in ("chosen", "default") for seed in (0, 1)]
    assert names == ["baselines-from", "diagnosis", "epoch-1.00", "fd-ctf-epoch-1.00", "select-ctf", *cells, "tokenizer"]
    # the reference's records are read, never made again
    assert {p: p.stat().st_mtime_ns for p in (records / full.name).glob("*.json")} == before
    lent = rec(run.name, "baselines-from")
    assert lent["run"] == full.name and set(lent["shared"]) == {"tokenizer", "coarse_map", "test_codes", "validation_codes"}
    assert lent["stage1_layers"] == 2 and lent["aux_layers"] == 1
    assert rec(run.name, "tokenizer")["inputs"] == rec(full.name, "tokenizer")["inputs"]  # the same tokenizer files
    epoch, full_epoch = rec(run.name, "epoch-1.00"), rec(full.name, "epoch-1.00")
    assert set(epoch["heldout"]) == {"ctf"} and "gap_bits" in epoch["coarse_prediction"]
    models = epoch["inputs"]["models"]  # its own CTF, the reference's baseline snapshot
    assert set(models) == {"ar", "aux", "baseline"} and models["baseline"] == full_epoch["inputs"]["models"]["baseline"]
    assert models["aux"] != full_epoch["inputs"]["models"]["aux"]
    diagnosis, select = rec(run.name, "diagnosis"), rec(full.name, "select-baseline")
    assert diagnosis["inputs"]["sampling"]["baseline"] == select["chosen"]
    assert diagnosis["inputs"]["models"]["baseline"] == select["inputs"]["models"]["baseline"]
    assert {"baseline", "baseline_coarse_aux"} <= set(diagnosis["sets"])


def test_ctf_only_run_in_the_report(study, ctf_only, monkeypatch):
    _, records, base, _ = study
    md = ctf_only[2].read_text()
    lines = md.splitlines()
    rows = [line for line in lines if line.startswith("| 256, aux 0.5x |")]
    cells = [r for r in rows if "(g " in r]  # the test-split table: its own CTF beside the run of its size
    assert len(cells) == 2 and all("| ctf |" in r for r in cells)
    assert lines.index(cells[0]) > max(i for i, line in enumerate(lines) if line.startswith("| 256 | 8 |"))
    assert "its baselines are the rows of run v256" in md and "auxiliary model of 1 layers against stage 1's 2" in md
    full_bits = json.loads((records / "v256" / "epoch-1.00.json").read_text())["heldout"]["baseline"]["bits_per_token"]
    epoch = next(r for r in rows if r.startswith("| 256, aux 0.5x | 1.00 |"))  # the reference's baseline bits
    assert f"| {full_bits:.3f} |" in epoch
    own, *lent = (json.loads((records / r / f"fd-{m}-epoch-1.00.json").read_text())["metrics"]["fd"]
                  for r, m in ((ctf_only[0].name, "ctf"), ("v256", "baseline"), ("v256", "matched")))
    assert f"| {own:.2f} / {lent[0]:.2f} / {lent[1]:.2f} |" in epoch  # its own CTF, the reference's baselines
    # the figure against codebook size: one point per size on each line, the CTF-only run a marker apart
    import ctfgen.experiments.study as study_module

    panels = []
    monkeypatch.setattr(study_module, "plot_panels", lambda p, path: panels.append(p))
    study_module.write_report(records, figure_dir=base)
    fd = panels[0][0]
    assert [(label, xs) for label, xs, *_ in fd["lines"]] == [("ctf", [256]), ("baseline", [256]), ("matched", [256])]
    assert [(label, xs) for label, xs, *_ in fd["points"]] == [("ctf V=256, aux 0.5x", [256])]
    # the figure against epoch: Fréchet distance of every method's snapshots, each run's own
    fd_epoch = panels[1][0]
    assert fd_epoch["title"].startswith("Fréchet") and [label for label, *_ in fd_epoch["lines"]] == [
        "ctf V=256", "baseline V=256", "matched V=256", "ctf V=256, aux 0.5x"]


def test_ctf_only_run_needs_the_reference(study, ctf_only, tmp_path, capsys):
    full, records, _, _ = study
    run, _, _, study_args = ctf_only
    capsys.readouterr()
    assert cli(study_args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "no baseline of its own" in err and "--baselines-from" in err
    # the reference must have been studied first: nothing is computed before that is known
    fresh = tmp_path / "records"
    assert cli([*[str(fresh) if a == str(records) else a for a in study_args], "--baselines-from", str(full)]) == 2
    assert "select-baseline.json is missing: study" in capsys.readouterr().err
    assert not (fresh / run.name / "tokenizer.json").exists()
    # a run with baselines of its own takes none
    assert cli(["study", str(full), "--records", str(fresh), "--baselines-from", str(run)]) == 2
    assert "every RUN has baselines of its own" in capsys.readouterr().err


@pytest.mark.parametrize("part, changed", [("runs/tokenizer/tokenizer/config.json", "tokenizer"),
                                           ("codes/test/header.json", "test codes")])
def test_a_reference_of_other_parts_is_refused(study, ctf_only, tmp_path, capsys, part, changed):
    import shutil

    full, records, _, _ = study
    run, before, _, study_args = ctf_only
    other = tmp_path / "v256_other"
    shutil.copytree(full, other, symlinks=True)
    (other / part).write_text((other / part).read_text() + "\n")
    assert cli([*study_args, "--baselines-from", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot lend its baselines to {run}: their {changed} differ" in err
    assert not (records / other.name).exists()


def test_snapshots_sample_with_the_run_s_sampling_defaults(study):
    """Snapshot pipelines took the paper's defaults whatever the run's `sampling` section gave its finished ones."""
    import dataclasses

    from ctfgen.config import SamplingConfig
    from ctfgen.experiments.run import FinishedRun

    run = FinishedRun(study[0])
    run.settings = dataclasses.replace(run.settings, sampling=SamplingConfig(ctf={"temperature": 0.7},
                                                                             baseline={"cfg_scale": 3.0}))
    assert run.snapshot_pipeline("ctf", 5).sampling_defaults["temperature"] == 0.7
    for method in ("baseline", "matched"):
        assert run.snapshot_pipeline(method, 5).sampling_defaults["cfg_scale"] == 3.0


def test_split_halves_are_class_balanced_and_disjoint():
    import numpy as np

    from ctfgen.utils.errors import ConfigError
    from ctfgen.experiments.study import split_halves

    labels = np.array([0, 1, 0, 1, 1, 0, 0, 1])
    source, reference = split_halves(labels, 2)
    assert source.tolist() == [0, 1, 2, 3] and reference.tolist() == [4, 5, 6, 7]
    with pytest.raises(ConfigError, match="diagnosis_per_class"):
        split_halves(labels, 4)


def test_study_settings_keep_streams_apart():
    from ctfgen.utils.errors import ConfigError
    from ctfgen.experiments.study import StudySettings

    with pytest.raises(ConfigError, match="must all differ"):
        StudySettings(seeds=(0, 1000))
    with pytest.raises(ConfigError, match="must all differ"):
        StudySettings(epoch_seed=2000)
    with pytest.raises(ConfigError, match="test_per_class"):
        StudySettings(test_per_class=0)


def test_study_needs_a_finished_run_with_a_validation_split(study, tmp_path, capsys):
    assert cli(["study", str(tmp_path), "--records", str(tmp_path / "r")]) == 2
    assert "run (or --resume) the experiment first" in capsys.readouterr().err
    import shutil

    run = tmp_path / "no-val"
    shutil.copytree(study[0], run, symlinks=True)
    shutil.rmtree(run / "codes" / "val")
    assert cli(["study", str(run), "--records", str(tmp_path / "r")]) == 2
    assert "validation split" in capsys.readouterr().err


@pytest.mark.parametrize("size", [1024, 4096, 16384])
def test_study_configs_pin_precision_and_stop_restarts_early(size):
    from ctfgen.config import ExperimentConfig, read_yaml

    cfg = ExperimentConfig.from_raw(read_yaml(ROOT / "configs" / "study" / f"fmnist_v{size}.yaml"))
    # `auto` would pick bf16 on CPUs with native bf16 and float32 elsewhere: a rerun must not depend on the machine
    assert cfg.tokenizer.train.mixed_precision == "none" and cfg.train.mixed_precision == "none"
    assert cfg.tokenizer.train.dead_code_until <= 0.8
    assert cfg.tokenizer.model["codebook_size"] == size and cfg.clustering.num_coarse == size // 32


def test_aux_1x_config_differs_from_v16384_only_in_the_auxiliary_depth_and_the_baselines(tmp_path):
    from ctfgen.config import to_dict
    from ctfgen.experiments.run import load_experiment_config
    from ctfgen.models.transformer import GPT_PRESETS
    from ctfgen.utils.rundir import diff_lines, plain

    tokenizer = "/study/v16384/runs/tokenizer/tokenizer"  # given on the command line; the pipeline accepts it
    full, _ = load_experiment_config(ROOT / "configs" / "study" / "fmnist_v16384.yaml")
    aux1x, _ = load_experiment_config(ROOT / "configs" / "study" / "fmnist_v16384_aux1x.yaml",
                                      overrides=[f"tokenizer.pretrained={tokenizer}"])
    assert diff_lines(plain(to_dict(full)), plain(to_dict(aux1x))) == [
        "aux.model.n_layer: 12 then, 4 now", "baseline.enabled: True then, False now",
        "matched.enabled: True then, False now", "name: 'fmnist_v16384' then, 'fmnist_v16384_aux1x' now",
        f"tokenizer.pretrained: None then, {tokenizer!r} now"]
    assert aux1x.aux.model["n_layer"] == GPT_PRESETS[aux1x.stage1.preset]["n_layer"]  # 1x stage 1's depth
    # without the override the pipeline stops at once instead of training another tokenizer
    placeholder, _ = load_experiment_config(ROOT / "configs" / "study" / "fmnist_v16384_aux1x.yaml")
    assert not Path(placeholder.tokenizer.pretrained).exists()


def test_report_names_a_corrupt_record(tmp_path):
    import ctfgen.experiments.study as study_module
    from ctfgen.utils.errors import CorruptFileError

    (tmp_path / "v64").mkdir()
    (tmp_path / "v64" / "tokenizer.json").write_text('{"codebook_size": 64')  # cut short
    with pytest.raises(CorruptFileError, match=r"v64/tokenizer\.json is not valid JSON.*compute the record again"):
        study_module.write_report(tmp_path)


def test_report_finds_the_fd_records_of_an_epoch_that_rounds_across_a_boundary(tmp_path):
    """The FD record of step 1430 at 859 steps an epoch is named after 1.66473 (fd-*-epoch-1.66); its
    epoch record stores 1.665, which prints 1.67: the FD was left out of the table and the figure."""
    import ctfgen.experiments.study as study_module

    run = tmp_path / "v64"
    run.mkdir()
    write = lambda name, record: (run / f"{name}.json").write_text(json.dumps(record))  # noqa: E731
    write("tokenizer", {"codebook_size": 64, "num_coarse": 8, "usage": 1.0, "perplexity": 60.0, "psnr": 20.0})
    step, epoch = 1430, 1430 / 859
    coarse = {"bits_per_token": 2.0, "top1": 0.5}
    write(f"epoch-{epoch:.2f}", {"step": step, "epoch": round(epoch, 3),
                                 "heldout": {"ctf": {"bits_per_token": 6.0}, "baseline": {"bits_per_token": 5.0}},
                                 "coarse_prediction": {"stage1": coarse, "baseline_cluster_summed": coarse,
                                                       "gap_bits": 0.0}})
    for method, fd in (("ctf", 4.25), ("baseline", 3.75)):
        write(f"fd-{method}-epoch-{epoch:.2f}", {"method": method, "step": step, "epoch": round(epoch, 3),
                                                 "metrics": {"fd": fd}})
    md = study_module.write_report(tmp_path)
    assert "| 64 | 1.67 | 6.000 | 5.000 | 4.25 / 3.75 / – |" in md


def test_report_refuses_seeds_of_one_cell_made_from_other_inputs(tmp_path):
    """A seed the study no longer runs keeps its record: `--seeds 0 1 2` at 500 per class, then `--seeds 0 1
    --test-per-class 200 --force` left seed 2's cell of 500 samples a class, and the report averaged the three
    into one mean ± spread labelled with the first's setting."""
    import ctfgen.experiments.study as study_module
    from ctfgen.utils.errors import RunError

    run = tmp_path / "v64"
    run.mkdir()
    write = lambda name, record: (run / f"{name}.json").write_text(json.dumps({"name": name, **record}))  # noqa: E731
    write("tokenizer", {"codebook_size": 64, "num_coarse": 8, "usage": 1.0, "perplexity": 60.0, "psnr": 20.0})
    sampling = {"cfg_scale": 2.0, "temperature": 1.0}
    for seed, per_class, fd in ((0, 200, 4.0), (1, 200, 5.0), (2, 500, 9.0)):
        write(f"test-ctf-chosen-seed{seed}", {
            "inputs": {"sampling": sampling, "per_class": per_class, "seed": seed, "models": {"ctf": "abc"}},
            "sampling": sampling, "metrics": {"fd": fd, "kid": 0.1, "precision": 0.8, "recall": 0.5,
                                              "class_consistency": 0.9}})
    with pytest.raises(RunError, match=r"test-ctf-chosen-seed0\.json and test-ctf-chosen-seed2\.json beside it.*"
                                       r"inputs\.per_class: 200 then, 500 now"):
        study_module.write_report(tmp_path)
    (run / "test-ctf-chosen-seed2.json").unlink()
    assert "| ctf | chosen (g 2.0, T 1.0) | 4.50 ± 0.71 |" in study_module.write_report(tmp_path)
