"""Stage-2 decoder modules vs diffusers (the oracle): UNet2DConditional vs UNet2DConditionModel,
VAEDecoder vs AutoencoderKL.decode, on random weights (every tensor redrawn, norms included) and
odd, non-square sizes, fp32 on CPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from blip3o_engine.config import UNetConfig, VAEConfig
from blip3o_engine.models.unet import UNet2DConditional, sdxl_time_ids
from blip3o_engine.models.vae import VAEDecoder, to_uint8



def _diffusers():
    """diffusers, the oracle. A test that asks for it skips where it is missing (the GPU machine has
    none); the tests of our modules alone (parameter counts, time ids, timestep forms) run anyway."""
    return pytest.importorskip("diffusers", reason="diffusers (the oracle) is not installed")


# fp32 everywhere. Both sides run the same torch ops in the same order on the same values (measured:
# bitwise equal on this CPU); what may differ elsewhere is kernel choice for differently-strided
# views, a few fp32 ulps per op, amplified mildly by ~20 layers. 1e-5 of the output scale allows for
# that, while structural errors (head split, time embedding, skip order, residuals) show up at 1e-2
# or more. Norm eps values are too weak to see at this scale; `test_norm_layers_match` checks them.
REL_TOL = 1e-5

TINY_UNET = UNetConfig(
    sample_size=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(32, 48), layers_per_block=1,
    transformer_layers_per_block=(1, 2), num_attention_heads=(2, 3), cross_attention_dim=24,
    addition_time_embed_dim=8, projection_class_embeddings_input_dim=24 + 6 * 8, norm_num_groups=8)

# The SDXL layout (DownBlock2D, CrossAttn, CrossAttn; depths 1/2/3; 2 resnets per level) at tiny width.
SDXL_LIKE_UNET = UNetConfig(
    sample_size=8, block_out_channels=(16, 32, 48), layers_per_block=2, transformer_layers_per_block=(1, 2, 3),
    num_attention_heads=(1, 2, 3), cross_attention_dim=40, addition_time_embed_dim=4,
    projection_class_embeddings_input_dim=40 + 6 * 4, norm_num_groups=8, norm_eps=1e-4)

TINY_VAE = VAEConfig(block_out_channels=(16, 24, 32), layers_per_block=1, norm_num_groups=8, sample_size=32)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter: He-like weights, norm gains around 1, non-zero biases.

    diffusers' defaults would zero nothing we rely on, but uniform defaults keep norms at exactly
    (1, 0), which would hide a swapped or missing norm; redrawing everything makes each tensor matter.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)


def _max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def _pair_unet(cfg: UNetConfig, seed: int):
    ref = _diffusers().UNet2DConditionModel(**cfg.to_diffusers()).eval()
    _randomize(ref, seed)
    ours = UNet2DConditional(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def _unet_inputs(cfg: UNetConfig, batch: int, h: int, w: int, tokens: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, cfg.in_channels, h, w, generator=gen)
    context = torch.randn(batch, tokens, cfg.cross_attention_dim, generator=gen)
    pooled = torch.randn(batch, cfg.cross_attention_dim, generator=gen)
    # Distinct ids per row (pixel sizes of a non-square image, one row with a crop) so that a
    # transposed or wrongly flattened time_ids embedding changes the result.
    time_ids = torch.cat([sdxl_time_ids(8 * h, 8 * w, batch - 1, torch.float32),
                          sdxl_time_ids(8 * h, 8 * w, 1, torch.float32, crop=(16, 8))])
    return sample, context, pooled, time_ids


@pytest.mark.parametrize("cfg,hw", [(TINY_UNET, (8, 12)), (SDXL_LIKE_UNET, (8, 12)), (SDXL_LIKE_UNET, (6, 10))],
                         ids=["two-level-8x12", "sdxl-layout-8x12", "sdxl-layout-odd-6x10"])
def test_unet_matches_diffusers(cfg: UNetConfig, hw: tuple[int, int]) -> None:
    ours, ref = _pair_unet(cfg, seed=1)
    sample, context, pooled, time_ids = _unet_inputs(cfg, batch=3, h=hw[0], w=hw[1], tokens=5, seed=2)
    for t in (torch.tensor([981.0, 500.0, 1.0]), torch.tensor(761.0), 37.5):
        with torch.no_grad():
            want = ref(sample, t, encoder_hidden_states=context,
                       added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
            got = ours(sample, t, context, pooled, time_ids)
        assert got.shape == want.shape == sample.shape
        assert want.abs().max() > 0.1  # the comparison is not between two near-zero tensors
        assert _max_rel_err(got, want) < REL_TOL, f"t={t}"


def test_unet_state_dict_keys_equal_diffusers() -> None:
    for cfg in (TINY_UNET, SDXL_LIKE_UNET):
        ref = _diffusers().UNet2DConditionModel(**cfg.to_diffusers())
        ours = UNet2DConditional(cfg)
        ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        assert our_shapes == ref_shapes
        assert not list(ours.buffers())  # nothing outside the checkpoint is registered


def _norms(module: torch.nn.Module) -> dict[str, tuple]:
    return {name: (type(m).__name__, getattr(m, "num_groups", None), m.eps)
            for name, m in module.named_modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))}


def test_norm_layers_match() -> None:
    """Every GroupNorm / LayerNorm has diffusers' eps and group count (1e-6 in Transformer2D's
    GroupNorm and in the whole VAE decoder, norm_eps in UNet resnets, 1e-5 in LayerNorms)."""
    for cfg in (TINY_UNET, SDXL_LIKE_UNET):  # SDXL_LIKE_UNET has norm_eps 1e-4, unlike every fixed eps
        ours, ref = UNet2DConditional(cfg), _diffusers().UNet2DConditionModel(**cfg.to_diffusers())
        assert _norms(ours) == _norms(ref)
    ref_vae = _diffusers().AutoencoderKL(**TINY_VAE.to_diffusers())
    want = {k: v for k, v in _norms(ref_vae).items() if not k.startswith(VAEDecoder.IGNORED_PREFIXES)}
    assert _norms(VAEDecoder(TINY_VAE)) == want


def test_unet_timestep_forms_agree() -> None:
    """A scalar float, a 0-dim tensor and a [B] tensor of the same value give the same output."""
    ours, _ = _pair_unet(TINY_UNET, seed=3)
    sample, context, pooled, time_ids = _unet_inputs(TINY_UNET, batch=2, h=8, w=12, tokens=3, seed=4)
    with torch.no_grad():
        outs = [ours(sample, t, context, pooled, time_ids)
                for t in (421.0, torch.tensor(421.0), torch.tensor([421.0, 421.0]), torch.tensor([421]))]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)


def test_unet_meta_construction_and_assign_load() -> None:
    ref = _diffusers().UNet2DConditionModel(**TINY_UNET.to_diffusers())
    _randomize(ref, seed=5)
    with torch.device("meta"):
        ours = UNet2DConditional(TINY_UNET)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    assert all(p.device.type == "cpu" for p in ours.parameters())


def test_real_unet_param_count() -> None:
    """The SDXL-type decoder UNet with cross_attention_dim 1792 (docs/model_spec.md §1.6): 2,525,520,644 params."""
    with torch.device("meta"):
        ours = UNet2DConditional(UNetConfig())
    assert sum(p.numel() for p in ours.parameters()) == 2_525_520_644


def test_sdxl_time_ids() -> None:
    """[orig_h, orig_w, crop_top, crop_left, h, w] with the official pipeline's defaults original_size
    = [1024, 1024] and crop_info = [0, 0] at every output size (docs/model_spec.md §1.6): only the target changes."""
    ids = sdxl_time_ids(1024, 768, 2, torch.bfloat16, crop=(3, 4))
    assert ids.dtype == torch.bfloat16 and ids.shape == (2, 6)
    assert ids.tolist() == [[1024, 1024, 3, 4, 1024, 768]] * 2
    assert sdxl_time_ids(1024, 1024, 1, torch.float32).tolist() == [[1024, 1024, 0, 0, 1024, 1024]]
    assert sdxl_time_ids(64, 96, 1, torch.float32).tolist() == [[1024, 1024, 0, 0, 64, 96]]
    assert sdxl_time_ids(64, 96, 1, torch.float32, original_size=(64, 96)).tolist() == [[64, 96, 0, 0, 64, 96]]


# ------------------------------------------------------------------------------------------------ VAE


def _pair_vae(cfg: VAEConfig, seed: int):
    ref = _diffusers().AutoencoderKL(**cfg.to_diffusers()).eval()
    _randomize(ref, seed)
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith(VAEDecoder.IGNORED_PREFIXES)}
    ours = VAEDecoder(cfg).eval()
    ours.load_state_dict(sd, strict=True)
    return ours, ref


@pytest.mark.parametrize("cfg", [TINY_VAE, dataclasses.replace(TINY_VAE, block_out_channels=(8, 16, 24, 24),
                                                                layers_per_block=2)], ids=["3-level", "4-level"])
def test_vae_decoder_matches_diffusers(cfg: VAEConfig) -> None:
    ours, ref = _pair_vae(cfg, seed=6)
    z = torch.randn(2, cfg.latent_channels, 5, 7, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = ref.decode(z).sample
        got = ours(z)
    f = cfg.scale_factor
    assert got.shape == want.shape == (2, 3, 5 * f, 7 * f)
    assert want.abs().max() > 0.1
    assert _max_rel_err(got, want) < REL_TOL


def test_vae_decoder_keys_equal_diffusers_minus_encoder() -> None:
    ref = _diffusers().AutoencoderKL(**TINY_VAE.to_diffusers())
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()
            if not k.startswith(VAEDecoder.IGNORED_PREFIXES)}
    dropped = [k for k in ref.state_dict() if k.startswith(VAEDecoder.IGNORED_PREFIXES)]
    assert dropped and all(k.startswith(("encoder.", "quant_conv.")) for k in dropped)
    ours = VAEDecoder(TINY_VAE)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want
    assert not list(ours.buffers())


def test_real_vae_decoder_param_count() -> None:
    """SDXL VAE (docs/model_spec.md §4): decoder + post_quant_conv ≈ 49.5 M of ≈ 83.6 M; diffusers agrees exactly."""
    with torch.device("meta"):
        ours = VAEDecoder(VAEConfig())
        ref = _diffusers().AutoencoderKL(**VAEConfig().to_diffusers())
    n_ours = sum(p.numel() for p in ours.parameters())
    n_ref = sum(p.numel() for k, p in ref.named_parameters() if not k.startswith(VAEDecoder.IGNORED_PREFIXES))
    assert n_ours == n_ref == 49_490_199
    assert sum(p.numel() for p in ref.parameters()) == 83_653_863


def test_to_uint8_matches_diffusers_postprocess() -> None:
    _diffusers()
    from diffusers.image_processor import VaeImageProcessor

    gen = torch.Generator().manual_seed(8)
    images = torch.randn(2, 3, 5, 6, generator=gen) * 0.8
    # Values whose x*255 lands on .5 after (x/2+0.5): round-half-even must agree with numpy.
    images[0, 0, 0, :4] = torch.tensor([1 / 255 - 1, 3 / 255 - 1, -1.5, 1.5])
    for dtype in (torch.float32, torch.bfloat16):
        x = images.to(dtype)
        want = VaeImageProcessor(do_normalize=True).postprocess(x, output_type="np")
        want = torch.from_numpy((want * 255).round().astype("uint8"))
        got = to_uint8(x)
        assert got.dtype == torch.uint8 and got.shape == (2, 5, 6, 3)
        assert torch.equal(got, want), dtype
