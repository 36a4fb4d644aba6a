"""Qwen2.5-VL in PyTorch: the language model, its 3-D (M-RoPE) positions, and the native-resolution vision
transformer (docs/model_spec.md §2). One forward per model, used by the reference backend and by the engine alike.

The language model's decoder layer is written once, over an attention backend it is handed
(`ops.attention`): `DenseAttention` (the reference: `[B, L]` batches, a contiguous cache, masked SDPA) or
the engine's paged backends (packed `[T]` tokens over the paged KV cache, Triton kernels on CUDA, a
per-step plan on CPU). Every norm, activation and rotary formula it applies is an op of `ops` (the torch
twin in the reference, the kernel in the engine, chosen by `ops.dispatch`); the numerics are those of
transformers' `modeling_qwen2_5_vl.py`: RMSNorm variance in fp32, RoPE angles in fp32 (text cos/sin cast
to the model dtype and applied there; vision RoPE applied in fp32), attention by SDPA.

The engine may fuse a layer's q/k/v and gate/up projections into one matrix each (`fuse_projections`: the
modules' weights become rows of it, no extra memory); the layer then runs one GEMM where the reference
runs three or two, the only difference between the two backends' layer (under `ops.reference_ops()` the
layer takes the separate projections even when fused weights exist, so a reference sharing the weights
stays the oracle).

Parameter names equal the checkpoint keys minus their prefix ("model." for the text model, "visual." for
the vision tower), so the loader maps keys 1:1. Nothing else is registered: RoPE angles are recomputed
from the config (cheap), which keeps the modules buffer-free and constructible on the meta device.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..config import TextConfig, VisionConfig
from ..errors import InputError
from ..ops.attention import DenseAttention, KVCache
from ..ops.dispatch import reference_mode
from ..ops.llm_ops import rope_cos_sin_cache, rotate_half
from .fusion import fuse_linears, is_live

# The vision tower's RoPE base is not in config.json; Qwen2.5-VL hard-codes it.
VISION_ROPE_THETA = 10000.0

# Whether a (fused) projection should be stored in-major; the engine decides per device (see
# `Qwen2_5_VLTextModel.fuse_projections`).
InMajorPolicy = Callable[[Sequence[nn.Linear]], bool]


# ------------------------------------------------------------------------------------------------
# Pieces shared by both towers


class RMSNorm(nn.Module):
    """RMSNorm as Qwen2.5-VL does it (`ops.rms_norm`): normalize in fp32, cast back, *then* multiply by the
    weight (so in bf16 the weight product is rounded once more, like the original)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); the text MLP has no biases, the vision MLP has them. With fused
    gate/up weights (`fuse`), one GEMM computes both halves."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.gate_up: tuple[torch.Tensor, torch.Tensor | None] | None = None  # fused ([2I, H], bias)

    def fuse(self, in_major: InMajorPolicy) -> None:
        group = [self.gate_proj, self.up_proj]
        self.gate_up = fuse_linears(group, in_major(group))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None and is_live(self.gate_up[0], self.gate_proj) and not reference_mode():
            return self.down_proj(ops.silu_and_mul(F.linear(x, *self.gate_up)))  # [..., 2I] -> [..., I]
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))


