"""Tests of the KV block manager (prefix caching over the C++ allocator) and the AR scheduler.

Unit tests pin chunked prefill, the token budget, preemption by recompute, abort, prefix hits (with
image hashes in the key) and the capacity check. A hypothesis state machine drives random
add / step (schedule + update with random stops) / abort sequences and checks after every step
that the budget holds, that blocks cover what was computed, that no block is owned twice or written
by two sequences, and at the end that every request finished with the right tokens and no block
leaked.
"""

from __future__ import annotations

import random
import zlib

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from blip3o_engine.errors import CapacityError, InputError
from blip3o_engine.native import BatchBuilder, BlockAllocator
from blip3o_engine.runtime.kv_manager import ImageSpan, KVBlockManager
from blip3o_engine.runtime.scheduler import FinishReason, Request, RequestStatus, Scheduler, SchedulerOutput


def token_for(request_id: str, index: int) -> int:
    """The 'model': a deterministic token per (request, output index), so a request that is
    preempted and recomputed must end with exactly the same outputs."""
    return 1000 + zlib.crc32(f"{request_id}/{index}".encode()) % 1000


def step(sched: Scheduler, stopped: set[str] = frozenset()) -> tuple[SchedulerOutput, list[Request]]:
    out = sched.schedule()
    sampled = {s.request_id: token_for(s.request_id, sched.requests[s.request_id].num_output_tokens)
               for s in out.scheduled if s.samples}
    return out, sched.update_from_output(out, sampled, stopped & set(sampled))


def run_to_completion(sched: Scheduler, max_steps: int = 1000) -> list[SchedulerOutput]:
    outs = []
    while sched.has_unfinished_requests:
        assert len(outs) < max_steps, "requests did not finish"
        outs.append(step(sched)[0])
    return outs


def make(num_blocks=16, block_size=4, max_num_seqs=4, budget=64, chunk=None, caching=True):
    kv = KVBlockManager(num_blocks, block_size, enable_prefix_caching=caching)
    return kv, Scheduler(kv, max_num_seqs, budget, chunk)


def assert_all_released(kv: KVBlockManager) -> None:
    kv.check_invariants()
    assert kv.num_free_blocks == kv.num_blocks
    assert all(kv.allocator.ref_count(b) == 0 for b in range(kv.num_blocks))


# ------------------------------------------------------------------------------------------------
# Chunked prefill, decode and the budget


def test_prefill_then_decode_to_length():
    kv, sched = make()
    req = Request("a", list(range(6)), max_tokens=3)
    sched.add_request(req)
    outs = run_to_completion(sched)
    assert [(s.num_computed_tokens, s.num_new_tokens, s.is_prefill, s.samples)
            for o in outs for s in o.scheduled] == [(0, 6, True, True), (6, 1, False, True), (7, 1, False, True)]
    assert outs[0].scheduled[0].new_token_ids == list(range(6))
    assert outs[1].scheduled[0].new_token_ids == [token_for("a", 0)]
    assert req.output_token_ids == [token_for("a", k) for k in range(3)]
    assert (req.status, req.finish_reason, req.num_computed_tokens) == (RequestStatus.FINISHED, FinishReason.LENGTH, 8)
    assert_all_released(kv)


@pytest.mark.parametrize("budget, chunk, chunks",
                         [(4, None, [4, 4, 2]), (100, 3, [3, 3, 3, 1]), (3, 2, [2, 2, 2, 2, 2])])
def test_chunked_prefill_splits_a_long_prompt(budget, chunk, chunks):
    kv, sched = make(budget=budget, chunk=chunk)
    sched.add_request(Request("a", list(range(sum(chunks))), max_tokens=1))
    outs = run_to_completion(sched)
    got = [o.scheduled[0] for o in outs]
    assert [s.num_new_tokens for s in got] == chunks
    assert [s.samples for s in got] == [False] * (len(chunks) - 1) + [True]  # only the last chunk samples
    assert all(s.is_prefill for s in got)


def test_running_decodes_first_then_waiting_prefill_takes_the_rest_of_the_budget():
    kv, sched = make(num_blocks=32, budget=8)
    sched.add_request(Request("a", [1, 2, 3], max_tokens=5))
    sched.add_request(Request("b", [4, 5], max_tokens=5))
    step(sched)  # a and b prefill together (5 tokens)
    sched.add_request(Request("c", list(range(20)), max_tokens=1))
    out, _ = step(sched)
    assert [(s.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 1), ("c", 6)]
    assert out.num_scheduled_tokens == 8


