"""Model configuration: a tree of frozen dataclasses, validated once at construction.

`ModelConfig` is built either from a checkpoint directory (`ModelConfig.from_checkpoint`: the
Qwen2.5-VL `config.json` plus the diffusers configs under `diffusion-decoder/`) or from a preset
(`preset_config("tiny" | "small" | "4b" | "8b")`). Shapes follow docs/model_spec.md §1.4 (DiT), §1.6 (decoder)
and §2 (Qwen2.5-VL). Nothing here touches tensors; derived runtime values (KV pool size, ...) live
elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointNotFoundError, ConfigError, InputError

# model_type values a BLIP3-o checkpoint may carry (docs/model_spec.md §3): the training class saves
# "blip3o_qwen", the inference class registers "blip3o_qwen_inference". Plain Qwen2.5-VL
# checkpoints load too (chat only: they have no latent queries / DiT).
BLIP3O_MODEL_TYPES = ("blip3o_qwen", "blip3o_qwen_inference")
QWEN_MODEL_TYPES = ("qwen2_5_vl",)
SUPPORTED_MODEL_TYPES = BLIP3O_MODEL_TYPES + QWEN_MODEL_TYPES


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _pick(cls, raw: dict[str, Any], renames: dict[str, str] | None = None, **overrides):
    """Build dataclass `cls` from the fields of `raw` it knows (other keys are ignored)."""
    renames = renames or {}
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        key = renames.get(key, key)
        if key in names:
            kwargs[key] = tuple(value) if isinstance(value, list) else value
    kwargs.update(overrides)
    return cls(**kwargs)


def _diffusers_raw(file: str, raw: dict[str, Any], defaults: dict[str, Any],
                   fixed: dict[str, tuple[Any, ...]]) -> dict[str, Any]:
    """A diffusers config.json as diffusers itself would read it, checked against what we implement.

    Absent keys take diffusers' `__init__` defaults (`defaults`), not ours: diffusers builds the
    model that way, so e.g. a VAE config without `scaling_factor` means 0.18215, not SDXL's 0.13025.
    `fixed` lists fields this engine does not model, each with the values it is correct for (the
    first is diffusers' default); any other value changes the math, so it is refused rather than
    silently ignored. A list value (diffusers allows per-block lists for some flags) must hold
    accepted values only.
    """
    for key, accepted in fixed.items():
        value = raw.get(key, accepted[0])
        items = value if isinstance(value, list) else [value]
        if not all(_same_value(v, accepted) for v in items):
            raise ConfigError(f"{file}: {key}={value!r} is not supported; this engine implements "
                              f"{key}={accepted[0]!r} only")
    return {**defaults, **raw}


def _same_value(value: Any, accepted: tuple[Any, ...]) -> bool:
    # `True == 1` and `0 == False` in Python: a bool only matches a bool.
    return any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in accepted)


# ------------------------------------------------------------------------------------------------
# Qwen2.5-VL language model (docs/model_spec.md §2)


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 151668
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    # M-RoPE: the head's rotary frequency pairs are split into (temporal, height, width) sections.
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 128000

    def __post_init__(self) -> None:
        _require(self.hidden_size % self.num_attention_heads == 0,
                 f"hidden_size {self.hidden_size} not divisible by heads {self.num_attention_heads}")
        _require(self.num_attention_heads % self.num_key_value_heads == 0,
                 "num_attention_heads must be a multiple of num_key_value_heads (GQA)")
        _require(sum(self.mrope_section) * 2 == self.head_dim,
                 f"mrope_section {self.mrope_section} must sum to head_dim/2 = {self.head_dim // 2}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


# ------------------------------------------------------------------------------------------------
# Qwen2.5-VL vision transformer (docs/model_spec.md §2)


@dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112  # pixels
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    out_hidden_size: int = 3584
    rms_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        _require(self.hidden_size % self.num_heads == 0, "vision hidden_size % num_heads != 0")
        _require(self.head_dim % 4 == 0, "vision head_dim must be divisible by 4 (2-D RoPE)")
        _require(all(0 <= i < self.depth for i in self.fullatt_block_indexes),
                 "fullatt_block_indexes out of range")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def merged_hidden_size(self) -> int:
        """Width of the merger's input: the 2×2 neighbouring patches concatenated."""
        return self.hidden_size * self.spatial_merge_size**2


# ------------------------------------------------------------------------------------------------
# NextDiT cross-attention DiT (docs/model_spec.md §1.4)


def lumina_ffn_hidden_size(dim: int, multiple_of: int = 256) -> int:
    """FFN width diffusers <= 0.32 LuminaFeedForward gives for inner_dim = 4*dim (docs/model_spec.md §1.4 note).

    2/3 of 4*dim, rounded up to a multiple of 256: 1792 -> 4864, which is what the released
    checkpoints store.
    """
    inner = int(2 * (4 * dim) / 3)
    return multiple_of * ((inner + multiple_of - 1) // multiple_of)


@dataclass(frozen=True)
class DiTConfig:
    input_size: int = 8  # latent grid is input_size x input_size
    patch_size: int = 1
    in_channels: int = 1792  # = CLIP feature width = out_channels
    hidden_size: int = 1792
    num_layers: int = 24
    num_heads: int = 28
    num_kv_heads: int = 28
    ffn_hidden_size: int = 4864
    norm_eps: float = 1e-5
    caption_dim: int = 3584  # LLM hidden size, projected to hidden_size by caption_projection
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        _require(self.hidden_size % self.num_heads == 0, "DiT hidden_size % num_heads != 0")
        _require(self.head_dim % 4 == 0, "DiT head_dim must be divisible by 4 (2-D RoPE)")
        _require(self.patch_size == 1, "only patch_size 1 is supported (the released DiT)")
        _require(self.num_kv_heads == self.num_heads, "the released DiT is plain MHA")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def time_embed_dim(self) -> int:
        """Width of the timestep/caption conditioning vector: min(hidden, 1024) (docs/model_spec.md §1.4)."""
        return min(self.hidden_size, 1024)

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2


# ------------------------------------------------------------------------------------------------
# SDXL-type decoder (docs/model_spec.md §1.6), field names as in diffusers' config.json


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    sample_size: int = 128
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    block_out_channels: tuple[int, ...] = (320, 640, 1280)
    layers_per_block: int = 2
    transformer_layers_per_block: tuple[int, ...] = (1, 2, 10)
    # diffusers quirk: for SDXL `attention_head_dim` holds the number of heads per block.
    num_attention_heads: tuple[int, ...] = (5, 10, 20)
    cross_attention_dim: int = 1792
    use_linear_projection: bool = True
    addition_embed_type: str = "text_time"
    addition_time_embed_dim: int = 256
    projection_class_embeddings_input_dim: int = 1792 + 6 * 256
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    upcast_attention: bool = False

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        _require(len(self.down_block_types) == n and len(self.up_block_types) == n,
                 "down/up block types must match block_out_channels")
        _require(len(self.transformer_layers_per_block) == n and len(self.num_attention_heads) == n,
                 "per-block lists must match block_out_channels")
        _require(self.addition_embed_type == "text_time", "only SDXL text_time conditioning")
        _require(self.mid_block_type == "UNetMidBlock2DCrossAttn", "unsupported mid block")
        for t in self.down_block_types:
            _require(t in ("DownBlock2D", "CrossAttnDownBlock2D"), f"unsupported down block {t}")
        for t in self.up_block_types:
            _require(t in ("UpBlock2D", "CrossAttnUpBlock2D"), f"unsupported up block {t}")

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @classmethod
    def from_diffusers(cls, raw: dict[str, Any]) -> UNetConfig:
        """Parse `unet/config.json`; ConfigError for anything the reference UNet does not implement."""
        file = "unet/config.json"
        _require(raw.get("_class_name", "UNet2DConditionModel") == "UNet2DConditionModel",
                 f"{file}: unsupported class {raw.get('_class_name')}")
        raw = _diffusers_raw(file, raw, _UNET_DIFFUSERS_DEFAULTS, _UNET_FIXED)
        # diffusers quirk: `num_attention_heads` is unused and `attention_head_dim` holds head counts.
        heads = raw.get("num_attention_heads") or raw["attention_head_dim"]
        n = len(raw["block_out_channels"])
        if isinstance(heads, int):
            heads = [heads] * n
        tlpb = raw["transformer_layers_per_block"]
        if isinstance(tlpb, int):
            tlpb = [tlpb] * n
        _require(all(isinstance(x, int) for x in tlpb),
                 f"{file}: per-layer transformer_layers_per_block {tlpb!r} is not supported")
        _require(raw["addition_embed_type"] == "text_time",
                 f"{file}: addition_embed_type={raw['addition_embed_type']!r} is not supported (SDXL text_time only)")
        for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim", "norm_num_groups"):
            _require(raw.get(key) is not None, f"{file}: {key} is required (got {raw.get(key)!r})")
        # SDXL's file says `upcast_attention: null`; diffusers treats it as False.
        return _pick(cls, raw, num_attention_heads=tuple(heads), transformer_layers_per_block=tuple(tlpb),
                     upcast_attention=bool(raw.get("upcast_attention")))

    def to_diffusers(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        d["attention_head_dim"] = d.pop("num_attention_heads")
        d.update(_class_name="UNet2DConditionModel", act_fn="silu", center_input_sample=False,
                 class_embed_type=None, encoder_hid_dim=None, time_embedding_type="positional",
                 resnet_time_scale_shift="default", only_cross_attention=False,
                 dual_cross_attention=False, num_attention_heads=None)
        return d


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.13025
    sample_size: int = 1024
    force_upcast: bool = True

    @property
    def scale_factor(self) -> int:
        """Pixel size of one latent cell (8 for the SDXL VAE)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, raw: dict[str, Any]) -> VAEConfig:
        """Parse `vae/config.json`; ConfigError for anything the reference decoder does not implement."""
        file = "vae/config.json"
        _require(raw.get("_class_name", "AutoencoderKL") == "AutoencoderKL",
                 f"{file}: unsupported class {raw.get('_class_name')}")
        raw = _diffusers_raw(file, raw, _VAE_DIFFUSERS_DEFAULTS, _VAE_FIXED)
        up = raw.get("up_block_types", ["UpDecoderBlock2D"] * len(raw["block_out_channels"]))
        _require(list(up) == ["UpDecoderBlock2D"] * len(raw["block_out_channels"]),
                 f"{file}: up_block_types={up!r} is not supported (one UpDecoderBlock2D per block)")
        return _pick(cls, raw)

    def to_diffusers(self) -> dict[str, Any]:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        n = len(self.block_out_channels)
        d.update(_class_name="AutoencoderKL", act_fn="silu",
                 down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n)
        return d


# ------------------------------------------------------------------------------------------------
# Samplers (docs/model_spec.md §1.5, §1.6)


@dataclass(frozen=True)
class FlowSchedulerConfig:
    """Stage 1: diffusers FlowMatchEulerDiscreteScheduler, Lumina-Next config (hard-coded by spec)."""

    num_train_timesteps: int = 1000
    shift: float = 1.0


@dataclass(frozen=True)
class EulerSchedulerConfig:
    """Stage 2: diffusers EulerDiscreteScheduler, SDXL-base config (diffusion-decoder/scheduler)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    interpolation_type: str = "linear"
    use_karras_sigmas: bool = False

    def __post_init__(self) -> None:
        _require(self.beta_schedule in ("scaled_linear", "linear"), f"beta_schedule {self.beta_schedule}")
        _require(self.prediction_type == "epsilon", "only epsilon prediction is supported")
        _require(self.timestep_spacing in ("leading", "trailing", "linspace"),
                 f"timestep_spacing {self.timestep_spacing}")
        _require(self.interpolation_type == "linear" and not self.use_karras_sigmas,
                 "only linear sigma interpolation without Karras sigmas is supported")

    @classmethod
    def from_diffusers(cls, raw: dict[str, Any]) -> EulerSchedulerConfig:
        """Parse `scheduler/scheduler_config.json`; ConfigError for sigma schedules we do not implement."""
        file = "scheduler/scheduler_config.json"
        _require(raw.get("_class_name", "EulerDiscreteScheduler") == "EulerDiscreteScheduler",
                 f"{file}: unsupported class {raw.get('_class_name')}")
        return _pick(cls, _diffusers_raw(file, raw, _EULER_DIFFUSERS_DEFAULTS, _EULER_FIXED))

    def to_diffusers(self) -> dict[str, Any]:
        return {"_class_name": "EulerDiscreteScheduler", **dataclasses.asdict(self),
                "trained_betas": None, "clip_sample": False, "set_alpha_to_one": False,
                "skip_prk_steps": True, "sample_max_value": 1.0, "timestep_type": "discrete",
                "rescale_betas_zero_snr": False, "final_sigmas_type": "zero"}


# ------------------------------------------------------------------------------------------------
# What the diffusers config files may say (diffusers 0.42 `__init__` signatures; a unit test checks
# these tables against the installed diffusers).

# Defaults diffusers uses for absent keys of the fields we model. UNet `sample_size` is left out:
# diffusers' default is None, and it only sets our default image size.
_UNET_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 4, "out_channels": 4, "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2, "norm_num_groups": 32,
    "norm_eps": 1e-5, "cross_attention_dim": 1280, "transformer_layers_per_block": 1,
    "attention_head_dim": 8, "num_attention_heads": None, "use_linear_projection": False,
    "addition_embed_type": None, "addition_time_embed_dim": None, "upcast_attention": False,
    "projection_class_embeddings_input_dim": None,
}
# Fields we do not model -> the values the reference UNet is correct for (first = diffusers' default).
# `dropout` and `addition_embed_type_num_heads` (used only by "text" conditioning) do not matter.
_UNET_FIXED: dict[str, tuple[Any, ...]] = {
    "center_input_sample": (False,), "act_fn": ("silu",), "downsample_padding": (1,),
    "mid_block_scale_factor": (1,), "resnet_out_scale_factor": (1.0,), "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,), "time_embedding_type": ("positional",), "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,), "timestep_post_act": (None,), "time_cond_proj_dim": (None,),
    "class_embed_type": (None,), "num_class_embeds": (None,), "class_embeddings_concat": (False,),
    "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,), "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False), "dual_cross_attention": (False,),
    "cross_attention_norm": (None,), "attention_type": ("default",), "conv_in_kernel": (3,),
    "conv_out_kernel": (3,), "reverse_transformer_layers_per_block": (None,),
}
_VAE_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (64,),
    "layers_per_block": 1, "norm_num_groups": 32, "scaling_factor": 0.18215, "sample_size": 32,
    "force_upcast": True,
}
_VAE_FIXED: dict[str, tuple[Any, ...]] = {
    "act_fn": ("silu",), "shift_factor": (None, 0, 0.0), "latents_mean": (None,), "latents_std": (None,),
    "use_quant_conv": (True,), "use_post_quant_conv": (True,), "mid_block_add_attention": (True,),
}
_EULER_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "prediction_type": "epsilon", "interpolation_type": "linear", "use_karras_sigmas": False,
    "timestep_spacing": "linspace", "steps_offset": 0,
}
_EULER_FIXED: dict[str, tuple[Any, ...]] = {
    "trained_betas": (None,), "use_exponential_sigmas": (False,), "use_beta_sigmas": (False,),
    "sigma_min": (None,), "sigma_max": (None,), "timestep_type": ("discrete",),
    "rescale_betas_zero_snr": (False,), "final_sigmas_type": ("zero",),
}


