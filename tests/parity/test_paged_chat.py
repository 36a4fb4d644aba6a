"""Chat through the paged, continuously batched AR stage (`runtime/ar_stage.py`) vs the reference
backend (`reference.generate_text`, one request at a time, contiguous KV cache) on the tiny checkpoint
in fp32.

Greedy tokens must be identical: the paged path runs the same weights and formulas (the ops' torch
twins on CPU) in a different batching and summation order, which moves fp32 logits by ~1e-6, far
below the gap between the top two logits of these prompts. Every scenario that changes where K/V
lives or when it is computed — block boundaries, prefix-cache hits, chunked prefill, preemption and
recomputation, aborts, image features — must leave the tokens unchanged.
"""

from __future__ import annotations

import json

import pytest
import torch

from blip3o_engine import InputError, SamplingParams
from blip3o_engine.runtime import reference
from blip3o_engine.runtime.ar_stage import ARStage
from blip3o_engine.runtime.cuda_graphs import CapturedGraph, GraphCache
from _paged_util import Recorder, ar_stage, optimized_engine  # tests/parity is on sys.path (tests/conftest.py)

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
SYSTEM = {"role": "system", "content": "You are a careful assistant who answers in full sentences. " * 3}


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# Mixed lengths: with block_size 4 every prompt ends at a different offset inside a block.
MIXED = [user("Hi."), user("Describe a red apple on a wooden table, please."),
         user("Tell me a long story about " + "many " * 9 + "dragons."), user("Why?")]


@pytest.fixture(scope="module")
def ref(tiny_engine):
    """Reference (ids, text, finish) per (conversation, params), memoized."""
    memo: dict[tuple[str, SamplingParams], tuple[list[int], str, str]] = {}

    def run(messages, params=GREEDY):
        key = (json.dumps(messages, default=str), params)
        if key not in memo:
            prompt = tiny_engine.prompts.chat(messages)
            memo[key] = reference.generate_text(tiny_engine.model, prompt, params, tiny_engine.tokenizer,
                                                tiny_engine.special)
        return memo[key]

    return run


def optimized(tiny_engine, **cfg):
    return optimized_engine(tiny_engine, **cfg)


def llm(tiny_engine, num_blocks: int, **cfg) -> ARStage:
    return ar_stage(tiny_engine, num_blocks, **cfg)


def run_to_end(le: ARStage, tiny_engine, requests: dict[str, tuple[list, SamplingParams]]) -> dict:
    for rid, (messages, params) in requests.items():
        le.add_request(rid, tiny_engine.prompts.chat(messages), params)
    return drain(le)


def drain(le: ARStage, done: dict | None = None) -> dict:
    done = {} if done is None else done
    while le.has_unfinished():
        for out in le.step():
            if out.finished:
                done[out.request_id] = out
    assert_pool_clean(le)
    return done


def assert_pool_clean(le: ARStage) -> None:
    le.kv.check_invariants()
    assert le.kv.num_free_blocks == le.kv.num_blocks


def assert_same(out, expected) -> None:
    ids, text, finish = expected
    assert (out.token_ids, out.text, out.finish_reason) == (ids, text, finish)


# ------------------------------------------------------------------------------------------------


def test_mixed_batch_across_block_boundaries(tiny_engine, ref):
    eng = optimized(tiny_engine, block_size=4, num_blocks=96, max_num_seqs=8, max_num_batched_tokens=512)
    params = [GREEDY, SamplingParams(max_tokens=9, temperature=0.0, repetition_penalty=1.3),
              SamplingParams(max_tokens=14, temperature=0.0), GREEDY]
    results = eng.chat_batch(MIXED, params)
    for r, m, p in zip(results, MIXED, params):
        ids, text, finish = ref(m, p)
        assert (r.token_ids, r.text, r.finish_reason) == (ids, text, finish)
        assert r.prompt_tokens == len(tiny_engine.prompts.chat(m).token_ids)
    assert_pool_clean(eng._ar)
    assert eng.chat(MIXED[1], params[1]).token_ids == results[1].token_ids  # single chat, same path


def test_matches_transformers_greedy(tiny_engine, tiny_dir):
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2_5_VLConfig.from_dict(json.loads((tiny_dir / "config.json").read_text()))
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(tiny_dir), config=config, dtype=torch.float32, attn_implementation="eager").eval()
    messages = MIXED[1]
    ids = torch.tensor([tiny_engine.prompts.chat(messages).token_ids])
    sp = tiny_engine.special
    want = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16,
                       eos_token_id=[sp.im_end, sp.endoftext], pad_token_id=sp.endoftext,
                       temperature=None, top_p=None, top_k=None)[0, ids.shape[1]:].tolist()
    eng = optimized(tiny_engine, block_size=4, num_blocks=64)
    assert eng.chat(messages, SamplingParams(max_tokens=16, temperature=0.0)).token_ids == want


