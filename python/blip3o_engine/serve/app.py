"""`create_app(engine, settings)`: the FastAPI app over one `AsyncEngine` (every route shares it).

Routes: POST /v1/chat/completions, /v1/images/generations, /v1/images/edits; GET /v1/models, /health, /metrics,
and the playground at / (static files shipped in the package). The `RequestGate` middleware (gate.py) guards
/v1/*: draining, API keys, body size. `ServerState.begin_drain()` is what SIGTERM triggers (cli.py): new /v1
requests get 503 and /health turns 503 while running requests finish.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from .. import __version__
from ..async_engine import AsyncEngine
from .auth import APIKeys
from .chat import ChatService
from .errors import APIError, install_handlers, shutting_down
from .gate import RequestGate
from .images import ImageService
from .media import MediaLoader
from .metrics import ServerMetrics
from .protocol import ChatCompletionRequest, ImageRequest
from .settings import ServeSettings
from .streaming import ClientDisconnected

STATIC_DIR = Path(__file__).parent / "static"
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away"; nobody reads it


class ServerState:
    """What the routes share: the engine, the settings, the metrics, the media loader, the draining flag."""

    def __init__(self, engine: AsyncEngine, settings: ServeSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = ServerMetrics(engine, settings.served_model_name)
        self.media = MediaLoader(settings)
        self.draining = False
        self.created = int(time.time())

    def begin_drain(self) -> None:
        self.draining = True

    async def close(self) -> None:
        """The app stops: finish (or abort, past the drain timeout) what runs, stop the engine's loop."""
        self.draining = True
        await self.media.aclose()
        if not self.engine.is_dead:
            await self.engine.shutdown(self.settings.drain_timeout_s)


def create_app(engine: AsyncEngine, settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    state = ServerState(engine, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await state.close()

    app = FastAPI(title="blip3o-engine", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None)  # the docs pages load their scripts from a CDN
    app.state.blip3o = state
    install_handlers(app)
    _add_api_routes(app, state)
    _add_service_routes(app, state)
    app.add_middleware(RequestGate, keys=APIKeys(settings.api_keys), max_body_bytes=settings.max_body_bytes,
                       replica_name=settings.replica_name, is_draining=lambda: state.draining)

    @app.exception_handler(ClientDisconnected)
    async def _gone(request, exc):
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    return app


def _add_api_routes(app: FastAPI, state: ServerState) -> None:
    name = state.settings.served_model_name
    chat = ChatService(state.engine, state.media, state.metrics, name)
    images = ImageService(state.engine, state.media, state.metrics, name)

    def check_model(model: str | None) -> None:
        if model not in (None, "", name):
            raise APIError(404, f"the model {model!r} does not exist; this server serves {name!r}", param="model",
                           code="model_not_found")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        return await chat.create(body, request)

    @app.post("/v1/images/generations")
    async def image_generations(body: ImageRequest, request: Request):
        check_model(body.model)
        return await images.generations(body, request)

    @app.post("/v1/images/edits")
    async def image_edits(request: Request):
        return await images.edits(request, check_model)

    @app.get("/v1/models")
    async def models():
        engine = state.engine.engine
        return {"object": "list", "data": [{
            "id": name, "object": "model", "created": state.created, "owned_by": "blip3o-engine", "root": engine.name,
            "max_model_len": engine.max_model_len, "can_generate_images": engine.cfg.can_generate_images}]}


def _add_service_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health():
        if state.engine.is_dead:
            err = APIError(503, "the engine's step loop died; restart the server", code="engine_dead")
        elif state.draining:
            err = shutting_down()
        else:
            return JSONResponse({"status": "ok"})
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def playground():
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


__all__ = ["ServerState", "create_app"]
