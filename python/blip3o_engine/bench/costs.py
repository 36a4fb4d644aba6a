"""Parameter, FLOP and byte counts of every BLIP3-o stage, derived from `ModelConfig` (docs/model_spec.md §4).

Nothing is hard-coded per model: each function walks the same structure the module in `models/`
builds, so a checkpoint with other widths or depths gets its own counts. What is counted:

- FLOPs = 2 x multiply-accumulates of the matmuls, convolutions and attention products (QK^T and
  AV). Elementwise work (norms, activations, RoPE, softmax) is left out: it is a few percent of the
  FLOPs at most and is memory traffic, not tensor-core work.
- bytes = the weights a call must read at least once (every parameter it touches, biases and norm
  scales included) at `bytes_per_param`, plus the KV cache a decode step reads. Activations are left
  out, so a floor built from these bytes is a true lower bound, not an estimate.

`Cost.floor_s` turns a count into the roofline floor for measured ceilings: the larger of FLOPs /
matmul rate and bytes / copy bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import DiTConfig, TextConfig, UNetConfig, VAEConfig, VisionConfig


@dataclass(frozen=True)
class Cost:
    """Work of one call: `flops` (2 x MACs) and `bytes` that must cross memory at least once."""

    flops: float = 0.0
    bytes: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def __mul__(self, n: float) -> Cost:
        return Cost(self.flops * n, self.bytes * n)

    __rmul__ = __mul__

    def floor_s(self, flops_per_s: float, bytes_per_s: float) -> float:
        """Roofline floor in seconds: no implementation can beat the slower of the two limits."""
        return max(self.flops / flops_per_s, self.bytes / bytes_per_s)

    def bound(self, flops_per_s: float, bytes_per_s: float) -> str:
        """"compute" or "memory": which limit sets `floor_s`."""
        return "compute" if self.flops / flops_per_s >= self.bytes / bytes_per_s else "memory"


@dataclass
class _Tally:
    """Running count of parameters touched and MACs done, filled by walking a module's structure."""

    params: int = 0
    macs: int = 0

    def linear(self, d_in: int, d_out: int, tokens: int, bias: bool = True) -> None:
        self.params += d_in * d_out + (d_out if bias else 0)
        self.macs += tokens * d_in * d_out

    def conv(self, c_in: int, c_out: int, k: int, out_pixels: int) -> None:
        """k x k convolution with bias; `out_pixels` = batch x output height x output width."""
        self.params += c_in * c_out * k * k + c_out
        self.macs += out_pixels * c_in * c_out * k * k

    def norm(self, dim: int, bias: bool = True) -> None:
        self.params += dim * (2 if bias else 1)

    def attention(self, queries: int, keys_per_query: float, width: int) -> None:
        """QK^T and AV: `queries` x `keys_per_query` dot products of length `width` (= heads x head_dim),
        each done twice."""
        self.macs += int(2 * queries * keys_per_query * width)

    def cost(self, bytes_per_param: float) -> Cost:
        return Cost(2.0 * self.macs, float(self.params) * bytes_per_param)


# ------------------------------------------------------------------------------------------------
# Qwen2.5 language model


def llm_layer_params(t: TextConfig) -> int:
    """Parameters of one decoder layer: biased q/k/v (GQA), bias-free o, SwiGLU MLP, two RMSNorms."""
    tally = _Tally()
    _llm_layer(tally, t, tokens=0)
    return tally.params


def _llm_layer(tally: _Tally, t: TextConfig, tokens: int) -> None:
    kv = t.num_key_value_heads * t.head_dim
    tally.linear(t.hidden_size, t.hidden_size, tokens)  # q_proj
    tally.linear(t.hidden_size, kv, tokens)  # k_proj
    tally.linear(t.hidden_size, kv, tokens)  # v_proj
    tally.linear(t.hidden_size, t.hidden_size, tokens, bias=False)  # o_proj
    tally.linear(t.hidden_size, t.intermediate_size, tokens, bias=False)  # gate_proj
    tally.linear(t.hidden_size, t.intermediate_size, tokens, bias=False)  # up_proj
    tally.linear(t.intermediate_size, t.hidden_size, tokens, bias=False)  # down_proj
    tally.norm(t.hidden_size, bias=False)  # input_layernorm
    tally.norm(t.hidden_size, bias=False)  # post_attention_layernorm


def llm_params(t: TextConfig) -> dict[str, int]:
    """Parameter groups: `layers` (decoder layers + final norm), `embed`, `lm_head` (0 when tied)."""
    return {
        "layers": t.num_hidden_layers * llm_layer_params(t) + t.hidden_size,
        "embed": t.vocab_size * t.hidden_size,
        "lm_head": 0 if t.tie_word_embeddings else t.vocab_size * t.hidden_size,
    }


