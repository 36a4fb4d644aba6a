"""`RequestGate`: the pure-ASGI middleware in front of the API routes (/v1/...), in this order:

1. draining (SIGTERM received) -> 503 with Retry-After;
2. API key (`auth.APIKeys`) -> 401, before any of the body is read;
3. body size: a Content-Length past the limit -> 413 at once; otherwise the body is read (at most the limit,
   more is 413) and replayed to the app, whose later `receive()` calls then see the client's disconnect.

Every response (all routes) gets the `x-blip3o-replica` header naming the process that answered.
/health, /metrics and the playground stay public. Pure ASGI rather than Starlette's BaseHTTPMiddleware: that one
runs the app in a separate task and hides `http.disconnect` from streaming responses.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from .auth import APIKeys
from .errors import APIError, shutting_down

REPLICA_HEADER = "x-blip3o-replica"


class RequestGate:
    def __init__(self, app, *, keys: APIKeys, max_body_bytes: int, replica_name: str,
                 is_draining: Callable[[], bool], protected_prefix: str = "/v1/") -> None:
        self.app = app
        self.keys = keys
        self.max_body_bytes = max_body_bytes
        self.replica_header = (REPLICA_HEADER.encode(), replica_name.encode("latin-1", "replace"))
        self.is_draining = is_draining
        self.protected_prefix = protected_prefix

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = self._with_replica_header(send)
        if not scope["path"].startswith(self.protected_prefix):
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        if self.is_draining():
            await _respond(send, shutting_down())
            return
        if not self.keys.allows(headers.get("authorization")):
            await _respond(send, APIError(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                                          code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
            return
        too_large = APIError(413, f"the request body is larger than the server's limit of {self.max_body_bytes} "
                                  f"bytes (--max-body-mb)", code="request_too_large")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await _respond(send, too_large)
            return
        body, disconnected = await self._read_body(receive)
        if disconnected:
            return  # the client left before sending its request: nothing to answer
        if body is None:
            await _respond(send, too_large)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, receive) -> tuple[bytes | None, bool]:
        """The whole body (None past the limit), and whether the client disconnected meanwhile."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, True
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None, False
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), False

    def _with_replica_header(self, send):
        async def send_with_header(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.replica_header]}
            await send(message)

        return send_with_header


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _replay(body: bytes, receive):
    """A receive() that hands the buffered body over once, then the client's own messages (its disconnect)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _respond(send, err: APIError) -> None:
    payload = json.dumps(err.body(), separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


__all__ = ["REPLICA_HEADER", "RequestGate"]
