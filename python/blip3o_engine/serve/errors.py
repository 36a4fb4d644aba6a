"""The ONE place that maps errors to HTTP statuses and OpenAI error bodies.

Every error a client sees is `{"error": {"message", "type", "param", "code"}}` (OpenAI's shape, which its
clients parse into `openai.BadRequestError`, `RateLimitError`, ...):

  400  bad request: validation (pydantic, `InputError`), bad images, a request that can never fit
       (`CapacityError`), what the model cannot do (`ConfigError`)
  401  no valid `Authorization: Bearer` key
  404  an unknown model or route
  413  a body past --max-body-mb
  429  `OverloadedError` (--max-pending reached), with Retry-After
  503  shutting down (`EngineShutdownError`, draining) or the engine loop died (`EngineDeadError`)
  500  a request that failed inside the engine (`RequestFailedError`) or anything unexpected
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import (Blip3oError, CapacityError, ConfigError, EngineDeadError, EngineShutdownError, InputError,
                      OverloadedError, RequestFailedError)

log = logging.getLogger("blip3o_engine.serve")

# OpenAI's error `type` per status (its clients key on the status; the type is for people reading it).
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "service_unavailable_error"}
RETRY_AFTER_S = 1  # what a 429 / 503-while-draining tells clients to wait before retrying


class APIError(Exception):
    """An HTTP error in OpenAI's shape; raise it anywhere in a route."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.type = type or ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def shutting_down(message: str = "the server is shutting down: it takes no new requests") -> APIError:
    return APIError(503, message, code="shutting_down", headers={"Retry-After": str(RETRY_AFTER_S)})


def from_exception(exc: BaseException) -> APIError:
    """The HTTP error for any exception a route lets through."""
    if isinstance(exc, APIError):
        return exc
    message = str(exc) or type(exc).__name__
    if isinstance(exc, (InputError, CapacityError)):
        return APIError(400, message, code="capacity_exceeded" if isinstance(exc, CapacityError) else None)
    if isinstance(exc, ConfigError):  # e.g. a chat-only checkpoint asked for an image
        return APIError(400, message, code="unsupported")
    if isinstance(exc, OverloadedError):
        return APIError(429, message, code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, EngineShutdownError):
        return shutting_down(message)
    if isinstance(exc, EngineDeadError):
        return APIError(503, message, code="engine_dead")
    if isinstance(exc, RequestFailedError):
        return APIError(500, message, code="request_failed")
    if isinstance(exc, Blip3oError):
        return APIError(500, message)
    log.error("unexpected error in a request: %s: %s", type(exc).__name__, exc, exc_info=exc)
    return APIError(500, f"internal server error ({type(exc).__name__})")


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """A 400 from pydantic's errors (a malformed JSON body, a missing or mistyped field)."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return bad_request(f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                           code="invalid_json")
    if not loc and first.get("type") in ("model_attributes_type", "dict_type"):
        return bad_request("the body must be a JSON object (send it with 'Content-Type: application/json')",
                           code="invalid_json")
    where = ".".join(loc)
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return bad_request(f"{where + ': ' if where else ''}{first['msg']}{more}", param=where or None)


def install_handlers(app) -> None:
    """Make FastAPI answer every error in OpenAI's shape."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    def respond(err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        return respond(validation_error(list(exc.errors())))

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):  # unknown routes (404), wrong methods (405)
        return respond(APIError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {})))

    @app.exception_handler(APIError)
    async def _api(request, exc: APIError):
        return respond(exc)

    @app.exception_handler(Blip3oError)
    async def _engine(request, exc: Blip3oError):
        return respond(from_exception(exc))

    @app.exception_handler(Exception)  # the last resort (Starlette logs these and re-raises after answering)
    async def _any(request, exc: Exception):
        return respond(from_exception(exc))


__all__ = ["APIError", "RETRY_AFTER_S", "bad_request", "from_exception", "install_handlers", "shutting_down",
           "validation_error"]
