"""The request-length rule, in one place: a request's tokens (prompt + max_tokens for chat, prompt + latent
queries for an image) must fit the engine's max_model_len, which is the model's context capped by what the
KV pool holds (`runtime/memory.py`)."""

from __future__ import annotations

from ..errors import InputError


def check_context(what: str, total: int, max_model_len: int, model_len: int) -> None:
    """InputError naming `what` ("prompt + max_tokens", ...) when `total` tokens exceed max_model_len."""
    if total <= max_model_len:
        return
    why = f" (capped by the KV pool; the model allows {model_len})" if max_model_len < model_len else ""
    raise InputError(f"{what} = {total} tokens exceeds the context (max_model_len) of {max_model_len} tokens{why}")


__all__ = ["check_context"]
