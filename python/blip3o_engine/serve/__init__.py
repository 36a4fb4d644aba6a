"""`blip3o-engine serve`: an OpenAI-compatible HTTP server over one `AsyncEngine` (needs the `[serve]` extra).

One concern per module:
- `settings.py`  `ServeSettings`: the server's own options (names, keys, limits), independent of the engine's;
- `app.py`       `create_app(engine, settings)`: the FastAPI app (routes, middleware, error handlers, playground);
- `protocol.py`  the pydantic request models in OpenAI's shapes (unknown fields are ignored, as vLLM does);
- `chat.py`      /v1/chat/completions (plain and SSE);  `images.py`  /v1/images/generations and /edits;
- `media.py`     image_url / upload decoding with the allow-lists, the fetch timeout and the byte and pixel limits;
- `errors.py`    the ONE place that maps typed engine errors to HTTP statuses and OpenAI error bodies;
- `gate.py`      the ASGI middleware in front of /v1: draining (503), API keys (`auth.py`, 401), body size (413);
- `streaming.py` SSE responses that notice a client going away, and the helpers that cancel work when it does;
- `metrics.py`   a prometheus-client registry per app, fed by the engine's stats and per-request timings;
- `static/`      the web playground (plain HTML/JS/CSS, no build step, nothing from a CDN);
- `ray.py`       `build_app(...)`: the same app on Ray Serve replicas;
- `cli.py`       the `serve` command;  `bench_serve.py`  `blip3o-engine bench serve`, a bounded load generator.

Nothing outside this package imports it (the engine never depends on the server); only the command line
(`blip3o_engine/cli.py`) reaches in, lazily.
"""

from __future__ import annotations

__all__: list[str] = []
