"""Runs one scheduled AR step on the device: KV cache, static input buffers, CUDA-graph decode.

The runner owns the paged KV cache and everything with a fixed address on the device:
- the KV pool is allocated once. On CPU its size is the configured number of blocks; on CUDA, when
  none is configured, it is what fits in `gpu_memory_fraction` of the device after a profiling
  forward of the largest step (`max_num_batched_tokens` tokens) has shown the activations' peak.
  The sizes chosen at start-up are derived values, kept in `KVCacheLayout`, not in the frozen config.
- per-step metadata (block tables, slot mapping, 3-D positions, cu_seqlens, context lengths) comes
  from the C++ `BatchBuilder` as int32 numpy views and is copied into static device buffers (through
  pinned staging on CUDA, asynchronously: the host never waits for the device inside a step).
- decode steps (one new token per sequence) on CUDA replay a CUDA graph captured per batch-size
  bucket (1, 2, 4, 8, ... up to max_num_seqs; largest first, all in one memory pool): a batch of S
  sequences pads to the smallest bucket >= S with rows that write nothing (slot -1) and read nothing
  (context length 0). Prefill steps, CPU, and batches larger than the largest bucket run eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError
from ..models.qwen2_5_vl import Qwen2_5_VLTextModel
from ..native import BatchBuilder
from .paged_model import PagedTextModel


@dataclass(frozen=True)
class RunnerConfig:
    """What the user chooses about the AR runner (validated here; derived sizes live in KVCacheLayout)."""

    block_size: int = 16
    num_blocks: int | None = None  # None: CPU -> two max-length sequences' worth; CUDA -> profiled
    gpu_memory_fraction: float = 0.9  # share of the device's memory the process may use in all
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    cuda_graphs: bool = True  # decode through captured graphs on CUDA

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ConfigError(f"block_size ({self.block_size}), max_num_seqs ({self.max_num_seqs}) and "
                              f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= 1")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ConfigError(f"num_blocks must be >= 1 or None, got {self.num_blocks}")
        if not 0.0 < self.gpu_memory_fraction <= 1.0:
            raise ConfigError(f"gpu_memory_fraction must be in (0, 1], got {self.gpu_memory_fraction}")


@dataclass
class KVCacheLayout:
    """Sizes derived at start-up from RunnerConfig, the model and (on CUDA) the free memory."""

    num_blocks: int
    block_size: int
    max_blocks_per_seq: int  # enough for the model's whole context
    bytes_per_block: int
    graph_batch_sizes: list[int] = field(default_factory=list)  # captured decode buckets, ascending


@dataclass
class StepInputs:
    """One step's sequences, in scheduled order (plain host data from the LLM engine)."""

    input_ids: list[int]  # the packed new tokens of all sequences [T]
    block_ids: list[list[int]]  # per sequence, its block table
    num_computed_tokens: list[int]
    num_new_tokens: list[int]
    prompt_positions: list[np.ndarray | None]  # per sequence [3, P] int64 M-RoPE positions, None = text only
    mrope_deltas: list[int]
    is_decode: bool  # one new output token per sequence (never an image token)
    # Rows of input_ids whose embedding is replaced: ViT features at image tokens, and the latent
    # queries of T2I requests (whose placeholder ids are never looked up).
    image_rows: list[int] = field(default_factory=list)
    image_feats: Tensor | None = None  # [len(image_rows), H] on the device
    hidden_rows: list[int] = field(default_factory=list)  # rows whose final-normed hidden states to return


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """Decode buckets 1, 2, 4, 8, 16, 32, ... below max_num_seqs, plus max_num_seqs itself."""
    sizes, b = [], 1
    while b < max_num_seqs:
        sizes.append(b)
        b *= 2
    return sizes + [max_num_seqs]


