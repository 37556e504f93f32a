"""Training checkpoints that survive being killed at any moment.

A checkpoint is one `torch.save` file holding everything needed to continue a run exactly (model,
EMA, optimizer and scheduler state, data position, the Python, NumPy and torch RNG states, the
resolved config), written atomically (a temporary file beside it, fsynced, renamed) as
`ckpt-<step>.pt`; the newest `keep` are kept, so the last good checkpoint is never the one being
written. Everything stored is a tensor or a plain Python value, so `torch.load(weights_only=True)`
reads it back: no pickled code ever runs when resuming.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from ctfgen.utils.errors import CheckpointError
from ctfgen.utils.fileio import atomic_torch_save

CKPT_PATTERN = re.compile(r"^ckpt-(\d+)\.pt$")
CHECKPOINT_FORMAT = 1


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every finished checkpoint in `ckpt_dir`, oldest first (temporaries never match)."""
    d = Path(ckpt_dir)
    return sorted((int(m.group(1)), p) for p in (d.iterdir() if d.is_dir() else ())
                  if (m := CKPT_PATTERN.match(p.name)) and p.is_file())


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def save_checkpoint(state: dict, ckpt_dir: str | os.PathLike, step: int, keep: int = 2) -> Path:
    """Write `state` as `ckpt_dir/ckpt-<step>.pt` atomically and prune all but the newest `keep`."""
    path = atomic_torch_save(state, Path(ckpt_dir) / f"ckpt-{step:08d}.pt")
    # Counted back from this one: a later-numbered checkpoint is one a resume could not read and fell
    # back from, and the newest `keep` by number could leave it in place of the one just written.
    older = [p for s, p in list_checkpoints(ckpt_dir) if s < step]
    # max(0, ...): a negative end would slice from the back and delete checkpoints while fewer than `keep` exist.
    stale = older[:max(0, len(older) - (keep - 1))] if keep > 0 else []
    for p in stale + list(Path(ckpt_dir).glob(".ckpt-*")):  # hidden: leftovers of saves killed mid-write
        with contextlib.suppress(OSError):
            p.unlink()
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by `save_checkpoint` (weights_only: plain data and tensors only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the path and what to do
        raise CheckpointError(f"could not read checkpoint {path}: {e}\nDelete this file to resume from the previous "
                              "checkpoint, or start again without --resume.") from e


def load_latest_checkpoint(ckpt_dir: str | os.PathLike, map_location="cpu") -> tuple[dict, Path] | None:
    """Newest readable checkpoint in `ckpt_dir` (falling back to older ones), or None if there is none."""
    errors = []
    for _, path in reversed(list_checkpoints(ckpt_dir)):
        try:
            return load_checkpoint(path, map_location), path
        except CheckpointError as e:
            errors.append(str(e))
    if errors:
        raise CheckpointError(f"no readable checkpoint in {ckpt_dir}:\n" + "\n".join(errors))
    return None


# --- RNG state as weights_only-safe values -----------------------------------------------

def get_rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) RNG states as tensors and plain values."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = {"python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
             "numpy": {"bit_generator": np_state["bit_generator"],
                       "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                       "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                       "gauss": float(np_state["gauss"])},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state: dict) -> None:
    py, npst = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    np.random.set_state({"bit_generator": npst["bit_generator"], "has_gauss": npst["has_gauss"], "gauss": npst["gauss"],
                         "state": {"key": npst["key"].numpy().astype(np.uint32), "pos": npst["pos"]}})
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu(), torch.cuda.current_device())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def settings_kept(optimizer: torch.optim.Optimizer):
    """Around an optimizer state load: put back the lr, betas and weight decay its param groups had before.
    Loading restores the ones saved with the state, and a resume trains with those asked for now (a lower
    lr after a NaN, as its message advises)."""
    kept = [{k: g[k] for k in ("lr", "betas", "weight_decay") if k in g} for g in optimizer.param_groups]
    yield
    for group, values in zip(optimizer.param_groups, kept):
        group.update(values)
