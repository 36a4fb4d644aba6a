"""blip3o_engine: an inference engine for BLIP3-o (Qwen2.5-VL understanding + DiT/SDXL image generation).

Public names are imported lazily so that `import blip3o_engine.models.dit` (kernels, tests,
exporters) does not pull in the whole runtime.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "Engine": "blip3o_engine.engine",
    "AsyncEngine": "blip3o_engine.async_engine",
    "EngineConfig": "blip3o_engine.engine_config",
    "CacheConfig": "blip3o_engine.engine_config",
    "SchedulerConfig": "blip3o_engine.engine_config",
    "CompileConfig": "blip3o_engine.engine_config",
    "SamplingParams": "blip3o_engine.params",
    "ImageParams": "blip3o_engine.params",
    "MAX_IMAGE_SIDE": "blip3o_engine.params",
    "MAX_SEED": "blip3o_engine.params",
    "ChatResult": "blip3o_engine.outputs",
    "ImageResult": "blip3o_engine.outputs",
    "RequestOutput": "blip3o_engine.outputs",
    "ImageOutput": "blip3o_engine.outputs",
    "EngineStats": "blip3o_engine.outputs",
    "ModelConfig": "blip3o_engine.config",
    "preset_config": "blip3o_engine.config",
    "make_tiny_checkpoint": "blip3o_engine.tiny",
}
_ERRORS = ("Blip3oError", "ConfigError", "CheckpointError", "CheckpointNotFoundError", "MissingKeyError",
           "UnexpectedKeyError", "ShapeMismatchError", "CorruptCheckpointError", "UnsupportedDTypeError",
           "InputError", "CapacityError", "OverloadedError", "EngineShutdownError", "EngineDeadError",
           "RequestFailedError", "ExportError")
_LAZY.update({name: "blip3o_engine.errors" for name in _ERRORS})

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'blip3o_engine' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names too (they are lazy, so not in the module's namespace until first used)."""
    return sorted(set(globals()) | set(__all__))
