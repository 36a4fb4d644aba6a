"""Timing discipline shared by every benchmark: warm-up, then repeated runs, medians and percentiles.

On CUDA each run is bracketed by CUDA events on the current stream (the device's own clock, no
host jitter); the host waits for the device before every run so runs never overlap. On the CPU
`time.perf_counter` brackets the call. A stage keeps being repeated until it has `reps` runs or
has used its time budget, but never fewer than `min_reps` runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TimingPolicy:
    """How often to run a stage. `budget_s` bounds the timed runs of one (stage, backend) pair."""

    warmup: int = 1
    reps: int = 10
    min_reps: int = 3
    budget_s: float = 20.0

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.min_reps < 1 or self.reps < self.min_reps or self.budget_s <= 0:
            raise ValueError(f"bad timing policy {self}: need warmup >= 0, 1 <= min_reps <= reps, budget_s > 0")


@dataclass(frozen=True)
class Timing:
    """Wall times of the timed runs (milliseconds), plus the first warm-up run's ("cold") time."""

    samples_ms: tuple[float, ...]
    cold_ms: float | None = None

    @property
    def median_ms(self) -> float:
        return float(np.median(self.samples_ms))

    @property
    def p10_ms(self) -> float:
        return float(np.percentile(self.samples_ms, 10))  # linear interpolation between runs

    @property
    def p90_ms(self) -> float:
        return float(np.percentile(self.samples_ms, 90))

    @property
    def p99_ms(self) -> float:
        return float(np.percentile(self.samples_ms, 99))

    @property
    def best_ms(self) -> float:
        """The fastest run (what the ceilings use: a rate no median of the same work can beat)."""
        return float(min(self.samples_ms))


class Timer:
    """Times a callable on one device (see the module docstring for the method)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def once_ms(self, fn: Callable[[], object]) -> float:
        """Time one call of `fn` in milliseconds, the device idle before and finished after."""
        self.sync()
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        with torch.cuda.device(self.device):  # events on the timed device's current stream
            begin = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
        return begin.elapsed_time(end)

    def measure(self, fn: Callable[[], object], policy: TimingPolicy) -> Timing:
        """Warm up, then time runs until `policy.reps` runs or `policy.budget_s` (at least min_reps)."""
        cold = None
        for i in range(policy.warmup):
            ms = self.once_ms(fn)
            cold = ms if i == 0 else cold
        samples: list[float] = []
        spent = 0.0
        while len(samples) < policy.min_reps or (len(samples) < policy.reps and spent < policy.budget_s):
            ms = self.once_ms(fn)
            samples.append(ms)
            spent += ms / 1e3
        return Timing(tuple(samples), cold)
