"""PixelDecoder (the optimized stage 2) vs `reference.decode_pixels`, fp32 on CPU, tiny checkpoint.

What differs from the reference, and so what the tolerances allow for: the time embeddings of all
steps come from ONE batched GEMM over the S timesteps instead of one GEMM over the 2B batch rows per
step. MKL blocks a GEMM by its row count, so a row can differ by an fp32 ulp or so (measured 1e-6
absolute on values of order 1); everything else (cross-K/V, added embedding, the step) is the same
ops on the same shapes, hoisted. That ulp-level seed, carried through 50 steps of the UNet, gives a
latent difference of ~4e-7 of the latents' scale (measured), and the VAE passes it on at the same
relative size. A uint8 value then differs only where the exact image value lies within that
distance of a rounding boundary (x·255 at k + 0.5): one level, on a tiny fraction of values
(measured 1 of 36,864 at B=3, 50 steps). Structural errors (uncond first, wrong CFG arithmetic, a
stale table row, K/V of the wrong block) change latents by O(1) and most pixels by many levels.
"""

from __future__ import annotations

import pytest
import torch

from blip3o_engine.errors import InputError
from blip3o_engine.models.unet import sdxl_time_ids
from blip3o_engine.runtime import reference
from blip3o_engine.runtime.pixel_decoder import PixelDecoder

# Latents relative to their max: measured 4e-7 (see the module docstring); 25x margin.
LATENT_REL_TOL = 1e-5
# uint8: at most one level, on at most this fraction of values (measured 3e-5, see above).
PIXEL_FLIP_FRACTION = 1e-3


def _decoder(engine, **kw) -> PixelDecoder:
    m = engine.model
    return PixelDecoder(m.unet, m.vae, engine.cfg.vae.scaling_factor, engine.cfg.decoder_scheduler,
                        engine.device, m.dtype, **kw)


