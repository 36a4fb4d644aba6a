"""Parity of the reference Qwen2.5-VL modules with transformers' Qwen2_5_VLForConditionalGeneration.

The oracle runs with attn_implementation="eager" (explicit matmul + fp32 softmax), so it shares no
attention code with ours (SDPA). Weights are random with unit-scale norms/biases (not HF's 0.02 init,
which would make attention near-uniform and hide position bugs), sizes are odd, and the text RoPE
base is small so that every M-RoPE section (including the low-frequency width chunk) turns by a
visible angle over a few positions.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from blip3o_engine.config import TextConfig, VisionConfig
from blip3o_engine.errors import InputError
from blip3o_engine.models.qwen2_5_vl import (
    KVCache, Qwen2_5_VisionTransformer, Qwen2_5_VLTextModel, RMSNorm, get_mrope_positions, vision_position_ids,
    vision_windows,
)
from blip3o_engine.models.qwen2_5_vl import rope_inv_freq
from blip3o_engine.ops.llm_ops import mrope_cos_sin as _mrope_cos_sin, mrope_cos_sin_from_freqs, rope_cos_sin_cache

transformers = pytest.importorskip("transformers")
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: E402
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf_qwen  # noqa: E402
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index  # noqa: E402

IMAGE_ID, VIDEO_ID, VSTART_ID, VEND_ID = 290, 291, 292, 293
TEXT_IDS = 280  # ordinary text tokens are drawn from [0, 280)

TEXT = TextConfig(vocab_size=301, hidden_size=84, intermediate_size=136, num_hidden_layers=3, num_attention_heads=6,
                  num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=50.0, mrope_section=(2, 2, 3),
                  tie_word_embeddings=False, max_position_embeddings=1024)
VISION = VisionConfig(depth=4, hidden_size=40, intermediate_size=72, num_heads=2, fullatt_block_indexes=(1, 3),
                      out_hidden_size=84)
# Patch grids (t, h, w): window side = 112 // 14 // 2 = 4 merged cells, so 3x5 and 8x6 cells both
# end in partial windows.
GRIDS = [(1, 6, 10), (1, 16, 12)]
PIXEL_WIDTH = VISION.in_channels * VISION.temporal_patch_size * VISION.patch_size ** 2

# fp32 with a different attention implementation (eager matmul vs SDPA) and different summation
# orders: agreement to ~1e-6 is typical; 2e-5 absolute on O(1) logits leaves room without hiding a
# real bug (a wrong position or mask changes logits by > 1e-2).
ATOL_FP32 = 2e-5


def mrope_cos_sin(pos: torch.Tensor, cfg: TextConfig, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense model's M-RoPE cos/sin `[B, L, d]` for positions `[3, B, L]` (head dim squeezed); the paged
    engine's table lookup must give exactly the same values."""
    cos, sin = mrope_cos_sin_from_freqs(pos, rope_inv_freq(cfg.head_dim, cfg.rope_theta), cfg.mrope_section, dtype)
    table_cos, table_sin = _mrope_cos_sin(pos, rope_cos_sin_cache(cfg.head_dim, cfg.rope_theta, 64),
                                          cfg.mrope_section, dtype)
    assert torch.equal(cos, table_cos) and torch.equal(sin, table_sin)
    return cos[..., 0, :], sin[..., 0, :]


def hf_config(tie: bool) -> Qwen2_5_VLConfig:
    t, v = TEXT, VISION
    text = dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                num_key_value_heads=t.num_key_value_heads, rms_norm_eps=t.rms_norm_eps,
                max_position_embeddings=t.max_position_embeddings, bos_token_id=None, eos_token_id=None,
                rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta,
                                 "mrope_section": list(t.mrope_section)})
    vision = dict(depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                  num_heads=v.num_heads, in_channels=v.in_channels, patch_size=v.patch_size,
                  temporal_patch_size=v.temporal_patch_size, spatial_merge_size=v.spatial_merge_size,
                  window_size=v.window_size, fullatt_block_indexes=list(v.fullatt_block_indexes),
                  out_hidden_size=v.out_hidden_size)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_ID,
                            video_token_id=VIDEO_ID, vision_start_token_id=VSTART_ID,
                            vision_end_token_id=VEND_ID, tie_word_embeddings=tie)


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Unit-scale random weights: norms ~ 1 ± 0.2, biases ~ 0.2·N(0,1), matrices ~ N(0, 1/fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name or "ln_q" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)


