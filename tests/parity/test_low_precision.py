"""The reference backend in bf16/fp16 on CPU vs itself in fp32 (same tiny checkpoint).

Not an exactness test (the fp32 parity tests are); it checks that every stage runs in half
precision with errors of the size half precision explains, so dtype plumbing bugs (a stage left in
fp32, noise cast wrongly, overflow) show up.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blip3o_engine import Engine, ImageParams


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_stages_track_fp32(tiny_dir, tiny_engine, dtype):
    half = Engine.from_pretrained(str(tiny_dir), dtype=dtype)
    assert all(p.dtype == getattr(torch, dtype) for p in half.model.parameters())
    params = ImageParams(seed=11, dit_steps=6, decoder_steps=6)

    cond32 = tiny_engine.encode_prompt("a red apple")
    cond16 = half.encode_prompt("a red apple")
    assert cond16.dtype == getattr(torch, dtype)
    # bf16 keeps 8 mantissa bits (rel. rounding 2^-9 ~ 2e-3 per op); through a 2-layer LLM the
    # accumulated relative error stays well under 3e-2. fp16 (11 bits) is ~8x tighter.
    assert rel_err(cond16, cond32) < 3e-2  # measured 8e-3 (bf16), 1e-3 (fp16)

    noise = torch.randn(1, half.cfg.dit.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    f32 = tiny_engine.sample_clip_features(cond32[None], params, noise=noise)
    f16 = half.sample_clip_features(cond32[None], params, noise=noise)
    assert torch.isfinite(f16).all()
    # 6 Euler steps with CFG 3 amplify per-step rounding; 1e-1 still separates a broken stage (~1).
    assert rel_err(f16, f32) < 5e-2  # measured 1.1e-2 (bf16), 1.5e-3 (fp16)

    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    uncond = tiny_engine.uncond_features(params)
    img32 = np.asarray(tiny_engine.decode_pixels(f32, params, noise=latent, uncond=uncond)[0]).astype(float)
    img16 = np.asarray(half.decode_pixels(f32, params, noise=latent, uncond=uncond)[0]).astype(float)
    # Mean absolute difference in uint8 levels; an unrelated image differs by ~80.
    assert np.abs(img16 - img32).mean() < 6  # measured 1.1 (bf16), 0.14 (fp16)
