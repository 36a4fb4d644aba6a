"""FLOP / byte / parameter counters of `bench.costs` against (1) hand derivations from the published
8B/4B shapes and the rounded numbers of docs/model_spec.md §4, and (2) PyTorch's own FlopCounterMode run over
the reference modules on the meta device (same shapes, no memory, exact counts).

Tolerances: docs/model_spec.md §4 prints rounded numbers, so a count passes when it *rounds to the printed
number* (`rounds_to`), which is as strict as the spec allows. Counts derived here by hand, and the
FlopCounterMode cross-checks, must match exactly (integer arithmetic; float64 holds these sums
exactly, far below 2**53).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from blip3o_engine.bench import costs
from blip3o_engine.config import preset_config
from blip3o_engine.loader import build_on_meta
from blip3o_engine.models.dit import NextDiT
from blip3o_engine.models.qwen2_5_vl import Qwen2_5_VisionTransformer, Qwen2_5_VLTextModel
from blip3o_engine.models.unet import UNet2DConditional
from blip3o_engine.models.vae import VAEDecoder

C8, C4 = preset_config("8b"), preset_config("4b")
G, T = 1e9, 1e12


def rounds_to(value: float, printed: str) -> bool:
    """`value` shown with as many decimals as the spec's `printed` number is that number."""
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    return f"{value:.{decimals}f}" == printed


# ------------------------------------------------------------------------------------------------
# Hand derivations from the published shapes (docs/model_spec.md §2, §4)

# Qwen2.5-7B decoder layer: q (+bias) 3584², k/v (+bias) 3584x(4 kv heads x 128), o 3584², SwiGLU
# 3 x 3584 x 18944, two RMSNorms.
LAYER_8B = (3584 * 3584 + 3584) + 2 * (3584 * 512 + 512) + 3584 * 3584 + 3 * 3584 * 18944 + 2 * 3584
LAYERS_8B = 28 * LAYER_8B + 3584  # + final norm
LM_HEAD_8B = 151668 * 3584  # untied in the 8B
# Qwen2.5-3B: hidden 2048, 2 kv heads x 128, MLP 11008, 36 layers, LM head tied to the embedding.
LAYER_4B = (2048 * 2048 + 2048) + 2 * (2048 * 256 + 256) + 2048 * 2048 + 3 * 2048 * 11008 + 2 * 2048
LAYERS_4B = 36 * LAYER_4B + 2048
EMBED_4B = 151668 * 2048


def test_llm_params_match_spec():
    p8, p4 = costs.llm_params(C8.text), costs.llm_params(C4.text)
    assert p8["layers"] == LAYERS_8B and p8["lm_head"] == LM_HEAD_8B
    assert p4["layers"] == LAYERS_4B and p4["lm_head"] == 0 and p4["embed"] == EMBED_4B
    assert rounds_to(p8["layers"] / G, "6.526") and rounds_to(p4["layers"] / G, "2.775")  # docs/model_spec.md §4 table
    assert rounds_to(p8["lm_head"] / G, "0.544") and rounds_to(p4["embed"] / G, "0.311")


