"""Building an engine's stages for its backend, after the memory plan.

Optimized: the image stages first (they allocate only small static buffers), then — on CUDA — one probe per
stage measures its working set (the ViT on a 1024² image, the LLM at its token budget, a DiT chunk and a
decoder step at the maximum image batch, one VAE decode), then the plan sizes the KV pool from what is left,
and only then the AR stage allocates it. On CPU the working sets are estimated from the configs. Every CUDA
graph of the engine shares one pool (`cuda_graphs.GraphPool`).

Reference: its stages hold no pool; the plan reports the weights and the estimated working sets only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .cuda_graphs import GraphCache, GraphPool
from .memory import MemoryPlan, estimate_stage_bytes, plan_memory, profile_peak_bytes, weights_bytes

if TYPE_CHECKING:
    from ..engine import Engine

VIT_PROBE_SIDE = 1024  # the ViT's working set is planned for one image of this size (processor-resized)


def build_stages(engine: Engine) -> tuple:
    """(plan, ar, flow, decoder, graph caches by runner name) for `engine`'s backend."""
    if engine.backend == "reference":
        return _reference(engine)
    return _optimized(engine)


def _reference(engine: Engine) -> tuple:
    from .reference_ar import ReferenceAR
    from .reference_images import ReferenceDecoder, ReferenceFlow

    cfg, model = engine.cfg, engine.model
    ar = ReferenceAR(model, engine.tokenizer, engine.special)
    flow = decoder = None
    if cfg.can_generate_images:
        flow, decoder = ReferenceFlow(model), ReferenceDecoder(model, engine.config.scheduler.max_image_batch)
    stages = estimate_stage_bytes(cfg, engine.config, model.dtype, _native_hw(engine), _vit_patches(engine))
    plan = MemoryPlan(str(model.device), 0, weights_bytes(model), stages, 0, 0, 0, engine.config.cache.block_size,
                      0, ar.max_model_len, False, ["reference backend: contiguous per-request caches, no KV pool"])
    return plan, ar, flow, decoder, {}


def _optimized(engine: Engine) -> tuple:
    from .ar_stage import ARStage
    from .flow_sampler import FlowSampler
    from .pixel_decoder import PixelDecoder

    cfg, model, config = engine.cfg, engine.model, engine.config
    device, dtype = model.device, model.dtype
    on_cuda = device.type == "cuda"
    pool = GraphPool(device) if on_cuda and config.compile.cuda_graphs else None
    h = config.compute_hash()
    caches = {name: GraphCache(f"{name} [{h}]", pool, on_cuda and config.compile.graphs_for(name),
                               config.compile.max_graphs) for name in ("dit", "decoder")}
    flow = decoder = None
    s = config.scheduler
    if cfg.can_generate_images:
        flow = FlowSampler(model.dit, device, dtype, caches["dit"], max_batch=s.max_image_batch,
                           max_unrolled_steps=config.compile.max_unrolled_dit_steps)
        decoder = PixelDecoder(model.unet, model.vae, cfg.vae.scaling_factor, cfg.decoder_scheduler, device, dtype,
                               compile=config.compile.compile_decoder, graphs=caches["decoder"],
                               max_batch=s.max_image_batch)
    if on_cuda:
        stages, measured = _profile(engine, flow, decoder), True
    else:
        stages = estimate_stage_bytes(cfg, config, dtype, _native_hw(engine), _vit_patches(engine))
        measured = False
    plan = plan_memory(cfg, config, device, dtype, weights_bytes(model), stages, measured, graphs=pool is not None,
                       native_hw=_native_hw(engine))
    ar = ARStage(model, engine.tokenizer, engine.special, config, plan.num_kv_blocks, plan.max_model_len, pool)
    caches["llm"] = ar.runner.graphs
    return plan, ar, flow, decoder, caches


def _native_hw(engine: Engine) -> tuple[int, int]:
    side = engine.cfg.default_image_size if engine.cfg.can_generate_images else 0
    return side, side


def _vit_patches(engine: Engine) -> int:
    """Patches of one VIT_PROBE_SIDE² image after the processor's resize (14-px patches, a multiple of 28)."""
    side = -(-VIT_PROBE_SIDE // 28) * 28
    return (side // engine.cfg.vision.patch_size) ** 2


@torch.inference_mode()
def _profile(engine: Engine, flow, decoder) -> dict[str, int]:
    """Each stage's peak CUDA allocation at the engine's limits (module docstring)."""
    cfg, model, s = engine.cfg, engine.model, engine.config.scheduler
    device, dtype = model.device, model.dtype
    tokens = max(s.max_num_batched_tokens, s.max_num_seqs)
    stages = {"llm": profile_peak_bytes(lambda: _llm_probe(model, tokens), device)}
    patches = _vit_patches(engine)
    side = int(patches ** 0.5)
    width = cfg.vision.in_channels * cfg.vision.temporal_patch_size * cfg.vision.patch_size ** 2
    pixels = torch.zeros(patches, width, device=device, dtype=dtype)
    grid = torch.tensor([[1, side, side]], device=device)
    stages["vit"] = profile_peak_bytes(lambda: model.visual(pixels, grid), device)
    if flow is not None:
        b, hw = s.max_image_batch, _native_hw(engine)
        f = cfg.vae.scale_factor
        latent = (cfg.unet.in_channels, hw[0] // f, hw[1] // f)
        cond = torch.zeros(b, cfg.n_query, cfg.text.hidden_size, device=device, dtype=dtype)
        noise = torch.zeros(b, cfg.dit.in_channels, cfg.dit.input_size, cfg.dit.input_size, device=device)
        stages["dit"] = profile_peak_bytes(lambda: flow.advance(flow.begin(cond, noise, 30, 3.0), 30), device)
        stages["decoder"] = profile_peak_bytes(lambda: _decoder_probe(decoder, cfg, b, latent), device)
        zeros = torch.zeros(1, *latent, device=device, dtype=dtype)
        stages["vae"] = profile_peak_bytes(lambda: decoder.latents_to_pixels(zeros), device)
    return stages


def _llm_probe(model, tokens: int) -> None:
    """A prefill of `tokens` tokens through the dense forward (its attention materialises at least what the
    paged kernels do: a conservative working set)."""
    x = model.text.embed(torch.zeros(1, tokens, dtype=torch.int64, device=model.device))
    positions = torch.arange(tokens, device=model.device).expand(3, 1, -1)
    model.text(x, positions)


def _decoder_probe(decoder, cfg, batch: int, latent: tuple[int, int, int]) -> None:
    """One decoder step with the batch full (CFG on: 2 UNet rows per image)."""
    keys = [("probe", i) for i in range(batch)]
    feats = torch.zeros(cfg.n_query, cfg.dit.in_channels, device=decoder.device, dtype=decoder.dtype)
    for key in keys:
        decoder.admit(key, feats, feats, torch.zeros(latent), 2, 3.0)
    try:
        decoder.step()
    finally:
        for key in keys:
            decoder.release(key)


__all__ = ["build_stages"]
