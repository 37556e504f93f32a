"""Training checkpoints that survive being killed at any moment.

A checkpoint is one `torch.save` file holding everything needed to continue a run exactly:
model and EMA weights, optimizer and scheduler state, step/epoch/data position, the Python,
NumPy and torch RNG states, and the resolved config. It is written to a temporary file in the
same directory, fsynced, and renamed over its final name, so a reader only ever sees a complete
file (the rename is atomic on POSIX filesystems). Files are named `ckpt-<step>.pt`; the newest
`keep` are kept, so the last good checkpoint is never the one being written.

Everything stored is a tensor or a plain Python value, so `torch.load(weights_only=True)` can
read it back: no pickled code ever runs when resuming.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from ctfgen.utils import distributed as D
from ctfgen.utils.errors import CheckpointError
from ctfgen.utils.fileio import atomic_torch_save

CKPT_PATTERN = re.compile(r"^ckpt-(\d+)\.pt$")
CHECKPOINT_FORMAT = 1


def checkpoint_path(ckpt_dir: str | os.PathLike, step: int) -> Path:
    return Path(ckpt_dir) / f"ckpt-{step:08d}.pt"


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every finished checkpoint in `ckpt_dir`, oldest first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = CKPT_PATTERN.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint in `ckpt_dir`, or None. Temporary files never match the pattern."""
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def save_checkpoint(state: dict, ckpt_dir: str | os.PathLike, step: int, keep: int = 2) -> Path:
    """Write `state` as `ckpt_dir/ckpt-<step>.pt` atomically and prune all but the newest `keep`."""
    path = atomic_torch_save(state, checkpoint_path(ckpt_dir, step))
    if keep > 0:
        for _, old in list_checkpoints(ckpt_dir)[:-keep]:
            try:
                old.unlink()
            except OSError:
                pass
    # Leftovers of a save that was killed mid-write: never readable, safe to drop.
    for p in Path(ckpt_dir).glob(".ckpt-*.tmp"):
        try:
            p.unlink()
        except OSError:
            pass
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by `save_checkpoint` (weights_only: plain data and tensors only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the path and what to do
        raise CheckpointError(
            f"could not read checkpoint {path}: {e}\n"
            "Delete this file to resume from the previous checkpoint, or start again without --resume."
        ) from e


def load_latest_checkpoint(ckpt_dir: str | os.PathLike, map_location="cpu") -> tuple[dict, Path] | None:
    """Newest readable checkpoint in `ckpt_dir` (falling back to older ones), or None if there is none."""
    errors = []
    for _, path in reversed(list_checkpoints(ckpt_dir)):
        try:
            return load_checkpoint(path, map_location), path
        except CheckpointError as e:
            errors.append(str(e))
    if errors:
        raise CheckpointError("no readable checkpoint in " + str(ckpt_dir) + ":\n" + "\n".join(errors))
    return None


# --- RNG state as weights_only-safe values -----------------------------------------------

def get_rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) RNG states as tensors and plain values."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state({
        "bit_generator": npst["bit_generator"],
        "state": {"key": npst["key"].numpy().astype(np.uint32), "pos": npst["pos"]},
        "has_gauss": npst["has_gauss"],
        "gauss": npst["gauss"],
    })
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu(), torch.cuda.current_device())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def gather_rng() -> list:
    """Every rank's RNG state, on every rank (collective)."""
    return D.all_gather_object(get_rng_state())
