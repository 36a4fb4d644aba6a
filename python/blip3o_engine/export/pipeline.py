"""The engine over exported stages: a model facade whose components call exported graphs.

`ExportedModel` presents the attributes and call signatures that the reference stage functions
(`runtime/reference.py`) use on a `Blip3oModel` — `text(embeds, pos, cache)`, `text.embed(ids)`,
`text.compute_logits(h)`, `visual(pixels, grid)`, `dit(x, t, caption)`, `unet(z, t, encoder_hidden_states=...,
text_embeds=..., time_ids=...)`, `vae(latents)`, `queries.weight` — with each call running an exported
graph through a `StageFn` (onnxruntime, AOTInductor, TensorRT, or a Triton BLS request). An ordinary
`Engine` (reference backend) over this facade then runs text-to-image and chat with the engine's own
prompts, seeds and noise, schedulers (flow-matching Euler, EulerDiscrete), CFG and text samplers:
`build_engine` is the one place that orchestration is assembled, for `Engine.from_exported` and for
the Triton Python-backend model alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ModelConfig, TextConfig
from ..errors import ExportError
from ..models.qwen2_5_vl import KVCache
from ..models.vae import to_uint8
from ..engine import Engine
from .manifest import Manifest, config_hash
from .runtimes import StageFn
from .stages import torch_dtype, vit_graph_name

WEIGHTS_FILE = "weights.safetensors"
CONFIG_DIR = "config"


class _MissingStage:
    """Stands in for a stage that was not exported: calling it says what to export."""

    def __init__(self, graph: str):
        self.graph = graph

    def __call__(self, *args, **kwargs):
        raise ExportError(f"graph {self.graph!r} is not in this export: export it (blip3o-engine export --stages ...)")


def _graph(fns: Mapping[str, StageFn], name: str):
    return fns.get(name) or _MissingStage(name)


class ExportedText:
    """`Qwen2_5_VLTextModel`'s interface over the llm_prefill / llm_decode graphs.

    The K/V cache is the model's own `KVCache` container holding the graphs' `present.*` outputs.
    `compute_logits` returns the graph's LM-head output: the graphs compute logits at the last position
    of each forward only, so it accepts the hidden state of that position (what every sampler reads)."""

    def __init__(self, cfg: TextConfig, embed_weight: torch.Tensor, fns: Mapping[str, StageFn]):
        self.cfg = cfg
        self.embed_weight = embed_weight  # [V, H]
        self.prefill = _graph(fns, "llm_prefill")
        self.decode = _graph(fns, "llm_decode")
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (hidden [B, L, H], logits [B, 1, V])

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids.to(self.embed_weight.device), self.embed_weight)  # [B, L, H]

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.num_hidden_layers)

    def __call__(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, cache: KVCache | None = None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, l, _ = inputs_embeds.shape
        past = cache.length if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(b, past + l, dtype=torch.int64, device=inputs_embeds.device)
        feeds = {"inputs_embeds": inputs_embeds, "position_ids": position_ids.to(torch.int64),
                 "attention_mask": attention_mask.to(torch.int64)}
        if past:
            for i in range(self.cfg.num_hidden_layers):
                feeds[f"past_key_values.{i}.key"] = cache.keys[i]
                feeds[f"past_key_values.{i}.value"] = cache.values[i]
        out = (self.decode if past else self.prefill)(feeds)
        if cache is not None:
            n = self.cfg.num_hidden_layers
            cache.keys = [out[f"present.{i}.key"] for i in range(n)]
            cache.values = [out[f"present.{i}.value"] for i in range(n)]
        hidden = out["last_hidden_state"]  # [B, L, H]
        self._last = (hidden, out["logits"])
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._last is not None:
            last_hidden, logits = self._last
            for row in range(last_hidden.shape[0]):
                ref = last_hidden[row, -1]
                if hidden.shape == ref.shape and hidden.data_ptr() == ref.data_ptr():
                    return logits[row, -1]  # [V]
        raise ExportError("the exported LLM gives logits at the last position of its latest forward only")


class ExportedVisual:
    """The ViT over its per-grid graphs; images are independent in the tower, so each runs alone."""

    def __init__(self, fns: Mapping[str, StageFn]):
        self.fns = fns

    def __call__(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        outs, start = [], 0
        for grid in grid_thw.tolist():
            t, h, w = (int(v) for v in grid)
            name = vit_graph_name((t, h, w))
            if name not in self.fns:
                have = sorted(n for n in self.fns if n.startswith("vit_"))
                raise ExportError(f"no ViT graph for image grid {t}x{h}x{w} (exported: {', '.join(have) or 'none'}); "
                                  f"export with --vit-grids {t}x{h}x{w}")
            n = t * h * w
            outs.append(self.fns[name]({"pixel_values": pixel_values[start:start + n]})["image_embeds"])
            start += n
        return torch.cat(outs)  # [N / m², H]


class ExportedDiT:
    """`NextDiT(x, t, caption)` over dit_caption + dit: the caption projection runs once per caption
    tensor (a sampler passes the same tensor to every step of its loop), the step graph every step."""

    def __init__(self, fns: Mapping[str, StageFn]):
        self.project = _graph(fns, "dit_caption")
        self.step = _graph(fns, "dit")
        self._caption: torch.Tensor | None = None
        self._caption_proj: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, caption: torch.Tensor) -> torch.Tensor:
        if caption is not self._caption:
            self._caption_proj = self.project({"caption": caption})["caption_proj"]  # [2B, Q, D]
            self._caption = caption
        return self.step({"sample": x, "timestep": timestep.to(torch.int64),
                          "caption_proj": self._caption_proj})["velocity"]


class ExportedUNet:
    def __init__(self, fns: Mapping[str, StageFn]):
        self.fn = _graph(fns, "unet")

    def __call__(self, sample, timestep, encoder_hidden_states=None, text_embeds=None, time_ids=None):
        # The graph takes one timestep per row; the samplers pass a scalar (as diffusers' UNet accepts).
        t = torch.as_tensor(timestep, dtype=torch.float32, device=sample.device).reshape(-1).expand(sample.shape[0])
        return self.fn({"sample": sample, "timestep": t, "encoder_hidden_states": encoder_hidden_states,
                        "text_embeds": text_embeds, "time_ids": time_ids})["latent"]


class ExportedVAE:
    to_uint8 = staticmethod(to_uint8)

    def __init__(self, fns: Mapping[str, StageFn]):
        self.fn = _graph(fns, "vae")

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        return self.fn({"latent": latents})["images"]  # [B, 3, H, W] in [-1, 1]


class _Queries:
    def __init__(self, weight: torch.Tensor):
        self.weight = weight  # [1, Q, H]


class ExportedModel:
    """What `runtime/reference.py` and `Engine` read from a model, backed by exported graphs."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], fns: Mapping[str, StageFn],
                 device: torch.device, dtype: torch.dtype):
        self.cfg = cfg
        self.device = device
        self.dtype = dtype
        self.text = ExportedText(cfg.text, weights["embed_tokens.weight"], fns)
        self.visual = ExportedVisual(fns)
        generates = cfg.can_generate_images
        self.queries = _Queries(weights["latent_queries"]) if generates else None
        self.dit = ExportedDiT(fns) if generates else None
        self.unet = ExportedUNet(fns) if generates else None
        self.vae = ExportedVAE(fns) if generates else None


