"""`train-demo`: BLIP3-o's sequential recipe at toy scale, from scratch, on CPU.

(a) understanding: the ViT pre-trained CLIP-style on the captions, then ViT + LLM on shape Q&A
    (`understanding.py`);
(b) the pixel side: VAE, the CLIP-feature encoder, the UNet decoder (`decoder.py`);
(c) generation: LLM frozen, the 64 latent queries + DiT trained with flow matching against the
    encoder's features of captioned images (`generation.py`).

The model is the project's own `Blip3oModel` at the `demo` preset's widths, so the checkpoint written
at the end (the published layout: config.json, tokenizer, preprocessor config, model.safetensors,
diffusion-decoder/{unet,vae,scheduler}) loads with `Engine.from_pretrained(DIR)` unchanged. Beside it:
`loss_curves.png` and `training.json` (settings, wall time per stage, final losses, evaluation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig, preset_config
from ..models.blip3o import Blip3oModel
from ..prompts import PromptBuilder
from ..tiny import write_model_files, write_processor_files
from ..tokenization import SpecialTokens, load_image_processor, load_tokenizer
from .common import LossLog, stage_generator
from .decoder import encode_shapes, train_feature_encoder, train_unet, train_vae
from .generation import train_generation
from .modules import FeatureEncoder, LatentEncoder
from .plot import plot_losses
from .understanding import pretrain_vision, train_understanding


@dataclass(frozen=True)
class DemoRecipe:
    """Steps, batch sizes and learning rates of every stage (the defaults made the shipped preset)."""

    vision_steps: int = 800
    vision_batch: int = 32
    vision_lr: float = 2e-3
    understanding_steps: int = 600
    understanding_batch: int = 32
    understanding_lr: float = 2e-3
    vae_steps: int = 400
    vae_batch: int = 32
    vae_lr: float = 2e-3
    encoder_steps: int = 500
    encoder_batch: int = 64
    encoder_lr: float = 1e-3
    encoded_images: int = 8192  # the fixed set stages (b) UNet and (c) train on
    unet_steps: int = 1500
    unet_batch: int = 64
    unet_lr: float = 1e-3
    dit_steps: int = 2000
    dit_batch: int = 32
    dit_lr: float = 1.5e-3
    ema_decay: float = 0.995

    @classmethod
    def smoke(cls) -> DemoRecipe:
        """A few steps of every stage: checks the pipeline end to end in seconds (draws nothing useful)."""
        return cls(vision_steps=3, vision_batch=4, understanding_steps=3, understanding_batch=4, vae_steps=3, vae_batch=4, encoder_steps=3,
                   encoder_batch=4, encoded_images=32, unet_steps=3, unet_batch=4, dit_steps=3, dit_batch=4,
                   ema_decay=0.9)


def init_weights(model: Blip3oModel) -> None:
    """Transformer-style init for the LLM (N(0, 0.02) linears and embeddings, zero biases, as
    transformers' initializer_range) and the latent queries. The ViT, DiT, UNet and VAE keep
    PyTorch's defaults (as diffusers does): from scratch on small data the ViT learns shapes
    markedly faster from them than from N(0, 0.02)."""
    for module in model.text.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
    with torch.no_grad():
        model.queries.weight.normal_(std=0.02)


def build_model(cfg: ModelConfig, seed: int) -> Blip3oModel:
    torch.manual_seed(seed)
    model = Blip3oModel(cfg)
    init_weights(model)
    return model.requires_grad_(False)


def _set_scaling_factor(model: Blip3oModel, scaling: float) -> None:
    """The VAE's measured latent scale goes into the config the checkpoint is written with."""
    vae = dataclasses.replace(model.cfg.vae, scaling_factor=round(scaling, 5))
    model.cfg = dataclasses.replace(model.cfg, vae=vae)
    model.vae.cfg = vae


class Stopwatch:
    """Wall and CPU seconds per stage. CPU time (all threads) is what a stage costs on an idle
    machine; on a shared one the wall time can be several times longer."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._start = (time.perf_counter(), time.process_time())

    @contextlib.contextmanager
    def stage(self, name: str):
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.wall[name] = time.perf_counter() - wall
        self.cpu[name] = time.process_time() - cpu

    def totals(self) -> tuple[float, float]:
        return time.perf_counter() - self._start[0], time.process_time() - self._start[1]


def train_demo(out_dir: str | Path, seed: int = 0, threads: int | None = None, recipe: DemoRecipe | None = None,
               progress: bool = True, evaluate: bool = True, command: str | None = None) -> dict:
    """Train the demo model from scratch and write its checkpoint to `out_dir`; returns the summary
    also written to `out_dir/training.json`."""
    r = recipe or DemoRecipe()
    if threads is not None:
        torch.set_num_threads(threads)
    out = Path(out_dir)
    clock = Stopwatch()
    vocab_size = write_processor_files(out, "demo")
    cfg = preset_config("demo", vocab_size=vocab_size)
    tokenizer = load_tokenizer(out)
    special = SpecialTokens.from_tokenizer(tokenizer)
    prompts = PromptBuilder(tokenizer, load_image_processor(out), special, cfg.vision.spatial_merge_size)
    model = build_model(cfg, seed)
    log = LossLog()

    with clock.stage("a_vision"):
        pretrain_vision(model, prompts, r.vision_steps, r.vision_batch, r.vision_lr, stage_generator(seed, 0), log,
                        progress)
    with clock.stage("a_understanding"):
        train_understanding(model, prompts, r.understanding_steps, r.understanding_batch, r.understanding_lr,
                            stage_generator(seed, 1), log, progress)
    with clock.stage("b_vae"):
        latent_encoder = LatentEncoder(cfg.vae.latent_channels, cfg.vae.scale_factor)
        scaling = train_vae(model.vae, latent_encoder, r.vae_steps, r.vae_batch, r.vae_lr, stage_generator(seed, 2),
                            log, progress)
        _set_scaling_factor(model, scaling)
    with clock.stage("b_encoder"):
        gen = stage_generator(seed, 3)
        feature_encoder = FeatureEncoder(cfg.dit.in_channels, grid=cfg.dit.input_size,
                                         image_size=cfg.default_image_size)
        train_feature_encoder(feature_encoder, latent_encoder, scaling, r.encoder_steps, r.encoder_batch,
                              r.encoder_lr, gen, log, progress)
        data = encode_shapes(r.encoded_images, latent_encoder, feature_encoder, scaling, gen)
    with clock.stage("b_unet"):
        train_unet(model.unet, data, cfg.decoder_scheduler, cfg.default_image_size, r.unet_steps, r.unet_batch,
                   r.unet_lr, r.ema_decay, stage_generator(seed, 4), log, progress)
    with clock.stage("c_generation"):
        train_generation(model, prompts, data, r.dit_steps, r.dit_batch, r.dit_lr, r.ema_decay,
                         stage_generator(seed, 5), log, progress)

    write_model_files(out, model.eval(), num_shards=1, dtype=torch.bfloat16)
    wall, cpu = clock.totals()
    summary = {
        "command": command, "seed": seed, "threads": torch.get_num_threads(), "recipe": dataclasses.asdict(r),
        "wall_seconds": {**{k: round(v, 1) for k, v in clock.wall.items()}, "total": round(wall, 1)},
        "cpu_seconds": {**{k: round(v, 1) for k, v in clock.cpu.items()}, "total": round(cpu, 1)},
        "final_losses": {stage: {k: round(v, 5) for k, v in losses.items()}
                         for stage, losses in log.summary().items()},
        "vae_scaling_factor": model.cfg.vae.scaling_factor,
        "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
    }
    plot_losses(log, out / "loss_curves.png",
                title=f"blip3o-engine train-demo, seed {seed}: {wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU, "
                      f"{torch.get_num_threads()} thread(s)")
    if evaluate:
        summary["evaluation"] = evaluate_checkpoint(out)
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def evaluate_checkpoint(path: str | Path, rounds: int = 1, chat_images: int = 48) -> dict:
    """A quick check of a written checkpoint on the reference backend: the text-to-image match rate
    over the 12 prompts (`rounds` seeds each) and the chat accuracy on rendered shapes."""
    from ..engine import Engine
    from .evaluate import evaluate_chat, evaluate_t2i

    start = time.perf_counter()
    # One thread: inference at these widths is made of sub-millisecond ops, which a second thread
    # barely speeds up on an idle machine and slows down many times on a busy one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = Engine.from_pretrained(str(path), backend="reference")
        t2i = evaluate_t2i(engine, rounds=rounds)
        chat = evaluate_chat(engine, n=chat_images)
    finally:
        torch.set_num_threads(threads)
    return {"t2i_match_rate": round(t2i.match_rate, 4), "t2i_images": len(t2i.images),
            "chat_accuracy": round(chat.accuracy, 4), "chat_images": chat_images,
            "seconds": round(time.perf_counter() - start, 1)}
