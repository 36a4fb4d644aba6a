"""How many CPU threads torch should use by default: the cores this process may use that are idle.

torch's own default is one thread per core of the CPU affinity mask. When another process keeps some
of those cores busy, that oversubscribes them: every parallel op waits for its slowest thread, which
the OS has descheduled, and the tiny preset's `generate` took 27-32 s with two threads on a 2-core
machine with one busy neighbour instead of 0.4-1 s with one thread. So the default counts the cores
the process may use (OMP_NUM_THREADS when set, else the affinity mask capped by a cgroup CPU quota)
and leaves out those that other work keeps busy, measured over a short window of /proc/stat.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

# Long enough for /proc/stat's jiffy counters (100 Hz) to show what runs on each core, short next to
# loading a model.
SAMPLE_SECONDS = 0.1


def allowed_cpus() -> set[int]:
    """CPU ids this process may run on (its affinity mask; all CPUs where the OS has no such call)."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs' worth of time a container's cgroup may use (cpu.max / cfs quota), None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # cgroup v2: "max 100000" or "200000 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def read_cpu_times(stat: Path = Path("/proc/stat")) -> dict[int, tuple[int, int]]:
    """Per CPU id: (busy, total) jiffies since boot; empty where /proc/stat does not exist."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return {}
    times = {}
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or not name[3:].isdigit():
            continue
        values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
        idle = values[3] + values[4]
        times[int(name[3:])] = (sum(values) - idle, sum(values))
    return times


def busy_cores(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]], cpus: set[int]) -> float:
    """How many of `cpus` other work kept busy between two `read_cpu_times` samples (0 .. len(cpus))."""
    busy = 0.0
    for cpu in cpus:
        if cpu in before and cpu in after:
            d_busy, d_total = after[cpu][0] - before[cpu][0], after[cpu][1] - before[cpu][1]
            busy += d_busy / d_total if d_total > 0 else 0.0
    return busy


def default_num_threads(sample: Callable[[], dict[int, tuple[int, int]]] = read_cpu_times,
                        sleep: Callable[[float], None] = time.sleep) -> int:
    """OMP_NUM_THREADS when set (the user's choice); else the cores this process may use (affinity,
    cgroup quota) minus the ones busy with other work over the last SAMPLE_SECONDS; at least 1."""
    omp = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if omp.isdigit() and int(omp) >= 1:
        return int(omp)
    cpus = allowed_cpus()
    usable = len(cpus)
    quota = cgroup_cpu_quota()
    if quota is not None:
        usable = min(usable, max(1, math.floor(quota)))
    before = sample()
    sleep(SAMPLE_SECONDS)  # this process sleeps meanwhile, so what the window shows is other work
    taken = math.ceil(busy_cores(before, sample(), cpus) - 0.5)  # cores other work used more than half of
    return max(1, min(usable, len(cpus) - taken))
