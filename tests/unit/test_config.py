"""Model configuration: presets against the spec, config.json / diffusers config parsing, validation."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json

import pytest
import torch

from blip3o_engine import config as config_mod
from blip3o_engine.config import (
    PRESETS,
    DiTConfig,
    EulerSchedulerConfig,
    ModelConfig,
    TextConfig,
    UNetConfig,
    VAEConfig,
    VisionConfig,
    device_from_name,
    dtype_from_name,
    lumina_ffn_hidden_size,
    model_config,
    preset_config,
)
from blip3o_engine.errors import CheckpointNotFoundError, ConfigError, InputError



def _diffusers():
    """diffusers, the oracle of the checks that build its classes; only those tests skip where it is
    missing (the GPU machine has none), the config tests around them run anyway."""
    return pytest.importorskip("diffusers", reason="diffusers (the oracle) is not installed")


REAL_VOCAB = 151668  # BLIP3o checkpoints: Qwen2.5's vocabulary plus 3 added tokens (docs/model_spec.md §2)

# ------------------------------------------------------------------------------------------------
# Stock config files, as published (stabilityai/stable-diffusion-xl-base-1.0, diffusers 0.19/0.20
# serializations). Emu2-Gen's decoder, which BLIP3-o ships, is this UNet with 1792-wide conditioning
# (docs/model_spec.md §1.6).

SDXL_UNET = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0", "act_fn": "silu",
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "center_input_sample": False,
    "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}
EMU2_UNET = {**SDXL_UNET, "_diffusers_version": "0.21.2", "cross_attention_dim": 1792,
             "projection_class_embeddings_input_dim": 1792 + 6 * 256, "attention_type": "default", "dropout": 0.0}
SDXL_VAE = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.20.0.dev0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 1024, "scaling_factor": 0.13025, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
    "use_karras_sigmas": False,
}

# Qwen/Qwen2.5-VL-7B-Instruct config.json (transformers 4.x flat layout).
QWEN_7B_CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 128000,
    "max_window_layers": 28, "model_type": "qwen2_5_vl", "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 152064,
}


# ------------------------------------------------------------------------------------------------
# Presets


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_builds(name: str) -> None:
    cfg = preset_config(name, vocab_size=537)
    assert cfg.name == name and cfg.can_generate_images
    assert cfg.text.vocab_size == 537


def test_small_presets_need_a_vocab_size() -> None:
    with pytest.raises(ConfigError, match="vocab_size"):
        preset_config("tiny")


def test_unknown_preset_is_refused() -> None:
    with pytest.raises(ConfigError, match="'13b'"):
        preset_config("13b")


# docs/model_spec.md §2 table: hidden / intermediate / layers / q heads / kv heads / tie_word_embeddings.
SPEC_LLM = {"4b": (2048, 11008, 36, 16, 2, True), "8b": (3584, 18944, 28, 28, 4, False)}


@pytest.mark.parametrize("name", ["4b", "8b"])
def test_real_presets_match_spec(name: str) -> None:
    cfg = preset_config(name)
    hidden, inter, layers, heads, kv, tie = SPEC_LLM[name]
    t = cfg.text
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads,
            t.num_key_value_heads, t.tie_word_embeddings) == (hidden, inter, layers, heads, kv, tie)
    assert t.vocab_size == REAL_VOCAB and t.head_dim == 128
    assert t.mrope_section == (16, 24, 24) and t.rope_theta == 1e6 and t.rms_norm_eps == 1e-6

    v = cfg.vision  # docs/model_spec.md §2 "vision" row
    assert (v.depth, v.hidden_size, v.num_heads, v.head_dim, v.intermediate_size) == (32, 1280, 16, 80, 3420)
    assert (v.patch_size, v.temporal_patch_size, v.spatial_merge_size, v.window_size) == (14, 2, 2, 112)
    assert v.fullatt_block_indexes == (7, 15, 23, 31) and v.out_hidden_size == hidden

    d = cfg.dit  # docs/model_spec.md §1.4: 1792 wide, 24 layers, 28 heads, FFN 4864, caption projection from the LLM
    assert (d.hidden_size, d.num_layers, d.num_heads, d.ffn_hidden_size) == (1792, 24, 28, 4864)
    assert d.in_channels == 1792 and d.caption_dim == hidden and d.time_embed_dim == 1024
    assert d.num_tokens == cfg.n_query == 64

    u = cfg.unet  # docs/model_spec.md §1.6: SDXL-base UNet with 1792-wide conditioning
    assert u.block_out_channels == (320, 640, 1280) and u.layers_per_block == 2
    assert u.transformer_layers_per_block == (1, 2, 10) and u.num_attention_heads == (5, 10, 20)
    assert u.cross_attention_dim == 1792 and u.projection_class_embeddings_input_dim == 3328
    assert u.addition_time_embed_dim == 256 and u.use_linear_projection and u.sample_size == 128
    assert u.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    assert cfg.vae.block_out_channels == (128, 256, 512, 512) and cfg.vae.scaling_factor == 0.13025
    assert cfg.default_image_size == 1024

    s = cfg.decoder_scheduler  # docs/model_spec.md §1.6: stock SDXL-base Euler config
    assert (s.beta_start, s.beta_end, s.beta_schedule, s.timestep_spacing, s.steps_offset) == (
        0.00085, 0.012, "scaled_linear", "leading", 1)


def test_real_presets_equal_stock_config_files() -> None:
    """The 8b preset's decoder is what Emu2-Gen's files say."""
    cfg = preset_config("8b")
    assert UNetConfig.from_diffusers(EMU2_UNET) == cfg.unet
    assert VAEConfig.from_diffusers(SDXL_VAE) == cfg.vae
    assert EulerSchedulerConfig.from_diffusers(SDXL_SCHEDULER) == cfg.decoder_scheduler


def test_lumina_ffn_width() -> None:
    assert lumina_ffn_hidden_size(1792) == 4864  # what the released DiT stores (docs/model_spec.md §1.4)
    assert lumina_ffn_hidden_size(448) == 1280  # 2/3 * 1792 = 1194.67 -> next multiple of 256


# ------------------------------------------------------------------------------------------------
# Root config.json


def test_hf_dict_round_trip() -> None:
    for name in PRESETS:
        cfg = preset_config(name, vocab_size=537)
        raw = json.loads(json.dumps(cfg.to_hf_dict({"image_token_id": 7})))  # through real JSON
        back = ModelConfig.from_hf_dict(raw, cfg.unet, cfg.vae, cfg.decoder_scheduler, name=name)
        assert back == cfg


def test_from_checkpoint_is_the_tiny_preset(tiny_dir) -> None:
    cfg = ModelConfig.from_checkpoint(tiny_dir)
    assert cfg.name == tiny_dir.name
    assert dataclasses.replace(cfg, name="tiny") == preset_config("tiny", vocab_size=cfg.text.vocab_size)


def _nested_like_transformers5(raw: dict) -> dict:
    """transformers >= 5 layout: LLM fields under `text_config`, rope settings in `rope_parameters`."""
    text_keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings")
    out = {k: v for k, v in raw.items() if k not in text_keys + ("rope_scaling", "rope_theta")}
    text = {k: raw[k] for k in text_keys}
    text["rope_parameters"] = {**raw["rope_scaling"], "rope_theta": raw["rope_theta"]}
    return {**out, "text_config": text}


def test_transformers5_nested_config_parses() -> None:
    cfg = preset_config("tiny", vocab_size=537)
    raw = _nested_like_transformers5(cfg.to_hf_dict())
    assert "hidden_size" not in raw and "rope_scaling" not in raw
    assert ModelConfig.from_hf_dict(raw, cfg.unet, cfg.vae, cfg.decoder_scheduler, name="tiny") == cfg


def test_config_written_by_transformers5_parses() -> None:
    """What transformers' own Qwen2_5_VLConfig.to_dict() writes (a re-saved plain Qwen2.5-VL)."""
    from transformers import Qwen2_5_VLConfig

    text = dict(vocab_size=537, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=2048, rope_theta=1e6,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    vision = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, fullatt_block_indexes=[2],
                  out_hidden_size=64)
    raw = Qwen2_5_VLConfig(text_config=text, vision_config=vision).to_dict()
    cfg = ModelConfig.from_hf_dict(raw, None, None, None)
    assert cfg.text == TextConfig(**{k: v for k, v in text.items() if k != "rope_scaling"}, mrope_section=(2, 3, 3))
    assert cfg.vision == VisionConfig(depth=3, hidden_size=32, intermediate_size=48, num_heads=2,
                                      fullatt_block_indexes=(2,), out_hidden_size=64)
    assert cfg.dit is None and not cfg.can_generate_images