def test_prefix_cache_hits_keep_tokens(tiny_engine, ref):
    le = llm(tiny_engine, 128, block_size=4, max_num_seqs=4, max_num_batched_tokens=256)
    rec = Recorder(le)
    # Same prompt twice, the second after the first finished: all full prompt blocks are hits.
    first = run_to_end(le, tiny_engine, {"a": (MIXED[2], GREEDY)})["a"]
    second = run_to_end(le, tiny_engine, {"b": (MIXED[2], GREEDY)})["b"]
    assert_same(first, ref(MIXED[2]))
    assert_same(second, ref(MIXED[2]))
    n_prompt = len(tiny_engine.prompts.chat(MIXED[2]).token_ids)
    assert rec.first_chunk("b").num_computed_tokens == (n_prompt - 1) // 4 * 4
    # Two requests sharing a long system prompt: the second arrives after the first's prefill.
    c, d = [SYSTEM, *user("Name a fruit.")], [SYSTEM, *user("Name a color, then a number.")]
    le.add_request("c", tiny_engine.prompts.chat(c), GREEDY)
    le.step()
    le.add_request("d", tiny_engine.prompts.chat(d), GREEDY)
    done = drain(le)
    assert rec.first_chunk("d").num_computed_tokens >= 40  # the system prompt's full blocks
    assert_same(done["c"], ref(c))
    assert_same(done["d"], ref(d))


def test_chunked_prefill(tiny_engine, ref):
    le = llm(tiny_engine, 128, long_prefill_chunk=5, block_size=4, max_num_seqs=4,
             max_num_batched_tokens=7)
    rec = Recorder(le)
    done = run_to_end(le, tiny_engine, {str(i): (m, GREEDY) for i, m in enumerate(MIXED)})
    for i, m in enumerate(MIXED):
        assert_same(done[str(i)], ref(m))
    partial = [s for o in rec.outputs for s in o.scheduled if s.is_prefill and not s.samples]
    assert partial, "no prompt was split into chunks"
    assert max(o.num_scheduled_tokens for o in rec.outputs) <= 7


def test_preemption_by_a_tiny_pool(tiny_engine, ref):
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    # Each request fits alone (<= 15 blocks of 4), all three together do not.
    le = llm(tiny_engine, 16, block_size=4, max_num_seqs=4, max_num_batched_tokens=256)
    rec = Recorder(le)
    msgs = [user("Describe a red apple."), user("Describe a blue sky."), user("Describe a green leaf.")]
    done = run_to_end(le, tiny_engine, {str(i): (m, params) for i, m in enumerate(msgs)})
    assert any(o.preempted_ids for o in rec.outputs), "the pool was large enough: nothing was preempted"
    for i, m in enumerate(msgs):
        assert_same(done[str(i)], ref(m, params))


def test_abort_in_the_middle(tiny_engine, ref):
    le = llm(tiny_engine, 96, block_size=4, max_num_seqs=4, max_num_batched_tokens=256)
    for i, m in enumerate(MIXED[:3]):
        le.add_request(str(i), tiny_engine.prompts.chat(m), GREEDY)
    for _ in range(4):
        for out in le.step():
            assert not out.finished
    assert le.abort("1") and not le.abort("1") and not le.abort("nope")
    done = drain(le)
    assert sorted(done) == ["0", "2"]
    assert_same(done["0"], ref(MIXED[0]))
    assert_same(done["2"], ref(MIXED[2]))


def test_images_batched_with_text(tiny_engine, ref, test_image):
    with_image = [{"role": "user", "content": [{"type": "image", "image": test_image},
                                               {"type": "text", "text": "What is in the picture?"}]}]
    convs = [MIXED[0], with_image, MIXED[1]]
    eng = optimized(tiny_engine, block_size=4, num_blocks=256, max_num_seqs=4, max_num_batched_tokens=48)
    results = eng.chat_batch(convs, GREEDY)  # 48-token budget: the image prompt is chunked too
    for r, m in zip(results, convs):
        assert (r.token_ids, r.text, r.finish_reason) == ref(m)
    # The same image prompt again is served from the prefix cache (image hash included) unchanged.
    le = eng._ar
    rec = Recorder(le)
    again = eng.chat(with_image, GREEDY)
    assert again.token_ids == results[1].token_ids
    assert rec.outputs[0].scheduled[0].num_computed_tokens > 0
    assert_pool_clean(le)


def test_seeded_sampling_reproducible_and_batch_independent(tiny_engine, ref):
    sampled = SamplingParams(max_tokens=12, temperature=0.9, top_k=40, top_p=0.9, seed=1234, ignore_eos=True)
    le = llm(tiny_engine, 128, block_size=4, max_num_seqs=8, max_num_batched_tokens=256)
    alone = run_to_end(le, tiny_engine, {"s": (MIXED[1], sampled)})["s"]
    batch = {"x": (MIXED[0], GREEDY), "s": (MIXED[1], sampled), "y": (MIXED[2], SamplingParams(
        max_tokens=5, temperature=1.0, seed=1)), "z": (MIXED[3], GREEDY)}
    together = run_to_end(le, tiny_engine, batch)["s"]
    assert together.token_ids == alone.token_ids
    # The per-request generator draws exactly as the reference's seeded loop does.
    assert alone.token_ids == ref(MIXED[1], sampled)[0]
    other = run_to_end(le, tiny_engine, {"t": (MIXED[1], SamplingParams(
        max_tokens=12, temperature=0.9, top_k=40, top_p=0.9, seed=99, ignore_eos=True))})["t"]
    assert other.token_ids != alone.token_ids


