"""One process or many: the same code runs alone or under `torchrun`.

`init_distributed()` starts a process group from torchrun's environment (NCCL with CUDA, gloo on
CPU); without it every helper answers as a single process (rank 0 of 1), so callers never branch
on "distributed or not". `wrap_model` puts a model in DDP, or FSDP (FSDP2 `fully_shard`, one unit
per transformer block) for the large presets where a full replica per GPU stops making sense.
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP

from ctfgen.utils.errors import ConfigError, RunError
from ctfgen.utils.hub import check_state_dict

# GPT-L (24 x 1024, ~343M) and larger are sharded; LlamaGen trains those with FSDP too.
FSDP_MIN_PARAMS = 300_000_000


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return get_rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(cuda: bool | None = None) -> torch.device:
    """Start the process group if torchrun launched us (once); return the device this rank should use.
    `cuda=False`: the ranks work off CUDA though it is there (e.g. `--device cpu`), so the group is gloo's
    and the answer the CPU; default: CUDA when available."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if launched_by_torchrun() and not is_distributed():
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return default_device() if cuda else torch.device("cpu")


def rank_device(device=None) -> torch.device:
    """Join torchrun's group (if it started us) for the device asked for, and return the one this rank
    works on: its own GPU for "cuda" (or for None where CUDA is), otherwise `device` as given, so that
    `--device cpu` on a CUDA machine works on the CPU in a gloo group."""
    asked = torch.device(device) if device is not None else None
    own = init_distributed(cuda=None if asked is None else asked.type == "cuda")
    return own if asked is None or (asked.type == "cuda" and is_distributed()) else asked


def default_device() -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    index = int(os.environ.get("LOCAL_RANK", 0)) if is_distributed() else torch.cuda.current_device()
    return torch.device("cuda", index)


def barrier() -> None:
    if is_distributed():
        dist.barrier(**({"device_ids": [torch.cuda.current_device()]} if dist.get_backend() == "nccl" else {}))


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's values of `t`, in place on every rank."""
    if is_distributed():
        dist.broadcast(t, src=0)
    return t


def gather_object(obj) -> list | None:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
    if not is_distributed():
        return [obj]
    out = [None] * get_world_size() if is_main() else None
    dist.gather_object(obj, out)
    return out


def broadcast_object(obj):
    """Rank 0's value of a picklable object, on every rank."""
    box = [obj]
    if is_distributed():
        dist.broadcast_object_list(box)
    return box[0]


@contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. writes a file), the others after it is done. Rank 0 tells
    the others whether it succeeded, so that they fail too instead of waiting in a barrier forever."""
    if not is_main():
        if not broadcast_object(None):
            raise RunError("rank 0 failed in a rank-0-only step; see its error above")
        yield False
        return
    try:
        yield True
    except BaseException:
        broadcast_object(False)
        raise
    broadcast_object(True)


def wrap_model(model: nn.Module, device: torch.device, fsdp: bool | str = "auto") -> nn.Module:
    """DDP or FSDP when distributed, the model itself otherwise. Model must already be on `device`.
    `fsdp=True/False` forces sharding or not; "auto" shards models of GPT-L size and up."""
    if isinstance(fsdp, str) and fsdp != "auto":
        raise ConfigError(f"train.fsdp must be true, false or 'auto', got {fsdp!r}")
    if not is_distributed():
        return model
    if (sum(p.numel() for p in model.parameters()) >= FSDP_MIN_PARAMS) if fsdp == "auto" else bool(fsdp):
        # One unit per transformer block (the elements of the model's ModuleLists) keeps the peak
        # memory at one block's full parameters.
        for block in [b for m in model.modules() if isinstance(m, nn.ModuleList) for b in m]:
            fully_shard(block)
        fully_shard(model)
        return model
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)  # output on that device too


def is_fsdp(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def unsharded_class(model: nn.Module) -> type:
    """The user's class of a model that fully_shard turned into its subclass FSDP<Cls>."""
    return next(c for c in type(model).__mro__ if issubclass(c, nn.Module) and not issubclass(c, FSDPModule))


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP (FSDP2 shards in place, so it is the module itself)."""
    return model.module if isinstance(model, DDP) else model


# --- model and optimizer state (plain, DDP and FSDP alike) --------------------------------

def full_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `ref` (sharded the same way when `ref` is an FSDP DTensor)."""
    full = full.to(ref.device, ref.dtype)
    return distribute_tensor(full, ref.device_mesh, ref.placements) if hasattr(ref, "device_mesh") else full


def model_state(model: nn.Module, every_rank: bool = True) -> dict:
    """Full (unsharded) CPU state dict. Collective under FSDP; with `every_rank=False` only rank 0
    receives it (the others get {}), which is all a checkpoint needs."""
    if is_fsdp(model):
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=not every_rank))
        return {k: v.detach().cpu() for k, v in sd.items()}
    return {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}


def load_model_state(model: nn.Module, sd: dict, source: str) -> None:
    check_state_dict(unwrap(model).state_dict(), sd, source=source)  # all names and (full: DTensor's) shapes first
    if is_fsdp(model):
        set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True))
    else:
        unwrap(model).load_state_dict(sd)


def optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    if is_fsdp(model):
        return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return opt.state_dict()


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, sd: dict) -> None:
    if is_fsdp(model):
        set_optimizer_state_dict(model, opt, sd, options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(sd)
