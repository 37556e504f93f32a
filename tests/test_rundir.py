"""The run directory's writer lock: a second writer is refused naming the first one's PID, and the
lock of a killed writer is taken over. Real processes, a few seconds in all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ctfgen.utils.errors import CorruptFileError, RunError
from ctfgen.utils.rundir import Records, WriterLock

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))

HOLDER = """
import sys, time
from ctfgen.utils.rundir import WriterLock
lock = WriterLock(sys.argv[1], sys.argv[2]).acquire()
print("locked", flush=True)
sys.stdin.read()  # hold until the test closes stdin (or kills us)
"""


def hold_lock(directory: Path, writer: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory), writer], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env=ENV)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_second_writer_is_refused_naming_the_first_pid(tmp_path):
    holder = hold_lock(tmp_path, "pipeline")
    try:
        with pytest.raises(RunError, match=rf"process {holder.pid} on .* is writing into it \(pipeline\)"):
            WriterLock(tmp_path, "pipeline").acquire()
        with WriterLock(tmp_path, "reproduce"):  # another writer's lock on the same directory is its own
            pass
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    with WriterLock(tmp_path, "pipeline"):  # released when the holder exits
        pass


def test_lock_of_a_killed_writer_is_taken_over(tmp_path):
    holder = hold_lock(tmp_path, "train")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    stale = json.loads((tmp_path / ".train.lock").read_text())
    assert stale["pid"] == holder.pid  # the file still names the dead writer ...
    with WriterLock(tmp_path, "train"):  # ... but its lock went with it
        assert json.loads((tmp_path / ".train.lock").read_text())["pid"] == os.getpid()
        with pytest.raises(RunError, match=f"process {os.getpid()} "):
            WriterLock(tmp_path, "train").acquire()  # held: even this process cannot take it twice


def test_pipeline_refuses_a_directory_another_pipeline_writes(tmp_path):
    from ctfgen.experiments.run import run_experiment

    out = tmp_path / "run"
    holder = hold_lock(out, "pipeline")
    try:
        with pytest.raises(RunError, match=f"process {holder.pid} "):
            run_experiment(str(ROOT / "configs" / "tiny.yaml"), out, dry_run=True)
        assert [p.name for p in out.iterdir()] == [".pipeline.lock"]  # nothing was written
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_training_refuses_a_directory_another_training_writes(tmp_path):
    import torch

    from ctfgen.train.loop import train

    holder = hold_lock(tmp_path, "train")
    try:
        model = torch.nn.Linear(2, 1)
        with pytest.raises(RunError, match=f"process {holder.pid} "):
            train(model, lambda m, b: m(b).sum(), torch.zeros(8, 2), {"steps": 1, "batch_size": 4, "progress": False},
                  tmp_path)
        assert not (tmp_path / "metrics.csv").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def _assert_lock_of_another_user_is_refused(tmp_path):
    with pytest.raises(RunError, match=r"cannot open the lock file .*\.pipeline\.lock .*another user's run .*remove"):
        WriterLock(tmp_path, "pipeline").acquire()


@pytest.mark.skipif(os.geteuid() == 0, reason="root opens any file whatever its mode")
def test_lock_file_this_user_cannot_open_is_a_run_error(tmp_path):
    lock = tmp_path / ".pipeline.lock"
    lock.write_text("{}")
    lock.chmod(0o444)  # as another user's 0644 lock is to this one
    _assert_lock_of_another_user_is_refused(tmp_path)


def test_lock_file_this_user_cannot_open_is_a_run_error_even_as_root(tmp_path, monkeypatch):
    lock = tmp_path / ".pipeline.lock"
    real = os.open

    def denied(path, *a, **k):
        if Path(path) == lock:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(os, "open", denied)
    _assert_lock_of_another_user_is_refused(tmp_path)


def test_a_run_directory_that_cannot_be_made_is_a_run_error(tmp_path):
    (tmp_path / "taken").write_text("a file, not a directory")
    with pytest.raises(RunError, match=r"cannot use .*taken as a run directory \(File exists\); choose another"):
        WriterLock(tmp_path / "taken", "pipeline").acquire()
    assert (tmp_path / "taken").read_text() == "a file, not a directory"


@pytest.mark.parametrize("text", ["[1, 2]", "3", "null", '"a"'])
def test_a_record_that_is_json_but_not_an_object_is_a_corrupt_file(tmp_path, text):
    (tmp_path / "r.json").write_text(text)
    with pytest.raises(CorruptFileError, match=r"r\.json holds \w+ JSON, not an object; delete it to compute"):
        Records(tmp_path).read("r")


def test_json_records_are_read_as_utf_8_whatever_the_locale(tmp_path):
    """read_json took the locale's encoding: under an ASCII locale a record holding "é" (a class or run name)
    was called corrupt."""
    (tmp_path / "r.json").write_bytes('{"name": "é"}'.encode())
    env = dict(ENV, LC_ALL="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0")
    code = (f"from ctfgen.utils.fileio import read_json; "
            f"print(read_json({str(tmp_path / 'r.json')!r}, '')['name'] == '\\xe9')")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "True", res.stderr[-2000:]


def test_a_config_is_read_as_utf_8_whatever_the_locale(tmp_path):
    (tmp_path / "c.yaml").write_bytes("name: caf\u00e9\n".encode())
    (tmp_path / "latin.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    env = dict(ENV, LC_ALL="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0")
    code = f"from ctfgen.config import read_yaml; print(read_yaml({str(tmp_path / 'c.yaml')!r})['name'] == 'caf\\xe9')"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "True", res.stderr[-2000:]
    from ctfgen.config import read_yaml
    from ctfgen.utils.errors import ConfigError

    with pytest.raises(ConfigError, match="latin.yaml is not valid YAML"):  # was a UnicodeDecodeError traceback
        read_yaml(tmp_path / "latin.yaml")
