"""The Qwen2.5-VL language model run over a paged KV cache, on packed (ragged) batches.

Same weights and the same math as `models/qwen2_5_vl.Qwen2_5_VLTextModel`, reorganised for
continuous batching: the S sequences of a step are packed into one `[T, H]` token matrix (no
padding), every layer writes its new K/V into the paged cache (`ops.llm_ops` layout) and attends
over each sequence's block table, and logits are computed only at each sequence's last new token
(the only row a step samples from). The module holds no weights of its own: it reads the text
model's parameters, so it costs no memory and always sees the loaded checkpoint.

Prefill, chunked prefill and recomputation go through `paged_prefill_attention`; a pure decode
step (one new token per sequence) may use `paged_decode_attention`, which CUDA graphs capture.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..models.qwen2_5_vl import Qwen2_5_VLTextModel
from ..ops import llm_ops

KVCaches = list[tuple[Tensor, Tensor]]  # per layer (k_cache, v_cache) [num_blocks, block_size, Hkv, d]


class PagedTextModel:
    """Paged forward over an existing `Qwen2_5_VLTextModel` (see the module docstring)."""

    def __init__(self, text: Qwen2_5_VLTextModel, max_positions: int) -> None:
        self.text = text
        self.cfg = text.cfg
        self.device = text.embed_tokens.weight.device
        self.dtype = text.embed_tokens.weight.dtype
        self.scale = self.cfg.head_dim ** -0.5  # SDPA's default, as the reference attention uses
        # fp32 (cos | sin) per position; M-RoPE positions stay below the model's context length.
        self.cos_sin = llm_ops.rope_cos_sin_cache(self.cfg.head_dim, self.cfg.rope_theta, max_positions, self.device)

    def allocate_kv_caches(self, num_blocks: int, block_size: int) -> KVCaches:
        """Zeroed K/V caches for every layer: `[num_blocks, block_size, Hkv, d]` each, in the model dtype."""
        shape = (num_blocks, block_size, self.cfg.num_key_value_heads, self.cfg.head_dim)
        return [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                 torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in self.text.layers]

    def bytes_per_block(self, block_size: int) -> int:
        """Device bytes one KV block takes over all layers (K and V)."""
        per_token = 2 * self.cfg.num_key_value_heads * self.cfg.head_dim * self.dtype.itemsize
        return per_token * block_size * len(self.text.layers)

    def embed(self, input_ids: Tensor, image_rows: Tensor | None = None, image_feats: Tensor | None = None) -> Tensor:
        """Token embeddings `[T, H]` with ViT features `image_feats` `[N, H]` written at rows `image_rows` `[N]`
        (the `<|image_pad|>` tokens of this step), as `reference.embed_prompt` scatters them."""
        x = self.text.embed(input_ids)  # [T, H]
        if image_rows is not None and image_rows.numel():
            x[image_rows] = image_feats.to(x.dtype)
        return x

    @torch.inference_mode()
    def forward(self, x: Tensor, positions: Tensor, kv_caches: KVCaches, slot_mapping: Tensor,
                block_tables: Tensor, context_lens: Tensor, cu_seqlens_q: Tensor | None,
                last_token_indices: Tensor, hidden_rows: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Run the decoder on packed embeddings and return the logits of each sequence's last new token.

        x `[T, H]` embeddings; positions `[3, T]` M-RoPE positions; slot_mapping `[T]` (-1 = padding);
        block_tables `[S, max_blocks]`; context_lens `[S]` (cached + new); cu_seqlens_q `[S + 1]`, or None
        for a decode step (exactly one new token per sequence, token s of sequence s);
        last_token_indices `[S]`. Returns logits `[S, V]` in the model dtype; with `hidden_rows` `[R]`
        (T2I latent-query rows) also their post-final-norm hidden states `[R, H]`: (logits, hidden).
        """
        residual = x
        h = llm_ops.rms_norm(x, self.text.layers[0].input_layernorm.weight, self.cfg.rms_norm_eps)
        for i, layer in enumerate(self.text.layers):
            if i > 0:  # the previous layer's MLP residual add, fused with this layer's input norm
                h, residual = llm_ops.fused_add_rms_norm(h, residual, layer.input_layernorm.weight,
                                                         self.cfg.rms_norm_eps)
            h = self._attention(layer.self_attn, h, positions, kv_caches[i], slot_mapping, block_tables,
                                context_lens, cu_seqlens_q)
            h, residual = llm_ops.fused_add_rms_norm(h, residual, layer.post_attention_layernorm.weight,
                                                     self.cfg.rms_norm_eps)
            mlp = layer.mlp
            gate_up = torch.cat((mlp.gate_proj(h), mlp.up_proj(h)), dim=-1)  # [T, 2I]
            h = mlp.down_proj(llm_ops.silu_and_mul(gate_up))  # [T, H]
        h = h + residual  # [T, H]
        last = h[last_token_indices]  # [S, H]: only the sampled rows go through norm and head
        logits = self.text.compute_logits(llm_ops.rms_norm(last, self.text.norm.weight, self.cfg.rms_norm_eps))
        if hidden_rows is None:
            return logits  # [S, V]
        hidden = llm_ops.rms_norm(h[hidden_rows], self.text.norm.weight, self.cfg.rms_norm_eps)  # [R, H]
        return logits, hidden

    def _attention(self, attn, x: Tensor, positions: Tensor, kv_cache: tuple[Tensor, Tensor], slot_mapping: Tensor,
                   block_tables: Tensor, context_lens: Tensor, cu_seqlens_q: Tensor | None) -> Tensor:
        t = x.shape[0]
        q = attn.q_proj(x).view(t, attn.num_heads, attn.head_dim)  # [T, Hq, d]
        k = attn.k_proj(x).view(t, attn.num_kv_heads, attn.head_dim)  # [T, Hkv, d]
        v = attn.v_proj(x).view(t, attn.num_kv_heads, attn.head_dim)
        q, k = llm_ops.mrope_rotary(q, k, positions, self.cos_sin, self.cfg.mrope_section)
        k_cache, v_cache = kv_cache
        llm_ops.write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
        if cu_seqlens_q is None:
            out = llm_ops.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, self.scale)
        else:
            out = llm_ops.paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens,
                                                  self.scale)
        return attn.o_proj(out.reshape(t, -1))  # [T, H]


__all__ = ["KVCaches", "PagedTextModel"]
