"""Stage-1 flow-matching schedule, Euler step and CFG loop vs diffusers' FlowMatchEulerDiscreteScheduler.

Everything here is expected to be bit-identical to diffusers (same arithmetic, same rounding), so the
comparisons use torch.equal, not tolerances.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blip3o_engine.errors import InputError
from blip3o_engine.sampling.flow_match import flow_match_euler_step, flow_match_sigmas, sample_flow

# docs/model_spec.md §1.5: the int64 timesteps the DiT sees for the default 30 steps.
SPEC_T30 = [1000, 966, 933, 900, 866, 833, 800, 766, 733, 700, 666, 633, 600, 566, 533,
            500, 466, 433, 400, 366, 333, 300, 266, 233, 200, 166, 133, 100, 66, 33]


def official_scheduler(steps: int, shift: float = 1.0):
    """diffusers' FlowMatchEulerDiscreteScheduler as the official code sets it up
    (blip3o_qwen_inference.py:130-131). A test that asks for it skips where diffusers is missing (the GPU
    machine); the tests of our functions alone run anyway."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers (the oracle) is not installed")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))
    return sched


@pytest.mark.parametrize("steps", [30, 7, 1])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sigmas_and_timesteps_equal_diffusers(steps: int, shift: float) -> None:
    sched = official_scheduler(steps, shift)
    sigmas, timesteps = flow_match_sigmas(steps, shift=shift)
    assert sigmas.dtype == timesteps.dtype == torch.float32
    assert sigmas.shape == (steps + 1,) and timesteps.shape == (steps,)
    assert sigmas[-1].item() == 0.0
    assert torch.equal(sigmas, sched.sigmas)
    assert torch.equal(timesteps, sched.timesteps)


def test_shift_changes_the_schedule() -> None:
    # Guards the shift formula against being a no-op: shift 3 pushes every interior sigma up.
    plain, _ = flow_match_sigmas(7)
    shifted, _ = flow_match_sigmas(7, shift=3.0)
    assert shifted[0] == plain[0] == 1.0
    assert (shifted[1:-1] > plain[1:-1]).all()


def test_int_timesteps_for_30_steps_match_spec() -> None:
    _, timesteps = flow_match_sigmas(30)
    assert timesteps.to(torch.int64).tolist() == SPEC_T30


def test_bad_step_count_is_an_input_error() -> None:
    with pytest.raises(InputError):
        flow_match_sigmas(0)


def test_euler_steps_equal_scheduler_step_fp32() -> None:
    steps = 30
    gen = torch.Generator().manual_seed(0)
    sched = official_scheduler(steps)
    sigmas, _ = flow_match_sigmas(steps)
    x_ref = x = torch.randn(2, 5, 3, 3, generator=gen)
    for i, t in enumerate(sched.timesteps):
        v = 3 * torch.randn(x.shape, generator=gen)
        x_ref = sched.step(v, t, x_ref).prev_sample
        x = flow_match_euler_step(x, v, sigmas, i)
        assert torch.equal(x, x_ref), f"step {i}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_euler_steps_match_scheduler_step_reduced_precision(dtype: torch.dtype) -> None:
    """fp16/bf16. diffusers computes `sample.float() + dt * model_output`, dt a 0-d fp32 tensor on the
    host (the official code never moves the sigmas). With the velocity on CUDA, as in the official run,
    dt enters the multiply in fp32 and only the product is rounded to the velocity's dtype. With a CPU
    velocity torch rounds dt itself to that dtype first, so CPU diffusers (the oracle available here)
    differs from the CUDA arithmetic by ≤ 2 ulp of Δσ·v, plus one rounding of the sum: the tolerance.
    The CUDA arithmetic itself is checked exactly against torch's CPU kernel for `v * dt` (0-d fp32
    tensor second), which also multiplies in fp32 and rounds the product once.
    """
    steps = 30
    eps = torch.finfo(dtype).eps
    gen = torch.Generator().manual_seed(0)
    sched = official_scheduler(steps)
    sigmas, _ = flow_match_sigmas(steps)
    x = torch.randn(4, 5, 8, 8, generator=gen).to(dtype)
    for i, t in enumerate(sched.timesteps):
        v = (3 * torch.randn(x.shape, generator=gen)).to(dtype)
        dt = sigmas[i + 1] - sigmas[i]
        x_next = flow_match_euler_step(x, v, sigmas, i)
        assert x_next.dtype == dtype
        assert torch.equal(x_next, (x.float() + v * dt).to(dtype)), f"step {i}"

        x_ref = sched.step(v, t, x).prev_sample  # from our own x, so differences do not accumulate
        atol = 2 * eps * (dt.abs() * v.float().abs()).max().item()
        torch.testing.assert_close(x_next.float(), x_ref.float(), rtol=eps, atol=atol)
        x = x_next


