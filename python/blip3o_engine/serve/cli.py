"""The `serve` command: flags (argparse only, so `blip3o-engine --help` needs no server packages) and the run.

One process (server.py): bind the socket (a taken port fails before the weights load), load the engine, serve
the app with uvicorn. SIGTERM (or Ctrl+C) drains: new requests get 503, running ones get --drain-timeout-s to
finish, then the process exits 0; a second Ctrl+C exits at once. With `--replicas N` the same app runs on N Ray
Serve replicas instead (ray.py).
"""

from __future__ import annotations

import argparse
import importlib.util

from ..errors import ConfigError, InputError

SERVE_PACKAGES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "prometheus_client": "prometheus-client",
                  "multipart": "python-multipart", "httpx": "httpx"}


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only; "
                                                       "0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 = any free port, printed "
                                                         "in the 'ready:' line)")
    p.add_argument("--api-key", dest="api_keys", nargs="+", action="extend", default=[], metavar="K",
                   help="require 'Authorization: Bearer K' on /v1/* (several keys allowed; /health, /metrics and "
                        "the playground stay public)")
    p.add_argument("--served-model-name", default=None, help="the model id clients use (default: --model)")
    p.add_argument("--max-pending", type=int, default=256,
                   help="engine requests admitted at once (n > 1 counts n); one more gets 429 (default 256)")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body, uploads included; "
                                                                  "more gets 413 (default 32)")
    p.add_argument("--allowed-media-domains", nargs="+", action="extend", default=[], metavar="D",
                   help="host names whose http(s) image URLs the server may fetch (default: none)")
    p.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="directory whose files file:// image URLs may name (default: none)")
    p.add_argument("--media-timeout-s", type=float, default=10.0, help="time limit of one image fetch (default 10)")
    p.add_argument("--max-media-mb", type=float, default=20.0, help="largest image, fetched or uploaded (default 20)")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096,
                   help="most pixels of an input image, checked before decoding (default 4096x4096)")
    p.add_argument("--drain-timeout-s", type=float, default=30.0,
                   help="on SIGTERM, how long running requests may finish before they are aborted (default 30)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    ray = p.add_argument_group("Ray Serve replicas (the [ray] extra)")
    ray.add_argument("--replicas", type=int, default=None,
                     help="run N replicas on Ray Serve, one engine each (default: one process, no Ray)")
    ray.add_argument("--replica-num-cpus", type=float, default=1.0,
                     help="CPUs Ray reserves per replica; fractions allowed (default 1)")
    ray.add_argument("--replica-num-gpus", type=float, default=0.0,
                     help="GPUs Ray reserves per replica (default 0; 1 on GPU machines, fractions to share one)")
    ray.add_argument("--max-ongoing-requests", type=int, default=64,
                     help="requests Ray routes to one replica at once (default 64)")


def require_serve_packages() -> None:
    missing = [pip for mod, pip in SERVE_PACKAGES.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise ConfigError(f"blip3o-engine serve needs the [serve] extra ({', '.join(missing)} missing): "
                          f"pip install 'blip3o-engine[serve]'")


def settings_from_args(args):
    from .settings import ServeSettings

    if args.max_pending < 1:
        raise InputError(f"--max-pending must be >= 1, got {args.max_pending}")
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be in [0, 65535], got {args.port}")
    return ServeSettings(served_model_name=args.served_model_name or str(args.model), api_keys=tuple(args.api_keys),
                         max_body_mb=args.max_body_mb, allowed_media_domains=tuple(args.allowed_media_domains),
                         allowed_local_media_path=args.allowed_local_media_path, media_timeout_s=args.media_timeout_s,
                         max_media_mb=args.max_media_mb, max_image_pixels=args.max_image_pixels,
                         drain_timeout_s=args.drain_timeout_s)


def run_serve(args) -> int:
    require_serve_packages()
    settings = settings_from_args(args)
    if args.replicas is not None:
        from .ray import run_replicas

        return run_replicas(args, settings)
    from ..async_engine import AsyncEngine
    from ..cli import _check_model_args, _load_engine
    from .server import bind_socket, serve_app

    _check_model_args(args)
    sock = bind_socket(args.host, args.port)  # before minutes of loading: a taken port fails now
    engine = AsyncEngine(_load_engine(args), max_pending=args.max_pending)
    serve_app(engine, settings, sock, args.log_level)
    return 0


__all__ = ["add_serve_args", "require_serve_packages", "run_serve", "settings_from_args"]
