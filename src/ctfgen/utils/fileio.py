"""Files that appear whole or not at all: every writer in ctfgen goes through these helpers.

Each writes to a temporary name in the same directory, fsyncs, and renames over the final name
(atomic on POSIX), so a reader, or a run killed at any moment, never sees half a file. `read_json`
is their reader: a file damaged some other way is a CorruptFileError naming it, not a traceback.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import socket
import stat
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import safetensors.torch
import torch

from ctfgen.utils.errors import CorruptFileError


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)  # read-only is enough for fsync, and a read-only file (a copy) opens so too
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory, so a rename inside it is durable; a no-op where that is not possible."""
    try:
        fd = os.open(Path(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside `path`; renamed over `path` when the block ends without an error,
    removed when it fails. `suffix` lets writers that insist on an extension (np.savez) keep it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{suffix}")
        try:
            # Not tempfile.mkstemp: its files are 0600 whatever the umask, and the rename keeps that, so
            # models and results would be unreadable to the group of a shared machine. This is open()'s mode.
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: str | os.PathLike, remedy: str) -> dict:
    """The JSON object in `path` (every file ctfgen writes holds one); anything else is a
    CorruptFileError that says `remedy`."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))  # JSON is UTF-8, whatever the locale
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path} is not valid JSON ({e}); {remedy}") from None
    if not isinstance(data, dict):
        raise CorruptFileError(f"{path} holds {type(data).__name__} JSON, not an object; {remedy}")
    return data


def atomic_save(save: Callable[[Path], Any], path: str | os.PathLike) -> Path:
    """`save(tmp)` for a writer that takes a path (torch.save, safetensors, PIL, matplotlib, np.savez),
    made atomic. The temporary name keeps `path`'s suffix, from which such writers pick the format."""
    path = Path(path)
    with atomic_path(path, suffix=path.suffix or ".tmp") as tmp:
        save(tmp)
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_save(lambda tmp: torch.save(obj, tmp), path)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None) -> Path:
    """`tensors` as a .safetensors file, atomically, its metadata keys in sorted order. The library
    writes them in a random order, so the same tensors saved twice would make files (and directory
    fingerprints) that differ, and a record made from the one would refuse the other."""
    data = safetensors.torch.save(tensors, metadata=metadata)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # as the library pads it, so the tensors' data stays aligned
    return atomic_write_bytes(path, len(text).to_bytes(8, "little") + text + data[8 + n:])


def atomic_write_csv(path: str | os.PathLike, columns: list[str], rows: Iterable[dict]) -> Path:
    """A CSV table with a header; keys missing from a row are left empty."""
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=columns, restval="")
    w.writeheader()
    w.writerows(rows)
    return atomic_write_text(path, out.getvalue())


def append_csv_row(path: str | os.PathLike, columns: list[str], row: dict) -> None:
    """One more row of a CSV table written by `atomic_write_csv` (a log growing line by line; a
    reader sees whole lines, and a killed writer loses at most the row being written). A write that
    fails part-way (a full disk) is cut back off: the head of a row left behind would be read back,
    by a resumed run, as a row of its own."""
    out = io.StringIO()
    csv.DictWriter(out, fieldnames=columns, restval="").writerow(row)
    data = memoryview(out.getvalue().encode())
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            while data:
                data = data[os.write(fd, data):]
        except BaseException:
            os.ftruncate(fd, end)
            raise
    finally:
        os.close(fd)


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Rename the finished directory `tmp` to `final`. A `final` already there is first moved aside
    (and put back if the rename fails), then removed. A process killed between the two renames leaves
    no `final`: the old version is then the hidden `.NAME.old-*` beside it (os.replace cannot put a
    directory over a non-empty one in one step)."""
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}") if os.path.lexists(final) else None
    if old is not None:
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except OSError:
        if old is not None:
            os.replace(old, final)  # else no version would be in place
        raise
    fsync_dir(final.parent)
    if old is not None:
        _remove(old)
    return final


def _remove(path: Path) -> None:
    """Delete what `path` names, quietly: rmtree refuses a link or a file, and its ignore_errors would
    leave them; a link is removed, not the folder it points to."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def temporary_prefix(final: Path, kind: str) -> str:
    """How the names of `final`'s temporary siblings made on this host begin; the writer's process id follows,
    so that `remove_stale_temporaries` can tell a killed writer's from a live one's."""
    return f".{final.name}.{kind}-{socket.gethostname()}-"


def remove_stale_temporaries(final: Path, kind: str) -> None:
    """Delete `final`'s temporary siblings (named after `temporary_prefix`) whose writer on this host is no
    longer running: a killed writer leaves its copy, full size, and no one else would remove it."""
    prefix = temporary_prefix(final, kind)
    for p in final.parent.iterdir():  # not glob: a name holding [ or * would be taken for a pattern
        if not p.name.startswith(prefix):
            continue
        try:
            pid = int(p.name[len(prefix):].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            _remove(p)
        except (ValueError, OSError):  # not our naming, or a live process we may not signal
            continue


def _fsync_tree(root: Path) -> None:
    """fsync every regular file and every folder under `root` (links are not followed)."""
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                fsync_file(path)
        fsync_dir(folder)


def publish_dir(write: Callable[[Path], Any], final: str | os.PathLike) -> Path:
    """Let `write(tmp_dir)` fill a directory under a temporary name, then rename it into place
    (replacing a stale one). A `write` that fails leaves nothing behind, and what a killed one left
    is removed by the next publish of `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final, "tmp")
    tmp = final.with_name(f"{temporary_prefix(final, 'tmp')}{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        write(tmp)
        # Writers that do not sync (shutil.copytree, huggingface_hub's model card) would otherwise have
        # the rename reach the disk before their bytes: after a crash, a published folder of empty files.
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # named by this PID: no later run would ever remove it
        raise
    return replace_dir(tmp, final)
