"""Gloo ranks in spawned processes, for tests of what ranks do to one another (a hang, a skipped
barrier, one rank's error): `run_ranks(worker, ...)` starts `worker(rank, port, ...)` on each."""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, port: int, timeout_s: float, world: int = 2) -> None:
    """In a worker: join the group with a short timeout, so that a rank left waiting fails its test in
    seconds rather than in the library's 30 minutes."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))


def run_ranks(worker, *args, world: int = 2, timeout: float = 120) -> None:
    """`worker(rank, port, *args)` on `world` spawned ranks, each waited for up to `timeout` seconds and
    killed after. Exit codes are not judged (gloo now and then aborts at exit): each worker saves what
    it did, and a rank killed or aborted early shows as its missing result."""
    port = free_port()
    procs = [mp.get_context("spawn").Process(target=worker, args=(rank, port, *args)) for rank in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
        if p.is_alive():
            p.kill()