def test_decode_weight_and_kv_bytes_8b_4b():
    # Decode reads every decoder weight and the LM head once per step: 7.07 B params (8B) in bf16.
    d8 = costs.llm_decode_step(C8.text, batch=1, context=0)
    assert d8.bytes == 2 * (LAYERS_8B + LM_HEAD_8B)
    assert rounds_to((LAYERS_8B + LM_HEAD_8B) / G, "7.07") and rounds_to(d8.bytes / G, "14.1")
    d4 = costs.llm_decode_step(C4.text, batch=1, context=0)
    assert d4.bytes == 2 * (LAYERS_4B + EMBED_4B) and rounds_to(d4.bytes / G, "6.2")
    # FLOPs per token: 2 per matmul weight (biases and norm scales do no MACs) plus attention, where
    # at context 0 the new token attends to itself only: 28 layers x 2 x 2 x width 3584 x 1 key.
    weights = LAYERS_8B - 28 * (3584 + 2 * 512 + 2 * 3584) - 3584 + LM_HEAD_8B
    assert d8.flops == 2 * weights + 28 * 4 * 3584
    assert rounds_to(d8.flops / G, "14.1") and rounds_to(d4.flops / G, "6.2")
    # KV cache per token: K and V x layers x kv heads x head_dim x 2 bytes.
    assert costs.kv_bytes_per_token(C8.text) == 2 * 28 * 4 * 128 * 2 == 57_344
    assert costs.kv_bytes_per_token(C4.text) == 2 * 36 * 2 * 128 * 2 == 36_864
    # A cached context adds exactly its KV bytes.
    assert costs.llm_decode_step(C8.text, 4, 1000).bytes - d8.bytes == 4 * 1000 * 57_344


def _matmul_weights(layers: int, layer: int, hidden: int, kv: int) -> int:
    """Decoder weights that take part in matmuls (biases and norm scales do not)."""
    return layers * (layer - (hidden + 2 * kv) - 2 * hidden)


@pytest.mark.parametrize("cfg, layers, layer, kv, tokens, printed", [
    (C8, 28, LAYER_8B, 512, 98, "1.28"), (C4, 36, LAYER_4B, 256, 98, "0.54"),
    (C8, 28, LAYER_8B, 512, 66, "0.86"), (C4, 36, LAYER_4B, 256, 66, "0.37"),
    (C8, 28, LAYER_8B, 512, 1405, "18.3"), (C4, 36, LAYER_4B, 256, 1405, "7.8"),
])
def test_prefill_flops_reconcile_with_spec(cfg, layers, layer, kv, tokens, printed):
    """docs/model_spec.md §4's prefill FLOPs count the weight matmuls only (2 FLOPs per weight per token); ours add
    causal attention, 2 x 2 x width x (L(L+1)/2) per layer. At 1405 tokens that is +2.2% (8B) /
    +3.7% (4B), visible against the spec's 18.3 / 7.8 TFLOP; the rest is rounding."""
    h = cfg.text.hidden_size
    linear = 2 * tokens * _matmul_weights(layers, layer, h, kv)
    attention = layers * 4 * h * tokens * (tokens + 1) / 2
    got = costs.llm_prefill(cfg.text, tokens).flops
    assert got == linear + attention
    assert rounds_to(linear / T, printed)
    # Non-causal counting (a masked dense kernel) computes the whole square.
    assert costs.llm_prefill(cfg.text, tokens, causal=False).flops == linear + layers * 4 * h * tokens * tokens


def test_prefill_weight_bytes_match_spec():
    # The T2I prefill needs no LM head: decoder weights only, 13.05 (5.55) GB in bf16.
    assert costs.llm_prefill(C8.text, 98).bytes == 2 * LAYERS_8B and rounds_to(2 * LAYERS_8B / G, "13.05")
    assert costs.llm_prefill(C4.text, 98).bytes == 2 * LAYERS_4B and rounds_to(2 * LAYERS_4B / G, "5.55")


