"""GPU checks of the paged AR stage (skipped without CUDA): the KV pool sized by the memory plan, CUDA-graph
decode, the staging buffers' ordering, and greedy tokens equal to the CPU reference in fp32 (the Triton
attention uses IEEE fp32 dots, no TF32, so fp32 logits differ from the reference only by summation order)."""

from __future__ import annotations

import pytest
import torch

from blip3o_engine import Engine, ImageParams, SamplingParams
from blip3o_engine.runtime.cuda_graphs import batch_buckets
from _gpu_util import ReplayCounter  # tests/gpu is on sys.path under pytest
from _paged_util import Recorder  # tests/parity (tests/conftest.py)

pytestmark = pytest.mark.gpu

CONVS = [[{"role": "user", "content": text}] for text in
         ("Hi.", "Describe a red apple on a wooden table, please.", "Tell me a long story about dragons.")]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


def gpu_engine(tiny_dir, dtype="float32", **options) -> Engine:
    return Engine.from_pretrained(str(tiny_dir), device="cuda", dtype=dtype, backend="optimized", **options)


def assert_pool_clean(eng: Engine) -> None:
    eng._ar.kv.check_invariants()
    assert eng._ar.kv.num_free_blocks == eng._ar.kv.num_blocks


def test_graph_decode_greedy_equals_cpu_reference(tiny_dir, tiny_engine):
    eng = gpu_engine(tiny_dir, block_size=16, max_num_seqs=8, max_num_batched_tokens=512)
    runner = eng._ar.runner
    plan = eng.memory_plan()
    assert plan.measured and plan.num_kv_blocks > 0 and runner.kv_caches[0][0].is_cuda
    assert plan.kv_pool_bytes <= plan.budget_bytes - plan.weights_bytes
    assert runner.buckets == batch_buckets(8) == [1, 2, 4, 8] and len(runner.graphs) == 4
    replays = ReplayCounter(runner.graphs)
    results = eng.chat_batch(CONVS, GREEDY)
    assert replays.calls and set(replays.calls) <= {4}  # 3 decoding sequences pad to the 4-bucket
    for r, conv in zip(results, CONVS):
        assert r.token_ids == tiny_engine.chat(conv, GREEDY).token_ids
    assert_pool_clean(eng)


def test_graphs_equal_eager_and_small_pool_preemption(tiny_dir):
    cfg = {"block_size": 4, "num_blocks": 24, "max_num_seqs": 4, "max_num_batched_tokens": 64}
    eager = gpu_engine(tiny_dir, cuda_graphs=False, **cfg)
    graphs = gpu_engine(tiny_dir, **cfg)
    # 24 blocks of 4 tokens (prompts of 33, 47, 54 tokens + 15 KV tokens of output): each request fits alone;
    # the first two are admitted together and the second is preempted as they grow.
    rec = Recorder(graphs._ar)
    want = [r.token_ids for r in eager.chat_batch(CONVS, GREEDY)]
    assert [r.token_ids for r in graphs.chat_batch(CONVS, GREEDY)] == want
    assert any(o.preempted_ids for o in rec.outputs)
    assert len(eager._ar.runner.graphs) == 0 and len(graphs._ar.runner.graphs) > 0


def test_staging_buffers_survive_prefill_only_steps(tiny_dir, tiny_engine):
    """What the double-buffered staging guards against: many steps that never synchronise (chunks of a long
    prompt, T2I prefills) queued back to back between decodes. Without an event per staging set, step N+2's
    metadata could overwrite step N+1's pinned buffer while its copy is still queued. Chat tokens must equal
    the CPU reference, and every image's query states the reference's."""
    eng = gpu_engine(tiny_dir, block_size=4, max_num_seqs=8, max_num_batched_tokens=24, long_prefill_chunk=8)
    long_chat = [{"role": "user", "content": "Tell me a long story about " + "many " * 30 + "dragons."}]
    eng.add_request("long", long_chat, GREEDY)
    eng.add_request("short", CONVS[0], GREEDY)
    params = ImageParams(seed=1, dit_steps=2, decoder_steps=2)
    prompts = ["a red apple", "a dog on the beach at sunset", "x"]
    for i, prompt in enumerate(prompts):
        eng.add_image_request(f"img{i}", prompt, params)
    rec = Recorder(eng._ar)
    done = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    assert sum(1 for o in rec.outputs if o.scheduled and not any(s.samples for s in o.scheduled)) >= 4
    assert done["long"].token_ids == tiny_engine.chat(long_chat, GREEDY).token_ids
    assert done["short"].token_ids == tiny_engine.chat(CONVS[0], GREEDY).token_ids
    for i, prompt in enumerate(prompts):
        got = done[f"img{i}"].result.clip_features
        assert got.shape == (tiny_engine.cfg.n_query, tiny_engine.cfg.dit.in_channels)
        ref = tiny_engine.generate_image(prompt, params).clip_features
        # fp32 on both sides; GPU kernels differ in summation order only (~1e-6 relative).
        assert ((got.cpu() - ref).norm() / ref.norm()).item() < 1e-4, prompt
    assert_pool_clean(eng)


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
