"""CPU threads for sampling on a machine that other processes may share.

Decoding is a few hundred small steps, each a chain of small parallel regions (one per matrix
multiply). With torch's default, one OpenMP thread per core, every region waits for its slowest
thread; when another process holds a core, that thread runs only when the scheduler lets it, and
OpenMP's spinning waiters take time from the very process they wait for. docs/performance.md
measures it: a decode step can slow down tens of times. Two choices keep sampling fast:

- **A short spin, then sleep.** OpenMP threads that wait at a barrier spin before they sleep. Spinning
  long (libgomp's default, 300000 spins) stalls sampling when another process holds a core; never
  spinning (`OMP_WAIT_POLICY=PASSIVE`) makes every parallel region of a quiet machine pay a wake-up
  (GPT-B's bf16 decode step: 50.7 ms against 42.5 with the short spin, docs/performance.md). `GOMP_SPINCOUNT=3000` spins
  through the microseconds between a step's back-to-back regions and then yields. It must be in the
  environment before torch loads OpenMP, so the `ctfgen` command sets it first thing
  (`prefer_short_spin`), unless the user set a wait policy or a spin count.
- **No more threads than free cores, and one for a small model.** `sampling_threads` counts the
  cores this process may run on (its CPU affinity), subtracts those of them that other processes
  are using right now (from /proc/stat, sampled over 0.1 s), and gives a model under
  `SMALL_MODEL_PARAMETERS` one thread: its matrices are too small for a second thread to pay
  for the synchronisation. An explicit `OMP_NUM_THREADS` or `--threads` always wins.

Library users keep full control: nothing here runs on import; call `use_sampling_threads(model)`.
"""

from __future__ import annotations

import math
import os
import time

# Below this many parameters a model samples on one thread (the shipped Fashion-MNIST models have
# about 1M): each matrix multiply takes microseconds, less than waking a second thread costs.
SMALL_MODEL_PARAMETERS = 30_000_000

# A core counts as busy when other processes used more than this share of it during the sample.
BUSY_SHARE = 0.5


# Spins before a waiting OpenMP thread sleeps (libgomp; other OpenMP runtimes ignore it): long
# enough for the gaps between a decode step's parallel regions, short enough to yield a busy core.
SHORT_SPIN = "3000"

# The environment variables that set how waiting OpenMP threads behave.
WAITING_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def prefer_short_spin(environ=os.environ) -> None:
    """Set GOMP_SPINCOUNT to SHORT_SPIN unless the user set any of WAITING_VARIABLES;
    effective only before torch is imported."""
    if not any(k in environ for k in WAITING_VARIABLES):
        environ["GOMP_SPINCOUNT"] = SHORT_SPIN


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _affinity() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _cpu_times(cpus: set[int] | None = None) -> tuple[float, float, int] | None:
    """(busy, total) jiffies from /proc/stat and how many CPUs they cover: the CPUs numbered in
    `cpus` (their own lines), or all CPUs when None; None where there is none."""
    try:
        with open("/proc/stat") as f:
            lines = [line.split() for line in f if line.startswith("cpu")]
    except OSError:
        return None
    if cpus is None:
        rows = [fields for fields in lines if fields[0] == "cpu"]
        count = os.cpu_count() or 1
    else:
        rows = [fields for fields in lines if fields[0][3:].isdigit() and int(fields[0][3:]) in cpus]
        count = len(rows)
    if not rows:
        return None
    busy = total = 0.0
    for fields in rows:
        values = [float(v) for v in fields[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0.0)  # idle + iowait
        busy, total = busy + sum(values[:8]) - idle, total + sum(values[:8])
    return busy, total, count


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def busy_cores(interval: float = 0.1) -> float:
    """How many of the cores this process may run on (`usable_cores`) other processes keep busy,
    measured over `interval` seconds (0.0 where /proc/stat is not available). Cores outside its
    affinity do not count: it cannot use them either way. Its own use during the interval is not counted."""
    cpus = _affinity()
    first = _cpu_times(cpus)
    if first is None:
        return 0.0
    own0, t0 = _own_cpu_seconds(), time.monotonic()
    time.sleep(interval)
    second = _cpu_times(cpus)
    own1, t1 = _own_cpu_seconds(), time.monotonic()
    if second is None or second[1] <= first[1]:
        return 0.0
    share = (second[0] - first[0]) / (second[1] - first[1])  # of the CPUs read
    own = (own1 - own0) / max(t1 - t0, 1e-9)  # cores' worth
    return max(0.0, share * second[2] - own)


def sampling_threads(parameters: int, busy: float | None = None, cores: int | None = None) -> int:
    """Threads for sampling a model of `parameters` parameters: 1 for a small model, else the
    usable cores minus the busy ones (`busy_cores()` when not given), at least 1."""
    if parameters < SMALL_MODEL_PARAMETERS:
        return 1
    cores = usable_cores() if cores is None else cores
    busy = busy_cores() if busy is None else busy
    taken = math.floor(busy + (1.0 - BUSY_SHARE))  # a core is taken when over BUSY_SHARE of it is used
    return max(1, min(cores, cores - taken))


def explicit_threads() -> int | None:
    """OMP_NUM_THREADS when the user set it to a positive integer, else None. A list ("4,2", one
    number per nesting level) gives its first number, as OpenMP takes it for the outer level."""
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def count_parameters(model) -> int:
    """Parameters of a module, or of every model of a pipeline (`_models()`)."""
    models = model._models() if hasattr(model, "_models") else [model]
    return sum(p.numel() for m in models for p in m.parameters())


def use_sampling_threads(model, threads: int | None = None) -> int:
    """Set torch's intra-op threads for sampling `model` (a module or a pipeline): `threads` when
    given, else OMP_NUM_THREADS when set, else `sampling_threads`. Returns the number set."""
    import torch

    n = threads or explicit_threads() or sampling_threads(count_parameters(model))
    torch.set_num_threads(n)
    return n
