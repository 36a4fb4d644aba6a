"""`Engine`: the public entry point (chat, text-to-image, and the stage methods parity tests use).

Backends: "reference" runs `runtime/reference.py` as is. "optimized" is accepted and, until the
AR-engine and generation-engine work lands, runs the same reference path.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..config import PRESETS, ModelConfig, dtype_from_name, preset_config
from ..errors import CheckpointNotFoundError, ConfigError, InputError
from ..models.blip3o import Blip3oModel, load_model, random_model
from ..outputs import ChatResult, ImageResult
from ..params import ImageParams, SamplingParams
from ..prompts import PromptBuilder
from ..tiny import CHECKPOINT_PRESETS, preset_checkpoint
from ..tokenization import SpecialTokens, load_image_processor, load_tokenizer
from . import reference

BACKENDS = ("reference", "optimized")
# Progress reporting: True draws tqdm bars; a callable gets (stage, step, total) with stage in
# {"dit", "decoder"}.
Progress = bool | Callable[[str, int, int], None]


class Engine:
    def __init__(self, model: Blip3oModel, tokenizer: Any, image_processor: Any, backend: str = "reference",
                 name: str = "custom"):
        if backend not in BACKENDS:
            raise ConfigError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        self.model = model
        self.cfg: ModelConfig = model.cfg
        self.tokenizer = tokenizer
        self.special = SpecialTokens.from_tokenizer(tokenizer, require_generation=self.cfg.dit is not None)
        self.prompts = PromptBuilder(tokenizer, image_processor, self.special, self.cfg.vision.spatial_merge_size)
        self.backend = backend
        self.name = name
        self.is_random_preset = False
        # Stage-1 features of the decoder's null prompt " ", computed once per engine (as the
        # official pipeline caches them per process), keyed by the DiT settings that made them.
        self._uncond_cache: dict[tuple[int, float], torch.Tensor] = {}

    # ------------------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(cls, model: str | Path = "tiny", device: str | torch.device = "cpu",
                        dtype: str | torch.dtype = "float32", backend: str = "reference") -> Engine:
        """Load a checkpoint directory, or a preset: "tiny"/"small" (random weights, made on first use
        in the cache dir) or "4b"/"8b" (the real shapes with random weights, for benchmarks)."""
        if backend not in BACKENDS:  # fail before minutes of weight loading
            raise ConfigError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        torch_dtype = dtype_from_name(dtype)
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' requested but CUDA is not available")
        name = str(model)
        is_preset = name.lower() in PRESETS and not Path(name).is_dir()
        if is_preset and name.lower() not in CHECKPOINT_PRESETS:
            return cls._random_real_shapes(name.lower(), device, torch_dtype, backend)
        path = preset_checkpoint(name.lower()) if is_preset else Path(name)
        if not path.is_dir():
            raise CheckpointNotFoundError(
                f"{name!r} is neither a checkpoint directory nor a preset ({', '.join(PRESETS)})")
        cfg = ModelConfig.from_checkpoint(path)
        weights = load_model(path, cfg, torch_dtype, device)
        engine = cls(weights, load_tokenizer(path), load_image_processor(path), backend, name=name)
        engine.is_random_preset = is_preset
        return engine

    @classmethod
    def _random_real_shapes(cls, name: str, device: torch.device, dtype: torch.dtype, backend: str) -> Engine:
        """4b/8b shapes with random weights; text I/O through the tiny tokenizer (benchmarks only)."""
        tiny = preset_checkpoint("tiny")
        weights = random_model(preset_config(name), dtype=dtype, device=device)
        engine = cls(weights, load_tokenizer(tiny), load_image_processor(tiny), backend, name=name)
        engine.is_random_preset = True
        return engine

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ------------------------------------------------------------------------------ chat

    def chat(self, messages: list[dict[str, Any]], params: SamplingParams | None = None) -> ChatResult:
        params = params or SamplingParams()
        start = time.perf_counter()
        prompt = self.prompts.chat(messages)
        self._check_context(len(prompt.token_ids) + params.max_tokens)
        ids, text, finish = reference.generate_text(self.model, prompt, params, self.tokenizer, self.special)
        return ChatResult(text=text, token_ids=ids, finish_reason=finish, prompt_tokens=len(prompt.token_ids),
                          timings={"total": time.perf_counter() - start})

    def chat_batch(self, conversations: list[list[dict[str, Any]]],
                   params: SamplingParams | list[SamplingParams] | None = None) -> list[ChatResult]:
        """Answer several conversations; results are in input order. Every conversation is
        validated before any work starts, so a bad one fails the call without partial results."""
        if not isinstance(conversations, list):
            raise InputError("chat_batch expects a list of conversations")
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(conversations)
        if len(plist) != len(conversations):
            raise InputError(f"{len(conversations)} conversations but {len(plist)} SamplingParams")
        prompts = [self.prompts.chat(m) for m in conversations]
        for prompt, p in zip(prompts, plist):
            self._check_context(len(prompt.token_ids) + p.max_tokens)
        results = []
        for prompt, p in zip(prompts, plist):
            start = time.perf_counter()
            ids, text, finish = reference.generate_text(self.model, prompt, p, self.tokenizer, self.special)
            results.append(ChatResult(text, ids, finish, len(prompt.token_ids), {"total": time.perf_counter() - start}))
        return results

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
        Image i uses seed `params.seed + i`, so results do not depend on batch composition."""
        params = params or ImageParams()
        self._require_generation()
        if isinstance(prompts, str) or not prompts:
            raise InputError("generate_images expects a non-empty list of prompt strings")
        images = images if images is not None else [None] * len(prompts)
        if len(images) != len(prompts):
            raise InputError(f"{len(prompts)} prompts but {len(images)} images")
        height, width = self.image_size(params)
        base_seed = params.seed if params.seed is not None else secrets.randbelow(2**31)
        prepared = [self.prompts.t2i(p, img) for p, img in zip(prompts, images)]  # validate all first
        results = []
        for i, prompt in enumerate(prepared):
            timings: dict[str, float] = {}
            t0 = time.perf_counter()
            cond = reference.encode_t2i_prompt(self.model, prompt, self.special)
            timings["prefill"] = time.perf_counter() - t0
            one = dataclasses.replace(params, seed=base_seed + i)
            t0 = time.perf_counter()
            feats = self.sample_clip_features(cond[None], one, progress=progress)
            timings["dit"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            pixels = self._decode(feats, one, height, width, None, None, progress)
            timings["decoder"] = time.perf_counter() - t0
            timings["total"] = sum(timings.values())
            results.append(ImageResult(Image.fromarray(pixels[0].cpu().numpy()), feats[0], base_seed + i, timings))
        return results

    def encode_prompt(self, prompt: str, image: Any = None) -> torch.Tensor:
        """Stage-1 prefill: the 64 query hidden states [Q, H] for a caption (and optional image)."""
        self._require_generation()
        return reference.encode_t2i_prompt(self.model, self.prompts.t2i(prompt, image), self.special)

    def sample_clip_features(self, cond: torch.Tensor, params: ImageParams | None = None,
                             noise: torch.Tensor | None = None, progress: Progress = False) -> torch.Tensor:
        """DiT flow matching: query states [B, Q, H] -> CLIP features [B, Q, C].
        noise: [B, C, S, S] standard normal; None draws it from `params.seed` (+ i for row i)."""
        params = params or ImageParams()
        self._require_generation()
        dit = self.cfg.dit
        if cond.ndim != 3 or cond.shape[1:] != (self.cfg.n_query, self.cfg.text.hidden_size):
            raise InputError(f"cond must be [B, {self.cfg.n_query}, {self.cfg.text.hidden_size}], got {list(cond.shape)}")
        shape = (dit.in_channels, dit.input_size, dit.input_size)
        noise = self._noise_or_draw(noise, cond.shape[0], params, [shape])[0]
        return reference.sample_clip_features(self.model, cond.to(self.device), noise, params.dit_steps,
                                              params.dit_guidance, self._callback(progress, "dit", params.dit_steps))

    def decode_pixels(self, feats: torch.Tensor, params: ImageParams | None = None, noise: torch.Tensor | None = None,
                      uncond: torch.Tensor | None = None, progress: Progress = False) -> list[Image.Image]:
        """Pixel decoder: CLIP features [B, Q, C] -> PIL images.
        noise: [B, 4, H/8, W/8] standard normal before scaling by the scheduler's initial sigma.
        uncond: [1 or B, Q, C] null features (None = the cached stage-1 features of " ")."""
        params = params or ImageParams()
        self._require_generation()
        height, width = self.image_size(params)
        pixels = self._decode(feats, params, height, width, noise, uncond, progress)
        return [Image.fromarray(p.cpu().numpy()) for p in pixels]

    def _decode(self, feats, params, height, width, noise, uncond, progress) -> torch.Tensor:
        q, c = self.cfg.n_query, self.cfg.dit.in_channels
        if feats.ndim != 3 or feats.shape[1:] != (q, c):
            raise InputError(f"features must be [B, {q}, {c}], got {list(feats.shape)}")
        b = feats.shape[0]
        if uncond is None:
            uncond = self.uncond_features(params)
        if uncond.ndim != 3 or uncond.shape[0] not in (1, b) or uncond.shape[1:] != (q, c):
            raise InputError(f"uncond must be [1 or {b}, {q}, {c}], got {list(uncond.shape)}")
        f = self.cfg.vae.scale_factor
        dit_shape = (c, self.cfg.dit.input_size, self.cfg.dit.input_size)
        latent_shape = (self.cfg.unet.in_channels, height // f, width // f)
        if noise is None:  # the seed's stream: DiT noise first, then UNet noise (official order, spec §1.7)
            noise = self._noise_or_draw(None, b, params, [dit_shape, latent_shape])[1]
        else:
            noise = self._noise_or_draw(noise, b, params, [latent_shape])[0]
        return reference.decode_pixels(self.model, feats.to(self.device), uncond.to(self.device).expand(b, -1, -1),
                                       noise, params.decoder_steps, params.decoder_guidance,
                                       self._callback(progress, "decoder", params.decoder_steps))

    def uncond_features(self, params: ImageParams | None = None) -> torch.Tensor:
        """Stage-1 features of the raw text " " [1, Q, C]: the decoder's CFG null (spec §1.6).
        Computed once per engine and DiT setting, from a fixed seed (0) so results are reproducible."""
        params = params or ImageParams()
        self._require_generation()
        key = (params.dit_steps, float(params.dit_guidance))
        if key not in self._uncond_cache:
            cond = reference.encode_t2i_prompt(self.model, self.prompts.t2i_uncond(), self.special)
            null_params = ImageParams(dit_steps=params.dit_steps, dit_guidance=params.dit_guidance, seed=0)
            self._uncond_cache[key] = self.sample_clip_features(cond[None], null_params)
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

    def _noise_or_draw(self, noise, batch, params, shapes) -> list[torch.Tensor]:
        """Given noise is checked against the last shape; otherwise every shape is drawn in order from
        one CPU generator per row seeded with seed + row (device-independent), and all are returned."""
        if noise is not None:
            want = (batch, *shapes[-1])
            if tuple(noise.shape) != want:
                raise InputError(f"noise must have shape {list(want)}, got {list(noise.shape)}")
            return [noise.to(self.device, torch.float32)]
        seed = params.seed if params.seed is not None else secrets.randbelow(2**31)
        gens = [torch.Generator().manual_seed(seed + row) for row in range(batch)]
        return [torch.stack([torch.randn(s, generator=g) for g in gens]).to(self.device) for s in shapes]

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