def test_stop_strings_and_stream(tiny_engine, ref):
    eng = optimized(tiny_engine, block_size=4, num_blocks=96)
    full_ids, full_text, _ = ref(MIXED[1], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    stop = full_text[len(full_text) // 2:len(full_text) // 2 + 3]
    assert stop.strip(), f"pick another stop string from {full_text!r}"
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=(stop,))
    got = eng.chat(MIXED[1], params)
    assert (got.token_ids, got.text, got.finish_reason) == ref(MIXED[1], params)
    assert got.finish_reason == "stop" and stop not in got.text and len(got.token_ids) < 24
    # Streaming: the deltas concatenate to chat's text, with and without a stop string.
    for p in (params, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)):
        pieces = list(eng.chat_stream(MIXED[1], p))
        assert "".join(pieces) == eng.chat(MIXED[1], p).text
        assert len(pieces) > 1
    # The reference backend streams too, token by token (its own full-decode hold-back logic): the same
    # pieces as the optimized backend's incremental detokenizer, with and without a stop string.
    for p in (params, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)):
        ref_pieces = list(tiny_engine.chat_stream(MIXED[1], p))
        assert len(ref_pieces) > 1 and "".join(ref_pieces) == tiny_engine.chat(MIXED[1], p).text
        assert ref_pieces == list(eng.chat_stream(MIXED[1], p))
    assert_pool_clean(eng._ar)


def test_engine_request_interface_and_capacity(tiny_engine, ref):
    eng = optimized(tiny_engine, block_size=4, num_blocks=12)
    # A 48-token pool caps max_model_len: "Hi." (33 prompt tokens) fits, the long prompt not.
    assert eng.max_model_len == 48 and "capped by the KV pool" in " ".join(eng.memory_plan().notes)
    with pytest.raises(InputError, match=r"max_model_len\) of 48 tokens \(capped by the KV pool"):
        eng.add_request("big", MIXED[2], GREEDY)
    eng.add_request("r", MIXED[0], GREEDY)
    with pytest.raises(ValueError):
        eng.add_request("r", MIXED[0], GREEDY)
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    assert [o.new_token_ids[0] for o in outs] == outs[-1].token_ids
    assert "".join(o.text_delta for o in outs) == outs[-1].text
    assert_same(outs[-1], ref(MIXED[0]))


def test_decode_bucket_padding_on_cpu(tiny_engine, ref):
    """The CUDA-graph decode path's bookkeeping (static buffers, padding a batch to its bucket with rows
    that neither write nor read the cache) emulated on CPU: each 'graph' reruns the decode forward
    over the static buffers into a fixed output tensor, as a replay would."""
    le = llm(tiny_engine, 96, block_size=4, max_num_seqs=8, max_num_batched_tokens=256)
    runner = le.runner
    replays = []

    class EmulatedGraphs(GraphCache):
        """Captures nothing: a 'graph' reruns its closure over the static buffers, as a replay would."""

        def __init__(self) -> None:
            super().__init__("emulated", None, False, max_graphs=8)
            self.enabled = True

        def _capture(self, run):
            out = run()

            class Replay:
                @staticmethod
                def replay() -> None:
                    replays.append(out.shape[0])
                    out.copy_(run())
            return CapturedGraph(Replay, out)

    runner.graphs, runner.buckets = EmulatedGraphs(), [1, 2, 4, 8]
    done = run_to_end(le, tiny_engine, {str(i): (m, GREEDY) for i, m in enumerate(MIXED[:3])})
    assert replays and set(replays) == {4}  # three decoding sequences pad to the 4-bucket
    for i, m in enumerate(MIXED[:3]):
        assert_same(done[str(i)], ref(m))


def test_image_request_preempted_after_its_features_were_dropped(tiny_engine, ref, test_image, monkeypatch):
    """Without prefix caching a preempted image request recomputes from scratch: the ViT runs again."""
    with_image = [{"role": "user", "content": [{"type": "image", "image": test_image},
                                               {"type": "text", "text": "What is in the picture?"}]}]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    visual = tiny_engine.model.visual
    calls = []
    forward = visual.forward
    monkeypatch.setattr(visual, "forward", lambda *a: calls.append(1) or forward(*a))
    le = llm(tiny_engine, 28, block_size=4, max_num_seqs=4, max_num_batched_tokens=256,
             enable_prefix_caching=False)
    rec = Recorder(le)
    text = user("Describe a red apple.")
    done = run_to_end(le, tiny_engine, {"t": (text, params), "img": (with_image, params)})
    assert "img" in [rid for o in rec.outputs for rid in o.preempted_ids]
    assert len(calls) == 2
    assert_same(done["t"], ref(text, params))
    assert_same(done["img"], ref(with_image, params))
