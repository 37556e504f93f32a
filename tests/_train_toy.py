"""A toy model and a runnable training script for the training-loop tests (single process,
torchrun, or a subprocess that a test kills). Not collected by pytest (no test_ prefix)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

SRC = Path(__file__).resolve().parents[1] / "src"


class Toy(nn.Module):
    def __init__(self, dropout: float = 0.2):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 2)])
        self.norm = nn.LayerNorm(32)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        h = torch.relu(self.layers[0](x))
        h = self.drop(self.norm(torch.relu(self.layers[1](h))))
        return self.layers[2](h)


class SnapshotToy(Toy):
    """The toy with what the loop's snapshots need: a `config` it is rebuilt from (an unsharded copy
    under FSDP is `SnapshotToy(model.config)`), and save_pretrained."""

    def __init__(self, dropout: float = 0.2):
        super().__init__(dropout)
        self.config = dropout

    def save_pretrained(self, directory):
        from safetensors.torch import save_file

        Path(directory).mkdir(parents=True, exist_ok=True)  # publish_dir hands a path that does not exist yet
        save_file(self.state_dict(), str(Path(directory) / "model.safetensors"))


def toy_dataset(n: int = 96) -> TensorDataset:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, :4].sum(1) > x[:, 4:].sum(1)).long()
    return TensorDataset(x, y)


def toy_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def main(argv=None):
    sys.path.insert(0, str(SRC))
    from ctfgen.app.cli import log_progress
    from ctfgen.utils import distributed as D
    from ctfgen.train.loop import train

    log_progress()  # the loop's progress lines ("resumed from ...") on stderr, as the CLI shows them

    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--checkpoint-every", type=int, default=5)
    p.add_argument("--snapshot-every", type=int, default=0)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--ema", action="store_true")
    p.add_argument("--sleep", type=float, default=0.0, help="seconds per step, to give a test time to kill us")
    p.add_argument("--schedule", default="cosine")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--result", default=None, help="write final weights here (rank suffix added)")
    a = p.parse_args(argv)

    D.init_distributed()

    def loss_fn(model, batch):
        if a.sleep:
            time.sleep(a.sleep)
        return toy_loss(model, batch)

    cfg = dict(steps=a.steps, batch_size=a.batch_size, grad_accum=a.grad_accum, lr=3e-3, mixed_precision="none",
               checkpoint_every=a.checkpoint_every, log_every=1, ema=a.ema, ema_decay=0.9, fsdp=a.fsdp,
               schedule=a.schedule, warmup_steps=3, progress=False, snapshot_every=a.snapshot_every)
    torch.manual_seed(0)  # the same initial weights in every run of this script
    res = train(SnapshotToy(a.dropout), loss_fn, toy_dataset(), cfg, a.out, resume=a.resume)
    if a.result:
        torch.save({"model": res.state_dict, "ema": res.ema_state_dict, "step": res.step},
                   f"{a.result}.rank{D.get_rank()}")
    D.cleanup()


if __name__ == "__main__":
    main()