class ModelRunner:
    """The device side of the AR engine (module docstring)."""

    def __init__(self, text: Qwen2_5_VLTextModel, cfg: RunnerConfig) -> None:
        self.cfg = cfg
        self.model = PagedTextModel(text, max_positions=text.cfg.max_position_embeddings + 1)
        self.device = self.model.device
        self.max_model_len = text.cfg.max_position_embeddings
        self.max_tokens = max(cfg.max_num_batched_tokens, cfg.max_num_seqs)
        max_blocks = -(-self.max_model_len // cfg.block_size)
        self.builder = BatchBuilder(cfg.block_size, cfg.max_num_seqs, self.max_tokens, max_blocks)
        self._alloc_buffers(max_blocks)
        num_blocks = cfg.num_blocks or (self._profile_num_blocks() if self.device.type == "cuda" else 2 * max_blocks)
        self.layout = KVCacheLayout(num_blocks, cfg.block_size, max_blocks, self.model.bytes_per_block(cfg.block_size))
        self.kv_caches = self.model.allocate_kv_caches(num_blocks, cfg.block_size)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        if self.device.type == "cuda" and cfg.cuda_graphs:
            self._capture_decode_graphs()

    # ------------------------------------------------------------------------------ set-up

    def _alloc_buffers(self, max_blocks: int) -> None:
        """Static device buffers (fixed addresses for the graphs) and pinned host staging for them."""
        n, s, dev = self.max_tokens, self.cfg.max_num_seqs, self.device
        i32 = torch.int32
        self.buf = {
            "input_ids": torch.zeros(n, dtype=torch.int64, device=dev),
            "positions": torch.zeros(3, n, dtype=i32, device=dev),
            "slot_mapping": torch.full((n,), -1, dtype=i32, device=dev),
            "block_tables": torch.full((s, max_blocks), -1, dtype=i32, device=dev),
            "cu_seqlens_q": torch.zeros(s + 1, dtype=i32, device=dev),
            "context_lens": torch.zeros(s, dtype=i32, device=dev),
            "last_token_indices": torch.zeros(s, dtype=torch.int64, device=dev),
        }
        pin = dev.type == "cuda"
        self.staging = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=pin) for k, v in self.buf.items()}

    @torch.inference_mode()
    def _profile_num_blocks(self) -> int:
        """KV blocks that fit in gpu_memory_fraction of the device once the largest step's activations
        (measured by one forward of max_num_batched_tokens tokens over a scratch cache) are accounted for."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        t = self.cfg.max_num_batched_tokens
        scratch = self.model.allocate_kv_caches(-(-t // self.cfg.block_size), self.cfg.block_size)
        x = self.model.embed(torch.zeros(t, dtype=torch.int64, device=self.device))
        positions = torch.arange(t, dtype=torch.int32, device=self.device) % self.max_model_len  # [T]
        positions = positions.expand(3, t).contiguous()  # [3, T]
        slots = torch.arange(t, dtype=torch.int32, device=self.device)
        table = torch.arange(scratch[0][0].shape[0], dtype=torch.int32, device=self.device)[None]
        cu = torch.tensor([0, t], dtype=torch.int32, device=self.device)
        lens = torch.tensor([t], dtype=torch.int32, device=self.device)
        self.model.forward(x, positions, scratch, slots, table, lens, cu, lens.long() - 1)
        torch.cuda.synchronize(self.device)
        activation_peak = torch.cuda.max_memory_allocated(self.device) - torch.cuda.memory_allocated(self.device)
        del scratch, x
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        budget = total * self.cfg.gpu_memory_fraction - (total - free) - activation_peak
        num_blocks = int(budget // self.model.bytes_per_block(self.cfg.block_size))
        if num_blocks < 1:
            raise ConfigError(f"no memory left for the KV cache at gpu_memory_fraction={self.cfg.gpu_memory_fraction} "
                              f"(activations of a {t}-token step peak at {activation_peak / 2**30:.2f} GiB)")
        return num_blocks

    @torch.inference_mode()
    def _capture_decode_graphs(self) -> None:
        """One graph per decode bucket, largest first so that smaller ones reuse its pool memory."""
        pool = None
        sizes = graph_batch_sizes(self.cfg.max_num_seqs)
        # A decode row's last token is the row itself. A constant of its own: eager steps overwrite
        # buf['last_token_indices'] with their own rows.
        self._decode_rows = torch.arange(self.cfg.max_num_seqs, device=self.device)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up (Triton compilation, allocator) off the capture
            for bs in sizes:
                self._decode_forward(bs)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        for bs in reversed(sizes):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._decode_forward(bs)
            pool = graph.pool()
            self._graphs[bs] = (graph, logits)
        self.layout.graph_batch_sizes = sizes

    def _decode_forward(self, bs: int) -> Tensor:
        """Decode over the first bs rows of the static buffers -> logits [bs, V]."""
        b = self.buf
        x = self.model.embed(b["input_ids"][:bs])
        return self.model.forward(x, b["positions"][:, :bs], self.kv_caches, b["slot_mapping"][:bs],
                                  b["block_tables"][:bs], b["context_lens"][:bs], None, self._decode_rows[:bs])

    # ------------------------------------------------------------------------------ per step

    def execute(self, step: StepInputs) -> tuple[Tensor, Tensor | None]:
        """Run one step: logits `[S, V]` of each sequence's last new token, in the step's order, and the
        post-final-norm hidden states `[len(hidden_rows), H]` of `step.hidden_rows` (None without any)."""
        if step.hidden_rows and step.is_decode:
            raise ValueError("hidden_rows are prefill rows (T2I queries); a decode step has none")
        self.builder.build(step.block_ids, step.num_computed_tokens, step.num_new_tokens, step.prompt_positions,
                           step.mrope_deltas)
        s, t = self.builder.num_seqs, self.builder.num_tokens
        bucket = self._bucket(s) if step.is_decode else None
        rows, tokens = (bucket, bucket) if bucket is not None else (s, t)
        self._copy_inputs(step.input_ids, s, t, rows, tokens)
        if bucket is not None:
            graph, logits = self._graphs[bucket]
            graph.replay()
            return logits[:s], None
        b = self.buf
        x = self.model.embed(b["input_ids"][:t], self._rows(step.image_rows), step.image_feats)
        cu = None if step.is_decode else b["cu_seqlens_q"][:s + 1]
        hidden_rows = self._rows(step.hidden_rows)
        out = self.model.forward(x, b["positions"][:, :t], self.kv_caches, b["slot_mapping"][:t],
                                 b["block_tables"][:s], b["context_lens"][:s], cu, b["last_token_indices"][:s],
                                 hidden_rows)
        return out if hidden_rows is not None else (out, None)

    def _bucket(self, s: int) -> int | None:
        return next((bs for bs in sorted(self._graphs) if bs >= s), None)

    def _rows(self, rows: list[int]) -> Tensor | None:
        if not rows:
            return None
        return torch.tensor(rows, dtype=torch.int64).to(self.device, non_blocking=True)

    def _copy_inputs(self, input_ids: list[int], s: int, t: int, rows: int, tokens: int) -> None:
        """Builder arrays -> staging -> static device buffers. Graph padding rows (s..rows, t..tokens)
        get slot -1 and context 0, so they neither write nor read the cache."""
        bd, st = self.builder, self.staging
        host = {k: v.numpy() for k, v in st.items()}  # numpy views of the staging tensors
        host["input_ids"][:t] = input_ids
        host["positions"][:, :t] = bd.positions
        host["slot_mapping"][:t] = bd.slot_mapping
        host["block_tables"][:s] = bd.block_tables
        host["cu_seqlens_q"][:s + 1] = bd.cu_seqlens_q
        host["context_lens"][:s] = bd.context_lens
        host["last_token_indices"][:s] = bd.last_token_indices
        if tokens > t:
            st["input_ids"][t:tokens] = 0
            st["positions"][:, t:tokens] = 0
            st["slot_mapping"][t:tokens] = -1
        if rows > s:
            st["block_tables"][s:rows] = -1
            st["context_lens"][s:rows] = 0
        nb = self.device.type == "cuda"
        for name, width in (("input_ids", tokens), ("slot_mapping", tokens), ("context_lens", rows)):
            self.buf[name][:width].copy_(st[name][:width], non_blocking=nb)
        self.buf["positions"][:, :tokens].copy_(st["positions"][:, :tokens], non_blocking=nb)
        self.buf["block_tables"][:rows].copy_(st["block_tables"][:rows], non_blocking=nb)
        self.buf["cu_seqlens_q"][:s + 1].copy_(st["cu_seqlens_q"][:s + 1], non_blocking=nb)
        self.buf["last_token_indices"][:s].copy_(st["last_token_indices"][:s], non_blocking=nb)


__all__ = ["KVCacheLayout", "ModelRunner", "RunnerConfig", "StepInputs", "graph_batch_sizes"]
