"""The memory plan (runtime/memory.py): the KV pool sized from what weights, stages and the graph pool leave,
typed errors at start instead of out-of-memory mid-request, and the estimates it uses on CPU."""

from __future__ import annotations

import pytest
import torch

from blip3o_engine import CapacityError, EngineConfig
from blip3o_engine.config import preset_config
from blip3o_engine.runtime.memory import (GiB, estimate_stage_bytes, estimate_unet_bytes, kv_bytes_per_token,
                                          plan_memory, weights_bytes)

CPU = torch.device("cpu")
CFG = preset_config("8b")


def plan(budget_gib: float, config: EngineConfig | None = None, weights_gib: float = 15.0, stages_gib: float = 2.0,
         device=CPU, graphs: bool = False):
    stages = {"llm": int(stages_gib * GiB / 2), "decoder": int(stages_gib * GiB / 2)}
    return plan_memory(CFG, config or EngineConfig(), device, torch.bfloat16, int(weights_gib * GiB), stages,
                       measured=False, graphs=graphs, budget=int(budget_gib * GiB), native_hw=(1024, 1024))


def test_kv_pool_is_what_is_left_and_capped_on_cpu():
    p = plan(24.0)  # 24 GiB, 15 of weights, 2 of working sets: 7 left; CPU takes half, capped at 4 GiB
    per_block = kv_bytes_per_token(CFG, torch.bfloat16) * 16
    assert kv_bytes_per_token(CFG, torch.bfloat16) == 57_344  # docs/model_spec.md §4: 8B, bf16
    assert p.num_kv_blocks == int(3.5 * GiB) // per_block and p.kv_pool_bytes == p.num_kv_blocks * per_block
    assert p.headroom_bytes == p.budget_bytes - p.weights_bytes - sum(p.stage_bytes.values()) - p.kv_pool_bytes
    assert p.max_model_len == min(CFG.text.max_position_embeddings, p.num_kv_blocks * 16)
    assert "capped by the KV pool" in " ".join(p.notes)
    big = plan(200.0)
    assert big.kv_pool_bytes <= 4 * GiB  # vLLM's CPU default bound
    assert "memory plan (cpu, estimated)" in p.summary() and "KV pool" in p.summary()


def test_explicit_budgets_and_max_model_len():
    p = plan(24.0, EngineConfig().with_overrides(kv_cache_memory_gb=1.0, max_model_len=4096))
    assert p.kv_pool_bytes <= GiB and p.max_model_len == 4096
    assert plan(24.0, EngineConfig().with_overrides(num_blocks=100)).num_kv_blocks == 100
    with pytest.raises(CapacityError, match="max_model_len = 900000 exceeds"):
        plan(24.0, EngineConfig().with_overrides(max_model_len=900_000))


def test_configurations_that_cannot_fit_fail_at_start():
    with pytest.raises(CapacityError, match="no KV block fits"):
        plan(16.0)  # 15 GiB of weights + 2 of working sets > 16
    with pytest.raises(CapacityError, match="does not fit"):
        plan(24.0, EngineConfig().with_overrides(kv_cache_memory_gb=8.0))  # 7 GiB left
    with pytest.raises(CapacityError, match="does not fit"):
        plan(24.0, EngineConfig().with_overrides(num_blocks=10**7))


def test_cuda_plan_reserves_the_graph_pool_and_takes_the_rest():
    p = plan(80.0, graphs=True, device=torch.device("cuda"))
    assert p.graph_pool_bytes == max(p.stage_bytes.values())
    left = p.budget_bytes - p.weights_bytes - sum(p.stage_bytes.values()) - p.graph_pool_bytes
    assert 0 <= left - p.kv_pool_bytes < kv_bytes_per_token(CFG, torch.bfloat16) * 16  # all of it, in blocks


def test_image_sizes_past_the_plan_are_refused():
    p = plan(24.0)
    p.check_image_size(1024, 1024)
    p.check_image_size(1536, 1024)  # 1.5x the area: the headroom absorbs it
    with pytest.raises(CapacityError, match="a 4096x4096 image needs"):
        p.check_image_size(4096, 4096)


def test_estimates_grow_with_their_inputs():
    ecfg = EngineConfig()
    small = estimate_stage_bytes(CFG, ecfg, torch.bfloat16, (512, 512), 1024)
    big = estimate_stage_bytes(CFG, ecfg, torch.bfloat16, (1024, 1024), 1024)
    assert big["decoder"] == 4 * small["decoder"] and big["vae"] > 3.9 * small["vae"]
    assert small["llm"] == big["llm"] > 0 and small["dit"] > 0
    # The UNet at 128x128 latents for a CFG batch of 8: the spec's ~1.3 GB order of magnitude (docs/model_spec.md §4
    # and pixel_decoder's memory note), not 10x off.
    assert 0.5 * GiB < estimate_unet_bytes(CFG.unet, (128, 128), 8, torch.bfloat16) < 4 * GiB
    assert weights_bytes(torch.nn.Linear(4, 4)) == (16 + 4) * 4
