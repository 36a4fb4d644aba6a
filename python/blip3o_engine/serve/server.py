"""Running the app in one process: the listening socket, and uvicorn with a drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys

import uvicorn

from ..errors import InputError
from .app import create_app


def bind_socket(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port}: {e}") from e
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve_app(engine, settings, sock: socket.socket, log_level: str = "info") -> None:
    """Serve `create_app(engine, settings)` on a bound socket until SIGTERM/SIGINT, draining first."""
    app = create_app(engine, settings)
    config = uvicorn.Config(app, log_level=log_level, access_log=log_level in ("info", "debug"), lifespan="on",
                            timeout_graceful_shutdown=10)
    DrainingServer(config, app.state.blip3o, url_of(sock)).run(sockets=[sock])


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain on SIGTERM/SIGINT: /v1 answers 503 and /health turns 503 while the engine
    finishes (or past the drain timeout aborts) what it runs; then uvicorn's own shutdown closes the
    connections. Replaces uvicorn's signal handling, which stops accepting connections at once and re-raises
    the signal after shutdown (so a SIGTERM'd server exits 143 instead of 0)."""

    def __init__(self, config, state, url: str) -> None:
        super().__init__(config)
        self.state = state
        self.url = url
        self._drain_task: asyncio.Task | None = None

    @contextlib.contextmanager
    def capture_signals(self):
        loop = asyncio.get_running_loop()
        handled = (signal.SIGINT, signal.SIGTERM)
        for sig in handled:
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            yield
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        if self._drain_task is not None:
            if sig == signal.SIGINT:  # a second Ctrl+C: stop now
                self.should_exit = self.force_exit = True
            return
        print(f"{signal.Signals(sig).name}: draining (new requests get 503; up to "
              f"{self.state.settings.drain_timeout_s:g} s for the running ones)", file=sys.stderr, flush=True)
        self.state.begin_drain()
        self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        await self.state.engine.shutdown(self.state.settings.drain_timeout_s)
        self.should_exit = True

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if not self.should_exit:
            print(f"ready: {self.url} (model {self.state.settings.served_model_name!r}; playground at {self.url}/)",
                  file=sys.stderr, flush=True)


__all__ = ["DrainingServer", "bind_socket", "serve_app", "url_of"]
