"""POST /v1/chat/completions: OpenAI's chat completions over `AsyncEngine.chat_outputs`.

The messages' images are loaded first (media.py, the server's limits), then the conversation is tokenized on
the engine's loop thread (`AsyncEngine.prepare_chat`) so that `max_tokens` can default, as in vLLM, to the rest
of the context. `n` choices are `n` engine requests over the same prompt (with `seed`, choice i uses seed + i, so
that sampled choices differ and each is reproducible). Every request is admitted before a streamed response
begins, so a refusal (400, 429) is a real HTTP status; an error after that is sent as an error event, then
`[DONE]`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from ..async_engine import AsyncEngine
from ..outputs import RequestOutput
from ..params import SamplingParams
from .errors import bad_request, from_exception
from .media import MediaLoader
from .metrics import ServerMetrics, track_chat
from .protocol import ChatCompletionRequest, ChatMessage, ImageURLPart
from .streaming import EventStreamResponse, collect_last, merge, sse, start_all, until_disconnected

ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role


class ChatService:
    def __init__(self, engine: AsyncEngine, media: MediaLoader, metrics: ServerMetrics, model_name: str) -> None:
        self.engine = engine
        self.media = media
        self.metrics = metrics
        self.model_name = model_name

    async def create(self, body: ChatCompletionRequest, request: Request):
        arrival = time.perf_counter()
        messages = await self._engine_messages(body.messages)
        prompt = await self.engine.prepare_chat(messages)
        params = self._sampling_params(body, len(prompt.token_ids))
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        streams = [track_chat(self.metrics, self.engine.chat_outputs(prompt, p, request_id=f"{rid}-{i}"), arrival,
                              count_prompt=i == 0) for i, p in enumerate(params)]
        if body.stream:
            streams = await until_disconnected(request, start_all(streams))
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStreamResponse(self._chunks(rid, streams, len(prompt.token_ids), include_usage))
        finals = await until_disconnected(request, collect_last(streams))
        return JSONResponse(self._completion(rid, finals, len(prompt.token_ids)))

    # ------------------------------------------------------------------------------ request -> engine

    async def _engine_messages(self, messages: list[ChatMessage]) -> list[dict[str, Any]]:
        """OpenAI messages -> the engine's, with every image_url loaded (concurrently)."""
        loads, out = [], []
        for i, msg in enumerate(messages):
            role = ROLE_ALIASES.get(msg.role, msg.role)
            if msg.content is None or isinstance(msg.content, str):
                out.append({"role": role, "content": msg.content or ""})
                continue
            items = []
            for j, part in enumerate(msg.content):
                if isinstance(part, ImageURLPart):
                    url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                    item = {"type": "image", "image": None}
                    loads.append((item, self.media.load_url(url, f"messages[{i}].content[{j}].image_url")))
                    items.append(item)
                else:
                    items.append({"type": "text", "text": part.text})
            out.append({"role": role, "content": items})
        images = await asyncio.gather(*(load for _, load in loads))
        for (item, _), image in zip(loads, images):
            item["image"] = image
        return out

    def _sampling_params(self, body: ChatCompletionRequest, prompt_tokens: int) -> list[SamplingParams]:
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:  # vLLM's default: the rest of the context
            max_tokens = self.engine.engine.max_model_len - prompt_tokens
            if max_tokens < 1:
                raise bad_request(f"the prompt is {prompt_tokens} tokens, which leaves no room to generate within "
                                  f"the model's {self.engine.engine.max_model_len}-token context", param="messages")
        base = dict(max_tokens=max_tokens, temperature=_or(body.temperature, 1.0), top_p=_or(body.top_p, 1.0),
                    top_k=_or(body.top_k, -1), repetition_penalty=_or(body.repetition_penalty, 1.0),
                    stop=body.stop or (), ignore_eos=body.ignore_eos)
        return [SamplingParams(**base, seed=None if body.seed is None else body.seed + i) for i in range(body.n)]

    # ------------------------------------------------------------------------------ engine -> response

    def _completion(self, rid: str, finals: list[RequestOutput], prompt_tokens: int) -> dict[str, Any]:
        choices = [{"index": i, "message": {"role": "assistant", "content": out.text}, "logprobs": None,
                    "finish_reason": out.finish_reason} for i, out in enumerate(finals)]
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": self.model_name,
                "choices": choices, "usage": _usage(prompt_tokens, finals)}

    async def _chunks(self, rid: str, streams: list[AsyncIterator[RequestOutput]], prompt_tokens: int,
                      include_usage: bool) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                    "choices": choices}
            if include_usage:
                body["usage"] = None
            return sse({**body, **extra})

        finals: list[RequestOutput | None] = [None] * len(streams)
        try:
            for i in range(len(streams)):
                yield chunk([_choice(i, {"role": "assistant", "content": ""})])
            async for i, out in merge(streams):
                if out.finished:
                    finals[i] = out
                    delta = {"content": out.text_delta} if out.text_delta else {}
                    yield chunk([_choice(i, delta, out.finish_reason)])
                elif out.text_delta:
                    yield chunk([_choice(i, {"content": out.text_delta})])
            if include_usage:
                yield chunk([], usage=_usage(prompt_tokens, finals))
        except Exception as e:  # noqa: BLE001 - after the 200 the only way to tell the client is an event
            yield sse(from_exception(e).body())
        yield sse("[DONE]")


def _choice(index: int, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def _usage(prompt_tokens: int, finals: list[RequestOutput]) -> dict[str, int]:
    completion = sum(len(out.token_ids) for out in finals)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def _or(value, default):
    return default if value is None else value


__all__ = ["ChatService"]
