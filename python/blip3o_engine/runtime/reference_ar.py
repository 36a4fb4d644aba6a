"""The AR stage of the reference backend: the same request-level interface as `ar_stage.ARStage`, through
the plain functions of `runtime/reference.py`, one request at a time.

Each chat request is a `reference.stream_text` generator over its own contiguous KV cache: a step advances
every running request by one token, in arrival order (no batching, no paging, no prefix cache). A T2I
prefill runs `reference.encode_t2i_prompt` whole in the step after it arrives. Every model call runs under
`ops.reference_ops()`, so the reference stays the torch twins even on a GPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..models.blip3o import Blip3oModel
from ..ops.dispatch import reference_ops
from ..outputs import RequestOutput
from ..params import SamplingParams
from ..prompts import PreparedPrompt
from ..tokenization import SpecialTokens
from . import reference
from .limits import check_context


@dataclass(eq=False)
class _Chat:
    prompt: PreparedPrompt
    tokens: Iterator[tuple[str, str, list[int], str | None]]  # stream_text: (delta, text, ids, finish)


class ReferenceAR:
    """Request-level reference chat and T2I prefills (module docstring)."""

    def __init__(self, model: Blip3oModel, tokenizer: Any, special: SpecialTokens) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.special = special
        self.max_model_len = model.cfg.text.max_position_embeddings
        self._chats: dict[str, _Chat] = {}
        self._t2i: dict[str, PreparedPrompt] = {}
        self._current: str | None = None  # the request `step` is working on (for fail_pending_step)
        self.last_step_prefilled = False  # the last step ran a T2I prefill or a chat's prompt (its first token)

    def add_request(self, request_id: str, prompt: PreparedPrompt, params: SamplingParams) -> None:
        check_context("prompt + max_tokens", len(prompt.token_ids) + params.max_tokens, self.max_model_len,
                      self.max_model_len)
        tokens = reference.stream_text(self.model, prompt, params, self.tokenizer, self.special)
        self._chats[request_id] = _Chat(prompt, tokens)

    def add_t2i_request(self, request_id: str, prompt: PreparedPrompt) -> None:
        if self.model.queries is None:
            raise ConfigError("this checkpoint has no latent queries: it cannot generate images")
        n = len(prompt.token_ids) + self.model.queries.weight.shape[1]
        check_context("prompt + latent queries", n, self.max_model_len, self.max_model_len)
        self._t2i[request_id] = prompt

    def encode_alone(self, prompt: PreparedPrompt):
        """The query states `[Q, H]` of one T2I prompt (the reference runs everything alone)."""
        with reference_ops():
            return reference.encode_t2i_prompt(self.model, prompt, self.special)

    def abort(self, request_id: str) -> bool:
        chat = self._chats.pop(request_id, None)
        if chat is not None:
            chat.tokens.close()
            return True
        return self._t2i.pop(request_id, None) is not None

    def has_unfinished(self) -> bool:
        return bool(self._chats or self._t2i)

    def stats(self) -> dict[str, int]:
        return {"chat_running": len(self._chats), "chat_waiting": 0, "t2i_running": 0, "t2i_waiting": len(self._t2i),
                "kv_blocks_used": 0, "kv_blocks_total": 0}

    def fail_pending_step(self) -> list[str]:
        """After `step` raised: the request it was working on (its generator is dead)."""
        rid, self._current = self._current, None
        if rid is not None:
            self.abort(rid)
        return [rid] if rid is not None else []

    def step(self) -> list[RequestOutput]:
        """One token for every chat request, every waiting T2I prefill whole."""
        outputs = []
        self.last_step_prefilled = bool(self._t2i)
        with reference_ops():
            for rid in list(self._t2i):
                self._current = rid
                hidden = reference.encode_t2i_prompt(self.model, self._t2i[rid], self.special)  # [Q, H]
                prompt = self._t2i.pop(rid)
                outputs.append(RequestOutput(rid, [], "", True, "stop", prompt_tokens=len(prompt.token_ids),
                                             hidden_states=hidden))
            for rid, chat in list(self._chats.items()):
                self._current = rid
                delta, text, ids, finish = next(chat.tokens)
                self.last_step_prefilled |= len(ids) == 1  # its first token: this call ran the prompt
                if finish is not None:
                    del self._chats[rid]
                    chat.tokens.close()
                outputs.append(RequestOutput(rid, ids[-1:], delta, finish is not None, finish, ids, text,
                                             len(chat.prompt.token_ids)))
        self._current = None
        return outputs


__all__ = ["ReferenceAR"]
