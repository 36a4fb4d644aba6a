"""The engines a benchmark compares: one model, one `Engine` per backend over the same weights.

Sharing the weights keeps the comparison fair (identical numbers in, identical shapes) and halves
the memory and load time of a two-backend run at the 4b/8b shapes.

Every model loads through `Engine.from_pretrained`: checkpoints and the tiny/small presets from
disk, the 4b/8b presets (real shapes) with random weights drawn directly on the target device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import PRESETS, dtype_from_name
from ..errors import ConfigError
from ..runtime.engine import BACKENDS, Engine


@dataclass
class LoadedEngines:
    engines: dict[str, Engine]  # backend -> engine, all over one model
    preset: str  # the preset name, or the checkpoint directory's name
    random_weights: bool
    load_s: float


def default_dtype(device: torch.device) -> str:
    return "float32" if device.type == "cpu" else "bfloat16"


def load_engines(model: str, device: torch.device, dtype: str | None, backends: list[str],
                 compile: bool | None = None) -> LoadedEngines:
    """Build the model once and wrap it in one Engine per backend (first backend's engine owns it)."""
    for b in backends:
        if b not in BACKENDS:
            raise ConfigError(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
    torch_dtype = dtype_from_name(dtype or default_dtype(device))
    start = time.perf_counter()
    key = model.lower()
    is_preset = key in PRESETS and not Path(model).is_dir()
    # 4b/8b presets draw random weights on the device itself (models.blip3o.random_model).
    first = Engine.from_pretrained(model, device=device, dtype=torch_dtype, backend=backends[0], compile=compile)
    engines = {backends[0]: first}
    for b in backends[1:]:
        engines[b] = Engine(first.model, first.tokenizer, first.prompts.image_processor, backend=b, compile=compile,
                            name=first.name)
        engines[b].is_random_preset = first.is_random_preset
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    name = key if is_preset else Path(model).name
    return LoadedEngines(engines, name, first.is_random_preset, time.perf_counter() - start)