# ------------------------------------------------------------------------------------------------
# The whole model


@dataclass(frozen=True)
class ModelConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    dit: DiTConfig | None = field(default_factory=DiTConfig)  # None: a plain Qwen2.5-VL (chat only)
    unet: UNetConfig | None = field(default_factory=UNetConfig)
    vae: VAEConfig | None = field(default_factory=VAEConfig)
    flow_scheduler: FlowSchedulerConfig = field(default_factory=FlowSchedulerConfig)
    decoder_scheduler: EulerSchedulerConfig = field(default_factory=EulerSchedulerConfig)
    n_query: int = 64
    model_type: str = "blip3o_qwen"
    name: str = "custom"

    def __post_init__(self) -> None:
        _require(self.model_type in SUPPORTED_MODEL_TYPES,
                 f"unknown model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        _require(self.vision.out_hidden_size == self.text.hidden_size,
                 "vision out_hidden_size must equal the LLM hidden_size")
        if self.dit is not None:
            _require(self.dit.caption_dim == self.text.hidden_size, "DiT caption_dim must equal LLM hidden")
            _require(self.n_query == self.dit.num_tokens,
                     f"n_query {self.n_query} must equal the DiT's token count {self.dit.num_tokens}")
        if self.unet is not None and self.dit is not None:
            _require(self.unet.cross_attention_dim == self.dit.in_channels,
                     "UNet cross_attention_dim must equal the CLIP feature width (DiT in_channels)")
            _require(self.unet.projection_class_embeddings_input_dim
                     == self.dit.in_channels + 6 * self.unet.addition_time_embed_dim,
                     "UNet add-embedding input must be clip_dim + 6*addition_time_embed_dim")
        if self.unet is not None:
            _require(self.vae is not None, "a UNet needs a VAE")

    @property
    def can_generate_images(self) -> bool:
        return self.dit is not None and self.unet is not None and self.vae is not None

    @property
    def default_image_size(self) -> int:
        """Default output side in pixels: UNet sample_size x VAE scale (1024 for the real models)."""
        if self.unet is None or self.vae is None:
            raise ConfigError("this model has no pixel decoder")
        return self.unet.sample_size * self.vae.scale_factor

    @property
    def image_size_step(self) -> int:
        """Output sides must be multiples of this (32 for the real models): the latent (pixels / VAE
        scale) must survive the UNet's (n-1) downsamplings."""
        if self.unet is None or self.vae is None:
            raise ConfigError("this model has no pixel decoder")
        return self.vae.scale_factor * 2 ** (len(self.unet.block_out_channels) - 1)

    def image_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """(height, width) in pixels for a request (None = native); InputError off the size step.
        The upper bound and the types are ImageParams' checks."""
        native = self.default_image_size
        height, width = height or native, width or native
        step = self.image_size_step
        if height % step or width % step:
            raise InputError(f"height and width must be multiples of {step}, got {height}x{width}")
        return height, width

    # -------------------------------------------------------------------------------- I/O

    def to_hf_dict(self, token_ids: dict[str, int] | None = None) -> dict[str, Any]:
        """The checkpoint's root config.json (Qwen2_5_VLConfig layout + BLIP3-o fields, docs/model_spec.md §3).

        `token_ids`: special-token fields (bos_token_id, image_token_id, ...) from the tokenizer.
        """
        t, v = self.text, self.vision
        d: dict[str, Any] = {
            "architectures": ["blip3oQwenForInferenceLM"],
            "model_type": self.model_type,
            "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
            "rms_norm_eps": t.rms_norm_eps, "rope_theta": t.rope_theta, "hidden_act": "silu",
            "max_position_embeddings": t.max_position_embeddings,
            "rope_scaling": {"type": "mrope", "rope_type": "default", "mrope_section": list(t.mrope_section)},
            "tie_word_embeddings": t.tie_word_embeddings, "torch_dtype": "bfloat16",
            "attention_dropout": 0.0, "use_sliding_window": False, "sliding_window": 32768,
            "max_window_layers": t.num_hidden_layers, "initializer_range": 0.02,
            "vision_config": {
                "depth": v.depth, "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
                "num_heads": v.num_heads, "in_chans": v.in_channels, "in_channels": v.in_channels,
                "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
                "spatial_merge_size": v.spatial_merge_size, "window_size": v.window_size,
                "fullatt_block_indexes": list(v.fullatt_block_indexes),
                "out_hidden_size": v.out_hidden_size, "hidden_act": "silu", "tokens_per_second": 2,
                "model_type": "qwen2_5_vl",
            },
        }
        d.update(token_ids or {})
        if self.dit is not None:
            d.update(gen_vision_tower="eva-clip-E-14-plus", n_query=self.n_query, gen_pooling="early_pool2d_4",
                     mm_use_im_patch_token=False, mm_use_im_start_end=False)
            # Not in the published config (the official code builds the DiT from defaults); written
            # by make-tiny so that small test checkpoints can carry their own DiT shape.
            d["dit_config"] = dataclasses.asdict(self.dit)
        return d

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], unet: UNetConfig | None, vae: VAEConfig | None,
                     decoder_scheduler: EulerSchedulerConfig | None, name: str = "custom") -> ModelConfig:
        model_type = raw.get("model_type")
        _require(model_type in SUPPORTED_MODEL_TYPES,
                 f"unknown model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        text_raw = dict(raw)
        text_raw.update(raw.get("text_config") or {})  # transformers >= 4.5x nests the LLM fields
        rope = text_raw.get("rope_scaling") or text_raw.get("rope_parameters") or {}
        section = rope.get("mrope_section", TextConfig.mrope_section)
        text = _pick(TextConfig, text_raw, mrope_section=tuple(section),
                     rope_theta=text_raw.get("rope_theta", rope.get("rope_theta", TextConfig.rope_theta)))
        vision = _pick(VisionConfig, raw.get("vision_config") or {}, renames={"in_chans": "in_channels"})
        is_blip3o = model_type in BLIP3O_MODEL_TYPES or "gen_vision_tower" in raw
        dit = None
        if is_blip3o:
            dit = _pick(DiTConfig, raw.get("dit_config") or {}, caption_dim=text.hidden_size)
        return cls(text=text, vision=vision, dit=dit, unet=unet if dit else None, vae=vae if dit else None,
                   decoder_scheduler=decoder_scheduler or EulerSchedulerConfig(),
                   n_query=raw.get("n_query", 64), model_type=model_type, name=name)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        root_cfg = path / "config.json"
        if not path.is_dir():
            raise CheckpointNotFoundError(f"checkpoint directory {path} does not exist")
        raw = _read_json(root_cfg)
        dec = path / "diffusion-decoder"
        unet = vae = sched = None
        if dec.is_dir():
            unet = UNetConfig.from_diffusers(_read_json(dec / "unet" / "config.json"))
            vae = VAEConfig.from_diffusers(_read_json(dec / "vae" / "config.json"))
            sched = EulerSchedulerConfig.from_diffusers(_read_json(dec / "scheduler" / "scheduler_config.json"))
        elif raw.get("model_type") in BLIP3O_MODEL_TYPES:
            raise CheckpointNotFoundError(
                f"{dec} is missing: a BLIP3-o checkpoint needs its diffusion-decoder/ folder for images")
        return cls.from_hf_dict(raw, unet, vae, sched, name=path.name)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointNotFoundError(f"required file {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e


# ------------------------------------------------------------------------------------------------
# Presets (docs/ARCHITECTURE.md §5)


def _real_config(name: str, hidden: int, inter: int, layers: int, heads: int, kv: int, tie: bool) -> ModelConfig:
    return ModelConfig(
        text=TextConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tie),
        vision=VisionConfig(out_hidden_size=hidden),
        dit=DiTConfig(caption_dim=hidden),
        unet=UNetConfig(), vae=VAEConfig(), name=name)


def _small_config(vocab_size: int) -> ModelConfig:
    """Real proportions (head dims, GQA ratio, mrope split, FFN ratios, block structure) at CPU size."""
    hidden = 512
    dit = DiTConfig(in_channels=448, hidden_size=448, num_layers=6, num_heads=7, num_kv_heads=7,
                    ffn_hidden_size=lumina_ffn_hidden_size(448), caption_dim=hidden)
    return ModelConfig(
        text=TextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2688, num_hidden_layers=6,
                        num_attention_heads=4, num_key_value_heads=1, mrope_section=(16, 24, 24),
                        max_position_embeddings=32768),
        vision=VisionConfig(depth=4, hidden_size=320, intermediate_size=864, num_heads=4,
                            fullatt_block_indexes=(1, 3), out_hidden_size=hidden),
        dit=dit,
        unet=UNetConfig(sample_size=32, block_out_channels=(64, 128, 256), transformer_layers_per_block=(1, 2, 2),
                        num_attention_heads=(1, 2, 4), cross_attention_dim=448, addition_time_embed_dim=32,
                        projection_class_embeddings_input_dim=448 + 6 * 32),
        vae=VAEConfig(block_out_channels=(32, 64, 128, 128), sample_size=256),
        name="small")