def test_max_num_seqs_caps_running_requests():
    kv, sched = make(num_blocks=32, max_num_seqs=2)
    for i in range(3):
        sched.add_request(Request(f"r{i}", [i, i], max_tokens=2))
    out, _ = step(sched)
    assert [s.request_id for s in out.scheduled] == ["r0", "r1"]
    run_to_completion(sched)
    assert_all_released(kv)


def test_queue_time_runs_from_arrival_to_the_first_step_that_ran_the_request():
    """A request held back by max_num_seqs waits; its queue time is set once, when it first runs, and is
    kept across a later step (what a server exports as request_queue_time_seconds)."""
    kv, sched = make(num_blocks=32, max_num_seqs=1)
    first, second = Request("r0", [1, 2], max_tokens=3), Request("r1", [3, 4], max_tokens=1)
    sched.add_request(first)
    sched.add_request(second)
    assert first.queue_time is None and second.queue_time is None
    step(sched)
    assert first.queue_time is not None and first.queue_time >= 0 and second.queue_time is None
    ran_at = first.first_scheduled_time
    run_to_completion(sched)
    assert first.first_scheduled_time == ran_at  # later steps do not move it
    assert second.first_scheduled_time > ran_at and second.queue_time > first.queue_time
    assert_all_released(kv)


def test_schedule_and_update_alternate_and_update_validates_first():
    kv, sched = make()
    sched.add_request(Request("a", [1, 2], max_tokens=2))
    out = sched.schedule()
    with pytest.raises(RuntimeError, match="update_from_output"):
        sched.schedule()
    with pytest.raises(ValueError, match="no sampled token"):
        sched.update_from_output(out, {})
    with pytest.raises(ValueError, match="did not sample"):
        sched.update_from_output(out, {"a": 7, "zzz": 1})
    assert sched.requests["a"].num_computed_tokens == 0  # nothing applied by the failed calls
    sched.update_from_output(out, {"a": 7})
    assert sched.requests["a"].token_ids == [1, 2, 7]
    with pytest.raises(ValueError, match="latest schedule"):
        sched.update_from_output(out, {"a": 7})


def test_stop_finishes_with_reason_stop():
    kv, sched = make()
    sched.add_request(Request("a", [1, 2], max_tokens=10))
    step(sched)
    _, finished = step(sched, stopped={"a"})
    assert [(r.request_id, r.finish_reason, r.num_output_tokens) for r in finished] == [("a", FinishReason.STOP, 2)]
    out, _ = step(sched)
    assert out.finished_ids == ["a"] and out.scheduled == []
    assert_all_released(kv)


# ------------------------------------------------------------------------------------------------
# Capacity, preemption and abort


def test_request_that_can_never_fit_is_refused_with_sizes():
    kv, sched = make(num_blocks=4, block_size=4)
    sched.add_request(Request("fits", list(range(10)), max_tokens=7))  # 16 KV tokens = 4 blocks exactly
    msg = r"'big' needs up to 5 KV blocks \(10 prompt tokens \+ max_tokens 8.*only 4 blocks \(16 tokens\)"
    with pytest.raises(CapacityError, match=msg):
        sched.add_request(Request("big", list(range(10)), max_tokens=8))
    assert "big" not in sched.requests
    with pytest.raises(ValueError, match="already in use"):
        sched.add_request(Request("fits", [1], max_tokens=1))


def test_preemption_by_recompute_resumes_with_the_same_outputs():
    # 4 blocks of 2 tokens; each request needs up to 3 blocks (3 prompt + 4 outputs - 1 = 6 tokens).
    kv, sched = make(num_blocks=4, block_size=2, caching=False)
    reqs = [Request(r, [1, 2, 3], max_tokens=4) for r in ("a", "b")]
    for r in reqs:
        sched.add_request(r)
    outs = run_to_completion(sched, max_steps=50)
    preempted = [rid for o in outs for rid in o.preempted_ids]
    assert preempted == ["b"]  # the newest running request is the victim
    assert reqs[1].num_preemptions == 1 and reqs[0].num_preemptions == 0
    resumed = next(s for o in outs for s in o.scheduled if s.request_id == "b" and s.num_computed_tokens == 0
                   and s.num_new_tokens > 3)
    assert resumed.is_prefill and resumed.new_token_ids[:3] == [1, 2, 3]  # prompt + outputs recomputed
    for r in reqs:
        assert r.output_token_ids == [token_for(r.request_id, k) for k in range(4)]
        assert r.finish_reason is FinishReason.LENGTH
    assert_all_released(kv)


