"""Request parameters: what a user asks for, validated once at construction (bad values -> InputError).

Every method that takes params also accepts a dict of the fields (`as_sampling_params`,
`as_image_params`); unknown keys are an InputError naming them.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import InputError

# Seeds: every int torch.Generator.manual_seed takes without aliasing (it also takes negatives down to
# -2**63, but wraps them to 2**64 + seed, so -1 and 2**64 - 1 would give the same stream).
MAX_SEED = 2**64 - 1
# Largest output side in pixels: 4x the released models' native 1024 (16x the pixels). The decoder
# was trained at 1024², so far larger sizes only cost: work grows with the pixels (the UNet's
# self-attention with their square), and each full-resolution VAE activation (128 x H x W) is
# already 4 GiB in bf16 at 4096², several alive at once. Without a bound, 100000² ran for a minute
# and a half before dying in the allocator; now it fails at once.
MAX_IMAGE_SIDE = 4096


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise InputError(msg)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # True is an int to Python, not a count


def _is_num(v: object) -> bool:
    """A finite real number (inf would run and produce garbage: inf guidance makes an all-black image)."""
    if not isinstance(v, numbers.Real) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False


def _is_seed(v: object) -> bool:
    return v is None or (_is_int(v) and 0 <= v <= MAX_SEED)


_SEED_RULE = "an int in [0, 2**64 - 1] or None"


@dataclass(frozen=True)
class SamplingParams:
    """Text generation settings, named and defaulted as in vLLM's SamplingParams.

    temperature 0 means greedy; the default 1.0 is vLLM's (the `chat` command line defaults to greedy).
    `stop` strings end generation and are cut from the text; `stop_token_ids` add to the model's
    end-of-turn tokens (<|im_end|>, <|endoftext|>), which always stop unless `ignore_eos`. `seed`
    (an int in [0, 2**64 - 1], or None) makes sampling reproducible per request. Float fields must be
    finite.
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
               f"temperature must be a finite number >= 0, got {self.temperature!r}")
        _check(_is_num(self.top_p) and 0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(_is_int(self.top_k) and self.top_k >= -1, f"top_k must be -1, 0 or >= 1, got {self.top_k!r}")
        _check(_is_num(self.repetition_penalty) and self.repetition_penalty > 0.0,
               f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")
        _check(_is_seed(self.seed), f"seed must be {_SEED_RULE}, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class ImageParams:
    """Text-to-image settings; defaults are the official ones (docs/model_spec.md §1.7).

    height/width None = the model's native size (1024 for the released models); at most
    `MAX_IMAGE_SIDE` (4096) pixels per side, and a multiple of the model's size step (32 for the
    released models; `Engine.image_size` checks it). Guidance scales must be finite. `seed` is an
    int in [0, 2**64 - 1] or None, which draws a fresh seed, reported back in `ImageResult.seed`;
    image i of a batch uses `seed + i`, which must stay <= 2**64 - 1 too. `max_batch_size` caps how
    many images denoise together (None = all prompts of one call), to bound GPU memory; it never
    changes the images.
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
            _check(v is None or (_is_int(v) and 0 < v <= MAX_IMAGE_SIDE),
                   f"{name} must be an int in [1, {MAX_IMAGE_SIDE}] or None, got {v!r}")
        for name in ("dit_steps", "decoder_steps"):
            v = getattr(self, name)
            _check(_is_int(v) and 1 <= v <= 1000, f"{name} must be an int in [1, 1000], got {v!r}")
        for name in ("dit_guidance", "decoder_guidance"):
            v = getattr(self, name)
            _check(_is_num(v) and v >= 0.0, f"{name} must be a finite number >= 0, got {v!r}")
        _check(_is_seed(self.seed), f"seed must be {_SEED_RULE}, got {self.seed!r}")

    def image_seeds(self, count: int) -> list[int]:
        """The seeds of `count` images: `seed + i` (a fresh random base when seed is None)."""
        base = self.seed if self.seed is not None else secrets.randbelow(2**31)
        _check(base + count - 1 <= MAX_SEED, f"seed {base} + {count - 1} for the last of {count} images "
               f"exceeds 2**64 - 1 (image i uses seed + i): use a smaller seed")
        return [base + i for i in range(count)]


P = TypeVar("P", SamplingParams, ImageParams)


def _coerce(cls: type[P], value: Any) -> P:
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in value if k not in names)
        _check(not unknown, f"unknown {cls.__name__} fields: {', '.join(unknown)} (known: {', '.join(sorted(names))})")
        return cls(**value)
    raise InputError(f"params must be {cls.__name__}, a dict of its fields or None, got {type(value).__name__}")


def as_sampling_params(value: SamplingParams | Mapping[str, Any] | None) -> SamplingParams:
    """SamplingParams from itself, a dict of its fields (unknown keys: InputError) or None (defaults)."""
    return _coerce(SamplingParams, value)


def as_image_params(value: ImageParams | Mapping[str, Any] | None) -> ImageParams:
    """ImageParams from itself, a dict of its fields (unknown keys: InputError) or None (defaults)."""
    return _coerce(ImageParams, value)