def rope_inv_freq(dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """[dim/2] fp32 inverse frequencies theta^(-2i/dim), computed exactly as transformers does."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


# ------------------------------------------------------------------------------------------------
# Language model


class TextAttention(nn.Module):
    """Causal GQA self-attention with biased q/k/v projections and M-RoPE, over an attention backend."""

    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        kv_dim = self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=True)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None  # fused ([Hq·d + 2·Hkv·d, H], bias)

    def fuse(self, in_major: InMajorPolicy) -> None:
        group = [self.q_proj, self.k_proj, self.v_proj]
        self.qkv = fuse_linears(group, in_major(group))

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [..., H] -> q [..., Hq, d], k and v [..., Hkv, d]."""
        if self.qkv is None or not is_live(self.qkv[0], self.q_proj) or reference_mode():
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            kv = self.num_kv_heads * self.head_dim
            q, k, v = F.linear(x, *self.qkv).split((self.num_heads * self.head_dim, kv, kv), dim=-1)
        d = self.head_dim
        return q.unflatten(-1, (-1, d)), k.unflatten(-1, (-1, d)), v.unflatten(-1, (-1, d))

    def forward(self, x: torch.Tensor, attn) -> torch.Tensor:
        q, k, v = self.project_qkv(x)
        q, k = attn.rotary(q, k)
        out = attn.attend(self.layer_idx, q, k, v)  # [..., Hq, d]
        return self.o_proj(out.flatten(-2))


class DecoderLayer(nn.Module):
    """Pre-norm transformer block, x + attn(norm(x)) then x + mlp(norm(x)), with the residual stream carried
    beside the layer output so that each residual add is fused with the norm after it (vLLM's layout;
    IEEE addition is commutative, so the sums are exactly the reference's)."""

    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = TextAttention(cfg, layer_idx)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, attn) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's output (the embeddings for layer 0, with residual None); residual: the
        stream before it. Returns (this layer's output, the stream before it)."""
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        if residual is None:
            h, residual = norm1(x), x
        else:
            h, residual = ops.fused_add_rms_norm(x, residual, norm1.weight, norm1.eps)
        h = self.self_attn(h, attn)
        h, residual = ops.fused_add_rms_norm(h, residual, norm2.weight, norm2.eps)
        return self.mlp(h), residual


class Qwen2_5_VLTextModel(nn.Module):
    """The Qwen2.5-VL language model (decoder + final norm + LM head).

    Keys: checkpoint keys without "model."; `lm_head.weight` exists only when the embeddings are
    untied (the 4B checkpoint ties them, the 8B does not).
    """

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def new_cache(self) -> KVCache:
        """An empty KV cache with one slot per layer."""
        return KVCache(len(self.layers))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings: [...] -> [..., H]."""
        return self.embed_tokens(input_ids)

    def rope_table(self, num_positions: int) -> torch.Tensor:
        """fp32 `[num_positions, head_dim]` (cos | sin) rows for positions 0..num_positions-1, for the paged
        engine's kernels (built once by its runner; the dense forward computes its angles directly)."""
        device = self.embed_tokens.weight.device
        return rope_cos_sin_cache(self.cfg.head_dim, self.cfg.rope_theta, num_positions, device)

    def fuse_projections(self, in_major: InMajorPolicy = lambda group: False) -> None:
        """Fuse every layer's q/k/v and gate/up into one matrix each (no extra memory), and store the
        projections `in_major` picks transposed (`fusion.fuse_linears`); a tied LM head stays (it is the
        embedding table, whose row gathers want rows). Idempotent."""
        for layer in self.layers:
            layer.self_attn.fuse(in_major)
            layer.mlp.fuse(in_major)
        singles = [l.self_attn.o_proj for l in self.layers] + [l.mlp.down_proj for l in self.layers]
        if not self.cfg.tie_word_embeddings:
            singles.append(self.lm_head)
        for lin in singles:
            if in_major([lin]):
                fuse_linears([lin], in_major=True)

    def run_layers(self, x: torch.Tensor, attn) -> torch.Tensor:
        """The decoder over embeddings `x` [..., H] (any token layout the backend `attn` understands):
        the residual stream after the last layer, *before* the final norm, [..., H]."""
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, attn)
        return x + residual

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the decoder on `inputs_embeds` [B, L, H] and return hidden states [B, L, H] *after*
        the final RMSNorm (what BLIP3-o feeds the DiT and what `compute_logits` expects).

        position_ids: [3, B, L] M-RoPE (t, h, w) positions of the new tokens (text: three equal rows;
          see `get_mrope_positions` and its rope_delta for decode steps).
        cache: appended in place with this call's keys/values; attention covers cached + new tokens,
          causally.
        attention_mask: [B, cached + new] bool, True where the key is a real token (left-padded
          batches). Outputs at padding positions are meaningless.
        """
        B, L, _ = inputs_embeds.shape
        if position_ids.shape != (3, B, L):
            raise ValueError(f"position_ids must be [3, {B}, {L}], got {list(position_ids.shape)}")
        inv_freq = rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, inputs_embeds.device)  # [d/2]
        attn = DenseAttention(position_ids, inv_freq, self.cfg.mrope_section, inputs_embeds.dtype, cache,
                              attention_mask)
        return self.norm(self.run_layers(inputs_embeds, attn))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head: [..., H] -> [..., vocab], in the model dtype like transformers (upcast before
        sampling if you need fp32). Tied models reuse the embedding matrix."""
        weight = self.embed_tokens.weight if self.cfg.tie_word_embeddings else self.lm_head.weight
        return F.linear(hidden, weight)


# ------------------------------------------------------------------------------------------------
# 3-D positions of a multimodal prompt


