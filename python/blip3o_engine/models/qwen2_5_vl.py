"""Reference Qwen2.5-VL in plain PyTorch: the language model, its 3-D (M-RoPE) positions, and the
native-resolution vision transformer (spec §2).

This is the *reference* the optimized kernels are checked against, so it favours clarity over speed
and reproduces the numerics of transformers' `modeling_qwen2_5_vl.py`: RMSNorm variance in fp32,
RoPE angles in fp32 (text cos/sin then cast to the model dtype and applied there; vision RoPE
applied in fp32), attention softmax by `scaled_dot_product_attention`.

Parameter names equal the checkpoint keys minus their prefix ("model." for the text model,
"visual." for the vision tower), so the loader maps keys 1:1. Nothing else is registered: RoPE
tables are recomputed from the config in every forward (cheap next to the matmuls), which keeps the
modules buffer-free and constructible on the meta device.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig, VisionConfig
from ..errors import InputError

# The vision tower's RoPE base is not in config.json; Qwen2.5-VL hard-codes it.
VISION_ROPE_THETA = 10000.0


# ------------------------------------------------------------------------------------------------
# Pieces shared by both towers


class RMSNorm(nn.Module):
    """RMSNorm as Qwen2.5-VL does it: normalize in fp32, cast back, *then* multiply by the weight
    (so in bf16 the weight product is rounded once more, like the original)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); the text MLP has no biases, the vision MLP has them."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dim (the "rotate-half" RoPE layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_inv_freq(dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """[dim/2] fp32 inverse frequencies theta^(-2i/dim), computed exactly as transformers does."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


# ------------------------------------------------------------------------------------------------
# Language model


def mrope_cos_sin(position_ids: torch.Tensor, cfg: TextConfig,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, L, head_dim] (in `dtype`) for 3-D positions `position_ids` [3, B, L].

    The head_dim/2 frequency pairs are cut into consecutive chunks of `mrope_section` =
    (temporal, height, width) sizes; chunk a takes its angles from position row a. This is the
    chunked layout transformers uses for qwen2_5_vl (not Qwen3-VL's interleaved one). For text,
    the three rows are equal and this is ordinary 1-D RoPE.
    """
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, position_ids.device)  # [hd/2]
    freqs = position_ids[..., None].float() * inv_freq  # [3, B, L, hd/2], fp32 angles
    chunks, start = [], 0
    for axis, size in enumerate(cfg.mrope_section):
        chunks.append(freqs[axis, ..., start:start + size])
        start += size
    freqs = torch.cat(chunks, dim=-1)  # [B, L, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, L, hd]: both halves share the angle of a pair
    return emb.cos().to(dtype), emb.sin().to(dtype)


class KVCache:
    """Plain contiguous K/V cache: per layer one [B, kv_heads, T, head_dim] tensor, grown by
    concatenation. The reference for the paged cache; simple, not fast."""

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        """Tokens cached (read between forwards; layer 0 is the first one a forward appends to)."""
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add this step's k, v [B, kv_heads, L, hd] to `layer`; return the whole [B, kv_heads, T, hd]."""
        if self.keys[layer] is not None:
            k = torch.cat((self.keys[layer], k), dim=2)
            v = torch.cat((self.values[layer], v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


def causal_mask(past: int, new: int, attention_mask: torch.Tensor | None,
                device: torch.device) -> torch.Tensor:
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


class TextAttention(nn.Module):
    """Causal GQA self-attention with biased q/k/v projections and M-RoPE."""

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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache: KVCache | None) -> torch.Tensor:
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # [B, nh, L, hd]
        k = self.k_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, nkv, L, hd]
        v = self.v_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, L, hd], broadcast over heads
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.append(self.layer_idx, k, v)  # [B, nkv, T, hd]
        # GQA: query head h reads kv head h // group, so repeat each kv head `group` times in place.
        group = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(group, dim=1)  # [B, nh, T, hd]
        v = v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, nh, L, hd]
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = TextAttention(cfg, layer_idx)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache: KVCache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


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
        """Token embeddings: [B, L] -> [B, L, H]."""
        return self.embed_tokens(input_ids)

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
        past = cache.length if cache is not None else 0
        mask = causal_mask(past, L, attention_mask, inputs_embeds.device)
        cos, sin = mrope_cos_sin(position_ids, self.cfg, inputs_embeds.dtype)  # [B, L, hd]
        x = inputs_embeds
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        return self.norm(x)

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
    "Qwen2_5_VLTextModel", "Qwen2_5_VisionTransformer", "KVCache", "get_mrope_positions", "mrope_cos_sin",
    "RMSNorm", "VISION_ROPE_THETA",
]
