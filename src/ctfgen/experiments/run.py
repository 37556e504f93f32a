"""`ctfgen pipeline CONFIG --out DIR`: a whole experiment, from images to trained CTF and baseline;
and `FinishedRun`, the one reader of such a directory once it is done.

Phases, in order (each leaves `DIR/phases/<phase>.json` when finished, so `--resume` skips it; an
interrupted training phase continues from its last checkpoint, and every file a phase publishes
appears atomically, so a SIGKILL at any moment never leaves a half-written result behind):

    tokenizer   train a VQ tokenizer (or take `tokenizer.pretrained`)   DIR/runs/tokenizer/
    cluster     fit the CoarseMap on its codebook                       DIR/runs/coarse_map.safetensors
    extract     tokenize the train split (and the val and test splits)  DIR/codes/{train,val,test}/
    ar          CTF stage 1: GPT over coarse labels                     DIR/runs/ar/
    baseline    the vanilla GPT over fine tokens (stage 1's size)       DIR/runs/baseline/
    aux         CTF stage 2: the auxiliary fine-token model             DIR/runs/aux/
    matched     the baseline made as large as CTF (`matched.enabled`)   DIR/runs/matched/
    assemble    the finished pipelines                                  DIR/ctf/, DIR/baseline/, DIR/matched/
    heldout     exact held-out bits per token of each                   DIR/heldout.json

`DIR` itself is also a loadable CTF pipeline (`CTFPipeline.from_pretrained(DIR)`); the layout is
`ctfgen.utils.rundir.RunDir`. Under torchrun every rank runs this; training and extraction are
sharded, rank 0 alone writes (holding DIR's writer lock), and the others wait at barriers around
the rank-0-only phases.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import logging
import os
import shlex
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

from ctfgen.clustering import CoarseMap
from ctfgen.config import (ExperimentConfig, apply_overrides, check_experiment, dry_run_overrides, dump, read_yaml,
                           to_dict)
from ctfgen.data import CodeDataset, check_codes, extract_codes, make_dataset, read_header
from ctfgen.data.factory import TENCROP_RANGE, image_size
from ctfgen.data.fashion_mnist import FashionMNIST
from ctfgen.pipeline import ARPipeline, CTFPipeline, heldout_bits_per_token, load_pipeline
from ctfgen.tokenizer import load_tokenizer
from ctfgen.tokenizer.codebook import evaluate_tokenizer
from ctfgen.train.stages import load_stage_model, matched_depth, train_stage
from ctfgen.train.tokenizer import train_tokenizer
from ctfgen.utils import distributed as D
from ctfgen.utils.errors import ConfigError, CorruptFileError, MismatchError, RunError
from ctfgen.utils.fileio import (atomic_write_bytes, atomic_write_csv, atomic_write_json, atomic_write_text,
                                 publish_dir)
from ctfgen.utils.hub import write_model_card
from ctfgen.utils.rundir import Records, RunDir, WriterLock, diff_lines, is_lock_file, plain

logger = logging.getLogger("ctfgen.pipeline")

PHASES = ("tokenizer", "cluster", "extract", "ar", "baseline", "aux", "matched", "assemble", "heldout")
# the pipelines a finished run can hold, and the stages each is made of
STAGES_OF = {"ctf": ("ar", "aux"), "baseline": ("baseline",), "matched": ("matched",)}
METHODS = tuple(STAGES_OF)

# The config sections (or single settings, "section.key") each phase depends on: a finished phase whose
# sections changed is refused on --resume instead of being silently kept. Which pipelines are assembled
# and measured follows the stages' `enabled`.
ENABLED = ("stage1.enabled", "aux.enabled", "baseline.enabled", "matched.enabled")
PHASE_SECTIONS = {
    "tokenizer": ("seed", "data", "tokenizer"), "cluster": ("seed", "clustering"), "extract": ("data",),
    "ar": ("seed", "train", "stage1"), "aux": ("seed", "train", "aux"),
    "baseline": ("seed", "train", "stage1", "baseline"),
    "matched": ("seed", "train", "stage1", "aux", "baseline", "matched"), "assemble": (*ENABLED, "sampling"),
    "heldout": ("heldout", *ENABLED),
}
# Settings of those sections that change how a phase runs but not what it makes (weights, codes, records), left out
# of what a phase depends on so that a resume may change them: data-loading processes (the data order is the seeded
# sampler's, the pipeline's datasets draw no randomness, extraction's batches are extract_batch_size's), the progress
# bar, and which checkpoints are written and kept. Not log_every (a phase's final_loss is the mean over the last log
# window) nor heldout.batch_size (a batch's shape can move the log-likelihoods' last bits).
TRAIN_SECTIONS = ("train", "tokenizer.train", "stage1.train", "aux.train", "baseline.train", "matched.train")
RUN_ONLY = ("data.num_workers", *(f"{section}.{key}" for section in TRAIN_SECTIONS
                                  for key in ("num_workers", "progress", "checkpoint_every", "keep_checkpoints")))


def sections(cfg: ExperimentConfig, phase: str) -> dict:
    d, picked = to_dict(cfg), {}
    for key in PHASE_SECTIONS[phase]:
        section, _, setting = key.partition(".")
        if setting:
            picked.setdefault(section, {})[setting] = d[section][setting]
        else:
            picked[section] = d[section]
    picked = plain(picked)
    for path in RUN_ONLY:
        *parents, key = path.split(".")
        node = picked
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(key, None)
    return picked


class Experiment:
    """A run directory being filled: its config, its layout and which phases are finished."""

    def __init__(self, cfg: ExperimentConfig, raw: dict, out_dir, resume: bool,
                 on_epoch_end: dict[str, Callable] | None, progress: bool):
        self.cfg, self.raw, self.run, self.resume = cfg, raw, RunDir(out_dir), resume
        self.hooks, self.progress = on_epoch_end or {}, progress
        self.device = D.init_distributed()
        self.lock = WriterLock(self.run.root, "pipeline", hold=D.is_main())
        self.records = Records(self.run.phases, write=D.is_main())

    def done(self, phase: str) -> dict | None:
        return self.records.read(phase)

    def once(self, phase: str, work: Callable[[], dict | None]) -> None:
        """Run `work` unless `phase` is finished, then record it (its info, time, settings and commit).
        A finished phase is kept as it is: prepare() compared its settings, and the commit may differ."""
        # Rank 0's answer for every rank: a rank that looked only after rank 0 had recorded a quick phase
        # would skip it and its barrier, and the ranks' later collectives would pair up wrongly.
        if D.broadcast_object(self.done(phase) is None if D.is_main() else None):
            self.records.once(phase, sections(self.cfg, phase), lambda: work() or {})
            D.barrier()

    def prepare(self) -> None:
        """Take DIR's writer lock (rank 0), refuse a non-empty DIR without --resume, and on resume
        finished phases whose config changed."""
        error = None
        if D.is_main():
            try:
                self.lock.acquire()
                self._check_dir()
            except Exception as e:  # noqa: BLE001 - whatever stops rank 0 (a corrupt record, an OSError) stops all
                error = e
        if (error := D.broadcast_object(error)) is not None:  # every rank stops, not only rank 0
            raise error
        if D.is_main():
            # config.yaml: everything resolved, for the record. input.yaml: what was asked for, which
            # `--resume` without a CONFIG starts from, so a top-level override still reaches every stage.
            atomic_write_text(self.run.config, dump(self.cfg))
            atomic_write_text(self.run.input_config, yaml.safe_dump(self.raw, sort_keys=False))
        D.barrier()

    def _check_dir(self) -> None:
        root = self.run.root
        existing = sorted(p.name for p in root.iterdir() if not is_lock_file(p)) if root.is_dir() else []
        if existing and not self.resume:
            held = ", ".join(existing[:6]) + (" ..." if len(existing) > 6 else "")
            raise RunError(f"{root} is not empty (it holds {held}). "
                           "Pass --resume to continue the run there, or choose another --out; nothing was changed.")
        changed = []
        for phase in PHASES:
            if (record := self.done(phase)) is not None:
                # Records are re-read through today's loader, so runs written before a setting was
                # added compare by the values they resolve to; one written before its phase depended on a
                # section holds none of it, and is compared on the sections it holds.
                inputs = record.get("inputs") or {}
                try:
                    then = sections(ExperimentConfig.from_raw(inputs), phase)
                except ConfigError as e:  # the record's settings, not the user's config
                    raise ConfigError(f"{self.records.path(phase)}, the record of the finished {phase} phase, "
                                      f"does not load as a config of this ctfgen ({e}); run it with the ctfgen "
                                      "that made it (its commit is in the record), or start a new run with "
                                      "another --out") from None
                now = sections(self.cfg, phase)
                lines = diff_lines({k: v for k, v in then.items() if k in inputs},
                                   {k: v for k, v in now.items() if k in inputs})
                changed += [f"  {phase}: " + "; ".join(lines)] if lines else []
        if changed:
            raise RunError(f"{root} was run with another config for phases that already finished:\n"
                           + "\n".join(changed)
                           + "\nRevert those settings to continue this run, or start a new one with another --out.")


# --- the phases -----------------------------------------------------------------------------------

def tokenizer_phase(x: Experiment):
    t = x.cfg.tokenizer
    if t.pretrained:
        vq = load_tokenizer(t.pretrained).eval()
        x.once("tokenizer", lambda: {"path": str(t.pretrained), "fingerprint": vq.fingerprint})
        return vq

    def work():
        logger.info("training the tokenizer")
        dataset = make_dataset(x.cfg.data, "train", channels=t.model.get("in_channels", 3))
        vq = train_tokenizer(t, dataset, x.run.tokenizer_run, resume=True, device=x.device, progress=x.progress)
        quality, test = None, make_dataset(x.cfg.data, "test", channels=vq.config.in_channels)
        if test is not None and D.is_main():  # usage and PSNR over the whole test split, not a recent window
            quality = evaluate_tokenizer(vq, test, batch_size=int(x.cfg.data.extract_batch_size))
            logger.info(f"tokenizer on the {quality['images']} test images: {quality['codes_used']} of "
                        f"{quality['codebook_size']} codes used ({quality['usage']:.1%}), perplexity "
                        f"{quality['perplexity']:.0f}, PSNR {quality['psnr']:.2f} dB")
        return {"path": str(x.run.tokenizer), "fingerprint": vq.fingerprint, "codebook_usage": vq.codebook_usage(),
                "test_split": quality}

    x.once("tokenizer", work)
    return load_tokenizer(x.run.tokenizer).eval()


def cluster_phase(x: Experiment, vq):
    c = x.cfg.clustering

    def work():
        with D.main_first() as first:
            if first:
                logger.info(f"clustering {vq.config.codebook_size} codewords into {c.num_coarse} ({c.method})")
                CoarseMap.fit(vq, int(c.num_coarse), method=c.method, seed=int(c.seed)).save(x.run.coarse_map)
        return CoarseMap.load(x.run.coarse_map).stats()  # its fingerprint among them

    x.once("cluster", work)
    cmap = CoarseMap.load(x.run.coarse_map)
    cmap.check_codebook(vq)
    return cmap


def extract_phase(x: Experiment, vq) -> None:
    d = x.cfg.data
    splits = {"train": d.augment, "val": "none", "test": "none"}

    def work():
        for split, augment in splits.items():
            out = x.run.codes(split)
            dataset = make_dataset(d, split, channels=vq.config.in_channels, for_codes=True)
            if dataset is None or _valid_codes(out, vq):  # finished before the marker was written
                continue
            logger.info(f"extracting {split} codes ({len(dataset)} images, augment={augment})")
            extract_codes(vq.to(x.device), dataset, out, augment=augment, batch_size=int(d.extract_batch_size),
                          device=x.device, num_workers=int(d.num_workers), dataset_name=f"{d.dataset}:{split}",
                          image_size=image_size(d) if d.dataset == "image_folder" else None,
                          crop_range=TENCROP_RANGE, progress=x.progress)
            vq.cpu()
        return {s: read_header(x.run.codes(s)) for s in splits if x.run.codes(s).is_dir()}

    x.once("extract", work)
    for split in splits:
        if x.run.codes(split).is_dir():
            check_codes(x.run.codes(split), vq)


def _valid_codes(out: Path, vq) -> bool:
    """Whether `out` holds codes of this tokenizer; a stale directory is removed."""
    if out.is_dir():
        try:
            check_codes(out, vq)
        except (MismatchError, CorruptFileError):
            D.barrier()
            if D.is_main():
                shutil.rmtree(out)
    D.barrier()
    return out.is_dir()


def train_phase(x: Experiment, stage: str, cmap):
    s = x.cfg.stage(stage)
    if not s.enabled:
        return None

    def work():
        model_config, info = _matched_model(x, cmap) if stage == "matched" else (s.model, {})
        depth = f", {model_config['n_layer']} layers" if stage == "matched" else ""
        logger.info(f"training {stage} ({s.preset}{depth})")
        model, result = train_stage(
            "baseline" if stage == "matched" else stage, x.run.codes("train"), x.run.stage(stage),
            coarse_map=cmap if stage in ("ar", "aux") else None, preset=s.preset, model=model_config,
            train_config=dataclasses.replace(s.train, progress=x.progress and s.train.progress),
            resume=True, on_epoch_end=x.hooks.get(stage), run_config={"experiment": str(x.run.root)}, desc=stage)
        last = result.history[-1] if result.history else {}
        params = sum(p.numel() for p in model.parameters())
        return {"steps": result.step, "final_loss": last.get("loss"), "params": params, **info}

    x.once(stage, work)
    return load_stage_model(stage, x.run.model(stage))


def _matched_model(x: Experiment, cmap) -> tuple[dict, dict]:
    """The matched baseline's model settings: the baseline's, with the depth that gives CTF's
    parameter count (or the depth the config fixes), and the counts for the record."""
    c = x.cfg
    fixed = ((x.raw.get("matched") or {}).get("model") or {}).get("n_layer")
    match = matched_depth(x.run.codes("train"), cmap, (c.stage1.preset, c.stage1.model), (c.aux.preset, c.aux.model),
                          (c.matched.preset, c.matched.model), n_layer=None if fixed is None else int(fixed))
    logger.info(f"matched baseline: {match['n_layer']} layers, {match['params']:,} parameters, "
                f"{match['ratio']:.3f}x CTF's {match['ctf_params']:,}")
    return {**c.matched.model, "n_layer": match["n_layer"]}, {"match": match}


def card_inputs(x: Experiment, kind: str, heldout: dict | None = None) -> dict:
    """What a pipeline's model card records (ctfgen.utils.hub.write_model_card): the resolved config and
    the metrics the run's phases recorded (tokenizer quality, each model's training, held-out bits)."""
    def pick(record: dict | None, keys: tuple) -> dict:
        return {k: record[k] for k in keys if (record or {}).get(k) is not None}

    metrics = {"tokenizer": pick((x.done("tokenizer") or {}).get("test_split"), ("usage", "perplexity", "psnr")),
               **{s: pick(x.done(s), ("steps", "final_loss", "params", "seconds")) for s in STAGES_OF[kind]},
               "heldout": pick(heldout, ("bits_per_token", "nats_per_image", "exact"))}
    return {"training_config": to_dict(x.cfg), "metrics": {k: v for k, v in metrics.items() if v}}


def assemble_phase(x: Experiment, vq, cmap, ar, aux, base, matched=None) -> None:
    def work():
        with D.main_first() as first:
            if first:
                s = x.cfg.sampling
                pipes = {"ctf": None if ar is None else CTFPipeline(ar, aux, cmap, vq, sampling_defaults=s.ctf),
                         "baseline": None if base is None else ARPipeline(base, vq, sampling_defaults=s.baseline),
                         "matched": None if matched is None else ARPipeline(matched, vq, sampling_defaults=s.baseline)}
                for kind, pipe in pipes.items():
                    if pipe is not None:
                        logger.info(f"assembling {x.run.pipeline_dir(kind)}")
                        publish_dir(lambda d: pipe.save_pretrained(d, **card_inputs(x, kind)), x.run.pipeline_dir(kind))
                _link_top_level(x.run.root, "ctf" if ar is not None else "baseline")
                _write_metrics(x.run)

    x.once("assemble", work)


def heldout_phase(x: Experiment) -> None:
    h = x.cfg.heldout
    if not h.enabled or not x.run.codes("test").is_dir():
        return

    def work():
        names = [m for m in METHODS if all(x.cfg.stage(s).enabled for s in STAGES_OF[m])]
        results = {}
        for name in names:
            pipe = load_pipeline(x.run.pipeline_dir(name)).to(x.device)
            r = heldout_bits_per_token(pipe, x.run.codes("test"), h.limit, int(h.batch_size))
            results[name] = {k: r[k] for k in ("nats_per_image", "bits_per_token", "exact")}
        results.update(images=r["images"], image_tokens=r["image_tokens"])
        if D.is_main():
            atomic_write_json(x.run.heldout, results)
            line = ", ".join(f"{k} {v['bits_per_token']:.4f}" for k, v in results.items() if isinstance(v, dict))
            logger.info(f"held-out bits per token on {results['images']} test images: {line}")
            for name in names:  # the model cards gain the held-out numbers
                write_model_card(x.run.pipeline_dir(name), **card_inputs(x, name, results[name]))
        return results

    x.once("heldout", work)


def _write_metrics(run: RunDir) -> None:
    """RUN/metrics.csv: every training log in one table, with the stage it came from."""
    rows = []
    for stage in ("tokenizer", "ar", "aux", "baseline", "matched"):  # run.stage("tokenizer") is run.tokenizer_run
        if (path := run.stage(stage) / "metrics.csv").is_file():
            with open(path, newline="") as f:
                rows += [{"stage": stage, **r} for r in csv.DictReader(f)]
    atomic_write_csv(run.metrics, list(dict.fromkeys(k for r in rows for k in r)) or ["stage"], rows)


def next_steps(root, ctf: bool = True, baseline: bool = True) -> list[str]:
    """Commands that work on a finished run, as the pipeline prints them at its end."""
    run = RunDir(root)
    model = str(run.ctf if ctf else run.baseline)
    out = shlex.quote(str(run.root / "samples.png"))
    sample = f"ctfgen sample --model {shlex.quote(model)} --class 0 --n 16 --out {out}"
    lines = [sample + (" --compare-baseline --stages" if ctf and baseline else " --stages" if ctf else "")]
    if ctf:
        lines.append(f"ctfgen demo --model {shlex.quote(model)}")
    return lines + [f"in Python: ctfgen.load_pipeline({json.dumps(model)})"]


def _link_top_level(root: Path, sub: str) -> None:
    """Make `root` itself a loadable pipeline: pipeline.json copied, parts linked (relative links,
    so the directory can be moved; copies where the filesystem has no symlinks)."""
    for entry in (root / sub).iterdir():
        target = root / entry.name
        if entry.name == "pipeline.json":  # replaced in one step: DIR never holds a half or no pipeline.json
            atomic_write_bytes(target, entry.read_bytes())
            continue
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.is_dir():
            shutil.rmtree(target)
        try:
            os.symlink(Path(sub) / entry.name, target, target_is_directory=entry.is_dir())
        except OSError:
            if entry.is_dir():
                publish_dir(lambda tmp: shutil.copytree(entry, tmp), target)
            else:
                atomic_write_bytes(target, entry.read_bytes())


# --- the driver ----------------------------------------------------------------------------------

def load_experiment_config(config, out_dir=None, resume: bool = False, overrides=None,
                           dry_run: bool = False) -> tuple[ExperimentConfig, dict]:
    """(resolved config, what was asked for) from a YAML path or a dict; None (with resume) takes
    the run's own input.yaml. `dry_run` shrinks it to two steps of everything (see config.py)."""
    if config is None:
        config = RunDir(out_dir).input_config if out_dir is not None else None
        if not resume:  # even where DIR/input.yaml exists, only --resume may start from it
            raise RunError("no CONFIG given: pass one, or --resume to continue the run in --out from its input.yaml")
        if config is None or not config.is_file():
            raise RunError(f"no config given and no {config} to resume from; pass a CONFIG")
    raw = apply_overrides(config if isinstance(config, dict) else read_yaml(config),
                          (dry_run_overrides() if dry_run else []) + list(overrides or []))
    cfg = ExperimentConfig.from_raw(raw)
    check_experiment(cfg)
    return cfg, raw