def get_mrope_positions(input_ids: list[int], image_grid_thw: list[tuple[int, int, int]], image_token_id: int,
                        spatial_merge_size: int) -> tuple[torch.Tensor, int]:
    """M-RoPE positions [3, L] of one prompt, and its rope_delta.

    Text tokens count up by one on all three axes. Each maximal run of `image_token_id` tokens is one
    image (taking the grids of `image_grid_thw`, in patches, in order) and must hold exactly
    t*h*w/merge² tokens; its tokens get (t, h, w) positions over the merged grid, all offset by the
    position the image starts at. The text after an image resumes at start + max(h, w)/merge (as
    transformers 5.x does; for t = 1, which every still image has, that is max position + 1).

    Decode token k (0-based, after the L prompt tokens) has position L + k + rope_delta on all axes,
    with rope_delta = max_position + 1 - L (<= 0; 0 for text-only prompts).
    """
    m = spatial_merge_size
    chunks: list[torch.Tensor] = []  # [3, n] per run
    pos = 0
    n_images = 0
    for is_image, run in itertools.groupby(input_ids, key=lambda tok: tok == image_token_id):
        n = len(list(run))
        if not is_image:
            chunks.append(torch.arange(pos, pos + n).expand(3, n))
            pos += n
            continue
        if n_images == len(image_grid_thw):
            raise InputError(f"prompt has more image-token runs than the {len(image_grid_thw)} images given")
        t, h, w = (int(v) for v in image_grid_thw[n_images])
        if h % m or w % m or t * h * w // (m * m) != n:
            raise InputError(f"image {n_images}: {n} image tokens do not match grid (t={t}, h={h}, w={w}) "
                             f"with merge {m} (expected {t * h * w // (m * m)})")
        n_images += 1
        gh, gw = h // m, w // m
        grid = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        chunks.append(torch.stack(grid).reshape(3, -1) + pos)  # [3, t*gh*gw]
        pos += max(gh, gw)
    if n_images != len(image_grid_thw):
        raise InputError(f"{len(image_grid_thw)} images given but the prompt has {n_images} image-token runs")
    if not chunks:
        return torch.zeros(3, 0, dtype=torch.long), 0
    positions = torch.cat(chunks, dim=1)  # [3, L]
    return positions, int(positions.max()) + 1 - len(input_ids)


# ------------------------------------------------------------------------------------------------
# Vision transformer


