"""Text-to-image stage-1 prefill through the paged AR stage (`ARStage.add_t2i_request`) vs the
reference (`reference.encode_t2i_prompt`: one contiguous prefill over prompt + latent queries) on the
tiny checkpoint in fp32.

The paged path runs the same weights and formulas in another batching, chunking and summation
order, which moves fp32 hidden states (O(1) values) by ~1e-6. `STATE_REL_TOL` (1e-5 relative) sits
well above that and far below any real defect: a wrong position (1-D vs M-RoPE), a missing or
shifted query, stale KV from a wrong prefix-cache hit all move the states by > 1e-2.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import numpy as np

from blip3o_engine import ImageParams, SamplingParams
from blip3o_engine.prompts import T2I_IMAGE_SIZE
from blip3o_engine.runtime import reference
from blip3o_engine.runtime.ar_stage import ARStage
from _paged_util import Recorder, ar_stage, optimized_engine  # tests/parity is on sys.path (tests/conftest.py)

STATE_REL_TOL = 1e-5
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
CAPTIONS = ["x", "a dog on the beach at sunset", "a small red apple on a wooden table next to a glass of water"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def ref_states(tiny_engine):
    memo: dict[int, torch.Tensor] = {}

    def run(prompt):
        key = id(prompt)
        if key not in memo:
            memo[key] = reference.encode_t2i_prompt(tiny_engine.model, prompt, tiny_engine.special)
        return memo[key]

    return run


@pytest.fixture(scope="module")
def t2i_prompts(tiny_engine):
    return [tiny_engine.prompts.t2i(c) for c in CAPTIONS]


@pytest.fixture(scope="module")
def image_prompt(tiny_engine, test_image):
    return tiny_engine.prompts.t2i("make it blue", test_image)


def llm(tiny_engine, num_blocks: int, **cfg) -> ARStage:
    return ar_stage(tiny_engine, num_blocks, **cfg)


def drain(le: ARStage) -> dict:
    done = {}
    while le.has_unfinished():
        for out in le.step():
            assert out.request_id not in done, "an output after the request finished"
            if out.finished:
                done[out.request_id] = out
    le.kv.check_invariants()
    assert le.kv.num_free_blocks == le.kv.num_blocks
    return done


def assert_states(out, prompt, ref_states) -> None:
    assert out.finished and out.finish_reason == "stop" and out.new_token_ids == []
    assert out.prompt_tokens == len(prompt.token_ids)
    assert out.hidden_states.shape == ref_states(prompt).shape  # [Q, H]
    assert rel_err(out.hidden_states, ref_states(prompt)) < STATE_REL_TOL


# ------------------------------------------------------------------------------------------------


def test_single_prompt(tiny_engine, t2i_prompts, ref_states):
    le = llm(tiny_engine, 64, block_size=4)
    le.add_t2i_request("t", t2i_prompts[1])
    assert_states(drain(le)["t"], t2i_prompts[1], ref_states)


def test_mixed_lengths_chunked_across_blocks_and_queries(tiny_engine, t2i_prompts, ref_states):
    """Three prompts of different lengths (each ends at another offset in a 4-token block), a 24-token
    step budget and 10-token chunks: prompts and query rows are split across steps."""
    le = llm(tiny_engine, 128, long_prefill_chunk=10, block_size=4, max_num_batched_tokens=24)
    rec = Recorder(le)
    for i, p in enumerate(t2i_prompts):
        le.add_t2i_request(str(i), p)
    done = drain(le)
    for i, p in enumerate(t2i_prompts):
        assert_states(done[str(i)], p, ref_states)
        chunks = rec.chunks(str(i))
        assert any(c.num_computed_tokens > len(p.token_ids) for c in chunks), "queries were not split"
        assert not any(c.samples for c in chunks)
    assert max(o.num_scheduled_tokens for o in rec.outputs) <= 24


def test_image_conditioned_prompt(tiny_engine, t2i_prompts, image_prompt, ref_states):
    le = llm(tiny_engine, 256, block_size=4, max_num_batched_tokens=64)
    le.add_t2i_request("img", image_prompt)
    le.add_t2i_request("txt", t2i_prompts[0])
    done = drain(le)
    assert_states(done["img"], image_prompt, ref_states)
    assert_states(done["txt"], t2i_prompts[0], ref_states)


def test_batched_with_chat_in_the_same_steps(tiny_engine, t2i_prompts, ref_states):
    chats = [user("Describe a red apple on a wooden table, please."), user("Why?")]
    le = llm(tiny_engine, 160, long_prefill_chunk=16, block_size=4, max_num_batched_tokens=40)
    rec = Recorder(le)
    le.add_request("c0", tiny_engine.prompts.chat(chats[0]), GREEDY)
    le.step()
    le.add_t2i_request("t0", t2i_prompts[2])  # arrives while c0 is still prefilling
    le.add_request("c1", tiny_engine.prompts.chat(chats[1]), GREEDY)
    le.add_t2i_request("t1", t2i_prompts[1])
    done = drain(le)
    for rid, m in zip(("c0", "c1"), chats):
        want = reference.generate_text(tiny_engine.model, tiny_engine.prompts.chat(m), GREEDY, tiny_engine.tokenizer,
                                       tiny_engine.special)
        assert (done[rid].token_ids, done[rid].text, done[rid].finish_reason) == want
    assert_states(done["t0"], t2i_prompts[2], ref_states)
    assert_states(done["t1"], t2i_prompts[1], ref_states)
    mixed = [o for o in rec.outputs if {"c0", "t0"} <= {s.request_id for s in o.scheduled}]
    assert any(any(s.request_id == "c0" and not s.is_prefill for s in o.scheduled) for o in mixed), \
        "no step held a chat decode beside the T2I prefill"


def test_prefix_cache_shares_prompts_never_queries(tiny_engine, t2i_prompts, ref_states):
    """The same T2I prompt again hits its prompt blocks but recomputes every query row; a chat prompt
    with the same tokens (text only: same positions, same KV) is shared with T2I."""
    prompt = t2i_prompts[2]
    n = len(prompt.token_ids)
    le = llm(tiny_engine, 128, block_size=4)
    rec = Recorder(le)
    le.add_t2i_request("a", prompt)
    first = drain(le)["a"]
    le.add_t2i_request("b", prompt)
    second = drain(le)["b"]
    assert rec.chunks("b")[0].num_computed_tokens == n // 4 * 4  # the full prompt blocks, no query block
    assert_states(first, prompt, ref_states)
    assert_states(second, prompt, ref_states)
    # A chat conversation whose tokens are the T2I prompt minus its trailing [IMG].
    caption = CAPTIONS[2]
    chat = tiny_engine.prompts.chat([{"role": "system", "content": "You are a helpful assistant."},
                                     user(f"Please generate image based on the following caption: {caption}")[0]])
    assert chat.token_ids == prompt.token_ids[:-1]
    le.add_request("c", chat, GREEDY)
    drain(le)
    assert rec.chunks("c")[0].num_computed_tokens == (n - 2) // 4 * 4


def test_image_blocks_not_shared_with_chat(tiny_engine, image_prompt, ref_states, test_image):
    """A chat prompt with the same image and the same tokens: its KV after the image was computed at
    M-RoPE positions, the T2I one at 1-D positions, so T2I may reuse only the blocks before the image."""
    img = test_image.resize((T2I_IMAGE_SIZE, T2I_IMAGE_SIZE), Image.BICUBIC)
    chat = tiny_engine.prompts.chat([{"role": "system", "content": "You are a helpful assistant."},
                                     {"role": "user", "content": [
                                         {"type": "image", "image": img},
                                         {"type": "text", "text": "Please generate image based on the following "
                                                                  "caption: make it blue"}]}])
    assert chat.token_ids == image_prompt.token_ids[:-1]
    le = llm(tiny_engine, 256, block_size=4, max_num_batched_tokens=512)
    rec = Recorder(le)
    le.add_request("c", chat, SamplingParams(max_tokens=1, temperature=0.0))
    drain(le)
    le.add_t2i_request("t", image_prompt)
    out = drain(le)["t"]
    first_image_token = image_prompt.token_ids.index(tiny_engine.special.image_pad)
    assert_states(out, image_prompt, ref_states)
    assert 0 < rec.chunks("t")[0].num_computed_tokens <= first_image_token


def test_preempted_and_aborted(tiny_engine, t2i_prompts, ref_states):
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    # 30 blocks of 4: each request fits alone (T2I: 28 blocks), not both; the T2I prefill comes in
    # 8-token chunks, so it is still running when the pool runs dry and, the newer one, is preempted.
    le = llm(tiny_engine, 30, long_prefill_chunk=8, block_size=4, max_num_batched_tokens=256,
             enable_prefix_caching=False)
    rec = Recorder(le)
    le.add_request("c", tiny_engine.prompts.chat(user("Describe a red apple.")), params)
    le.add_t2i_request("t", t2i_prompts[1])
    done = drain(le)
    assert "t" in [rid for o in rec.outputs for rid in o.preempted_ids]
    assert_states(done["t"], t2i_prompts[1], ref_states)
    le.add_t2i_request("x", t2i_prompts[0])
    le.step()
    assert le.abort("x") and not le.abort("x")
    assert drain(le) == {}


def test_engine_t2i_beside_user_chat(tiny_engine, t2i_prompts, ref_states):
    """Optimized Engine: T2I prefills always run through the paged AR stage. encode_prompt computes alone
    (between steps) what the reference computes; an image generated while a user's chat request (queued with
    add_request) is running equals the image generated with nothing else in flight; the chat's outputs come
    from the next step() calls and equal the reference's tokens."""
    eng = optimized_engine(tiny_engine, block_size=4, num_blocks=128)
    messages = user("Describe a red apple on a wooden table, please.")
    eng.add_request("chat", messages, GREEDY)
    outs = eng.step()
    assert rel_err(eng.encode_prompt(CAPTIONS[1]), ref_states(t2i_prompts[1])) < STATE_REL_TOL
    params = ImageParams(seed=3, dit_steps=3, decoder_steps=3)
    busy = np.asarray(eng.generate_image(CAPTIONS[1], params).image, dtype=np.int16)
    while eng.has_unfinished():
        outs += eng.step()
    assert [o.request_id for o in outs] == ["chat"] * len(outs) and outs[-1].finished
    want = reference.generate_text(tiny_engine.model, tiny_engine.prompts.chat(messages), GREEDY,
                                   tiny_engine.tokenizer, tiny_engine.special)
    assert (outs[-1].token_ids, outs[-1].text, outs[-1].finish_reason) == want
    idle = optimized_engine(tiny_engine, block_size=4, num_blocks=128)
    alone = np.asarray(idle.generate_image(CAPTIONS[1], params).image, dtype=np.int16)
    assert np.abs(busy - alone).max() <= 1  # batch composition moves fp32 GEMMs by ~1e-6 at most
    assert torch.equal(eng.uncond_features(params), idle.uncond_features(params))  # computed alone: bitwise
    eng._ar.kv.check_invariants()
    assert eng._ar.kv.num_free_blocks == eng._ar.kv.num_blocks and not eng.has_unfinished()
