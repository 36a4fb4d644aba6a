"""The Qwen2.5-VL language model run over a paged KV cache, on packed (ragged) batches.

Same weights and the same math as `models/qwen2_5_vl.Qwen2_5_VLTextModel`, reorganised for
continuous batching: the S sequences of a step are packed into one `[T, H]` token matrix (no
padding), every layer writes its new K/V into the paged cache (`ops.llm_ops` layout) and attends
over each sequence's block table, and logits are computed only at each sequence's last new token
(the only row a step samples from). The module holds no weights of its own: it reads the text
model's parameters, so it costs no memory and always sees the loaded checkpoint.

Two attention paths, chosen per step by where the tensors live:
- kernels (CUDA, or Triton forced on): per-layer `llm_ops` calls, i.e. the Triton kernels. Prefill,
  chunked prefill and recomputation go through `paged_prefill_attention`; a pure decode step (one new
  token per sequence) uses `paged_decode_attention`, which CUDA graphs capture.
- CPU: `ops.llm_cpu`, whose step plan (M-RoPE cos/sin, key slots, masks) is built once per step and
  shared by all layers, with all decode sequences in one batched SDPA.

The q/k/v and gate/up projections run as one GEMM each over fused weights (`weight_fusion`: the
checkpoint modules' weights become views of the fused matrix, so this costs no memory); on CPU the
wide projections (q/k/v, gate/up, a large LM head) are stored in-major, which CPU BLAS streams up to 2x
faster for decode rows (`_in_major`, `fuse_linears`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.qwen2_5_vl import Qwen2_5_VLTextModel
from ..ops import llm_cpu, llm_ops
from ..ops.dit_ops import _use_triton
from .weight_fusion import fuse_linears

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
        # Per layer: [q; k; v] weight [H + 2·Hkv·d, H] and bias, and [gate; up] weight [2I, H].
        layers = list(text.layers)
        qkv = [[l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj] for l in layers]
        gate_up = [[l.mlp.gate_proj, l.mlp.up_proj] for l in layers]
        self.qkv = [fuse_linears(group, self._in_major(group)) for group in qkv]
        self.gate_up = [fuse_linears(group, self._in_major(group))[0] for group in gate_up]
        singles = [l.self_attn.o_proj for l in layers] + [l.mlp.down_proj for l in layers]
        if not self.cfg.tie_word_embeddings:  # a tied head is the embedding table, whose row gathers want rows
            singles.append(text.lm_head)
        for lin in singles:
            if self._in_major([lin]):
                fuse_linears([lin], in_major=True)

    def _in_major(self, group: list[nn.Linear]) -> bool:
        """Whether to store this (fused) projection in-major: on CPU, when it has more outputs than inputs.
        CPU BLAS's one-row GEMV then streams it faster (measured on the dev machine, weights streamed
        from DRAM, 1 thread: [5376, 512] 18 vs 10 GB/s, [768, 512] 13 vs 9.4); for deep, narrow layers
        the row-major dot products win ([512, 2688] 16 vs 10 GB/s); square ones are even."""
        out_features = sum(lin.out_features for lin in group)
        return self.device.type == "cpu" and out_features > group[0].in_features

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
        plan = None
        if not _use_triton(x):
            plan = llm_cpu.plan_step(positions, self.cos_sin, self.cfg.mrope_section, x.dtype, slot_mapping,
                                     block_tables, context_lens, cu_seqlens_q, kv_caches[0][0].shape[1])
        # The CPU path calls the elementwise refs directly: the checked wrappers would dispatch to them
        # anyway, and their per-call validation of the model's own tensors is host time a CPU step feels.
        rms_norm = llm_ops.rms_norm if plan is None else llm_ops.rms_norm_ref
        add_rms_norm = llm_ops.fused_add_rms_norm if plan is None else llm_ops.fused_add_rms_norm_ref
        silu_and_mul = llm_ops.silu_and_mul if plan is None else llm_ops.silu_and_mul_ref
        eps = self.cfg.rms_norm_eps
        residual = x
        h = rms_norm(x, self.text.layers[0].input_layernorm.weight, eps)
        for i, layer in enumerate(self.text.layers):
            if i > 0:  # the previous layer's MLP residual add, fused with this layer's input norm
                h, residual = add_rms_norm(h, residual, layer.input_layernorm.weight, eps)
            q, k, v = self._qkv(i, h)
            k_cache, v_cache = kv_caches[i]
            if plan is not None:
                q, k = llm_cpu.rotary(q, k, plan)
                llm_cpu.write_kv(k, v, k_cache, v_cache, plan)
                out = llm_cpu.attention(q, k_cache, v_cache, plan, self.scale)
            else:
                out = self._kernel_attention(q, k, v, positions, k_cache, v_cache, slot_mapping, block_tables,
                                             context_lens, cu_seqlens_q)
            h = layer.self_attn.o_proj(out.flatten(1))  # [T, H]
            h, residual = add_rms_norm(h, residual, layer.post_attention_layernorm.weight, eps)
            h = layer.mlp.down_proj(silu_and_mul(F.linear(h, self.gate_up[i])))  # [T, 2I] -> [T, H]
        h = h + residual  # [T, H]
        last = h[last_token_indices]  # [S, H]: only the sampled rows go through norm and head
        logits = self.text.compute_logits(rms_norm(last, self.text.norm.weight, eps))
        if hidden_rows is None:
            return logits  # [S, V]
        hidden = rms_norm(h[hidden_rows], self.text.norm.weight, eps)  # [R, H]
        return logits, hidden

    def _qkv(self, layer: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [T, H] -> q [T, Hq, d], k and v [T, Hkv, d] (views into one fused projection)."""
        weight, bias = self.qkv[layer]
        d, hq, hkv = self.cfg.head_dim, self.cfg.num_attention_heads, self.cfg.num_key_value_heads
        qkv = F.linear(x, weight, bias)  # [T, (Hq + 2·Hkv)·d]
        q, k, v = qkv.split((hq * d, hkv * d, hkv * d), dim=-1)
        return q.unflatten(-1, (hq, d)), k.unflatten(-1, (hkv, d)), v.unflatten(-1, (hkv, d))

    def _kernel_attention(self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, k_cache: Tensor, v_cache: Tensor,
                          slot_mapping: Tensor, block_tables: Tensor, context_lens: Tensor,
                          cu_seqlens_q: Tensor | None) -> Tensor:
        """One layer's attention through the per-layer `llm_ops` (Triton) ops: [T, Hq, d]."""
        q, k = llm_ops.mrope_rotary(q, k, positions, self.cos_sin, self.cfg.mrope_section)
        llm_ops.write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
        if cu_seqlens_q is None:
            return llm_ops.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, self.scale)
        return llm_ops.paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens,
                                               self.scale)


__all__ = ["KVCaches", "PagedTextModel"]
