"""Replicas on Ray Serve (the `[ray]` extra): the same FastAPI app as `blip3o-engine serve`, once per replica,
each replica with its own engine.

    from ray import serve
    from blip3o_engine.serve.ray import build_app

    serve.run(build_app("tiny", num_replicas=2, num_cpus=0.5), name="blip3o", route_prefix="/")

`build_app` returns a bound `@serve.deployment` + `@serve.ingress` class whose ASGI app is `create_app(...)`,
built when each replica starts (after its engine has loaded). Every response names its replica in the
`x-blip3o-replica` header. `blip3o-engine serve --replicas N` runs it on a local Ray instance (or the cluster
in RAY_ADDRESS).

Scaling and backpressure, from the outside in:
- `autoscaling_config` (e.g. {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}) lets Ray
  add replicas while each has more than the target in flight, and remove them when idle (replaces
  `num_replicas`);
- `max_ongoing_requests` caps the requests Ray routes to one replica at once; more wait in Ray's queue,
  `max_queued_requests` long at most (-1: unbounded), after which Ray answers 503;
- inside a replica, the engine's `max_pending` admits that many engine requests; one more is a 429.
Keep max_ongoing_requests <= max_pending so that Ray queues (and balances) before a replica refuses.
A replica whose engine loop died fails Ray's health check and is replaced.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

from .settings import ServeSettings

DEFAULT_APP_NAME = "blip3o"


def build_app(model: str = "tiny", *, num_replicas: int = 1, num_cpus: float = 1.0, num_gpus: float = 0.0,
              device: str = "cpu", dtype: str | None = None, backend: str = "optimized", threads: int | None = None,
              max_pending: int = 256, settings: ServeSettings | None = None,
              engine_options: dict[str, Any] | None = None, autoscaling_config: dict[str, Any] | None = None,
              max_ongoing_requests: int = 64, max_queued_requests: int = -1, deployment_name: str = "Blip3oServer"):
    """A Ray Serve application: `num_replicas` replicas (or `autoscaling_config`), each reserving `num_cpus`
    (fractions allowed: two replicas with 0.5 fit on one core) and `num_gpus`, each running one engine
    (`Engine.from_pretrained(model, device, dtype, backend, **engine_options)`, `threads` torch threads, default
    the CPUs it reserves) behind `create_app(engine, settings)`."""
    from ray import serve

    settings = settings or ServeSettings(served_model_name=str(model))
    engine_kwargs = dict(device=device, dtype=dtype or ("float32" if device == "cpu" else "bfloat16"),
                         backend=backend, **(engine_options or {}))
    torch_threads = threads or max(1, int(num_cpus))

    def build_asgi_app():  # runs in each replica as it starts
        return _replica_app(str(model), engine_kwargs, torch_threads, max_pending, settings)

    options: dict[str, Any] = dict(
        name=deployment_name, ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        max_ongoing_requests=max_ongoing_requests, max_queued_requests=max_queued_requests,
        graceful_shutdown_timeout_s=max(settings.drain_timeout_s, 1.0))
    if autoscaling_config is not None:
        options["autoscaling_config"] = autoscaling_config
    else:
        options["num_replicas"] = num_replicas

    @serve.deployment(**options)
    @serve.ingress(build_asgi_app)
    class Blip3oServer:
        def check_health(self) -> None:
            """Ray's periodic health check: a replica whose engine loop died is replaced."""
            app = getattr(self, "app", None)
            state = getattr(getattr(app, "state", None), "blip3o", None)
            if state is not None and state.engine.is_dead:
                raise RuntimeError("the engine's step loop died")

    return Blip3oServer.bind()


def _replica_app(model: str, engine_kwargs: dict[str, Any], threads: int, max_pending: int,
                 settings: ServeSettings):
    import dataclasses

    import torch
    from ray import serve

    from ..async_engine import AsyncEngine
    from ..engine import Engine
    from .app import create_app

    torch.set_num_threads(threads)
    context = serve.get_replica_context()
    replica = getattr(getattr(context, "replica_id", None), "unique_id", None) or str(context.replica_tag)
    engine = AsyncEngine(Engine.from_pretrained(model, **engine_kwargs), max_pending=max_pending)
    return create_app(engine, dataclasses.replace(settings, replica_name=f"{context.deployment}#{replica}"))


def run_replicas(args, settings: ServeSettings) -> int:
    """`blip3o-engine serve --replicas N`: Ray Serve on this machine (or RAY_ADDRESS's cluster) until SIGTERM."""
    from ..cli import _check_model_args, engine_options
    from ..errors import ConfigError, InputError

    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise ConfigError("--replicas needs the [ray] extra: pip install 'blip3o-engine[ray]'") from e
    if args.replicas < 1 or args.replica_num_cpus <= 0 or args.replica_num_gpus < 0:
        raise InputError("--replicas must be >= 1, --replica-num-cpus > 0 and --replica-num-gpus >= 0")
    if args.port == 0:
        raise InputError("--replicas needs an explicit --port (Ray's proxy does not pick a free one)")
    _check_model_args(args)  # before Ray starts: a bad model or option fails in a second, not a minute
    ray.init(include_dashboard=False, ignore_reinit_error=True)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        app = build_app(args.model, num_replicas=args.replicas, num_cpus=args.replica_num_cpus,
                        num_gpus=args.replica_num_gpus, device=args.device, dtype=args.dtype, backend=args.backend,
                        threads=args.threads, max_pending=args.max_pending, settings=settings,
                        engine_options={**engine_options(args), **({"compile": args.compile}
                                                                   if args.compile is not None else {})},
                        max_ongoing_requests=args.max_ongoing_requests)
        serve.run(app, name=DEFAULT_APP_NAME, route_prefix="/")
        print(f"ready: http://{args.host}:{args.port} ({args.replicas} Ray Serve replicas of "
              f"{settings.served_model_name!r})", file=sys.stderr, flush=True)
        _wait_for_signal()
        print("stopping the replicas", file=sys.stderr, flush=True)
        serve.shutdown()
    finally:
        ray.shutdown()
    return 0


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


__all__ = ["DEFAULT_APP_NAME", "build_app", "run_replicas"]
