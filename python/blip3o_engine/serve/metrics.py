"""Prometheus metrics (`GET /metrics`), named like vLLM's with the `blip3o:` prefix.

One `CollectorRegistry` per app (two apps in one process, as in tests, never share series). Gauges are read
from the engine's `stats()` at scrape time; histograms and counters are fed per request by `ChatTimer` and
`ImageTimer`, which the routes wrap around each engine stream.

  blip3o:num_requests_running / _waiting      chat + image requests in the engine, by state
  blip3o:kv_cache_usage_perc                  fraction of KV blocks in use (0..1, as vLLM's)
  blip3o:kv_cache_used_blocks                 KV blocks in use (an exact zero check for tests and alerts)
  blip3o:time_to_first_token_seconds          request arrival -> first generated token (chat)
  blip3o:inter_token_latency_seconds          between consecutive tokens of one chat request
  blip3o:e2e_request_latency_seconds          arrival -> last output (chat and images)
  blip3o:request_queue_time_seconds           queued before the first engine step ran it (chat)
  blip3o:image_generation_seconds{stage}      per stage of an image: prefill, dit, decoder, vae
  blip3o:images_generated_total
  blip3o:prompt_tokens_total / generation_tokens_total
  blip3o:request_success_total{finished_reason}   stop | length | abort (a client that went away); requests
                                                  that fail (an error status) are not counted
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from ..async_engine import AsyncEngine
from ..outputs import ImageOutput, RequestOutput

PREFIX = "blip3o:"
# Buckets: vLLM's for token latencies; image stages span milliseconds (tiny, CPU) to minutes (8B, 1024²).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0)


class _EngineStatsCollector:
    """Gauges computed from `AsyncEngine.stats()` when Prometheus scrapes."""

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine = engine
        self.labels = [model_name]

    def collect(self):
        s = self.engine.stats()
        gauges = [("num_requests_running", "Requests in the engine's running stages (chat decoding, images "
                                           "past their queue).", s.chat_running + s.image_running),
                  ("num_requests_waiting", "Requests waiting for a free slot (KV blocks, a decoder slot).",
                   s.chat_waiting + s.image_waiting),
                  ("kv_cache_usage_perc", "Fraction of the KV cache's blocks in use (1 = full).", s.kv_cache_usage),
                  ("kv_cache_used_blocks", "KV cache blocks in use.", s.kv_blocks_used)]
        for name, doc, value in gauges:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric(self.labels, value)
            yield family


class ServerMetrics:
    """The app's registry and the per-request series (module docstring)."""

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.registry.register(_EngineStatsCollector(engine, model_name))
        m, r = ["model_name"], self.registry
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to the first generated token.", m,
                              buckets=TTFT_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between consecutive tokens.", m,
                             buckets=ITL_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Request latency, arrival to last output.", m,
                             buckets=LATENCY_BUCKETS, registry=r).labels(model_name)
        self.queue = Histogram(PREFIX + "request_queue_time_seconds", "Time queued before the first engine step.",
                               m, buckets=LATENCY_BUCKETS, registry=r).labels(model_name)
        self._image_stage = Histogram(PREFIX + "image_generation_seconds", "Seconds per stage of one image.",
                                      ["model_name", "stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter(PREFIX + "images_generated", "Images generated.", m, registry=r).labels(model_name)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens processed.", m,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.", m,
                                         registry=r).labels(model_name)
        self._success = Counter(PREFIX + "request_success", "Finished requests by finish reason.",
                                ["model_name", "finished_reason"], registry=r)

    def image_stage(self, stage: str, seconds: float) -> None:
        self._image_stage.labels(self.model_name, stage).observe(seconds)

    def finished(self, reason: str) -> None:
        self._success.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def track_chat(metrics: ServerMetrics, stream: AsyncIterator[RequestOutput],
                     arrival: float, count_prompt: bool = True) -> AsyncIterator[RequestOutput]:
    """Pass a chat request's outputs through, observing TTFT, ITL, queue time, tokens and the outcome.
    `count_prompt`: False for the 2nd..n-th choice of one request (the prompt was processed once)."""
    last_token_at, done, queue_seen = None, False, False
    try:
        async for out in stream:
            now = time.perf_counter()
            if out.queue_time is not None and not queue_seen:
                queue_seen = True
                metrics.queue.observe(out.queue_time)
            if out.new_token_ids:
                if last_token_at is None:
                    metrics.ttft.observe(now - arrival)
                else:
                    metrics.itl.observe(now - last_token_at)
                last_token_at = now
            if out.finished:
                done = True
                metrics.e2e.observe(now - arrival)
                if count_prompt:
                    metrics.prompt_tokens.inc(out.prompt_tokens)
                metrics.generation_tokens.inc(len(out.token_ids))
                metrics.finished(out.finish_reason or "stop")
            yield out
    except (asyncio.CancelledError, GeneratorExit):  # the consumer went away: the request was aborted
        if not done:
            metrics.finished("abort")
        raise


async def track_image(metrics: ServerMetrics, stream: AsyncIterator[ImageOutput],
                      arrival: float) -> AsyncIterator[ImageOutput]:
    """Pass an image request's outputs through, observing its stages, latency and the outcome."""
    done = False
    try:
        async for out in stream:
            if out.finished and out.result is not None:
                done = True
                metrics.e2e.observe(time.perf_counter() - arrival)
                for stage, seconds in out.result.timings.items():
                    if stage != "total":
                        metrics.image_stage(stage, seconds)
                metrics.images.inc()
                metrics.finished("stop")
            yield out
    except (asyncio.CancelledError, GeneratorExit):
        if not done:
            metrics.finished("abort")
        raise


__all__ = ["ServerMetrics", "track_chat", "track_image"]
