"""The optimized text-to-image backend vs the reference backend on the same tiny checkpoint (fp32 CPU).

Same seeds -> same noise; the optimized path batches prompts, hoists loop invariants, fuses ops and
reorders some reductions, so it agrees to fp32 rounding, not bitwise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blip3o_engine import Engine, ImageParams

# fp32, different GEMM shapes (batched rows, concatenated projections) and summation orders:
# measured ~1e-6 relative on the features; 1e-4 is far below a real error (a wrong branch order,
# null or step moves them by > 1e-1).
FEATURE_REL_TOL = 1e-4
FAST = dict(dit_steps=7, decoder_steps=9)


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def assert_images_close(a, b) -> None:
    """uint8 after round(x*255): fp32 noise may flip a value sitting on a .5 boundary by one level."""
    diff = np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


@pytest.fixture(scope="module")
def optimized(tiny_dir):
    return Engine.from_pretrained(str(tiny_dir), backend="optimized")


@pytest.mark.parametrize("batch", [1, 3])
def test_generate_images_match_reference(tiny_engine, optimized, test_image, batch):
    prompts = ["a red apple", "a dog on the beach at sunset", "x"][:batch]
    params = ImageParams(seed=21, **FAST)
    ref = tiny_engine.generate_images(prompts, params)
    opt = optimized.generate_images(prompts, params)
    for r, o in zip(ref, opt):
        assert o.seed == r.seed
        assert rel_err(o.clip_features, r.clip_features) < FEATURE_REL_TOL
        assert_images_close(o.image, r.image)


def test_image_conditioned_generation_matches_reference(tiny_engine, optimized, test_image):
    params = ImageParams(seed=4, **FAST)
    prompts = ["make it blue", "a cat"]
    images = [test_image, None]  # a mixed batch: one conditioned on an image, one not
    ref = tiny_engine.generate_images(prompts, params, images=images)
    opt = optimized.generate_images(prompts, params, images=images)
    for r, o in zip(ref, opt):
        assert rel_err(o.clip_features, r.clip_features) < FEATURE_REL_TOL
        assert_images_close(o.image, r.image)


def test_batch_composition_changes_nothing_beyond_rounding(optimized):
    params = ImageParams(seed=30, **FAST)
    pair = optimized.generate_images(["a red apple", "a dog"], params)
    alone = optimized.generate_image("a dog", ImageParams(seed=31, **FAST))
    assert rel_err(pair[1].clip_features, alone.clip_features) < FEATURE_REL_TOL
    assert_images_close(pair[1].image, alone.image)


def test_max_batch_size_chunks_without_changing_results(optimized):
    params = ImageParams(seed=40, **FAST)
    whole = optimized.generate_images(["a", "b", "c"], params)
    chunked = optimized.generate_images(["a", "b", "c"], ImageParams(seed=40, max_batch_size=2, **FAST))
    assert [r.seed for r in chunked] == [40, 41, 42]
    for w, c in zip(whole, chunked):
        assert rel_err(c.clip_features, w.clip_features) < FEATURE_REL_TOL
        assert_images_close(c.image, w.image)


def test_stage_methods_run_the_optimized_path(tiny_engine, optimized):
    params = ImageParams(seed=8, **FAST)
    cond = optimized.encode_prompt("a red apple")
    noise = torch.randn(2, *optimized._dit_noise_shape(), generator=torch.Generator().manual_seed(0))
    feats = optimized.sample_clip_features(torch.stack([cond, cond]), params, noise=noise)
    ref = tiny_engine.sample_clip_features(torch.stack([cond, cond]), params, noise=noise)
    assert rel_err(feats, ref) < FEATURE_REL_TOL
    for o, r in zip(optimized.decode_pixels(feats, params), tiny_engine.decode_pixels(ref, params)):
        assert_images_close(o, r)