def test_dit_params_and_step_flops_8b():
    # Per block (docs/model_spec.md §1.4): 7 x 1792² attention projections (q,k,v self; q,k,v,out cross),
    # SwiGLU 3 x 1792 x 4864, adaLN 1024 -> 4 x 1792 (+bias), 4 LayerNorms (q/k of both attentions,
    # weight+bias), 5 RMSNorms, 28 gates.
    block = 7 * 1792**2 + 3 * 1792 * 4864 + (1024 * 4 * 1792 + 4 * 1792) + 4 * 2 * 1792 + 5 * 1792 + 28
    assert rounds_to(block / 1e6, "55.998")
    params8 = costs.dit_params(C8.dit)
    assert rounds_to(params8 / G, "1.365") and rounds_to(costs.dit_params(C4.dit) / G, "1.362")
    caption_projection = 3584 * 1792 + 1792 + 1792 * 1792 + 1792
    assert rounds_to(caption_projection / 1e6, "9.64")

    # One CFG step = 2 samples x 64 image tokens (+ 64 caption tokens each), 24 blocks.
    n = 128
    per_token = 5 * 1792**2 + 3 * 1792 * 4864  # self q,k,v + cross q + out, FFN
    cross_kv = 2 * 1792**2  # per caption token
    attention = 2 * 2 * (2 * 64 * 64 * 1792)  # samples x (self, cross) x (QK^T + AV)
    embed = 1792 * 1792 + 1792 * 1792  # patch embedder + final linear, per token
    tiny = 2 * (256 * 1024 + 1024 * 1024 + 24 * 1024 * 7168 + 1024 * 1792)  # timestep MLP, adaLN, final scale
    hoisted = 2 * (n * (24 * per_token + embed) + 24 * attention) + 2 * tiny
    caption_once = 2 * (24 * n * cross_kv + n * (3584 * 1792 + 1792 * 1792) + 2 * 1792 * 1024)
    assert costs.dit_step(C8.dit, 2, hoisted=True).flops == hoisted
    assert costs.dit_step(C8.dit, 2).flops == hoisted + caption_once
    assert rounds_to(costs.dit_step(C8.dit, 2).flops / G, "306")
    assert rounds_to(costs.dit_step(C8.dit, 2, hoisted=True).flops / G, "264")
    assert rounds_to(costs.dit_step(C8.dit, 2).bytes / G, "2.73")  # all weights, bf16
    assert costs.dit_step(C8.dit, 2).bytes == 2 * params8


def test_unet_params_and_step_flops():
    # docs/model_spec.md §1.6: an analytic count of the SDXL layout with 1792-d cross-attention is 2,525,520,644,
    # matching the 5.05 GB bf16 file.
    assert costs.unet_params(C8.unet) == 2_525_520_644
    step = costs.unet_step(C8.unet, batch=2, height=128, width=128)
    assert rounds_to(step.flops / T, "13.5") and rounds_to(step.bytes / G, "5.05")
    one = costs.unet_step(C8.unet, batch=1, height=128, width=128)
    assert rounds_to(one.flops / T, "6.74") and step.flops == 2 * one.flops  # no batch-shared matmuls


def test_vae_and_vit_match_spec():
    assert rounds_to(costs.vae_decoder_params(C8.vae) / 1e6, "49.5")
    vae = costs.vae_decode(C8.vae, 1, 128, 128)
    assert rounds_to(vae.flops / T, "10.5") and rounds_to(vae.bytes / G, "0.10")
    assert rounds_to(costs.vit_params(C8.vision) / G, "0.677") and rounds_to(costs.vit_params(C4.vision) / G, "0.669")
    # 448² -> 32x32 patches; 1024² -> the processor's 1036² -> 74x74 patches (partial windows at the edge).
    assert costs.image_grid(448, 448, C8.vision) == (1, 32, 32)
    assert rounds_to(costs.vit(C8.vision, [(1, 32, 32)]).flops / T, "1.35")
    assert rounds_to(costs.vit(C8.vision, [(1, 74, 74)]).flops / T, "7.7")
    assert rounds_to(costs.vit(C8.vision, [(1, 32, 32)]).bytes / G, "1.35")


def test_per_image_total_matches_spec():
    # docs/model_spec.md §4: ≈ 695 TFLOP per 1024² image (30 unhoisted DiT steps, 50 UNet steps), UNet ≈ 97%.
    unet = 50 * costs.unet_step(C8.unet, 2, 128, 128)
    total = costs.llm_prefill(C8.text, 98) + 30 * costs.dit_step(C8.dit, 2) + unet + costs.vae_decode(C8.vae, 1, 128)
    assert rounds_to(total.flops / T, "695") and rounds_to(unet.flops / total.flops, "0.97")


