"""NextDiT (models/dit.py) vs diffusers 0.42's Lumina-Next modules, on random weights with odd sizes.

diffusers' `LuminaNextDiTBlock` / `LuminaNextDiT2DModel` are the upstream form of the official
`lumina_nextdit2d.py` copy; with `cross_attention_dim = hidden` (the caption is projected first),
`learn_sigma=False` and an FFN `multiple_of` that gives the same width they compute the same function
(diffusers 0.42's block passes inner_dim = int(8·dim/3) and rounds up to `multiple_of`, which is
exactly `lumina_ffn_hidden_size(dim, multiple_of)`: the 2/3 moved from LuminaFeedForward into the
block after 0.32, the width did not change). The official model's extra `caption_projection` is
diffusers' `PixArtAlphaTextProjection`.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from blip3o_engine.config import DiTConfig, lumina_ffn_hidden_size
from blip3o_engine.models.dit import NextDiT, NextDiTBlock, apply_rope, rope_2d, timestep_embedding


def _lumina() -> SimpleNamespace:
    """diffusers' Lumina-Next modules and embeddings, the oracle. A test that asks for them skips where
    diffusers is missing (the GPU machine has none); the tests of our DiT alone run anyway."""
    pytest.importorskip("diffusers", reason="diffusers (the oracle) is not installed")
    from diffusers.models import embeddings
    from diffusers.models.transformers import lumina_nextdit2d

    return SimpleNamespace(
        PixArtAlphaTextProjection=embeddings.PixArtAlphaTextProjection,
        apply_rotary_emb=embeddings.apply_rotary_emb,
        get_2d_rotary_pos_embed_lumina=embeddings.get_2d_rotary_pos_embed_lumina,
        get_timestep_embedding=embeddings.get_timestep_embedding,
        LuminaNextDiT2DModel=lumina_nextdit2d.LuminaNextDiT2DModel,
        LuminaNextDiTBlock=lumina_nextdit2d.LuminaNextDiTBlock,
    )


# Odd-ish shapes: head_dim 16 and 20 (not powers of two for the second), 5 and 3 heads, grids 8 and 5,
# 7 caption tokens, in_channels != hidden, FFN widths from a non-default multiple_of.
SMALL_CFGS = {
    "h80": (DiTConfig(input_size=8, in_channels=24, hidden_size=80, num_layers=2, num_heads=5, num_kv_heads=5,
                      ffn_hidden_size=lumina_ffn_hidden_size(80, 32), caption_dim=48), 32),
    "h60": (DiTConfig(input_size=5, in_channels=12, hidden_size=60, num_layers=2, num_heads=3, num_kv_heads=3,
                      ffn_hidden_size=lumina_ffn_hidden_size(60, 24), caption_dim=48), 24),
}
N_CAPTION = 7


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (gates, norms and biases included) so that no term drops out."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("gate"):
                p.copy_(noise)
            elif p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[1]))


def lumina_rope_table(head_dim: int, grid: int) -> torch.Tensor:
    """diffusers' complex table as LuminaPatchEmbed hands it to the blocks: [1, grid², head_dim/2]."""
    return _lumina().get_2d_rotary_pos_embed_lumina(head_dim, grid, grid).flatten(0, 1).unsqueeze(0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ------------------------------------------------------------------------------------------------
# (c) RoPE and (d) timestep tables


@pytest.mark.parametrize("head_dim,grid", [(64, 8), (16, 5), (20, 3)])
def test_rope_table_equals_diffusers(head_dim: int, grid: int) -> None:
    cos, sin = rope_2d(grid, head_dim, theta=10000.0)
    ref = _lumina().get_2d_rotary_pos_embed_lumina(head_dim, grid, grid).flatten(0, 1)  # [N, hd/2] complex64
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == ref.shape
    # Same angles (bit-identical ω and positions); polar() vs cos()/sin() may differ in the last bit.
    torch.testing.assert_close(cos, ref.real, rtol=0, atol=2e-7)
    torch.testing.assert_close(sin, ref.imag, rtol=0, atol=2e-7)


def test_rope_table_equals_the_official_384_grid_sliced() -> None:
    # The official model builds a 384x384 table and LuminaPatchEmbed slices the top-left 8x8.
    cos, sin = rope_2d(8, 64, theta=10000.0)
    ref = _lumina().get_2d_rotary_pos_embed_lumina(64, 384, 384)[:8, :8].flatten(0, 1)
    torch.testing.assert_close(cos, ref.real, rtol=0, atol=2e-7)  # polar vs cos/sin: last-bit differences
    torch.testing.assert_close(sin, ref.imag, rtol=0, atol=2e-7)


def test_rope_pairs_rotate_by_row_then_col() -> None:
    # Pair 2k by row·ω_k, pair 2k+1 by col·ω_k (docs/model_spec.md §1.4); token n = row*grid + col.
    cos, sin = rope_2d(5, 16, theta=10000.0)
    angles = torch.atan2(sin, cos)
    omega1 = 10000.0 ** (-1 / 4)  # k = 1 for head_dim 16
    row, col = 3, 1
    n = row * 5 + col
    assert angles[n, 0].item() == pytest.approx(row) and angles[n, 1].item() == pytest.approx(col)
    assert angles[n, 2].item() == pytest.approx(row * omega1, rel=1e-6)
    assert angles[n, 3].item() == pytest.approx(col * omega1, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_apply_rope_equals_diffusers_complex(dtype: torch.dtype) -> None:
    x = torch.randn(2, 25, 3, 20, generator=torch.Generator().manual_seed(0)).to(dtype)  # [B, N, H, d]
    ours = apply_rope(x, rope_2d(5, 20, theta=10000.0))
    ref = _lumina().apply_rotary_emb(x, lumina_rope_table(20, 5), use_real=False)
    assert ours.dtype == dtype
    # fp32 rotation of the same inputs; complex multiply vs explicit a·cos − b·sin: a few fp32 ulps,
    # then (fp16/bf16) at most one rounding step of the output dtype apart.
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("t", [
    torch.tensor([1000, 966, 33, 0]),
    torch.tensor([999.5, 500.25, 1.0, 0.0]),
])
def test_timestep_embedding_equals_diffusers(t: torch.Tensor) -> None:
    ours = timestep_embedding(t)
    ref = _lumina().get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert ours.dtype == torch.float32 and ours.shape == (4, 256)
    assert torch.equal(ours, ref)  # same fp32 arithmetic


# ------------------------------------------------------------------------------------------------
# (a) one block vs diffusers' LuminaNextDiTBlock


def block_pair(cfg: DiTConfig, multiple_of: int, dtype: torch.dtype) -> tuple[NextDiTBlock, torch.nn.Module]:
    ours = NextDiTBlock(cfg)
    randomize_(ours, seed=1)
    ref = _lumina().LuminaNextDiTBlock(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, multiple_of, None,
                                       cfg.norm_eps, qk_norm=True, cross_attention_dim=cfg.hidden_size)
    assert ref.feed_forward.linear_1.out_features == cfg.ffn_hidden_size
    ref.load_state_dict(ours.state_dict(), strict=True)  # same names and shapes, key for key
    return ours.to(dtype).eval(), ref.to(dtype).eval()


def run_block(block: NextDiTBlock, x: torch.Tensor, temb: torch.Tensor, cp: torch.Tensor,
              rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Our block on one step's inputs, as NextDiT.step feeds it: modulation [4, B, D] from temb, cross K/V
    [2, B, H, M, d] from the projected caption (gate applied after attention, as the reference does)."""
    mod = block.norm1.modulation(temb).transpose(0, 1)
    return block(x, mod, torch.stack(block.cross_key_value(cp)), rope, gate_folded=False)


@pytest.mark.parametrize("name", list(SMALL_CFGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_block_equals_diffusers(name: str, dtype: torch.dtype) -> None:
    cfg, multiple_of = SMALL_CFGS[name]
    ours, ref = block_pair(cfg, multiple_of, dtype)
    gen = torch.Generator().manual_seed(2)
    b, n = 2, cfg.num_tokens
    x = torch.randn(b, n, cfg.hidden_size, generator=gen)
    cp = torch.randn(b, N_CAPTION, cfg.hidden_size, generator=gen)
    temb = torch.randn(b, cfg.time_embed_dim, generator=gen)
    masks = torch.ones(b, n, dtype=torch.int32), torch.ones(b, N_CAPTION, dtype=torch.int32)
    table = lumina_rope_table(cfg.head_dim, cfg.input_size)

    def run_ref(block: torch.nn.Module, dt: torch.dtype) -> torch.Tensor:
        return block(x.to(dt), masks[0], table, cp.to(dt), masks[1], temb.to(dt), cross_attention_kwargs={})

    with torch.no_grad():
        out = run_block(ours, x.to(dtype), temb.to(dtype), cp.to(dtype),
                        rope_2d(cfg.input_size, cfg.head_dim, cfg.rope_theta))
        expected = run_ref(ref, dtype)
    assert out.dtype == dtype and out.shape == expected.shape
    if dtype == torch.float32:
        # Same math, different op order (real vs complex RoPE, unmasked vs all-true-mask SDPA):
        # measured 1.4e-7 relative.
        assert rel_err(out, expected) < 1e-6
        return
    # fp16/bf16: both round in the same places (fp32 RMSNorm variance, fp32 RoPE, fp32 SiLU), so the
    # outputs agree to a small fraction of the dtype's own error against the fp32 block (measured:
    # bit-identical; a RoPE rounding that flips between the real and the complex product would show
    # as a few %). Skipping the fp32 RoPE or RMSNorm upcast costs 0.67-0.97 of that error.
    with torch.no_grad():
        dtype_err = rel_err(expected, run_ref(block_pair(cfg, multiple_of, torch.float32)[1], torch.float32))
    assert rel_err(out, expected) <= 0.25 * dtype_err


# ------------------------------------------------------------------------------------------------
# (b) whole model vs PixArtAlphaTextProjection + LuminaNextDiT2DModel


def model_pair(cfg: DiTConfig, multiple_of: int) -> tuple[NextDiT, torch.nn.Module, torch.nn.Module]:
    ours = NextDiT(cfg)
    randomize_(ours, seed=3)
    sd = ours.state_dict()
    proj = _lumina().PixArtAlphaTextProjection(cfg.caption_dim, cfg.hidden_size, act_fn="gelu_tanh")
    proj.load_state_dict({k.removeprefix("caption_projection."): v for k, v in sd.items()
                          if k.startswith("caption_projection.")}, strict=True)
    trunk = _lumina().LuminaNextDiT2DModel(
        sample_size=cfg.input_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
        hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads, multiple_of=multiple_of, norm_eps=cfg.norm_eps, learn_sigma=False,
        qk_norm=True, cross_attention_dim=cfg.hidden_size)
    result = trunk.load_state_dict(sd, strict=False)
    # diffusers' unused `pad_token` is the only trunk parameter the checkpoint does not have.
    assert result.missing_keys == ["pad_token"]
    assert sorted(result.unexpected_keys) == sorted(k for k in sd if k.startswith("caption_projection."))
    return ours.eval(), proj.eval(), trunk.eval()


def run_diffusers_model(proj: torch.nn.Module, trunk: torch.nn.Module, x: torch.Tensor,
                        t: torch.Tensor, caption: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The official forward in diffusers modules: caption projection, then the Lumina-Next trunk."""
    s = x.shape[-1]
    rope_grid = _lumina().get_2d_rotary_pos_embed_lumina(head_dim, s, s)  # [S, S, hd/2]: the model slices it
    mask = torch.ones(caption.shape[:2], dtype=torch.int32)
    return trunk(x, t, proj(caption), mask, rope_grid, cross_attention_kwargs={}).sample


@pytest.mark.parametrize("name", list(SMALL_CFGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_model_equals_diffusers(name: str, dtype: torch.dtype) -> None:
    cfg, multiple_of = SMALL_CFGS[name]
    ours, proj, trunk = model_pair(cfg, multiple_of)
    gen = torch.Generator().manual_seed(4)
    b, s = 2, cfg.input_size
    x = torch.randn(b, cfg.in_channels, s, s, generator=gen)
    caption = torch.randn(b, N_CAPTION, cfg.caption_dim, generator=gen)
    t = torch.tensor([966, 33])

    with torch.no_grad():
        fp32_ref = run_diffusers_model(proj, trunk, x, t, caption, cfg.head_dim)
        ours, proj, trunk = ours.to(dtype), proj.to(dtype), trunk.to(dtype)
        x, caption = x.to(dtype), caption.to(dtype)
        out = ours(x, t, caption)
        expected = run_diffusers_model(proj, trunk, x, t, caption, cfg.head_dim)
    assert out.dtype == dtype and out.shape == x.shape == expected.shape
    if dtype == torch.float32:
        # Two blocks of the block test's reorderings plus the caption pooling (sum/N vs masked mean).
        assert rel_err(out, expected) < 1e-6
        # The conditioning really matters (guards against an input being ignored).
        with torch.no_grad():
            assert rel_err(ours(x, t.flip(0), caption), out) > 1e-3
            assert rel_err(ours(x, t, caption.flip(0)), out) > 1e-3
    else:
        # Same rounding points as diffusers (see the block test): a small fraction of the dtype's error.
        # Measured 0 except fp16 "h60": 0.06 (one fp32 RoPE rounding, real vs complex product, flips an
        # fp16 rounding in layer 2 and propagates).
        assert rel_err(out, expected) <= 0.25 * rel_err(expected, fp32_ref)


def test_cfg_batch_rows_are_independent() -> None:
    # The sampler runs [uncond, cond] as one batch; each row must equal its own batch-1 run.
    cfg, _ = SMALL_CFGS["h60"]
    model = NextDiT(cfg).eval()
    randomize_(model, seed=5)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(1, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen).expand(2, -1, -1, -1)
    caption = torch.cat([torch.zeros(1, N_CAPTION, cfg.caption_dim), torch.randn(1, N_CAPTION, cfg.caption_dim,
                                                                                  generator=gen)])
    t = torch.tensor([500, 500])
    with torch.no_grad():
        both = model(x, t, caption)
        rows = [model(x[i:i + 1], t[i:i + 1], caption[i:i + 1]) for i in range(2)]
    # fp32; batched vs single GEMMs may block differently: 1e-6 relative.
    for i in range(2):
        assert rel_err(both[i:i + 1], rows[i]) < 1e-6


# ------------------------------------------------------------------------------------------------
# (e) construction on meta, checkpoint keys and parameter counts


def spec_dit_shapes(caption_dim: int) -> dict[str, tuple[int, ...]]:
    """The DiT tensors of docs/model_spec.md §3 (prefix `model.dit.model.` removed) for the released 4B/8B models."""
    d, t, f, heads, c = 1792, 1024, 4864, 28, 1792
    shapes: dict[str, tuple[int, ...]] = {
        "caption_projection.linear_1.weight": (d, caption_dim), "caption_projection.linear_1.bias": (d,),
        "caption_projection.linear_2.weight": (d, d), "caption_projection.linear_2.bias": (d,),
        "patch_embedder.proj.weight": (d, c), "patch_embedder.proj.bias": (d,),
        "time_caption_embed.timestep_embedder.linear_1.weight": (t, 256),
        "time_caption_embed.timestep_embedder.linear_1.bias": (t,),
        "time_caption_embed.timestep_embedder.linear_2.weight": (t, t),
        "time_caption_embed.timestep_embedder.linear_2.bias": (t,),
        "time_caption_embed.caption_embedder.0.weight": (d,), "time_caption_embed.caption_embedder.0.bias": (d,),
        "time_caption_embed.caption_embedder.1.weight": (t, d), "time_caption_embed.caption_embedder.1.bias": (t,),
        "norm_out.linear_1.weight": (d, t), "norm_out.linear_1.bias": (d,),
        "norm_out.linear_2.weight": (c, d), "norm_out.linear_2.bias": (c,),
    }
    for i in range(24):
        p = f"layers.{i}."
        shapes[p + "gate"] = (heads,)
        for attn in ("attn1", "attn2"):
            for proj in ("to_q", "to_k", "to_v"):
                shapes[f"{p}{attn}.{proj}.weight"] = (d, d)
            for norm in ("norm_q", "norm_k"):
                shapes[f"{p}{attn}.{norm}.weight"] = (d,)
                shapes[f"{p}{attn}.{norm}.bias"] = (d,)
        shapes[p + "attn2.to_out.0.weight"] = (d, d)
        shapes[p + "feed_forward.linear_1.weight"] = (f, d)
        shapes[p + "feed_forward.linear_3.weight"] = (f, d)
        shapes[p + "feed_forward.linear_2.weight"] = (d, f)
        shapes[p + "norm1.linear.weight"] = (4 * d, t)
        shapes[p + "norm1.linear.bias"] = (4 * d,)
        for norm in ("norm1.norm", "ffn_norm1", "norm2", "ffn_norm2", "norm1_context"):
            shapes[f"{p}{norm}.weight"] = (d,)
    return shapes


@pytest.mark.parametrize("caption_dim,spec_count", [(3584, 1.365e9), (2048, 1.362e9)])
def test_real_config_keys_shapes_and_count_on_meta(caption_dim: int, spec_count: float) -> None:
    with torch.device("meta"):
        model = NextDiT(DiTConfig(caption_dim=caption_dim))
    assert list(model.buffers()) == []
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == spec_dit_shapes(caption_dim)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - spec_count) / spec_count < 0.005  # docs/model_spec.md §1.4 quotes 3 significant digits
    # Exact counts (printed in the report): 8B 1,365,010,336; 4B 1,362,257,824.
    assert count == {3584: 1_365_010_336, 2048: 1_362_257_824}[caption_dim]


def test_meta_construction_then_assign_load_runs() -> None:
    cfg, _ = SMALL_CFGS["h80"]
    source = NextDiT(cfg)
    randomize_(source, seed=7)
    with torch.device("meta"):
        model = NextDiT(cfg)
    model.load_state_dict(source.state_dict(), assign=True, strict=True)
    assert all(p.device.type == "cpu" for p in model.parameters())
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(1, cfg.in_channels, 8, 8, generator=gen)
    caption = torch.randn(1, N_CAPTION, cfg.caption_dim, generator=gen)
    with torch.no_grad():
        assert torch.equal(model(x, torch.tensor([700]), caption), source(x, torch.tensor([700]), caption))
