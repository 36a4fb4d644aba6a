"""Stage-2 Euler sampler vs diffusers' EulerDiscreteScheduler (the oracle).

Our functions run the same torch/numpy operations in the same order as diffusers, so every check
here is exact (bitwise), in fp32 and in bf16 on CPU.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from blip3o_engine.config import EulerSchedulerConfig
from blip3o_engine.sampling.euler_discrete import (
    euler_discrete_schedule,
    euler_step,
    sample_euler,
    scale_model_input,
)

# diffusers builds its sigma table with np.array(tensor), which numpy 2 warns about.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SPACINGS = ("leading", "trailing", "linspace")


def _cfg(spacing: str, **kw) -> EulerSchedulerConfig:
    return dataclasses.replace(EulerSchedulerConfig(), timestep_spacing=spacing, **kw)


def _oracle(cfg: EulerSchedulerConfig, steps: int):
    """diffusers' scheduler set to `steps`; the test that asks for it skips where diffusers is missing (the
    GPU machine), the tests of our sampler alone run anyway."""
    # from_config, as diffusers reads scheduler_config.json: to_diffusers() also carries keys the
    # stock SDXL file has that EulerDiscreteScheduler.__init__ does not take (clip_sample, ...).
    diffusers = pytest.importorskip("diffusers", reason="diffusers (the oracle) is not installed")
    sched = diffusers.EulerDiscreteScheduler.from_config(cfg.to_diffusers())
    sched.set_timesteps(steps)
    return sched


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [50, 7, 1])
def test_schedule_matches_diffusers(spacing: str, steps: int) -> None:
    cfg = _cfg(spacing)
    ref = _oracle(cfg, steps)
    ours = euler_discrete_schedule(cfg, steps)
    assert ours.timesteps.dtype == ours.sigmas.dtype == torch.float32
    assert ours.timesteps.shape == (steps,) and ours.sigmas.shape == (steps + 1,)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert torch.equal(ours.sigmas, ref.sigmas)
    assert ours.sigmas[-1] == 0
    assert ours.init_noise_sigma == float(ref.init_noise_sigma)


def test_schedule_other_configs_match_diffusers() -> None:
    """Non-default offset, linear betas, a train length not divisible by the step count."""
    for cfg in (_cfg("leading", steps_offset=0), _cfg("leading", beta_schedule="linear", beta_start=1e-4,
                                                       beta_end=0.02), _cfg("trailing", num_train_timesteps=999)):
        ref, ours = _oracle(cfg, 13), euler_discrete_schedule(cfg, 13)
        assert torch.equal(ours.timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas)
        assert ours.init_noise_sigma == float(ref.init_noise_sigma)


def test_default_schedule_values() -> None:
    """SDXL-base config, 50 steps (docs/model_spec.md §1.6): 981, 961, ..., 1; σ_max ≈ 13.12; init ≈ 13.16."""
    s = euler_discrete_schedule(EulerSchedulerConfig(), 50)
    assert s.timesteps.tolist() == [float(t) for t in range(981, 0, -20)]
    assert abs(s.sigmas[0].item() - 13.12) < 0.01
    assert abs(s.init_noise_sigma - (s.sigmas[0].item() ** 2 + 1) ** 0.5) < 1e-6
    assert abs(s.init_noise_sigma - 13.16) < 0.01


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_steps_match_diffusers(spacing: str, dtype: torch.dtype) -> None:
    """scale_model_input and euler_step along a whole 7-step trajectory with random ε."""
    cfg = _cfg(spacing)
    ref = _oracle(cfg, 7)
    ours = euler_discrete_schedule(cfg, 7)
    gen = torch.Generator().manual_seed(0)
    x_ref = x_ours = (torch.randn(2, 4, 5, 3, generator=gen) * ref.init_noise_sigma).to(dtype)
    for i, t in enumerate(ref.timesteps):
        eps = torch.randn(2, 4, 5, 3, generator=gen).to(dtype)
        assert torch.equal(scale_model_input(x_ours, ours.sigmas, i), ref.scale_model_input(x_ref, t))
        x_ref = ref.step(eps, t, x_ref).prev_sample
        x_ours = euler_step(x_ours, eps, ours.sigmas, i)
        assert x_ours.dtype == dtype
        assert torch.equal(x_ours, x_ref), f"step {i}"
    assert x_ours.abs().max() < 100  # a real trajectory, not inf/nan compared with itself


def _toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for the UNet whose rows differ (so cond/uncond order matters)."""
    row = torch.arange(1, x.shape[0] + 1, dtype=x.dtype).view(-1, 1, 1, 1)
    return torch.tanh(x * row + t / 1000)


@pytest.mark.parametrize("guidance", [3.0, 1.0])
def test_sample_euler_matches_diffusers_loop(guidance: float) -> None:
    """Our loop vs the reference pipeline's loop on diffusers' scheduler: noise·init_sigma, cat([z, z]),
    scale, ε_c, ε_u = chunk(2) (cond first), ε_u + g(ε_c − ε_u), step."""
    cfg = EulerSchedulerConfig()
    steps = 9
    noise = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(1))

    ref = _oracle(cfg, steps)
    z = noise * ref.init_noise_sigma
    for t in ref.timesteps:
        inp = torch.cat([z, z]) if guidance > 1 else z
        eps = _toy_model(ref.scale_model_input(inp, t), t)
        if guidance > 1:
            eps_c, eps_u = eps.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        z = ref.step(eps, t, z).prev_sample

    seen = []
    got = sample_euler(_toy_model, noise, euler_discrete_schedule(cfg, steps), guidance,
                       callback=lambda i, n: seen.append((i, n)))
    assert seen == [(i, steps) for i in range(steps)]
    assert torch.equal(got, z)


def test_sample_euler_cfg_order_is_cond_first() -> None:
    """Swapping the halves of the model output must change the result (guards the chunk order)."""
    cfg, steps = EulerSchedulerConfig(), 3
    noise = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    sched = euler_discrete_schedule(cfg, steps)
    a = sample_euler(_toy_model, noise, sched, 3.0)
    b = sample_euler(lambda x, t: _toy_model(x, t).flip(0), noise, sched, 3.0)
    assert not torch.allclose(a, b)