def test_cost_floor_is_the_slower_limit():
    c = costs.Cost(flops=1e12, bytes=1e9)
    assert c.floor_s(1e15, 1e12) == pytest.approx(1e-3) and c.bound(1e15, 1e12) in ("compute", "memory")
    assert c.floor_s(1e14, 1e12) == pytest.approx(1e-2) and c.bound(1e14, 1e12) == "compute"
    assert c.floor_s(1e16, 1e11) == pytest.approx(1e-2) and c.bound(1e16, 1e11) == "memory"
    assert (c + c).flops == 2e12 and (3 * c).bytes == 3e9


# ------------------------------------------------------------------------------------------------
# Cross-check against PyTorch's FlopCounterMode over the reference modules on the meta device


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _meta(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, device="meta")


@pytest.mark.parametrize("name", ["8b", "4b"])
def test_param_counts_equal_the_modules(name):
    cfg = preset_config(name)
    assert costs.unet_params(cfg.unet) == _numel(build_on_meta(lambda: UNet2DConditional(cfg.unet)))
    assert costs.vae_decoder_params(cfg.vae) == _numel(build_on_meta(lambda: VAEDecoder(cfg.vae)))
    assert costs.dit_params(cfg.dit) == _numel(build_on_meta(lambda: NextDiT(cfg.dit)))
    assert costs.vit_params(cfg.vision) == _numel(build_on_meta(lambda: Qwen2_5_VisionTransformer(cfg.vision)))
    p = costs.llm_params(cfg.text)
    assert p["layers"] + p["embed"] + p["lm_head"] == _numel(build_on_meta(lambda: Qwen2_5_VLTextModel(cfg.text)))


@pytest.mark.parametrize("batch, h, w", [(2, 128, 128), (3, 67, 45)])  # native CFG step; odd sides
def test_unet_flops_equal_flop_counter(batch, h, w):
    u = C8.unet
    unet = build_on_meta(lambda: UNet2DConditional(u))
    counted = _count(lambda: unet(_meta(batch, 4, h, w), torch.tensor(500.0, device="meta"),
                                  _meta(batch, 64, 1792), _meta(batch, 1792), _meta(batch, 6)))
    assert costs.unet_step(u, batch, h, w).flops == counted


def test_vae_dit_llm_vit_flops_equal_flop_counter():
    vae = build_on_meta(lambda: VAEDecoder(C8.vae))
    assert costs.vae_decode(C8.vae, 1, 40, 24).flops == _count(lambda: vae(_meta(1, 4, 40, 24)))
    dit = build_on_meta(lambda: NextDiT(C8.dit))
    counted = _count(lambda: dit(_meta(2, 1792, 8, 8), torch.tensor([5, 5], device="meta"), _meta(2, 64, 3584)))
    assert costs.dit_step(C8.dit, 2).flops == counted
    llm = build_on_meta(lambda: Qwen2_5_VLTextModel(C4.text))
    # The reference attends through a dense masked SDPA, which FlopCounterMode counts as the full square.
    counted = _count(lambda: llm(_meta(2, 37, 2048), torch.arange(37, device="meta").expand(3, 2, -1)))
    assert costs.llm_prefill(C4.text, 37, batch=2, causal=False).flops == counted
    vit = build_on_meta(lambda: Qwen2_5_VisionTransformer(C8.vision))
    # Full windows, partial edge windows on both axes, an image smaller than one window, two frames.
    grids = [(1, 16, 16), (1, 20, 12), (1, 6, 10), (2, 8, 8)]
    patches = sum(t * h * w for t, h, w in grids)
    counted = _count(lambda: vit(_meta(patches, 3 * 2 * 14 * 14), torch.tensor(grids)))
    assert costs.vit(C8.vision, grids).flops == counted
