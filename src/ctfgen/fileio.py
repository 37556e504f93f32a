"""Small durable-file helpers shared by checkpoints, code directories and the tokenizer trainer."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory, so a rename inside it is durable; a no-op where that is not possible."""
    # The rename is durable only once the directory entry itself reaches the disk.
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