def test_abort_waiting_running_and_in_flight_requests_frees_everything():
    kv, sched = make(num_blocks=8, block_size=2, max_num_seqs=2)
    for rid in "abc":
        sched.add_request(Request(rid, [1, 2, 3, 4, 5], max_tokens=3))
    step(sched)
    assert sched.requests["c"].status is RequestStatus.WAITING
    assert sched.abort("c") and sched.abort("a")
    assert not sched.abort("a") and not sched.abort("nope")
    out = sched.schedule()
    assert [s.request_id for s in out.scheduled] == ["b"] and out.finished_ids == ["c", "a"]
    assert sched.abort("b")  # aborted between schedule and update: the update skips it
    assert sched.update_from_output(out, {"b": 5}) == []
    assert not sched.has_unfinished_requests
    assert_all_released(kv)


# ------------------------------------------------------------------------------------------------
# Prefix caching


def test_shared_prefix_blocks_are_shared_with_ref_count_2():
    kv, sched = make(block_size=4)
    prefix = list(range(8))  # two full blocks
    sched.add_request(Request("a", prefix + [50, 51, 52], max_tokens=5))
    step(sched)  # a's 11 prompt tokens computed: its two full blocks are registered
    sched.add_request(Request("b", prefix + [60, 61], max_tokens=5))
    out, _ = step(sched)
    sb = next(s for s in out.scheduled if s.request_id == "b")
    assert (sb.num_computed_tokens, sb.num_new_tokens) == (8, 2)  # only the suffix is computed
    shared = kv.block_table("a")[:2]
    assert sb.block_table[:2] == shared and sb.block_table[2] not in kv.block_table("a")
    assert [kv.allocator.ref_count(b) for b in shared] == [2, 2]
    kv.check_invariants()
    run_to_completion(sched)
    assert_all_released(kv)


@pytest.mark.parametrize("prompt_len, hit", [(11, 8), (8, 4), (4, 0)])
def test_repeated_prompt_after_the_first_finished_hits_the_cache(prompt_len, hit):
    """Hits are full blocks only and never the last token, which must be computed for its logits."""
    kv, sched = make(block_size=4)
    prompt = list(range(prompt_len))
    sched.add_request(Request("a", prompt, max_tokens=1))
    run_to_completion(sched)
    sched.add_request(Request("again", prompt, max_tokens=1))
    out, _ = step(sched)
    assert (out.scheduled[0].num_computed_tokens, out.scheduled[0].num_new_tokens) == (hit, prompt_len - hit)
    assert_all_released(kv)


def test_decoded_blocks_are_cached_too():
    kv, sched = make(block_size=4)
    a = Request("a", [1, 2, 3], max_tokens=6)
    sched.add_request(a)
    run_to_completion(sched)
    sched.add_request(Request("b", a.token_ids + [9], max_tokens=1))  # 9 tokens of which 8 were a's
    out, _ = step(sched)
    assert out.scheduled[0].num_computed_tokens == 8


def test_image_hash_is_part_of_the_block_key():
    kv, sched = make(block_size=4)
    img = 77
    tokens = [1, 2, 3, 4] + [img] * 4 + [5, 6, 7]  # block 0 text, block 1 the image, then text

    def hit_of(rid: str, image_hash: int) -> int:
        sched.add_request(Request(rid, tokens, max_tokens=1, image_spans=(ImageSpan(4, 4, image_hash),)))
        out, _ = step(sched)
        return out.scheduled[0].num_computed_tokens

    assert hit_of("first", 0xABC) == 0
    assert hit_of("same image", 0xABC) == 8
    assert hit_of("other image", 0xDEF) == 4  # the text block before the image still hits
    sched.add_request(Request("no image", tokens, max_tokens=1))
    assert step(sched)[0].scheduled[0].num_computed_tokens == 4


