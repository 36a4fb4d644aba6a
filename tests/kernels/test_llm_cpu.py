"""The CPU attention path (ops/llm_cpu.py) vs the llm_ops ref twins, on the same paged batches as the
Triton tests (shuffled blocks, NaN outside every context, GQA groups 2/7/8, contexts ending mid-block).

Tolerances: fp32 — the CPU path and the refs run the same SDPA math on the same keys, but the CPU path
pads the decode sequences' keys to the longest context (masked) and lets SDPA broadcast GQA instead of
`repeat_interleave`, which may change the summation order: 16 fp32 ulps of the largest |ref| as the
kernel tests. fp16: the padded, masked keys change nothing in the math, so its error against an fp32
oracle stays within 2x the ref's own.
"""

from __future__ import annotations

import pytest
import torch

from blip3o_engine.ops import llm_cpu
from blip3o_engine import ops
from test_llm_kernels import CONFIGS, _lens, _mrope_inputs, _upcast_batch, assert_close_to_ref, make_batch

DTYPES = [torch.float32, torch.float16]


def _plan(b, dtype, decode: bool) -> llm_cpu.StepPlan:
    """The step plan of a PagedBatch (attention reads only its slots and masks; rotary is tested apart)."""
    t, d = b.q.shape[0], b.q.shape[-1]
    section = (d // 8, d // 8, d // 4)  # any split summing to d/2
    return llm_cpu.plan_step(torch.zeros(3, t, dtype=torch.int32), ops.rope_cos_sin_cache(d, 1e6, 8), section,
                             dtype, torch.zeros(t, dtype=torch.int32), b.block_tables, b.context_lens,
                             None if decode else b.cu_seqlens_q, b.k_cache.shape[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_prefill_attention_matches_ref(cfg, dtype):
    """Mixed step: a one-token sequence (batched decode branch), a prefix-cached chunk (mask) and a full
    prompt (causal) — the ref's packed output, row for row."""
    lens, q_lens = _lens(cfg)
    b = make_batch(lens, q_lens, *cfg, dtype)
    scale = cfg[3] ** -0.5
    out = llm_cpu.attention(b.q, b.k_cache, b.v_cache, _plan(b, dtype, decode=False), scale)
    assert not out.isnan().any()  # no slot outside a context was read unmasked
    args = (b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q, b.context_lens, scale)
    ref = ops.paged_prefill_attention_ref(b.q, *args)
    oracle = ops.paged_prefill_attention_ref(b.q.float(), *_upcast_batch(b), *args[2:])
    assert_close_to_ref(out, ref, oracle, ulps=16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_decode_attention_matches_ref(cfg, dtype):
    """Decode step over sequences of different lengths (padded keys masked in one batched SDPA)."""
    lens, _ = _lens(cfg)
    b = make_batch(lens, [1] * len(lens), *cfg, dtype)
    scale = cfg[3] ** -0.5
    out = llm_cpu.attention(b.q, b.k_cache, b.v_cache, _plan(b, dtype, decode=True), scale)
    assert not out.isnan().any()
    args = (b.k_cache, b.v_cache, b.block_tables, b.context_lens, scale)
    ref = ops.paged_decode_attention_ref(b.q, *args)
    oracle = ops.paged_decode_attention_ref(b.q.float(), *_upcast_batch(b), *args[2:])
    assert_close_to_ref(out, ref, oracle, ulps=16)


def test_decode_equal_lengths_and_empty_context():
    """Equal lengths take the unmasked branch; a zero context gives zeros (the ops' contract), not NaN."""
    cfg = (4, 4, 2, 32)
    b = make_batch([9, 9], [1, 1], *cfg, torch.float32)
    plan = _plan(b, torch.float32, decode=True)
    assert plan.decode_mask is None
    out = llm_cpu.attention(b.q, b.k_cache, b.v_cache, plan, 0.2)
    ref = ops.paged_decode_attention_ref(b.q, b.k_cache, b.v_cache, b.block_tables, b.context_lens, 0.2)
    torch.testing.assert_close(out, ref, rtol=0, atol=16 * torch.finfo(torch.float32).eps * ref.abs().max().item())

    b = make_batch([5, 1, 7], [1, 1, 1], *cfg, torch.float32)
    b.context_lens[1] = 0
    out = llm_cpu.attention(b.q, b.k_cache, b.v_cache, _plan(b, torch.float32, decode=True), 0.2)
    assert (out[1] == 0).all() and not out.isnan().any()
    ref = ops.paged_decode_attention_ref(b.q, b.k_cache, b.v_cache, b.block_tables, b.context_lens, 0.2)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_sequence_without_new_tokens_is_skipped():
    """A sequence with q_len 0 between two others contributes no rows and reads nothing."""
    b = make_batch([6, 9, 3], [2, 0, 3], 4, 4, 2, 32, torch.float32)
    plan = _plan(b, torch.float32, decode=False)
    assert len(plan.prefills) == 2 and plan.decode_rows is None
    out = llm_cpu.attention(b.q, b.k_cache, b.v_cache, plan, 0.2)
    ref = ops.paged_prefill_attention_ref(b.q, b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q,
                                          b.context_lens, 0.2)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_write_kv_skips_padding_and_equals_ref(dtype):
    """Shuffled slots with two padding tokens (-1): the caches equal the ref's exactly (a copy)."""
    g = torch.Generator().manual_seed(3)
    k = torch.randn(7, 2, 16, generator=g).to(dtype)
    v = torch.randn(7, 2, 16, generator=g).to(dtype)
    slots = torch.tensor([11, -1, 3, 8, -1, 0, 5], dtype=torch.int32)
    caches = [torch.full((4, 4, 2, 16), float("nan"), dtype=dtype) for _ in range(4)]
    plan = llm_cpu.plan_step(torch.zeros(3, 7, dtype=torch.int32), ops.rope_cos_sin_cache(16, 1e4, 4), (2, 3, 3),
                             dtype, slots, torch.zeros(1, 4, dtype=torch.int32), torch.tensor([4], dtype=torch.int32),
                             torch.tensor([0, 7], dtype=torch.int32), 4)
    llm_cpu.write_kv(k, v, caches[0], caches[1], plan)
    ops.write_kv_cache_ref(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0].nan_to_num(-7), caches[2].nan_to_num(-7))
    assert torch.equal(caches[1].nan_to_num(-7), caches[3].nan_to_num(-7))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_planned_rotary_is_the_ref(dtype):
    """cos/sin built once per step, applied per layer: bit-identical to mrope_rotary_ref (same ops)."""
    q, k, positions = _mrope_inputs(5, 28, 4, 128, dtype)
    cache = ops.rope_cos_sin_cache(128, 1e6, 64)
    plan = llm_cpu.plan_step(positions, cache, (16, 24, 24), dtype, torch.zeros(5, dtype=torch.int32),
                             torch.zeros(1, 1, dtype=torch.int32), torch.tensor([5], dtype=torch.int32),
                             torch.tensor([0, 5], dtype=torch.int32), 16)
    got_q, got_k = llm_cpu.rotary(q, k, plan)
    ref_q, ref_k = ops.mrope_rotary_ref(q, k, positions, cache, (16, 24, 24))
    assert torch.equal(got_q, ref_q) and torch.equal(got_k, ref_k)
