"""The layout of a `ctfgen pipeline` run directory, in one place.

    RUN/config.yaml                  the resolved config; RUN/input.yaml what was asked for
    RUN/steps/<step>.json            a finished step (what `--resume` skips)
    RUN/runs/tokenizer/              tokenizer training: checkpoints/, metrics.csv, tokenizer/ (the model)
    RUN/runs/coarse_map.safetensors  the CoarseMap
    RUN/codes/{train,test}/          extracted codes
    RUN/runs/{ar,aux,baseline,matched}/   stage training: checkpoints/, metrics.csv, snapshots/, model/
    RUN/ctf/, RUN/baseline/, RUN/matched/   the finished pipelines (RUN itself links to ctf/); matched:
                                     the parameter-matched baseline, when the config enables it
    RUN/heldout.json, summary.json, metrics.csv
    RUN/ablations/<name>/, RUN/eval/<group>/<name>.json, RUN/results.{md,json}   (`ctfgen reproduce`)
"""

from __future__ import annotations

import os
from pathlib import Path

from ctfgen.errors import RunError

MODEL_DIR = "model"          # a trained stage's finished model, in save_pretrained form


class RunDir:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def __truediv__(self, other) -> Path:
        return self.root / other

    # the experiment
    config = property(lambda self: self.root / "config.yaml")
    input_config = property(lambda self: self.root / "input.yaml")
    steps = property(lambda self: self.root / "steps")
    tokenizer_run = property(lambda self: self.root / "runs" / "tokenizer")
    tokenizer = property(lambda self: self.root / "runs" / "tokenizer" / "tokenizer")
    coarse_map = property(lambda self: self.root / "runs" / "coarse_map.safetensors")
    ctf = property(lambda self: self.root / "ctf")
    baseline = property(lambda self: self.root / "baseline")
    matched = property(lambda self: self.root / "matched")
    heldout = property(lambda self: self.root / "heldout.json")
    summary = property(lambda self: self.root / "summary.json")
    metrics = property(lambda self: self.root / "metrics.csv")

    def marker(self, step: str) -> Path:
        return self.steps / f"{step}.json"

    def codes(self, split: str) -> Path:
        return self.root / "codes" / split

    def stage(self, stage: str) -> Path:
        return self.root / "runs" / stage

    def model(self, stage: str) -> Path:
        return self.stage(stage) / MODEL_DIR

    def snapshot(self, stage: str, step: int) -> Path:
        return self.stage(stage) / "snapshots" / f"step-{step:06d}"

    def snapshot_steps(self, stage: str) -> list[int]:
        return sorted(int(p.name.split("-")[1]) for p in (self.stage(stage) / "snapshots").glob("step-*"))

    # the reproduction
    def ablation(self, name: str) -> Path:
        return self.root / "ablations" / name

    def eval_record(self, group: str, name: str) -> Path:
        return self.root / "eval" / group / f"{name}.json"

    results_md = property(lambda self: self.root / "results.md")
    results_json = property(lambda self: self.root / "results.json")
    quality_plot = property(lambda self: self.root / "quality_vs_epoch.png")

    def require(self, *paths: Path) -> None:
        """Refuse a run that lacks what the caller needs, saying how to make it."""
        for p in paths:
            if not Path(p).exists():
                raise RunError(f"{p} is missing: run (or --resume) the experiment first "
                               f"(ctfgen pipeline CONFIG --out {self.root})")