class RecordingModel:
    """A deterministic stand-in for the DiT closure: v depends on x, t and the batch position
    (so swapping the CFG halves changes the result); records every call."""

    def __init__(self, guidance_cond: torch.Tensor) -> None:
        self.cond = guidance_cond  # [B_in] per-row condition value, e.g. cat([zeros, c])
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append((x_in.clone(), t.clone()))
        c = self.cond.to(x_in.dtype)[:, None, None, None]
        return (0.5 * x_in + c * torch.sin(x_in) + t.to(x_in.dtype)[:, None, None, None] / 1000).to(x_in.dtype)


def test_sample_flow_equals_diffusers_cfg_loop() -> None:
    # fp32, where diffusers' CPU step is bit-exact for us (see the reduced-precision step test).
    steps, guidance = 30, 3.0
    noise = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    cond = torch.tensor([0.0, 0.0, 1.5, -2.0])  # uncond rows (zeros) first, then the conditions
    model = RecordingModel(cond)
    seen: list[tuple[int, int]] = []
    x0 = sample_flow(model, noise, steps, guidance, callback=lambda i, n: seen.append((i, n)))

    # The official loop written with the diffusers scheduler (blip3o_qwen_inference.py:133-152).
    ref_model = RecordingModel(cond)
    sched = official_scheduler(steps)
    x = noise
    for t in sched.timesteps:
        x_in = torch.cat([x, x])
        v_u, v_c = ref_model(x_in, t.expand(x_in.shape[0]).to(torch.long)).chunk(2)
        x = sched.step(v_u + guidance * (v_c - v_u), t, x).prev_sample

    assert torch.equal(x0, x)
    assert seen == [(i, steps) for i in range(steps)]
    assert len(model.calls) == steps
    for (x_in, t), t_ref in zip(model.calls, SPEC_T30):
        assert x_in.shape[0] == 4 and torch.equal(x_in[:2], x_in[2:])  # [x, x]
        assert t.dtype == torch.int64 and t.tolist() == [t_ref] * 4
    assert torch.equal(model.calls[0][0][:2], noise)


def test_sample_flow_without_guidance_runs_the_plain_batch() -> None:
    noise = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(2))
    cond = torch.tensor([1.0, 2.0, 3.0])
    model = RecordingModel(cond)
    x0 = sample_flow(model, noise, steps=5, guidance=1.0)
    assert len(model.calls) == 5 and all(x_in.shape[0] == 3 for x_in, _ in model.calls)

    ref_model = RecordingModel(cond)
    sigmas, timesteps = flow_match_sigmas(5)
    x = noise
    for i, t in enumerate(timesteps):
        x = flow_match_euler_step(x, ref_model(x, t.to(torch.int64).expand(3)), sigmas, i)
    assert torch.equal(x0, x)


def test_sample_flow_recovers_x0_for_the_exact_velocity() -> None:
    # With the true flow-matching velocity v = noise − x0 every Euler step is exact: the loop must land
    # on x0 (fp32; 30 additions of Δσ·v, each rounded: 1e-5 absolute).
    gen = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(1, 3, 4, 4, generator=gen), torch.randn(1, 3, 4, 4, generator=gen)
    out = sample_flow(lambda x_in, t: (noise - x0).expand_as(x_in), noise, steps=30, guidance=3.0)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)