def _tiny_config(vocab_size: int) -> ModelConfig:
    """Seconds on CPU; every structural feature still present (GQA, window + full attention, CFG)."""
    hidden = 64
    clip = 32
    return ModelConfig(
        text=TextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 3, 3),
                        max_position_embeddings=4096),
        vision=VisionConfig(depth=4, hidden_size=32, intermediate_size=64, num_heads=2,
                            fullatt_block_indexes=(1, 3), out_hidden_size=hidden),
        dit=DiTConfig(in_channels=clip, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
                      ffn_hidden_size=lumina_ffn_hidden_size(64, multiple_of=32), caption_dim=hidden),
        unet=_toy_unet(clip, transformer_layers_per_block=(1, 2)), vae=_toy_vae(), name="tiny")


def _toy_unet(clip: int, transformer_layers_per_block: tuple[int, int]) -> UNetConfig:
    """The two-level UNet of the `tiny` and `demo` presets: 8×8 latents, CLIP-width cross-attention."""
    return UNetConfig(sample_size=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(32, 64),
                      layers_per_block=1, transformer_layers_per_block=transformer_layers_per_block,
                      num_attention_heads=(2, 4), cross_attention_dim=clip, addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=clip + 6 * 8, norm_num_groups=8)


def _toy_vae() -> VAEConfig:
    """The `tiny` and `demo` presets' VAE: factor 8 (four blocks) at toy widths, 64×64 images."""
    return VAEConfig(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64)


