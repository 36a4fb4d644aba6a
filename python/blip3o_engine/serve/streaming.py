"""Server-sent events, and tying a request's work to its client's connection.

A client that goes away must free what its request holds (KV blocks, a decoder slot). The engine side is
simple: cancelling the task that consumes an `AsyncEngine` stream aborts the request. This module makes sure
that cancel happens:
- `EventStreamResponse` always listens for `http.disconnect` next to the stream and cancels the stream when it
  comes (Starlette's StreamingResponse stops listening under ASGI spec 2.4 and would only notice at its next
  write, which for an image in its DiT stage can be many seconds away);
- `until_disconnected` runs a non-streaming request's work and cancels it when the client disconnects.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse

T = TypeVar("T")
_END = object()


class ClientDisconnected(Exception):
    """The client closed its connection before the answer was ready (its work was cancelled)."""


def sse(data: Any, event: str | None = None) -> str:
    """One server-sent event: `event:` line (optional) and a `data:` line of JSON (or a raw string)."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


class EventStreamResponse(StreamingResponse):
    """`text/event-stream` whose producer is cancelled as soon as the client disconnects."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], **kwargs: Any) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **kwargs.pop("headers", {})}
        super().__init__(content, headers=headers, **kwargs)

    async def __call__(self, scope, receive, send) -> None:
        async with anyio.create_task_group() as group:
            async def stream_then_stop() -> None:
                try:
                    await self.stream_response(send)
                except OSError:  # the connection broke while writing: same as a disconnect
                    pass
                group.cancel_scope.cancel()

            group.start_soon(stream_then_stop)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`await work`, cancelled (and `ClientDisconnected` raised) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    if task.cancelled() or not task.done():
        await asyncio.gather(task, return_exceptions=True)  # let the cancellation (and the aborts) finish
        raise ClientDisconnected("the client disconnected")
    return task.result()


async def start_all(streams: list[AsyncIterator[T]]) -> list[AsyncIterator[T]]:
    """Wait for every stream's first item (the engine admitted the request and it made progress), so that an
    error in submitting any of them (a bad parameter, the server full) becomes an HTTP error instead of an
    event in a response already begun. On an error every stream is closed (their requests aborted)."""
    firsts = [asyncio.ensure_future(anext(s)) for s in streams]
    try:
        items = await asyncio.gather(*firsts)
    except BaseException:
        for f in firsts:
            f.cancel()
        await asyncio.gather(*firsts, return_exceptions=True)
        for s in streams:
            await s.aclose()
        raise
    return [_prepend(item, s) for item, s in zip(items, streams)]


async def _prepend(first: T, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    try:
        yield first
        async for item in rest:
            yield item
    finally:
        await rest.aclose()


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """(index, item) from several streams as the items come; an error in one ends the merge with that error;
    leaving early (or being cancelled) cancels every stream (which aborts their requests)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((i, item, None))
            await queue.put((i, _END, None))
        except Exception as e:  # noqa: BLE001 - handed to the merge's consumer
            await queue.put((i, _END, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, item, error = await queue.get()
            if error is not None:
                raise error
            if item is _END:
                left -= 1
                continue
            yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect_last(streams: list[AsyncIterator[T]]) -> list[T]:
    """The last item of every stream, run concurrently (the first error cancels the others)."""
    last: list[Any] = [None] * len(streams)
    async for i, item in merge(streams):
        last[i] = item
    return last


__all__ = ["ClientDisconnected", "EventStreamResponse", "collect_last", "merge", "sse", "start_all",
           "until_disconnected"]