def run_experiment(config, out_dir, resume: bool = False, overrides: list[str] | None = None,
                   on_epoch_end: dict[str, Callable] | None = None, progress: bool = True,
                   dry_run: bool = False) -> Path:
    """Python entry point of `ctfgen pipeline`. `on_epoch_end` maps a stage ("ar", "aux",
    "baseline", "matched") to a hook(epoch, model) run after each of its epochs."""
    cfg, raw = load_experiment_config(config, out_dir, resume, overrides, dry_run)
    x = Experiment(cfg, raw, out_dir, resume, on_epoch_end, progress)
    t_all = time.time()
    try:
        x.prepare()
        vq = tokenizer_phase(x)
        cmap = cluster_phase(x, vq)
        extract_phase(x, vq)
        # The baseline before the auxiliary model: stage 1 and the baseline are the like-for-like pair, and
        # the auxiliary model (the largest) is the phase most worth resuming in a later session.
        ar, base, aux = train_phase(x, "ar", cmap), train_phase(x, "baseline", None), train_phase(x, "aux", cmap)
        matched = train_phase(x, "matched", cmap)
        assemble_phase(x, vq, cmap, ar, aux, base, matched)
        heldout_phase(x)
        if D.is_main():
            atomic_write_json(x.run.summary, {"seconds_this_run": round(time.time() - t_all, 2),
                                              "world_size": D.get_world_size(),
                                              "phase_seconds": {p: (x.done(p) or {}).get("seconds") for p in PHASES}})
            logger.info(f"done in {time.time() - t_all:.1f}s. Next:\n" + "\n".join(
                "  " + line for line in next_steps(x.run.root, ctf=ar is not None, baseline=base is not None)))
        D.barrier()
    finally:
        x.lock.release()
    return x.run.root


