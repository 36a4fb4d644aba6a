"""GPU checks of the paged AR engine (skipped without CUDA): the KV pool sized from free memory, CUDA-
graph decode, and greedy tokens equal to the CPU reference in fp32 (the Triton attention uses
IEEE fp32 dots, no TF32, so fp32 logits differ from the reference only by summation order)."""

from __future__ import annotations

import pytest
import torch

from blip3o_engine import SamplingParams
from blip3o_engine.engine import Engine
from blip3o_engine.runtime.model_runner import RunnerConfig, graph_batch_sizes

pytestmark = pytest.mark.gpu

CONVS = [[{"role": "user", "content": text}] for text in
         ("Hi.", "Describe a red apple on a wooden table, please.", "Tell me a long story about dragons.")]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


def gpu_engine(tiny_dir, dtype="float32", **cfg) -> Engine:
    eng = Engine.from_pretrained(str(tiny_dir), device="cuda", dtype=dtype, backend="optimized")
    eng.runner_config = RunnerConfig(**cfg)
    return eng


def count_replays(eng: Engine) -> list[int]:
    """Wrap every captured graph's replay with a counter (one cell per call)."""
    calls: list[int] = []
    for bs, (graph, logits) in list(eng.llm_engine.runner._graphs.items()):
        replay = graph.replay

        def counted(replay=replay, bs=bs):
            calls.append(bs)
            replay()

        graph.replay = counted
    return calls


def test_graph_decode_greedy_equals_cpu_reference(tiny_dir, tiny_engine):
    eng = gpu_engine(tiny_dir, block_size=16, max_num_seqs=8, max_num_batched_tokens=512)
    runner = eng.llm_engine.runner
    assert runner.layout.num_blocks > 0 and runner.kv_caches[0][0].is_cuda  # profiled from free memory
    assert runner.layout.graph_batch_sizes == graph_batch_sizes(8) == [1, 2, 4, 8]
    calls = count_replays(eng)
    results = eng.chat_batch(CONVS, GREEDY)
    assert calls and set(calls) <= {4}  # 3 decoding sequences pad to the 4-bucket
    for r, conv in zip(results, CONVS):
        assert r.token_ids == tiny_engine.chat(conv, GREEDY).token_ids
    eng.llm_engine.kv.check_invariants()
    assert eng.llm_engine.kv.num_free_blocks == eng.llm_engine.kv.num_blocks


def test_graphs_equal_eager_and_small_pool_preemption(tiny_dir):
    cfg = {"block_size": 4, "num_blocks": 24, "max_num_seqs": 4, "max_num_batched_tokens": 64}
    eager = gpu_engine(tiny_dir, cuda_graphs=False, **cfg)
    graphs = gpu_engine(tiny_dir, **cfg)
    # 24 blocks of 4 tokens (prompts of 33, 47, 54 tokens + 15 KV tokens of output): each request fits
    # alone; the first two are admitted together and the second is preempted as they grow (the same
    # schedule on CPU preempts '__chat-1').
    preempted = []
    schedule = graphs.llm_engine.scheduler.schedule

    def recording():
        out = schedule()
        preempted.extend(out.preempted_ids)
        return out

    graphs.llm_engine.scheduler.schedule = recording
    want = [r.token_ids for r in eager.chat_batch(CONVS, GREEDY)]
    assert [r.token_ids for r in graphs.chat_batch(CONVS, GREEDY)] == want
    assert preempted
    assert not eager.llm_engine.runner._graphs and graphs.llm_engine.runner._graphs


def test_bf16_reproducible_and_fp32_seeded_sampling_batch_independent(tiny_dir):
    sampled = SamplingParams(max_tokens=12, temperature=0.8, top_k=50, seed=3, ignore_eos=True)
    bf16 = gpu_engine(tiny_dir, dtype="bfloat16", max_num_seqs=4, max_num_batched_tokens=256)
    first = [r.token_ids for r in bf16.chat_batch(CONVS, [GREEDY, sampled, GREEDY])]
    assert [r.token_ids for r in bf16.chat_batch(CONVS, [GREEDY, sampled, GREEDY])] == first
    assert len(first[0]) == 16
    # Batch independence in fp32: the request's own generator makes the draws independent of its
    # neighbours; fp32 keeps the logits' batch-shape-dependent rounding (~1e-6) far from flipping a draw.
    fp32 = gpu_engine(tiny_dir, max_num_seqs=4, max_num_batched_tokens=256)
    alone = fp32.chat(CONVS[1], sampled).token_ids
    assert fp32.chat_batch(CONVS, [GREEDY, sampled, GREEDY])[1].token_ids == alone
    torch.cuda.synchronize()