def _demo_config(vocab_size: int) -> ModelConfig:
    """The trained `demo` preset (`blip3o_engine.train`): the real layout at toy widths, 64×64 images.

    VAE factor 8 (four blocks) gives the released 8×8 latent grid at 64², so the DiT's 8×8 feature grid
    (64 queries, 64 CLIP tokens) and the UNet's latent have the real proportions. Widths are what lets
    the whole recipe train in minutes on two CPU cores.
    """
    hidden = 128
    clip = 32
    return ModelConfig(
        text=TextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=256, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, mrope_section=(4, 6, 6),
                        max_position_embeddings=4096, tie_word_embeddings=True),
        vision=VisionConfig(depth=4, hidden_size=128, intermediate_size=256, num_heads=4,
                            fullatt_block_indexes=(1, 3), out_hidden_size=hidden),
        dit=DiTConfig(in_channels=clip, hidden_size=96, num_layers=3, num_heads=4, num_kv_heads=4,
                      ffn_hidden_size=lumina_ffn_hidden_size(96, multiple_of=32), caption_dim=hidden),
        unet=_toy_unet(clip, transformer_layers_per_block=(1, 1)), vae=_toy_vae(), name="demo")


PRESETS = ("demo", "tiny", "small", "4b", "8b")
# Presets with trained weights (shipped inside the package); every other preset is random.
TRAINED_PRESETS = ("demo",)

