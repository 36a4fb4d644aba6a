"""The image stages of the reference backend, stepwise, for the engine's step loop.

They offer the interface of the optimized `FlowSampler` (begin / advance / result) and `PixelDecoder` (admit /
step / take / preview / release / latents_to_pixels / begin_pixels / advance_pixels), so the step loop drives both backends the same way, but
every image runs alone through `runtime/reference.py`'s closures and the pure step functions of `sampling/`:
an image's numbers are exactly what a batch-1 run of the reference gives, whatever else is in flight. Every
model call runs under `ops.reference_ops()` (the torch twins, on any device).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import InputError
from ..models.blip3o import Blip3oModel
from ..ops.dispatch import reference_ops
from ..sampling.euler_discrete import EulerSchedule, euler_cfg_step, euler_discrete_schedule
from ..sampling.flow_match import flow_cfg_step, flow_match_sigmas
from . import reference
from .pixel_decoder import DecoderProgress, PixelsRun


@dataclass(eq=False)
class ReferenceDiTRun:
    """A request batch's flow loops in progress, one latent per prompt."""

    steps: int
    model_fns: list[Callable]
    guidance: list[float]
    xs: list[Tensor]  # [1, C, S, S] each
    sigmas: Tensor
    timesteps: Tensor
    done: int = 0

    @property
    def finished(self) -> bool:
        return self.done == self.steps


class ReferenceFlow:
    """Stage 1's loop, one prompt at a time (`reference.sample_clip_features`, stepwise)."""

    def __init__(self, model: Blip3oModel) -> None:
        self.model = model

    @torch.inference_mode()
    def begin(self, cond: Tensor, noise: Tensor, steps: int, guidance: float | list[float]) -> ReferenceDiTRun:
        values = [float(g) for g in guidance] if isinstance(guidance, (list, tuple)) else [float(guidance)] * len(cond)
        if len(values) != len(cond):
            raise InputError(f"{len(cond)} prompts but {len(values)} guidance values")
        sigmas, timesteps = flow_match_sigmas(steps, device=self.model.device)
        fns = [reference.dit_model_fn(self.model, cond[i:i + 1], g) for i, g in enumerate(values)]
        xs = [noise[i:i + 1].to(self.model.device, self.model.dtype) for i in range(len(cond))]
        return ReferenceDiTRun(steps, fns, values, xs, sigmas, timesteps)

    @torch.inference_mode()
    def advance(self, run: ReferenceDiTRun, max_steps: int, callback=None) -> bool:
        end = min(run.steps, run.done + max_steps)
        with reference_ops():
            for i in range(run.done, end):
                for r, (fn, g) in enumerate(zip(run.model_fns, run.guidance)):
                    run.xs[r] = flow_cfg_step(fn, run.xs[r], run.sigmas, run.timesteps, i, g)
                if callback is not None:
                    callback(i, run.steps)
        run.done = end
        return run.finished

    def result(self, run: ReferenceDiTRun) -> Tensor:
        if not run.finished:
            raise RuntimeError(f"the DiT run has done {run.done} of {run.steps} steps")
        return torch.cat([reference.clip_tokens(x) for x in run.xs])  # [B, Q, C]

    def sample(self, cond: Tensor, noise: Tensor, steps: int, guidance: float | list[float], callback=None) -> Tensor:
        run = self.begin(cond, noise, steps, guidance)
        self.advance(run, steps, callback)
        return self.result(run)


@dataclass(eq=False)
class _Image:
    model_fn: Callable
    z: Tensor  # [1, 4, h, w]
    schedule: EulerSchedule
    guidance: float
    z_prev: Tensor | None = None
    done: int = 0
    extra: dict = field(default_factory=dict)


class ReferenceDecoder:
    """Stage 2, one image at a time: the `PixelDecoder` interface over the reference Euler loop."""

    def __init__(self, model: Blip3oModel, max_batch: int = 4) -> None:
        self.model = model
        self.max_batch = max_batch
        self._images: dict[Hashable, _Image] = {}

    def __len__(self) -> int:
        return len(self._images)

    def has_room(self, latent_hw: tuple[int, int]) -> bool:
        return len(self._images) < self.max_batch

    @torch.inference_mode()
    def admit(self, key: Hashable, feats: Tensor, uncond: Tensor, noise: Tensor, steps: int, guidance: float) -> None:
        if key in self._images:
            raise ValueError(f"decoder key {key!r} is already admitted")
        fn = reference.unet_model_fn(self.model, feats[None], uncond[None], tuple(noise.shape[-2:]), guidance)
        schedule = euler_discrete_schedule(self.model.cfg.decoder_scheduler, steps, device=self.model.device)
        z = noise[None].to(self.model.device, self.model.dtype) * schedule.init_noise_sigma
        self._images[key] = _Image(fn, z, schedule, guidance)

    @torch.inference_mode()
    def step(self) -> list[DecoderProgress]:
        progress = []
        with reference_ops():
            for key, img in self._images.items():
                img.z_prev = img.z
                img.z = euler_cfg_step(img.model_fn, img.z, img.schedule, img.done, img.guidance)
                img.done += 1
                progress.append(DecoderProgress(key, img.done, img.schedule.num_steps))
        return progress

    def take(self, key: Hashable) -> Tensor:
        img = self._images[key]
        if img.done != img.schedule.num_steps:
            raise RuntimeError(f"image {key!r} has run {img.done} of {img.schedule.num_steps} decoder steps")
        del self._images[key]
        return img.z[0]

    def preview(self, key: Hashable) -> Tensor:
        """The x0 prediction of the last step, recovered from the Euler update: ε = Δz / Δσ, x0 = z − σ·ε."""
        img = self._images[key]
        sigmas, i = img.schedule.sigmas, img.done - 1
        eps = (img.z.float() - img.z_prev.float()) / (sigmas[i + 1] - sigmas[i])
        return (img.z_prev.float() - sigmas[i] * eps).to(img.z.dtype)[0]

    def release(self, key: Hashable) -> bool:
        return self._images.pop(key, None) is not None

    @torch.inference_mode()
    def latents_to_pixels(self, latents: Tensor) -> Tensor:
        with reference_ops():
            return torch.cat([reference.latents_to_uint8(self.model, latents[i:i + 1]) for i in range(len(latents))])

    def begin_pixels(self, latents: Tensor) -> PixelsRun:
        """The reference VAE runs whole: one piece."""
        return PixelsRun(latents, 1)

    def advance_pixels(self, run: PixelsRun) -> bool:
        run.x, run.done = self.latents_to_pixels(run.x), 1
        return True


__all__ = ["ReferenceDecoder", "ReferenceDiTRun", "ReferenceFlow"]
