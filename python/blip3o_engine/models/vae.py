"""Decoder half of the SDXL-type VAE (diffusers `AutoencoderKL`, docs/model_spec.md §1.6), plain PyTorch.

Only `post_quant_conv` and `decoder.*` are built; the loader drops the encoder's keys
(`VAEDecoder.IGNORED_PREFIXES`). Key names equal AutoencoderKL's state_dict. Like diffusers'
Decoder, every GroupNorm here uses eps 1e-6 whatever the config says.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import VAEConfig
from .unet import Attention, ResnetBlock2D, Upsample2D

# diffusers' Decoder hard-codes eps 1e-6 for its resnets, its mid attention and conv_norm_out.
VAE_NORM_EPS = 1e-6


def to_uint8(images: Tensor) -> Tensor:
    """Decoded images [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3], on the images' device.

    Same arithmetic as diffusers' postprocess: `(x/2 + 0.5).clamp(0, 1)` in the images' dtype, then
    fp32 `round(x * 255)` (round half to even, like numpy).
    """
    x = (images / 2 + 0.5).clamp(0, 1)
    x = (x.permute(0, 2, 3, 1).float() * 255).round()  # [B, H, W, 3]
    return x.to(torch.uint8)


class SpatialSelfAttention(Attention):
    """Single-head self-attention over pixels with a GroupNorm in front and a residual
    (the VAE mid block's `attentions.0`: group_norm, to_q/k/v with bias, to_out.0)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__(channels, heads=1, qkv_bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=VAE_NORM_EPS)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).view(b, c, h * w).transpose(1, 2)  # [B, H*W, C]
        out = super().forward(tokens)  # [B, H*W, C]
        return out.transpose(1, 2).reshape(b, c, h, w) + x


class VAEMidBlock(nn.Module):
    """resnet, attention, resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, None, groups, VAE_NORM_EPS)
                                      for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class VAEUpBlock(nn.Module):
    """UpDecoderBlock2D: layers_per_block + 1 resnets, then an optional ×2 upsampler."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, upsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if j == 0 else out_channels, out_channels, None, groups, VAE_NORM_EPS)
            for j in range(num_layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Decoder(nn.Module):
    """conv_in -> mid block -> up blocks (widest first) -> GroupNorm, SiLU, conv_out."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        rev = cfg.block_out_channels[::-1]
        groups = cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, rev[0], 3, padding=1)
        self.mid_block = VAEMidBlock(rev[0], groups)
        self.up_blocks = nn.ModuleList([
            VAEUpBlock(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, groups, upsample=i < len(rev) - 1)
            for i in range(len(rev))])
        self.conv_norm_out = nn.GroupNorm(groups, cfg.block_out_channels[0], eps=VAE_NORM_EPS)
        self.conv_out = nn.Conv2d(cfg.block_out_channels[0], cfg.out_channels, 3, padding=1)

    def pieces(self) -> list[Callable[[Tensor], Tensor]]:
        """`forward` as consecutive pieces of comparable cost (conv_in + mid + the first up block, each middle
        up block, the last up block + output head), for a caller that spreads one decode over several calls
        (the step loop: at 1024² the whole VAE outlasts a decoder step, one piece does not). `forward` runs
        exactly these, so the split changes no number."""
        return [self._head, *self.up_blocks[1:-1], self._tail]

    def _head(self, z: Tensor) -> Tensor:
        return self.up_blocks[0](self.mid_block(self.conv_in(z)))

    def _tail(self, x: Tensor) -> Tensor:
        if len(self.up_blocks) > 1:  # with one up block, _head ran it
            x = self.up_blocks[-1](x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))

    def forward(self, z: Tensor) -> Tensor:
        for piece in self.pieces():
            z = piece(z)
        return z


class VAEDecoder(nn.Module):
    """Latents -> RGB in [-1, 1]: `post_quant_conv` (1x1) then the decoder.

    The caller divides the sampler's latents by `VAEConfig.scaling_factor` first, exactly as the
    reference pipeline calls `vae.decode(z / scaling_factor)` (docs/model_spec.md §1.6).
    """

    # Checkpoint key prefixes of AutoencoderKL that this module does not hold (the encoder half).
    IGNORED_PREFIXES = ("encoder.", "quant_conv.")
    to_uint8 = staticmethod(to_uint8)

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        self.decoder = Decoder(cfg)

    def pieces(self) -> list[Callable[[Tensor], Tensor]]:
        """`forward` in consecutive pieces (`Decoder.pieces`, post_quant_conv joined to the first)."""
        first, *rest = self.decoder.pieces()
        return [lambda latents: first(self.post_quant_conv(latents)), *rest]

    def forward(self, latents: Tensor) -> Tensor:
        """latents [B, latent_ch, h, w], already divided by scaling_factor -> images [B, 3, h*f, w*f]."""
        for piece in self.pieces():
            latents = piece(latents)
        return latents


__all__ = ["VAEDecoder", "to_uint8"]