# Presets over the tiny tokenizer, by name.
_SMALL_PRESETS = {"demo": _demo_config, "tiny": _tiny_config, "small": _small_config}

# Qwen2.5-VL-3B (BLIP3o-4B) and Qwen2.5-VL-7B (BLIP3o-8B), docs/model_spec.md §2.
_REAL = {
    "4b": dict(hidden=2048, inter=11008, layers=36, heads=16, kv=2, tie=True),
    "8b": dict(hidden=3584, inter=18944, layers=28, heads=28, kv=4, tie=False),
}


def preset_config(name: str, vocab_size: int | None = None) -> ModelConfig:
    """Config of a preset. `vocab_size` defaults to the real 151668 (4b/8b) or must be given
    (demo/tiny/small, whose vocabulary is the tiny tokenizer's)."""
    key = name.lower()
    if key in _REAL:
        cfg = _real_config(key, **_REAL[key])
        if vocab_size is not None:
            cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=vocab_size))
        return cfg
    if key in _SMALL_PRESETS:
        _require(vocab_size is not None, f"preset {name!r} needs the tokenizer's vocab_size")
        return _SMALL_PRESETS[key](vocab_size)
    raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)} or pass a checkpoint path")


def model_config(model: str | Path) -> ModelConfig:
    """The config of what `Engine.from_pretrained(model)` loads, read without its weights (so that a
    command line checks its arguments in a second, not after minutes of loading): a checkpoint
    directory's config files, or a preset's (tiny/small write their checkpoint on first use)."""
    name = str(model)
    if name.lower() in PRESETS and not Path(name).is_dir():
        if name.lower() in _REAL:
            return preset_config(name.lower())
        from .tiny import preset_checkpoint  # tiny imports this module

        return ModelConfig.from_checkpoint(preset_checkpoint(name.lower()))
    if not Path(name).is_dir():
        raise CheckpointNotFoundError(f"{name!r} is neither a checkpoint directory nor a preset ({', '.join(PRESETS)})")
    return ModelConfig.from_checkpoint(name)


