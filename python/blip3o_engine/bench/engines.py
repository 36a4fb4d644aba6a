"""The engines a benchmark compares: one model, one `Engine` per backend over the same weights.

Sharing the weights keeps the comparison fair (identical numbers in, identical shapes) and halves
the memory and load time of a two-backend run at the 4b/8b shapes.

Every model loads through `Engine.from_pretrained`: checkpoints and the tiny/small presets from
disk, the 4b/8b presets (real shapes) with random weights drawn directly on the target device.

The chat baseline "transformers" (`TransformersChat`) is transformers' own
`Qwen2_5_VLForConditionalGeneration` over the very same tensors: its config is built from the
engine's `ModelConfig` (what `Qwen2_5_VLConfig.from_dict` would read from config.json; the
checkpoint's own model_type "blip3o_qwen" makes `from_pretrained` mis-parse it), and the engine's
state dict is assigned into it under transformers 5.x names (`model.language_model.*`,
`model.visual.*`, `lm_head`), so no weight is copied and random presets need no file.
"""

from __future__ import annotations

import copy

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import PRESETS, dtype_from_name
from ..errors import ConfigError
from ..engine import BACKENDS, Engine

TRANSFORMERS = "transformers"  # chat-only baseline backend (TransformersChat)


class TransformersChat:
    """Greedy chat through transformers' `generate`, over an `Engine`'s weights (module docstring).

    Prompts are the engine's own chat templates (`engine.prompts.chat`), so both see the same ids; a
    batch is left-padded (HF's convention for decoder-only batched generation)."""

    def __init__(self, engine: Engine):
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        self.engine = engine
        self.prompts = engine.prompts
        cfg, special = engine.cfg, engine.special
        # The checkpoint-layout config.json the engine's config writes (tiny checkpoints use the same
        # function), with the special-token ids of its tokenizer.
        config = Qwen2_5_VLConfig.from_dict(cfg.to_hf_dict({
            "image_token_id": special.image_pad, "vision_start_token_id": special.vision_start,
            "vision_end_token_id": special.vision_end, "bos_token_id": None, "eos_token_id": None}))
        with torch.device("meta"):
            model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa",
                                                                    dtype=engine.model.dtype)
        sd = {f"model.visual.{k}": v for k, v in engine.model.visual.state_dict().items()}
        for k, v in engine.model.text.state_dict().items():
            sd[k if k == "lm_head.weight" else f"model.language_model.{k}"] = v
        if cfg.text.tie_word_embeddings:
            sd["lm_head.weight"] = engine.model.text.embed_tokens.weight
        model.load_state_dict(sd, strict=True, assign=True)
        _materialize_rotary(model, engine.device)
        if cfg.text.tie_word_embeddings:
            model.tie_weights()
        self.model = model.eval()
        self.pad_id = special.endoftext

    def generate(self, conversations: list[list[dict]], max_new_tokens: int) -> torch.Tensor:
        """Exactly `max_new_tokens` greedy tokens per conversation (EOS suppressed); [B, L + N] ids."""
        ids = [self.prompts.chat(m).token_ids for m in conversations]
        width = max(len(x) for x in ids)
        dev = self.engine.device
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)  # [B, L] left-padded
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, width - len(x):] = torch.tensor(x)
            mask[i, width - len(x):] = 1
        with torch.inference_mode():
            return self.model.generate(input_ids=input_ids.to(dev), attention_mask=mask.to(dev), do_sample=False,
                                       max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                       pad_token_id=self.pad_id)


def _materialize_rotary(model, device: torch.device) -> None:
    """Rebuild the rotary modules, whose inv_freq buffers (in no state dict) are still on meta."""
    lm, visual = model.model.language_model, model.model.visual
    with torch.device(device):
        lm.rotary_emb = type(lm.rotary_emb)(lm.rotary_emb.config)
        visual.rotary_pos_emb = type(visual.rotary_pos_emb)(visual.rotary_pos_emb.config)


@dataclass(frozen=True)
class EngineParts:
    """The stage objects an engine's step loop drives, for the micro rows that time them directly:
    `flow` (FlowSampler | ReferenceFlow), `decoder` (PixelDecoder | ReferenceDecoder) and `dit_chunk`, the
    DiT steps one engine step advances (`SchedulerConfig.dit_steps_per_iteration`, resolved per device), and
    `loop`, the step loop itself (its `trace` says what the last step ran). `Engine` keeps them private; reading them here, in one place, keeps the benchmark on the objects the
    engine really runs instead of a copy of its wiring."""

    flow: object
    decoder: object
    dit_chunk: int
    loop: object


def engine_parts(engine: Engine) -> EngineParts:
    return EngineParts(engine._flow, engine._decoder, engine._loop.dit_chunk, engine._loop)


@dataclass
class LoadedEngines:
    engines: dict[str, Engine | TransformersChat]  # backend -> engine, all over one model, in timing order
    preset: str  # the preset name, or the checkpoint directory's name
    random_weights: bool
    load_s: float


def default_dtype(device: torch.device) -> str:
    return "float32" if device.type == "cpu" else "bfloat16"


def load_engines(model: str, device: torch.device, dtype: str | None, backends: list[str],
                 compile: bool | None = None) -> LoadedEngines:
    """Build the model once and wrap it in one Engine per backend (first engine backend owns it; on CPU
    each further backend runs on its own copy);
    "transformers" adds a `TransformersChat` over the same weights (chat mode only)."""
    for b in backends:
        if b not in (*BACKENDS, TRANSFORMERS):
            raise ConfigError(f"unknown backend {b!r}; choose from {', '.join((*BACKENDS, TRANSFORMERS))}")
    order = list(dict.fromkeys(backends))
    backends = [b for b in order if b != TRANSFORMERS]
    if not backends:
        raise ConfigError("--backend transformers needs an engine backend beside it (optimized or reference): "
                          "the prompts and weights come from the engine")
    torch_dtype = dtype_from_name(dtype or default_dtype(device))
    start = time.perf_counter()
    key = model.lower()
    is_preset = key in PRESETS and not Path(model).is_dir()
    # 4b/8b presets draw random weights on the device itself (models.blip3o.random_model).
    first = Engine.from_pretrained(model, device=device, dtype=torch_dtype, backend=backends[0], compile=compile)
    engines = {backends[0]: first}
    for b in backends[1:]:
        # On CPU the optimized backend re-lays its LLM weights out in place (in-major, weight_fusion), which
        # would speed up a reference sharing them: each further backend gets its own copy, made before any
        # engine has run. On CUDA the layout never changes (fused weights are row views of the same
        # values), so they share one model and the 8b preset fits once.
        model = first.model if device.type == "cuda" else copy.deepcopy(first.model)
        engines[b] = Engine(model, first.tokenizer, first.prompts.image_processor, backend=b, compile=compile,
                            name=first.name)
        engines[b].is_random_preset = first.is_random_preset
    if TRANSFORMERS in order:
        engines[TRANSFORMERS] = TransformersChat(first)
    engines = {b: engines[b] for b in order}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    name = key if is_preset else Path(model).name
    return LoadedEngines(engines, name, first.is_random_preset, time.perf_counter() - start)
