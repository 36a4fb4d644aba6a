"""NextDiT: the cross-attention diffusion transformer of BLIP3-o's first stage (docs/model_spec.md §1.4).

PyTorch port of the official `LuminaNextDiT2DModel` copy (`main:blip3o/model/lumina_nextdit2d.py` with
diffusers 0.32 helper modules). It maps a noisy grid of CLIP features `x [B, C, S, S]`, a timestep on the
0..1000 scale (1000 = pure noise) and the LLM's query hidden states `caption [B, N, caption_dim]` to a
flow-matching velocity of the same shape as `x`.

One forward, two callers. Most of a step's work does not depend on the noisy latent, so the model exposes
its forward in the pieces a sampling loop hoists (the engine's `FlowSampler`), and `forward` is their
composition (the reference):

    cond = dit.precompute(caption)              # per request: caption projection, every block's cross K/V,
                                                #   the caption half of temb (`DiTCondition`)
    mod, scale = dit.modulation(temb)           # per (step, row): adaLN vectors of every block, output scale
    v = dit.step(x_tokens, mod, scale, cond, rope)   # the only part that sees the latent

Every norm, rotation and activation inside a block is an op of `ops` (torch twin or Triton kernel, chosen
by `ops.dispatch`); the engine may also fuse a block's [q1; k1; v1; q2] and [w1; w3] projections into one
GEMM each (`fuse_projections`) and fold the per-head cross-attention gate into V (`precompute(...,
fold_gate=True)`: attention is linear in V) — the only differences between the two backends' math.

Parameter names equal the checkpoint keys under `model.dit.model.` (docs/model_spec.md §3), so the loader maps them 1:1.
Nothing else is registered: the 2-D RoPE table and the sinusoidal timestep table are recomputed (a few
hundred floats).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..config import DiTConfig
from ..ops.dispatch import reference_mode
from .fusion import fuse_linears, is_live

# Hard-coded in the official model, independent of cfg.norm_eps (docs/model_spec.md §1.4): the q/k LayerNorms and the
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
    """Rotate interleaved pairs of `x [B, N, H, head_dim]` by the table of `rope_2d`, in fp32, cast back
    (`ops.rope_2d_ref`: the complex product diffusers' `apply_rotary_emb(use_real=False)` computes)."""
    return ops.rope_2d_ref(x, *rope)


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
        return ops.rms_norm(x, self.weight, self.eps)


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
    """`norm1`: the block's modulation `linear(SiLU(temb))`, split in the order (scale_msa, gate_msa,
    scale_mlp, gate_mlp), and the RMSNorm that scale_msa modulates (`ops.rms_norm_modulate`)."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.linear = nn.Linear(cfg.time_embed_dim, 4 * cfg.hidden_size)
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def modulation(self, temb: torch.Tensor) -> torch.Tensor:
        """temb `[..., T]` -> `[..., 4, D]` stacked (scale_msa, gate_msa, scale_mlp, gate_mlp)."""
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

    def norm_rope(self, t: torch.Tensor, norm: nn.LayerNorm, rope: tuple[torch.Tensor, torch.Tensor] | None
                  ) -> torch.Tensor:
        """Projected `[B, N, D]` -> LayerNorm over D, heads `[B, N, H, d]`, rotated unless `rope` is None."""
        cos, sin = rope if rope is not None else (None, None)
        return ops.layer_norm_rope(t, norm.weight, norm.bias, LAYER_NORM_EPS, cos, sin, self.num_heads)

    def key_value(self, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention context `[B, M, D]` -> keys, values `[B, M, H, d]` (keys normed, never rotated)."""
        return self.norm_rope(self.to_k(ctx), self.norm_k, None), self.to_v(ctx).unflatten(-1, (self.num_heads, -1))


class FeedForward(nn.Module):
    """SwiGLU `linear_2(SiLU(linear_1 u) ⊙ linear_3 u)`, no biases, SiLU in fp32 (diffusers `FP32SiLU`)."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size, bias=False)
        self.linear_2 = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=False)
        self.linear_3 = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size, bias=False)

        self.w13: torch.Tensor | None = None  # fused [w1; w3] `[2F, D]` (`fuse`)

    def fuse(self) -> None:
        self.w13 = fuse_linears([self.linear_1, self.linear_3])[0]

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        if is_live(self.w13, self.linear_1) and not reference_mode():
            return self.linear_2(ops.silu_and_mul(F.linear(u, self.w13)))  # [.., 2F] -> [.., F]
        return self.linear_2(ops.swiglu(self.linear_1(u), self.linear_3(u)))


@dataclass(eq=False)
class DiTCondition:
    """What a sampling loop reads of the caption, computed once per request (`NextDiT.precompute`).
    R rows (with CFG: the null rows and the caption rows), L blocks, M caption tokens."""

    cross_kv: torch.Tensor  # [L, 2, R, H, M, d] each block's cross-attention K and V
    caption_emb: torch.Tensor  # [R, T] the caption half of temb
    gate_folded: bool  # V already scaled by the block's tanh(gate) per head


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
        self.qkvq: torch.Tensor | None = None  # fused [q1; k1; v1; q2] `[4D, D]` (`fuse`)

    def fuse(self) -> None:
        """One GEMM for the four projections of the modulated input, one for w1/w3 (no extra memory)."""
        self.qkvq = fuse_linears([self.attn1.to_q, self.attn1.to_k, self.attn1.to_v, self.attn2.to_q])[0]
        self.feed_forward.fuse()

    def cross_key_value(self, cp: torch.Tensor, fold_gate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys, values `[B, H, M, d]` of the projected caption `cp [B, M, D]`. They do not
        depend on the latent or the step: a sampler computes them once. fold_gate: V times tanh(gate) per
        head (softmax(qkᵀ)·V·g = (softmax(qkᵀ)·V)·g)."""
        k, v = self.attn2.key_value(self.norm1_context(cp))  # [B, M, H, d]
        if fold_gate:
            v = v * self.gate.tanh().to(v.dtype).view(1, 1, -1, 1)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor, mod: torch.Tensor, cross_kv: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor], gate_folded: bool) -> torch.Tensor:
        """x `[R, N, D]` image tokens; mod `[4, R, D]` (scale_msa, gate_msa, scale_mlp, gate_mlp) of this
        step; cross_kv `[2, R, H, M, d]` from `cross_key_value` -> `[R, N, D]`."""
        scale_msa, gate_msa, scale_mlp, gate_mlp = mod  # [R, D] each
        eps, a1, a2 = self.norm1.norm.eps, self.attn1, self.attn2
        h = ops.rms_norm_modulate(x, self.norm1.norm.weight, scale_msa, eps)  # [R, N, D]
        if is_live(self.qkvq, self.attn1.to_q) and not reference_mode():
            q1, k1, v1, q2 = F.linear(h, self.qkvq).chunk(4, dim=-1)  # [R, N, D] each
        else:
            q1, k1, v1, q2 = a1.to_q(h), a1.to_k(h), a1.to_v(h), a2.to_q(h)
        q1, k1 = a1.norm_rope(q1, a1.norm_q, rope), a1.norm_rope(k1, a1.norm_k, rope)  # [R, N, H, d]
        q2 = a2.norm_rope(q2, a2.norm_q, rope)
        self_out = attend(q1, k1, v1.unflatten(-1, (a1.num_heads, -1)))  # [R, N, H, d]
        # Cross-attention: q from the image tokens (rotated), k/v from the caption (never rotated).
        cross_out = F.scaled_dot_product_attention(q2.transpose(1, 2), cross_kv[0], cross_kv[1]).transpose(1, 2)
        if not gate_folded:
            cross_out = cross_out * self.gate.tanh().view(1, 1, -1, 1)
        mixed = a2.to_out[0]((self_out + cross_out).flatten(2))  # [R, N, D]
        x = ops.gated_rms_residual(x, mixed, self.norm2.weight, gate_msa, eps)
        u = ops.rms_norm_modulate(x, self.ffn_norm1.weight, scale_mlp, eps)
        return ops.gated_rms_residual(x, self.feed_forward(u), self.ffn_norm2.weight, gate_mlp, eps)