def to_hf_state_dict(text: Qwen2_5_VLTextModel, vision: Qwen2_5_VisionTransformer) -> dict[str, torch.Tensor]:
    """Our names -> transformers 5.x module paths (model.language_model.*, model.visual.*, lm_head)."""
    sd = {f"model.visual.{k}": v for k, v in vision.state_dict().items()}
    for k, v in text.state_dict().items():
        sd[k if k == "lm_head.weight" else f"model.language_model.{k}"] = v
    if text.cfg.tie_word_embeddings:
        sd["lm_head.weight"] = text.embed_tokens.weight  # HF keeps a (tied) lm_head entry
    return sd


def build(tie: bool = False, seed: int = 0):
    text_cfg = dataclasses.replace(TEXT, tie_word_embeddings=tie)
    text, vision = Qwen2_5_VLTextModel(text_cfg).eval(), Qwen2_5_VisionTransformer(VISION).eval()
    randomize_(text, seed)
    randomize_(vision, seed + 1)
    hf = Qwen2_5_VLForConditionalGeneration._from_config(hf_config(tie), attn_implementation="eager",
                                                         dtype=torch.float32).eval()
    hf.load_state_dict(to_hf_state_dict(text, vision), strict=True)
    return text, vision, hf


@pytest.fixture(scope="module")
def models():
    return build(tie=False)


def text_positions(B: int, L: int, start: int = 0) -> torch.Tensor:
    return torch.arange(start, start + L).expand(3, B, L)  # [3, B, L]


