"""The step loop (runtime/step_loop.py): chat and images in one loop, continuous batching of denoising.

An image must be the same whatever it is batched with and whenever it joins (within 1 uint8 level: batch
composition changes fp32 GEMM blocking, ~1e-6 relative, which can flip a value sitting on a rounding
boundary); chat tokens must be the same with images in flight (greedy, fp32: identical); aborts free
everything at every stage; `stats()` returns to zero. Both backends run the same loop.
"""

from __future__ import annotations

import numpy as np
import pytest

from blip3o_engine import ImageParams, SamplingParams
from blip3o_engine.runtime import reference
from _paged_util import Recorder, optimized_engine  # tests/parity is on sys.path (tests/conftest.py)

GREEDY = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True)
CHATS = {"c0": [{"role": "user", "content": "Describe a red apple on a wooden table, please."}],
         "c1": [{"role": "user", "content": "Tell me a long story about " + "many " * 12 + "dragons."}]}
# Different step counts and guidance, one without decoder CFG: rows at different timesteps of different schedules.
IMAGES = {"i0": ("a red apple", ImageParams(seed=11, dit_steps=4, decoder_steps=6)),
          "i1": ("a dog on the beach", ImageParams(seed=12, dit_steps=3, decoder_steps=5, decoder_guidance=4.5)),
          "i2": ("x", ImageParams(seed=13, dit_steps=4, decoder_steps=4, decoder_guidance=1.0)),
          "i3": ("a lighthouse at night", ImageParams(seed=14, dit_steps=2, decoder_steps=7, dit_guidance=1.0))}


def pixels(result) -> np.ndarray:
    return np.asarray(result.image, dtype=np.int16)


@pytest.fixture(scope="module")
def alone(tiny_engine):
    """Every image generated alone, and every chat answered alone, by a fresh optimized engine."""
    eng = optimized_engine(tiny_engine, block_size=4, num_blocks=256)
    images = {rid: pixels(eng.generate_image(p, params)) for rid, (p, params) in IMAGES.items()}
    chats = {rid: eng.chat(m, GREEDY).token_ids for rid, m in CHATS.items()}
    return images, chats


def run(eng, schedule: dict[int, list[str]], abort_at: dict[int, str] | None = None) -> dict:
    """Submit requests at the given engine steps (chat ids c*, image ids i*), abort some at others; run to
    the end. Returns {request_id: final output}."""
    done, step = {}, 0
    abort_at = abort_at or {}
    while step in schedule or eng.has_unfinished() or any(s > step for s in schedule):
        for rid in schedule.get(step, []):
            if rid.startswith("c"):
                eng.add_request(rid, CHATS[rid], GREEDY)
            else:
                eng.add_image_request(rid, *IMAGES[rid])
        if step in abort_at:
            assert eng.abort(abort_at[step])
        for out in eng.step():
            if out.finished:
                assert out.request_id not in done
                done[out.request_id] = out
        step += 1
        assert step < 500, "the loop did not finish"
    return done


def assert_idle(eng) -> None:
    s = eng.stats()
    assert (s.chat_running, s.chat_waiting, s.image_running, s.image_waiting) == (0, 0, 0, 0)
    assert s.kv_blocks_used == 0 and sum(s.images_by_stage.values()) == 0 and not eng.has_unfinished()
    if eng.backend == "optimized":
        eng._ar.kv.check_invariants()
        assert len(eng._decoder) == 0


def test_images_join_at_different_steps_beside_chat(tiny_engine, alone):
    """Images arriving while others are in the DiT or the decoder, chat interleaved: each image equals its
    run alone within a level, each chat its tokens alone, bitwise."""
    images_alone, chats_alone = alone
    eng = optimized_engine(tiny_engine, block_size=4, num_blocks=256, max_image_batch=3, dit_steps_per_iteration=2)
    done = run(eng, {0: ["c0", "i0"], 2: ["i1"], 3: ["c1"], 5: ["i2"], 7: ["i3"]})
    for rid, want in images_alone.items():
        got = pixels(done[rid].result)
        assert np.abs(got - want).max() <= 1, rid
    for rid, want in chats_alone.items():
        assert done[rid].token_ids == want, rid
    assert_idle(eng)


def record_decoder_batches(eng) -> list[int]:
    """Wrap the engine's decoder step so that the batch of every step is recorded."""
    batch_sizes: list[int] = []
    step = eng._decoder.step

    def counting_step():
        progress = step()
        batch_sizes.append(len(progress))
        return progress

    eng._decoder.step = counting_step
    return batch_sizes


def test_decoder_batch_is_continuous(tiny_engine):
    """With max_image_batch 3 and four images, the fourth waits for a slot and joins while the others are
    mid-way; every decoder step of an image is reported, in order."""
    eng = optimized_engine(tiny_engine, block_size=4, num_blocks=256, max_image_batch=3)
    seen: dict[str, list[int]] = {rid: [] for rid in IMAGES}
    batch_sizes = record_decoder_batches(eng)
    for rid, (p, params) in IMAGES.items():
        eng.add_image_request(rid, p, params)
    while eng.has_unfinished():
        for out in eng.step():
            if out.stage == "decoder":
                seen[out.request_id].append(out.step)
    for rid, (_, params) in IMAGES.items():
        assert seen[rid] == list(range(1, params.decoder_steps + 1)), rid
    assert max(batch_sizes) == 3 and 1 in batch_sizes  # full, then draining as images leave
    assert_idle(eng)


