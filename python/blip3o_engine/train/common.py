"""Pieces every stage of the demo recipe uses: loss history, learning-rate schedule, weight EMA,
progress bars and per-stage seeding."""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import nn


class LossLog:
    """Loss values per stage and name, with the step they were measured at; what the loss-curve
    plot and the training summary are made from."""

    def __init__(self) -> None:
        self.history: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))

    def add(self, stage: str, step: int, **losses: float) -> None:
        for name, value in losses.items():
            self.history[stage][name].append((step, float(value)))

    def final(self, stage: str, name: str, last: int = 50) -> float:
        """Mean of the last `last` values: a final loss that is not one noisy batch."""
        values = [v for _, v in self.history[stage][name][-last:]]
        return sum(values) / len(values) if values else float("nan")

    def summary(self, last: int = 50) -> dict[str, dict[str, float]]:
        return {stage: {name: self.final(stage, name, last) for name in losses}
                for stage, losses in self.history.items()}


def warmup_cosine(total: int, warmup: int, floor: float = 0.1):
    """LambdaLR factor: linear warm-up over `warmup` steps, then a cosine down to `floor`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class Optimizer:
    """AdamW + warm-up/cosine schedule, and the update every stage runs per step (one place for it)."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float, steps: int, weight_decay: float = 0.0,
                 warmup_fraction: float = 0.05, clip_norm: float | None = None) -> None:
        self.params = list(params)
        for p in self.params:
            p.requires_grad_(True)
        self.clip_norm = clip_norm
        self.opt = torch.optim.AdamW(self.params, lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, warmup_cosine(steps, max(1, int(warmup_fraction * steps))))

    def step(self, loss: torch.Tensor) -> None:
        """Backward, clip the gradient norm (when set), AdamW step, schedule step."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
        self.opt.step()
        self.sched.step()


class EMA:
    """Exponential moving average of a module's parameters (what diffusion models are sampled with:
    it averages out the last steps' noise, which matters most when training is this short)."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = copy.deepcopy(module).requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        # Warm-up (as in common EMA implementations): early on, follow the weights more closely.
        decay = min(self.decay, (1 + step) / (10 + step))
        for avg, p in zip(self.shadow.parameters(), module.parameters()):
            avg.lerp_(p.detach(), 1 - decay)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        for avg, p in zip(self.shadow.parameters(), module.parameters()):
            p.copy_(avg)


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True)


def stage_generator(seed: int, stage: int) -> torch.Generator:
    """The data generator of one stage, and the global RNG (dropout masks, randn_like) reseeded for
    it, so each stage is reproducible on its own."""
    torch.manual_seed(seed * 1000 + stage)
    return torch.Generator().manual_seed(seed * 1000 + 100 + stage)
