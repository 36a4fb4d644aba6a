"""Helpers shared by the kernel tests."""

from __future__ import annotations

import torch


def randomized(module: torch.nn.Module, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """Random weights (the defaults, ones and zeros, would hide a missing weight or bias)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return module.to(dtype)
