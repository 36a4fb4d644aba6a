"""GPU checks of the reference backend (skipped without CUDA): bf16 on the device tracks fp32 on
the CPU, and greedy chat in fp32 on the GPU gives the CPU's tokens."""

from __future__ import annotations

import pytest
import torch

from blip3o_engine import Engine, ImageParams, SamplingParams

pytestmark = pytest.mark.gpu

MESSAGES = [{"role": "user", "content": "Describe a red apple on a wooden table."}]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm()).item()


def test_fp32_cuda_greedy_tokens_equal_cpu(tiny_dir, tiny_engine):
    gpu = Engine.from_pretrained(str(tiny_dir), device="cuda", dtype="float32")
    params = SamplingParams(max_tokens=16, temperature=0.0)
    assert gpu.chat(MESSAGES, params).token_ids == tiny_engine.chat(MESSAGES, params).token_ids


def test_bf16_cuda_t2i_tracks_fp32_cpu(tiny_dir, tiny_engine):
    gpu = Engine.from_pretrained(str(tiny_dir), device="cuda", dtype="bfloat16")
    params = ImageParams(seed=5, dit_steps=6, decoder_steps=6)
    cond = tiny_engine.encode_prompt("a red apple")
    # bf16 through a 2-layer LLM: see tests/parity/test_low_precision.py for the budget.
    assert rel_err(gpu.encode_prompt("a red apple"), cond) < 5e-2
    feats_gpu = gpu.sample_clip_features(cond[None].cuda(), params)
    feats_cpu = tiny_engine.sample_clip_features(cond[None], params)
    assert feats_gpu.device.type == "cuda" and rel_err(feats_gpu, feats_cpu) < 1e-1