def test_transformers5_rope_theta_is_read() -> None:
    raw = _nested_like_transformers5({**preset_config("tiny", vocab_size=537).to_hf_dict(), "rope_theta": 5e5})
    assert ModelConfig.from_hf_dict(raw, None, None, None).text.rope_theta == 5e5


def test_plain_qwen2_5_vl_is_chat_only() -> None:
    cfg = ModelConfig.from_hf_dict(copy.deepcopy(QWEN_7B_CONFIG), UNetConfig(), VAEConfig(), None)
    assert cfg.dit is None and cfg.unet is None and cfg.vae is None and not cfg.can_generate_images
    with pytest.raises(ConfigError, match="no pixel decoder"):
        cfg.default_image_size
    real = preset_config("8b")
    assert cfg.text == dataclasses.replace(real.text, vocab_size=152064)
    assert cfg.vision == real.vision


def test_unknown_model_type_is_named(tmp_path) -> None:
    raw = {**preset_config("tiny", vocab_size=537).to_hf_dict(), "model_type": "llava_llama"}
    with pytest.raises(ConfigError, match="llava_llama"):
        ModelConfig.from_hf_dict(raw, None, None, None)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="llava_llama"):
        ModelConfig.from_checkpoint(tmp_path)


def test_missing_and_malformed_config_files(tmp_path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        ModelConfig.from_checkpoint(tmp_path / "absent")
    with pytest.raises(CheckpointNotFoundError, match="config.json"):
        ModelConfig.from_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_checkpoint(tmp_path)


# ------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("build, match", [
    (lambda: TextConfig(hidden_size=64, num_attention_heads=4, mrope_section=(2, 3, 4)), "mrope_section"),
    (lambda: TextConfig(hidden_size=100, num_attention_heads=3, num_key_value_heads=1), "not divisible"),
    (lambda: TextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=3, mrope_section=(2, 3, 3)),
     "GQA"),
    (lambda: VisionConfig(depth=4, fullatt_block_indexes=(1, 4)), "fullatt"),
    (lambda: DiTConfig(hidden_size=96, num_heads=5), "num_heads"),
    (lambda: DiTConfig(num_kv_heads=4), "MHA"),
    (lambda: UNetConfig(up_block_types=("CrossAttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")), "AttnUpBlock2D"),
    (lambda: EulerSchedulerConfig(prediction_type="v_prediction"), "epsilon"),
    (lambda: EulerSchedulerConfig(use_karras_sigmas=True), "Karras"),
    (lambda: dataclasses.replace(preset_config("8b"), n_query=32), "n_query"),
    (lambda: dataclasses.replace(preset_config("8b"), vision=VisionConfig(out_hidden_size=2048)), "out_hidden_size"),
    (lambda: dataclasses.replace(preset_config("8b"), unet=UNetConfig(cross_attention_dim=2048)),
     "cross_attention_dim"),
    (lambda: dataclasses.replace(preset_config("8b"), model_type="qwen3"), "qwen3"),
])
def test_invalid_configs_are_refused(build, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build()


def test_configs_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        preset_config("8b").text.hidden_size = 1


@pytest.mark.parametrize("name, expected", [
    ("float32", torch.float32), ("fp32", torch.float32), ("float", torch.float32), ("FP16", torch.float16),
    ("half", torch.float16), ("bfloat16", torch.bfloat16), ("BF16", torch.bfloat16), (torch.bfloat16, torch.bfloat16),
])
def test_dtype_from_name_accepts(name, expected) -> None:
    assert dtype_from_name(name) is expected


@pytest.mark.parametrize("name", ["int8", "float64", "fp8", "", torch.int8, torch.float64])
def test_dtype_from_name_rejects(name) -> None:
    with pytest.raises(ConfigError, match="unsupported dtype"):
        dtype_from_name(name)


@pytest.mark.parametrize("name", ["cpu", "CPU", torch.device("cpu")])
def test_device_from_name_accepts(name) -> None:
    assert device_from_name(name) == torch.device("cpu")


@pytest.mark.parametrize("name", ["tpu", "gpu", "cuda:x", "meta", "mps", "", None, 3.5])
def test_device_from_name_rejects_with_the_valid_devices(name) -> None:
    with pytest.raises(ConfigError, match="unsupported device .*; use cpu, cuda or cuda:N"):
        device_from_name(name)


def test_cuda_device_checks() -> None:
    if torch.cuda.is_available():
        assert device_from_name("cuda").type == "cuda"
        with pytest.raises(ConfigError, match="does not exist"):
            device_from_name(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(ConfigError, match="'cuda:1' requested but CUDA is not available"):
            device_from_name("cuda:1")


def test_model_config_reads_without_weights(tiny_dir, tmp_path) -> None:
    assert model_config(tiny_dir) == ModelConfig.from_checkpoint(tiny_dir)
    assert model_config("8B") == preset_config("8b")
    with pytest.raises(CheckpointNotFoundError, match="neither a checkpoint directory nor a preset"):
        model_config(tmp_path / "missing")


def test_image_size_rule() -> None:
    cfg = preset_config("8b")
    assert cfg.image_size_step == 32 and cfg.image_size(None, None) == (1024, 1024)
    assert cfg.image_size(512, 4096) == (512, 4096)
    with pytest.raises(InputError, match="multiples of 32, got 1024x1000"):
        cfg.image_size(None, 1000)


# ------------------------------------------------------------------------------------------------
# diffusers config files (unet/, vae/, scheduler/)


def test_stock_decoder_configs_pass() -> None:
    unet = UNetConfig.from_diffusers(SDXL_UNET)
    assert unet == UNetConfig(cross_attention_dim=2048, projection_class_embeddings_input_dim=2816)
    assert unet.upcast_attention is False  # SDXL says null
    assert UNetConfig.from_diffusers(EMU2_UNET) == UNetConfig()
    assert VAEConfig.from_diffusers(SDXL_VAE) == VAEConfig()
    assert EulerSchedulerConfig.from_diffusers(SDXL_SCHEDULER) == EulerSchedulerConfig()


@pytest.mark.parametrize("name", ["tiny", "small", "8b"])
def test_to_diffusers_round_trips(name: str) -> None:
    cfg = preset_config(name, vocab_size=537)
    assert UNetConfig.from_diffusers(json.loads(json.dumps(cfg.unet.to_diffusers()))) == cfg.unet
    assert VAEConfig.from_diffusers(json.loads(json.dumps(cfg.vae.to_diffusers()))) == cfg.vae
    sched = cfg.decoder_scheduler
    assert EulerSchedulerConfig.from_diffusers(json.loads(json.dumps(sched.to_diffusers()))) == sched


def test_configs_as_diffusers_042_saves_them_pass() -> None:
    """diffusers writes every __init__ field (defaults included) into config.json: all must pass."""
    cfg = preset_config("tiny", vocab_size=537)
    unet = _diffusers().UNet2DConditionModel(**cfg.unet.to_diffusers())
    vae = _diffusers().AutoencoderKL(**cfg.vae.to_diffusers())
    sched = _diffusers().EulerDiscreteScheduler.from_config(cfg.decoder_scheduler.to_diffusers())
    # to_json_string() is what save_config / save_pretrained write as config.json.
    assert UNetConfig.from_diffusers(json.loads(unet.to_json_string())) == cfg.unet
    assert VAEConfig.from_diffusers(json.loads(vae.to_json_string())) == cfg.vae
    assert EulerSchedulerConfig.from_diffusers(json.loads(sched.to_json_string())) == cfg.decoder_scheduler


def test_scheduler_to_diffusers_loads_in_diffusers() -> None:
    cfg = EulerSchedulerConfig()
    sched = _diffusers().EulerDiscreteScheduler.from_config(cfg.to_diffusers())
    for f in dataclasses.fields(cfg):
        assert sched.config[f.name] == getattr(cfg, f.name), f.name


def test_absent_keys_take_diffusers_defaults() -> None:
    """A key missing from the file means diffusers' default (what diffusers would build), not SDXL's."""
    sched = _diffusers().EulerDiscreteScheduler.from_config({})
    ours = EulerSchedulerConfig.from_diffusers({"_class_name": "EulerDiscreteScheduler"})
    for f in dataclasses.fields(ours):
        assert getattr(ours, f.name) == sched.config[f.name], f.name
    vae = VAEConfig.from_diffusers({})
    ref = _diffusers().AutoencoderKL().config
    for f in dataclasses.fields(vae):
        assert getattr(vae, f.name) == (tuple(ref[f.name]) if isinstance(ref[f.name], list) else ref[f.name]), f.name
    no_heads = {k: v for k, v in SDXL_UNET.items() if k != "attention_head_dim"}
    assert UNetConfig.from_diffusers(no_heads).num_attention_heads == (8, 8, 8)
    with pytest.raises(ConfigError, match="text_time"):  # diffusers' default UNet is SD 1.x (no add-embedding)
        UNetConfig.from_diffusers({})


# (base config, field, value that changes the math). Each must be refused with the field and value named.
REJECTED = [
    *[(SDXL_SCHEDULER, k, v) for k, v in [
        ("rescale_betas_zero_snr", True), ("final_sigmas_type", "sigma_min"), ("timestep_type", "continuous"),
        ("use_exponential_sigmas", True), ("use_beta_sigmas", True), ("sigma_min", 0.03), ("sigma_max", 14.6),
        ("trained_betas", [0.001, 0.002])]],
    *[(EMU2_UNET, k, v) for k, v in [
        ("center_input_sample", True), ("act_fn", "gelu"), ("time_embedding_act_fn", "silu"),
        ("timestep_post_act", "silu"), ("mid_block_scale_factor", 2), ("resnet_out_scale_factor", 0.5),
        ("attention_type", "gated"), ("class_embed_type", "timestep"), ("encoder_hid_dim", 1792),
        ("only_cross_attention", True), ("only_cross_attention", [False, True, False]),
        ("dual_cross_attention", True), ("time_embedding_type", "fourier"),
        ("resnet_time_scale_shift", "scale_shift"), ("downsample_padding", 0), ("resnet_skip_time_act", True),
        ("cross_attention_norm", "group_norm"), ("time_cond_proj_dim", 256), ("conv_in_kernel", 1),
        ("num_class_embeds", 10), ("reverse_transformer_layers_per_block", [[10, 10, 10], [2, 2, 2], [1, 1, 1]])]],
    *[(SDXL_VAE, k, v) for k, v in [
        ("act_fn", "relu"), ("use_quant_conv", False), ("use_post_quant_conv", False),
        ("mid_block_add_attention", False), ("latents_mean", [0.0, 0.1, 0.2, 0.3]),
        ("latents_std", [1.0, 1.0, 1.0, 1.0]), ("shift_factor", 0.0609)]],
]
_PARSER = {id(SDXL_SCHEDULER): EulerSchedulerConfig, id(EMU2_UNET): UNetConfig, id(SDXL_VAE): VAEConfig}


@pytest.mark.parametrize("base, key, value", REJECTED, ids=[f"{k}={v!r}" for _, k, v in REJECTED])
def test_unmodelled_fields_that_change_the_math_are_refused(base: dict, key: str, value) -> None:
    parser = _PARSER[id(base)]
    with pytest.raises(ConfigError) as err:
        parser.from_diffusers({**base, key: value})
    assert key in str(err.value) and repr(value) in str(err.value)


def test_booleans_are_not_numbers() -> None:
    """`True == 1` in Python; a flag in a numeric field is still refused."""
    with pytest.raises(ConfigError, match="mid_block_scale_factor"):
        UNetConfig.from_diffusers({**EMU2_UNET, "mid_block_scale_factor": True})


def test_default_valued_unmodelled_fields_pass() -> None:
    """Explicit default values (as diffusers serializes them) and per-block lists of defaults pass."""
    UNetConfig.from_diffusers({**EMU2_UNET, "only_cross_attention": [False, False, False],
                               "mid_block_only_cross_attention": False, "resnet_out_scale_factor": 1})
    VAEConfig.from_diffusers({**SDXL_VAE, "use_quant_conv": True, "latents_mean": None, "shift_factor": None})
    EulerSchedulerConfig.from_diffusers({**SDXL_SCHEDULER, "final_sigmas_type": "zero", "sigma_min": None})


def test_other_unsupported_decoder_files() -> None:
    with pytest.raises(ConfigError, match="UNet2DModel"):
        UNetConfig.from_diffusers({**EMU2_UNET, "_class_name": "UNet2DModel"})
    with pytest.raises(ConfigError, match="transformer_layers_per_block"):
        UNetConfig.from_diffusers({**EMU2_UNET, "transformer_layers_per_block": [1, [2, 2], 10]})
    with pytest.raises(ConfigError, match="AttnUpDecoderBlock2D"):
        VAEConfig.from_diffusers({**SDXL_VAE, "up_block_types": ["AttnUpDecoderBlock2D"] * 4})
    with pytest.raises(ConfigError, match="DPMSolverMultistepScheduler"):
        EulerSchedulerConfig.from_diffusers({**SDXL_SCHEDULER, "_class_name": "DPMSolverMultistepScheduler"})


# The tables in config.py are diffusers 0.42's __init__ signatures; these checks catch drift (a new
# diffusers field we neither model nor pin) when diffusers is upgraded.
_HARMLESS = {
    "UNet2DConditionModel": {"sample_size", "dropout", "addition_embed_type_num_heads"},
    "AutoencoderKL": {"down_block_types", "up_block_types"},
    "EulerDiscreteScheduler": set(),
}
_TABLES = [
    ("UNet2DConditionModel", config_mod._UNET_DIFFUSERS_DEFAULTS, config_mod._UNET_FIXED),
    ("AutoencoderKL", config_mod._VAE_DIFFUSERS_DEFAULTS, config_mod._VAE_FIXED),
    ("EulerDiscreteScheduler", config_mod._EULER_DIFFUSERS_DEFAULTS, config_mod._EULER_FIXED),
]


@pytest.mark.parametrize("cls_name, defaults, fixed", _TABLES, ids=[t[0] for t in _TABLES])
def test_tables_match_installed_diffusers(cls_name: str, defaults: dict, fixed: dict) -> None:
    cls = getattr(_diffusers(), cls_name)
    params = {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self"}
    assert set(params) == set(defaults) | set(fixed) | _HARMLESS[cls_name]
    for key, value in defaults.items():
        assert value == params[key], key
    for key, accepted in fixed.items():
        assert accepted[0] == params[key], key
