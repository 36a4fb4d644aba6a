"""`Engine`: the public, synchronous entry point — chat, text-to-image, the request-level interface and the
stage methods parity tests and exporters use.

Everything runs through ONE step loop (`runtime/step_loop.py`): `add_request` (chat) and `add_image_request`
queue typed requests, `step()` advances all of them by one engine iteration and returns their outputs
(`RequestOutput`, `ImageOutput`). `chat`, `chat_batch`, `chat_stream`, `generate_image` and `generate_images`
are thin drivers of that loop: they submit their own requests and step until those finish, and anything the
steps produce for other requests (a server's, queued with `add_request`) is kept for the next `step()`.

Backends (the same loop, different stages):
- "optimized": the paged AR stage (`ARStage`: paged KV, prefix caching, continuous batching, CUDA-graph
  decode), the hoisted and captured DiT loop (`FlowSampler`), the continuously batched decoder
  (`PixelDecoder`, compiled on CUDA). Its T2I prefills always run through the paged AR stage, batched with
  chat; the decoder's null features are computed alone, once, so they never depend on call history.
- "reference": the plain-PyTorch oracle (`ReferenceAR`, `ReferenceFlow`, `ReferenceDecoder`): one request at a
  time, every model call on the torch twins of the ops.

Memory is planned once at construction (`runtime/memory.py`, `memory_plan()`); configuration is one tree
(`EngineConfig`).
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .config import PRESETS, TRAINED_PRESETS, ModelConfig, device_from_name, dtype_from_name, preset_config
from .engine_config import EngineConfig
from .errors import CheckpointNotFoundError, ConfigError, InputError
from .models.blip3o import Blip3oModel, load_model, random_model
from .outputs import ChatResult, EngineStats, ImageOutput, ImageResult, RequestOutput, raise_failure
from .params import ImageParams, SamplingParams, as_image_params, as_sampling_params
from .prompts import PreparedPrompt, PromptBuilder
from .runtime import memory
from .runtime.limits import check_context
from .runtime.step_loop import ChatRequest, ImageJob, Output, StepLoop
from .tiny import CHECKPOINT_PRESETS, preset_checkpoint
from .tokenization import SpecialTokens, load_image_processor, load_tokenizer

BACKENDS = ("reference", "optimized")
# Progress reporting: True draws tqdm bars; a callable gets (stage, step, total) with stage in
# {"dit", "decoder"} and step the 0-based index of the step just done.
Progress = bool | Callable[[str, int, int], None]
# Every `params` argument takes the params object, a dict of its fields, or None (the defaults).
SamplingParamsLike = SamplingParams | dict[str, Any] | None
ImageParamsLike = ImageParams | dict[str, Any] | None


class Engine:
    def __init__(self, model: Blip3oModel, tokenizer: Any, image_processor: Any, backend: str = "reference",
                 name: str = "custom", config: EngineConfig | None = None, compile: bool | None = None) -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        config = config or EngineConfig()
        if compile is not None:
            config = config.with_overrides(compile_decoder=compile)
        self.model = model
        self.cfg: ModelConfig = model.cfg
        self.config = config
        self.tokenizer = tokenizer
        self.special = SpecialTokens.from_tokenizer(tokenizer, require_generation=self.cfg.dit is not None)
        self.prompts = PromptBuilder(tokenizer, image_processor, self.special, self.cfg.vision.spatial_merge_size)
        self.backend = backend
        self.name = name
        self.is_random_preset = False
        # Stage-1 features of the decoder's null prompt " ", computed once per engine (as the official
        # pipeline caches them per process), keyed by the DiT settings that made them.
        self._uncond_cache: dict[tuple[int, float], torch.Tensor] = {}
        self._owned: dict[str, deque[Output]] = {}  # requests a driver of this engine consumes
        self._user_outputs: list[Output] = []  # outputs of add_request'ed requests produced by a driver's steps
        from .runtime.stages import build_stages  # the runtime, per backend

        stages = build_stages(self)
        self._plan, self._ar, self._flow, self._decoder, self.graph_caches = stages
        self._loop = StepLoop(self._ar, self._flow, self._decoder, config.scheduler, self.device,
                              self.uncond_features if self.cfg.can_generate_images else None)

    # ------------------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(cls, model: str | Path = "tiny", device: str | torch.device = "cpu",
                        dtype: str | torch.dtype = "float32", backend: str = "reference",
                        config: EngineConfig | None = None, compile: bool | None = None,
                        kv_blocks: int | None = None, **options: Any) -> Engine:
        """Load a checkpoint directory, or a preset: "tiny"/"small" (random weights, made on first use in the
        cache dir) or "4b"/"8b" (the real shapes with random weights, for benchmarks).

        config: the engine configuration tree; keyword shortcuts override single fields of it: `compile`
        (decoder torch.compile), `kv_blocks` (= cache.num_blocks), and any field name of `EngineConfig`'s
        sections, e.g. `block_size=16, max_num_seqs=32, max_num_batched_tokens=2048, max_image_batch=4`."""
        if backend not in BACKENDS:  # fail before minutes of weight loading
            raise ConfigError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        config = config or EngineConfig()
        if kv_blocks is not None:
            options["num_blocks"] = kv_blocks
        if options:
            config = config.with_overrides(**options)
        torch_dtype = dtype_from_name(dtype)
        device = device_from_name(device)
        name = str(model)
        is_preset = name.lower() in PRESETS and not Path(name).is_dir()
        if is_preset and name.lower() not in CHECKPOINT_PRESETS:
            tiny = preset_checkpoint("tiny")  # 4b/8b shapes, random weights; text I/O through the tiny tokenizer
            weights = random_model(preset_config(name.lower()), dtype=torch_dtype, device=device)
            tokenizer, processor = load_tokenizer(tiny), load_image_processor(tiny)
        else:
            path = preset_checkpoint(name.lower()) if is_preset else Path(name)
            if not path.is_dir():
                raise CheckpointNotFoundError(
                    f"{name!r} is neither a checkpoint directory nor a preset ({', '.join(PRESETS)})")
            weights = load_model(path, ModelConfig.from_checkpoint(path), torch_dtype, device)
            tokenizer, processor = load_tokenizer(path), load_image_processor(path)
        engine = cls(weights, tokenizer, processor, backend, name=name, config=config, compile=compile)
        engine.is_random_preset = is_preset and name.lower() not in TRAINED_PRESETS  # demo is trained
        return engine

    @classmethod
    def from_exported(cls, path: str | Path, runtime: str = "onnxruntime", device: str | torch.device = "cpu",
                      threads: int | None = None) -> Engine:
        """An engine over the stages written by `blip3o-engine export` (runtime: onnxruntime, aoti or tensorrt):
        the reference backend's stages and samplers, each model call an exported graph
        (`blip3o_engine/export/pipeline.py`)."""
        from .export.api import from_exported

        return from_exported(path, runtime=runtime, device=device, threads=threads)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def max_model_len(self) -> int:
        """The longest request (prompt + max_tokens) this engine accepts."""
        return self._ar.max_model_len

    def memory_plan(self) -> memory.MemoryPlan:
        """What the engine planned at start-up: weights, KV pool, each stage's working set, graph pool,
        headroom (`MemoryPlan.summary()` prints it)."""
        return self._plan

    def stats(self) -> EngineStats:
        """Requests running and waiting per kind, KV blocks used and total, images in each stage."""
        return self._loop.stats()

    # ------------------------------------------------------------------------------ request-level interface

    def add_request(self, request_id: str, messages: list[dict[str, Any]] | PreparedPrompt,
                    params: SamplingParamsLike = None) -> None:
        """Queue a chat request (a conversation, or a prompt from `self.prompts.chat`); its outputs come from
        `step()`. Raises InputError for a bad conversation, an id in use, or a request past max_model_len;
        CapacityError if it could never fit the KV pool."""
        params = as_sampling_params(params)
        prompt = messages if isinstance(messages, PreparedPrompt) else self.prompts.chat(messages)
        self._loop.add_chat(ChatRequest(request_id, prompt, params))

    def add_image_request(self, request_id: str, prompt: str, params: ImageParamsLike = None,
                          image: Any = None, preview_every: int = 0) -> int:
        """Queue a text-to-image request (optionally conditioned on `image`); its `ImageOutput`s come from
        `step()`, the last one with the `ImageResult`. Returns the seed it will use (drawn when params.seed is
        None). preview_every: decode the decoder's x0 prediction into `ImageOutput.preview` every that many
        decoder steps (0 = never; each preview costs one VAE decode)."""
        params = as_image_params(params)
        seed = params.image_seeds(1)[0]
        self._loop.add_image(self._image_job(request_id, self._t2i_prompt(prompt, image), params, seed,
                                             preview_every))
        return seed

    def step(self) -> list[Output]:
        """One engine iteration; the outputs of the requests queued with add_request / add_image_request."""
        if not self._user_outputs:
            self._drive()
        out, self._user_outputs = self._user_outputs, []
        return out

    def abort(self, request_id: str) -> bool:
        """Stop a request at any stage and free everything it holds; False if unknown or already finished."""
        self._owned.pop(request_id, None)
        return self._loop.abort(request_id)

    def has_unfinished(self) -> bool:
        return self._loop.has_unfinished() or bool(self._user_outputs)

    def _drive(self) -> None:
        """One loop step; outputs go to their owner (a driver's queue, or the next `step()`)."""
        for out in self._loop.step():
            queue = self._owned.get(out.request_id)
            if queue is not None:
                queue.append(out)
            else:
                self._user_outputs.append(out)

    def _submit_owned(self, submit: Callable[[str], Any]) -> str:
        """Submit a request under a fresh id that this engine's driver consumes."""
        rid = f"{self.backend}-{uuid.uuid4().hex}"
        self._owned[rid] = deque()
        try:
            submit(rid)
        except BaseException:
            del self._owned[rid]
            raise
        return rid

    def _next_owned(self, rid: str) -> Output:
        """The next output of a driver-owned request, stepping the loop (for everyone) as needed."""
        queue = self._owned[rid]
        while not queue:
            if not self._loop.has_unfinished():
                raise RuntimeError(f"request {rid} vanished from the step loop without finishing")
            self._drive()
        return queue.popleft()

    def _release_owned(self, rids: list[str]) -> None:
        """Forget driver-owned requests; those still running are aborted (a consumer stopped early)."""
        for rid in rids:
            if self._owned.pop(rid, None) is not None:
                self._loop.abort(rid)

    # ------------------------------------------------------------------------------ chat

    def chat(self, messages: list[dict[str, Any]], params: SamplingParamsLike = None) -> ChatResult:
        return self.chat_batch([messages], [as_sampling_params(params)])[0]

    def chat_batch(self, conversations: list[list[dict[str, Any]]],
                   params: SamplingParamsLike | list[SamplingParamsLike] = None) -> list[ChatResult]:
        """Answer several conversations; results are in input order. Every conversation is validated before
        any work starts, so a bad one fails the call without partial results. They run together, continuously
        batched (the reference backend: one token of each in turn)."""
        if not isinstance(conversations, list):
            raise InputError("chat_batch expects a list of conversations")
        plist = params if isinstance(params, list) else [params] * len(conversations)
        if len(plist) != len(conversations):
            raise InputError(f"{len(conversations)} conversations but {len(plist)} SamplingParams")
        plist = [as_sampling_params(p) for p in plist]
        prompts = [self.prompts.chat(m) for m in conversations]
        for prompt, p in zip(prompts, plist):
            self._check_context(len(prompt.token_ids) + p.max_tokens)
        start = time.perf_counter()
        rids: list[str] = []
        try:
            for prompt, p in zip(prompts, plist):
                rids.append(self._submit_owned(lambda rid: self._loop.add_chat(ChatRequest(rid, prompt, p))))
            results = []
            for rid in rids:
                out = self._finish_chat(rid)
                results.append(ChatResult(out.text, out.token_ids, out.finish_reason, out.prompt_tokens,
                                          {"total": time.perf_counter() - start}))
            return results
        finally:
            self._release_owned(rids)

    def _finish_chat(self, rid: str) -> RequestOutput:
        out = self._next_owned(rid)
        while not out.finished:
            out = self._next_owned(rid)
        if out.error is not None:
            raise_failure(out)
        return out

    def chat_stream(self, messages: list[dict[str, Any]], params: SamplingParamsLike = None) -> Iterator[str]:
        """Yield the answer's text in pieces as it is generated; the pieces concatenate to `chat`'s text."""
        params = as_sampling_params(params)
        prompt = self.prompts.chat(messages)
        self._check_context(len(prompt.token_ids) + params.max_tokens)
        rid = self._submit_owned(lambda r: self._loop.add_chat(ChatRequest(r, prompt, params)))
        try:
            while True:
                out = self._next_owned(rid)
                if out.error is not None:
                    raise_failure(out)
                if out.text_delta:
                    yield out.text_delta
                if out.finished:
                    return
        finally:  # the consumer stopped early (or an error): do not leave the request running
            self._release_owned([rid])

    def _check_context(self, total_tokens: int, what: str = "prompt + max_tokens") -> None:
        check_context(what, total_tokens, self.max_model_len, self.cfg.text.max_position_embeddings)

    # ------------------------------------------------------------------------------ text-to-image

    def generate_image(self, prompt: str, params: ImageParamsLike = None, image: Any = None,
                       progress: Progress = False) -> ImageResult:
        return self.generate_images([prompt], params, images=[image], progress=progress)[0]

    def generate_images(self, prompts: list[str], params: ImageParamsLike = None,
                        images: list[Any] | None = None, progress: Progress = False) -> list[ImageResult]:
        """Text-to-image for each prompt (optionally conditioned on an input image each).

        The prompts run through the step loop together (continuously batched, at most `params.max_batch_size`
        of them in flight). Image i uses seed `params.seed + i` for its noise, so its result does not depend
        on the batch it ran in. Every prompt and image is validated before any work starts.
        """
        params = as_image_params(params)
        self._require_generation()
        if isinstance(prompts, str) or not isinstance(prompts, list) or not prompts:
            raise InputError("generate_images expects a non-empty list of prompt strings")
        images = images if images is not None else [None] * len(prompts)
        if len(images) != len(prompts):
            raise InputError(f"{len(prompts)} prompts but {len(images)} images")
        seeds = params.image_seeds(len(prompts))
        prepared = [self._t2i_prompt(p, img) for p, img in zip(prompts, images)]
        self.uncond_features(params)  # the null features first: their one-off cost is not any image's
        cap = params.max_batch_size or len(prepared)
        todo = deque(enumerate(prepared))
        running: dict[str, int] = {}
        results: list[ImageResult | None] = [None] * len(prepared)
        report = _progress_reporter(progress)
        try:
            while todo or running:
                while todo and len(running) < cap:
                    i, prompt = todo.popleft()
                    rid = self._submit_owned(lambda r: self._loop.add_image(
                        self._image_job(r, prompt, params, seeds[i], 0)))
                    running[rid] = i
                self._drive_images(running, results, report, len(prepared) - 1)
            return results
        finally:
            report.close()
            self._release_owned(list(running))

    def _drive_images(self, running: dict[str, int], results: list, report, progress_index: int) -> None:
        """One loop step (if nothing is queued yet) and the outputs of this call's images. Progress follows
        the call's last image (`progress_index`): it is admitted last, so it finishes last."""
        if not any(self._owned[r] for r in running):
            self._drive()
        for rid in list(running):
            queue = self._owned[rid]
            while queue:
                out = queue.popleft()
                if running[rid] == progress_index and isinstance(out, ImageOutput):
                    report(out)
                if out.finished:
                    if out.error is not None:
                        raise_failure(out)
                    results[running.pop(rid)] = out.result
                    del self._owned[rid]
                    break

    def encode_prompt(self, prompt: str, image: Any = None) -> torch.Tensor:
        """Stage-1 prefill: the 64 query hidden states [Q, H] for a caption (and optional image), computed
        alone."""
        self._require_generation()
        return self._ar.encode_alone(self._t2i_prompt(prompt, image))

    def sample_clip_features(self, cond: torch.Tensor, params: ImageParamsLike = None,
                             noise: torch.Tensor | None = None, progress: Progress = False) -> torch.Tensor:
        """DiT flow matching: query states [B, Q, H] -> CLIP features [B, Q, C].
        noise: [B, C, S, S] standard normal; None draws it from `params.seed` (+ i for row i)."""
        params = as_image_params(params)
        self._require_generation()
        if cond.ndim != 3 or cond.shape[1:] != (self.cfg.n_query, self.cfg.text.hidden_size):
            raise InputError(f"cond must be [B, {self.cfg.n_query}, {self.cfg.text.hidden_size}], got {list(cond.shape)}")
        b = cond.shape[0]
        if noise is None:
            noise = self._draw_noise(params.image_seeds(b), [self._dit_noise_shape()])[0]
        noise = self._check_noise(noise, (b, *self._dit_noise_shape()))
        report = _progress_reporter(progress)
        try:
            callback = None if report.empty else (lambda i, n: report(ImageOutput("", "dit", i + 1, n)))
            return self._flow.sample(cond.to(self.device, self.model.dtype), noise, params.dit_steps,
                                     params.dit_guidance, callback)
        finally:
            report.close()

    def decode_pixels(self, feats: torch.Tensor, params: ImageParamsLike = None,
                      noise: torch.Tensor | None = None, uncond: torch.Tensor | None = None,
                      progress: Progress = False) -> list:
        """Pixel decoder: CLIP features [B, Q, C] -> PIL images.
        noise: [B, 4, H/8, W/8] standard normal before scaling by the scheduler's initial sigma
        (None = drawn from `params.seed` + row, after that seed's DiT noise, as generate_image does).
        uncond: [1 or B, Q, C] null features (None = the cached stage-1 features of " ")."""
        from PIL import Image

        params = as_image_params(params)
        self._require_generation()
        height, width = self.image_size(params)
        q, c = self.cfg.n_query, self.cfg.dit.in_channels
        if feats.ndim != 3 or feats.shape[1:] != (q, c):
            raise InputError(f"features must be [B, {q}, {c}], got {list(feats.shape)}")
        b = feats.shape[0]
        uncond = self.uncond_features(params) if uncond is None else uncond
        if uncond.ndim != 3 or uncond.shape[0] not in (1, b) or uncond.shape[1:] != (q, c):
            raise InputError(f"uncond must be [1 or {b}, {q}, {c}], got {list(uncond.shape)}")
        latent_shape = self._latent_shape(height, width)
        if noise is None:  # the seed's stream: DiT noise first, then UNet noise (official order, docs/model_spec.md §1.7)
            noise = self._draw_noise(params.image_seeds(b), [self._dit_noise_shape(), latent_shape])[1]
        noise = self._check_noise(noise, (b, *latent_shape))
        dtype = self.model.dtype
        report = _progress_reporter(progress)
        try:
            callback = None if report.empty else (lambda i, n: report(ImageOutput("", "decoder", i + 1, n)))
            pixels = self._decode_whole(feats.to(self.device, dtype), uncond.to(self.device, dtype).expand(b, -1, -1),
                                        noise, params, callback)
        finally:
            report.close()
        return [Image.fromarray(p) for p in pixels.cpu().numpy()]

    def _decode_whole(self, feats, uncond, noise, params: ImageParams, callback) -> torch.Tensor:
        """The decoder stage's own whole-batch path (admit, step, VAE), outside the step loop."""
        keys = [("stage", uuid.uuid4().hex, i) for i in range(feats.shape[0])]
        for key, f, u, n in zip(keys, feats, uncond, noise):
            self._decoder.admit(key, f, u, n, params.decoder_steps, params.decoder_guidance)
        try:
            for i in range(params.decoder_steps):
                self._decoder.step()
                if callback is not None:
                    callback(i, params.decoder_steps)
            latents = torch.stack([self._decoder.take(k) for k in keys])
        finally:
            for key in keys:
                self._decoder.release(key)
        return self._decoder.latents_to_pixels(latents)

    def uncond_features(self, params: ImageParamsLike = None) -> torch.Tensor:
        """Stage-1 features of the raw text " " [1, Q, C]: the decoder's CFG null (docs/model_spec.md §1.6). Computed once
        per engine and DiT setting, alone (its prefill in its own step, its DiT loop in a batch of one) from a
        fixed seed (0), so they never depend on what else ran."""
        params = as_image_params(params)
        self._require_generation()
        key = (params.dit_steps, float(params.dit_guidance))
        if key not in self._uncond_cache:
            cond = self._ar.encode_alone(self.prompts.t2i_uncond())[None]  # [1, Q, H]
            noise = self._draw_noise([0], [self._dit_noise_shape()])[0]
            self._uncond_cache[key] = self._flow.sample(cond, noise, params.dit_steps, params.dit_guidance)
        return self._uncond_cache[key]

    # ------------------------------------------------------------------------------ helpers

    def image_size(self, params: ImageParams) -> tuple[int, int]:
        """(height, width) of a request; InputError unless multiples of `cfg.image_size_step`."""
        return self.cfg.image_size(params.height, params.width)

    def _t2i_prompt(self, prompt: str, image: Any = None) -> PreparedPrompt:
        self._require_generation()
        if not isinstance(prompt, str):
            raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
        prepared = self.prompts.t2i(prompt, image)
        self._check_context(len(prepared.token_ids) + self.cfg.n_query,
                            f"prompt + {self.cfg.n_query} latent queries")
        return prepared

    def _image_job(self, request_id: str, prompt: PreparedPrompt, params: ImageParams, seed: int,
                   preview_every: int) -> ImageJob:
        self._require_generation()
        height, width = self.image_size(params)
        self._plan.check_image_size(height, width)
        if not isinstance(preview_every, int) or preview_every < 0:
            raise InputError(f"preview_every must be an int >= 0, got {preview_every!r}")
        dit_noise, unet_noise = self._draw_noise([seed], [self._dit_noise_shape(), self._latent_shape(height, width)])
        return ImageJob(request_id, prompt, params, seed, height, width, dit_noise[0], unet_noise[0], preview_every)

    def _dit_noise_shape(self) -> tuple[int, int, int]:
        dit = self.cfg.dit
        return (dit.in_channels, dit.input_size, dit.input_size)

    def _latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.cfg.vae.scale_factor
        return (self.cfg.unet.in_channels, height // f, width // f)

    def _draw_noise(self, seeds: list[int], shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
        """Standard normal noise per row from a CPU generator seeded with that row's seed (device-
        independent); each row draws `shapes` in order and one stacked tensor per shape is returned."""
        gens = [torch.Generator().manual_seed(seed) for seed in seeds]
        return [torch.stack([torch.randn(shape, generator=g) for g in gens]).to(self.device) for shape in shapes]

    def _check_noise(self, noise: torch.Tensor, want: tuple[int, ...]) -> torch.Tensor:
        if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != want:
            got = list(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
            raise InputError(f"noise must have shape {list(want)}, got {got}")
        return noise.to(self.device, torch.float32)

    def _require_generation(self) -> None:
        if not self.cfg.can_generate_images:
            raise ConfigError(f"model {self.name!r} has no DiT/decoder: it can chat but not generate images")


# ------------------------------------------------------------------------------------------------
# Parameters and progress


class _ProgressReporter:
    """Routes ImageOutputs to tqdm bars (progress=True), a callable (stage, step index, total), or nowhere."""

    def __init__(self, progress: Progress) -> None:
        self.callback = progress if callable(progress) else None
        self.bars: dict[str, Any] = {} if progress is True else None
        self.seen: dict[str, int] = {}

    @property
    def empty(self) -> bool:
        return self.callback is None and self.bars is None

    def __call__(self, out: ImageOutput) -> None:
        if out.stage not in ("dit", "decoder") or out.step < 1:
            return
        start = self.seen.get(out.stage, 0)
        for step in range(start, out.step):  # one call per step, also for a chunk of DiT steps at once
            if self.callback is not None:
                self.callback(out.stage, step, out.total)
            if self.bars is not None:
                self._tick(out.stage, out.total)
        self.seen[out.stage] = max(start, out.step)

    def _tick(self, stage: str, total: int) -> None:
        from tqdm.auto import tqdm

        if stage not in self.bars:
            self.bars[stage] = tqdm(total=total, desc=stage, unit="step", leave=False)
        self.bars[stage].update(1)

    def close(self) -> None:
        for bar in (self.bars or {}).values():
            bar.close()


def _progress_reporter(progress: Progress) -> _ProgressReporter:
    return _ProgressReporter(progress)


__all__ = ["BACKENDS", "Engine", "ImageParamsLike", "Progress", "SamplingParamsLike"]
