"""Helpers of the GPU tests: stage objects with or without the runtime's CUDA-graph layer."""

from __future__ import annotations

import torch

from blip3o_engine.runtime.cuda_graphs import GraphCache, GraphPool


def graph_cache(name: str, enabled: bool = True, max_graphs: int = 8) -> GraphCache:
    """A graph cache of its own pool on the current CUDA device (enabled False: every key eager)."""
    return GraphCache(name, GraphPool(torch.device("cuda")) if enabled else None, enabled, max_graphs=max_graphs)


class ReplayCounter:
    """Wraps every graph of a cache so that each replay is recorded under its key."""

    def __init__(self, cache: GraphCache) -> None:
        self.calls: list = []
        for key, entry in list(cache._graphs.items()):
            entry.graph = _Counted(entry.graph, key, self.calls)


class _Counted:
    def __init__(self, graph, key, calls: list) -> None:
        self.graph, self.key, self.calls = graph, key, calls

    def replay(self) -> None:
        self.calls.append(self.key)
        self.graph.replay()