def test_prefix_caching_disabled_never_hits():
    kv, sched = make(caching=False)
    for rid in ("a", "b"):
        sched.add_request(Request(rid, list(range(12)), max_tokens=1))
        out, _ = step(sched)
        assert out.scheduled[0].num_computed_tokens == 0
    assert kv.allocator.num_cached_blocks == 0


def test_free_is_last_to_first_so_the_tail_is_evicted_first():
    kv = KVBlockManager(num_blocks=3, block_size=2)
    tokens = [1, 2, 3, 4, 5, 6]
    assert kv.lookup_prefix("a", tokens, 6) == 0 and kv.allocate_slots("a", 6)
    kv.cache_full_blocks("a", tokens, 6)
    kv.free("a")
    kv.allocate_slots("x", 2)  # evicts the oldest released block: a's tail
    assert kv.lookup_prefix("b", tokens, 6) == 4  # head blocks 0 and 1 still hit
    kv.free("b")
    kv.free("x")
    kv.check_invariants()


def test_allocate_slots_is_all_or_nothing():
    kv = KVBlockManager(num_blocks=3, block_size=2)
    assert kv.allocate_slots("a", 3) and kv.block_table("a") == [0, 1]
    assert not kv.allocate_slots("b", 5)  # needs 3 blocks, 1 left
    assert kv.block_table("b") == [] and kv.num_free_blocks == 1
    assert kv.can_allocate(1) and not kv.can_allocate(2)
    with pytest.raises(ValueError, match="already holds blocks"):
        kv.lookup_prefix("a", [1, 2, 3], 3)
    kv.free("a")
    kv.free("b")
    assert_all_released(kv)


# ------------------------------------------------------------------------------------------------
# Prefill-only requests (text-to-image: prompt + latent-query tail, no sampling)

TAIL = -1  # the engine's placeholder id of a latent-query row


def prefill_only(request_id: str, text_len: int, q: int) -> Request:
    """A T2I-style request: `text_len` prompt tokens, then `q` tail rows that are never cached."""
    return Request(request_id, list(range(100, 100 + text_len)) + [TAIL] * q, max_tokens=1,
                   prefill_only=True, num_uncached_tail=q)


def test_prefill_only_request_finishes_after_its_prefill_without_sampling():
    kv, sched = make(block_size=4)
    req = prefill_only("t", 10, 3)
    sched.add_request(req)
    out = sched.schedule()
    s = out.scheduled[0]
    assert (s.num_computed_tokens, s.num_new_tokens, s.is_prefill, s.samples) == (0, 13, True, False)
    with pytest.raises(ValueError, match="did not sample"):  # nothing may be sampled for it
        sched.update_from_output(out, {"t": 5})
    assert sched.update_from_output(out, {}) == [req]
    assert (req.status, req.finish_reason, req.num_computed_tokens) == (RequestStatus.FINISHED, FinishReason.STOP, 13)
    assert req.num_output_tokens == 0 and req.token_ids == list(range(100, 110)) + [TAIL] * 3
    assert not sched.has_unfinished_requests
    assert sched.schedule().finished_ids == ["t"]
    # Its blocks are released: the two full text blocks stay cached (evictable), nothing is referenced.
    assert kv.allocator.num_cached_blocks == 2
    assert_all_released(kv)


@pytest.mark.parametrize("text_len, q, hit", [(8, 8, 8), (10, 7, 8), (12, 4, 12), (3, 6, 0)])
def test_identical_prefill_only_requests_share_the_text_and_recompute_the_tail(text_len, q, hit):
    """The second request hits the first one's full text blocks only; a tail filling whole blocks
    (8 + 8, 10 + 7) would add hits if it were cached."""
    kv, sched = make(block_size=4)
    sched.add_request(prefill_only("first", text_len, q))
    run_to_completion(sched)
    again = prefill_only("again", text_len, q)
    sched.add_request(again)
    out, finished = step(sched)
    s = out.scheduled[0]
    assert (s.num_computed_tokens, s.num_new_tokens) == (hit, text_len + q - hit)
    assert s.new_token_ids[-q:] == [TAIL] * q and not s.samples
    assert finished == [again] and again.finish_reason is FinishReason.STOP
    assert_all_released(kv)


