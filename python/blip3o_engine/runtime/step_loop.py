"""`StepLoop`: ONE step loop for chat and images.

Every `step()` decides, under the scheduler policy, the work of one engine iteration:

  1. LLM work: one step of the AR stage — chat prefill chunks and decodes, and T2I prefills (the prompt +
     64 latent queries of image requests), continuously batched together;
  2. then ONE unit of image work, the units taken in turn (round robin over those that have work):
     - DiT: image requests whose prefill just finished become a DiT batch (grouped by step count and CFG
       on/off); the oldest batch advances `dit_steps_per_iteration` Euler steps;
     - decoder: ONE denoising step over every image in the decoder stage, each at its own timestep
       (continuous batching of denoising: images join when their features are ready and a slot is free,
       and leave when done);
     - VAE: one piece (a few up blocks) of the VAE of the oldest image whose decoder finished.
     One unit, not all three: a chat token then never waits longer than one LLM step plus the largest unit
     (a decoder step), where running DiT chunk + decoder step + VAE back to back made chat wait for their
     sum (`bench mixed` on small measured a 1.38 s stall against a 0.81 s decoder + decode step). Without
     chat the units simply follow one another, so image throughput is unchanged. A step whose LLM work ran
     prompt tokens while chats decode runs no unit (the next one does): prefill + unit would exceed that
     bound.

Requests are typed (`ChatRequest`, `ImageJob`) and routed by kind, never by their ids. Outputs are
`RequestOutput` (chat) and `ImageOutput` (images: one per stage transition, one per decoder step, and a
final one carrying the `ImageResult`). A failure inside one request's work fails that request (or the
requests of the failed batch) with an error output, and the loop goes on.

Two run-to-completion policies are kept as benchmark baselines (`bench mixed`): "serial", the behaviour before
this loop (a server serialised `generate_image` calls behind a lock): once an image has its features, it runs
alone to its end (all DiT and decoder steps, VAE) inside one step while chat and the other images wait; and
"static" (static batching): every image prefilled so far runs to its end as one batch inside one step.

The loop works the same for both backends: the stages it drives are `ARStage` / `FlowSampler` /
`PixelDecoder` (optimized) or `ReferenceAR` / `ReferenceFlow` / `ReferenceDecoder` (reference).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from ..engine_config import SchedulerConfig
from ..errors import InputError
from ..outputs import EngineStats, ImageOutput, ImageResult, RequestOutput
from ..params import ImageParams, SamplingParams
from ..prompts import PreparedPrompt

Output = RequestOutput | ImageOutput


@dataclass(eq=False)
class ChatRequest:
    request_id: str
    prompt: PreparedPrompt
    params: SamplingParams


@dataclass(eq=False)
class ImageJob:
    """One image request through its stages; noise is drawn up front from its seed (device-independent)."""

    request_id: str
    prompt: PreparedPrompt
    params: ImageParams
    seed: int
    height: int
    width: int
    dit_noise: torch.Tensor  # [C, S, S] standard normal
    unet_noise: torch.Tensor  # [4, h, w] standard normal, unscaled
    preview_every: int = 0  # decoder steps between previews (0: none)
    stage: str = "prefill"  # prefill -> dit -> decoder -> vae -> done
    cond: torch.Tensor | None = None  # [Q, H] query states
    feats: torch.Tensor | None = None  # [Q, C] CLIP features
    latents: torch.Tensor | None = None  # [4, h, w] the decoder's final latents, waiting for the VAE
    pixels: Any = None  # its VAE decode in progress (PixelsRun)
    started: float = field(default_factory=time.perf_counter)
    marks: dict[str, float] = field(default_factory=dict)

    @property
    def latent_hw(self) -> tuple[int, int]:
        return tuple(self.unet_noise.shape[-2:])

    def mark(self, stage: str) -> None:
        self.marks[stage] = time.perf_counter()

    def timings(self) -> dict[str, float]:
        """Seconds per stage (wall time between the stage transitions, other requests' work included)."""
        out, last = {}, self.started
        for stage in ("prefill", "dit", "decoder", "vae"):
            if stage in self.marks:
                out[stage] = self.marks[stage] - last
                last = self.marks[stage]
        out["total"] = last - self.started
        return out


@dataclass
class StepTrace:
    """What the last `step()` ran, for benchmarks and diagnosis (`bench mixed` reports the steps behind its
    worst chat stall). Host seconds: on CUDA, work still queued on the stream when `step()` returns is not in
    them."""

    llm_s: float = 0.0  # the AR step (chat prefill chunks and decodes, T2I prefills)
    prompt_tokens: bool = False  # that AR step ran prompt tokens
    unit: str | None = None  # the image unit: "dit" | "decoder" | "vae"; "all" for run-to-completion policies
    unit_s: float = 0.0
    decoder_batch: int = 0  # images in the decoder step (unit "decoder")


@dataclass(eq=False)
class _DiTBatch:
    jobs: list[ImageJob]
    run: Any  # DiTRun / ReferenceDiTRun


class StepLoop:
    """The engine's requests and its step (module docstring)."""

    def __init__(self, ar, flow, decoder, scheduler: SchedulerConfig, device: torch.device,
                 uncond_features: Callable[[ImageParams], torch.Tensor] | None = None) -> None:
        self.ar, self.flow, self.decoder = ar, flow, decoder
        self.config = scheduler
        self.device = device
        self.uncond_features = uncond_features  # (params) -> [1, Q, C], cached by the engine
        if scheduler.dit_steps_per_iteration is not None:
            self.dit_chunk = scheduler.dit_steps_per_iteration
        else:  # see SchedulerConfig: the whole loop on CUDA (one graph), a few steps at a time on CPU
            self.dit_chunk = 1_000_000 if device.type == "cuda" else 3
        self.chats: dict[str, ChatRequest] = {}
        self.images: dict[str, ImageJob] = {}
        self._dit: deque[_DiTBatch] = deque()
        self._decoder_waiting: deque[ImageJob] = deque()
        self._vae_waiting: deque[ImageJob] = deque()  # decoder finished, latents taken, VAE not yet run
        self._next_unit = 0  # round robin over the image units (see the module docstring)
        self._deferred = False  # the last step skipped its image unit (`_defer_image_unit`)
        self._prompt_tokens_ran = False  # this step's LLM work held prompt tokens
        self.trace = StepTrace()  # what the last step ran

    # ------------------------------------------------------------------------------ requests

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.chats or request_id in self.images

    def add_chat(self, request: ChatRequest) -> None:
        self._check_new(request.request_id)
        self.ar.add_request(request.request_id, request.prompt, request.params)
        self.chats[request.request_id] = request

    def add_image(self, job: ImageJob) -> None:
        self._check_new(job.request_id)
        self.ar.add_t2i_request(job.request_id, job.prompt)
        self.images[job.request_id] = job

    @torch.inference_mode()
    def abort(self, request_id: str) -> bool:
        """Stop a request at any stage and free what it holds; False if unknown or finished."""
        if self.chats.pop(request_id, None) is not None:
            self.ar.abort(request_id)
            return True
        job = self.images.pop(request_id, None)
        if job is None:
            return False
        if job.stage == "prefill":
            self.ar.abort(request_id)
        elif job.stage == "decoder":
            self.decoder.release(request_id)
            if job in self._decoder_waiting:
                self._decoder_waiting.remove(job)
        elif job.stage == "vae":
            self._vae_waiting.remove(job)
        elif job.stage == "dit":  # its batch runs on for the others; a batch nobody wants any more is dropped
            for batch in list(self._dit):
                if job in batch.jobs and all(j.request_id not in self.images for j in batch.jobs):
                    self._dit.remove(batch)
        job.stage = "aborted"
        return True

    def has_unfinished(self) -> bool:
        return bool(self.chats or self.images)

    def stats(self) -> EngineStats:
        ar = self.ar.stats()
        by_stage = {"prefill": 0, "dit": 0, "decoder": 0, "vae": 0}
        for job in self.images.values():
            if job.stage in by_stage:
                by_stage[job.stage] += 1
        image_waiting = ar["t2i_waiting"] + len(self._decoder_waiting)  # VAE-waiting ones count as running
        return EngineStats(chat_running=ar["chat_running"], chat_waiting=ar["chat_waiting"],
                           image_running=len(self.images) - image_waiting, image_waiting=image_waiting,
                           kv_blocks_used=ar["kv_blocks_used"], kv_blocks_total=ar["kv_blocks_total"],
                           images_by_stage=by_stage)

    def _check_new(self, request_id: str) -> None:
        if not isinstance(request_id, str) or not request_id:
            raise InputError(f"request_id must be a non-empty string, got {request_id!r}")
        if request_id in self:
            raise InputError(f"request id {request_id!r} is already in use")

    # ------------------------------------------------------------------------------ the step

    @torch.inference_mode()
    def step(self) -> list[Output]:
        outputs: list[Output] = []
        policy = self.config.policy
        self.trace = trace = StepTrace()
        start = time.perf_counter()
        if policy != "interleave" and self._images_in_flight():
            trace.unit = "all"
            self._run_to_completion(outputs, one_at_a_time=policy == "serial")
            trace.unit_s = time.perf_counter() - start
            return outputs
        prefilled = self._llm_work(outputs)
        trace.llm_s, trace.prompt_tokens = time.perf_counter() - start, self._prompt_tokens_ran
        if self.decoder is None:  # a model without DiT/decoder: chat only
            return outputs
        self._group_for_dit(prefilled, alone=policy == "serial")
        if policy != "interleave":
            return outputs
        if self._defer_image_unit(outputs):
            self._deferred = True
            return outputs
        self._deferred = False
        start = time.perf_counter()
        trace.unit, trace.decoder_batch = self._one_image_unit(outputs)
        trace.unit_s = time.perf_counter() - start
        return outputs

    def _defer_image_unit(self, outputs: list[Output]) -> bool:
        """Skip this step's image unit when its LLM step also ran prompt tokens (a T2I prefill, a new chat's
        prompt chunk) while chats were decoding: those chats would wait prefill + decode + unit for their next
        token, more than the one decode step + one unit they wait otherwise (`bench mixed` measured a stall
        3% over that bound). The unit runs in the next step; never twice in a row, so a long chunked prefill
        slows image work by half at most instead of stopping it."""
        if self._deferred or not self._prompt_tokens_ran:
            return False
        return any(isinstance(o, RequestOutput) for o in outputs)

    def _images_in_flight(self) -> bool:
        """Image work past the prefill: DiT batches, images waiting for or in the decoder."""
        return self.decoder is not None and bool(self._dit or self._decoder_waiting or len(self.decoder)
                                                 or self._vae_waiting)

    def _llm_work(self, outputs: list[Output]) -> list[ImageJob]:
        """One AR step; returns the image jobs whose prefill finished."""
        self._prompt_tokens_ran = False
        if not self.ar.has_unfinished():
            return []
        try:
            results = self.ar.step()
        except Exception as e:  # noqa: BLE001 - one failed step fails its requests, not the engine
            for rid in self.ar.fail_pending_step():
                self._fail(rid, e, outputs)
            return []
        self._prompt_tokens_ran = self.ar.last_step_prefilled
        prefilled = []
        for out in results:
            if out.request_id in self.chats:
                if out.finished:
                    del self.chats[out.request_id]
                outputs.append(out)
            elif out.request_id in self.images:
                job = self.images[out.request_id]
                job.cond, job.stage = out.hidden_states, "dit"
                job.mark("prefill")
                outputs.append(ImageOutput(job.request_id, "prefill", 1, 1))
                prefilled.append(job)
        return prefilled

    def _group_for_dit(self, jobs: list[ImageJob], alone: bool = False) -> None:
        """New DiT batches: the jobs that share step count and CFG on/off run together (each job alone for
        the serial policy: one request at a time)."""
        groups: dict[tuple[int, bool] | int, list[ImageJob]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(i if alone else (job.params.dit_steps, job.params.dit_guidance > 1.0), []).append(job)
        for group in groups.values():
            steps = group[0].params.dit_steps
            cond = torch.stack([j.cond for j in group])  # [B, Q, H]
            noise = torch.stack([j.dit_noise for j in group]).to(self.device)  # [B, C, S, S]
            run = self.flow.begin(cond, noise, steps, [j.params.dit_guidance for j in group])
            self._dit.append(_DiTBatch(group, run))

    def _run_to_completion(self, outputs: list[Output], one_at_a_time: bool) -> None:
        """The baselines' image work, inside one step: "static" runs every DiT batch, then the decoder over all
        of them, to the end; "serial" runs one image (its own DiT batch) through DiT, decoder and VAE, then
        the next."""
        while self._images_in_flight():
            for _ in range(1 if one_at_a_time else len(self._dit)):
                self._advance_dit(outputs, dit_steps=1_000_000)  # a whole DiT loop: the batch leaves the queue
            self._admit_to_decoder(outputs)
            while len(self.decoder):
                self._decoder_step(outputs)
            while self._vae_waiting:
                self._vae(outputs)

    def _one_image_unit(self, outputs: list[Output]) -> tuple[str | None, int]:
        """The next unit in turn that has work: a DiT chunk, one decoder step, or one VAE piece. Returns the
        unit's name (None: no image work) and the decoder's batch when it ran."""
        self._admit_to_decoder(outputs)
        units = (("dit", lambda: bool(self._dit), lambda: self._advance_dit(outputs, self.dit_chunk)),
                 ("decoder", lambda: len(self.decoder) > 0, lambda: self._decoder_step(outputs)),
                 ("vae", lambda: bool(self._vae_waiting), lambda: self._vae(outputs)))
        for i in range(len(units)):
            k = (self._next_unit + i) % len(units)
            name, has_work, run = units[k]
            if has_work():
                self._next_unit = (k + 1) % len(units)
                batch = len(self.decoder) if name == "decoder" else 0
                run()
                self._admit_to_decoder(outputs)  # a slot freed or features ready: join the next decoder step
                return name, batch
        return None, 0

    def _advance_dit(self, outputs: list[Output], dit_steps: int) -> None:
        if not self._dit:
            return
        batch = self._dit[0]
        try:
            done = self.flow.advance(batch.run, dit_steps)
            feats = self.flow.result(batch.run) if done else None
        except Exception as e:  # noqa: BLE001
            self._dit.popleft()
            for job in batch.jobs:
                self._fail(job.request_id, e, outputs)
            return
        if not done:
            for job in batch.jobs:
                if job.request_id in self.images:
                    outputs.append(ImageOutput(job.request_id, "dit", batch.run.done, batch.run.steps))
            return
        self._dit.popleft()
        for job, f in zip(batch.jobs, feats):
            if job.request_id not in self.images:
                continue  # aborted meanwhile
            job.feats, job.stage = f, "decoder"
            job.mark("dit")
            outputs.append(ImageOutput(job.request_id, "dit", job.params.dit_steps, job.params.dit_steps))
            self._decoder_waiting.append(job)

    def _admit_to_decoder(self, outputs: list[Output]) -> None:
        while self._decoder_waiting and self.decoder.has_room(self._decoder_waiting[0].latent_hw):
            job = self._decoder_waiting.popleft()
            p = job.params
            try:
                uncond = self.uncond_features(p)[0]  # [Q, C], the engine's cached null features
                self.decoder.admit(job.request_id, job.feats, uncond, job.unet_noise, p.decoder_steps,
                                   p.decoder_guidance)
            except Exception as e:  # noqa: BLE001
                self._fail(job.request_id, e, outputs)

    def _decoder_step(self, outputs: list[Output]) -> None:
        """One denoising step of the decoder batch; finished images hand their latents to the VAE queue."""
        if not len(self.decoder):
            return
        try:
            progress = self.decoder.step()
        except Exception as e:  # noqa: BLE001 - the whole batch's step is lost
            for job in [j for j in self.images.values() if j.stage == "decoder"]:
                if job not in self._decoder_waiting:
                    self.decoder.release(job.request_id)
                    self._fail(job.request_id, e, outputs)
            return
        for p in progress:
            job = self.images[p.key]
            preview = None
            if job.preview_every and not p.finished and p.step % job.preview_every == 0:
                preview = self._preview(job)
            outputs.append(ImageOutput(job.request_id, "decoder", p.step, p.total, preview=preview))
            if p.finished:
                job.latents = self.decoder.take(job.request_id)  # frees its slot for the next image now
                job.stage = "vae"
                job.mark("decoder")
                self._vae_waiting.append(job)

    def _vae(self, outputs: list[Output]) -> None:
        """One piece of the VAE of the oldest image whose decoder finished (`PixelDecoder.advance_pixels`: a
        few up blocks; the whole VAE at 1024² outlasts a decoder step). One image at a time: the VAE's
        working set at 1024² is the engine's largest activation (runtime/memory.py)."""
        job = self._vae_waiting[0]
        try:
            if job.pixels is None:
                job.pixels = self.decoder.begin_pixels(job.latents[None])
            finished = self.decoder.advance_pixels(job.pixels)
        except Exception as e:  # noqa: BLE001
            self._vae_waiting.popleft()
            self._fail(job.request_id, e, outputs)
            return
        run = job.pixels
        if not finished:
            outputs.append(ImageOutput(job.request_id, "vae", run.done, run.total))
            return
        self._vae_waiting.popleft()
        pixels = run.x[0].cpu().numpy()  # [H, W, 3] uint8
        job.mark("vae")
        job.stage = "done"
        del self.images[job.request_id]
        result = ImageResult(Image.fromarray(pixels), job.feats, job.seed, job.timings())
        outputs.append(ImageOutput(job.request_id, "vae", run.total, run.total, finished=True, result=result))

    def _preview(self, job: ImageJob) -> Image.Image | None:
        """The image decoded from the decoder's current x0 prediction (a full VAE decode: previews cost one
        VAE call each, which is why they are opt-in)."""
        x0 = self.decoder.preview(job.request_id)
        return Image.fromarray(self.decoder.latents_to_pixels(x0[None])[0].cpu().numpy())

    def _fail(self, request_id: str, error: BaseException, outputs: list[Output]) -> None:
        """End one request with an error output (its work is lost; the loop goes on)."""
        message = f"{type(error).__name__}: {error}"
        if self.chats.pop(request_id, None) is not None:
            self.ar.abort(request_id)
            outputs.append(RequestOutput(request_id, [], "", True, "error", error=message, exception=error))
            return
        job = self.images.pop(request_id, None)
        if job is not None:
            stage = job.stage if job.stage in ("prefill", "dit", "decoder", "vae") else "prefill"
            job.stage = "failed"
            if stage == "prefill":
                self.ar.abort(request_id)
            elif stage == "decoder":
                self.decoder.release(request_id)
            outputs.append(ImageOutput(request_id, stage, 0, 0, finished=True, error=message, exception=error))


__all__ = ["ChatRequest", "ImageJob", "Output", "StepLoop", "StepTrace"]
