"""NextDiT: the cross-attention diffusion transformer of BLIP3-o's first stage (spec §1.4).

Plain-PyTorch reference of the official `LuminaNextDiT2DModel` copy (`main:blip3o/model/lumina_nextdit2d.py`
with diffusers 0.32 helper modules). It maps a noisy grid of CLIP features `x [B, C, S, S]`, a timestep on
the 0..1000 scale (1000 = pure noise) and the LLM's query hidden states `caption [B, N, caption_dim]` to a
flow-matching velocity of the same shape as `x`.

Parameter names equal the checkpoint keys under `model.dit.model.` (spec §3), so the loader maps them 1:1.
Nothing else is registered: the 2-D RoPE table and the sinusoidal timestep table are recomputed in
forward (a few hundred floats).

The forward pass is split so that a sampling loop can hoist what does not change across steps:
`project_caption` (once per image) and `embed_conditions` (the timestep part changes per step, the
caption part does not) feed `forward_trunk`, which is the only part that sees the noisy latent.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DiTConfig

# Hard-coded in the official model, independent of cfg.norm_eps (spec §1.4): the q/k LayerNorms and the
# caption_embedder LayerNorm use 1e-5 (torch's default), the output LayerNorm 1e-6.
LAYER_NORM_EPS = 1e-5
FINAL_NORM_EPS = 1e-6
# Width of the sinusoidal timestep features fed to timestep_embedder.linear_1.
TIMESTEP_FREQ_DIM = 256


# ------------------------------------------------------------------------------------------------
# Position and timestep tables (fp32, recomputed per call; never registered)


def timestep_embedding(timestep: torch.Tensor, dim: int = TIMESTEP_FREQ_DIM,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep features `[cos(t·f_k), sin(t·f_k)]`, f_k = max_period^(-k/(dim/2)), in fp32.

    Same arithmetic as diffusers' `get_timestep_embedding(t, dim, flip_sin_to_cos=True,
    downscale_freq_shift=0)`, so the values are bit-identical. `timestep` is `[B]`, int or float.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timestep.device)
    freqs = torch.exp(exponent / half)  # [half]
    args = timestep[:, None].float() * freqs[None, :]  # [B, half]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, dim]


def rope_2d(grid: int, head_dim: int, theta: float, device: torch.device | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of Lumina's 2-D RoPE for a `grid x grid` token grid in row-major order, fp32.

    The head is viewed as head_dim/2 interleaved pairs (2j, 2j+1). Pair 2k rotates by row·ω_k and pair
    2k+1 by col·ω_k, ω_k = theta^(-k/(head_dim/4)) — the layout of diffusers'
    `get_2d_rotary_pos_embed_lumina` (a complex table), kept here as real cos/sin so that the reference
    also exports and compiles (complex tensors do not). Returns two `[grid*grid, head_dim/2]` tensors.
    """
    quarter = head_dim // 4
    # Same expression as diffusers' get_1d_rotary_pos_embed(head_dim // 2, ...): bit-identical ω.
    omega = 1.0 / (theta ** (torch.arange(0, 2 * quarter, 2, dtype=torch.float32, device=device) / (2 * quarter)))
    pos = torch.arange(grid, device=device)
    rows = pos.repeat_interleave(grid)  # [N] token n = row*grid + col
    cols = pos.repeat(grid)  # [N]
    angle_row = torch.outer(rows, omega)  # [N, head_dim/4]
    angle_col = torch.outer(cols, omega)  # [N, head_dim/4]
    angles = torch.stack([angle_row, angle_col], dim=-1).flatten(1)  # [N, head_dim/2]: row, col, row, col...
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate interleaved pairs of `x [B, N, H, head_dim]` by the table of `rope_2d`, in fp32, cast back.

    Pair (a, b) -> (a·cos − b·sin, a·sin + b·cos): the complex product (a + ib)·e^(iφ) that diffusers'
    `apply_rotary_emb(use_real=False)` computes.
    """
    cos, sin = (t[None, :, None, :] for t in rope)  # [1, N, 1, head_dim/2]
    a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # [B, N, H, head_dim/2] each
    rotated = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)  # [B, N, H, head_dim/2, 2]
    return rotated.flatten(-2).to(x.dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked attention, softmax scale 1/sqrt(head_dim). q `[B, N, H, d]`, k/v `[B, M, H, d]` -> `[B, N, H, d]`.

    Both attentions of the official model pass all-true masks (one image, a fixed 64 queries), so none here.
    """
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)  # [B, N, H, d]


# ------------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """RMSNorm with a learned weight; the variance is taken in fp32 (diffusers `RMSNorm` numerics)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


class CaptionProjection(nn.Module):
    """LLM hidden -> DiT width: Linear -> GELU(tanh) -> Linear (diffusers `PixArtAlphaTextProjection`)."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(cfg.caption_dim, cfg.hidden_size)
        self.linear_2 = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(caption), approximate="tanh"))


class PatchEmbedder(nn.Module):
    """Grid -> row-major tokens -> Linear. Only patch size 1 exists (DiTConfig enforces it), so a
    token is one grid cell's channel vector; `proj` keeps the checkpoint's [hidden, p²·C] shape."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(cfg.patch_size**2 * cfg.in_channels, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2).transpose(1, 2)  # [B, S*S, C], token n = row*S + col
        return self.proj(tokens)  # [B, S*S, hidden]


