"""Stages on tiny synthetic codes, the cluster/train commands, and the whole pipeline on a few
Fashion-MNIST images: single process, killed and resumed, and under a 2-rank torchrun."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _gloo import init_gloo, run_ranks
from ctfgen.app.cli import main as cli
from ctfgen.clustering import CoarseMap
from ctfgen.data.codes import CodeDataset, write_codes
import yaml

from ctfgen.config import ExperimentConfig, load_config
from ctfgen.utils.errors import ConfigError
from ctfgen.experiments.run import run_experiment
from ctfgen.utils.fingerprint import codebook_fingerprint
from ctfgen.utils.rundir import is_lock_file
from ctfgen.train.stages import StageMismatchError, build_stage, train_stage

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
TINY = str(ROOT / "configs" / "tiny.yaml")
# tiny.yaml cut down further so that a whole run takes seconds.
SMALL = ["data.train_limit=100", "data.test_limit=40", "data.extract_batch_size=50",
         "tokenizer.train.steps=6", "tokenizer.train.batch_size=16", "tokenizer.train.log_every=2",
         "clustering.num_coarse=16", "train.steps=6", "train.batch_size=20", "train.log_every=2",
         "train.warmup_steps=2", "heldout.limit=40"]
TRAIN = dict(steps=4, batch_size=8, lr=1e-3, log_every=1, checkpoint_every=2, progress=False)


from conftest import needs_fmnist  # noqa: E402


def make_codes(path, codebook: torch.Tensor, n=32, grid=4, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, codebook.shape[0], (n, 1, grid * grid), generator=g)
    labels = torch.arange(n) % classes
    header = {"tokenizer_fingerprint": codebook_fingerprint(codebook), "grid_size": grid, "augment": "none",
              "dataset": "synthetic", "num_classes": classes, "codebook_size": codebook.shape[0]}
    return write_codes(path, codes, labels, header)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    d = tmp_path_factory.mktemp("synthetic")
    book = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    other = torch.randn(64, 8, generator=torch.Generator().manual_seed(2))
    cmap = CoarseMap.fit(book, 8, seed=0)
    cmap.save(d / "map.safetensors")
    CoarseMap.fit(other, 8, seed=0).save(d / "other_map.safetensors")
    make_codes(d / "codes", book)
    return d, cmap


# --- config ----------------------------------------------------------------------------------

def resolve(raw, overrides=()):
    return load_config(ExperimentConfig, raw, list(overrides))


def test_config_overrides_are_typed_and_baseline_inherits_stage1():
    cfg = resolve({"stage1": {"preset": "GPT-mini", "train": {"lr": 3e-4}}, "train": {"steps": 5}},
                  ["train.batch_size=64", "aux.model.restrict_to_cluster=false", "data.train_limit=null", "seed=7"])
    s1, aux = cfg.stage1.train, cfg.aux.train
    assert (s1.seed, s1.steps, s1.batch_size, s1.lr) == (7, 5, 64, 3e-4)
    assert (aux.seed, aux.steps, aux.batch_size, aux.lr) == (7, 5, 64, 1e-4)  # TrainConfig's lr default
    assert cfg.aux.model["restrict_to_cluster"] is False
    assert cfg.baseline.preset == "GPT-mini" and cfg.baseline.train == cfg.stage1.train
    assert cfg.clustering.seed == 7 and cfg.data.train_limit is None and cfg.tokenizer.train.seed == 7


def test_config_typos_are_refused_with_path_and_closest_key():
    with pytest.raises(ConfigError, match="unknown config key data.trian_limit; did you mean data.train_limit"):
        resolve({"data": {"trian_limit": 5}})
    with pytest.raises(ConfigError, match="unknown config key stage1.train.lrr; did you mean stage1.train.lr"):
        resolve({"train": {"steps": 1}, "stage1": {"train": {"lrr": 1}}})
    with pytest.raises(ConfigError, match="unknown config key aux.model.dimm; did you mean aux.model.dim"):
        resolve({}, ["aux.model.dimm=3"])
    with pytest.raises(ConfigError, match="not key.sub=value"):
        resolve({}, ["train.steps"])
    with pytest.raises(ConfigError, match="train.schedule must be one of constant, cosine"):
        resolve({}, ["train.schedule=linear"])


def test_one_spelling_per_setting():
    """No aliases: a setting under a former name or in a former section is an unknown key."""
    with pytest.raises(ConfigError, match="unknown config key train.ckpt_every; did you mean train.checkpoint_every"):
        resolve({"train": {"ckpt_every": 7}})
    with pytest.raises(ConfigError, match="unknown config key tokenizer.train.disc_weight"):
        resolve({"tokenizer": {"train": {"disc_weight": 0.5}}})


def test_print_config_shows_the_resolved_config(capsys):
    assert cli(["pipeline", TINY, "--print-config", "stage1.train.lr=0.002"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["stage1"]["train"]["lr"] == 0.002 and shown["baseline"]["train"]["lr"] == 0.002
    assert shown["stage1"]["train"]["checkpoint_every"] == 50 and shown["aux"]["preset"] == "Aux-tiny"
    assert cli(["pipeline", TINY, "--print-config", "stage1.train.lrr=1"]) == 2
    assert "error: unknown config key stage1.train.lrr; did you mean stage1.train.lr?" in capsys.readouterr().err


# --- stages ----------------------------------------------------------------------------------

def test_mismatched_coarse_map_is_refused(synthetic, tmp_path):
    d, _ = synthetic
    for stage in ("ar", "aux"):
        with pytest.raises(StageMismatchError, match="codebook fingerprint: .* in the coarse map, .* in the codes"):
            build_stage(stage, d / "codes", d / "other_map.safetensors", preset="GPT-tiny" if stage == "ar" else "Aux-tiny")
    with pytest.raises(ValueError, match="needs a coarse map"):
        build_stage("ar", d / "codes", None)
    # The command says the same and exits with an error, without training anything.
    rc = cli(["train", "--stage", "ar", "--codes", str(d / "codes"), "--coarse-map", str(d / "other_map.safetensors"),
              "--preset", "GPT-tiny", "--out", str(tmp_path / "run"), "train.steps=2"])
    assert rc == 2 and not (tmp_path / "run" / "checkpoints").exists()


def test_vocabulary_that_does_not_fit_is_refused(synthetic, tmp_path):
    d, cmap = synthetic
    with pytest.raises(StageMismatchError, match="vocab_size=64 .*needs 8"):
        build_stage("ar", d / "codes", cmap, preset="GPT-tiny", model={"vocab_size": 64})
    with pytest.raises(StageMismatchError, match="num_classes=2"):
        build_stage("baseline", d / "codes", None, preset="GPT-tiny", num_classes=2)
    # A checkpoint of another model size is refused by name and shape on resume.
    train_stage("baseline", d / "codes", tmp_path, preset="GPT-tiny", train_config=TRAIN)
    from ctfgen.utils.hub import StateDictMismatch

    with pytest.raises(StateDictMismatch, match="shape mismatch"):
        train_stage("baseline", d / "codes", tmp_path, preset="GPT-tiny", model={"dim": 128, "n_head": 2},
                    train_config={**TRAIN, "steps": 6}, resume=True)
    # ... and neither that refusal nor one without resume rewrites the run's stage.json with the other model.
    with pytest.raises(FileExistsError, match="--resume"):
        train_stage("baseline", d / "codes", tmp_path, preset="GPT-tiny", model={"dim": 128, "n_head": 2},
                    train_config=TRAIN)
    assert json.loads((tmp_path / "stage.json").read_text())["model_config"]["dim"] != 128


def test_training_losses_are_the_exact_likelihoods(synthetic, tmp_path):
    """ar + aux cross entropy is -log p_CTF per token; baseline cross entropy is -log p_AR per token."""
    from ctfgen.pipeline import ARPipeline, CTFPipeline

    d, cmap = synthetic
    ar, _ = train_stage("ar", d / "codes", tmp_path / "ar", coarse_map=cmap, preset="GPT-tiny", train_config=TRAIN)
    aux, _ = train_stage("aux", d / "codes", tmp_path / "aux", coarse_map=cmap, preset="Aux-tiny", train_config=TRAIN)
    base, _ = train_stage("baseline", d / "codes", tmp_path / "base", preset="GPT-tiny", train_config=TRAIN)
    assert ar.config.coarse_map_fingerprint == cmap.fingerprint == aux.config.coarse_map_fingerprint
    assert ar.config.codebook_fingerprint == cmap.codebook_fingerprint and base.config.coarse_map_fingerprint is None
    assert ar.config.vocab_size == 8 and base.config.vocab_size == 64 and aux.config.num_coarse == 8

    ds = CodeDataset(d / "codes")
    x, y = ds.get_batch(range(8))
    L = x.shape[1]
    with torch.no_grad():
        losses = {s: build_stage(s, ds, cmap if s != "baseline" else None, preset=p).loss_fn(m.eval(), (x, y))
                  for s, p, m in (("ar", "GPT-tiny", ar), ("aux", "Aux-tiny", aux), ("baseline", "GPT-tiny", base))}
    ctf = CTFPipeline(ar, aux, cmap).log_prob(x, y)
    torch.testing.assert_close(-ctf.mean(), ((losses["ar"] + losses["aux"]) * L).double(), rtol=1e-5, atol=1e-4)
    vanilla = ARPipeline(base).log_prob(x, y)
    torch.testing.assert_close(-vanilla.mean(), (losses["baseline"] * L).double(), rtol=1e-5, atol=1e-4)
    # Finished models were written in from_pretrained form.
    from ctfgen.models.transformer import GPT

    assert GPT.from_pretrained(str(tmp_path / "ar" / "model")).config == ar.config


def test_the_training_seed_picks_each_items_augmentation(tmp_path, monkeypatch):
    """Two seeds see other augmentations of the same image (every seed used to see seed 0's)."""
    import ctfgen.train.stages as stages

    n, views = 32, 4
    book = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    codes = torch.arange(views)[None, :, None].expand(n, views, 16)  # a code is its view's number
    header = {"tokenizer_fingerprint": codebook_fingerprint(book), "grid_size": 4, "augment": "flip",
              "dataset": "synthetic", "num_classes": 3, "codebook_size": 64}
    write_codes(tmp_path / "codes", codes, torch.arange(n) % 3, header)
    seen = {}

    class Seen(Exception):
        pass

    def record_views(model, loss_fn, dataset, cfg, out_dir, **kwargs):
        seen[cfg.seed] = [int(dataset[i][0][0]) for i in range(n)]
        raise Seen

    monkeypatch.setattr(stages, "train", record_views)
    for seed in (0, 1):
        with pytest.raises(Seen):
            train_stage("baseline", tmp_path / "codes", tmp_path / str(seed), preset="GPT-tiny",
                        train_config={**TRAIN, "seed": seed})
    assert seen[0] != seen[1]
    assert seen[0] == [int(CodeDataset(tmp_path / "codes", seed=0)[i][0][0]) for i in range(n)]


def test_cluster_and_train_commands(tmp_path):
    from ctfgen.tokenizer.vq import VQConfig, VQModel

    torch.manual_seed(0)
    vq = VQModel(VQConfig(codebook_size=64, encoder_ch_mult=(1, 2, 2), decoder_ch_mult=(1, 2, 2), z_channels=8,
                          base_ch=8, num_res_blocks=1, in_channels=1, norm_groups=4))
    vq.save_pretrained(str(tmp_path / "vq"))
    assert cli(["cluster", "--tokenizer", str(tmp_path / "vq"), "--num-coarse", "8", "--method", "random",
                "--seed", "3", "--out", str(tmp_path / "map.safetensors")]) == 0
    cmap = CoarseMap.load(tmp_path / "map.safetensors")
    assert cmap.method == "random" and cmap.num_coarse == 8 and cmap.seed == 3
    cmap.check_codebook(vq)

    # Codes "made by" this tokenizer: its fingerprint in the header.
    g = torch.Generator().manual_seed(0)
    write_codes(tmp_path / "codes", torch.randint(0, 64, (24, 1, 49), generator=g), torch.arange(24) % 10,
                {"tokenizer_fingerprint": vq.fingerprint, "grid_size": 7, "augment": "none", "dataset": "synthetic",
                 "num_classes": 10, "codebook_size": 64})
    cfg = tmp_path / "stage.yaml"
    cfg.write_text("preset: Aux-tiny\nmodel: {multiple_of: 32}\ntrain: {steps: 3, batch_size: 8, progress: false}\n")
    out = tmp_path / "aux"
    args = ["train", "--stage", "aux", "--codes", str(tmp_path / "codes"), "--coarse-map", str(tmp_path / "map.safetensors"),
            "--config", str(cfg), "--out", str(out), "train.lr=3e-4"]
    assert cli(args) == 0
    from ctfgen.models.transformer import AuxModel

    aux = AuxModel.from_pretrained(str(out / "model"))
    assert aux.config.multiple_of == 32 and torch.equal(aux.fine_to_coarse, cmap.fine_to_coarse)
    assert json.loads((out / "stage.json").read_text())["stage"] == "aux"
    assert cli(args) == 2  # an existing run is not overwritten without --resume
    assert cli(args + ["--resume", "train.steps=5"]) == 0
    assert (out / "checkpoints" / "ckpt-00000005.pt").is_file()


# --- the whole pipeline --------------------------------------------------------------------------

def _check_run(out: Path, world_size: int = 1):
    from ctfgen.pipeline import ARPipeline, CTFPipeline, load_pipeline

    for step in ("tokenizer", "cluster", "extract", "ar", "aux", "baseline", "assemble", "heldout"):
        assert (out / "phases" / f"{step}.json").is_file(), step
    ctf = CTFPipeline.from_pretrained(out)
    assert isinstance(load_pipeline(out / "ctf"), CTFPipeline)
    base = ARPipeline.from_pretrained(out / "baseline")
    images = ctf.sample([0, 9], generator=0)
    assert images.shape == (2, 1, 28, 28) and images.min() >= -1 and images.max() <= 1
    assert base.sample([1], generator=0).shape == (1, 1, 28, 28)
    held = json.loads((out / "heldout.json").read_text())
    assert held["ctf"]["exact"] and held["images"] == 40 and held["ctf"]["bits_per_token"] > 0
    # nats per image is the same cost as bits per token, in other units
    assert held["ctf"]["nats_per_image"] == pytest.approx(held["ctf"]["bits_per_token"] * held["image_tokens"] * math.log(2))
    assert json.loads((out / "summary.json").read_text())["world_size"] == world_size
    stages = {line.split(",")[0] for line in (out / "metrics.csv").read_text().splitlines()[1:]}
    assert stages == {"tokenizer", "ar", "aux", "baseline"}
    assert (out / "config.yaml").is_file() and (out / "input.yaml").is_file()
    # each pipeline's model card: Hub metadata with the paper, the resolved config and what the run measured
    from huggingface_hub import ModelCard

    for kind, stage in (("ctf", "aux"), ("baseline", "baseline")):
        card = ModelCard.load(out / kind / "README.md")
        assert card.data.library_name == "ctfgen" and "arxiv:2503.16194" in card.data.tags
        recorded = card.data.to_dict()["ctfgen"]
        assert recorded["training_config"]["clustering"]["num_coarse"] == 16
        assert recorded["metrics"][stage]["steps"] > 0 and recorded["metrics"]["heldout"]["bits_per_token"] > 0
        assert "## Training config" in card.text and "heldout.bits_per_token" in card.text


@needs_fmnist
def test_tiny_pipeline_end_to_end_resume_and_refusals(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(["pipeline", TINY, "--out", str(out), "--no-progress", *SMALL]) == 0
    _check_run(out)
    # the run ends by printing commands that work
    printed = capsys.readouterr().err
    sample = next(line.strip() for line in printed.splitlines() if line.strip().startswith("ctfgen sample "))
    assert "--compare-baseline" in sample and f"{out / 'ctf'}" in sample and "ctfgen.load_pipeline(" in printed
    assert cli(shlex.split(sample)[1:] + ["--no-progress"]) == 0 and (out / "samples.png").is_file()
    (out / "samples.png").unlink()
    shutil.rmtree(out / "samples")
    # Every data file, not the writer locks (a refused run held the lock while it looked).
    files = lambda: {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and not is_lock_file(p)}  # noqa: E731
    before = files()

    # Not empty and no --resume: refused, nothing touched.
    assert cli(["pipeline", TINY, "--out", str(out), "--no-progress", *SMALL]) == 2
    assert "is not empty" in capsys.readouterr().err
    # A finished step run with other settings: refused on resume.
    assert cli(["pipeline", TINY, "--out", str(out), "--resume", "--no-progress", *SMALL, "clustering.num_coarse=8"]) == 2
    assert "clustering.num_coarse: 16 then, 8 now" in capsys.readouterr().err
    assert files() == before

    # Resuming a finished run redoes nothing (its own input.yaml when no CONFIG is given).
    t0 = time.time()
    assert cli(["pipeline", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert time.time() - t0 < 30
    changed = [p for p, t in files().items() if before.get(p) != t]
    assert {p.name for p in changed} <= {"config.yaml", "input.yaml", "summary.json"}


@needs_fmnist
def test_pipeline_killed_during_stage1_resumes_from_its_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "ctfgen.app.cli", "pipeline", TINY, "--out", str(out), "--no-progress", *SMALL,
            "stage1.train.steps=300", "stage1.train.checkpoint_every=5", "baseline.train.steps=6"]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpts = out / "runs" / "ar" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not list(ckpts.glob("ckpt-*.pt")):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "phases" / "ar.json").exists(), "stage 1 finished before it could be killed"
    assert (out / "phases" / "extract.json").is_file()

    res = subprocess.run(args + ["--resume"], env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "[ar] resumed from" in res.stderr and "training the tokenizer" not in res.stderr
    assert json.loads((out / "phases" / "ar.json").read_text())["steps"] == 300
    _check_run(out)


@needs_fmnist
def test_pipeline_under_torchrun_two_ranks(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "ctfgen.app.cli", "pipeline", TINY, "--out", str(out), "--no-progress", *SMALL]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-6000:]
    _check_run(out, world_size=2)
    # Rank 0 alone wrote: one log line per logged step, no duplicates.
    steps = [line.split(",")[0] for line in (out / "runs" / "ar" / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == ["2", "4", "6"]


def _quick_phase_worker(rank, port, out):
    """Two gloo ranks record a phase whose work is instant (the pretrained tokenizer's), rank 1 arriving late;
    each saves how many barriers its `once` passed."""
    import torch.distributed as dist

    init_gloo(rank, port, timeout_s=30)
    from ctfgen.experiments import run as R

    cfg, raw = R.load_experiment_config(TINY)
    x = R.Experiment(cfg, raw, Path(out) / "run", False, None, False)
    x.prepare()
    barriers, barrier = [], R.D.barrier
    R.D.barrier = lambda: (barriers.append(1), barrier())[1]
    if rank == 1:
        time.sleep(3)  # rank 0 has recorded the phase by now
    x.once("tokenizer", lambda: {"path": "pretrained"})
    torch.save(len(barriers), os.path.join(out, f"barriers{rank}.pt"))
    x.lock.release()
    dist.destroy_process_group()


def test_a_phase_rank_0_records_before_another_rank_looks_is_run_by_every_rank(tmp_path):
    """Each rank used to read the phase's record itself: a rank arriving after rank 0 had recorded a quick
    phase skipped it and its barrier, so its next collective met rank 0's barrier (a hang or garbage)."""
    run_ranks(_quick_phase_worker, str(tmp_path))
    counts = [torch.load(tmp_path / f"barriers{r}.pt", weights_only=True) if (tmp_path / f"barriers{r}.pt").is_file()
              else None for r in range(2)]
    assert counts == [1, 1], counts
    assert (tmp_path / "run" / "phases" / "tokenizer.json").is_file()


def _prepare_worker(rank, port, out, os_error=False):
    """Two gloo ranks prepare a resumed run whose phase record rank 0 cannot use (or whose directory rank 0
    cannot read); each saves what it raised."""
    import torch.distributed as dist

    init_gloo(rank, port, timeout_s=20)
    from ctfgen.experiments import run as R

    if os_error and rank == 0:
        def unreadable(self):
            raise PermissionError(13, "Permission denied", str(self.run.root))
        R.Experiment._check_dir = unreadable

    cfg, raw = R.load_experiment_config(TINY)
    x = R.Experiment(cfg, raw, Path(out) / "run", True, None, False)
    try:
        x.prepare()
        raised = None
    except Exception as e:  # noqa: BLE001 - what each rank ends with is the point
        raised = f"{type(e).__name__}: {e}"
    x.lock.release()
    Path(out, f"raised{rank}.txt").write_text(str(raised))


def test_a_phase_record_rank_0_cannot_use_stops_every_rank_with_its_error(tmp_path):
    """Only a RunError of rank 0's checks reached the other ranks: a corrupt phase record made rank 0 raise
    while rank 1 waited for its answer (a hang until the collective timed out)."""
    (tmp_path / "run" / "phases").mkdir(parents=True)
    (tmp_path / "run" / "phases" / "tokenizer.json").write_text('{"name": "tokeni')
    run_ranks(_prepare_worker, str(tmp_path))
    raised = [(tmp_path / f"raised{r}.txt").read_text() if (tmp_path / f"raised{r}.txt").is_file() else None
              for r in range(2)]
    assert all(r is not None and r.startswith("CorruptFileError: ") and "tokenizer.json is not valid JSON" in r
               for r in raised), raised


def test_an_os_error_of_rank_0s_checks_stops_every_rank(tmp_path):
    """Only ctfgen's own errors reached the other ranks: an OSError of rank 0 left rank 1 waiting."""
    run_ranks(_prepare_worker, str(tmp_path), True)
    raised = [(tmp_path / f"raised{r}.txt").read_text() if (tmp_path / f"raised{r}.txt").is_file() else None
              for r in range(2)]
    assert all(r is not None and r.startswith("PermissionError: ") for r in raised), raised


def test_an_old_phase_record_that_does_not_load_is_named(tmp_path):
    """A record whose settings today's loader rejects was reported as if the user's config were wrong."""
    from ctfgen.experiments.run import Experiment, load_experiment_config
    from ctfgen.utils.fileio import atomic_write_json

    out = tmp_path / "run"
    atomic_write_json(out / "phases" / "cluster.json",
                      {"name": "cluster", "inputs": {"clustering": {"retired_setting": 1}}, "commit": "x"})
    cfg, raw = load_experiment_config(TINY)
    x = Experiment(cfg, raw, out, True, None, False)
    try:
        with pytest.raises(ConfigError, match=r"cluster\.json, the record of the finished cluster phase, does not load"):
            x.prepare()
    finally:
        x.lock.release()


def _resume_checks(out, *overrides):
    """What `ctfgen pipeline --resume --out OUT` checks before any work, with these overrides of tiny.yaml."""
    from ctfgen.experiments.run import Experiment, load_experiment_config

    cfg, raw = load_experiment_config(TINY, overrides=list(overrides))
    x = Experiment(cfg, raw, out, True, None, False)
    try:
        x.prepare()
    finally:
        x.lock.release()


def test_resume_refuses_sampling_or_stages_changed_after_assembly(tmp_path):
    """The assembled pipelines hold the sampling defaults, and assembly and the held-out phase cover the enabled
    stages: a resume that changed either used to pass, leaving config.yaml saying what the pipelines are not
    (or a newly enabled baseline trained but never assembled or measured)."""
    from ctfgen.experiments.run import load_experiment_config, sections
    from ctfgen.utils.errors import RunError
    from ctfgen.utils.fileio import atomic_write_json
    from ctfgen.utils.rundir import Records

    out = tmp_path / "run"
    cfg, _ = load_experiment_config(TINY)
    for phase in ("assemble", "heldout"):
        Records(out / "phases").once(phase, sections(cfg, phase), lambda: {})

    _resume_checks(out, "name=renamed", "stage1.train.lr=0.5")  # neither phase depends on these
    with pytest.raises(RunError, match=r"assemble: sampling\.ctf\.cfg_scale: None then, 3\.0 now"):
        _resume_checks(out, "sampling.ctf.cfg_scale=3.0")
    with pytest.raises(RunError, match=r"assemble: matched\.enabled: False then, True now\n.*heldout: matched"):
        _resume_checks(out, "matched.enabled=true")
    # a record made before assembly depended on these holds none of them, and still resumes
    atomic_write_json(out / "phases" / "assemble.json", {"name": "assemble", "inputs": {}, "commit": "x"})
    _resume_checks(out, "sampling.ctf.cfg_scale=3.0")


def test_resume_may_change_how_finished_phases_ran_but_not_what_they_made(tmp_path):
    """A resume changing only data-loading processes, the progress bar or which checkpoints are written was refused
    where a phase they cannot affect had finished (data.num_workers=2 after the tokenizer and extraction)."""
    from ctfgen.config import to_dict
    from ctfgen.experiments.run import PHASE_SECTIONS, load_experiment_config, sections
    from ctfgen.utils.errors import RunError
    from ctfgen.utils.fileio import atomic_write_json
    from ctfgen.utils.rundir import Records

    out = tmp_path / "run"
    cfg, _ = load_experiment_config(TINY)
    for phase in ("ar", "baseline", "heldout"):
        Records(out / "phases").once(phase, sections(cfg, phase), lambda: {})
    full = to_dict(cfg)
    for phase in ("tokenizer", "extract", "aux"):  # as written before: whole sections, these settings among them
        atomic_write_json(out / "phases" / f"{phase}.json",
                          {"name": phase, "inputs": {s: full[s] for s in PHASE_SECTIONS[phase]}, "commit": "x"})

    _resume_checks(out, "data.num_workers=2", "tokenizer.train.num_workers=2", "tokenizer.train.checkpoint_every=7",
                   "tokenizer.train.progress=false", "train.num_workers=2", "train.progress=false",
                   "train.checkpoint_every=7", "train.keep_checkpoints=0", "aux.train.keep_checkpoints=5",
                   "baseline.train.num_workers=1")
    with pytest.raises(RunError, match=r"extract: data\.augment: 'none' then, 'flip' now"):
        _resume_checks(out, "data.num_workers=2", "data.augment=flip")
    # a phase's final_loss is the mean over the last log window; heldout batches may move the last bits
    with pytest.raises(RunError, match=r"ar: .*stage1\.train\.log_every: 10 then, 5 now"):
        _resume_checks(out, "train.log_every=5")
    with pytest.raises(RunError, match=r"heldout: heldout\.batch_size: 100 then, 50 now"):
        _resume_checks(out, "heldout.batch_size=50")


def test_pipeline_without_config_or_resume_says_to_pass_one(tmp_path):
    """Without --resume the message said there was no DIR/input.yaml to resume from, even where there was one."""
    from ctfgen.experiments.run import load_experiment_config
    from ctfgen.utils.errors import RunError

    (tmp_path / "input.yaml").write_text(Path(TINY).read_text())
    with pytest.raises(RunError, match=r"^no CONFIG given: pass one, or --resume to continue") as err:
        load_experiment_config(None, tmp_path)
    assert "to resume from" not in str(err.value)
    assert load_experiment_config(None, tmp_path, resume=True)[1] == yaml.safe_load(Path(TINY).read_text())
    (tmp_path / "input.yaml").unlink()
    with pytest.raises(RunError, match=r"no .*input\.yaml to resume from; pass a CONFIG"):
        load_experiment_config(None, tmp_path, resume=True)


def test_top_level_pipeline_json_is_never_half_written(tmp_path, monkeypatch):
    """DIR's own pipeline.json (what makes DIR a loadable pipeline) was copied in place: a kill mid-copy left
    half a file. A kill before it is complete now leaves the previous one; where there are no symlinks, the
    parts are copied whole as well."""
    from ctfgen.experiments.run import _link_top_level
    from ctfgen.utils import fileio

    root = tmp_path / "run"
    (root / "ctf" / "ar").mkdir(parents=True)
    (root / "ctf" / "ar" / "config.json").write_text('{"dim": 8}')
    (root / "ctf" / "coarse_map.safetensors").write_bytes(b"map")
    (root / "ctf" / "pipeline.json").write_text(json.dumps({"type": "ctf", "new": True}))
    (root / "pipeline.json").write_text(json.dumps({"type": "ctf", "new": False}))

    def killed(src, dst, *args, **kwargs):
        Path(dst).write_bytes(Path(src).read_bytes()[:7])
        raise KeyboardInterrupt

    def killed_before_rename(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "copyfile", killed)
    monkeypatch.setattr(fileio, "fsync_file", killed_before_rename)
    with pytest.raises(KeyboardInterrupt):
        _link_top_level(root, "ctf")
    assert json.loads((root / "pipeline.json").read_text()) == {"type": "ctf", "new": False}
    monkeypatch.undo()

    def no_symlinks(*args, **kwargs):
        raise OSError("symlinks not supported")

    monkeypatch.setattr(os, "symlink", no_symlinks)
    _link_top_level(root, "ctf")
    assert json.loads((root / "pipeline.json").read_text()) == {"type": "ctf", "new": True}
    assert (root / "ar" / "config.json").read_text() == '{"dim": 8}' and not (root / "ar").is_symlink()
    assert (root / "coarse_map.safetensors").read_bytes() == b"map"
    assert sorted(p.name for p in root.iterdir()) == ["ar", "coarse_map.safetensors", "ctf", "pipeline.json"]


def test_finished_run_images_of_an_image_folder_run_are_refused(tmp_path, monkeypatch):
    """The image-folder subset has `indices` as Fashion-MNIST has: `images` ended in an AttributeError."""
    from PIL import Image

    from ctfgen.config import dump
    from ctfgen.data.factory import FolderSubset
    from ctfgen.data.folder import ImageFolder
    from ctfgen.experiments.run import FinishedRun, load_experiment_config
    from ctfgen.utils.errors import RunError

    for name in ("a", "b"):
        (tmp_path / "images" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "images" / name / "0.png")
    cfg, _ = load_experiment_config(TINY, overrides=["data.dataset=image_folder", f"data.root={tmp_path / 'images'}"])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(dump(cfg))
    run = FinishedRun(tmp_path / "run")
    monkeypatch.setattr(FinishedRun, "image_dataset",
                        lambda self, split: FolderSubset(ImageFolder(tmp_path / "images", image_size=8), [0, 1]))
    with pytest.raises(RunError, match="holds image-folder data; these need Fashion-MNIST images"):
        run.images("test")


def test_matched_depth_gives_ctf_parameter_count(synthetic):
    from ctfgen.train.stages import MATCH_TOLERANCE, matched_depth, parameter_count

    d, cmap = synthetic
    aux_model = {"n_layer": 6}  # a large auxiliary model: the baseline must grow to match
    m = matched_depth(d / "codes", cmap, ("GPT-tiny", {}), ("Aux-tiny", aux_model), ("GPT-tiny", {}))
    ctf = sum(p.numel() for s, pre, mo in (("ar", "GPT-tiny", {}), ("aux", "Aux-tiny", aux_model))
              for p in build_stage(s, d / "codes", cmap, pre, mo).model.parameters())
    built = build_stage("baseline", d / "codes", None, "GPT-tiny", {"n_layer": m["n_layer"]}).model
    assert m["ctf_params"] == ctf and m["params"] == sum(p.numel() for p in built.parameters())
    assert abs(m["params"] / ctf - 1) <= MATCH_TOLERANCE and m["n_layer"] > built.config.n_layer - 1 > 0
    # no depth is closer: one layer more or less is further from CTF's count
    for n in (m["n_layer"] - 1, m["n_layer"] + 1):
        assert abs(parameter_count("baseline", d / "codes", None, "GPT-tiny", {"n_layer": n}) - ctf) >= abs(m["params"] - ctf)
    # a baseline whose single layer already outweighs CTF cannot be matched: refused, not approximated
    with pytest.raises(ConfigError, match="within 10%"):
        matched_depth(d / "codes", cmap, ("GPT-tiny", {}), ("Aux-tiny", {}), ("GPT-tiny", {"dim": 512, "n_head": 8}))
    # ... unless the user fixes the depth: then it is counted, as asked, not searched for or refused
    fixed = matched_depth(d / "codes", cmap, ("GPT-tiny", {}), ("Aux-tiny", {}), ("GPT-tiny", {"dim": 512, "n_head": 8}),
                          n_layer=1)
    assert fixed["n_layer"] == 1 and fixed["ratio"] > 1 + MATCH_TOLERANCE


def test_matched_baseline_inherits_the_baseline_and_needs_both_methods():
    cfg = resolve({"stage1": {"preset": "GPT-tiny", "model": {"resid_dropout": 0.0}}, "matched": {"enabled": True},
                   "train": {"steps": 3, "seed": 7}})
    assert cfg.matched.preset == "GPT-tiny" and cfg.matched.model == {"resid_dropout": 0.0}
    assert cfg.matched.train == cfg.baseline.train and cfg.matched.train.seed == 7  # same steps, data order, seed
    from ctfgen.config import check_experiment

    with pytest.raises(ConfigError, match="matched.enabled needs"):
        check_experiment(resolve({"baseline": {"enabled": False}, "matched": {"enabled": True}, "train": {"steps": 3}}))


def test_model_numbers_yaml_reads_as_strings_become_numbers():
    # YAML 1.1 reads 1e-6 as a string, which RMSNorm added to a tensor at the first step
    cfg = resolve({"stage1": {"model": {"norm_eps": "1e-6", "dim": 64}}})
    assert cfg.stage1.model == {"norm_eps": 1e-6, "dim": 64} and cfg.baseline.model["norm_eps"] == 1e-6


def test_matched_baseline_is_off_unless_enabled():
    assert not resolve({"stage1": {"preset": "GPT-tiny"}}).matched.enabled
    assert resolve({"stage1": {"preset": "GPT-tiny"}, "matched": {"enabled": True}}).matched.enabled


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    from ctfgen.config import ReproduceConfig

    load_config(ReproduceConfig if "ablations" in path.name else ExperimentConfig, path)


def test_stage_config_from_an_experiment_inherits_then_takes_the_overrides(tmp_path):
    from ctfgen.config import load_stage_config

    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"stage1": {"preset": "GPT-tiny", "model": {"resid_dropout": 0.0},
                                               "train": {"lr": 3e-4}}, "train": {"steps": 5, "batch_size": 8}}))
    cfg = load_stage_config(path, "baseline", ["model.dim=64", "train.steps=7"])
    assert cfg.preset == "GPT-tiny" and cfg.model == {"resid_dropout": 0.0, "dim": 64}
    assert (cfg.train.lr, cfg.train.steps, cfg.train.batch_size) == (3e-4, 7, 8)
    with pytest.raises(ConfigError, match="unknown config key baseline.train.lrr"):
        load_stage_config(path, "baseline", ["train.lrr=1"])


def _refused_when_loaded(override, message, capsys):
    """The override of tiny.yaml is one `error:` line holding `message`, before any work (--print-config)."""
    assert cli(["pipeline", TINY, "--print-config", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("override,message", [
    ("train.steps=0", "train.steps must be >= 1, got 0"), ("stage1.train.epochs=-1", "stage1.train.epochs must be >= 1"),
    ("train.lr=0", "train.lr must be > 0"), ("train.warmup_steps=-1", "train.warmup_steps must be >= 0"),
    ("data.train_limit=0", "data.train_limit must be >= 1"), ("clustering.num_coarse=0", "num_coarse must be >= 1"),
    ("heldout.batch_size=0", "heldout.batch_size must be >= 1"), ("tokenizer.train.batch_size=-3", "batch_size must be >= 1"),
    # scikit-learn's k-means (clustering, tokenizer codebook_init: kmeans) refused these after the tokenizer trained
    ("seed=-1", "error: seed must be >= 0, got -1"), ("clustering.seed=-1", "clustering.seed must be >= 0, got -1"),
    ("train.seed=4294967296", "train.seed must be <= 4294967295, got 4294967296"),
    ("sampling.ctf.temperature_fine=-1", "sampling.ctf.temperature_fine must be between 0 and 10")])
def test_config_numbers_at_zero_and_below_are_refused(override, message, capsys):
    _refused_when_loaded(override, message, capsys)


# (settings class, field, a value the code that uses the field cannot take, the message)
BAD_SETTINGS = [
    ("ExperimentConfig", "seed", -1, "seed must be >= 0, got -1"),
    ("ClusteringConfig", "seed", 2**32, "seed must be <= 4294967295, got 4294967296"),
    ("TrainConfig", "seed", -1, "seed must be >= 0, got -1"),
    ("EvaluationConfig", "seed", 2**32, "seed must be <= 4294967295"),
    ("StudySettings", "select_seed", -1, "select_seed must be >= 0, got -1"),
    ("StudySettings", "seeds", (0, 2**64), "seeds.1 must be <= 4294967295"),
    ("StudySettings", "diagnosis_seed", -5, "diagnosis_seed must be >= 0, got -5"),
    ("StudySettings", "epoch_seed", 2**32, "epoch_seed must be <= 4294967295"),
    # every weight is -inf after AdamW's first step; a NaN loss weight makes every loss NaN
    ("TrainConfig", "lr", math.inf, "lr must be a finite number, got inf"),
    ("TrainConfig", "weight_decay", math.inf, "weight_decay must be a finite number, got inf"),
    ("VQLossConfig", "reconstruction_weight", math.nan, "reconstruction_weight must be a finite number, got nan"),
    # torch's AdamW (loop.py:104, tokenizer.py:79) raised a ValueError when the stage's training began
    ("TrainConfig", "betas", (0.9, 1.0), "betas.1 must be < 1.0, got 1.0"),
    ("TokenizerTrainConfig", "betas", (-0.1, 0.9), "betas.0 must be >= 0.0, got -0.1"),
    ("VQLossConfig", "disc_lr", -1e-4, "disc_lr must be > 0.0, got -0.0001"),
    # 0: torch.cat of no images; -5: every image but five (codebook.py:61)
    ("TokenizerTrainConfig", "codebook_init_images", 0, "codebook_init_images must be >= 1, got 0"),
    ("VQLossConfig", "disc_dim", -2, "disc_dim must be >= 1, got -2"),  # NLayerDiscriminator: negative dimension
    ("VQLossConfig", "disc_layers", -1, "disc_layers must be >= 0, got -1"),  # 2 ** -1 channels: a TypeError
    # the pipelines refused them when assembled, after every stage had trained; the ablations after training
    ("SamplingConfig", "ctf", {"top_p": 5}, "ctf.top_p must be greater than 0 and at most 1 (1 = all), got 5"),
    ("SamplingConfig", "baseline", {"top_k": 2.5}, "baseline.top_k must be a whole number, got 2.5"),
    ("EvaluationConfig", "temperatures", [1, "x"], "temperatures.1 must be a number, got 'x'"),
    ("StudySettings", "guidance", (2.0, 25), "guidance.1 must be <= 20.0, got 25"),
    ("StudySettings", "temperatures", (-1,), "temperatures.0 must be >= 0.0, got -1"),
    # nn.Dropout, the FFN's rounding and RMSNorm refused them when the stage's model was built, after the stages before
    ("StageConfig", "model", {"resid_dropout": 2}, "model.resid_dropout must be <= 1.0, got 2"),
    ("AuxStageConfig", "model", {"multiple_of": 0}, "model.multiple_of must be >= 1, got 0"),
    ("StageConfig", "model", {"norm_eps": "x"}, "model.norm_eps must be a valid number, got 'x'"),
    # the bounds the fields had before
    *((cls, name, 0, f"{name} must be >= 1, got 0") for cls, names in (
        ("TrainConfig", "steps epochs batch_size grad_accum checkpoint_every log_every"),
        ("TokenizerTrainConfig", "steps batch_size checkpoint_every log_every"),
        ("DataConfig", "image_size channels train_limit test_limit extract_batch_size"),
        ("ClusteringConfig", "num_coarse"), ("HeldoutConfig", "limit batch_size"), ("ReproduceConfig", "steps"),
        ("EvaluationConfig", "per_class batch_size heldout_images"),
        ("StudySettings", "select_per_class test_per_class tokenizer_images heldout_images coarse_images "
                          "diagnosis_per_class epoch_per_class batch_size")) for name in names.split()),
    *((cls, name, -1, f"{name} must be >= 0") for cls, names in (
        ("TrainConfig", "grad_clip warmup_steps keep_checkpoints snapshot_every num_workers"),
        ("TokenizerTrainConfig", "weight_decay dead_code_steps"), ("DataConfig", "validation_images num_workers"))
      for name in names.split()),
    ("TrainConfig", "min_lr_ratio", 1.5, "min_lr_ratio must be <= 1"),
    ("TrainConfig", "ema_decay", 1, "ema_decay must be < 1"),
    ("TokenizerTrainConfig", "dead_code_until", 0, "dead_code_until must be > 0"),
    ("ReproduceConfig", "clusters", [64, 0], "clusters.1 must be >= 1, got 0"),
    ("VQLossConfig", "perceptual_weight", math.inf, "perceptual_weight must be a finite number"),
    ("VQLossConfig", "disc_weight", math.nan, "disc_weight must be a finite number"),
]


# Numeric settings no value of their type breaks, with the reason.
UNBOUNDED_SETTINGS = {
    ("VQLossConfig", "disc_start"): "a step before the first is the first (tokenizer.py:93)",
    ("TokenizerConfig", "model"): "the VQConfig the tokenizer phase, the first, builds before any work",
}


def test_every_numeric_setting_has_a_bad_value_case():
    """A new number (or a dict or untyped list that may hold numbers) in the settings needs its bound, and a case
    above, or a reason it takes any value."""
    import inspect
    import typing

    import ctfgen.config as config

    def numeric(t):
        return t in (int, float, dict, list) or any(numeric(a) for a in typing.get_args(t) if a is not bool)

    found = {(name, key) for name, cls in vars(config).items()
             if inspect.isclass(cls) and cls.__module__ == config.__name__ and hasattr(cls, "__pydantic_validator__")
             for key, kind in typing.get_type_hints(cls).items()
             if key in cls.__dict__.get("__annotations__", {}) and numeric(kind)}
    covered = {(cls, name) for cls, name, *_ in BAD_SETTINGS}
    missing = found - covered - set(UNBOUNDED_SETTINGS)
    assert not missing, f"numeric settings without a bad-value case: {sorted(missing)}"
    assert set(UNBOUNDED_SETTINGS) <= found


@pytest.mark.parametrize("cls,name,value,message", BAD_SETTINGS, ids=lambda v: v if isinstance(v, str) else None)
def test_every_numeric_setting_refuses_what_its_user_cannot_take(cls, name, value, message):
    import ctfgen.config as config

    with pytest.raises(ConfigError) as e:
        getattr(config, cls)(**{name: value})
    assert str(e.value).startswith(message), e.value


@pytest.mark.parametrize("override,message", [
    ("train.steps=5.5", "train.steps must be a valid integer, got 5.5"),
    ("train.ema=maybe", "train.ema must be a valid boolean, got 'maybe'"),
    ("train.seed=x", "train.seed must be a valid integer, got 'x'"),
    ("train.betas=[0.9]", "train.betas.1: field required"), ("data.root=[1]", "data.root must be a valid string"),
    ("heldout.enabled=2", "heldout.enabled must be a valid boolean, got 2"),
    ("stage1=5", "stage1 must be a mapping of settings, got 5"),
    ("train.fsdp=sometimes", "train.fsdp must be one of true, false, auto, got 'sometimes'"),
    ("train.lr=.inf", "train.lr must be a finite number, got inf"),
    # refused only when the stage's turn came, after stage 1 and the baseline had trained
    ("aux.preset=Aux-BB", "aux: unknown Aux preset 'Aux-BB'"),
    ("aux.model.dim=100", "aux: head_dim 50 (dim/n_head) must be a multiple of 4"),
    ("train.grad_accum=3", "stage1.train.batch_size=50 must be a multiple of stage1.train.grad_accum=3")])
def test_config_values_of_the_wrong_type_are_refused(override, message, capsys):
    _refused_when_loaded(override, message, capsys)


@pytest.mark.parametrize("argv,shows", [
    (["train-tokenizer", TINY, "tokenizer.train.steps=7"], lambda c: c["train"]["steps"] == 7 and "loss" in c),
    (["train", "--stage", "baseline", "--config", TINY, "train.steps=9"],
     lambda c: c["preset"] == "GPT-tiny" and c["train"]["steps"] == 9 and c["train"]["batch_size"] == 50),
    (["reproduce", "steps=12"], lambda c: c["steps"] == 12 and c["evaluation"]["per_class"] == 100),
    (["study", "--test-per-class", "3"], lambda c: c["test_per_class"] == 3 and c["select_seed"] == 1000),
])
def test_every_command_that_takes_settings_prints_them(argv, shows, capsys):
    assert cli([*argv, "--print-config"]) == 0, capsys.readouterr().err
    assert shows(yaml.safe_load(capsys.readouterr().out))
