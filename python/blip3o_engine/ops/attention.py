"""Attention backends of the language model: the per-forward metadata its decoder layers attend through.

`models/qwen2_5_vl.py` writes the decoder layer once; what differs between the reference and the engine
is only the object it receives (vLLM's attention-metadata pattern). Each backend is built once per
forward from that forward's positions and cache layout, and offers two calls per layer:

    q, k = attn.rotary(q, k)              # M-RoPE, q [..., Hq, d], k [..., Hkv, d]
    out = attn.attend(layer, q, k, v)     # caches the new K/V, attends -> [..., Hq, d]

- `DenseAttention`: the reference. `[B, L, ...]` batches (left-padded), a contiguous `KVCache` grown by
  concatenation, the causal (+ padding) mask, one SDPA per layer (`llm_ops.gqa_attention_ref`).
- `PagedKernelAttention`: packed `[T, ...]` tokens over the paged KV cache through the per-layer
  `llm_ops` ops (the Triton kernels on CUDA; captured by CUDA graphs for decode).
- `PagedCPUAttention`: the same packed batch on CPU, planned once per step (`llm_cpu.plan_step`) and
  shared by all layers, decode sequences in one batched SDPA.
`paged_attention(...)` picks one of the paged two by where the cache lives and the dispatch mode.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import llm_cpu
from .dispatch import use_kernel
from .llm_ops import (apply_rotary, gqa_attention_ref, mrope_cos_sin_from_freqs, mrope_rotary,
                      paged_decode_attention, paged_prefill_attention, write_kv_cache)

KVCaches = list[tuple[Tensor, Tensor]]  # per layer (k_cache, v_cache) [num_blocks, block_size, Hkv, d]


class KVCache:
    """Plain contiguous K/V cache: per layer one [B, kv_heads, T, head_dim] tensor, grown by
    concatenation. The reference for the paged cache; simple, not fast."""

    def __init__(self, num_layers: int) -> None:
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        """Tokens cached (read between forwards; layer 0 is the first one a forward appends to)."""
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add this step's k, v [B, kv_heads, L, hd] to `layer`; return the whole [B, kv_heads, T, hd]."""
        if self.keys[layer] is not None:
            k = torch.cat((self.keys[layer], k), dim=2)
            v = torch.cat((self.values[layer], v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


def causal_mask(past: int, new: int, attention_mask: Tensor | None, device: torch.device) -> Tensor:
    """Boolean "may attend" mask [B or 1, 1, new, past+new] for `new` queries after `past` cached
    tokens. `attention_mask` [B, past+new] marks valid (non-pad) keys."""
    q_pos = torch.arange(past, past + new, device=device)  # absolute query positions
    k_pos = torch.arange(past + new, device=device)
    allowed = k_pos[None, :] <= q_pos[:, None]  # [new, total]
    if attention_mask is None:
        return allowed[None, None]
    if attention_mask.shape[-1] != past + new:
        raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, "
                         f"expected cached + new = {past + new}")
    allowed = allowed[None] & attention_mask.bool()[:, None, :]  # [B, new, total]
    # A padding query has no valid key at all; letting it see itself keeps its softmax finite
    # (its output is garbage that nobody reads). Valid queries are unaffected: their own key is valid.
    allowed = allowed | (k_pos[None, :] == q_pos[:, None])[None]
    return allowed[:, None]


class DenseAttention:
    """The reference backend: q/k/v `[B, L, heads, d]`, M-RoPE positions `[3, B, L]` (cos/sin computed from
    them directly: no table, no host read, so the dense forward traces and exports), an optional contiguous
    cache (appended in place), an optional key-validity mask `[B, cached + L]` for left-padded batches."""

    def __init__(self, position_ids: Tensor, inv_freq: Tensor, mrope_section: tuple[int, int, int],
                 dtype: torch.dtype, cache: KVCache | None = None, attention_mask: Tensor | None = None) -> None:
        _, _, length = position_ids.shape
        self.cache = cache
        self.cos, self.sin = mrope_cos_sin_from_freqs(position_ids, inv_freq, mrope_section, dtype)  # [B, L, 1, d]
        past = cache.length if cache is not None else 0
        self.mask = causal_mask(past, length, attention_mask, position_ids.device)  # [B or 1, 1, L, past + L]

    def rotary(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return apply_rotary(q, k, self.cos, self.sin)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, L, d]
        if self.cache is not None:
            k, v = self.cache.append(layer, k, v)  # [B, Hkv, T, d]
        return gqa_attention_ref(q, k, v, self.mask).transpose(1, 2)  # [B, L, Hq, d]


class PagedKernelAttention:
    """Packed tokens `[T, ...]` over the paged cache through the per-layer kernels (`llm_ops`'s layout:
    slot_mapping `[T]`, block_tables `[S, max_blocks]`, context_lens `[S]`, cu_seqlens_q `[S + 1]` or None
    for a decode step of one token per sequence). Reads no device value on the host: capturable."""

    def __init__(self, positions: Tensor, cos_sin_cache: Tensor, mrope_section: tuple[int, int, int],
                 kv_caches: KVCaches, slot_mapping: Tensor, block_tables: Tensor, context_lens: Tensor,
                 cu_seqlens_q: Tensor | None, scale: float) -> None:
        self.positions, self.cos_sin_cache, self.mrope_section = positions, cos_sin_cache, mrope_section
        self.kv_caches, self.slot_mapping, self.block_tables = kv_caches, slot_mapping, block_tables
        self.context_lens, self.cu_seqlens_q, self.scale = context_lens, cu_seqlens_q, scale

    def rotary(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return mrope_rotary(q, k, self.positions, self.cos_sin_cache, self.mrope_section)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        k_cache, v_cache = self.kv_caches[layer]
        write_kv_cache(k, v, k_cache, v_cache, self.slot_mapping)
        if self.cu_seqlens_q is None:
            return paged_decode_attention(q, k_cache, v_cache, self.block_tables, self.context_lens, self.scale)
        return paged_prefill_attention(q, k_cache, v_cache, self.block_tables, self.cu_seqlens_q,
                                       self.context_lens, self.scale)


class PagedCPUAttention:
    """The paged batch on CPU: one `llm_cpu.StepPlan` (cos/sin, key slots, masks) shared by every layer."""

    def __init__(self, plan: llm_cpu.StepPlan, kv_caches: KVCaches, scale: float) -> None:
        self.plan, self.kv_caches, self.scale = plan, kv_caches, scale

    def rotary(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return llm_cpu.rotary(q, k, self.plan)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        k_cache, v_cache = self.kv_caches[layer]
        llm_cpu.write_kv(k, v, k_cache, v_cache, self.plan)
        return llm_cpu.attention(q, k_cache, v_cache, self.plan, self.scale)


def paged_attention(positions: Tensor, cos_sin_cache: Tensor, mrope_section: tuple[int, int, int],
                    dtype: torch.dtype, kv_caches: KVCaches, slot_mapping: Tensor, block_tables: Tensor,
                    context_lens: Tensor, cu_seqlens_q: Tensor | None,
                    scale: float) -> PagedKernelAttention | PagedCPUAttention:
    """The paged backend for one step: the kernels when the cache is on CUDA (or kernels are forced), else
    the CPU plan. Arguments as `PagedKernelAttention`; positions `[3, T]`."""
    if use_kernel(kv_caches[0][0]):
        return PagedKernelAttention(positions, cos_sin_cache, mrope_section, kv_caches, slot_mapping,
                                    block_tables, context_lens, cu_seqlens_q, scale)
    plan = llm_cpu.plan_step(positions, cos_sin_cache, mrope_section, dtype, slot_mapping, block_tables,
                             context_lens, cu_seqlens_q, kv_caches[0][0].shape[1])
    return PagedCPUAttention(plan, kv_caches, scale)


__all__ = ["DenseAttention", "KVCache", "KVCaches", "PagedCPUAttention", "PagedKernelAttention", "causal_mask",
           "paged_attention"]
