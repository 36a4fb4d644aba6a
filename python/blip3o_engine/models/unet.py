"""SDXL-type conditional UNet of the stage-2 pixel decoder (docs/model_spec.md §1.6), plain PyTorch.

This is the reference the optimized decoder is checked against, and the module the engine fuses,
captures and exports (the GPU machine has no diffusers). It reproduces diffusers'
`UNet2DConditionModel` for the configurations `UNetConfig` allows (SDXL layout, `text_time`
micro-conditioning, linear transformer projections), with the same state_dict keys, so a
diffusers checkpoint loads with `load_state_dict(strict=True)`.

Numerics follow diffusers: sinusoidal embeddings in fp32 then cast to the activation dtype,
GroupNorm eps `norm_eps` in the resnets and 1e-6 in front of the transformers, LayerNorm eps 1e-5,
attention through SDPA (what diffusers' default AttnProcessor2_0 runs; `upcast_attention` has no
effect there either).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import UNetConfig
from ..errors import ConfigError

# diffusers' Transformer2DModel hard-codes this GroupNorm eps, whatever the UNet's norm_eps.
TRANSFORMER_GROUPNORM_EPS = 1e-6
# diffusers' BasicTransformerBlock default LayerNorm eps.
LAYERNORM_EPS = 1e-5

# Per-head key and value of one cross-attention layer, [B, heads, M, Dh] each (`Attention.project_kv`).
KV = tuple[Tensor, Tensor]


def timestep_embedding(t: Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, fp32, as diffusers'
    `get_timestep_embedding` computes it (same op order, so bitwise equal).

    t: [N] any dtype -> [N, dim] fp32.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))  # [half]
    args = t[:, None].float() * freqs[None, :]  # [N, half]
    if flip_sin_to_cos:
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    else:
        emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb  # [N, dim]


# The official decoder pipeline's `original_size` default (pipeline_llava_gen / pipeline_reconstruct,
# docs/model_spec.md §1.6). BLIP3-o's inference never overrides it, so the UNet sees "original 1024x1024" at every
# output size, including presets whose native size is not 1024.
OFFICIAL_ORIGINAL_SIZE = (1024, 1024)


def sdxl_time_ids(height: int, width: int, batch: int, dtype: torch.dtype, device: torch.device | str | None = None,
                  original_size: tuple[int, int] = OFFICIAL_ORIGINAL_SIZE, crop: tuple[int, int] = (0, 0)) -> Tensor:
    """SDXL micro-conditioning ids [batch, 6] = [orig_h, orig_w, crop_top, crop_left, target_h, target_w].

    Sizes are in pixels. The official pipeline builds `original_size + crop_info + [height, width]`
    with its defaults original_size = [1024, 1024], crop_info = [0, 0] (docs/model_spec.md §1.6), i.e.
    [1024, 1024, 0, 0, height, width] for an output of height x width: only the target changes with
    the output size.
    """
    row = torch.tensor([original_size[0], original_size[1], crop[0], crop[1], height, width], dtype=dtype,
                       device=device)
    return row.expand(batch, 6).contiguous()  # [B, 6]


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear (diffusers `TimestepEmbedding`: keys linear_1, linear_2)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv, + time projection, GroupNorm-SiLU-conv, + (1x1-projected) shortcut.

    `temb_channels=None` gives the VAE variant without a time input.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, groups: int,
                 eps: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # [B, C_out, H, W]
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Module):
    """Multi-head attention with diffusers' key names (to_q, to_k, to_v, to_out.0).

    Self-attention when `context` is None, else cross-attention to `context` [B, M, kv_dim]. A
    caller that attends to the same context many times passes its `project_kv(context)` as `kv`
    instead (the pixel decoder: the CLIP features are fixed over all UNet steps).
    """

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None, qkv_bias: bool = False) -> None:
        super().__init__()
        kv_dim = kv_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(kv_dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(kv_dim, dim, bias=qkv_bias)
        # diffusers' to_out is [Linear, Dropout]; only index 0 holds weights.
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def project_kv(self, context: Tensor) -> KV:
        """Key and value of `context` [B, M, kv_dim], split into heads: [B, heads, M, Dh] each."""
        b, m, _ = context.shape
        k = self.to_k(context).view(b, m, self.heads, -1).transpose(1, 2)  # [B, heads, M, Dh]
        v = self.to_v(context).view(b, m, self.heads, -1).transpose(1, 2)
        return k, v

    def forward(self, x: Tensor, context: Tensor | None = None, kv: KV | None = None) -> Tensor:
        """x [B, N, dim] -> [B, N, dim]. `kv`, when given, replaces projecting `context`."""
        b, n, dim = x.shape
        q = self.to_q(x).view(b, n, self.heads, -1).transpose(1, 2)  # [B, heads, N, Dh]
        k, v = kv if kv is not None else self.project_kv(x if context is None else context)
        o = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, Dh]
        return self.to_out[0](o.transpose(1, 2).reshape(b, n, dim))


class GEGLU(nn.Module):
    """Linear to 2*inner, then value * GELU(gate) (exact erf GELU, as diffusers)."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward, width 4*dim; keys ff.net.0.proj and ff.net.2."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        # Index 1 is diffusers' (weightless) dropout slot, kept so the output layer's key is net.2.
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-LN self-attention, cross-attention to the conditioning tokens, GEGLU MLP."""

    def __init__(self, dim: int, heads: int, cross_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYERNORM_EPS)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYERNORM_EPS)
        self.attn2 = Attention(dim, heads, kv_dim=cross_dim)
        self.norm3 = nn.LayerNorm(dim, eps=LAYERNORM_EPS)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, context: Tensor | None, cross_kv: KV | None = None) -> Tensor:
        """`cross_kv` = attn2.project_kv(context), precomputed; then `context` is not read."""
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, kv=cross_kv)
        return x + self.ff(self.norm3(x))


class Transformer2D(nn.Module):
    """GroupNorm, linear proj_in over pixels-as-tokens, `depth` transformer blocks, proj_out, residual."""

    def __init__(self, channels: int, heads: int, depth: int, cross_dim: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=TRANSFORMER_GROUPNORM_EPS)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, cross_dim) for _ in range(depth)])
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: Tensor, context: Tensor | None, cross_kv: Iterator[KV] | None = None) -> Tensor:
        """`cross_kv` yields one precomputed (k, v) per transformer block, in order (see
        `UNet2DConditional.precompute_cross_kv`)."""
        b, c, h, w = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)  # [B, H*W, C]
        tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context, None if cross_kv is None else next(cross_kv))
        tokens = self.proj_out(tokens)
        return tokens.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous() + x  # [B, C, H, W]


class Downsample2D(nn.Module):
    """3x3 conv with stride 2, padding 1 (key: downsamplers.0.conv)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling then a 3x3 conv (key: upsamplers.0.conv).

    `size` is the target (H, W); None means ×2. The UNet passes its skip connection's size, which
    is ×2 except for odd latent sides (where diffusers does the same).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class DownBlock(nn.Module):
    """DownBlock2D (resnets only) or CrossAttnDownBlock2D (each resnet followed by a Transformer2D),
    then an optional stride-2 downsampler. Returns the output and one skip per resnet (+ downsampler)."""

    def __init__(self, cfg: UNetConfig, index: int, in_channels: int, cross_attention: bool) -> None:
        super().__init__()
        out = cfg.block_out_channels[index]
        temb, groups = cfg.time_embed_dim, cfg.norm_num_groups
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if j == 0 else out, out, temb, groups, cfg.norm_eps)
            for j in range(cfg.layers_per_block)])
        self.attentions = None
        if cross_attention:
            self.attentions = nn.ModuleList([
                Transformer2D(out, cfg.num_attention_heads[index], cfg.transformer_layers_per_block[index],
                              cfg.cross_attention_dim, groups)
                for _ in range(cfg.layers_per_block)])
        is_last = index == len(cfg.block_out_channels) - 1
        self.downsamplers = None if is_last else nn.ModuleList([Downsample2D(out)])

    def forward(self, x: Tensor, temb: Tensor, context: Tensor | None,
                cross_kv: Iterator[KV] | None = None) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context, cross_kv)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """UpBlock2D or CrossAttnUpBlock2D: layers_per_block + 1 resnets, each eating one skip
    (channel concat), optional Transformer2D after each, then an optional ×2 upsampler.

    `index` counts up blocks from the bottom (0 = lowest resolution), as diffusers' up_blocks.
    """

    def __init__(self, cfg: UNetConfig, index: int, prev_channels: int, cross_attention: bool) -> None:
        super().__init__()
        rev_channels = cfg.block_out_channels[::-1]
        n = len(rev_channels)
        out = rev_channels[index]
        skip_last = rev_channels[min(index + 1, n - 1)]  # the skip that entered this level from above
        temb, groups = cfg.time_embed_dim, cfg.norm_num_groups
        num_layers = cfg.layers_per_block + 1
        self.resnets = nn.ModuleList()
        for j in range(num_layers):
            res_in = prev_channels if j == 0 else out
            skip = skip_last if j == num_layers - 1 else out
            self.resnets.append(ResnetBlock2D(res_in + skip, out, temb, groups, cfg.norm_eps))
        self.attentions = None
        if cross_attention:
            heads = cfg.num_attention_heads[::-1][index]
            depth = cfg.transformer_layers_per_block[::-1][index]
            self.attentions = nn.ModuleList([
                Transformer2D(out, heads, depth, cfg.cross_attention_dim, groups) for _ in range(num_layers)])
        self.upsamplers = None if index == n - 1 else nn.ModuleList([Upsample2D(out)])

    def forward(self, x: Tensor, skips: list[Tensor], temb: Tensor, context: Tensor | None,
                upsample_size: tuple[int, int] | None, cross_kv: Iterator[KV] | None = None) -> Tensor:
        """`skips` is consumed from its end (one per resnet)."""
        for j, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context, cross_kv)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class MidBlockCrossAttn(nn.Module):
    """UNetMidBlock2DCrossAttn: resnet, Transformer2D (depth = last transformer_layers entry), resnet."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        c = cfg.block_out_channels[-1]
        temb, groups = cfg.time_embed_dim, cfg.norm_num_groups
        self.resnets = nn.ModuleList([ResnetBlock2D(c, c, temb, groups, cfg.norm_eps) for _ in range(2)])
        self.attentions = nn.ModuleList([
            Transformer2D(c, cfg.num_attention_heads[-1], cfg.transformer_layers_per_block[-1],
                          cfg.cross_attention_dim, groups)])

    def forward(self, x: Tensor, temb: Tensor, context: Tensor | None,
                cross_kv: Iterator[KV] | None = None) -> Tensor:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context, cross_kv)
        return self.resnets[1](x, temb)


class UNet2DConditional(nn.Module):
    """The SDXL-type UNet: predicts the noise ε of the latent `sample` at `timestep`, conditioned on
    tokens (`encoder_hidden_states`), a pooled vector (`text_embeds`) and SDXL size ids (`time_ids`).

    No registered buffers: the sinusoidal tables are computed in forward. Constructible under
    `torch.device("meta")`, then `load_state_dict(sd, assign=True)` with diffusers' keys.
    """

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        if not cfg.use_linear_projection:
            raise ConfigError("UNet: only use_linear_projection=True (the SDXL layout) is supported")
        self.cfg = cfg
        ch = cfg.block_out_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], cfg.time_embed_dim)
        self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, cfg.time_embed_dim)
        self.down_blocks = nn.ModuleList()
        prev = ch[0]
        for i, kind in enumerate(cfg.down_block_types):
            self.down_blocks.append(DownBlock(cfg, i, prev, cross_attention=kind == "CrossAttnDownBlock2D"))
            prev = ch[i]
        self.mid_block = MidBlockCrossAttn(cfg)
        self.up_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.up_block_types):
            self.up_blocks.append(UpBlock(cfg, i, prev, cross_attention=kind == "CrossAttnUpBlock2D"))
            prev = ch[::-1][i]
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def time_embed(self, timesteps: Tensor, dtype: torch.dtype) -> Tensor:
        """Timestep part of the conditioning vector: time MLP(sinusoid(t)), [N] -> [N, T].

        Row i depends on timesteps[i] only, so the pixel decoder computes all steps' rows in one call.
        """
        cfg = self.cfg
        t_emb = timestep_embedding(timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        return self.time_embedding(t_emb.to(dtype))  # [N, T]

    def added_embed(self, text_embeds: Tensor, time_ids: Tensor, dtype: torch.dtype) -> Tensor:
        """SDXL added-condition part: add MLP([pooled, sinusoid(ids)]), [B, T]; constant over steps."""
        cfg = self.cfg
        ids_emb = timestep_embedding(time_ids.flatten(), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                                     cfg.freq_shift).reshape(time_ids.shape[0], -1)  # [B, 6*D], fp32
        add_in = torch.cat([text_embeds.to(dtype), ids_emb.to(dtype)], dim=-1)  # [B, proj_in_dim]
        return self.add_embedding(add_in)

    def embed(self, timestep: Tensor | float, text_embeds: Tensor, time_ids: Tensor, batch: int,
              dtype: torch.dtype) -> Tensor:
        """Conditioning vector [B, time_embed_dim] = time MLP(sinusoid(t)) + add MLP([pooled, sinusoid(ids)])."""
        # A Python float becomes fp32 in one rounding, as diffusers' float64 tensor + .float() does.
        t = torch.as_tensor(timestep, dtype=torch.float32, device=time_ids.device).reshape(-1).expand(batch)  # [B]
        return self.time_embed(t, dtype) + self.added_embed(text_embeds, time_ids, dtype)

    def cross_attention_blocks(self) -> list[BasicTransformerBlock]:
        """Every transformer block in the order forward runs them (down, mid, up): `cross_kv`'s order."""
        blocks = []
        for level in [*self.down_blocks, self.mid_block, *self.up_blocks]:
            for transformer in level.attentions or ():
                blocks.extend(transformer.transformer_blocks)
        return blocks

    def precompute_cross_kv(self, encoder_hidden_states: Tensor) -> list[KV]:
        """Every block's cross-attention (k, v) of the conditioning tokens [B, N, cross_dim], each
        [B, heads, N, Dh]: what forward would project at every step, computed once (same ops)."""
        return [block.attn2.project_kv(encoder_hidden_states) for block in self.cross_attention_blocks()]

    def forward(self, sample: Tensor, timestep: Tensor | float, encoder_hidden_states: Tensor | None,
                text_embeds: Tensor, time_ids: Tensor, cross_kv: Sequence[KV] | None = None) -> Tensor:
        """sample [B, 4, h, w]; timestep scalar / [] / [1] / [B] (float ok); encoder_hidden_states
        [B, N, cross_dim]; text_embeds [B, cross_dim]; time_ids [B, 6] -> ε [B, 4, h, w].
        `cross_kv` = precompute_cross_kv(encoder_hidden_states), then encoder_hidden_states may be None."""
        emb = self.embed(timestep, text_embeds, time_ids, sample.shape[0], sample.dtype)  # [B, T]
        return self.denoise(sample, emb, encoder_hidden_states, cross_kv)

    def denoise(self, sample: Tensor, emb: Tensor, encoder_hidden_states: Tensor | None = None,
                cross_kv: Sequence[KV] | None = None) -> Tensor:
        """The network given its conditioning vector emb [B, T] (`embed`): sample [B, 4, h, w] -> ε.

        Cross-attention reads `cross_kv` (one (k, v) per block, `precompute_cross_kv`) when given,
        else projects `encoder_hidden_states` [B, N, cross_dim] in every block.
        """
        context = encoder_hidden_states
        kv = None
        if cross_kv is not None:
            if len(cross_kv) != len(self.cross_attention_blocks()):
                raise ValueError(f"cross_kv has {len(cross_kv)} entries, the UNet has "
                                 f"{len(self.cross_attention_blocks())} cross-attention blocks")
            kv = iter(cross_kv)  # each transformer block takes the next (k, v)
        elif context is None:
            raise ValueError("denoise needs encoder_hidden_states or cross_kv")
        x = self.conv_in(sample)  # [B, C0, h, w]
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, emb, context, kv)
            skips.extend(block_skips)
        x = self.mid_block(x, emb, context, kv)
        for block in self.up_blocks:
            n = len(block.resnets)
            # After this block takes its n skips, the next skip's size is the size to upsample to.
            size = tuple(skips[-n - 1].shape[-2:]) if block.upsamplers is not None else None
            x = block(x, skips, emb, context, size, kv)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


__all__ = ["UNet2DConditional", "sdxl_time_ids", "OFFICIAL_ORIGINAL_SIZE", "timestep_embedding", "ResnetBlock2D",
           "Attention", "Upsample2D", "Downsample2D", "Transformer2D", "KV"]
