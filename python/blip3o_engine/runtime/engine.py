"""`Engine`: the public entry point (chat, text-to-image, and the stage methods parity tests use).

Backends: "reference" runs `runtime/reference.py` one request at a time. "optimized" runs
text-to-image through `runtime/t2i.py::OptimizedT2I` (batched prefill, hoisted and graph-captured
DiT loop, cached-K/V and compiled decoder) and chat through `runtime/llm_engine.py::LLMEngine`
(paged KV cache, prefix caching, continuous batching, CUDA-graph decode on GPU). Once that AR engine
exists (chat has been used), the optimized backend's T2I prefill runs through it too, batched with
the chat requests in flight (`_paged_t2i_prefill`).

Request-level chat (`add_request` / `step` / `abort`) works on either backend: it always runs the
LLMEngine, built on first use. `chat_stream` on the reference backend streams
`reference.stream_text`'s deltas (a full decode per token: readable, not fast).
"""

from __future__ import annotations

import contextlib
import itertools
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..config import PRESETS, ModelConfig, dtype_from_name, preset_config
from ..errors import CheckpointNotFoundError, ConfigError, InputError
from ..models.blip3o import Blip3oModel, load_model, random_model
from ..outputs import ChatResult, ImageResult
from ..params import ImageParams, SamplingParams
from ..prompts import PreparedPrompt, PromptBuilder
from ..tiny import CHECKPOINT_PRESETS, preset_checkpoint
from ..tokenization import SpecialTokens, load_image_processor, load_tokenizer
from . import reference
from .llm_engine import LLMEngine, RequestOutput
from .model_runner import RunnerConfig
from .t2i import OptimizedT2I, ReferenceT2I

BACKENDS = ("reference", "optimized")
# Progress reporting: True draws tqdm bars; a callable gets (stage, step, total) with stage in
# {"dit", "decoder"}.
Progress = bool | Callable[[str, int, int], None]