class TimestepEmbedder(nn.Module):
    """Sinusoidal features -> Linear -> SiLU -> Linear (diffusers `TimestepEmbedding`)."""

    def __init__(self, out_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(TIMESTEP_FREQ_DIM, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, timestep: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(timestep).to(self.linear_1.weight.dtype)  # [B, 256]
        return self.linear_2(F.silu(self.linear_1(freq)))  # [B, temb]


class TimeCaptionEmbedding(nn.Module):
    """The conditioning vector temb = timestep embedding + embedding of the mean-pooled projected caption."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(cfg.time_embed_dim)
        # Indexed names `caption_embedder.0/.1` as in the checkpoint (an nn.Sequential there).
        self.caption_embedder = nn.Sequential(
            nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS),
            nn.Linear(cfg.hidden_size, cfg.time_embed_dim),
        )

    def embed_timestep(self, timestep: torch.Tensor) -> torch.Tensor:
        """`[B]` timesteps on the 0..1000 scale -> `[B, temb]`. Depends on the step only."""
        return self.timestep_embedder(timestep)

    def embed_caption(self, cp: torch.Tensor) -> torch.Tensor:
        """Projected caption `[B, N, hidden]` -> `[B, temb]`. Constant over the sampling loop."""
        # The official masked mean runs in fp32 (mask is float); the mask is all ones -> plain mean.
        pooled = (cp.float().sum(dim=1) / cp.shape[1]).to(cp.dtype)  # [B, hidden]
        return self.caption_embedder(pooled)

    def forward(self, timestep: torch.Tensor, cp: torch.Tensor) -> torch.Tensor:
        return self.embed_timestep(timestep) + self.embed_caption(cp)


class AdaRMSNormZero(nn.Module):
    """`norm1`: RMSNorm scaled by (1 + scale_msa), and the block's other three modulation vectors.

    `linear(SiLU(temb))` is split in the order (scale_msa, gate_msa, scale_mlp, gate_mlp).
    """

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.linear = nn.Linear(cfg.time_embed_dim, 4 * cfg.hidden_size)
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, x: torch.Tensor, temb: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.linear(F.silu(temb)).chunk(4, dim=1)  # [B, D] each
        return self.norm(x) * (1 + scale_msa[:, None]), gate_msa, scale_mlp, gate_mlp

    def modulation(self, temb: torch.Tensor) -> torch.Tensor:
        """temb `[..., T]` -> `[..., 4, D]` stacked (scale_msa, gate_msa, scale_mlp, gate_mlp): the same
        `linear(SiLU(temb))` as `forward`, for samplers that tabulate it for all steps before the loop."""
        return self.linear(F.silu(temb)).unflatten(-1, (4, -1))


class DiTAttention(nn.Module):
    """Projections of one attention: bias-free q/k/v, LayerNorm over the full width of q and of k
    ("layer_norm_across_heads"), then split into heads. attn1 has no output projection; attn2's
    `to_out.0` projects the sum of both attentions (see `NextDiTBlock`)."""

    def __init__(self, cfg: DiTConfig, out_proj: bool) -> None:
        super().__init__()
        dim = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.norm_q = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.norm_k = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        if out_proj:
            # A list so that the key reads `to_out.0.weight`, as in the checkpoint.
            self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=False)])

    def query(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """`[B, N, D]` -> rotated queries `[B, N, H, d]` (both attentions rotate q)."""
        return apply_rope(self.norm_q(self.to_q(h)).unflatten(-1, (self.num_heads, -1)), rope)

    def key_value(self, ctx: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """`[B, M, D]` -> keys, values `[B, M, H, d]`; keys rotated only when `rope` is given (self-attn)."""
        k = self.norm_k(self.to_k(ctx)).unflatten(-1, (self.num_heads, -1))
        v = self.to_v(ctx).unflatten(-1, (self.num_heads, -1))
        return (apply_rope(k, rope) if rope is not None else k), v


class FeedForward(nn.Module):
    """SwiGLU `linear_2(SiLU(linear_1 u) ⊙ linear_3 u)`, no biases, SiLU in fp32 (diffusers `FP32SiLU`)."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size, bias=False)
        self.linear_2 = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=False)
        self.linear_3 = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size, bias=False)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        gate = self.linear_1(u)
        return self.linear_2(F.silu(gate.float()).to(gate.dtype) * self.linear_3(u))