def kv_bytes_per_token(t: TextConfig, bytes_per_el: float = 2) -> float:
    """KV-cache bytes one cached token occupies: K and V, every layer, kv_heads x head_dim each."""
    return 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * bytes_per_el


def llm_prefill(t: TextConfig, tokens: int, batch: int = 1, past: int = 0, logits_tokens: int = 0,
                causal: bool = True, bytes_per_param: float = 2) -> Cost:
    """One forward over `tokens` new tokens per sequence after `past` cached ones.

    logits_tokens: positions per sequence that go through the LM head (0 for the T2I prefill, which
      only needs hidden states; 1 for a chat prefill or a decode step).
    causal: count only the attended (lower-triangle) scores, the work a causal kernel does; False
      counts the full square an unfused masked kernel computes.
    bytes: decoder weights (+ the LM head when used) and the `past` tokens' KV cache, read once.
    """
    tally = _Tally()
    for _ in range(t.num_hidden_layers):
        _llm_layer(tally, t, batch * tokens)
        # Query i (0-based) sees past + i + 1 keys when causal, past + tokens otherwise.
        keys = past + (tokens + 1) / 2 if causal else past + tokens
        tally.attention(batch * tokens, keys, t.num_attention_heads * t.head_dim)
    tally.norm(t.hidden_size, bias=False)  # final norm
    if logits_tokens:
        tally.linear(t.hidden_size, t.vocab_size, batch * logits_tokens, bias=False)
    kv = batch * past * kv_bytes_per_token(t, bytes_per_param)
    return tally.cost(bytes_per_param) + Cost(0.0, kv)


def llm_decode_step(t: TextConfig, batch: int, context: int, bytes_per_param: float = 2) -> Cost:
    """One decode step: one new token per sequence, `context` tokens already cached per sequence."""
    return llm_prefill(t, tokens=1, batch=batch, past=context, logits_tokens=1, bytes_per_param=bytes_per_param)


# ------------------------------------------------------------------------------------------------
# Qwen2.5-VL vision transformer


def _vit_block(tally: _Tally, v: VisionConfig, tokens: int) -> None:
    tally.linear(v.hidden_size, 3 * v.hidden_size, tokens)  # qkv
    tally.linear(v.hidden_size, v.hidden_size, tokens)  # proj
    tally.linear(v.hidden_size, v.intermediate_size, tokens)  # gate_proj
    tally.linear(v.hidden_size, v.intermediate_size, tokens)  # up_proj
    tally.linear(v.intermediate_size, v.hidden_size, tokens)  # down_proj
    tally.norm(v.hidden_size, bias=False)
    tally.norm(v.hidden_size, bias=False)


