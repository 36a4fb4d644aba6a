"""Typed errors raised by blip3o_engine.

Every user-facing failure is one of these, so applications can tell bad input (their fault) from a
broken checkpoint (the deployment's fault) from running out of capacity (retry later).
"""

from __future__ import annotations


class Blip3oError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(Blip3oError, ValueError):
    """A configuration value is invalid or unsupported (unknown preset, bad dtype, unknown model_type)."""


class CheckpointError(Blip3oError):
    """A checkpoint directory or file cannot be used. Subclasses say why."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint directory or one of its required files does not exist."""


class MissingKeyError(CheckpointError, KeyError):
    """A tensor the model needs is not in the checkpoint."""

    def __str__(self) -> str:  # KeyError would repr() the message and add quotes
        return str(self.args[0]) if self.args else ""


class UnexpectedKeyError(CheckpointError, KeyError):
    """The checkpoint holds a tensor the model does not know (a different model or a broken export)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ShapeMismatchError(CheckpointError, ValueError):
    """A tensor in the checkpoint has a different shape than the model expects."""


class CorruptCheckpointError(CheckpointError, ValueError):
    """A safetensors file is truncated, has a malformed header, or is not safetensors at all."""


class UnsupportedDTypeError(CheckpointError, TypeError):
    """A checkpoint tensor (or a requested dtype) has a dtype the engine cannot use."""


class InputError(Blip3oError, ValueError):
    """A request is malformed: bad messages, bad image, bad sampling or image parameters."""


class CapacityError(Blip3oError, RuntimeError):
    """A request can never fit the engine's configured capacity (e.g. prompt longer than the KV pool)."""


class OverloadedError(Blip3oError, RuntimeError):
    """The engine has as many admitted requests as it accepts (`AsyncEngine`'s max_pending): retry later."""


class EngineShutdownError(Blip3oError, RuntimeError):
    """The engine is shutting down (or shut down) and takes no new requests."""


class EngineDeadError(Blip3oError, RuntimeError):
    """The engine's step loop died; nothing more can run on this engine (a server reports it unhealthy)."""


class RequestFailedError(Blip3oError, RuntimeError):
    """One request's work failed inside the engine (the engine itself goes on serving the others)."""


class ExportError(Blip3oError):
    """An exported artifact cannot be written or used: a tampered file (sha256 differs from its manifest),
    a manifest of another engine or format version, a missing stage, or a missing optional package."""
