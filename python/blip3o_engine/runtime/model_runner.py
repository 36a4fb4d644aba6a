"""Runs one scheduled AR step on the device: the paged KV cache, static input buffers, CUDA-graph decode.

The runner owns everything of the language model with a fixed address on the device:
- the KV pool, allocated once at the size the memory plan chose (`runtime/memory.py`);
- static input buffers. Per-step metadata (block tables, slot mapping, 3-D positions, cu_seqlens, context
  lengths) comes from the C++ `BatchBuilder` as int32 numpy views, is written into pinned host staging and
  copied asynchronously to the device: the host never waits for the device inside a step. There are two
  staging sets, used in turn, each with a CUDA event recorded after the copies that read it; a set is
  rewritten only after its event completed (a non-blocking copy is a promise, not a copy: without this,
  step N+2's metadata could overwrite step N's staging while its copy is still queued — prefill-only steps
  never synchronise, so nothing else would order them);
- decode steps (one new token per sequence) on CUDA replay a CUDA graph per batch-size bucket
  (`cuda_graphs`: buckets 1, 2, 4, ... max_num_seqs, captured largest first at start-up into the engine's
  shared pool): a batch of S sequences pads to the smallest bucket >= S with rows that write nothing
  (slot -1) and read nothing (context length 0). Graph outputs (the logits) are consumed by sampling in
  the same step, before any other graph replays. Prefill steps, CPU, and graphs switched off run eagerly.

The model math is the text model's own (`Qwen2_5_VLTextModel.run_layers`), over the paged attention backend
of `ops.attention`; the runner only prepares its inputs, fuses the projections once, and reads the rows it
needs (each sequence's last token for sampling, the T2I query rows for the DiT).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from ..engine_config import EngineConfig
from ..models.qwen2_5_vl import Qwen2_5_VLTextModel
from ..native import BatchBuilder
from ..ops.attention import KVCaches, PagedKernelAttention, paged_attention
from .cuda_graphs import GraphCache, GraphPool, batch_buckets, bucket_for


@dataclass
class StepInputs:
    """One step's sequences, in scheduled order (plain host data from the AR stage)."""

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


def inference_mode() -> contextlib.AbstractContextManager:
    """torch.inference_mode(), or nothing when it is already on: the step loop enters it once per step, and
    entering it again in every nested call is host time a decode step of a small model feels."""
    return contextlib.nullcontext() if torch.is_inference_mode_enabled() else torch.inference_mode()


def cpu_in_major(group: Sequence[nn.Linear]) -> bool:
    """On CPU, store a (fused) projection in-major when it has more outputs than inputs: CPU BLAS's one-row
    GEMV then streams it faster (measured on the dev machine, weights streamed from DRAM, 1 thread:
    [5376, 512] 18 vs 10 GB/s, [768, 512] 13 vs 9.4); for deep, narrow layers the row-major dot products win
    ([512, 2688] 16 vs 10 GB/s); square ones are even."""
    return group[0].weight.device.type == "cpu" and sum(lin.out_features for lin in group) > group[0].in_features


