"""Stage-2 sampler: diffusers' EulerDiscreteScheduler (SDXL-base config) as pure functions (docs/model_spec.md §1.6).

The schedule is built once per step count (on the host, with the very numpy/torch calls diffusers
uses, so timesteps and sigmas are bitwise equal) and moved to the device. The loop then only indexes
device tensors with a Python step number: no mutable step index, no host tables, no host syncs
(docs/ARCHITECTURE.md §7.7), so a step can be captured in a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..config import EulerSchedulerConfig
from .guidance import cfg_combine


@dataclass(frozen=True, eq=False)
class EulerSchedule:
    """timesteps [S] fp32 (model inputs), sigmas [S+1] fp32 ending in 0, and the initial noise scale."""

    timesteps: Tensor
    sigmas: Tensor
    init_noise_sigma: float

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]


def _train_sigmas(cfg: EulerSchedulerConfig) -> np.ndarray:
    """σ(t) = sqrt((1 - ᾱ_t) / ᾱ_t) for the training timesteps 0..T-1, fp32 as diffusers computes it."""
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "scaled_linear":
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=torch.float32) ** 2
    else:  # "linear"
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()  # [T] float32


def _timesteps(cfg: EulerSchedulerConfig, num_steps: int) -> np.ndarray:
    """Inference timesteps, descending, float32 (diffusers `set_timesteps`, Table 2 of 2305.08891)."""
    n = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, n - 1, num_steps, dtype=np.float32)[::-1].copy()
    if cfg.timestep_spacing == "leading":
        step_ratio = n // num_steps
        t = (np.arange(0, num_steps) * step_ratio).round()[::-1].copy().astype(np.float32)
        return t + cfg.steps_offset
    # "trailing"
    step_ratio = n / num_steps
    return np.arange(n, 0, -step_ratio).round().copy().astype(np.float32) - 1


def euler_discrete_schedule(cfg: EulerSchedulerConfig, num_steps: int,
                            device: torch.device | str | None = None) -> EulerSchedule:
    """Timesteps and sigmas of `EulerDiscreteScheduler(cfg).set_timesteps(num_steps)`, on `device`.

    Linear interpolation of σ at (possibly fractional) timesteps, final σ = 0. The initial noise
    scale is sqrt(σ_max² + 1) for "leading" spacing and σ_max for "linspace"/"trailing" (diffusers).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    train_sigmas = _train_sigmas(cfg)
    timesteps = _timesteps(cfg, num_steps)
    sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)  # float64
    sigmas = np.concatenate([sigmas, [0]]).astype(np.float32)  # [S+1]
    sigmas_t = torch.from_numpy(sigmas)
    max_sigma = sigmas_t.max()  # fp32 scalar tensor: the same arithmetic as diffusers' property
    init = max_sigma if cfg.timestep_spacing in ("linspace", "trailing") else (max_sigma**2 + 1) ** 0.5
    return EulerSchedule(timesteps=torch.from_numpy(timesteps).to(device),
                         sigmas=sigmas_t.to(device), init_noise_sigma=float(init))


def scale_model_input(x: Tensor, sigmas: Tensor, i: int) -> Tensor:
    """x / sqrt(σ_i² + 1) (`scale_by_sigma` at step i of a schedule)."""
    return scale_by_sigma(x, sigmas[i])


def scale_by_sigma(x: Tensor, sigma: Tensor) -> Tensor:
    """x / sqrt(σ² + 1) in fp32, rounded once to x's dtype. sigma: a 0-dim fp32 tensor, or one per row
    (`[B, 1, 1, 1]`, the continuously batched decoder). Written out in fp32 because that is what torch does
    for a 0-dim fp32 σ and a reduced-precision x on CPU (diffusers' run), and a per-row σ would otherwise
    promote the whole division to fp32."""
    return (x.float() / ((sigma**2 + 1) ** 0.5)).to(x.dtype)


def euler_step(x: Tensor, eps: Tensor, sigmas: Tensor, i: int) -> Tensor:
    """One Euler step from σ_i to σ_{i+1} of a schedule (`euler_update`)."""
    return euler_update(x, eps, sigmas[i], sigmas[i + 1])


def euler_update(x: Tensor, eps: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """One Euler step from σ to σ_next for ε-prediction, returned in eps' dtype. sigma, sigma_next: 0-dim
    fp32 tensors, or one per row (`[B, 1, 1, 1]`).

    Written in diffusers' `step` order (s_churn = 0, so σ̂ = σ): upcast x to fp32, x0 = x - σ·ε (σ·ε in
    ε's dtype, with σ rounded to it first: what torch does for a 0-dim fp32 σ on CPU), d = (x - x0) / σ,
    x + d·(σ_next - σ). Algebraically x + (σ' - σ)·ε; kept in this form so results are bitwise equal to
    diffusers' (fp32 and bf16, on CPU).

    Expected (not yet measured) bf16 difference on CUDA only: diffusers keeps its sigmas on the host, and
    CUDA kernels read a host 0-dim tensor at fp32 precision, where σ·ε here rounds σ to bf16 first: at most
    one bf16 rounding apart per step. fp32 runs are unaffected.
    """
    sample = x.to(torch.float32)
    pred_original = sample - sigma.to(eps.dtype) * eps
    derivative = (sample - pred_original) / sigma
    return (sample + derivative * (sigma_next - sigma)).to(eps.dtype)


def euler_cfg_step(model_fn: Callable[[Tensor, Tensor], Tensor], z: Tensor, schedule: EulerSchedule, i: int,
                   guidance: float) -> Tensor:
    """Step i of the reference sampler (`sample_euler`'s loop body): model on [z, z] with CFG (conditions
    ordered [cond, uncond]) or on z alone, then the Euler update."""
    sigmas = schedule.sigmas
    z_in = scale_model_input(z, sigmas, i)
    cfg = guidance > 1.0
    eps = model_fn(torch.cat([z_in, z_in]) if cfg else z_in, schedule.timesteps[i])
    if cfg:
        eps_c, eps_u = eps.chunk(2)
        eps = cfg_combine(eps_u, eps_c, guidance)
    return euler_step(z, eps, sigmas, i)


def sample_euler(model_fn: Callable[[Tensor, Tensor], Tensor], noise: Tensor, schedule: EulerSchedule,
                 guidance: float, callback: Callable[[int, int], None] | None = None) -> Tensor:
    """Run the Euler sampler from standard-normal `noise` [B, 4, h, w] (not yet scaled) to latents.

    `model_fn(latent_in, t) -> ε`: with guidance > 1 the latent input is `cat([z, z])` [2B, ...] and
    the model's conditioning batch must be ordered **[cond, uncond]**: ε_c, ε_u = ε.chunk(2), then
    ε = ε_u + g·(ε_c − ε_u) (the reference pipeline's order, docs/model_spec.md §1.6). With guidance <= 1 the input
    is z alone. `t` is a 0-dim fp32 device tensor. `callback(i, S)` runs after step i.
    """
    z = noise * schedule.init_noise_sigma
    for i in range(schedule.num_steps):  # no host syncs inside: everything indexed here lives on the device
        z = euler_cfg_step(model_fn, z, schedule, i, guidance)
        if callback is not None:
            callback(i, schedule.num_steps)
    return z


__all__ = ["EulerSchedule", "euler_cfg_step", "euler_discrete_schedule", "euler_step", "euler_update",
           "sample_euler", "scale_by_sigma", "scale_model_input"]