def count_image_units(eng) -> list[str]:
    """Wrap the engine's image units (DiT advance, decoder step, VAE) so each call is recorded."""
    units: list[str] = []
    for obj, name in ((eng._flow, "advance"), (eng._decoder, "step"), (eng._decoder, "advance_pixels")):
        def counted(*args, _fn=getattr(obj, name), _name=name, **kwargs):
            units.append(_name)
            return _fn(*args, **kwargs)
        setattr(obj, name, counted)
    return units


def test_chat_waits_for_at_most_one_image_unit_per_step(tiny_engine):
    """Each engine step runs the LLM step and at most ONE unit of image work (a DiT chunk, a decoder step or
    one VAE piece), so a running chat gets a token every step: its longest stall is one LLM step plus the
    largest unit, never a DiT chunk + decoder step + VAE back to back."""
    eng = optimized_engine(tiny_engine, block_size=4, num_blocks=256, dit_steps_per_iteration=2)
    for rid in ("i0", "i1"):  # the null prompt's features: computed once per engine, not per step
        eng.uncond_features(IMAGES[rid][1])
    units = count_image_units(eng)
    long_chat = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    eng.add_request("c0", CHATS["c0"], long_chat)
    for rid in ("i0", "i1"):
        eng.add_image_request(rid, *IMAGES[rid])
    chat_tokens, finished, steps, seen = 0, set(), 0, set()
    while "i0" not in finished or "i1" not in finished:
        units.clear()
        outs = eng.step()
        steps += 1
        assert len(units) <= 1, f"step {steps} ran {units}"
        got = [o for o in outs if o.request_id == "c0"]
        if steps > 1:  # the first step is the prefill
            assert got, f"chat made no progress in step {steps} (image work: {units})"
        chat_tokens += len(got)
        seen.update(units)
        finished |= {o.request_id for o in outs if o.finished}
    assert seen == {"advance", "step", "advance_pixels"} and chat_tokens >= steps - 1
    assert "c0" not in finished, "the chat ended before the images: the test saw no image work beside it"
    while eng.has_unfinished():
        eng.step()
    assert_idle(eng)


@pytest.mark.parametrize("backend", ["optimized", "reference"])
def test_a_prefill_beside_decoding_chat_defers_the_image_unit_once(tiny_engine, alone, backend):
    """A step whose LLM work runs a prompt (a new image's T2I prefill, a new chat) while a chat decodes runs
    no image unit, so that chat waits one prefill step, then one decode + one unit, never prefill + unit;
    the unit runs in the next step, and never two steps in a row go without one while images have work.
    Tokens and images are unchanged by it."""
    from blip3o_engine import Engine

    if backend == "optimized":  # a 16-token budget: the second chat's prompt takes several steps
        eng = optimized_engine(tiny_engine, block_size=4, num_blocks=256, dit_steps_per_iteration=2,
                               max_num_batched_tokens=16)
    else:
        eng = Engine(tiny_engine.model, tiny_engine.tokenizer, tiny_engine.prompts.image_processor,
                     backend="reference")
    for rid in ("i0", "i1"):
        eng.uncond_features(IMAGES[rid][1])
    units = count_image_units(eng)
    eng.add_request("c0", CHATS["c0"], SamplingParams(max_tokens=80, temperature=0.0, ignore_eos=True))
    eng.add_image_request("i0", *IMAGES["i0"])
    steps, done = [], {}  # per step: (prompt tokens ran, c0 got a token, image work before it, units run)
    arrival = None
    for step in range(400):
        if arrival is None and eng._loop.images["i0"].stage == "decoder" and steps and steps[-1][1]:
            arrival = step  # i0 denoises and c0 decodes: a new image and a new chat arrive
            eng.add_image_request("i1", *IMAGES["i1"])
            eng.add_request("c1", CHATS["c1"], GREEDY)
        image_work = eng._loop._images_in_flight()
        units.clear()
        outs = eng.step()
        chat_token = any(o.request_id == "c0" for o in outs)
        steps.append((eng._loop._prompt_tokens_ran, chat_token, image_work, len(units)))
        done.update({o.request_id: o for o in outs if o.finished})
        if not eng.has_unfinished():
            break
    deferred = [i for i, (p, c, w, n) in enumerate(steps) if p and c and w and n == 0]
    assert arrival is not None and deferred and deferred[0] == arrival, (arrival, steps)
    for i, (p, c, w, n) in enumerate(steps):
        assert n <= 1, f"step {i} ran {n} image units"
        if p and c and w and n == 1:  # prefill + unit beside a decoding chat: only right after a deferral
            assert i - 1 in deferred, f"step {i} ran a prompt, a chat token and an image unit"
        if i in deferred:
            assert i - 1 not in deferred, f"steps {i - 1} and {i}: the image unit deferred twice in a row"
    if backend == "optimized":  # c1's prompt spans steps: deferral alternates with image work
        assert len(deferred) >= 2
    assert set(done) == {"c0", "c1", "i0", "i1"}
    images_alone, chats_alone = alone
    for rid in ("i0", "i1"):
        assert np.abs(pixels(done[rid].result) - images_alone[rid]).max() <= 1, rid
    assert done["c1"].token_ids == chats_alone["c1"]
    assert_idle(eng)


