"""What the engine returns: final results (`ChatResult`, `ImageResult`) and the per-step outputs of the
request-level interface (`RequestOutput` for chat, `ImageOutput` for images), plus `EngineStats`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from PIL import Image


@dataclass
class ChatResult:
    text: str
    token_ids: list[int]  # generated ids; includes the stop token when one ended generation
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage


@dataclass
class ImageResult:
    image: Image.Image
    clip_features: torch.Tensor  # [64, C] the stage-1 EVA-CLIP features that conditioned the decoder
    seed: int = 0  # the seed that reproduces this image
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage


@dataclass
class RequestOutput:
    """What one step produced for one chat request (vLLM's name)."""

    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" when finished, else None
    token_ids: list[int] = field(default_factory=list)  # all generated ids so far (stop token included)
    text: str = ""  # the text so far (the final text once finished)
    prompt_tokens: int = 0
    error: str | None = None  # set (with finished=True, finish_reason "error") when this request's work failed
    exception: BaseException | None = field(default=None, repr=False, compare=False)  # the failure itself
    # Seconds the request waited before its first step ran (the optimized backend's scheduler; None where the
    # backend does not queue, e.g. the reference backend).
    queue_time: float | None = None
    # Internal to the step loop: a T2I prefill's post-final-norm query states [Q, H]; never handed to users.
    hidden_states: torch.Tensor | None = None


ImageStage = Literal["prefill", "dit", "decoder", "vae"]


@dataclass
class ImageOutput:
    """Progress of one image request: `stage` reached `step` of `total` (the decoder reports every step, the
    VAE every piece it runs in: `total` is its number of pieces, 1 on the reference backend); the final output has `finished=True` and `result` (or `error`, for a request that failed or was aborted).
    `preview` is set on decoder steps of requests that asked for previews: the image decoded from the
    decoder's current x0 prediction (what OpenAI's partial_images streams)."""

    request_id: str
    stage: ImageStage
    step: int
    total: int
    finished: bool = False
    result: ImageResult | None = None
    error: str | None = None
    preview: Image.Image | None = None
    exception: BaseException | None = field(default=None, repr=False, compare=False)  # the failure itself


@dataclass
class EngineStats:
    """What a server exports (`Engine.stats()`): requests per kind and state, KV blocks, images per stage."""

    chat_running: int = 0
    chat_waiting: int = 0
    image_running: int = 0
    image_waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    images_by_stage: dict[str, int] = field(default_factory=lambda: {"prefill": 0, "dit": 0, "decoder": 0, "vae": 0})

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0

    @property
    def num_unfinished(self) -> int:
        return self.chat_running + self.chat_waiting + self.image_running + self.image_waiting


def raise_failure(out: RequestOutput | ImageOutput) -> None:
    """Raise what made a request fail: its own typed error (InputError, CapacityError, ExportError, ...) as is,
    anything else as RequestFailedError (from it)."""
    from .errors import Blip3oError, RequestFailedError

    if isinstance(out.exception, Blip3oError):
        raise out.exception
    stage = f" in stage {out.stage}" if isinstance(out, ImageOutput) else ""
    raise RequestFailedError(f"request {out.request_id} failed{stage}: {out.error}") from out.exception