def test_the_tail_never_becomes_a_cached_block():
    kv, sched = make(block_size=4)
    req = prefill_only("t", 8, 8)  # blocks 0-1 text, blocks 2-3 tail only
    sched.add_request(req)
    run_to_completion(sched)
    hashes, parent = [], 0
    for i in range(4):
        parent = BlockAllocator.hash_block(parent, req.token_ids[4 * i:4 * i + 4])
        hashes.append(parent)
    assert [kv.allocator.lookup(h) for h in hashes[2:]] == [-1, -1]
    assert kv.allocator.num_cached_blocks == 2
    # A chat prompt holding the same tokens and more reuses the text blocks only.
    sched.add_request(Request("chat", req.token_ids + [7, 7, 7], max_tokens=2))
    out, _ = step(sched)
    s = out.scheduled[0]
    assert (s.num_computed_tokens, s.num_new_tokens, s.samples) == (8, 11, True)
    run_to_completion(sched)
    assert_all_released(kv)


@pytest.mark.parametrize("tail", [-1, 5, 6])
def test_invalid_uncached_tail_is_refused(tail):
    with pytest.raises(InputError, match="num_uncached_tail"):
        Request("t", [1, 2, 3, 4, 5], max_tokens=1, prefill_only=True, num_uncached_tail=tail)
    for ok in (0, 4):  # the bounds of [0, prompt length)
        req = Request("t", [1, 2, 3, 4, 5], max_tokens=1, prefill_only=True, num_uncached_tail=ok)
        assert req.num_cacheable_tokens == 5 - ok


@pytest.mark.parametrize("budget, chunk, chunks", [(4, None, [4, 4, 4, 3]), (100, 3, [3, 3, 3, 3, 3])])
def test_chunked_prefill_of_a_prefill_only_request(budget, chunk, chunks):
    kv, sched = make(block_size=4, budget=budget, chunk=chunk)
    req = prefill_only("t", 10, 5)
    sched.add_request(req)
    got, done = [], []
    while sched.has_unfinished_requests:
        assert not done, "the request finished before its last chunk"
        out, done = step(sched)
        got += out.scheduled
        assert kv.allocator.num_cached_blocks <= 2  # never more than the text's full blocks
    assert [s.num_new_tokens for s in got] == chunks
    assert [s.num_computed_tokens for s in got] == [sum(chunks[:i]) for i in range(len(chunks))]
    assert [t for s in got for t in s.new_token_ids] == req.token_ids  # every token exactly once
    assert not any(s.samples for s in got) and all(s.is_prefill for s in got)
    assert done == [req] and req.num_computed_tokens == 15 and req.num_output_tokens == 0
    assert_all_released(kv)


# ------------------------------------------------------------------------------------------------
# Random operation sequences


