"""Request parameters: what a user asks for, validated once at construction (bad values -> InputError)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise InputError(msg)


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
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in (self.stop_token_ids or ())))
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1,
               f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        _check(self.temperature >= 0.0, f"temperature must be >= 0, got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        _check(isinstance(self.top_k, int) and self.top_k >= -1, f"top_k must be -1, 0 or >= 1, got {self.top_k}")
        _check(self.repetition_penalty > 0.0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")
        _check(self.seed is None or isinstance(self.seed, int), f"seed must be an int or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class ImageParams:
    """Text-to-image settings; defaults are the official ones (spec §1.7).

    height/width None = the model's native size (1024 for the released models). `seed` None draws a
    fresh seed, reported back in `ImageResult.seed`; image i of a batch uses `seed + i`.
    """

    height: int | None = None
    width: int | None = None
    dit_steps: int = 30
    dit_guidance: float = 3.0
    decoder_steps: int = 50
    decoder_guidance: float = 3.0
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            v = getattr(self, name)
            _check(v is None or (isinstance(v, int) and v > 0), f"{name} must be a positive int or None, got {v!r}")
        for name in ("dit_steps", "decoder_steps"):
            v = getattr(self, name)
            _check(isinstance(v, int) and 1 <= v <= 1000, f"{name} must be an int in [1, 1000], got {v!r}")
        for name in ("dit_guidance", "decoder_guidance"):
            v = getattr(self, name)
            _check(isinstance(v, (int, float)) and v >= 0.0, f"{name} must be >= 0, got {v!r}")
        _check(self.seed is None or (isinstance(self.seed, int) and self.seed >= 0),
               f"seed must be a non-negative int or None, got {self.seed!r}")