def random_pixels(grids, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    n = sum(t * h * w for t, h, w in grids)
    pixels = torch.randn(n, PIXEL_WIDTH, generator=torch.Generator().manual_seed(seed))
    return pixels, torch.tensor(grids)


def image_tokens(grid) -> list[int]:
    t, h, w = grid
    return [VSTART_ID] + [IMAGE_ID] * (t * h * w // VISION.spatial_merge_size ** 2) + [VEND_ID]


def random_text(n: int, seed: int) -> list[int]:
    return torch.randint(0, TEXT_IDS, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def mm_token_type_ids(ids: torch.Tensor) -> torch.Tensor:
    return (ids == IMAGE_ID).int()


# ------------------------------------------------------------------------------------------------
# Structure


@pytest.mark.parametrize("tie", [False, True])
def test_parameter_names_and_shapes_match_hf(tie):
    text = Qwen2_5_VLTextModel(dataclasses.replace(TEXT, tie_word_embeddings=tie))
    vision = Qwen2_5_VisionTransformer(VISION)
    ours = {k: tuple(v.shape) for k, v in to_hf_state_dict(text, vision).items()}
    hf = Qwen2_5_VLForConditionalGeneration(hf_config(tie))
    assert ours == {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert ("lm_head.weight" in text.state_dict()) == (not tie)


def test_meta_construction_no_buffers_and_assign_load(models):
    text, vision, _ = models
    with torch.device("meta"):
        meta_text, meta_vision = Qwen2_5_VLTextModel(TEXT), Qwen2_5_VisionTransformer(VISION)
    for meta, real in ((meta_text, text), (meta_vision, vision)):
        assert list(meta.buffers()) == []
        assert all(p.is_meta for p in meta.parameters())
        meta.load_state_dict(real.state_dict(), assign=True)
        assert not any(p.is_meta for p in meta.parameters())
    ids = torch.tensor([random_text(5, 1)])
    with torch.no_grad():
        out = meta_text(meta_text.embed(ids), text_positions(1, 5))
        ref = text(text.embed(ids), text_positions(1, 5))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # same weights, same code: bitwise


# ------------------------------------------------------------------------------------------------
# Unit checks against the oracle's building blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_bitwise_equal_to_hf(dtype):
    g = torch.Generator().manual_seed(3)
    x = (4 * torch.randn(5, 7, 84, generator=g)).to(dtype)
    ours, theirs = RMSNorm(84, 1e-6).to(dtype), hf_qwen.Qwen2_5_VLRMSNorm(84, eps=1e-6).to(dtype)
    with torch.no_grad():
        ours.weight.copy_(1 + torch.randn(84, generator=g))
        theirs.weight.copy_(ours.weight)
        # Same op order (fp32 variance, cast back, then weight): bitwise equal also in bf16.
        assert torch.equal(ours(x), theirs(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mrope_tables_equal_hf(dtype):
    hf_rope = hf_qwen.Qwen2_5_VLRotaryEmbedding(hf_config(False).text_config)
    # Three different rows so that a swapped or interleaved section layout shows.
    pos = torch.stack([torch.randint(0, 50, (2, 9)), torch.randint(0, 50, (2, 9)), torch.randint(0, 50, (2, 9))])
    cos, sin = mrope_cos_sin(pos, TEXT, dtype)
    hf_cos, hf_sin = hf_rope(torch.zeros(1, dtype=dtype), pos)
    assert cos.dtype == dtype and cos.shape == (2, 9, TEXT.head_dim)
    assert torch.equal(cos, hf_cos) and torch.equal(sin, hf_sin)  # same fp32 formula: exact


def test_mrope_sections_take_their_axis():
    # Only the height row differs: only the height section (pairs 2..3) may change.
    base = torch.zeros(3, 1, 1, dtype=torch.long)
    moved = base.clone()
    moved[1] = 5
    changed = (mrope_cos_sin(base, TEXT, torch.float32)[0] != mrope_cos_sin(moved, TEXT, torch.float32)[0])[0, 0]
    half = TEXT.head_dim // 2
    expected = torch.zeros(half, dtype=torch.bool)
    expected[2:4] = True
    assert torch.equal(changed, torch.cat((expected, expected)))


@pytest.mark.parametrize("grids", [GRIDS, [(2, 8, 8)], [(1, 4, 2), (3, 16, 16), (1, 18, 6)]])
def test_vision_layout_equals_hf(grids):
    grid_thw = torch.tensor(grids)
    assert torch.equal(vision_position_ids(grids, 2), get_vision_position_ids(grid_thw, 2))
    index, seqlens = vision_windows(grids, VISION)
    hf_index, hf_cu = get_vision_window_index(grid_thw, 2, VISION.window_size, VISION.patch_size)
    assert torch.equal(index, hf_index)
    assert torch.cumsum(torch.tensor([0] + seqlens), 0).tolist() == hf_cu.tolist()


# ------------------------------------------------------------------------------------------------
# Text model


def hf_logits(hf, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=ids, **kwargs).logits


@pytest.mark.parametrize("tie", [False, True])
def test_text_logits_batch(tie, models):
    text, _, hf = models if not tie else build(tie=True, seed=5)
    ids = torch.tensor([random_text(13, 10), random_text(13, 11)])  # [2, 13]
    with torch.no_grad():
        logits = text.compute_logits(text(text.embed(ids), text_positions(2, 13)))
    torch.testing.assert_close(logits, hf_logits(hf, ids), rtol=0, atol=ATOL_FP32)


def test_prefill_then_decode_with_cache(models):
    text, _, hf = models
    ids = torch.tensor([random_text(14, 20), random_text(14, 21)])  # [2, 11 prompt + 3 decoded]
    cache = KVCache(TEXT.num_hidden_layers)
    with torch.no_grad():
        steps = [text.compute_logits(text(text.embed(ids[:, :11]), text_positions(2, 11), cache))]
        for pos in range(11, 14):
            assert cache.length == pos
            steps.append(text.compute_logits(text(text.embed(ids[:, pos:pos + 1]), text_positions(2, 1, pos), cache)))
    assert cache.length == 14 and cache.keys[0].shape == (2, TEXT.num_key_value_heads, 14, TEXT.head_dim)
    torch.testing.assert_close(torch.cat(steps, dim=1), hf_logits(hf, ids), rtol=0, atol=ATOL_FP32)


def test_left_padded_batch_matches_single_sequences(models):
    text, _, _ = models
    prompts = [random_text(9, 30), random_text(6, 31)]
    decoded = [random_text(2, 32), random_text(2, 33)]
    pad = 9 - 6

    def run_single(prompt, tail):
        cache = KVCache(TEXT.num_hidden_layers)
        ids = torch.tensor([prompt])
        out = [text(text.embed(ids), text_positions(1, len(prompt)), cache)]
        for k, tok in enumerate(tail):
            out.append(text(text.embed(torch.tensor([[tok]])), text_positions(1, 1, len(prompt) + k), cache))
        return torch.cat(out, dim=1)[0]  # [len(prompt) + len(tail), H]

    with torch.no_grad():
        singles = [run_single(p, d) for p, d in zip(prompts, decoded)]
        ids = torch.tensor([prompts[0], [0] * pad + prompts[1]])  # [2, 9], row 1 left-padded
        mask = torch.tensor([[True] * 9, [False] * pad + [True] * 6])
        positions = torch.stack([torch.arange(9), (torch.arange(9) - pad).clamp(min=0)])  # [2, 9]
        cache = KVCache(TEXT.num_hidden_layers)
        batch = [text(text.embed(ids), positions.expand(3, 2, 9), cache, mask)]
        for k in range(2):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], dim=1)
            step_pos = torch.tensor([9 + k, 6 + k]).view(1, 2, 1).expand(3, 2, 1)
            step_ids = torch.tensor([[decoded[0][k]], [decoded[1][k]]])
            batch.append(text(text.embed(step_ids), step_pos, cache, mask))
        batch = torch.cat(batch, dim=1)  # [2, 11, H]
    assert torch.isfinite(batch).all()  # padding rows stay finite
    # Same math, only masked-out keys added: fp32 rounding differences only.
    torch.testing.assert_close(batch[0], singles[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(batch[1, pad:], singles[1], rtol=0, atol=1e-5)
    # And the mask matters: without it row 1 reads its padding.
    with torch.no_grad():
        unmasked = text(text.embed(ids), positions.expand(3, 2, 9))
    assert (unmasked[1, pad:] - singles[1][:6]).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------------
# Vision tower and the multimodal path


def test_vision_tower_two_images(models):
    _, vision, hf = models
    pixels, grid_thw = random_pixels(GRIDS)
    with torch.no_grad():
        ours = vision(pixels, grid_thw)
        theirs = hf.model.visual(pixels, grid_thw=grid_thw).pooler_output
        per_image = hf.model.get_image_features(pixels, grid_thw).pooler_output
    assert ours.shape == (sum(t * h * w for t, h, w in GRIDS) // 4, VISION.out_hidden_size)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL_FP32)
    torch.testing.assert_close(ours, torch.cat(per_image), rtol=0, atol=ATOL_FP32)
    # Each image is encoded independently of the other (attention confined per image).
    with torch.no_grad():
        alone = vision(pixels[:60], grid_thw[:1])
    torch.testing.assert_close(ours[:15], alone, rtol=0, atol=1e-5)


def multimodal_prompt(seed: int) -> list[int]:
    return (random_text(4, seed) + image_tokens(GRIDS[0]) + random_text(3, seed + 1) + image_tokens(GRIDS[1])
            + random_text(5, seed + 2))


def our_multimodal_prefill(text, vision, ids: list[int], pixels, grid_thw, cache=None):
    """embed, scatter the vision tower's rows into the <|image_pad|> slots, 3-D positions, decode."""
    ids_t = torch.tensor([ids])
    embeds = text.embed(ids_t)  # [1, L, H]
    is_image = ids_t == IMAGE_ID
    embeds[is_image] = vision(pixels, grid_thw)
    positions, delta = get_mrope_positions(ids, GRIDS, IMAGE_ID, VISION.spatial_merge_size)
    return text(embeds, positions[:, None, :], cache), delta


def test_multimodal_forward_matches_hf(models):
    text, vision, hf = models
    ids = multimodal_prompt(40)
    pixels, grid_thw = random_pixels(GRIDS, seed=1)
    ids_t = torch.tensor([ids])
    with torch.no_grad():
        hidden, _ = our_multimodal_prefill(text, vision, ids, pixels, grid_thw)
        theirs = hf_logits(hf, ids_t, pixel_values=pixels, image_grid_thw=grid_thw,
                           mm_token_type_ids=mm_token_type_ids(ids_t))
        # Control: 1-D positions give clearly different logits, so the test sees M-RoPE errors.
        flat = hf_logits(hf, ids_t, pixel_values=pixels, image_grid_thw=grid_thw)
    logits = text.compute_logits(hidden)
    torch.testing.assert_close(logits, theirs, rtol=0, atol=ATOL_FP32)
    assert (flat - theirs).abs().max() > 1e-2


def test_multimodal_decode_uses_rope_delta(models):
    # Decode token k sits at L + k + rope_delta; HF's full forward over prompt + answer computes
    # those positions with get_rope_index over the whole sequence, so the logits must agree.
    text, vision, hf = models
    prompt, answer = multimodal_prompt(50), random_text(3, 53)
    pixels, grid_thw = random_pixels(GRIDS, seed=2)
    cache = KVCache(TEXT.num_hidden_layers)
    with torch.no_grad():
        hidden, delta = our_multimodal_prefill(text, vision, prompt, pixels, grid_thw, cache)
        steps = [text.compute_logits(hidden)]
        for k, tok in enumerate(answer):
            pos = torch.full((3, 1, 1), len(prompt) + k + delta)
            steps.append(text.compute_logits(text(text.embed(torch.tensor([[tok]])), pos, cache)))
        full = torch.tensor([prompt + answer])
        theirs = hf_logits(hf, full, pixel_values=pixels, image_grid_thw=grid_thw,
                           mm_token_type_ids=mm_token_type_ids(full))
    assert delta < 0
    torch.testing.assert_close(torch.cat(steps, dim=1), theirs, rtol=0, atol=ATOL_FP32)


# ------------------------------------------------------------------------------------------------
# 3-D positions


POSITION_CASES = {
    "text only": (random_text(7, 60), []),
    "one image, in the middle": (random_text(3, 61) + image_tokens((1, 6, 10)) + random_text(4, 62),
                                 [(1, 6, 10)]),
    "one image first, tall": ([IMAGE_ID] * 10 + random_text(2, 63), [(1, 10, 4)]),
    "two images, last at the end": (random_text(2, 64) + image_tokens((1, 16, 12)) + random_text(1, 65)
                                    + [VSTART_ID] + [IMAGE_ID] * 6, [(1, 16, 12), (1, 4, 6)]),
}


@pytest.mark.parametrize("case", list(POSITION_CASES))
def test_mrope_positions_equal_hf_get_rope_index(case, models):
    ids, grids = POSITION_CASES[case]
    hf = models[2]
    ids_t = torch.tensor([ids])
    hf_pos, hf_delta = hf.model.get_rope_index(ids_t, mm_token_type_ids(ids_t),
                                               image_grid_thw=torch.tensor(grids) if grids else None)
    pos, delta = get_mrope_positions(ids, grids, IMAGE_ID, VISION.spatial_merge_size)
    assert pos.dtype == torch.long and pos.shape == (3, len(ids))
    assert torch.equal(pos, hf_pos[:, 0])
    assert delta == int(hf_delta[0, 0])


@pytest.mark.parametrize("ids, grids", [
    ([1, IMAGE_ID, IMAGE_ID, 2], [(1, 4, 4)]),  # 2 tokens for a 4-token grid
    ([1, IMAGE_ID, 2], []),  # an image run with no grid
    ([1, 2], [(1, 2, 2)]),  # a grid with no image run
    ([IMAGE_ID] * 3, [(1, 3, 4)]),  # grid not divisible by the merge size
])
def test_mrope_positions_reject_mismatched_images(ids, grids):
    with pytest.raises(InputError):
        get_mrope_positions(ids, grids, IMAGE_ID, 2)


# ------------------------------------------------------------------------------------------------
# bf16: our rounding should track the oracle's, not just be "close to fp32"


def test_bf16_error_no_worse_than_hf(models):
    text, vision, hf = models
    ids = torch.tensor([random_text(12, 70)])
    pixels, grid_thw = random_pixels(GRIDS, seed=3)
    with torch.no_grad():
        ref_text = text(text.embed(ids), text_positions(1, 12))
        ref_vision = vision(pixels, grid_thw)
        text16, vision16, hf16 = (copy.deepcopy(m).to(torch.bfloat16) for m in (text, vision, hf))
        ours_text = text16(text16.embed(ids), text_positions(1, 12)).float()
        ours_vision = vision16(pixels.bfloat16(), grid_thw).float()
        hf_text = hf16.model.language_model(input_ids=ids).last_hidden_state.float()
        hf_vision = hf16.model.visual(pixels.bfloat16(), grid_thw=grid_thw).pooler_output.float()
    # Same op order and upcasts as the oracle: at most 2x its bf16 error (+ one bf16 ulp of slack).
    for ours, theirs, ref in ((ours_text, hf_text, ref_text), (ours_vision, hf_vision, ref_vision)):
        ours_err, hf_err = (ours - ref).abs().max(), (theirs - ref).abs().max()
        assert ours_err <= 2 * hf_err + 2 ** -8 * ref.abs().max(), (ours_err, hf_err)
