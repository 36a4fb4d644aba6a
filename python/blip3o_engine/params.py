"""Request parameters: what a user asks for, validated once at construction (bad values -> InputError)."""

from __future__ import annotations

import operator
from dataclasses import dataclass

from .errors import InputError


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise InputError(msg)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # True is an int to Python, not a count


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class SamplingParams:
    """Text generation settings, named and defaulted as in vLLM's SamplingParams.

    temperature 0 means greedy. `stop` strings end generation and are cut from the text;
    `stop_token_ids` add to the model's end-of-turn tokens (<|im_end|>, <|endoftext|>), which always
    stop unless `ignore_eos`. `seed` makes sampling reproducible per request.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: disabled
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        try:  # operator.index accepts numpy/torch integers and refuses floats and strings
            ids = tuple(operator.index(t) for t in (self.stop_token_ids or ()))
        except TypeError:
            ids = (-1,)
        _check(all(t >= 0 for t in ids), f"stop_token_ids must be non-negative token ids, got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", ids)
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1,
               f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        _check(_is_num(self.temperature) and self.temperature >= 0.0,
               f"temperature must be a number >= 0, got {self.temperature!r}")
        _check(_is_num(self.top_p) and 0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(_is_int(self.top_k) and self.top_k >= -1, f"top_k must be -1, 0 or >= 1, got {self.top_k!r}")
        _check(_is_num(self.repetition_penalty) and self.repetition_penalty > 0.0,
               f"repetition_penalty must be a number > 0, got {self.repetition_penalty!r}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")
        _check(self.seed is None or _is_int(self.seed), f"seed must be an int or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class ImageParams:
    """Text-to-image settings; defaults are the official ones (spec §1.7).

    height/width None = the model's native size (1024 for the released models). `seed` None draws a
    fresh seed, reported back in `ImageResult.seed`; image i of a batch uses `seed + i`.
    `max_batch_size` caps how many images denoise together (None = all prompts of one call), to
    bound GPU memory; it never changes the images.
    """

    height: int | None = None
    width: int | None = None
    dit_steps: int = 30
    dit_guidance: float = 3.0
    decoder_steps: int = 50
    decoder_guidance: float = 3.0
    seed: int | None = None
    max_batch_size: int | None = None

    def __post_init__(self) -> None:
        _check(self.max_batch_size is None or (_is_int(self.max_batch_size) and self.max_batch_size >= 1),
               f"max_batch_size must be an int >= 1 or None, got {self.max_batch_size!r}")
        for name in ("height", "width"):
            v = getattr(self, name)
            _check(v is None or (_is_int(v) and v > 0), f"{name} must be a positive int or None, got {v!r}")
        for name in ("dit_steps", "decoder_steps"):
            v = getattr(self, name)
            _check(_is_int(v) and 1 <= v <= 1000, f"{name} must be an int in [1, 1000], got {v!r}")
        for name in ("dit_guidance", "decoder_guidance"):
            v = getattr(self, name)
            _check(_is_num(v) and v >= 0.0, f"{name} must be >= 0, got {v!r}")
        _check(self.seed is None or (_is_int(self.seed) and self.seed >= 0),
               f"seed must be a non-negative int or None, got {self.seed!r}")
