"""Stage-1 flow-matching sampler (docs/model_spec.md §1.5) as pure functions.

The official code drives diffusers' `FlowMatchEulerDiscreteScheduler` (num_train_timesteps 1000, shift 1)
with `set_timesteps(sigmas=np.linspace(1, 1/S, S))` and a CFG Euler loop. Here the schedule is a pair of
device tensors computed once (`flow_match_sigmas`) and a step is a function of `(sigmas, i)`
(`flow_match_euler_step`): no scheduler object, no mutable step index (docs/ARCHITECTURE.md §7.7). Schedule
values equal diffusers' bit for bit; so does every step as the official code runs it (velocity on CUDA,
sigmas on the host) — see `flow_match_euler_step` and tests/unit/test_flow_match.py.

Convention: x_t = (1 − σ)·x0 + σ·noise, the model predicts v = noise − x0, σ runs from 1 to 0.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..errors import InputError
from .guidance import cfg_combine

# model_fn(x_in [B' , C, S, S], t_int [B'] int64) -> velocity [B', C, S, S]; see sample_flow.
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def flow_match_sigmas(num_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000,
                      device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The official schedule: sigmas `[S+1]` fp32 ending in 0, and timesteps `[S]` fp32 = 1000·σ.

    Reproduces `FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift).set_timesteps(
    sigmas=np.linspace(1.0, 1/S, S))` exactly: linspace in float64, rounded to float32, then the
    shift map σ' = shift·σ / (1 + (shift − 1)·σ) in float32 (the identity for shift 1). It is computed
    with NumPy on the host, as diffusers does, so that the rounding is the same; the result goes to
    `device` once, before the loop.
    """
    if num_steps < 1:
        raise InputError(f"num_steps must be >= 1, got {num_steps}")
    sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)  # float32: Python scalars do not upcast
    sigmas = torch.from_numpy(sigmas).to(dtype=torch.float32, device=device)  # [S]
    timesteps = sigmas * num_train_timesteps  # [S] float32, 1000 = pure noise
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])  # [S+1]: the last step lands on σ = 0
    return sigmas, timesteps


def flow_match_euler_step(x: torch.Tensor, v: torch.Tensor, sigmas: torch.Tensor, i: int) -> torch.Tensor:
    """One Euler step x ← x + (σ_{i+1} − σ_i)·v of a schedule (`flow_match_update`)."""
    return flow_match_update(x, v, sigmas[i + 1] - sigmas[i])


def flow_match_update(x: torch.Tensor, v: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """x ← x + dt·v, rounded as diffusers' scheduler does in the official run. dt: 0-dim fp32 (negative), or
    one per row.

    diffusers computes `sample.float() + dt * model_output` with dt a 0-d fp32 tensor: the sum is fp32,
    but the product has the velocity's dtype (a 0-d tensor does not promote), then the result is cast
    back. In the official run dt lives on the host and v on CUDA, where the kernel multiplies in fp32
    and rounds the product once. That is written out here, so it holds on every device: left to
    torch, a 0-d *device* tensor (or any CPU run) rounds dt itself to fp16/bf16 before multiplying.
    Identity for fp32.
    """
    step = (dt * v.float()).to(v.dtype)
    return (x.float() + step).to(x.dtype)


def flow_cfg_velocity(v: torch.Tensor, guidance: float | torch.Tensor) -> torch.Tensor:
    """A CFG batch's velocities `[2B, ...]` (uncond rows first, docs/model_spec.md §1.5) -> the guided `[B, ...]`:
    v_u + g·(v_c − v_u), product in fp32 rounded once (`guidance.cfg_combine`)."""
    v_uncond, v_cond = v.chunk(2)
    return cfg_combine(v_uncond, v_cond, guidance)


def flow_cfg_step(model_fn: ModelFn, x: torch.Tensor, sigmas: torch.Tensor, timesteps: torch.Tensor, i: int,
                  guidance: float) -> torch.Tensor:
    """Step i of the reference loop (`sample_flow`'s body): the model on [x, x] (CFG) or x, then Euler."""
    use_cfg = guidance > 1.0
    x_in = torch.cat([x, x]) if use_cfg else x  # [2B or B, C, S, S]
    t = timesteps[i].to(torch.int64).expand(x_in.shape[0])  # [2B or B]
    v = model_fn(x_in, t)
    if use_cfg:
        v = flow_cfg_velocity(v, guidance)
    return flow_match_euler_step(x, v, sigmas, i)


def sample_flow(model_fn: ModelFn, noise: torch.Tensor, steps: int, guidance: float,
                callback: Callable[[int, int], None] | None = None, *, shift: float = 1.0) -> torch.Tensor:
    """The reference stage-1 loop: `steps` Euler steps from `noise [B, C, S, S]` (σ = 1) to x0 (σ = 0).

    Conditions are closed over by `model_fn(x_in, t)`, which returns velocities for `x_in`:
    - `guidance > 1`: `x_in = cat([x, x])` `[2B, ...]`; the first half is the unconditional branch
      (docs/model_spec.md §1.5: uncond first), so the caller's DiT closure uses the caption batch
      `cat([zeros_like(C), C])`. The velocity is `v_u + guidance·(v_c − v_u)`.
    - otherwise: `x_in = x` `[B, ...]` with the caption `C` alone (no CFG).
    `t` is the timestep truncated to int64 like the official code, `[B_in]`, 1000 = noise.
    `callback(i, steps)` is called after step i (0-based) finishes, for progress reporting.
    The loop never reads device values on the host, so it does not synchronise.
    """
    sigmas, timesteps = flow_match_sigmas(steps, shift=shift, device=noise.device)
    x = noise
    for i in range(steps):
        x = flow_cfg_step(model_fn, x, sigmas, timesteps, i, guidance)
        if callback is not None:
            callback(i, steps)
    return x


__all__ = ["flow_match_sigmas", "flow_match_euler_step", "flow_match_update", "flow_cfg_velocity", "flow_cfg_step",
           "sample_flow", "ModelFn"]