def _inputs(engine, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Different features and noise per row; features at the scale of the engine's null features."""
    gen = torch.Generator().manual_seed(seed)
    uncond = engine.uncond_features()
    feats = torch.randn(batch, *uncond.shape[1:], generator=gen) * uncond.std()
    side = engine.cfg.unet.sample_size
    noise = torch.randn(batch, engine.cfg.unet.in_channels, side, side, generator=gen)
    return feats, noise


def _vae_inputs(vae: torch.nn.Module) -> tuple[list[torch.Tensor], torch.utils.hooks.RemovableHandle]:
    """Record what the VAE is called with (the sampler's latents / scaling_factor): the input of its first
    layer, which both the whole module and its pieces (`VAEDecoder.pieces`) run."""
    seen: list[torch.Tensor] = []
    handle = vae.post_quant_conv.register_forward_pre_hook(lambda _module, args: seen.append(args[0].clone()))
    return seen, handle


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _assert_pixels_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype == torch.uint8 and got.shape == want.shape
    diff = (got.int() - want.int()).abs()
    assert diff.max() <= 1
    assert (diff > 0).float().mean() <= PIXEL_FLIP_FRACTION


@pytest.fixture(scope="module")
def decoder(tiny_engine) -> PixelDecoder:
    return _decoder(tiny_engine, compile=False)


# The pipeline default (50 steps, CFG 3) batched; one image with an odd step count; CFG off
# (guidance <= 1: the UNet sees z alone) batched with an odd step count.
@pytest.mark.parametrize("batch,steps,guidance", [(3, 50, 3.0), (1, 11, 3.0), (3, 11, 1.0)],
                         ids=["b3-50-cfg3", "b1-11-cfg3", "b3-11-nocfg"])
def test_matches_reference(tiny_engine, decoder, batch, steps, guidance):
    feats, noise = _inputs(tiny_engine, batch, seed=batch * 100 + steps)
    uncond = tiny_engine.uncond_features()  # [1, Q, C]: the decoder broadcasts it
    seen, handle = _vae_inputs(tiny_engine.model.vae)
    try:
        want = reference.decode_pixels(tiny_engine.model, feats, uncond.expand(batch, -1, -1), noise, steps,
                                       guidance)
        got = decoder.decode(feats, uncond, noise, steps, guidance)
    finally:
        handle.remove()
    latents_want, latents_got = seen[0], torch.cat(seen[1:])  # the decoder's VAE runs one image at a time
    assert latents_want.abs().max() > 0.1  # not a comparison of two near-zero tensors
    assert _rel(latents_got, latents_want) < LATENT_REL_TOL
    _assert_pixels_close(got, want)
    # The images carry the inputs: rows differ and are not flat, so a pass is not vacuous.
    assert want.float().std() > 5
    if batch > 1:
        assert (want[0].int() - want[1].int()).abs().float().mean() > 5


def test_vae_pieces_compose_to_the_whole_vae(tiny_engine, decoder):
    """The VAE the step loop runs piece by piece (`advance_pixels`) is the whole module (`LatentsToPixels`,
    what export takes) op for op: bitwise equal, and equal to the reference's uint8 conversion. The pieces
    split the SDXL VAE's four up blocks into four calls, and the tiny one's two into two."""
    gen = torch.Generator().manual_seed(5)
    side = tiny_engine.cfg.unet.sample_size
    latents = torch.randn(2, tiny_engine.cfg.vae.latent_channels, side + 3, side - 2, generator=gen)  # odd sizes
    run = decoder.begin_pixels(latents[1:])
    calls = 0
    while not decoder.advance_pixels(run):
        calls += 1
        assert run.x.dtype != torch.uint8 and run.done == calls
    assert run.total == len(tiny_engine.model.vae.decoder.up_blocks) == calls + 1
    with torch.inference_mode():
        whole = decoder.to_pixels(latents)
        want = reference.latents_to_uint8(tiny_engine.model, latents)
    assert torch.equal(run.x, whole[1:]) and torch.equal(decoder.latents_to_pixels(latents), whole)
    _assert_pixels_close(whole, want)
    from blip3o_engine.config import VAEConfig
    from blip3o_engine.models.vae import VAEDecoder
    sdxl = VAEConfig()  # the SDXL VAE's layout (four up blocks)
    with torch.device("meta"):  # the layout only: no weights
        assert len(sdxl.block_out_channels) == 4 and len(VAEDecoder(sdxl).pieces()) == 4


def test_uncond_broadcast_equals_explicit_batch(tiny_engine, decoder):
    feats, noise = _inputs(tiny_engine, 3, seed=7)
    uncond = tiny_engine.uncond_features()
    one = decoder.sample_latents(feats, uncond, noise, 4, 3.0)
    full = decoder.sample_latents(feats, uncond.expand(3, -1, -1).clone(), noise, 4, 3.0)
    assert torch.equal(one, full)  # identical values in, identical ops: bitwise


def test_conditioning_rows_are_cond_then_uncond(tiny_engine, decoder):
    """The CFG rows of an image are [cond, uncond] (docs/model_spec.md §1.6; stage 1 orders it the other way).
    The parity tests would not see a swap made in both paths, so check the decoder's rows directly."""
    feats, noise = _inputs(tiny_engine, 2, seed=8)
    uncond = tiny_engine.uncond_features()
    unet = tiny_engine.model.unet
    side = tiny_engine.cfg.unet.sample_size
    time_ids = sdxl_time_ids(side * 8, side * 8, 1, torch.float32)
    decoder.admit("a", feats[0], uncond[0], noise[0], 3, 3.0)
    decoder.admit("b", feats[1], uncond[0], noise[1], 3, 1.0)  # guidance <= 1: the uncond row is unused
    try:
        batch = decoder._batches[(side, side)]
        with torch.no_grad():
            # Default fp32 assert_close tolerances: the GEMMs here have 2 rows instead of 1.
            torch.testing.assert_close(batch.add_emb[0:1], unet.added_embed(feats[:1].mean(1), time_ids, torch.float32))
            torch.testing.assert_close(batch.add_emb[1:2], unet.added_embed(uncond.mean(1), time_ids, torch.float32))
            k, v = unet.cross_attention_blocks()[-1].attn2.project_kv(feats[:1])
            torch.testing.assert_close(batch.cross_kv[-1][0][0:1], k)
            torch.testing.assert_close(batch.cross_kv[-1][1][0:1], v)
        assert not torch.allclose(batch.add_emb[0], batch.add_emb[1])
        assert batch.cfg[:2].tolist() == [True, False] and batch.guidance[:2].tolist() == [3.0, 1.0]
        assert not batch.cross_kv[0][0][3].any()  # the second image's null row: zeros, never read
    finally:
        decoder.release("a")
        decoder.release("b")
    assert len(decoder) == 0


def test_images_join_and_leave_at_any_step(tiny_engine, decoder):
    """Continuous batching of denoising: three images with different step counts, guidance (one without CFG)
    join at different steps and leave when done; each ends where it ends alone, up to the GEMMs' row
    blocking (the same ulp-level seed as the batched reference comparison)."""
    feats, noise = _inputs(tiny_engine, 3, seed=14)
    uncond = tiny_engine.uncond_features()[0]
    plan = {"a": (0, 6, 3.0), "b": (2, 4, 1.0), "c": (3, 5, 4.5)}  # key: (joins after step, steps, guidance)
    alone = {k: decoder.sample_latents(feats[i:i + 1], uncond[None], noise[i:i + 1], s, g)[0]
             for i, (k, (_, s, g)) in enumerate(plan.items())}
    finished, step = {}, 0
    while len(finished) < 3:
        for i, (key, (join, steps, guidance)) in enumerate(plan.items()):
            if join == step:
                decoder.admit(key, feats[i], uncond, noise[i], steps, guidance)
        for p in decoder.step():
            if p.finished:
                finished[p.key] = decoder.take(p.key)  # the leaving slot is refilled by the last one
        step += 1
    assert len(decoder) == 0
    for key, latents in finished.items():
        assert _rel(latents, alone[key]) < LATENT_REL_TOL, key


