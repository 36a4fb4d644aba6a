"""The engine's configuration tree: what a user chooses about running a model (not the model itself,
which is `config.ModelConfig`).

    EngineConfig(cache=CacheConfig(...), scheduler=SchedulerConfig(...), compile=CompileConfig(...))

Frozen dataclasses, validated at construction (a bad value raises ConfigError naming the field). Values
derived at start-up (the KV pool's size after the memory plan, the effective max_model_len) are not
stored here but in `runtime.memory.MemoryPlan`, reported by `Engine.memory_plan()`. `compute_hash()`
keys every graph and compile cache (and export manifests), so artifacts built under one configuration are
never reused under another.

Every field is reachable from `Engine.from_pretrained(..., config=EngineConfig(...))` and from the CLI
(`blip3o-engine generate|chat|serve --help`, flag names = field names with dashes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

POLICIES = ("interleave", "static", "serial")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive_int_or_none(name: str, value: Any) -> None:
    _require(value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1),
             f"{name} must be an int >= 1 or None, got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
             f"{name} must be an int >= 1, got {value!r}")


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache of the language model.

    num_blocks: an explicit pool size, which skips the memory plan's sizing (it must still fit).
    kv_cache_memory_gb: the pool's budget in GiB. None = planned: on CUDA, what is left of
      `gpu_memory_utilization` of the device after the weights, every stage's profiled working set and the
      graph pool; on CPU, min(two full contexts, 4 GiB, half of the memory available after the weights and
      the stages' working sets).
    gpu_memory_utilization: the share of the device's memory the process may use in all (CUDA).
    enable_prefix_caching: reuse the KV of equal prompt prefixes (chat turns, shared system prompts).
    """

    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_memory_gb: float | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        _positive_int("cache.block_size", self.block_size)
        _positive_int_or_none("cache.num_blocks", self.num_blocks)
        _require(self.kv_cache_memory_gb is None or (isinstance(self.kv_cache_memory_gb, (int, float))
                                                     and 0 < self.kv_cache_memory_gb < float("inf")),
                 f"cache.kv_cache_memory_gb must be a positive number or None, got {self.kv_cache_memory_gb!r}")
        _require(isinstance(self.gpu_memory_utilization, (int, float)) and 0.0 < self.gpu_memory_utilization <= 1.0,
                 f"cache.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")


@dataclass(frozen=True)
class SchedulerConfig:
    """What one engine step may do.

    max_num_seqs / max_num_batched_tokens: chat + T2I-prefill sequences and tokens per LLM step.
    long_prefill_chunk: at most this many tokens of one prompt per step (None: the token budget).
    max_model_len: the longest request (prompt + max_tokens) accepted; None = the model's context, capped
      by what the KV pool holds. Longer requests get an InputError at submission.
    max_image_batch: images denoised together in the decoder (its continuous batch); further image
      requests wait. The memory plan reserves the decoder's working set at this batch.
    dit_steps_per_iteration: DiT Euler steps one engine step runs for the oldest DiT batch (None = the
      whole loop on CUDA, where it is one short graph; 3 on CPU, where a step of the `small` preset's DiT
      costs about a third of a decoder step, so chat never waits longer than about one decoder step).
    policy: "interleave" (every step: LLM work, then ONE unit of image work in turn — a DiT chunk, ONE
      decoder step over every image in the decoder, or a piece of one image's VAE — so chat waits at most
      one unit). Two run-to-completion baselines for `bench mixed`: "serial" (the behaviour before the step
      loop: one image request at a time runs to its end inside one step while chat and other images wait,
      as a server locking around `generate_image` did) and "static" (static batching: every image
      prefilled so far runs to its end as one batch, then chat resumes).
    """

    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    long_prefill_chunk: int | None = None
    max_model_len: int | None = None
    max_image_batch: int = 4
    dit_steps_per_iteration: int | None = None
    policy: str = "interleave"

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_image_batch"):
            _positive_int(f"scheduler.{name}", getattr(self, name))
        for name in ("long_prefill_chunk", "max_model_len", "dit_steps_per_iteration"):
            _positive_int_or_none(f"scheduler.{name}", getattr(self, name))
        _require(self.policy in POLICIES, f"scheduler.policy must be one of {POLICIES}, got {self.policy!r}")