DEVICE_TYPES = ("cpu", "cuda")


def device_from_name(device: Any):
    """'cpu' | 'cuda' | 'cuda:N' | torch.device -> torch.device, or ConfigError naming the valid ones."""
    import torch

    try:
        dev = torch.device(device.strip().lower() if isinstance(device, str) else device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in DEVICE_TYPES:
        raise ConfigError(f"unsupported device {device!r}; use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {str(device)!r} requested but CUDA is not available")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"device {str(device)!r} does not exist: this machine has cuda:0 .. cuda:{count - 1}")
    return dev


def dtype_from_name(name: str):
    """'float32' | 'fp32' | 'float16' | 'fp16' | 'half' | 'bfloat16' | 'bf16' | torch.dtype -> torch.dtype."""
    import torch

    if isinstance(name, torch.dtype):
        dtype = name
    else:
        table = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
                 "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
                 "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
        if str(name).lower() not in table:
            raise ConfigError(f"unsupported dtype {name!r}; use float32, float16 or bfloat16")
        dtype = table[str(name).lower()]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ConfigError(f"unsupported dtype {dtype}; use float32, float16 or bfloat16")
    return dtype


__all__ = [
    "TextConfig", "VisionConfig", "DiTConfig", "UNetConfig", "VAEConfig", "FlowSchedulerConfig",
    "EulerSchedulerConfig", "ModelConfig", "preset_config", "model_config", "PRESETS", "TRAINED_PRESETS",
    "DEVICE_TYPES", "device_from_name", "dtype_from_name",
    "lumina_ffn_hidden_size",
]