class ModelRunner:
    """The device side of the AR stage (module docstring)."""

    def __init__(self, text: Qwen2_5_VLTextModel, config: EngineConfig, num_blocks: int, max_model_len: int,
                 graph_pool: GraphPool | None = None) -> None:
        self.text = text
        self.cfg = text.cfg
        self.config = config
        self.device = text.embed_tokens.weight.device
        self.dtype = text.embed_tokens.weight.dtype
        self.block_size = config.cache.block_size
        self.max_num_seqs = config.scheduler.max_num_seqs
        self.max_model_len = max_model_len
        self.num_blocks = num_blocks
        text.fuse_projections(cpu_in_major)
        self.scale = self.cfg.head_dim ** -0.5  # SDPA's default, as the reference attention uses
        self.cos_sin = text.rope_table(self.cfg.max_position_embeddings + 1)  # fp32 [P, d]
        self.max_tokens = max(config.scheduler.max_num_batched_tokens, self.max_num_seqs)
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        self.builder = BatchBuilder(self.block_size, self.max_num_seqs, self.max_tokens, self.max_blocks_per_seq)
        self._alloc_buffers()
        self.kv_caches = self.allocate_kv_caches(num_blocks)
        on_cuda = self.device.type == "cuda"
        self.graphs = GraphCache(f"llm decode [{config.compute_hash()}]", graph_pool,
                                 on_cuda and config.compile.graphs_for("llm"),
                                 max_graphs=len(batch_buckets(self.max_num_seqs)))
        self.buckets = batch_buckets(self.max_num_seqs) if self.graphs.enabled else []
        # A decode row's last token is the row itself: a constant, since eager steps overwrite
        # buf['last_token_indices'] with their own rows.
        self._decode_rows = torch.arange(self.max_num_seqs, device=self.device)
        if self.graphs.enabled:
            with torch.inference_mode():
                self.graphs.capture_all(sorted(self.buckets, reverse=True), self._decode_run)

    # ------------------------------------------------------------------------------ set-up

    def allocate_kv_caches(self, num_blocks: int) -> KVCaches:
        """Zeroed K/V caches for every layer: `[num_blocks, block_size, Hkv, d]` each, in the model dtype."""
        shape = (num_blocks, self.block_size, self.cfg.num_key_value_heads, self.cfg.head_dim)
        return [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                 torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in self.text.layers]

    def _alloc_buffers(self) -> None:
        """Static device buffers (fixed addresses for the graphs) and two pinned host staging sets."""
        n, s, dev = self.max_tokens, self.max_num_seqs, self.device
        i32 = torch.int32
        self.buf = {
            "input_ids": torch.zeros(n, dtype=torch.int64, device=dev),
            "positions": torch.zeros(3, n, dtype=i32, device=dev),
            "slot_mapping": torch.full((n,), -1, dtype=i32, device=dev),
            "block_tables": torch.full((s, self.max_blocks_per_seq), -1, dtype=i32, device=dev),
            "cu_seqlens_q": torch.zeros(s + 1, dtype=i32, device=dev),
            "context_lens": torch.zeros(s, dtype=i32, device=dev),
            "last_token_indices": torch.zeros(s, dtype=torch.int64, device=dev),
        }
        on_cuda = dev.type == "cuda"
        sets = 2 if on_cuda else 1
        self._staging = [{k: torch.empty(v.shape, dtype=v.dtype, pin_memory=on_cuda) for k, v in self.buf.items()}
                         for _ in range(sets)]
        self._staging_done = [torch.cuda.Event() for _ in range(sets)] if on_cuda else None
        self._step_count = 0

    # ------------------------------------------------------------------------------ per step

    def execute(self, step: StepInputs) -> tuple[Tensor, Tensor | None]:
        """Run one step: logits `[S, V]` of each sequence's last new token, in the step's order, and the
        post-final-norm hidden states `[len(hidden_rows), H]` of `step.hidden_rows` (None without any)."""
        with inference_mode():
            return self._execute(step)

    def _execute(self, step: StepInputs) -> tuple[Tensor, Tensor | None]:
        if step.hidden_rows and step.is_decode:
            raise ValueError("hidden_rows are prefill rows (T2I queries); a decode step has none")
        self.builder.build(step.block_ids, step.num_computed_tokens, step.num_new_tokens, step.prompt_positions,
                           step.mrope_deltas)
        s, t = self.builder.num_seqs, self.builder.num_tokens
        bucket = bucket_for(s, self.buckets) if step.is_decode else None
        rows, tokens = (bucket, bucket) if bucket is not None else (s, t)
        self._copy_inputs(step.input_ids, s, t, rows, tokens)
        if bucket is not None:
            graph = self.graphs.get(bucket, self._decode_run(bucket))
            logits = graph.replay() if graph is not None else self._decode_run(bucket)()
            return logits[:s], None
        b = self.buf
        x = self._embed(b["input_ids"][:t], self._rows(step.image_rows), step.image_feats)  # [T, H]
        attn = paged_attention(b["positions"][:, :t], self.cos_sin, self.cfg.mrope_section, self.dtype,
                               self.kv_caches, b["slot_mapping"][:t], b["block_tables"][:s], b["context_lens"][:s],
                               None if step.is_decode else b["cu_seqlens_q"][:s + 1], self.scale)
        h = self.text.run_layers(x, attn)  # [T, H], before the final norm
        logits = self._logits(h[b["last_token_indices"][:s]])  # [S, V]
        hidden_rows = self._rows(step.hidden_rows)
        hidden = self.text.norm(h[hidden_rows]) if hidden_rows is not None else None  # [R, H]
        return logits, hidden

    def _logits(self, last: Tensor) -> Tensor:
        """Only the sampled rows go through the final norm and the head: [S, H] -> [S, V]."""
        return self.text.compute_logits(self.text.norm(last))

    def _embed(self, input_ids: Tensor, image_rows: Tensor | None, image_feats: Tensor | None) -> Tensor:
        """Token embeddings `[T, H]` with `image_feats` `[N, H]` (ViT features, latent queries) written at
        `image_rows` `[N]`, as the reference scatters them."""
        x = self.text.embed(input_ids)
        if image_rows is not None and image_rows.numel():
            x[image_rows] = image_feats.to(x.dtype)
        return x

    def _decode_run(self, bs: int):
        """A closure running a decode step over the first bs rows of the static buffers -> logits [bs, V]:
        what the graph of bucket bs captures (everything it reads is a static buffer)."""
        def run() -> Tensor:
            b = self.buf
            attn = PagedKernelAttention(b["positions"][:, :bs], self.cos_sin, self.cfg.mrope_section,
                                        self.kv_caches, b["slot_mapping"][:bs], b["block_tables"][:bs],
                                        b["context_lens"][:bs], None, self.scale)
            h = self.text.run_layers(self.text.embed(b["input_ids"][:bs]), attn)
            return self._logits(h[self._decode_rows[:bs]])
        return run

    def _rows(self, rows: list[int]) -> Tensor | None:
        if not rows:
            return None
        return torch.tensor(rows, dtype=torch.int64).to(self.device, non_blocking=True)

    def _copy_inputs(self, input_ids: list[int], s: int, t: int, rows: int, tokens: int) -> None:
        """Builder arrays -> staging -> static device buffers (module docstring on the two staging sets).
        Graph padding rows (s..rows, t..tokens) get slot -1 and context 0: they neither write nor read."""
        which = self._step_count % len(self._staging)
        self._step_count += 1
        if self._staging_done is not None:
            self._staging_done[which].synchronize()  # the copies that last read this set have completed
        st, bd = self._staging[which], self.builder
        host = {k: v.numpy() for k, v in st.items()}  # numpy views of the staging tensors
        host["input_ids"][:t] = input_ids
        host["positions"][:, :t] = bd.positions
        host["slot_mapping"][:t] = bd.slot_mapping
        host["block_tables"][:s] = bd.block_tables
        host["cu_seqlens_q"][:s + 1] = bd.cu_seqlens_q
        host["context_lens"][:s] = bd.context_lens
        host["last_token_indices"][:s] = bd.last_token_indices
        if tokens > t:
            host["input_ids"][t:tokens] = 0
            host["positions"][:, t:tokens] = 0
            host["slot_mapping"][t:tokens] = -1
        if rows > s:
            host["block_tables"][s:rows] = -1
            host["context_lens"][s:rows] = 0
        nb = self.device.type == "cuda"
        for name, width in (("input_ids", tokens), ("slot_mapping", tokens), ("context_lens", rows),
                            ("block_tables", rows), ("cu_seqlens_q", s + 1), ("last_token_indices", s)):
            self.buf[name][:width].copy_(st[name][:width], non_blocking=nb)
        self.buf["positions"][:, :tokens].copy_(st["positions"][:, :tokens], non_blocking=nb)
        if self._staging_done is not None:
            self._staging_done[which].record()


__all__ = ["ModelRunner", "StepInputs", "cpu_in_major"]
