"""Preset checkpoints: `make-tiny` writes a random-weight checkpoint in the published BLIP3o-Model
layout; the trained `demo` preset ships inside the package, written by the same functions.

The directory loads in this engine and in the oracles (transformers' Qwen2_5_VLForConditionalGeneration
for the Qwen part, diffusers' UNet2DConditionModel / AutoencoderKL for the decoder), so tests compare
implementations on identical weights. The `tiny` preset is this checkpoint, made on first use in a
cache directory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .config import TRAINED_PRESETS, ModelConfig, VAEConfig, preset_config
from .errors import CheckpointNotFoundError, InputError
from .tokenization import build_tiny_tokenizer

RANDOM_PRESETS = ("tiny", "small")  # random-weight presets, written to the cache dir on first use
# TRAINED_PRESETS (config.py): presets whose trained checkpoint ships inside the package.
CHECKPOINT_PRESETS = TRAINED_PRESETS + RANDOM_PRESETS  # presets that are on-disk checkpoints
_FORMAT_VERSION = 1  # bump when the writer changes, so stale cached checkpoints are rebuilt
# Where the trained presets live: blip3o_engine/presets/<name>/ (package data, read-only).
PACKAGED_PRESETS_DIR = Path(__file__).parent / "presets"


def cache_root() -> Path:
    return Path(os.environ.get("BLIP3O_ENGINE_CACHE", Path.home() / ".cache" / "blip3o_engine"))


def preset_checkpoint(name: str) -> Path:
    """Path of the preset's checkpoint: the packaged directory of a trained preset (never written
    to), or, for a random preset, its cache directory, written on first use (atomically: concurrent
    processes each build into a temporary directory and the first rename wins)."""
    if name in TRAINED_PRESETS:
        path = PACKAGED_PRESETS_DIR / name
        if not (path / "config.json").is_file():
            raise CheckpointNotFoundError(
                f"the {name!r} checkpoint is missing from the installed package ({path}); reinstall "
                f"blip3o-engine, or retrain it with `blip3o-engine train-demo -o DIR` and pass --model DIR")
        return path
    target = cache_root() / f"{name}-v{_FORMAT_VERSION}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        make_tiny_checkpoint(tmp, preset=name)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def make_tiny_checkpoint(out_dir: str | Path, preset: str = "tiny", seed: int = 0, num_shards: int = 2) -> Path:
    """Write tokenizer, processor config, config.json, sharded safetensors and diffusion-decoder/.

    `out_dir` must be new or an empty directory (nothing of the user's is overwritten); a path that is
    a file, not empty, or not writable raises InputError before anything is written."""
    from .models.blip3o import random_model
    from .params import MAX_SEED

    # The weights draw from `seed` and the VAE encoder's from `seed + 1` (torch.Generator's range).
    if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < MAX_SEED):
        raise InputError(f"seed must be an int in [0, 2**64 - 2], got {seed!r}")
    out = _empty_output_dir(Path(out_dir))
    vocab_size = write_processor_files(out, preset)
    cfg = preset_config(preset, vocab_size=vocab_size)
    model = random_model(cfg, seed=seed)
    # The released VAE file holds the full autoencoder; the engine only uses the decoder half but the
    # tiny file carries random encoder weights too, so that loaders (ours, diffusers') see the real key set.
    gen = torch.Generator().manual_seed(seed + 1)
    encoder = {key: torch.randn(shape, generator=gen) * (0.1 if len(shape) == 1 else 0.05)
               for key, shape in vae_encoder_shapes(cfg.vae).items()}
    write_model_files(out, model, num_shards=num_shards, vae_extra=encoder)
    return out


def write_processor_files(out_dir: str | Path, preset: str) -> int:
    """The tiny tokenizer and the preset's preprocessor_config.json; returns the vocabulary size."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = build_tiny_tokenizer(out)
    _write_json(out / "preprocessor_config.json", _preprocessor_config(preset))
    return vocab_size


def write_model_files(out_dir: str | Path, model, num_shards: int = 1, dtype: torch.dtype | None = None,
                      vae_extra: dict[str, torch.Tensor] | None = None) -> None:
    """config.json, the root safetensors (sharded when num_shards > 1) and diffusion-decoder/ of
    `model`, in the published layout, next to the tokenizer files already in `out_dir`.

    dtype: of the root tensors (None: as they are); the decoder is always written as the released
    one is, in bf16 variant files. vae_extra: tensors stored beside the VAE decoder's (the encoder
    half of AutoencoderKL, which the engine never reads).
    """
    out = Path(out_dir)
    _write_json(out / "config.json", model.cfg.to_hf_dict(_config_token_ids(out)))
    state = _root_state(model)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    _save_sharded(state, out, num_shards)
    _write_decoder(model, model.cfg, out / "diffusion-decoder", vae_extra or {})


def _empty_output_dir(out: Path) -> Path:
    """Create `out` (and its parents) or check that it is an empty directory we can write into."""
    try:
        if out.exists() and not out.is_dir():
            raise InputError(f"{out} exists and is not a directory")
        if out.is_dir() and any(out.iterdir()):
            raise InputError(f"{out} is not empty: choose a new or empty directory for the checkpoint")
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a parent that is a file, no permission, read-only file system, ...
        raise InputError(f"cannot create {out}: {e.strerror or e}") from e
    if not os.access(out, os.W_OK | os.X_OK):
        raise InputError(f"{out} is not writable")
    return out


def _config_token_ids(tokenizer_dir: Path) -> dict[str, int]:
    """The special-token fields of a Qwen2.5-VL config.json, looked up in the tiny tokenizer."""
    vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    return {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
            "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
            "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"]}