class NextDiTBlock(nn.Module):
    """One `LuminaNextDiTBlock`: self-attn and gated cross-attn summed into one output projection,
    then a SwiGLU FFN; both residuals are tanh-gated and RMS-normed (sandwich norm)."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(cfg.num_heads))  # per-head cross-attention gate (tanh)
        self.attn1 = DiTAttention(cfg, out_proj=False)
        self.attn2 = DiTAttention(cfg, out_proj=True)
        self.feed_forward = FeedForward(cfg)
        self.norm1 = AdaRMSNormZero(cfg)
        self.ffn_norm1 = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.ffn_norm2 = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.norm1_context = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, cp: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x `[B, N, D]` image tokens, temb `[B, T]`, cp `[B, M, D]` projected caption -> `[B, N, D]`."""
        h, gate_msa, scale_mlp, gate_mlp = self.norm1(x, temb)  # h [B, N, D]

        self_out = attend(self.attn1.query(h, rope), *self.attn1.key_value(h, rope))  # [B, N, H, d]
        # Cross-attention: q from the image tokens (rotated), k/v from the caption (never rotated).
        cross_k, cross_v = self.attn2.key_value(self.norm1_context(cp), rope=None)  # [B, M, H, d]
        cross_out = attend(self.attn2.query(h, rope), cross_k, cross_v)  # [B, N, H, d]
        cross_out = cross_out * self.gate.tanh().view(1, 1, -1, 1)

        mixed = self.attn2.to_out[0]((self_out + cross_out).flatten(2))  # [B, N, D]
        x = x + gate_msa[:, None].tanh() * self.norm2(mixed)
        ffn_out = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp[:, None]))
        return x + gate_mlp[:, None].tanh() * self.ffn_norm2(ffn_out)

    def cross_key_value(self, cp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys, values `[B, M, H, d]` of the projected caption `cp [B, M, D]`, as `forward`
        computes them. They do not depend on the latent or the step: a sampler computes them once."""
        return self.attn2.key_value(self.norm1_context(cp), rope=None)


class FinalLayer(nn.Module):
    """`norm_out` (LuminaLayerNormContinuous): LayerNorm without affine, eps 1e-6, scaled (no shift) by
    1 + linear_1(SiLU(temb)), then linear_2 to the output channels."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(cfg.time_embed_dim, cfg.hidden_size)
        self.linear_2 = nn.Linear(cfg.hidden_size, cfg.patch_size**2 * cfg.in_channels)

    def scale(self, temb: torch.Tensor) -> torch.Tensor:
        """temb `[..., T]` -> the output scale `[..., D]` that `forward` applies (before its `1 +`)."""
        return self.linear_1(F.silu(temb).to(self.linear_1.weight.dtype))

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale = self.linear_1(F.silu(temb).to(x.dtype))  # [B, D]
        x = F.layer_norm(x, (x.shape[-1],), eps=FINAL_NORM_EPS) * (1 + scale[:, None])
        return self.linear_2(x)  # [B, N, C]


# ------------------------------------------------------------------------------------------------
# The model


class NextDiT(nn.Module):
    """BLIP3-o's NextDiT (spec §1.4): `forward(x, timestep, caption) -> velocity`."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.caption_projection = CaptionProjection(cfg)
        self.patch_embedder = PatchEmbedder(cfg)
        self.time_caption_embed = TimeCaptionEmbedding(cfg)
        self.layers = nn.ModuleList([NextDiTBlock(cfg) for _ in range(cfg.num_layers)])
        self.norm_out = FinalLayer(cfg)

    def project_caption(self, caption: torch.Tensor) -> torch.Tensor:
        """LLM query hidden states `[B, N, caption_dim]` -> Cp `[B, N, hidden]`. Once per image."""
        return self.caption_projection(caption)

    def embed_conditions(self, timestep: torch.Tensor, cp: torch.Tensor) -> torch.Tensor:
        """temb `[B, time_embed_dim]` from timesteps `[B]` (0..1000, int or float) and Cp `[B, N, hidden]`.

        The caption half (`time_caption_embed.embed_caption`) is constant over the sampling loop; the
        timestep half is shared by the CFG halves.
        """
        return self.time_caption_embed(timestep, cp)

    def forward_trunk(self, x: torch.Tensor, temb: torch.Tensor, cp: torch.Tensor) -> torch.Tensor:
        """Latent `[B, C, S, S]`, temb `[B, T]`, Cp `[B, N, hidden]` -> velocity `[B, C, S, S]`.

        Any square grid works (the official RoPE table covers 384x384); the released model uses S = 8.
        """
        b, c, s, _ = x.shape
        rope = rope_2d(s, self.cfg.head_dim, self.cfg.rope_theta, device=x.device)
        h = self.patch_embedder(x)  # [B, S*S, D]
        for layer in self.layers:
            h = layer(h, temb, cp, rope)
        out = self.norm_out(h, temb)  # [B, S*S, C]
        return out.transpose(1, 2).reshape(b, c, s, s)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, caption: torch.Tensor) -> torch.Tensor:
        """x `[B, C, S, S]`, timestep `[B]` (0..1000 scale, 1000 = noise), caption `[B, N, caption_dim]`
        -> velocity `[B, C, S, S]` (noise − x0)."""
        cp = self.project_caption(caption)
        return self.forward_trunk(x, self.embed_conditions(timestep, cp), cp)


__all__ = ["NextDiT", "NextDiTBlock", "rope_2d", "apply_rope", "timestep_embedding"]
