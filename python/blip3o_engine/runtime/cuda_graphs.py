"""The one CUDA-graph layer of the runtime: batch buckets, capture, a bounded cache, eager fallback.

The LLM runner (decode steps), the DiT sampler (the Euler loop, in chunks) and the pixel decoder (one UNet
step) all replay captured graphs through a `GraphCache` each, with the same rules:

- Batch buckets: a batch of n rows runs the graph of the smallest bucket >= n (`batch_buckets`: 1, 2, 4,
  ... up to the configured maximum, which is a bucket itself); the caller pads rows n..bucket with inputs
  that are computed and discarded.
- Capture: warm-up runs first on a side stream (lazy initialisation — cuBLAS workspaces, Triton and
  inductor compiles, SDPA backend choice — must not happen inside a capture, as the PyTorch docs require),
  then the capture on that same stream into ONE memory pool shared by every graph of the engine. Sharing
  is safe because the step loop is single-threaded and every graph's output is consumed or copied before
  the next replay of any graph (each runner's docstring says how). A runner that knows its buckets up
  front captures them largest first (`capture_all`), so the smaller ones fit in memory the largest freed.
- Bounded: at most `max_graphs` graphs per cache, least recently used evicted first.
- Eager fallback: a key that is not capturable (graphs off, CPU, a capture that raised) runs eagerly,
  with the reason logged once per key (`GraphCache.eager_reasons` keeps them for `Engine.stats()`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger("blip3o_engine.graphs")


def batch_buckets(max_batch: int) -> list[int]:
    """Buckets 1, 2, 4, 8, ... below max_batch, plus max_batch itself (ascending)."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


def bucket_for(n: int, buckets: list[int]) -> int | None:
    """The smallest bucket >= n, or None when n is past the largest."""
    return next((b for b in buckets if b >= n), None)


@dataclass(eq=False)
class CapturedGraph:
    """One captured graph and what its capture returned (tensors in the pool, overwritten by each replay)."""

    graph: Any  # torch.cuda.CUDAGraph
    output: Any

    def replay(self) -> Any:
        self.graph.replay()
        return self.output


class GraphPool:
    """The engine-wide memory pool and capture stream every `GraphCache` shares (module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.handle = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device)


class GraphCache:
    """A family of graphs of one runner, keyed by shape (module docstring).

    enabled False (CPU, or graphs switched off) makes every key eager, without a capture attempt.
    """

    def __init__(self, name: str, pool: GraphPool | None, enabled: bool, max_graphs: int = 8,
                 warmup_runs: int = 2, on_evict: Callable[[Hashable], None] | None = None) -> None:
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.name = name
        self.pool = pool
        self.enabled = enabled and pool is not None
        self.max_graphs = max_graphs
        self.warmup_runs = warmup_runs
        self.on_evict = on_evict  # the owner frees what it kept for an evicted key (static buffers)
        self._graphs: OrderedDict[Hashable, CapturedGraph] = OrderedDict()
        self.eager_reasons: dict[Hashable, str] = {}
        self.num_captures = 0  # for stats and tests: a bounded cache may capture a key again after eviction

    def __len__(self) -> int:
        return len(self._graphs)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._graphs

    def get(self, key: Hashable, run: Callable[[], Any]) -> CapturedGraph | None:
        """The graph for `key`, captured from `run` (a closure over static buffers) on first use; None when
        the key runs eagerly (the caller then calls `run()` itself)."""
        if not self.enabled:
            return None
        if key in self._graphs:
            self._graphs.move_to_end(key)
            return self._graphs[key]
        if key in self.eager_reasons:
            return None
        try:
            entry = self._capture(run)
        except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager, with its reason
            self.eager(key, f"capture failed: {type(e).__name__}: {e}")
            return None
        self._graphs[key] = entry
        if len(self._graphs) > self.max_graphs:
            evicted, _ = self._graphs.popitem(last=False)
            log.info("%s: evicted the CUDA graph of %s (cache of %d)", self.name, evicted, self.max_graphs)
            if self.on_evict is not None:
                self.on_evict(evicted)
        return entry

    def capture_all(self, keys: list[Hashable], run_for: Callable[[Hashable], Callable[[], Any]]) -> None:
        """Capture `keys` now, in the given order (callers pass them largest first)."""
        for key in keys:
            self.get(key, run_for(key))

    def eager(self, key: Hashable, reason: str) -> None:
        """Mark `key` eager for good, logging why once."""
        if key not in self.eager_reasons:
            self.eager_reasons[key] = reason
            log.warning("%s: %s runs eagerly: %s", self.name, key, reason)

    def _capture(self, run: Callable[[], Any]) -> CapturedGraph:
        pool, device = self.pool, self.pool.device
        current = torch.cuda.current_stream(device)
        pool.stream.wait_stream(current)
        with torch.cuda.stream(pool.stream):
            for _ in range(self.warmup_runs):
                run()
        current.wait_stream(pool.stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool.handle, stream=pool.stream):
            output = run()
        self.num_captures += 1
        return CapturedGraph(graph, output)


__all__ = ["CapturedGraph", "GraphCache", "GraphPool", "batch_buckets", "bucket_for"]