class SchedulerMachine(RuleBasedStateMachine):
    """Random add / step / abort sequences; a small vocabulary and shared stems make prefix hits,
    small pools make preemptions."""

    @initialize(num_blocks=st.integers(3, 24), block_size=st.integers(1, 4), max_num_seqs=st.integers(1, 4),
                budget=st.integers(1, 12), chunk=st.none() | st.integers(1, 6), caching=st.booleans())
    def setup(self, num_blocks, block_size, max_num_seqs, budget, chunk, caching):
        self.kv = KVBlockManager(num_blocks, block_size, enable_prefix_caching=caching)
        self.sched = Scheduler(self.kv, max_num_seqs, budget, chunk)
        self.builder = BatchBuilder(block_size, max_num_seqs, budget, num_blocks)
        self.all: dict[str, Request] = {}
        self.stems = [[1, 2, 3, 1, 2, 3, 1, 2], [5] * 8]
        self.steps = 0
        self.preemptions = 0

    @rule(stem=st.integers(0, 1), stem_len=st.integers(0, 8), tail=st.lists(st.integers(0, 3), max_size=8),
          max_tokens=st.integers(1, 8), image=st.none() | st.integers(0, 2))
    def add(self, stem, stem_len, tail, max_tokens, image):
        prompt = self.stems[stem][:stem_len] + tail
        if not prompt:
            return
        spans = (ImageSpan(0, min(3, len(prompt)), image),) if image is not None else ()
        req = Request(f"r{len(self.all)}", prompt, max_tokens, image_spans=spans)
        if self.kv.blocks_for(len(prompt) + max_tokens - 1) > self.kv.num_blocks:
            with pytest.raises(CapacityError):
                self.sched.add_request(req)
            return
        self.sched.add_request(req)
        self.all[req.request_id] = req

    @rule(seed=st.integers(0, 2**16))
    def step(self, seed):
        out = self.sched.schedule()
        self.steps += 1
        self.preemptions += len(out.preempted_ids)
        self.check_output(out)
        rng = random.Random(seed)
        sampled = {s.request_id: token_for(s.request_id, self.all[s.request_id].num_output_tokens)
                   for s in out.scheduled if s.samples}
        stopped = {rid for rid in sampled if rng.random() < 0.15}
        self.sched.update_from_output(out, sampled, stopped)

    @rule(index=st.integers(0, 40))
    def abort(self, index):
        rid = f"r{index}"
        live = rid in self.sched.requests
        assert self.sched.abort(rid) == live
        if live:
            assert self.all[rid].finish_reason is FinishReason.ABORT

    def check_output(self, out: SchedulerOutput) -> None:
        sched, kv = self.sched, self.kv
        assert 0 < out.num_scheduled_tokens <= sched.max_num_batched_tokens or not out.scheduled
        assert len(out.scheduled) <= sched.max_num_seqs
        assert len({s.request_id for s in out.scheduled}) == len(out.scheduled)
        for s in out.scheduled:
            req = sched.requests[s.request_id]
            assert req.status is RequestStatus.RUNNING and s.num_computed_tokens == req.num_computed_tokens
            assert s.new_token_ids == req.token_ids[s.num_computed_tokens:s.num_computed_tokens + s.num_new_tokens]
            assert len(s.block_table) * kv.block_size >= s.num_computed_tokens + s.num_new_tokens
        # No two sequences write the same cache slot, and every written block is owned by one request.
        self.builder.build([s.block_table for s in out.scheduled], [s.num_computed_tokens for s in out.scheduled],
                           [s.num_new_tokens for s in out.scheduled])
        slots = self.builder.slot_mapping
        assert len(np.unique(slots)) == len(slots)
        assert all(kv.allocator.ref_count(int(b)) == 1 for b in np.unique(slots // kv.block_size))

    @invariant()
    def state_is_consistent(self):
        if not hasattr(self, "sched"):
            return
        sched, kv = self.sched, self.kv
        kv.check_invariants()
        assert len(sched.running) <= sched.max_num_seqs
        for req in sched.running:
            assert len(kv.block_table(req.request_id)) * kv.block_size >= req.num_computed_tokens
        for req in sched.waiting:
            assert req.status is RequestStatus.WAITING and req.num_computed_tokens == 0
            assert kv.block_table(req.request_id) == []
        assert {r.request_id for r in sched.running} | {r.request_id for r in sched.waiting} == set(sched.requests)

    def teardown(self):
        if not hasattr(self, "sched"):
            return
        # Liveness: the oldest running request gains a token every step, so everything finishes.
        bound = 2 * sum(r.num_prompt_tokens + r.max_tokens for r in self.all.values()) + 10
        for _ in range(bound):
            if not self.sched.has_unfinished_requests:
                break
            self.step(seed=0)
        assert not self.sched.has_unfinished_requests
        for rid, req in self.all.items():
            assert req.status is RequestStatus.FINISHED
            out = req.output_token_ids
            assert out == [token_for(rid, k) for k in range(len(out))]  # nothing lost or repeated
            if req.finish_reason is FinishReason.LENGTH:
                assert len(out) == req.max_tokens
            elif req.finish_reason is FinishReason.STOP:
                assert 1 <= len(out) <= req.max_tokens
        assert_all_released(self.kv)


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(max_examples=300, stateful_step_count=50, deadline=None)


def test_random_tiny_pools_do_preempt():
    """The state machine's small pools must actually exercise preemption (else it proves little)."""
    total = 0
    for seed in range(20):
        rng = random.Random(seed)
        kv, sched = make(num_blocks=6, block_size=2, max_num_seqs=4, budget=8, caching=bool(seed % 2))
        for i in range(6):
            sched.add_request(Request(f"r{i}", [rng.randrange(4) for _ in range(rng.randrange(1, 6))], max_tokens=6))
        total += sum(len(o.preempted_ids) for o in run_to_completion(sched))
        assert_all_released(kv)
    assert total > 0
