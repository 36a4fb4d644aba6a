"""A request's life tied to its connection, and the server's own end: a client that disconnects (streaming or
not, chat or image) aborts its request, whose KV blocks and decoder slot are then free (the `server` fixture
checks /metrics for that after every test); SIGTERM refuses new work with 503, lets running requests finish,
and exits 0. Raw sockets and httpx: the OpenAI client hides the connection."""

from __future__ import annotations

import json
import signal
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest

from _serve_util import API_KEY, ServerProcess, metric

MSG = [{"role": "user", "content": "Describe a red apple."}]
# Long enough that it is still running when the client leaves: tiny decodes a few hundred tokens a second on a
# busy core, and its context holds 4096 (so the abort is what ends it, not the length limit).
LONG_CHAT = {"model": "tiny", "messages": MSG, "max_tokens": 3000, "ignore_eos": True, "temperature": 0}
# Hundreds of DiT and decoder steps: seconds of work, enough to leave while the image is in flight.
LONG_IMAGE = {"model": "tiny", "prompt": "a red apple", "seed": 1, "dit_steps": 400, "num_inference_steps": 400}
POLL_TIMEOUT_S = 60


def scrape(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=30).text


def wait_for(url: str, condition, what: str) -> str:
    """Poll /metrics until `condition(text)` holds (bounded)."""
    deadline = time.monotonic() + POLL_TIMEOUT_S
    while True:
        text = scrape(url)
        if condition(text):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not seen within {POLL_TIMEOUT_S} s")
        time.sleep(0.05)


def raw_post(url: str, path: str, body: dict) -> socket.socket:
    """Send one HTTP/1.1 POST on a fresh socket and return the socket unread (the test closes it)."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    payload = json.dumps(body).encode()
    sock = socket.create_connection((host, port), timeout=30)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {API_KEY}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    """Bytes from the socket until `marker` has come (bounded by the socket's timeout and a size cap)."""
    data = b""
    while marker not in data:
        chunk = sock.recv(4096)
        assert chunk and len(data) < 1 << 20, data
        data += chunk
    return data


def aborts(text: str) -> float:
    return metric(text, "blip3o:request_success_total", finished_reason="abort")


def running(text: str) -> float:
    return metric(text, "blip3o:num_requests_running")


@pytest.mark.parametrize("kind,stream", [("chat", False), ("chat", True), ("image", False), ("image", True)])
def test_a_client_that_disconnects_aborts_its_request(server, kind, stream):
    before = scrape(server.url)
    path, body = (("/v1/chat/completions", LONG_CHAT) if kind == "chat" else ("/v1/images/generations", LONG_IMAGE))
    sock = raw_post(server.url, path, {**body, "stream": stream, "stream_progress": stream})
    try:
        busy = wait_for(server.url, lambda t: running(t) >= 1, "the request running")
        if kind == "chat":
            assert metric(busy, "blip3o:kv_cache_used_blocks") > 0  # it holds KV blocks now
        if stream:
            head = read_until(sock, b"data: ")  # the response has begun: 200 and the first event
            assert head.startswith(b"HTTP/1.1 200")
    finally:
        sock.close()
    after = wait_for(server.url, lambda t: aborts(t) == aborts(before) + 1 and not running(t), "the abort")
    assert metric(after, "blip3o:kv_cache_used_blocks") == 0  # and the `server` fixture checks idleness again
    # What it was aborted from never finished: no image counted, no chat tokens counted.
    assert metric(after, "blip3o:images_generated_total") == metric(before, "blip3o:images_generated_total")
    assert metric(after, "blip3o:generation_tokens_total") == metric(before, "blip3o:generation_tokens_total")


def test_sigterm_drains_then_exits_0(tiny_dir, tmp_path):
    server = ServerProcess(["--drain-timeout-s", "60"], tmp_path / "server.log", tiny_dir.parent)
    try:
        body = {"model": "tiny", "messages": MSG, "max_tokens": 400, "ignore_eos": True, "temperature": 0,
                "stream": True}
        with httpx.Client(base_url=server.url, timeout=120) as http:
            with http.stream("POST", "/v1/chat/completions", json=body) as r:
                lines = r.iter_lines()
                assert r.status_code == 200 and next(lines).startswith("data: ")  # running
                server.signal(signal.SIGTERM)
                deadline = time.monotonic() + POLL_TIMEOUT_S
                while httpx.get(f"{server.url}/health").status_code != 503:  # the drain has begun
                    assert time.monotonic() < deadline, "/health did not turn 503 after SIGTERM"
                    time.sleep(0.02)
                refused = http.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG, "max_tokens": 2})
                assert refused.status_code == 503 and refused.headers["retry-after"]
                assert refused.json()["error"]["code"] == "shutting_down"
                rest = [line for line in lines if line]  # the running request finishes in full
        assert rest[-1] == "data: [DONE]"
        finish = json.loads(rest[-2][6:])["choices"][0]["finish_reason"]
        assert finish == "length"
        assert server.proc.wait(timeout=60) == 0
        assert "draining" in server.log()
    finally:
        server.stop()
