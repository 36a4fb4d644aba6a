"""The whole BLIP3-o model as one container, and how it is built: from a checkpoint or at random.

Components (docs/model_spec.md §0): `visual` (Qwen2.5-VL ViT), `text` (Qwen2.5 LLM + head), `latent_queries`
([1, n_query, H]), `dit` (NextDiT), `unet` + `vae` (the SDXL-type pixel decoder). The image-generation
parts are None for a plain Qwen2.5-VL checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import CheckpointNotFoundError
from ..loader import SKIPPED_ROOT_PREFIXES, ComponentSpec, SafetensorsCheckpoint, build_on_meta, load_components
from .dit import NextDiT
from .qwen2_5_vl import Qwen2_5_VisionTransformer, Qwen2_5_VLTextModel
from .unet import UNet2DConditional
from .vae import VAEDecoder

DECODER_DIR = "diffusion-decoder"
# diffusers variant file names: the released decoder ships only `*.bf16.safetensors` (docs/model_spec.md §3).
DECODER_VARIANTS = ("bf16", "", "fp16")


class LatentQueries(nn.Module):
    """The 64 learned query embeddings appended after `[IMG]` (docs/model_spec.md §1.3); checkpoint key
    `model.latent_queries`."""

    def __init__(self, n_query: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, n_query, hidden_size), requires_grad=False)  # [1, Q, H]


class Blip3oModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = Qwen2_5_VisionTransformer(cfg.vision)
        self.text = Qwen2_5_VLTextModel(cfg.text)
        self.dit = NextDiT(cfg.dit) if cfg.dit is not None else None
        self.queries = LatentQueries(cfg.n_query, cfg.text.hidden_size) if cfg.dit is not None else None
        self.unet = UNet2DConditional(cfg.unet) if cfg.unet is not None else None
        self.vae = VAEDecoder(cfg.vae) if cfg.vae is not None else None

    @property
    def device(self) -> torch.device:
        return self.text.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text.embed_tokens.weight.dtype


def _root_specs(model: Blip3oModel) -> list[ComponentSpec]:
    """Where each root-checkpoint tensor goes (docs/model_spec.md §3 key layout)."""
    tied = model.cfg.text.tie_word_embeddings
    specs = [ComponentSpec(model.visual, "visual."),
             ComponentSpec(model.text, "model.", extra={} if tied else {"lm_head.weight": "lm_head.weight"})]
    if model.dit is not None:
        specs.append(ComponentSpec(model.dit, "model.dit.model."))
        specs.append(ComponentSpec(model.queries, "", extra={"weight": "model.latent_queries"}))
    return specs


def _is_skipped_root_key(key: str, tied: bool) -> bool:
    if key.startswith(SKIPPED_ROOT_PREFIXES):
        return True
    return tied and key == "lm_head.weight"  # tied checkpoints may still store a copy; the embedding wins


def _normalize_root_key(key: str) -> str:
    """Accept checkpoints re-saved by transformers >= 5 (`model.language_model.*`, `model.visual.*`)."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return key[len("model."):]
    return key


def load_model(path: str | Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> Blip3oModel:
    """Build `Blip3oModel` on the meta device and fill it from the checkpoint at `path`."""
    path = Path(path)
    model = build_on_meta(lambda: Blip3oModel(cfg))
    root = SafetensorsCheckpoint.from_dir(path, "model").renamed(_normalize_root_key)
    tied = cfg.text.tie_word_embeddings
    load_components(root, _root_specs(model), dtype, device, ignore=lambda k: _is_skipped_root_key(k, tied))
    if model.unet is not None:
        dec = path / DECODER_DIR
        if not dec.is_dir():
            raise CheckpointNotFoundError(f"{dec} is missing: needed for image generation")
        unet_ckpt = SafetensorsCheckpoint.from_dir(dec / "unet", "diffusion_pytorch_model", DECODER_VARIANTS)
        load_components(unet_ckpt, [ComponentSpec(model.unet, "")], dtype, device)
        vae_ckpt = SafetensorsCheckpoint.from_dir(dec / "vae", "diffusion_pytorch_model", DECODER_VARIANTS)
        load_components(vae_ckpt, [ComponentSpec(model.vae, "")], dtype, device,
                        ignore=lambda k: k.startswith(VAEDecoder.IGNORED_PREFIXES))
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------
# Random weights (tiny / small checkpoints, benchmark presets)


def random_model(cfg: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> Blip3oModel:
    """A model with seeded random weights whose scales keep activations O(1) through the stack.

    Every tensor is random (norm scales around 1, gates non-zero) rather than PyTorch's default
    init, whose zeros and ones would hide wiring mistakes in parity tests. Tensors are drawn on
    `device` by a generator there (a CPU draw of 12 B parameters for the 4b/8b presets would take
    minutes), so the same seed gives different numbers on CPU and CUDA.
    """
    device = torch.device(device)
    model = build_on_meta(lambda: Blip3oModel(cfg))
    gen = torch.Generator(device).manual_seed(seed)
    state = {name: _random_tensor(name, p.shape, gen, device).to(dtype)
             for name, p in model.state_dict(keep_vars=True).items()}
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False)


def _random_tensor(name: str, shape: torch.Size, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """fp32 draw on `device`, scaled by what the tensor is."""
    x = torch.randn(shape, generator=gen, device=device)
    leaf = name.rsplit(".", 1)[-1]
    if len(shape) == 1 and leaf == "weight":  # norm scales
        return 1.0 + 0.1 * x
    if leaf == "bias" or len(shape) == 1:  # biases and the DiT's per-head gates
        return 0.1 * x
    if name == "queries.weight":
        return x
    fan_in = math.prod(shape[1:])  # Linear [out, in], Conv [out, in, *k], Embedding [vocab, H]
    return x / math.sqrt(fan_in)