class Engine:
    def __init__(self, model: Blip3oModel, tokenizer: Any, image_processor: Any, backend: str = "reference",
                 name: str = "custom", compile: bool | None = None, runner_config: RunnerConfig | None = None):
        if backend not in BACKENDS:
            raise ConfigError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        self.model = model
        self.cfg: ModelConfig = model.cfg
        self.tokenizer = tokenizer
        self.special = SpecialTokens.from_tokenizer(tokenizer, require_generation=self.cfg.dit is not None)
        self.prompts = PromptBuilder(tokenizer, image_processor, self.special, self.cfg.vision.spatial_merge_size)
        self.backend = backend
        self.name = name
        # Optimized backend only: torch.compile the decoder (None = on CUDA, off on CPU, where
        # inductor needs minutes on a 2-core machine before the first image).
        self.compile = compile
        self.is_random_preset = False
        # Stage-1 features of the decoder's null prompt " ", computed once per engine (as the
        # official pipeline caches them per process), keyed by the DiT settings that made them.
        self._uncond_cache: dict[tuple[int, float], torch.Tensor] = {}
        self._runner: ReferenceT2I | None = None
        # AR chat engine (paged KV pool, continuous batching), built on first use from runner_config.
        self.runner_config = runner_config or RunnerConfig()
        self._llm: LLMEngine | None = None
        self._chat_ids = itertools.count()
        self._inbox: dict[str, list[RequestOutput]] = {}  # outputs of chat()/chat_stream()'s own requests
        self._outbox: list[RequestOutput] = []  # outputs of add_request()'s requests, for the next step()

    # ------------------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(cls, model: str | Path = "tiny", device: str | torch.device = "cpu",
                        dtype: str | torch.dtype = "float32", backend: str = "reference",
                        compile: bool | None = None, kv_blocks: int | None = None, block_size: int = 16,
                        max_num_seqs: int = 32, max_num_batched_tokens: int = 2048) -> Engine:
        """Load a checkpoint directory, or a preset: "tiny"/"small" (random weights, made on first use
        in the cache dir) or "4b"/"8b" (the real shapes with random weights, for benchmarks).

        kv_blocks, block_size, max_num_seqs, max_num_batched_tokens size the AR engine's paged KV pool
        and batches (kv_blocks None: two full contexts on CPU, what fits the free memory on CUDA)."""
        if backend not in BACKENDS:  # fail before minutes of weight loading
            raise ConfigError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        runner_config = RunnerConfig(block_size=block_size, num_blocks=kv_blocks, max_num_seqs=max_num_seqs,
                                     max_num_batched_tokens=max_num_batched_tokens)
        torch_dtype = dtype_from_name(dtype)
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' requested but CUDA is not available")
        name = str(model)
        is_preset = name.lower() in PRESETS and not Path(name).is_dir()
        if is_preset and name.lower() not in CHECKPOINT_PRESETS:
            return cls._random_real_shapes(name.lower(), device, torch_dtype, backend, compile, runner_config)
        path = preset_checkpoint(name.lower()) if is_preset else Path(name)
        if not path.is_dir():
            raise CheckpointNotFoundError(
                f"{name!r} is neither a checkpoint directory nor a preset ({', '.join(PRESETS)})")
        cfg = ModelConfig.from_checkpoint(path)
        weights = load_model(path, cfg, torch_dtype, device)
        engine = cls(weights, load_tokenizer(path), load_image_processor(path), backend, name=name, compile=compile,
                     runner_config=runner_config)
        engine.is_random_preset = is_preset
        return engine

    @classmethod
    def from_exported(cls, path: str | Path, runtime: str = "onnxruntime", device: str | torch.device = "cpu",
                      threads: int | None = None) -> Engine:
        """An engine over the stages written by `blip3o-engine export` (runtime: onnxruntime, aoti or
        tensorrt): this class's reference orchestration, each model call an exported graph
        (`blip3o_engine/export/pipeline.py`)."""
        from ..export.api import from_exported

        return from_exported(path, runtime=runtime, device=device, threads=threads)

    @classmethod
    def _random_real_shapes(cls, name: str, device: torch.device, dtype: torch.dtype, backend: str,
                            compile: bool | None, runner_config: RunnerConfig | None = None) -> Engine:
        """4b/8b shapes with random weights; text I/O through the tiny tokenizer (benchmarks only)."""
        tiny = preset_checkpoint("tiny")
        weights = random_model(preset_config(name), dtype=dtype, device=device)
        engine = cls(weights, load_tokenizer(tiny), load_image_processor(tiny), backend, name=name, compile=compile,
                     runner_config=runner_config)
        engine.is_random_preset = True
        return engine

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ------------------------------------------------------------------------------ chat

    def chat(self, messages: list[dict[str, Any]], params: SamplingParams | None = None) -> ChatResult:
        params = params or SamplingParams()
        if self.backend == "optimized":
            return self.chat_batch([messages], [params])[0]
        start = time.perf_counter()
        prompt = self.prompts.chat(messages)
        self._check_context(len(prompt.token_ids) + params.max_tokens)
        ids, text, finish = reference.generate_text(self.model, prompt, params, self.tokenizer, self.special)
        return ChatResult(text=text, token_ids=ids, finish_reason=finish, prompt_tokens=len(prompt.token_ids),
                          timings={"total": time.perf_counter() - start})

    def chat_batch(self, conversations: list[list[dict[str, Any]]],
                   params: SamplingParams | list[SamplingParams] | None = None) -> list[ChatResult]:
        """Answer several conversations; results are in input order. Every conversation is
        validated before any work starts, so a bad one fails the call without partial results.
        The optimized backend runs them together, continuously batched."""
        if not isinstance(conversations, list):
            raise InputError("chat_batch expects a list of conversations")
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(conversations)
        if len(plist) != len(conversations):
            raise InputError(f"{len(conversations)} conversations but {len(plist)} SamplingParams")
        prompts = [self.prompts.chat(m) for m in conversations]
        for prompt, p in zip(prompts, plist):
            self._check_context(len(prompt.token_ids) + p.max_tokens)
        if self.backend == "optimized":
            return self._chat_paged(prompts, plist)
        results = []
        for prompt, p in zip(prompts, plist):
            start = time.perf_counter()
            ids, text, finish = reference.generate_text(self.model, prompt, p, self.tokenizer, self.special)
            results.append(ChatResult(text, ids, finish, len(prompt.token_ids), {"total": time.perf_counter() - start}))
        return results

    def chat_stream(self, messages: list[dict[str, Any]], params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the answer's text in pieces as it is generated; the pieces concatenate to `chat`'s text."""
        params = params or SamplingParams()
        prompt = self.prompts.chat(messages)
        self._check_context(len(prompt.token_ids) + params.max_tokens)
        if self.backend != "optimized":
            for delta, _, _, _ in reference.stream_text(self.model, prompt, params, self.tokenizer, self.special):
                if delta:
                    yield delta
            return
        rid = self._submit_internal(prompt, params)
        try:
            while True:
                out = self._next_output(rid)
                if out.text_delta:
                    yield out.text_delta
                if out.finished:
                    return
        finally:  # the consumer stopped early (or an error): do not leave the request running
            if self._inbox.pop(rid, None) is not None:
                self.llm_engine.abort(rid)

    # Request-level interface (both backends: always the paged LLMEngine).

    @property
    def llm_engine(self) -> LLMEngine:
        """The AR engine (paged KV pool, continuous batching), built on first use."""
        if self._llm is None:
            self._llm = LLMEngine(self.model, self.tokenizer, self.special, self.runner_config)
        return self._llm

    def add_request(self, request_id: str, messages: list[dict[str, Any]] | PreparedPrompt,
                    params: SamplingParams | None = None) -> None:
        """Queue a chat request (a conversation, or a prompt from `self.prompts.chat`); its outputs come
        from `step()`. Raises InputError for a bad conversation or one past the context, CapacityError
        if it could never fit the KV pool."""
        if request_id.startswith("__chat"):
            raise InputError("request ids starting with '__chat' are reserved")
        params = params or SamplingParams()
        prompt = messages if isinstance(messages, PreparedPrompt) else self.prompts.chat(messages)
        self._check_context(len(prompt.token_ids) + params.max_tokens)
        self.llm_engine.add_request(request_id, prompt, params)

    def step(self) -> list[RequestOutput]:
        """Run one engine step; the outputs of the requests queued with add_request."""
        if not self._outbox:
            self._route(self.llm_engine.step())
        out, self._outbox = self._outbox, []
        return out

    def abort(self, request_id: str) -> bool:
        """Stop a request queued with add_request; False if unknown or already finished."""
        return self.llm_engine.abort(request_id)

    def has_unfinished(self) -> bool:
        return self._llm is not None and self._llm.has_unfinished()

    def _chat_paged(self, prompts: list[PreparedPrompt], plist: list[SamplingParams]) -> list[ChatResult]:
        start = time.perf_counter()
        ids = []
        try:
            for prompt, p in zip(prompts, plist):
                ids.append(self._submit_internal(prompt, p))
        except Exception:
            for rid in ids:
                self._inbox.pop(rid, None)
                self.llm_engine.abort(rid)
            raise
        results = []
        for rid in ids:  # requests run together; collecting in order only waits for each in turn
            out = self._next_output(rid)
            while not out.finished:
                out = self._next_output(rid)
            del self._inbox[rid]
            results.append(ChatResult(out.text, out.token_ids, out.finish_reason, out.prompt_tokens,
                                      {"total": time.perf_counter() - start}))
        return results

    def _submit_internal(self, prompt: PreparedPrompt, params: SamplingParams) -> str:
        rid = f"__chat-{next(self._chat_ids)}"
        self.llm_engine.add_request(rid, prompt, params)
        self._inbox[rid] = []
        return rid

    def _next_output(self, rid: str) -> RequestOutput:
        """The next output of an internal request, stepping the engine (for everyone) as needed."""
        while not self._inbox[rid]:
            if not self.llm_engine.has_unfinished():
                raise RuntimeError(f"request {rid} vanished from the AR engine without finishing")
            self._route(self.llm_engine.step())
        return self._inbox[rid].pop(0)

    def _route(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if out.request_id in self._inbox:
                self._inbox[out.request_id].append(out)
            elif not out.request_id.startswith("__chat"):  # (an abandoned stream's leftovers are dropped)
                self._outbox.append(out)

    def _check_context(self, total_tokens: int) -> None:
        limit = self.cfg.text.max_position_embeddings
        if total_tokens > limit:
            raise InputError(f"prompt + max_tokens = {total_tokens} exceeds the model's context of {limit} tokens")

    # ------------------------------------------------------------------------------ text-to-image

    def generate_image(self, prompt: str, params: ImageParams | None = None, image: Any = None,
                       progress: Progress = False) -> ImageResult:
        return self.generate_images([prompt], params, images=[image], progress=progress)[0]

    def generate_images(self, prompts: list[str], params: ImageParams | None = None,
                        images: list[Any] | None = None, progress: Progress = False) -> list[ImageResult]:
        """Text-to-image for each prompt (optionally conditioned on an input image each).

        Prompts run together as one batch (at most `params.max_batch_size` at a time). Image i uses
        seed `params.seed + i` for its noise, so its result does not depend on the batch it ran in.
        Every prompt and image is validated before any work starts.
        """
        params = params or ImageParams()
        self._require_generation()
        if isinstance(prompts, str) or not isinstance(prompts, list) or not prompts:
            raise InputError("generate_images expects a non-empty list of prompt strings")
        images = images if images is not None else [None] * len(prompts)
        if len(images) != len(prompts):
            raise InputError(f"{len(prompts)} prompts but {len(images)} images")
        height, width = self.image_size(params)
        base_seed = params.seed if params.seed is not None else secrets.randbelow(2**31)
        prepared = [self.prompts.t2i(p, img) for p, img in zip(prompts, images)]
        uncond = self.uncond_features(params)
        cap = params.max_batch_size or len(prepared)
        results: list[ImageResult] = []
        for start in range(0, len(prepared), cap):
            seeds = [base_seed + start + i for i in range(len(prepared[start:start + cap]))]
            results += self._generate_batch(prepared[start:start + cap], seeds, params, uncond, height, width,
                                            progress)
        return results

    def _generate_batch(self, prompts, seeds, params, uncond, height, width, progress) -> list[ImageResult]:
        runner = self._t2i_runner()
        dit_noise, unet_noise = self._draw_noise(seeds, [self._dit_noise_shape(), self._latent_shape(height, width)])
        timings: dict[str, float] = {}
        with self._timed(timings, "prefill"):
            cond = runner.encode(prompts)  # [B, Q, H]
        with self._timed(timings, "dit"):
            feats = runner.sample(cond, dit_noise, params.dit_steps, params.dit_guidance,
                                  self._callback(progress, "dit", params.dit_steps))  # [B, Q, C]
        with self._timed(timings, "decoder"):
            pixels = runner.decode(feats, uncond.expand(len(prompts), -1, -1), unet_noise, params.decoder_steps,
                                   params.decoder_guidance, self._callback(progress, "decoder", params.decoder_steps))
        timings["total"] = sum(timings.values())
        images = pixels.cpu().numpy()  # [B, H, W, 3] uint8
        return [ImageResult(Image.fromarray(img), f, seed, dict(timings, batch_size=len(prompts)))
                for img, f, seed in zip(images, feats, seeds)]

    def encode_prompt(self, prompt: str, image: Any = None) -> torch.Tensor:
        """Stage-1 prefill: the 64 query hidden states [Q, H] for a caption (and optional image)."""
        self._require_generation()
        return self._t2i_runner().encode([self.prompts.t2i(prompt, image)])[0]

    def sample_clip_features(self, cond: torch.Tensor, params: ImageParams | None = None,
                             noise: torch.Tensor | None = None, progress: Progress = False) -> torch.Tensor:
        """DiT flow matching: query states [B, Q, H] -> CLIP features [B, Q, C].
        noise: [B, C, S, S] standard normal; None draws it from `params.seed` (+ i for row i)."""
        params = params or ImageParams()
        self._require_generation()
        if cond.ndim != 3 or cond.shape[1:] != (self.cfg.n_query, self.cfg.text.hidden_size):
            raise InputError(f"cond must be [B, {self.cfg.n_query}, {self.cfg.text.hidden_size}], got {list(cond.shape)}")
        b = cond.shape[0]
        if noise is None:
            noise = self._draw_noise(self._seeds(params, b), [self._dit_noise_shape()])[0]
        noise = self._check_noise(noise, (b, *self._dit_noise_shape()))
        return self._t2i_runner().sample(cond.to(self.device, self.model.dtype), noise, params.dit_steps,
                                         params.dit_guidance, self._callback(progress, "dit", params.dit_steps))

    def decode_pixels(self, feats: torch.Tensor, params: ImageParams | None = None, noise: torch.Tensor | None = None,
                      uncond: torch.Tensor | None = None, progress: Progress = False) -> list[Image.Image]:
        """Pixel decoder: CLIP features [B, Q, C] -> PIL images.
        noise: [B, 4, H/8, W/8] standard normal before scaling by the scheduler's initial sigma
        (None = drawn from `params.seed` + row, after that seed's DiT noise, as generate_image does).
        uncond: [1 or B, Q, C] null features (None = the cached stage-1 features of " ")."""
        params = params or ImageParams()
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
        if noise is None:  # the seed's stream: DiT noise first, then UNet noise (official order, spec §1.7)
            noise = self._draw_noise(self._seeds(params, b), [self._dit_noise_shape(), latent_shape])[1]
        noise = self._check_noise(noise, (b, *latent_shape))
        dtype = self.model.dtype
        pixels = self._t2i_runner().decode(feats.to(self.device, dtype), uncond.to(self.device, dtype).expand(b, -1, -1),
                                           noise, params.decoder_steps, params.decoder_guidance,
                                           self._callback(progress, "decoder", params.decoder_steps))
        return [Image.fromarray(p) for p in pixels.cpu().numpy()]

    def uncond_features(self, params: ImageParams | None = None) -> torch.Tensor:
        """Stage-1 features of the raw text " " [1, Q, C]: the decoder's CFG null (spec §1.6).
        Computed once per engine and DiT setting, from a fixed seed (0) so results are reproducible."""
        params = params or ImageParams()
        self._require_generation()
        key = (params.dit_steps, float(params.dit_guidance))
        if key not in self._uncond_cache:
            cond = self._t2i_runner().encode([self.prompts.t2i_uncond()])
            null_params = ImageParams(dit_steps=params.dit_steps, dit_guidance=params.dit_guidance, seed=0)
            self._uncond_cache[key] = self.sample_clip_features(cond, null_params)
        return self._uncond_cache[key]

    # ------------------------------------------------------------------------------ helpers

    def image_size(self, params: ImageParams) -> tuple[int, int]:
        native = self.cfg.default_image_size
        height, width = params.height or native, params.width or native
        # The latent must survive the UNet's (n-1) downsamplings: pixels % (8 * 2^(n-1)) == 0.
        multiple = self.cfg.vae.scale_factor * 2 ** (len(self.cfg.unet.block_out_channels) - 1)
        if height % multiple or width % multiple:
            raise InputError(f"height and width must be multiples of {multiple}, got {height}x{width}")
        return height, width

    def _t2i_runner(self) -> ReferenceT2I:
        """The stage runner of this engine's backend, built on first use (the optimized one
        precomputes constant DiT branches and may compile)."""
        if self._runner is None:
            self._runner = (OptimizedT2I(self.model, self.special, compile=self.compile,
                                         paged_prefill=self._paged_t2i_prefill) if self.backend == "optimized"
                            else ReferenceT2I(self.model, self.special))
        return self._runner

    def _paged_t2i_prefill(self, prompts: list[PreparedPrompt]) -> torch.Tensor | None:
        """Stage-1 prefill through the AR engine, batched with the chat requests in flight (their outputs
        meanwhile are routed as usual) -> [B, Q, H]. None while no AR engine exists: image-only use
        keeps the left-padded batch and never reserves the KV pool (on CUDA sized to most of the free
        memory, which the DiT and decoder activations need)."""
        if self._llm is None:
            return None
        ids = [f"__chat-t2i-{next(self._chat_ids)}" for _ in prompts]
        try:
            for rid, prompt in zip(ids, prompts):
                self._llm.add_t2i_request(rid, prompt)
                self._inbox[rid] = []
            return torch.stack([self._next_output(rid).hidden_states for rid in ids])  # [B, Q, H]
        finally:  # on success every request has finished; on an error none is left behind
            for rid in ids:
                if self._inbox.pop(rid, None) is not None:
                    self._llm.abort(rid)

    def _dit_noise_shape(self) -> tuple[int, int, int]:
        dit = self.cfg.dit
        return (dit.in_channels, dit.input_size, dit.input_size)

    def _latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.cfg.vae.scale_factor
        return (self.cfg.unet.in_channels, height // f, width // f)

    @staticmethod
    def _seeds(params: ImageParams, batch: int) -> list[int]:
        base = params.seed if params.seed is not None else secrets.randbelow(2**31)
        return [base + row for row in range(batch)]

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

    @contextlib.contextmanager
    def _timed(self, timings: dict[str, float], stage: str):
        """Wall time of a stage; on CUDA, synchronizes at the stage boundary (never inside a loop)."""
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        timings[stage] = time.perf_counter() - start

    def _require_generation(self) -> None:
        if not self.cfg.can_generate_images:
            raise ConfigError(f"model {self.name!r} has no DiT/decoder: it can chat but not generate images")

    @staticmethod
    def _callback(progress: Progress, stage: str, total: int):
        if not progress:
            return None
        if callable(progress):
            return lambda i, n: progress(stage, i, n)
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=stage, unit="step", leave=False)

        def tick(i: int, n: int) -> None:
            bar.update(1)
            if i + 1 == n:
                bar.close()

        return tick
