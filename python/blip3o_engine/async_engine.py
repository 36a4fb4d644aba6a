"""`AsyncEngine`: the asyncio front a server uses, over one `Engine` and its step loop.

    aengine = AsyncEngine.from_pretrained("tiny", backend="optimized", max_pending=256)
    async for delta in aengine.chat_stream(messages, params):       # text deltas
        ...
    result = await aengine.generate_image("a red apple", ImageParams(seed=0))

One background thread owns the engine: every engine call (submitting, aborting, stepping) runs on it, so the
event loop never waits for a step. Callers hand it commands through a queue and await their answer
(a submission that fails validation raises its `InputError` in the caller). While any request is in
flight the thread runs `Engine.step()` back to back; outputs go to each request's asyncio queue
(`loop.call_soon_threadsafe`); when nothing is left it sleeps until the next command.

Limits and failures:
- at most `max_pending` requests are admitted at once; one more raises `OverloadedError`;
- cancelling the task that consumes a request (a client that disconnects) aborts the request and frees
  everything it holds;
- an error inside one request's work fails that request only (its consumer gets that error when it is one of
  the package's typed errors, else `RequestFailedError` from it), and the loop goes on; if the loop itself dies, every consumer gets `EngineDeadError` and so does every later
  call (`is_dead` tells a health check);
- `shutdown(drain_timeout_s)` refuses new work (`EngineShutdownError`), lets running requests finish for up
  to the timeout, aborts the rest, and stops the thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from .engine import Engine, ImageParamsLike, SamplingParamsLike
from .errors import EngineDeadError, EngineShutdownError, InputError, OverloadedError, RequestFailedError
from .outputs import ChatResult, EngineStats, ImageOutput, ImageResult, RequestOutput, raise_failure

log = logging.getLogger("blip3o_engine.async")

@dataclass(eq=False)
class _Stream:
    """One admitted request as its consumer sees it."""

    request_id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: bool = False


class AsyncEngine:
    """The asyncio front of an `Engine` (module docstring)."""

    def __init__(self, engine: Engine, max_pending: int = 256) -> None:
        if not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be an int >= 1, got {max_pending!r}")
        self.engine = engine
        self.max_pending = max_pending
        self._streams: dict[str, _Stream] = {}  # admitted, unfinished requests (touched on event-loop threads)
        self._streams_lock = threading.Lock()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stats = engine.stats()
        self._dead: BaseException | None = None
        self._closing = False
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="blip3o-engine-loop", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(cls, *args: Any, max_pending: int = 256, **kwargs: Any) -> AsyncEngine:
        """`Engine.from_pretrained(*args, **kwargs)` (loads the weights now, blocking), wrapped."""
        return cls(Engine.from_pretrained(*args, **kwargs), max_pending=max_pending)

    # ------------------------------------------------------------------------------ state

    @property
    def is_dead(self) -> bool:
        """Whether the step loop died (every call then raises EngineDeadError)."""
        return self._dead is not None

    @property
    def num_pending(self) -> int:
        return len(self._streams)

    def stats(self) -> EngineStats:
        """The engine's stats after its latest step (a snapshot the loop thread publishes)."""
        return self._stats

    # ------------------------------------------------------------------------------ chat

    async def chat_outputs(self, messages: list[dict[str, Any]], params: SamplingParamsLike = None,
                           request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Every `RequestOutput` of one chat request, the last with `finished=True` (a server's view)."""
        rid = request_id or f"chat-{uuid.uuid4().hex}"
        stream = await self._submit(rid, lambda e: e.add_request(rid, messages, params))
        async for out in self._consume(stream):
            yield out

    async def chat_stream(self, messages: list[dict[str, Any]], params: SamplingParamsLike = None,
                          request_id: str | None = None) -> AsyncIterator[str]:
        """The answer's text deltas as they are generated; they concatenate to `chat`'s text."""
        async for out in self.chat_outputs(messages, params, request_id):
            if out.text_delta:
                yield out.text_delta

    async def chat(self, messages: list[dict[str, Any]], params: SamplingParamsLike = None,
                   request_id: str | None = None) -> ChatResult:
        last = None
        async for last in self.chat_outputs(messages, params, request_id):
            pass
        return ChatResult(last.text, last.token_ids, last.finish_reason, last.prompt_tokens)

    # ------------------------------------------------------------------------------ images

    async def generate_image_stream(self, prompt: str, params: ImageParamsLike = None, image: Any = None,
                                    request_id: str | None = None,
                                    preview_every: int = 0) -> AsyncIterator[ImageOutput]:
        """The `ImageOutput`s of one image request (stage progress, every decoder step, previews when
        `preview_every` > 0), ending with the one that carries the `ImageResult`."""
        rid = request_id or f"image-{uuid.uuid4().hex}"
        stream = await self._submit(rid, lambda e: e.add_image_request(rid, prompt, params, image, preview_every))
        async for out in self._consume(stream):
            yield out

    async def generate_image(self, prompt: str, params: ImageParamsLike = None, image: Any = None,
                             request_id: str | None = None) -> ImageResult:
        last = None
        async for last in self.generate_image_stream(prompt, params, image, request_id):
            pass
        return last.result

    # ------------------------------------------------------------------------------ control

    async def abort(self, request_id: str) -> bool:
        """Stop a request at any stage and free what it holds; its consumer gets RequestFailedError ("aborted").
        False if unknown or already finished."""
        self._end_stream(request_id, RequestFailedError(f"request {request_id} was aborted"))
        return bool(await self._call(lambda e: e.abort(request_id)))

    async def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new work, let what runs finish for up to `drain_timeout_s`, abort the rest, stop the loop."""
        self._closing = True
        deadline = asyncio.get_running_loop().time() + max(drain_timeout_s, 0.0)
        while self._streams and not self.is_dead and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        for rid in list(self._streams):
            self._end_stream(rid, EngineShutdownError(f"the engine shut down before request {rid} finished"))
            if not self.is_dead:
                await self._call(lambda e, rid=rid: e.abort(rid))
        self._stop = True
        self._wake.set()
        await asyncio.to_thread(self._thread.join, 10.0)

    # ------------------------------------------------------------------------------ plumbing

    async def _submit(self, request_id: str, add: Callable[[Engine], Any]) -> _Stream:
        """Admit a request: checks, then `add(engine)` on the loop thread (its validation errors raise here)."""
        self._check_open()
        loop = asyncio.get_running_loop()
        stream = _Stream(request_id, loop)
        with self._streams_lock:
            if len(self._streams) >= self.max_pending:
                raise OverloadedError(f"{len(self._streams)} requests are pending (max_pending={self.max_pending});"
                                      f" retry later")
            if request_id in self._streams:
                raise InputError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream
        try:
            await self._call(add)
        except BaseException:
            self._pop_stream(request_id)
            raise
        return stream

    async def _consume(self, stream: _Stream) -> AsyncIterator[Any]:
        """Yield the stream's outputs until its last; abort the request if the consumer stops early (a
        cancelled task, a closed generator, an exception)."""
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    stream.finished = True  # ended by the engine side: nothing left to abort
                    raise item
                if item.error is not None:
                    stream.finished = True
                    raise_failure(item)
                yield item
                if item.finished:
                    stream.finished = True
                    return
        finally:
            if not stream.finished and self._pop_stream(stream.request_id) is not None and not self.is_dead:
                self._commands.put((lambda e: e.abort(stream.request_id), None, None))
                self._wake.set()

    async def _call(self, fn: Callable[[Engine], Any]) -> Any:
        """Run `fn(engine)` on the loop thread and await its result (or its exception)."""
        self._check_alive()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._commands.put((fn, future, loop))
        self._wake.set()
        return await future

    def _check_open(self) -> None:
        self._check_alive()
        if self._closing:
            raise EngineShutdownError("the engine is shutting down: it takes no new requests")

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine's step loop died: {type(self._dead).__name__}: {self._dead}")

    def _end_stream(self, request_id: str, error: BaseException) -> None:
        """End a request's stream with `error` for its consumer (the engine-side abort is separate)."""
        stream = self._pop_stream(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, error)

    def _pop_stream(self, request_id: str) -> _Stream | None:
        with self._streams_lock:
            return self._streams.pop(request_id, None)

    # ------------------------------------------------------------------------------ the loop thread

    def _run(self) -> None:
        while not self._stop:
            self._run_commands()
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except BaseException as e:  # noqa: BLE001 - per-request failures never get here (StepLoop)
                self._die(e)
                return
            self._stats = self.engine.stats()
            for out in outputs:
                self._deliver(out)
        self._run_commands()

    def _run_commands(self) -> None:
        while True:
            try:
                fn, future, loop = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                result, error = fn(self.engine), None
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting caller
                result, error = None, e
            self._stats = self.engine.stats()
            if future is not None:
                loop.call_soon_threadsafe(_resolve, future, result, error)

    def _deliver(self, out: RequestOutput | ImageOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return  # aborted by its consumer meanwhile
        if out.finished:
            self._pop_stream(out.request_id)
        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)

    def _die(self, error: BaseException) -> None:
        log.error("the engine's step loop died: %s: %s", type(error).__name__, error, exc_info=error)
        self._dead = error
        with self._streams_lock:
            streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            dead = EngineDeadError(f"the engine's step loop died: {type(error).__name__}: {error}")
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, dead)
        self._run_commands_failing(error)

    def _run_commands_failing(self, error: BaseException) -> None:
        while True:
            try:
                _, future, loop = self._commands.get_nowait()
            except queue.Empty:
                return
            if future is not None:
                dead = EngineDeadError(f"the engine's step loop died: {type(error).__name__}: {error}")
                loop.call_soon_threadsafe(_resolve, future, None, dead)


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


__all__ = ["AsyncEngine"]