class FinalLayer(nn.Module):
    """`norm_out` (LuminaLayerNormContinuous): LayerNorm without affine, eps 1e-6, scaled (no shift) by
    1 + linear_1(SiLU(temb)), then linear_2 to the output channels."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(cfg.time_embed_dim, cfg.hidden_size)
        self.linear_2 = nn.Linear(cfg.hidden_size, cfg.patch_size**2 * cfg.in_channels)

    def scale(self, temb: torch.Tensor) -> torch.Tensor:
        """temb `[..., T]` -> the output scale `[..., D]` (before its `1 +`): loop-invariant per (step, row)."""
        return self.linear_1(F.silu(temb).to(self.linear_1.weight.dtype))

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """x `[R, N, D]`, scale `[R, D]` from `scale` -> `[R, N, C]`."""
        x = F.layer_norm(x, (x.shape[-1],), eps=FINAL_NORM_EPS) * (1 + scale[:, None])
        return self.linear_2(x)


# ------------------------------------------------------------------------------------------------
# The model


class NextDiT(nn.Module):
    """BLIP3-o's NextDiT (docs/model_spec.md §1.4): `forward(x, timestep, caption) -> velocity`, and its hoistable pieces
    (module docstring)."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.caption_projection = CaptionProjection(cfg)
        self.patch_embedder = PatchEmbedder(cfg)
        self.time_caption_embed = TimeCaptionEmbedding(cfg)
        self.layers = nn.ModuleList([NextDiTBlock(cfg) for _ in range(cfg.num_layers)])
        self.norm_out = FinalLayer(cfg)

    def fuse_projections(self) -> None:
        """Fuse every block's [q1; k1; v1; q2] and [w1; w3] (see `NextDiTBlock.fuse`). Idempotent."""
        for block in self.layers:
            block.fuse()

    def rope(self, grid: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin `[grid², d/2]` of the 2-D RoPE for a `grid x grid` latent."""
        return rope_2d(grid, self.cfg.head_dim, self.cfg.rope_theta, device=device)

    # ------------------------------------------------------------------------------ hoistable pieces

    def project_caption(self, caption: torch.Tensor) -> torch.Tensor:
        """LLM query hidden states `[B, N, caption_dim]` -> Cp `[B, N, hidden]`. Once per image."""
        return self.caption_projection(caption)

    def cross_kv(self, cp: torch.Tensor, fold_gate: bool = False) -> torch.Tensor:
        """Projected caption `[R, M, D]` -> every block's cross K/V `[L, 2, R, H, M, d]`."""
        return torch.stack([torch.stack(block.cross_key_value(cp, fold_gate)) for block in self.layers])

    def condition(self, cp: torch.Tensor, fold_gate: bool = False) -> DiTCondition:
        """Projected caption `[R, M, D]` -> every block's cross K/V and the caption half of temb."""
        return DiTCondition(self.cross_kv(cp, fold_gate), self.time_caption_embed.embed_caption(cp), fold_gate)

    def precompute(self, caption: torch.Tensor, fold_gate: bool = False) -> DiTCondition:
        """Caption `[R, M, caption_dim]` -> `DiTCondition`: all the per-request work of a sampling loop."""
        return self.condition(self.project_caption(caption), fold_gate)

    def embed_timestep(self, timestep: torch.Tensor) -> torch.Tensor:
        """`[...]` timesteps (0..1000, int or float) -> the timestep half of temb `[..., T]`."""
        return self.time_caption_embed.embed_timestep(timestep.flatten()).unflatten(0, timestep.shape)

    def embed_conditions(self, timestep: torch.Tensor, cp: torch.Tensor) -> torch.Tensor:
        """temb `[B, time_embed_dim]` from timesteps `[B]` and Cp `[B, N, hidden]`."""
        return self.time_caption_embed(timestep, cp)

    def modulation(self, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """temb `[..., R, T]` -> every block's adaLN vectors `[..., L, 4, R, D]` and the output scale
        `[..., R, D]`; a sampler tabulates them for all steps before its loop."""
        mod = torch.stack([b.norm1.modulation(temb).transpose(-3, -2) for b in self.layers], dim=-4)
        return mod, self.norm_out.scale(temb)

    def step(self, x: torch.Tensor, mod: torch.Tensor, final_scale: torch.Tensor, cond: DiTCondition,
             rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Latent tokens `x [R, N, C]` (token n = row*S + col) -> velocity tokens `[R, N, C]`, from one step's
        `mod [L, 4, R, D]` and `final_scale [R, D]` (`modulation`) and the request's `cond`."""
        h = self.patch_embedder.proj(x)  # [R, N, D]
        for layer, block in enumerate(self.layers):
            h = block(h, mod[layer], cond.cross_kv[layer], rope, cond.gate_folded)
        return self.norm_out(h, final_scale)

    # ------------------------------------------------------------------------------ whole forward

    def forward_trunk(self, x: torch.Tensor, temb: torch.Tensor, cp: torch.Tensor) -> torch.Tensor:
        """Latent `[B, C, S, S]`, temb `[B, T]`, Cp `[B, N, hidden]` -> velocity `[B, C, S, S]`.
        Any square grid works (the official RoPE table covers 384x384); the released model uses S = 8."""
        b, c, s, _ = x.shape
        mod, scale = self.modulation(temb)  # [L, 4, B, D], [B, D]
        cond = DiTCondition(self.cross_kv(cp), None, gate_folded=False)  # temb already holds the caption half
        v = self.step(x.flatten(2).transpose(1, 2), mod, scale, cond, self.rope(s, x.device))
        return v.transpose(1, 2).reshape(b, c, s, s)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, caption: torch.Tensor) -> torch.Tensor:
        """x `[B, C, S, S]`, timestep `[B]` (0..1000 scale, 1000 = noise), caption `[B, N, caption_dim]`
        -> velocity `[B, C, S, S]` (noise − x0)."""
        cp = self.project_caption(caption)
        return self.forward_trunk(x, self.embed_conditions(timestep, cp), cp)


__all__ = ["DiTCondition", "NextDiT", "NextDiTBlock", "rope_2d", "apply_rope", "timestep_embedding"]