# --- reading a finished run ------------------------------------------------------------------------

class FinishedRun(RunDir):
    """A finished `ctfgen pipeline` run, read-only, as the reproduction and the study read it (models
    load once). `settings` is its resolved config; `needs` names the parts the caller cannot do without
    ("tokenizer", "ctf", "baseline", "matched", or a code split "train" / "val" / "test"): a run lacking
    one is refused, saying how to make it.

        run = FinishedRun("runs/fashion_mnist", "ctf", "test")
        run.pipeline("ctf"), run.snapshot_pipeline("baseline", 940), run.steps_per_epoch("ar")
    """

    def __init__(self, root, *needs: str):
        super().__init__(Path(root).expanduser())
        self.require(self.config)
        self.settings = ExperimentConfig.from_raw(read_yaml(self.config))  # before `tokenizer`, which reads it
        self.require(*(self.part(n) for n in needs if n != "val"))
        if "val" in needs and not self.part("val").is_file():
            raise RunError(f"{self.codes('val')} is missing: this needs the run's validation split "
                           "(data.validation_images > 0 in its config)")
        self.name = self.root.name

    @property
    def tokenizer(self) -> Path:
        """The tokenizer the run trained, or the one its `tokenizer.pretrained` named (used in place, not copied)."""
        pretrained = self.settings.tokenizer.pretrained
        return Path(pretrained).expanduser() if pretrained else super().tokenizer

    def part(self, name: str) -> Path:
        if name == "tokenizer":  # a saved VQModel, or a LlamaGen checkpoint file that `pretrained` named
            return self.tokenizer if self.tokenizer.is_file() else self.tokenizer / "config.json"
        return self.pipeline_dir(name) / "pipeline.json" if name in METHODS else self.codes(name) / "header.json"

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods whose finished pipeline the run holds."""
        return tuple(m for m in METHODS if self.part(m).is_file())

    @functools.cache
    def load_tokenizer(self):
        return load_tokenizer(self.tokenizer).eval()

    @functools.cache
    def load_coarse_map(self) -> CoarseMap:
        return CoarseMap.load(self.coarse_map)

    @functools.cache
    def pipeline(self, method: str):
        self.require(self.part(method))
        return (CTFPipeline if method == "ctf" else ARPipeline).from_pretrained(self.pipeline_dir(method))

    def snapshot_model(self, stage: str, step: int):
        """`stage`'s model as it was after optimizer step `step` (saved by train.snapshot_every)."""
        path = self.snapshot(stage, step)
        if not path.is_dir():
            raise RunError(f"{path} is missing; the run's {stage} train.snapshot_every must divide {step}")
        return load_stage_model(stage, path)

    def snapshot_pipeline(self, method: str, step: int):
        """`method`'s pipeline from its stages' snapshots at optimizer step `step`, with the sampling
        defaults the run's finished pipelines have (its `sampling` section)."""
        defaults = self.settings.sampling
        if method == "ctf":
            return CTFPipeline(self.snapshot_model("ar", step), self.snapshot_model("aux", step),
                               self.load_coarse_map(), self.load_tokenizer(), sampling_defaults=defaults.ctf)
        return ARPipeline(self.snapshot_model(method, step), self.load_tokenizer(), sampling_defaults=defaults.baseline)

    def steps_per_epoch(self, stage: str) -> float:
        """Optimizer steps in one pass of `stage` over the training codes, as the training loop counts
        them: global micro-batches of batch_size / grad_accum, the incomplete last one dropped."""
        t = self.settings.stage(stage).train
        micro_batches = read_header(self.codes("train"))["num_images"] // (t.batch_size // t.grad_accum)
        return micro_batches / t.grad_accum

    def code_dataset(self, split: str) -> CodeDataset:
        return CodeDataset(self.codes(split), augmentation=0)

    def image_dataset(self, split: str):
        ds = make_dataset(self.settings.data, split, channels=self.load_tokenizer().config.in_channels)
        if ds is None:
            raise RunError(f"{self.root}'s data settings have no {split} split")
        return ds

    def images(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, H, W) images and labels of a Fashion-MNIST split, in the order its codes were extracted."""
        ds = self.image_dataset(split)
        if not isinstance(ds, FashionMNIST):  # an image folder's subset has `indices` too, but no `images`
            raise RunError(f"{self.root} holds image-folder data; these need Fashion-MNIST images")
        return ds.images[ds.indices], ds.labels[ds.indices]
