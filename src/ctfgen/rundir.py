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
    RUN/.<writer>.lock               who is writing (see `WriterLock`)
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ctfgen.errors import RunError

MODEL_DIR = "model"          # a trained stage's finished model, in save_pretrained form


class WriterLock:
    """One writer per directory: `DIR/.<writer>.lock` holds the PID and host of the process writing.

    The lock is an flock on that file, which the kernel drops the moment its holder exits or is
    killed, so a lock left by a killed run is stale by construction and the next writer simply takes
    it (no PID guessing, no race between two newcomers). A second live writer stops with a RunError
    naming the first one's PID and host. `writer` names what writes ("pipeline", "train", ...), so
    writers of disjoint parts of one directory (the reproduction's ablations beside a running
    pipeline) do not exclude each other.

        with WriterLock(run_dir, "pipeline"):
            ...
    """

    def __init__(self, directory: str | os.PathLike, writer: str = "run", hold: bool = True):
        self.directory, self.writer, self.hold = Path(directory), writer, hold  # hold=False: a no-op (other ranks)
        self.path = self.directory / f".{writer}.lock"
        self.fd: int | None = None

    def acquire(self) -> "WriterLock":
        if not self.hold:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunError(f"{self.directory} is in use: process {self.holder()} is writing into it ({self.writer}). "
                           "Wait for it to finish or stop it; nothing was changed. (A lock left by a killed "
                           "process is taken over by the next run on its own.)") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self.fd = fd
        return self

    def holder(self) -> str:
        """"PID on HOST (since ...)" of the process holding the lock, as its file says."""
        for _ in range(20):  # the holder writes its name just after taking the lock
            try:
                info = json.loads(self.path.read_text())
                return f"{info['pid']} on {info['host']} (since {info['since']})"
            except (OSError, ValueError, KeyError):
                time.sleep(0.05)
        return f"(unknown PID; see {self.path})"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # drops the flock; the file stays, naming the last writer
            self.fd = None

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    __del__ = release


def is_lock_file(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(".lock")


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
