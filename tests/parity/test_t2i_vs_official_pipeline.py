"""End-to-end text-to-image: the engine vs the official pipeline rebuilt from the oracles.

The oracle follows the official code path step by step (docs/model_spec.md §1.2-1.6): transformers' Qwen2.5-VL
language model over `embed(prompt) + embed([IMG]) + latent_queries` with no position ids, diffusers'
PixArtAlphaTextProjection + LuminaNextDiT2DModel under FlowMatchEulerDiscreteScheduler with
`sigmas=linspace(1, 1/S, S)` and int-truncated timesteps (CFG uncond-first, zeros null), then
diffusers' UNet2DConditionModel + EulerDiscreteScheduler (CFG cond-first, null = stage 1 on " ")
and AutoencoderKL, all loaded from the same tiny checkpoint directory. Same noise, fp32.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from blip3o_engine import ImageParams
from blip3o_engine.prompts import T2I_TEMPLATE

transformers = pytest.importorskip("transformers")

# fp32 with different kernels and summation orders in every stage: features agree to ~1e-6
# relative; 1e-4 relative is far below what a wrong step, order or null would cause (> 1e-1).
REL_TOL = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


class OfficialPipeline:
    """The official inference path, written with transformers/diffusers modules (test oracle)."""

    def __init__(self, ckpt, special):
        from diffusers import (AutoencoderKL, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
                               LuminaNextDiT2DModel, UNet2DConditionModel)
        from diffusers.models.embeddings import PixArtAlphaTextProjection
        from safetensors import safe_open
        from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        raw = json.loads((ckpt / "config.json").read_text())
        self.tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
        self.special = special
        self.llm = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            str(ckpt), config=Qwen2_5_VLConfig.from_dict(raw), dtype=torch.float32).eval()
        index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
        dit_sd, self.queries = {}, None
        for key, shard in index.items():
            with safe_open(str(ckpt / shard), "pt") as f:
                if key.startswith("model.dit.model."):
                    dit_sd[key.removeprefix("model.dit.model.")] = f.get_tensor(key)
                elif key == "model.latent_queries":
                    self.queries = f.get_tensor(key)  # [1, Q, H]
        d = raw["dit_config"]
        self.proj = PixArtAlphaTextProjection(d["caption_dim"], d["hidden_size"], act_fn="gelu_tanh").eval()
        self.proj.load_state_dict({k.removeprefix("caption_projection."): v for k, v in dit_sd.items()
                                   if k.startswith("caption_projection.")})
        multiple_of = 32  # the tiny preset's FFN rounding (config.lumina_ffn_hidden_size(64, 32))
        self.dit = LuminaNextDiT2DModel(
            sample_size=d["input_size"], patch_size=1, in_channels=d["in_channels"], hidden_size=d["hidden_size"],
            num_layers=d["num_layers"], num_attention_heads=d["num_heads"], num_kv_heads=d["num_kv_heads"],
            multiple_of=multiple_of, norm_eps=d["norm_eps"], learn_sigma=False, qk_norm=True,
            cross_attention_dim=d["hidden_size"]).eval()
        missing = self.dit.load_state_dict(dit_sd, strict=False).missing_keys
        assert missing == ["pad_token"]  # diffusers' unused parameter, not in BLIP3-o checkpoints
        self.head_dim = d["hidden_size"] // d["num_heads"]
        self.flow = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        dec = ckpt / "diffusion-decoder"
        self.unet = UNet2DConditionModel.from_pretrained(str(dec / "unet"), variant="bf16",
                                                         torch_dtype=torch.float32).eval()
        self.vae = AutoencoderKL.from_pretrained(str(dec / "vae"), variant="bf16", torch_dtype=torch.float32).eval()
        self.euler = EulerDiscreteScheduler.from_pretrained(str(dec / "scheduler"))

    @torch.no_grad()
    def stage1_states(self, text: str) -> torch.Tensor:
        ids = self.tokenizer([text], return_tensors="pt").input_ids
        lm = self.llm.model.language_model
        embeds = torch.cat([lm.embed_tokens(ids), lm.embed_tokens(torch.tensor([[self.special.img_start]])),
                            self.queries], dim=1)
        out = lm(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long))
        return out.last_hidden_state[:, -self.queries.shape[1]:]  # post-norm, as hidden_states[-1]

    @torch.no_grad()
    def stage1_sample(self, cond: torch.Tensor, noise: torch.Tensor, steps=30, guidance=3.0) -> torch.Tensor:
        from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

        s = noise.shape[-1]
        rope = get_2d_rotary_pos_embed_lumina(self.head_dim, s, s)
        self.flow.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))
        caption = self.proj(torch.cat([torch.zeros_like(cond), cond]))  # uncond first
        mask = torch.ones(caption.shape[:2], dtype=torch.int32)
        latents = noise.clone()
        for t in self.flow.timesteps:
            x = torch.cat([latents, latents])
            tt = t.expand(x.shape[0]).to(torch.long)
            v = self.dit(x, tt, caption, mask, rope, cross_attention_kwargs={}).sample
            v_u, v_c = v.chunk(2)
            latents = self.flow.step(v_u + guidance * (v_c - v_u), t, latents).prev_sample
        return latents.flatten(2).permute(0, 2, 1)  # [1, Q, C]

    @torch.no_grad()
    def decode(self, feats, uncond, noise, steps=50, guidance=3.0) -> np.ndarray:
        f = 2 ** (len(self.vae.config.block_out_channels) - 1)
        h, w = noise.shape[-2] * f, noise.shape[-1] * f
        embeds = torch.cat([feats, uncond])  # cond first (pipeline_llava_gen)
        # time_ids = original_size + crop_info + [height, width] with the pipeline's defaults
        # original_size=[1024, 1024], crop_info=[0, 0], whatever the output size (docs/model_spec.md §1.6).
        added = {"time_ids": torch.tensor([[1024, 1024, 0, 0, h, w]] * 2, dtype=torch.float32),
                 "text_embeds": embeds.mean(dim=1)}
        self.euler.set_timesteps(steps)
        latents = noise * self.euler.init_noise_sigma
        for t in self.euler.timesteps:
            x = self.euler.scale_model_input(torch.cat([latents, latents]), t)
            eps = self.unet(x, t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
            e_c, e_u = eps.chunk(2)
            latents = self.euler.step(e_u + guidance * (e_c - e_u), t, latents).prev_sample
        image = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        return (image * 255).round().astype("uint8")


@pytest.fixture(scope="module")
def oracle(tiny_dir, tiny_engine):
    """The official pipeline; its tests skip where diffusers is missing (the GPU machine has none), the
    engine-only test below runs anyway."""
    pytest.importorskip("diffusers", reason="diffusers (the oracle) is not installed")
    return OfficialPipeline(tiny_dir, tiny_engine.special)


def seed_noise(engine, seed, height=None, width=None):
    """The engine's documented noise stream for one image: DiT noise, then UNet noise."""
    cfg = engine.cfg
    gen = torch.Generator().manual_seed(seed)
    dit = torch.randn(1, cfg.dit.in_channels, cfg.dit.input_size, cfg.dit.input_size, generator=gen)
    f = cfg.vae.scale_factor
    height, width = height or cfg.default_image_size, width or cfg.default_image_size
    unet = torch.randn(1, cfg.unet.in_channels, height // f, width // f, generator=gen)
    return dit, unet


def test_stage1_prefill_matches(tiny_engine, oracle):
    ours = tiny_engine.encode_prompt("a red apple")
    expected = oracle.stage1_states(T2I_TEMPLATE.format(prompt="a red apple"))[0]
    assert rel_err(ours, expected) < REL_TOL


def test_uncond_features_match(tiny_engine, oracle):
    """The decoder's null: stage 1 on the raw text " " (no template), seed-0 noise, cached."""
    states = oracle.stage1_states(" ")
    dit_noise, _ = seed_noise(tiny_engine, 0)
    expected = oracle.stage1_sample(states, dit_noise)
    ours = tiny_engine.uncond_features()
    assert rel_err(ours, expected) < REL_TOL
    assert tiny_engine.uncond_features() is ours  # computed once per engine


def test_generate_image_matches_official_pipeline(tiny_engine, oracle):
    seed = 7
    result = tiny_engine.generate_image("a red apple", ImageParams(seed=seed))
    dit_noise, unet_noise = seed_noise(tiny_engine, seed)
    states = oracle.stage1_states(T2I_TEMPLATE.format(prompt="a red apple"))
    feats = oracle.stage1_sample(states, dit_noise)
    assert rel_err(result.clip_features, feats[0]) < REL_TOL
    uncond = oracle.stage1_sample(oracle.stage1_states(" "), seed_noise(tiny_engine, 0)[0])
    expected = oracle.decode(feats, uncond, unet_noise)[0]
    ours = np.asarray(result.image)
    assert ours.shape == expected.shape == (64, 64, 3)
    # uint8 after round(x*255): fp32 differences of ~1e-6 can flip a value sitting on a .5 boundary
    # by one level; anything systematic shows up as many pixels or as larger differences.
    diff = np.abs(ours.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


@pytest.fixture(scope="module")
def optimized_engine(tiny_dir):
    from blip3o_engine import Engine

    return Engine.from_pretrained(str(tiny_dir), device="cpu", dtype="float32", backend="optimized")


@pytest.mark.parametrize("backend", ["reference", "optimized"])
def test_non_native_size_matches_official_pipeline(tiny_engine, optimized_engine, oracle, backend):
    """A size other than the native one (tiny: 64²) and other than 1024²: the decoder's SDXL
    micro-conditioning must be the pipeline's [1024, 1024, 0, 0, h, w]; [h, w, 0, 0, h, w] moved
    pixels of this image by up to 63 uint8 levels. Few steps keep it fast; any step count shows it."""
    engine = tiny_engine if backend == "reference" else optimized_engine
    seed, height, width, steps, dit_steps = 11, 48, 80, 6, 4
    params = ImageParams(seed=seed, height=height, width=width, dit_steps=dit_steps, decoder_steps=steps)
    result = engine.generate_image("a blue car", params)
    dit_noise, unet_noise = seed_noise(engine, seed, height, width)
    feats = oracle.stage1_sample(oracle.stage1_states(T2I_TEMPLATE.format(prompt="a blue car")), dit_noise,
                                 steps=dit_steps)
    assert rel_err(result.clip_features, feats[0]) < REL_TOL
    # The engine's null: stage 1 on " " from seed 0 with the request's DiT settings.
    uncond = oracle.stage1_sample(oracle.stage1_states(" "), seed_noise(engine, 0)[0], steps=dit_steps)
    expected = oracle.decode(feats, uncond, unet_noise, steps=steps)[0]
    ours = np.asarray(result.image)
    assert ours.shape == expected.shape == (height, width, 3)
    diff = np.abs(ours.astype(int) - expected.astype(int))  # tolerance as in the native-size test
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def test_stage_methods_compose_to_generate_image(tiny_engine):
    params = ImageParams(seed=3, dit_steps=5, decoder_steps=4)
    whole = tiny_engine.generate_image("a small house", params)
    dit_noise, unet_noise = seed_noise(tiny_engine, 3)
    cond = tiny_engine.encode_prompt("a small house")
    feats = tiny_engine.sample_clip_features(cond[None], params, noise=dit_noise)
    torch.testing.assert_close(feats[0], whole.clip_features, rtol=0, atol=0)
    pics = tiny_engine.decode_pixels(feats, params, noise=unet_noise)
    assert np.array_equal(np.asarray(pics[0]), np.asarray(whole.image))
