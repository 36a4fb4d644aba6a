"""AsyncEngine: the asyncio front over one Engine's step loop (tiny checkpoint, CPU, optimized backend).

Every test drives real requests through the background loop thread; none mocks the engine. Failures are
injected by making one request's stage raise, which is what a real per-request failure looks like to the
step loop.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from blip3o_engine import (AsyncEngine, EngineDeadError, EngineShutdownError, ImageParams, InputError,
                           OverloadedError, RequestFailedError, SamplingParams)
from _paged_util import optimized_engine  # tests/parity/_paged_util.py

MSG = [{"role": "user", "content": "Describe a red apple."}]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
FAST = ImageParams(seed=5, dit_steps=3, decoder_steps=4)


@pytest.fixture
def aengine(tiny_engine):
    ae = AsyncEngine(optimized_engine(tiny_engine, block_size=4, num_blocks=256), max_pending=4)
    yield ae
    if not ae.is_dead:
        asyncio.run(ae.shutdown(0.0))


def idle(ae: AsyncEngine) -> bool:
    s = ae.stats()
    return s.num_unfinished == 0 and s.kv_blocks_used == 0 and ae.num_pending == 0


def test_chat_and_image_together_equal_the_sync_engine(aengine, tiny_engine):
    sync = optimized_engine(tiny_engine, block_size=4, num_blocks=256)
    want_chat = sync.chat(MSG, GREEDY)
    want_image = np.asarray(sync.generate_image("a red apple", FAST).image, dtype=np.int16)

    async def run():
        deltas = aengine.chat_stream(MSG, GREEDY)
        image = aengine.generate_image_stream("a red apple", FAST)
        text_task = asyncio.create_task(_join(deltas))
        outs = [o async for o in image]
        return await text_task, outs

    text, outs = asyncio.run(run())
    assert text == want_chat.text
    stages = [(o.stage, o.step) for o in outs]
    assert stages[0] == ("prefill", 1) and [s for s in stages if s[0] == "decoder"] == [("decoder", i) for i in
                                                                                          range(1, 5)]
    assert outs[-1].finished and outs[-1].stage == "vae"
    got = np.asarray(outs[-1].result.image, dtype=np.int16)
    assert np.abs(got - want_image).max() <= 1  # batched with the chat: GEMM rounding only
    assert idle(aengine)


async def _join(deltas) -> str:
    return "".join([d async for d in deltas])


def test_overload_input_errors_and_duplicate_ids(aengine):
    async def run():
        long = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)
        started = [asyncio.create_task(aengine.chat(MSG, long, request_id=f"r{i}")) for i in range(4)]
        while aengine.num_pending < 4:
            await asyncio.sleep(0.001)
        with pytest.raises(OverloadedError, match="max_pending=4"):
            await aengine.chat(MSG, GREEDY)
        assert all([await aengine.abort(f"r{i}") for i in range(4)])
        for task in started:  # their consumers learn why their stream ended
            with pytest.raises(RequestFailedError, match="aborted"):
                await task
        with pytest.raises(InputError, match="max_tokens"):
            await aengine.chat(MSG, {"max_tokens": 0})
        with pytest.raises(InputError, match="unknown ImageParams"):
            await aengine.generate_image("x", {"steps": 3})
        first = asyncio.create_task(aengine.chat(MSG, GREEDY, request_id="same"))
        await asyncio.sleep(0.01)
        with pytest.raises(InputError, match="already in use"):
            await aengine.chat(MSG, GREEDY, request_id="same")
        await first

    asyncio.run(run())
    assert idle(aengine)


def test_cancelling_the_consumer_aborts_at_any_stage(aengine):
    """A consumer that goes away (a disconnected client) aborts its request: chat mid-decode, an image in
    the DiT, an image in the decoder. Everything it held is freed."""

    async def cancel_after(agen, stage_seen):
        async for out in agen:
            if stage_seen(out):
                return out  # leaving the loop closes the generator: the request is aborted

    async def run():
        await cancel_after(aengine.chat_outputs(MSG, SamplingParams(max_tokens=200, temperature=0.0)),
                           lambda o: len(o.token_ids) == 3)
        await cancel_after(aengine.generate_image_stream("a", ImageParams(seed=1, dit_steps=9, decoder_steps=9)),
                           lambda o: o.stage == "dit")
        await cancel_after(aengine.generate_image_stream("b", ImageParams(seed=2, dit_steps=2, decoder_steps=9)),
                           lambda o: o.stage == "decoder" and o.step == 2)
        task = asyncio.create_task(aengine.chat(MSG, SamplingParams(max_tokens=200, temperature=0.0)))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):  # the aborts reach the loop thread as commands
            if idle(aengine):
                break
            await asyncio.sleep(0.02)

    asyncio.run(run())
    assert idle(aengine)
    assert aengine.engine._decoder is not None and len(aengine.engine._decoder) == 0


def test_a_failing_request_fails_alone(aengine):
    decoder = aengine.engine._decoder
    admit = decoder.admit

    def admit_or_fail(key, *args):
        if key == "bad":
            raise RuntimeError("injected decoder failure")
        return admit(key, *args)

    decoder.admit = admit_or_fail

    async def run():
        bad = asyncio.create_task(aengine.generate_image("x", FAST, request_id="bad"))
        good = asyncio.create_task(aengine.generate_image("y", FAST, request_id="good"))
        chat = asyncio.create_task(aengine.chat(MSG, GREEDY))
        with pytest.raises(RequestFailedError, match="injected decoder failure"):
            await bad
        return await good, await chat

    image, chat = asyncio.run(run())
    assert image.image.size == (64, 64) and chat.finish_reason == "length"
    assert not aengine.is_dead and idle(aengine)


def test_a_dead_loop_fails_everyone_and_says_so(aengine):
    def broken_step():
        raise RuntimeError("the loop broke")

    aengine.engine.step = broken_step

    async def run():
        with pytest.raises(EngineDeadError, match="the loop broke"):
            await aengine.chat(MSG, GREEDY)
        with pytest.raises(EngineDeadError):
            await aengine.chat(MSG, GREEDY)

    asyncio.run(run())
    assert aengine.is_dead


def test_shutdown_drains_then_refuses(aengine):
    async def run():
        running = asyncio.create_task(aengine.chat(MSG, GREEDY))
        await asyncio.sleep(0.05)
        await aengine.shutdown(drain_timeout_s=60.0)
        result = await running  # drained, not aborted
        with pytest.raises(EngineShutdownError):
            await aengine.chat(MSG, GREEDY)
        return result

    assert asyncio.run(run()).finish_reason == "length"


def test_shutdown_aborts_what_outlives_the_drain(aengine):
    async def run():
        long = asyncio.create_task(aengine.chat(MSG, SamplingParams(max_tokens=900, temperature=0.0,
                                                                    ignore_eos=True)))
        await asyncio.sleep(0.05)
        await aengine.shutdown(drain_timeout_s=0.1)
        with pytest.raises(EngineShutdownError):
            await long

    asyncio.run(run())
