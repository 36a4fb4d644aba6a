"""/v1/chat/completions through a real server subprocess, driven by the real `openai` client (and httpx where a
raw look is needed). Greedy answers must equal `Engine.chat`'s text exactly (fp32, same weights and backend)."""

from __future__ import annotations

import base64
import http.server
import threading

import httpx
import openai
import pytest
from PIL import Image

from blip3o_engine import SamplingParams
from _serve_util import API_KEY, png_bytes

MSG = [{"role": "user", "content": "Describe a red apple."}]


def test_greedy_chat_equals_engine_chat(client, oracle):
    want = oracle.chat(MSG, SamplingParams(max_tokens=12, temperature=0.0))
    got = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=12, temperature=0, n=2)
    assert got.object == "chat.completion" and got.model == "tiny" and got.id.startswith("chatcmpl-")
    assert [c.message.content for c in got.choices] == [want.text, want.text]
    assert [c.index for c in got.choices] == [0, 1]
    assert [c.finish_reason for c in got.choices] == [want.finish_reason] * 2
    assert got.usage.prompt_tokens == want.prompt_tokens
    assert got.usage.completion_tokens == 2 * len(want.token_ids)
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_stop_strings_and_max_completion_tokens(client, oracle):
    full = oracle.chat(MSG, SamplingParams(max_tokens=12, temperature=0.0))
    stop = full.text[4:7]
    assert stop.strip(), full.text  # the tiny model's greedy text is long enough to cut
    want = oracle.chat(MSG, SamplingParams(max_tokens=12, temperature=0.0, stop=(stop,)))
    got = client.chat.completions.create(model="tiny", messages=MSG, max_completion_tokens=12, max_tokens=3,
                                         temperature=0, stop=[stop])
    assert got.choices[0].message.content == want.text and got.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_choice_i_uses_seed_plus_i(client, oracle):
    params = dict(max_tokens=8, temperature=1.0, top_p=0.9, top_k=50, repetition_penalty=1.1)
    want = [oracle.chat(MSG, SamplingParams(**params, seed=s)).text for s in (7, 8)]
    got = client.chat.completions.create(model="tiny", messages=MSG, n=2, seed=7, max_tokens=8, temperature=1.0,
                                         top_p=0.9, extra_body={"top_k": 50, "repetition_penalty": 1.1})
    assert [c.message.content for c in got.choices] == want