@pytest.mark.parametrize("stage", ["prefill", "dit", "decoder", "vae"])
def test_abort_in_every_stage_frees_everything(tiny_engine, stage):
    eng = optimized_engine(tiny_engine, block_size=4, num_blocks=256, dit_steps_per_iteration=1)
    eng.add_request("c0", CHATS["c0"], GREEDY)
    eng.add_image_request("victim", "a cat", ImageParams(seed=1, dit_steps=6, decoder_steps=6))
    eng.add_image_request("other", "a dog", ImageParams(seed=2, dit_steps=6, decoder_steps=6))
    done = {}
    aborted = False
    while eng.has_unfinished():
        if not aborted and eng._loop.images.get("victim") and eng._loop.images["victim"].stage == stage:
            assert eng.abort("victim") and not eng.abort("victim")
            aborted = True
        for out in eng.step():
            assert not (aborted and out.request_id == "victim"), "an output after the abort"
            if out.finished:
                done[out.request_id] = out
    assert aborted and set(done) == {"c0", "other"}
    assert_idle(eng)


def test_chat_preemption_while_images_run(tiny_engine):
    """A pool too small for both chats: one is preempted and recomputed while images are in the decoder;
    tokens still equal the reference."""
    eng = optimized_engine(tiny_engine, block_size=4, num_blocks=48, max_num_batched_tokens=256)
    rec = Recorder(eng._ar)
    long = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    eng.add_image_request("i0", *IMAGES["i0"])
    done = {}
    for step in range(400):
        if step == 1:
            for rid, m in CHATS.items():
                eng.add_request(rid, m, long)
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
        if not eng.has_unfinished():
            break
    assert any(o.preempted_ids for o in rec.outputs), "the pool was large enough: nothing was preempted"
    for rid, m in CHATS.items():
        want = reference.generate_text(tiny_engine.model, tiny_engine.prompts.chat(m), long, tiny_engine.tokenizer,
                                       tiny_engine.special)
        assert (done[rid].token_ids, done[rid].text) == want[:2], rid
    assert done["i0"].result is not None
    assert_idle(eng)


def test_reference_backend_runs_the_same_loop(tiny_engine, alone):
    """The reference backend through the same loop: images interleaved with chat equal the optimized
    backend's images alone within a level, and the chat tokens are identical."""
    images_alone, chats_alone = alone
    done = run(tiny_engine, {0: ["c0", "i1"], 1: ["i2"]})
    for rid in ("i1", "i2"):
        assert np.abs(pixels(done[rid].result) - images_alone[rid]).max() <= 1, rid
    assert done["c0"].token_ids == chats_alone["c0"]
    assert_idle(tiny_engine)


@pytest.mark.parametrize("policy", ["serial", "static"])
def test_run_to_completion_policies_finish_images_before_chat_resumes(tiny_engine, alone, policy):
    """The baselines: once images have their features, they run to their end inside ONE step (chat waits),
    "serial" one image at a time (decoder batch 1, as `generate_image` calls behind a lock), "static" all
    of them as one batch; the images are the same."""
    images_alone, _ = alone
    eng = optimized_engine(tiny_engine, block_size=4, num_blocks=256, policy=policy)
    batch_sizes = record_decoder_batches(eng)
    eng.add_request("c0", CHATS["c0"], GREEDY)
    for rid in ("i0", "i1"):  # prefilled in the same step
        eng.add_image_request(rid, *IMAGES[rid])
    per_step: list[list[str]] = []
    done = {}
    while eng.has_unfinished():
        outs = eng.step()
        per_step.append([f"{o.request_id}:{getattr(o, 'stage', 'chat')}" for o in outs])
        done.update({o.request_id: o for o in outs if o.finished})
    image_steps = [s for s in per_step if any(":decoder" in x for x in s)]
    assert len(image_steps) == 1 and not any(x.startswith("c0") for x in image_steps[0])
    decoder_steps = IMAGES["i0"][1].decoder_steps + IMAGES["i1"][1].decoder_steps
    if policy == "serial":  # i0's whole image, then i1's
        assert batch_sizes == [1] * decoder_steps
        order = [x.split(":")[0] for x in image_steps[0] if x.split(":")[0] in ("i0", "i1")]
        assert order == sorted(order)
    else:  # together until the shorter schedule ends
        assert max(batch_sizes) == 2 and sum(batch_sizes) == decoder_steps
    for rid in ("i0", "i1"):
        assert np.abs(pixels(done[rid].result) - images_alone[rid]).max() <= 1, rid
    assert_idle(eng)