def _window_sizes(cells: int, side: int) -> list[int]:
    """Cells per window along one axis: full windows of `side`, then the remainder."""
    return [side] * (cells // side) + ([cells % side] if cells % side else [])


def _vit_tally(v: VisionConfig, grids: list[tuple[int, int, int]]) -> _Tally:
    m = v.spatial_merge_size
    side = v.window_size // v.patch_size // m  # merged cells per window side
    patches = sum(t * h * w for t, h, w in grids)
    # Sum over attention segments of (segment length)^2: full layers attend within a frame,
    # window layers within a window of merged cells (m x m patches per cell).
    full_sq = sum(t * (h * w) ** 2 for t, h, w in grids)
    window_sq = 0
    for t, h, w in grids:
        rows = sum(r * r for r in _window_sizes(h // m, side))
        cols = sum(c * c for c in _window_sizes(w // m, side))
        window_sq += t * m**4 * rows * cols
    tally = _Tally()
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size**2
    tally.linear(patch_dim, v.hidden_size, patches, bias=False)  # patch_embed (Conv3d as a matmul)
    for i in range(v.depth):
        _vit_block(tally, v, patches)
        # Segment of length n: n queries x n keys each.
        tally.attention(1, full_sq if i in v.fullatt_block_indexes else window_sq, v.hidden_size)
    tally.norm(v.hidden_size, bias=False)  # merger.ln_q
    tally.linear(v.merged_hidden_size, v.merged_hidden_size, patches // m**2)  # merger.mlp.0
    tally.linear(v.merged_hidden_size, v.out_hidden_size, patches // m**2)  # merger.mlp.2
    return tally


def vit_params(v: VisionConfig) -> int:
    return _vit_tally(v, []).params


def vit(v: VisionConfig, grids: list[tuple[int, int, int]], bytes_per_param: float = 2) -> Cost:
    """Vision tower over images with patch grids `grids` = [(t, h, w)] (h, w in patches, as the image
    processor's image_grid_thw), e.g. [(1, 32, 32)] for 448 x 448."""
    return _vit_tally(v, grids).cost(bytes_per_param)


# ------------------------------------------------------------------------------------------------
# NextDiT


def _dit_tallies(d: DiTConfig, caption_dim: int, batch: int) -> tuple[_Tally, _Tally]:
    """(per-step work, caption-only work). The second depends on the caption alone, so a sampler can
    do it once per image instead of every step: caption_projection, the caption half of the
    conditioning vector, and every block's cross-attention K/V (with their norms)."""
    step, caption = _Tally(), _Tally()
    n = batch * d.num_tokens  # image tokens
    m = batch * d.num_tokens  # caption tokens: n_query = the grid's token count (ModelConfig checks it)
    dim, temb = d.hidden_size, d.time_embed_dim
    caption.linear(caption_dim, dim, m)  # caption_projection.linear_1
    caption.linear(dim, dim, m)  # caption_projection.linear_2
    step.linear(d.patch_size**2 * d.in_channels, dim, n)  # patch_embedder.proj
    step.linear(256, temb, batch)  # timestep_embedder.linear_1 (256 sinusoidal features)
    step.linear(temb, temb, batch)  # timestep_embedder.linear_2
    caption.norm(dim)  # caption_embedder.0 (LayerNorm)
    caption.linear(dim, temb, batch)  # caption_embedder.1
    for _ in range(d.num_layers):
        step.params += d.num_heads  # cross-attention gate
        step.linear(temb, 4 * dim, batch)  # norm1.linear (adaLN modulation)
        step.norm(dim, bias=False)  # norm1.norm
        for _ in range(3):
            step.linear(dim, dim, n, bias=False)  # attn1 q, k, v
        step.norm(dim)  # attn1.norm_q
        step.norm(dim)  # attn1.norm_k
        step.linear(dim, dim, n, bias=False)  # attn2.to_q
        step.norm(dim)  # attn2.norm_q
        caption.norm(dim, bias=False)  # norm1_context (RMSNorm of the caption)
        caption.linear(dim, dim, m, bias=False)  # attn2.to_k
        caption.linear(dim, dim, m, bias=False)  # attn2.to_v
        caption.norm(dim)  # attn2.norm_k
        step.attention(n, d.num_tokens, dim)  # self-attention within each sample
        step.attention(n, d.num_tokens, dim)  # cross-attention to that sample's caption
        step.linear(dim, dim, n, bias=False)  # attn2.to_out.0
        step.linear(dim, d.ffn_hidden_size, n, bias=False)  # feed_forward.linear_1
        step.linear(dim, d.ffn_hidden_size, n, bias=False)  # feed_forward.linear_3
        step.linear(d.ffn_hidden_size, dim, n, bias=False)  # feed_forward.linear_2
        for _ in range(3):
            step.norm(dim, bias=False)  # ffn_norm1, norm2, ffn_norm2
    step.linear(temb, dim, batch)  # norm_out.linear_1
    step.linear(dim, d.patch_size**2 * d.in_channels, n)  # norm_out.linear_2
    return step, caption


def dit_params(d: DiTConfig, caption_dim: int | None = None) -> int:
    step, caption = _dit_tallies(d, caption_dim or d.caption_dim, batch=0)
    return step.params + caption.params


def dit_step(d: DiTConfig, batch: int = 2, hoisted: bool = False, bytes_per_param: float = 2) -> Cost:
    """One DiT forward over `batch` latents (2 = one image under CFG).

    hoisted: the caption-only work (`_dit_tallies`) is done once per image, outside the step; its
    FLOPs and weight bytes then leave the per-step count (see `dit_caption_once`).
    """
    step, caption = _dit_tallies(d, d.caption_dim, batch)
    cost = step.cost(bytes_per_param)
    return cost if hoisted else cost + caption.cost(bytes_per_param)


def dit_caption_once(d: DiTConfig, batch: int = 2, bytes_per_param: float = 2) -> Cost:
    """The caption-only work a hoisting sampler does once per image (see `dit_step(hoisted=True)`)."""
    return _dit_tallies(d, d.caption_dim, batch)[1].cost(bytes_per_param)


# ------------------------------------------------------------------------------------------------
# SDXL-type UNet and VAE decoder


def _resnet(tally: _Tally, c_in: int, c_out: int, temb: int | None, batch: int, pixels: int) -> None:
    """ResnetBlock2D at `pixels` = h x w per sample; temb None for the VAE's resnets."""
    tally.norm(c_in)
    tally.conv(c_in, c_out, 3, batch * pixels)
    if temb is not None:
        tally.linear(temb, c_out, batch)  # time_emb_proj
    tally.norm(c_out)
    tally.conv(c_out, c_out, 3, batch * pixels)
    if c_in != c_out:
        tally.conv(c_in, c_out, 1, batch * pixels)  # conv_shortcut


def _transformer2d(tally: _Tally, c: int, depth: int, cross_dim: int, batch: int, pixels: int,
                   ctx_tokens: int) -> None:
    """Transformer2D: GroupNorm, proj_in, `depth` BasicTransformerBlocks, proj_out (linear projections)."""
    n = batch * pixels
    tally.norm(c)
    tally.linear(c, c, n)  # proj_in
    for _ in range(depth):
        tally.norm(c)  # norm1
        for _ in range(3):
            tally.linear(c, c, n, bias=False)  # attn1 q, k, v
        tally.linear(c, c, n)  # attn1.to_out.0
        tally.attention(n, pixels, c)  # self-attention within each sample
        tally.norm(c)  # norm2
        tally.linear(c, c, n, bias=False)  # attn2.to_q
        tally.linear(cross_dim, c, batch * ctx_tokens, bias=False)  # attn2.to_k
        tally.linear(cross_dim, c, batch * ctx_tokens, bias=False)  # attn2.to_v
        tally.linear(c, c, n)  # attn2.to_out.0
        tally.attention(n, ctx_tokens, c)  # cross-attention
        tally.norm(c)  # norm3
        tally.linear(c, 8 * c, n)  # ff.net.0.proj (GEGLU: value and gate, 4c each)
        tally.linear(4 * c, c, n)  # ff.net.2
    tally.linear(c, c, n)  # proj_out


def _unet_tally(u: UNetConfig, batch: int, height: int, width: int, ctx_tokens: int) -> _Tally:
    """Walk `models.unet.UNet2DConditional` for latents [batch, in_channels, height, width]."""
    tally = _Tally()
    ch, temb, n = u.block_out_channels, u.time_embed_dim, len(u.block_out_channels)
    # Spatial size at each level: stride-2 convs with padding 1 give ceil(size / 2).
    sizes = [(height, width)]
    for _ in range(n - 1):
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    pix = [h * w for h, w in sizes]

    tally.conv(u.in_channels, ch[0], 3, batch * pix[0])  # conv_in
    tally.linear(ch[0], temb, batch)  # time_embedding.linear_1
    tally.linear(temb, temb, batch)  # time_embedding.linear_2
    tally.linear(u.projection_class_embeddings_input_dim, temb, batch)  # add_embedding.linear_1
    tally.linear(temb, temb, batch)  # add_embedding.linear_2
    prev = ch[0]
    for i, kind in enumerate(u.down_block_types):
        for j in range(u.layers_per_block):
            _resnet(tally, prev if j == 0 else ch[i], ch[i], temb, batch, pix[i])
            if kind == "CrossAttnDownBlock2D":
                _transformer2d(tally, ch[i], u.transformer_layers_per_block[i], u.cross_attention_dim,
                               batch, pix[i], ctx_tokens)
        if i < n - 1:
            tally.conv(ch[i], ch[i], 3, batch * pix[i + 1])  # downsampler (stride 2)
        prev = ch[i]

    _resnet(tally, ch[-1], ch[-1], temb, batch, pix[-1])  # mid block
    _transformer2d(tally, ch[-1], u.transformer_layers_per_block[-1], u.cross_attention_dim, batch, pix[-1],
                   ctx_tokens)
    _resnet(tally, ch[-1], ch[-1], temb, batch, pix[-1])

    rev = ch[::-1]
    depth_rev = u.transformer_layers_per_block[::-1]
    for i, kind in enumerate(u.up_block_types):
        level = n - 1 - i
        skip_last = rev[min(i + 1, n - 1)]  # the skip that entered this level from above
        for j in range(u.layers_per_block + 1):
            res_in = prev if j == 0 else rev[i]
            skip = skip_last if j == u.layers_per_block else rev[i]
            _resnet(tally, res_in + skip, rev[i], temb, batch, pix[level])
            if kind == "CrossAttnUpBlock2D":
                _transformer2d(tally, rev[i], depth_rev[i], u.cross_attention_dim, batch, pix[level], ctx_tokens)
        if i < n - 1:
            tally.conv(rev[i], rev[i], 3, batch * pix[level - 1])  # upsampler: nearest x2, then conv
        prev = rev[i]
    tally.norm(ch[0])  # conv_norm_out
    tally.conv(ch[0], u.out_channels, 3, batch * pix[0])  # conv_out
    return tally


def unet_params(u: UNetConfig) -> int:
    return _unet_tally(u, 0, u.sample_size, u.sample_size, 0).params


def unet_step(u: UNetConfig, batch: int = 2, height: int | None = None, width: int | None = None,
              ctx_tokens: int = 64, bytes_per_param: float = 2) -> Cost:
    """One UNet forward over `batch` latents (2 = one image under CFG) of `height` x `width` latent
    cells (default: the config's sample_size), cross-attending to `ctx_tokens` conditioning tokens."""
    height = height or u.sample_size
    width = width or height
    return _unet_tally(u, batch, height, width, ctx_tokens).cost(bytes_per_param)


def _vae_tally(v: VAEConfig, batch: int, height: int, width: int) -> _Tally:
    """Walk `models.vae.VAEDecoder` for latents [batch, latent_channels, height, width]."""
    tally = _Tally()
    rev = v.block_out_channels[::-1]
    pixels = height * width
    tally.conv(v.latent_channels, v.latent_channels, 1, batch * pixels)  # post_quant_conv
    tally.conv(v.latent_channels, rev[0], 3, batch * pixels)  # decoder.conv_in
    _resnet(tally, rev[0], rev[0], None, batch, pixels)  # mid block
    tally.norm(rev[0])  # mid attention: GroupNorm, single-head self-attention with biased projections
    for _ in range(4):
        tally.linear(rev[0], rev[0], batch * pixels)
    tally.attention(batch * pixels, pixels, rev[0])
    _resnet(tally, rev[0], rev[0], None, batch, pixels)
    for i, c in enumerate(rev):
        for j in range(v.layers_per_block + 1):
            _resnet(tally, rev[max(i - 1, 0)] if j == 0 else c, c, None, batch, pixels)
        if i < len(rev) - 1:
            pixels *= 4
            tally.conv(c, c, 3, batch * pixels)  # upsampler: nearest x2, then conv
    tally.norm(v.block_out_channels[0])  # conv_norm_out
    tally.conv(v.block_out_channels[0], v.out_channels, 3, batch * pixels)  # conv_out
    return tally


def vae_decoder_params(v: VAEConfig) -> int:
    """Parameters of the decoder half (post_quant_conv + decoder), the part T2I runs."""
    return _vae_tally(v, 0, 1, 1).params


def vae_decode(v: VAEConfig, batch: int = 1, height: int = 128, width: int | None = None,
               bytes_per_param: float = 2) -> Cost:
    """Decode latents [batch, latent_channels, height, width] to pixels (x `scale_factor` per side)."""
    return _vae_tally(v, batch, height, width or height).cost(bytes_per_param)


def self_attention(tokens: int, width: int, batch: int = 1, bytes_per_param: float = 2) -> Cost:
    """A UNet `attn1` module: bias-free q/k/v, biased output projection and attention over `tokens`
    tokens per sample (heads do not change the count: heads x head_dim = width)."""
    tally = _Tally()
    for _ in range(3):
        tally.linear(width, width, batch * tokens, bias=False)
    tally.linear(width, width, batch * tokens)
    tally.attention(batch * tokens, tokens, width)
    return tally.cost(bytes_per_param)


def rmsnorm(tokens: int, hidden: int, bytes_per_el: float = 2) -> Cost:
    """An RMSNorm over [tokens, hidden]: no matmul work; read the input, write the output, read the
    weight. The one stage here whose bytes are activations, since it has (almost) no weights."""
    return Cost(0.0, (2 * tokens * hidden + hidden) * bytes_per_el)


def image_grid(pixels_h: int, pixels_w: int, v: VisionConfig) -> tuple[int, int, int]:
    """Patch grid (t, h, w) of a still image already resized to a multiple of patch x merge pixels."""
    unit = v.patch_size * v.spatial_merge_size
    if pixels_h % unit or pixels_w % unit:
        raise ValueError(f"image sides must be multiples of {unit} pixels, got {pixels_h}x{pixels_w}")
    return 1, pixels_h // v.patch_size, pixels_w // v.patch_size


__all__ = [
    "Cost", "llm_layer_params", "llm_params", "kv_bytes_per_token", "llm_prefill", "llm_decode_step",
    "vit_params", "vit", "image_grid", "dit_params", "dit_step", "dit_caption_once", "unet_params",
    "unet_step", "vae_decoder_params", "vae_decode", "self_attention", "rmsnorm",
]