def test_streamed_chat_chunks_and_usage(client, oracle, http):
    want = oracle.chat(MSG, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    chunks = list(client.chat.completions.create(
        model="tiny", messages=MSG, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == want.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])

    body = {"model": "tiny", "messages": MSG, "max_tokens": 3, "stream": True, "n": 2}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert not any('"usage"' in e for e in events)  # not asked for


# ------------------------------------------------------------------------------ images in messages


@pytest.fixture(scope="module")
def image_host(test_image, tmp_path_factory):
    """An HTTP server on 127.0.0.1 (an allowed media domain) serving apple.png, plus a redirect and a 404."""
    root = tmp_path_factory.mktemp("www")
    (root / "apple.png").write_bytes(png_bytes(test_image))

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):
            if self.path == "/moved.png":
                self.send_response(302)
                self.send_header("Location", "/apple.png")
                self.end_headers()
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _image_message(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What is in this picture?"}]}]


def test_chat_about_an_image_from_every_allowed_source(client, oracle, test_image, media_dir, image_host):
    want = oracle.chat([{"role": "user", "content": [{"type": "image", "image": test_image},
                                                     {"type": "text", "text": "What is in this picture?"}]}],
                       SamplingParams(max_tokens=8, temperature=0.0))
    (media_dir / "apple.png").write_bytes(png_bytes(test_image))
    data_uri = "data:image/png;base64," + base64.b64encode(png_bytes(test_image)).decode()
    for url in (data_uri, f"{image_host}/apple.png", (media_dir / "apple.png").as_uri()):
        got = client.chat.completions.create(model="tiny", messages=_image_message(url), max_tokens=8, temperature=0)
        assert got.choices[0].message.content == want.text, url[:40]
        assert got.usage.prompt_tokens == want.prompt_tokens


def test_images_outside_the_limits_are_refused(http, media_dir, image_host, tmp_path):
    big = Image.new("RGB", (600, 600), "red")  # 360000 pixels > the server's --max-image-pixels 262144
    outside = tmp_path / "secret.png"
    outside.write_bytes(png_bytes(Image.new("RGB", (8, 8))))
    cases = {
        "domain_not_allowed": f"http://localhost:{image_host.rsplit(':', 1)[1]}/apple.png",
        "image_fetch_failed": f"{image_host}/moved.png",  # redirects are not followed
        "local_media_not_allowed": outside.as_uri(),
        "invalid_image": "data:image/png;base64," + base64.b64encode(b"not an image").decode(),
        "image_too_large": "data:image/png;base64," + base64.b64encode(png_bytes(big)).decode(),
    }
    (media_dir / "link.png").unlink(missing_ok=True)
    (media_dir / "link.png").symlink_to(outside)  # a link out of the allowed directory is outside too
    cases["local_media_not_allowed (link)"] = (media_dir / "link.png").as_uri()
    for code, url in cases.items():
        r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": _image_message(url), "max_tokens": 2})
        assert r.status_code == 400, (code, r.text)
        err = r.json()["error"]
        assert err["code"] == code.split(" ")[0] and err["type"] == "invalid_request_error", (code, err)
        assert err["param"] == "messages[0].content[0].image_url"
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": _image_message(f"{image_host}/nope.png")})
    assert r.status_code == 400 and "404" in r.json()["error"]["message"]


# ------------------------------------------------------------------------------ errors


def test_validation_errors_are_400_in_openais_shape(http):
    def post(body, **kw):
        return http.post("/v1/chat/completions", json=body, **kw)

    r = http.post("/v1/chat/completions", content=b'{"model": "tiny", "messages": [', headers={
        "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    cases = [({"model": "tiny"}, "messages"), ({"messages": MSG, "temperature": "hot"}, "temperature"),
             ({"messages": MSG, "max_tokens": 0}, "max_tokens"), ({"messages": MSG, "top_p": 2}, "top_p"),
             ({"messages": MSG, "n": 0}, "n"), ({"messages": MSG, "max_tokens": 100000}, "max_tokens"),
             ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
             ({"messages": [{"role": "user", "content": [{"type": "input_audio", "x": 1}]}]}, "content")]
    for body, word in cases:
        r = post(body)
        assert r.status_code == 400, (body, r.text)
        assert word in r.json()["error"]["message"] + str(r.json()["error"]["param"]), (body, r.json())
    # Unknown fields are ignored, as vLLM does.
    r = post({"model": "tiny", "messages": MSG, "max_tokens": 2, "logprobs": True, "user": "u", "frobnicate": 1})
    assert r.status_code == 200, r.text


def test_auth_models_and_unknown_things(server, client):
    url = server.url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"},
                    {"Authorization": f"Bearer {API_KEY}x"}):
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": MSG}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", headers
    assert httpx.get(f"{url}/health").status_code == 200  # public
    assert httpx.get(f"{url}/metrics").status_code == 200
    assert httpx.get(f"{url}/").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=2)
    r = httpx.get(f"{url}/v1/nothing-here", headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 404 and "error" in r.json()
    assert r.headers["x-blip3o-replica"]  # every response names the process that answered


def test_body_limit_is_413(http):
    huge = "data:image/png;base64," + "A" * (1 << 20)  # over the server's --max-body-mb 1
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": _image_message(huge)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted while reading
        for _ in range(20):
            yield b"x" * 65536

    r = http.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_max_pending_is_429_with_retry_after(server, http):
    long = {"model": "tiny", "messages": MSG, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    streams = [http.stream("POST", "/v1/chat/completions", json=long) for _ in range(4)]  # --max-pending 4
    lines = []  # kept: a dropped, half-read line iterator closes its connection (the server then aborts)
    try:
        for s in streams:
            r = s.__enter__()
            assert r.status_code == 200
            lines.append(r.iter_lines())
            next(lines[-1])  # admitted (the first chunk comes once the request has run)
        r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG, "max_tokens": 2})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error" and "max_pending=4" in r.json()["error"]["message"]
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0).chat.completions.create(
                model="tiny", messages=MSG, max_tokens=2)
    finally:
        for s in streams:  # closing the connections aborts the four requests
            s.__exit__(None, None, None)