@dataclass(frozen=True)
class CompileConfig:
    """Graphs and compilation (all no-ops on CPU except compile_decoder).

    compile_decoder: torch.compile (inductor) the UNet step and the VAE; None = on for CUDA, off for CPU
      (where inductor needs minutes on a 2-core machine before the first image).
    cuda_graphs: the master switch; llm_graphs / dit_graphs / decoder_graphs switch each runner.
    max_graphs: graphs kept per runner (least recently used evicted).
    max_unrolled_dit_steps: a DiT graph unrolls at most this many Euler steps; longer schedules replay it
      over windows of the step tables.
    """

    compile_decoder: bool | None = None
    cuda_graphs: bool = True
    llm_graphs: bool = True
    dit_graphs: bool = True
    decoder_graphs: bool = True
    max_graphs: int = 8
    max_unrolled_dit_steps: int = 32

    def __post_init__(self) -> None:
        _positive_int("compile.max_graphs", self.max_graphs)
        _positive_int("compile.max_unrolled_dit_steps", self.max_unrolled_dit_steps)

    def graphs_for(self, runner: str) -> bool:
        """Whether `runner` ("llm" | "dit" | "decoder") may capture CUDA graphs."""
        return self.cuda_graphs and getattr(self, f"{runner}_graphs")


@dataclass(frozen=True)
class EngineConfig:
    """The whole tree; `EngineConfig()` is every default."""

    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)

    def __post_init__(self) -> None:
        for name, cls in (("cache", CacheConfig), ("scheduler", SchedulerConfig), ("compile", CompileConfig)):
            _require(isinstance(getattr(self, name), cls), f"EngineConfig.{name} must be a {cls.__name__}")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def compute_hash(self) -> str:
        """A stable 16-hex-digit hash of every field (graph/compile cache keys, export manifests)."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def with_overrides(self, **overrides: Any) -> EngineConfig:
        """A copy with `section_field=value` overrides, e.g. `with_overrides(cache_block_size=32)`, or
        plain field names when they are unique across sections (`block_size=32`). Unknown names raise."""
        sections = {"cache": {}, "scheduler": {}, "compile": {}}
        for key, value in overrides.items():
            section, name = _locate(key)
            sections[section][name] = value
        return EngineConfig(**{s: dataclasses.replace(getattr(self, s), **v) for s, v in sections.items()})


def _locate(key: str) -> tuple[str, str]:
    """The (section, field) an override key names."""
    fields = {s: {f.name for f in dataclasses.fields(cls)}
              for s, cls in (("cache", CacheConfig), ("scheduler", SchedulerConfig), ("compile", CompileConfig))}
    for section, names in fields.items():
        prefix = f"{section}_"
        if key.startswith(prefix) and key[len(prefix):] in names:
            return section, key[len(prefix):]
    hits = [s for s, names in fields.items() if key in names]
    if len(hits) == 1:
        return hits[0], key
    raise ConfigError(f"unknown engine option {key!r}" if not hits else f"ambiguous engine option {key!r}: "
                      f"prefix it with one of {hits}")


def option_fields() -> list[tuple[str, str, dataclasses.Field]]:
    """(section, field name, dataclass field) of every option, in declaration order (the CLI's flags)."""
    return [(s, f.name, f) for s, cls in (("cache", CacheConfig), ("scheduler", SchedulerConfig),
                                          ("compile", CompileConfig)) for f in dataclasses.fields(cls)]


__all__ = ["CacheConfig", "CompileConfig", "EngineConfig", "POLICIES", "SchedulerConfig", "option_fields"]
