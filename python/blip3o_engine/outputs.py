"""Results returned by the engine."""

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