def _root_state(model) -> dict[str, torch.Tensor]:
    """Published key layout of the root checkpoint (docs/model_spec.md §3)."""
    state = {f"visual.{k}": v for k, v in model.visual.state_dict().items()}
    for k, v in model.text.state_dict().items():
        state[k if k == "lm_head.weight" else f"model.{k}"] = v
    if model.dit is not None:
        state.update({f"model.dit.model.{k}": v for k, v in model.dit.state_dict().items()})
        state["model.latent_queries"] = model.queries.weight
    return state


def _save_sharded(state: dict[str, torch.Tensor], out: Path, num_shards: int) -> None:
    from safetensors.torch import save_file

    if num_shards == 1:
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
        return
    keys = list(state)
    per = -(-len(keys) // num_shards)
    weight_map, total = {}, 0
    for i in range(num_shards):
        name = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        chunk = {k: state[k].contiguous() for k in keys[i * per:(i + 1) * per]}
        save_file(chunk, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in chunk})
        total += sum(t.numel() * t.element_size() for t in chunk.values())
    _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_decoder(model, cfg: ModelConfig, dec: Path, vae_extra: dict[str, torch.Tensor]) -> None:
    """diffusers layout with bf16 variant files, as the released diffusion-decoder/ (docs/model_spec.md §1.6)."""
    from safetensors.torch import save_file

    for sub in ("unet", "vae", "scheduler"):
        (dec / sub).mkdir(parents=True, exist_ok=True)
    _write_json(dec / "model_index.json", {
        "_class_name": "EmuVisualGenerationPipeline", "_diffusers_version": "0.21.2",
        "scheduler": ["diffusers", "EulerDiscreteScheduler"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]})
    _write_json(dec / "scheduler" / "scheduler_config.json", cfg.decoder_scheduler.to_diffusers())
    _write_json(dec / "unet" / "config.json", cfg.unet.to_diffusers())
    _write_json(dec / "vae" / "config.json", cfg.vae.to_diffusers())
    bf16 = {k: v.to(torch.bfloat16).contiguous() for k, v in model.unet.state_dict().items()}
    save_file(bf16, str(dec / "unet" / "diffusion_pytorch_model.bf16.safetensors"), metadata={"format": "pt"})
    vae_state = {**model.vae.state_dict(), **vae_extra}
    bf16 = {k: v.to(torch.bfloat16).contiguous() for k, v in vae_state.items()}
    save_file(bf16, str(dec / "vae" / "diffusion_pytorch_model.bf16.safetensors"), metadata={"format": "pt"})


def vae_encoder_shapes(cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of AutoencoderKL's encoder half and quant_conv (diffusers key names)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, cin, cout, k):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.conv_shortcut", cin, cout, 1)

    ch = cfg.block_out_channels
    conv("encoder.conv_in", cfg.in_channels, ch[0], 3)
    cin = ch[0]
    for i, cout in enumerate(ch):
        for j in range(cfg.layers_per_block):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", cin if j == 0 else cout, cout)
        if i < len(ch) - 1:
            conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", cout, cout, 3)
        cin = cout
    resnet("encoder.mid_block.resnets.0", ch[-1], ch[-1])
    norm("encoder.mid_block.attentions.0.group_norm", ch[-1])
    for proj in ("to_q", "to_k", "to_v", "to_out.0"):
        shapes[f"encoder.mid_block.attentions.0.{proj}.weight"] = (ch[-1], ch[-1])
        shapes[f"encoder.mid_block.attentions.0.{proj}.bias"] = (ch[-1],)
    resnet("encoder.mid_block.resnets.1", ch[-1], ch[-1])
    norm("encoder.conv_norm_out", ch[-1])
    conv("encoder.conv_out", ch[-1], 2 * cfg.latent_channels, 3)
    conv("quant_conv", 2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
    return shapes


# The demo model sees every image at 56×56 (4×4 patches, 4 image tokens): the processor shrinks any
# input to that, so a picture of a shape of any size looks like the 64×64 ones it was trained on.
DEMO_MAX_PIXELS = 56 * 56


def _preprocessor_config(preset: str) -> dict:
    # Qwen2.5-VL's processor settings; the tiny checkpoint caps pixels at 448² (256 image tokens)
    # so CPU tests stay fast.
    if preset in TRAINED_PRESETS:
        max_pixels = DEMO_MAX_PIXELS
    else:
        max_pixels = 448 * 448 if preset in RANDOM_PRESETS else 12845056
    return {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
            "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "do_convert_rgb": True, "min_pixels": 3136, "max_pixels": max_pixels, "patch_size": 14,
            "temporal_patch_size": 2, "merge_size": 2,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
