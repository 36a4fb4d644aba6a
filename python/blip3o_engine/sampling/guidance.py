"""Classifier-free guidance, the one formula both samplers (and both backends) use."""

from __future__ import annotations

from torch import Tensor


def cfg_combine(uncond: Tensor, cond: Tensor, guidance: float | Tensor) -> Tensor:
    """Classifier-free guidance `uncond + g·(cond − uncond)`, the product in fp32 rounded once to the dtype:
    what torch does for a Python-float g (the official loops), and exact for g an fp32 tensor per row
    (a 0-dim fp32 *tensor* would instead round g to a reduced dtype first)."""
    return uncond + (guidance * (cond - uncond).float()).to(cond.dtype)


__all__ = ["cfg_combine"]