def vision_position_ids(grids: list[tuple[int, int, int]], merge: int) -> torch.Tensor:
    """(row, col) patch coordinates [N, 2] in the order the image processor emits patches: merge×merge
    blocks row-major, patches row-major inside a block, frames one after another."""
    out = []
    for t, h, w in grids:
        rows = torch.arange(h)[:, None].expand(h, w)
        cols = torch.arange(w)[None, :].expand(h, w)
        # [h, w] -> [h/m, m, w/m, m] -> [h/m, w/m, m, m]: block-major order
        rows = rows.reshape(h // merge, merge, w // merge, merge).transpose(1, 2).flatten()
        cols = cols.reshape(h // merge, merge, w // merge, merge).transpose(1, 2).flatten()
        out.append(torch.stack((rows, cols), dim=-1).repeat(t, 1))
    return torch.cat(out)


def vision_rope_cos_sin(position_ids: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin [N, head_dim] of the vision tower's 2-D RoPE for (row, col) ids [N, 2].

    A quarter of the head's frequencies each for row and column, laid out [row | col | row | col]
    so that rotate-half pairs dim i with dim i + head_dim/2 at the same angle.
    """
    inv_freq = rope_inv_freq(head_dim // 2, VISION_ROPE_THETA, position_ids.device)  # [hd/4]
    freqs = (position_ids[..., None].float() * inv_freq).flatten(1)  # [N, 2 * hd/4]: row then col
    emb = torch.cat((freqs, freqs), dim=-1)  # [N, hd]
    return emb.cos(), emb.sin()


def vision_windows(grids: list[tuple[int, int, int]], cfg: VisionConfig) -> tuple[torch.Tensor, list[int]]:
    """Window attention layout over merged cells (merge×merge patch groups).

    Each frame's merged grid is tiled by windows of `window_size // patch_size // merge` cells a
    side (edge windows are partial). Returns `window_index` [N / merge²]: the merged cells in window
    order (windows row-major, cells row-major inside a window), and the windows' lengths in patches.
    """
    m = cfg.spatial_merge_size
    side = cfg.window_size // cfg.patch_size // m  # cells per window side
    order, seqlens, offset = [], [], 0
    for t, h, w in grids:
        gh, gw = h // m, w // m
        windows_w = -(-gw // side)
        rows = torch.arange(gh)[:, None] // side
        cols = torch.arange(gw)[None, :] // side
        window_id = (rows * windows_w + cols).flatten()  # [gh*gw], window of each cell (row-major)
        # A stable sort by window keeps cells row-major inside each window.
        frame_order = torch.sort(window_id, stable=True).indices
        counts = torch.bincount(window_id)  # every window holds at least one cell
        for frame in range(t):
            order.append(frame_order + offset + frame * gh * gw)
            seqlens.extend((counts * m * m).tolist())
        offset += t * gh * gw
    return torch.cat(order), seqlens


def apply_vision_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [N, heads, hd] in fp32 (as the original does) and cast back."""
    x32 = x.float()
    return (x32 * cos[:, None] + rotate_half(x32) * sin[:, None]).to(x.dtype)


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention confined to segments (windows, or whole frames)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        N = x.shape[0]
        q, k, v = self.qkv(x).view(N, 3, self.num_heads, self.head_dim).unbind(1)  # each [N, heads, hd]
        q, k = apply_vision_rope(q, cos, sin), apply_vision_rope(k, cos, sin)
        outs = []
        # One attention call per segment: tokens never see another window / frame / image.
        for qs, ks, vs in zip(q.split(seqlens), k.split(seqlens), v.split(seqlens)):
            qs, ks, vs = (t.transpose(0, 1)[None] for t in (qs, ks, vs))  # [1, heads, n, hd]
            outs.append(F.scaled_dot_product_attention(qs, ks, vs)[0].transpose(0, 1))  # [n, heads, hd]
        return self.proj(torch.cat(outs).reshape(N, -1))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = VisionAttention(cfg)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, seqlens)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Conv3d patchifier; the kernel equals the stride, so it is one matmul per patch row."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel rows are (C, T, P, P)-flattened, the same order as the flattened conv kernel
        weight = self.proj.weight.flatten(1)  # [hidden, C*T*P*P]
        return F.linear(pixel_values.to(weight.dtype), weight)  # [N, hidden]


class PatchMerger(nn.Module):
    """RMSNorm each patch, concatenate the merge×merge patches of a cell, then Linear-GELU-Linear."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.ln_q = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        width = cfg.merged_hidden_size
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, cfg.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cells = self.ln_q(x).view(-1, self.mlp[0].in_features)  # [N/m², m²*hidden]
        return self.mlp(cells)


class Qwen2_5_VisionTransformer(nn.Module):
    """The Qwen2.5-VL vision tower. Keys: checkpoint keys without "visual."."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Encode a batch of images packed along dim 0.

        pixel_values: [N_patches, C*T*P*P] as the Qwen2-VL image processor emits them (patches of
          each image in merge-block order, images one after another).
        grid_thw: [n_images, 3] grid of each image in patches.
        Returns [N_patches / merge², out_hidden_size]: one embedding per `<|image_pad|>` token, in
        the processor's order.
        """
        cfg = self.cfg
        unit = cfg.spatial_merge_size ** 2
        grids = [(int(t), int(h), int(w)) for t, h, w in grid_thw.tolist()]
        frame_seqlens = [h * w for t, h, w in grids for _ in range(t)]  # full-attention segments
        window_index, window_seqlens = vision_windows(grids, cfg)
        window_index = window_index.to(pixel_values.device)

        def to_window_order(x: torch.Tensor) -> torch.Tensor:
            # move whole merged cells (unit consecutive patches) so cells stay intact
            return x.view(-1, unit, x.shape[-1])[window_index].view(-1, x.shape[-1])

        x = to_window_order(self.patch_embed(pixel_values))  # [N, hidden]
        positions = vision_position_ids(grids, cfg.spatial_merge_size).to(pixel_values.device)
        cos, sin = (to_window_order(t) for t in vision_rope_cos_sin(positions, cfg.head_dim))  # [N, hd]
        for i, block in enumerate(self.blocks):
            seqlens = frame_seqlens if i in cfg.fullatt_block_indexes else window_seqlens
            x = block(x, cos, sin, seqlens)
        merged = self.merger(x)  # [N/m², out], window order
        return merged[torch.argsort(window_index)]  # back to the processor's order


__all__ = [
    "Qwen2_5_VLTextModel", "Qwen2_5_VisionTransformer", "KVCache", "get_mrope_positions", "RMSNorm",
    "VISION_ROPE_THETA",
]
