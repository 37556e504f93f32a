"""Run directories: their layout (`RunDir`), their writer lock (`WriterLock`) and the JSON records
computed once in them (`Records`).

    RUN/config.yaml                  the resolved config; RUN/input.yaml what was asked for
    RUN/phases/<phase>.json          a finished pipeline phase (what `--resume` skips)
    RUN/runs/tokenizer/              tokenizer training: checkpoints/, metrics.csv, tokenizer/ (the model)
    RUN/runs/coarse_map.safetensors  the CoarseMap
    RUN/codes/{train,val,test}/      extracted codes
    RUN/runs/{ar,aux,baseline,matched}/   stage training: checkpoints/, metrics.csv, snapshots/, model/
    RUN/ctf/, RUN/baseline/, RUN/matched/   the finished pipelines (RUN itself links to ctf/); matched:
                                     the parameter-matched baseline, when the config enables it
    RUN/heldout.json, summary.json, metrics.csv
    RUN/ablations/<name>/, RUN/eval/<group>/<name>.json, RUN/results.{md,json}   (`ctfgen reproduce`)
    RUN/.<writer>.lock               who is writing (see `WriterLock`)
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable

from ctfgen.utils.errors import RunError
from ctfgen.utils.fileio import atomic_write_json, read_json
from ctfgen.utils.fingerprint import code_commit

MODEL_DIR = "model"          # a trained stage's finished model, in save_pretrained form


class WriterLock:
    """One writer per directory (`with WriterLock(run_dir, "pipeline"): ...`): an flock on
    `DIR/.<writer>.lock`, a file naming the writing process's PID and host. The kernel drops the flock
    the moment its holder exits or is killed, so a killed run's lock is taken over by the next writer;
    a second live writer stops with a RunError naming the first. Writers of disjoint parts of one
    directory (the reproduction's ablations beside a running pipeline) have their own `writer` name
    and do not exclude each other. `hold=False` (the other ranks) makes the lock a no-op."""

    def __init__(self, directory: str | os.PathLike, writer: str, hold: bool = True):
        self.directory, self.writer, self.hold = Path(directory), writer, hold
        self.path = self.directory / f".{writer}.lock"
        self.fd: int | None = None

    def acquire(self) -> "WriterLock":
        if not self.hold:
            return self
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a file of that name, a read-only parent
            raise RunError(f"cannot use {self.directory} as a run directory ({e.strerror}); choose another "
                           "directory") from None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError as e:
            raise RunError(f"cannot open the lock file {self.path} ({e.strerror}): another user's run holds or held "
                           f"it; if no run is writing into {self.directory}, remove the file (or have its owner "
                           "remove it) and run again") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunError(f"{self.directory} is in use: process {self._holder()} is writing into it ({self.writer}). "
                           "Wait for it to finish or stop it; nothing was changed. (A lock left by a killed "
                           "process is taken over by the next run on its own.)") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self.fd = fd
        return self

    def _holder(self) -> str:
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

    # the experiment
    config = property(lambda self: self.root / "config.yaml")
    input_config = property(lambda self: self.root / "input.yaml")
    phases = property(lambda self: self.root / "phases")
    tokenizer_run = property(lambda self: self.root / "runs" / "tokenizer")
    tokenizer = property(lambda self: self.root / "runs" / "tokenizer" / "tokenizer")
    coarse_map = property(lambda self: self.root / "runs" / "coarse_map.safetensors")
    ctf = property(lambda self: self.root / "ctf")
    baseline = property(lambda self: self.root / "baseline")
    matched = property(lambda self: self.root / "matched")
    heldout = property(lambda self: self.root / "heldout.json")
    summary = property(lambda self: self.root / "summary.json")
    metrics = property(lambda self: self.root / "metrics.csv")

    def pipeline_dir(self, method: str) -> Path:
        return {"ctf": self.ctf, "baseline": self.baseline, "matched": self.matched}[method]

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

    def evaluations(self, group: str) -> Path:
        return self.root / "eval" / group

    results_md = property(lambda self: self.root / "results.md")
    results_json = property(lambda self: self.root / "results.json")
    quality_plot = property(lambda self: self.root / "quality_vs_epoch.png")

    def require(self, *paths: Path) -> None:
        """Refuse a run that lacks what the caller needs, saying how to make it."""
        for p in paths:
            if not Path(p).exists():
                raise RunError(f"{p} is missing: run (or --resume) the experiment first "
                               f"(ctfgen pipeline CONFIG --out {self.root})")


def diff_lines(old, new, prefix: str = "") -> list[str]:
    """"key.sub: OLD then, NEW now" for every leaf on which two nested dicts differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for k in sorted(set(old) | set(new)) for line in diff_lines(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} then, {new!r} now"]


def plain(obj):
    """`obj` as it reads back from JSON (tuples become lists, other values strings)."""
    return json.loads(json.dumps(obj, default=str))


class Records:
    """DIR/<name>.json, each computed once from what shaped it (`inputs`: settings, model fingerprints)
    and stored with them and the code's commit. `once` reuses a record only when both are unchanged,
    else refuses naming every difference (so an old answer never stands in for a new question), or
    with `force=True` computes it again.

        records = Records(out / "eval")
        record = records.once("ctf", {"seed": 0, "models": fingerprints}, lambda: {"metrics": ...})
    """

    def __init__(self, directory: str | os.PathLike, force: bool = False, write: bool = True,
                 say: Callable[[str], None] | None = None):
        self.dir, self.force, self.write, self.say = Path(directory), force, write, say

    @functools.cached_property
    def commit(self) -> str:  # asked of git only when a record is made or compared, not when one is read
        return code_commit()

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def read(self, name: str) -> dict | None:
        path = self.path(name)
        return read_json(path, "delete it to compute the record again") if path.is_file() else None

    def once(self, name: str, inputs: dict, compute: Callable[[], dict]) -> dict:
        """The record `name`: the stored one when it was computed from `inputs` by this code, else
        `compute()` (a dict of results) stored with them. `write=False` (other ranks) only computes."""
        if (record := self.read(name)) is not None:
            changed = diff_lines({"inputs": record.get("inputs"), "commit": record.get("commit")},
                                 {"inputs": plain(inputs), "commit": self.commit})
            if not changed:
                return record
            if not self.force:
                raise RunError(f"{self.path(name)} was computed from other inputs than today's:\n  " + "\n  ".join(changed)
                               + "\nRun it with what made it (the same settings and models, that commit's pinned install), "
                                 "or pass --force to compute it again.")
        if self.say is not None:
            self.say(f"{self.dir.name}/{name}")
        t0 = time.perf_counter()
        record = {"name": name, "inputs": plain(inputs), "commit": self.commit, **compute(),
                  "seconds": round(time.perf_counter() - t0, 2), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        if self.write:
            atomic_write_json(self.path(name), record)
        return record

    def cited(self, name: str, inputs: dict, missing: str) -> dict:
        """The stored record `name`, which another computation builds on but never makes (a reference
        run's record): refused when it is missing (`missing` says how to make it) or was computed from
        other `inputs`. The commit may differ: the record names its own."""
        record = self.read(name)
        if record is None:
            raise RunError(f"{self.path(name)} is missing: {missing}")
        changed = diff_lines(record.get("inputs"), plain(inputs), "inputs.")
        if changed:
            raise RunError(f"{self.path(name)} was computed from other inputs than today's ({'; '.join(changed)}): "
                           f"{missing}")
        return record