def load_config(root: Path, manifest: Manifest) -> ModelConfig:
    cfg = ModelConfig.from_checkpoint(root / manifest.assets["config"])
    cfg = dataclasses.replace(cfg, name=manifest.model_name)
    if config_hash(cfg) != manifest.config_sha256:
        raise ExportError(f"the model config in {root / manifest.assets['config']} does not match the manifest's "
                          f"config_sha256 (edited after export?)")
    return cfg


def build_engine(root: str | Path, manifest: Manifest, fns: Mapping[str, StageFn], device: torch.device):
    """An `Engine` (reference backend: the engine's own orchestration) over the exported stages `fns`."""
    from safetensors.torch import load_file

    from ..tokenization import load_image_processor, load_tokenizer

    root = Path(root)
    cfg = load_config(root, manifest)
    dtype = torch_dtype(manifest.dtype)
    weights = {k: v.to(device) for k, v in load_file(str(root / manifest.assets["weights"])).items()}
    model = ExportedModel(cfg, weights, fns, device, dtype)
    config_dir = root / manifest.assets["config"]
    # The reference backend's stages call the model's components one request at a time, exactly the calls
    # the facade serves; the step loop, drivers and request-level API are the engine's own.
    return Engine(model, load_tokenizer(config_dir), load_image_processor(config_dir), backend="reference",
                  name=manifest.model_name)


__all__ = ["ExportedModel", "build_engine", "load_config", "WEIGHTS_FILE", "CONFIG_DIR"]
