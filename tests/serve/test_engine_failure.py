"""Failures after the 200: the app in-process (httpx's ASGI transport) over a real AsyncEngine, with a fault
injected the way tests/unit/test_async_engine.py does (a stage that raises). An error in mid-stream is sent as
an error event, then [DONE]; a failing request fails alone; once the engine's loop has died, /health and the
API answer 503 ("engine_dead")."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from blip3o_engine import AsyncEngine
from blip3o_engine.serve.app import create_app
from blip3o_engine.serve.settings import ServeSettings
from _paged_util import optimized_engine  # tests/parity/_paged_util.py

MSG = [{"role": "user", "content": "Describe a red apple."}]
TIMEOUT_S = 120


@pytest.fixture
def aengine(tiny_engine):
    ae = AsyncEngine(optimized_engine(tiny_engine), max_pending=8)
    yield ae
    if not ae.is_dead:
        asyncio.run(ae.shutdown(0.0))


def run_with_client(aengine, scenario):
    """asyncio.run(scenario(client)) with an httpx client on the app (no socket, no lifespan)."""
    app = create_app(aengine, ServeSettings(served_model_name="tiny"))

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app", timeout=TIMEOUT_S) as client:
            return await scenario(client)

    return asyncio.run(main())


def data_events(text: str) -> list:
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:])
            for line in text.splitlines() if line.startswith("data: ")]


def test_a_failing_image_sends_an_error_event_and_fails_alone(aengine):
    decoder = aengine.engine._decoder

    def fail(*args):
        raise RuntimeError("injected decoder failure")

    decoder.admit = fail  # the DiT stage runs (progress events go out), then the decoder refuses the image

    async def scenario(client):
        body = {"model": "tiny", "prompt": "a red apple", "stream": True, "stream_progress": True, "seed": 1,
                "dit_steps": 3, "num_inference_steps": 4}
        image = await client.post("/v1/images/generations", json=body)
        chat = await client.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG, "max_tokens": 4})
        health = await client.get("/health")
        return image, chat, health

    image, chat, health = run_with_client(aengine, scenario)
    assert image.status_code == 200  # the stream had begun
    events = data_events(image.text)
    assert events[0]["type"] == "image_generation.progress" and events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "request_failed"
    assert "injected decoder failure" in error["message"]
    assert chat.status_code == 200 and health.status_code == 200  # the engine lives on
    assert not aengine.is_dead and aengine.stats().num_unfinished == 0


def test_a_dead_engine_loop_ends_streams_with_an_error_and_turns_health_503(aengine):
    engine = aengine.engine
    step, calls = engine.step, []

    def step_then_break():
        calls.append(1)
        if len(calls) > 6:  # a few tokens out, then the loop breaks
            raise RuntimeError("the loop broke")
        return step()

    engine.step = step_then_break

    async def scenario(client):
        body = {"model": "tiny", "messages": MSG, "max_tokens": 200, "ignore_eos": True, "stream": True}
        stream = await client.post("/v1/chat/completions", json=body)
        later = await client.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG, "max_tokens": 2})
        image = await client.post("/v1/images/generations", json={"model": "tiny", "prompt": "x"})
        return stream, later, image, await client.get("/health")

    stream, later, image, health = run_with_client(aengine, scenario)
    assert stream.status_code == 200
    events = data_events(stream.text)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant" and events[-1] == "[DONE]"
    assert any(e != "[DONE]" and "choices" in e and e["choices"] and e["choices"][0]["delta"].get("content")
               for e in events)  # some text came before the failure
    assert events[-2]["error"]["code"] == "engine_dead" and "the loop broke" in events[-2]["error"]["message"]
    for r in (later, image, health):
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead", r.text
