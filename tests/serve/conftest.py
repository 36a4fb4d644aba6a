"""Fixtures for the server's tests: `blip3o-engine serve` subprocesses on 127.0.0.1 (a free port each, chosen
by the server: `--port 0`, read back from its "ready:" line), killed in the finalizers.

`server` is the shared one (session scope, per xdist worker) with authentication, a 1 MiB body limit,
max_pending 4 and the media allow-lists set; after every test that uses it, its /metrics must show no
running or waiting request and no used KV block.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi")  # the [serve] extra

from _serve_util import API_KEY, ServerProcess, wait_idle  # noqa: E402


@pytest.fixture(autouse=True)
def _one_torch_thread(_keep_torch_threads):
    """The in-process oracle engine runs next to a server subprocess on a small, shared machine: one thread each
    keeps them from descheduling each other's threads (tiny's ops take microseconds; see README, --threads).
    The root conftest restores the count after the test."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory) -> Path:
    """The server's --allowed-local-media-path."""
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="session")
def shared_server(tiny_dir, media_dir, tmp_path_factory):
    server = ServerProcess(["--api-key", API_KEY, "--max-pending", "4", "--max-body-mb", "1",
                            "--allowed-media-domains", "127.0.0.1", "--allowed-local-media-path", str(media_dir),
                            "--max-image-pixels", str(512 * 512), "--media-timeout-s", "5"],
                           tmp_path_factory.mktemp("server") / "server.log", tiny_dir.parent)
    yield server
    server.stop()


@pytest.fixture
def server(shared_server):
    """The shared server; afterwards it must be idle (no running request, no used KV block)."""
    yield shared_server
    wait_idle(shared_server.url)


@pytest.fixture
def client(server):
    """The real OpenAI client, pointed at the shared server."""
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture
def http(server):
    """httpx for raw requests, authenticated."""
    import httpx

    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def oracle(tiny_engine):
    """The in-process engine the server's answers must equal: the optimized backend (the server's default)
    over the same tiny weights."""
    from _paged_util import optimized_engine  # tests/parity/_paged_util.py

    return optimized_engine(tiny_engine)
