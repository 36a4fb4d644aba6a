"""Replicas on Ray Serve (`blip3o_engine.serve.ray.build_app`): two replicas on CPU, half a CPU each, answer the
same routes as the single-process server, each response names its replica in `x-blip3o-replica`, and after one
replica's actor is killed requests still succeed (Ray routes them to the other while it replaces the dead one).

A local Ray instance in this test process (2 CPUs, a small object store), shut down in the fixture's finalizer.
Marked slow (Ray and two engines start in ~30-60 s on 2 busy cores; `-m "not slow"` skips it); every wait is
bounded."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

pytest.importorskip("ray.serve", reason="needs the [ray] extra")
pytestmark = pytest.mark.slow

MSG = [{"role": "user", "content": "Describe a red apple."}]
REPLICA_HEADER = "x-blip3o-replica"
DEPLOY_TIMEOUT_S = 300  # Ray's own start and two engine loads, on a machine busy with other tests
REQUEST_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_app(tiny_dir):
    import ray
    from ray import serve

    from blip3o_engine.serve.settings import ServeSettings
    from blip3o_engine.serve.ray import build_app

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 << 20, log_to_driver=False,
             runtime_env={"env_vars": {"BLIP3O_ENGINE_CACHE": str(tiny_dir.parent), "OMP_NUM_THREADS": "1"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(str(tiny_dir), num_replicas=2, num_cpus=0.5, threads=1, max_pending=8,
                        settings=ServeSettings(served_model_name="tiny"), max_ongoing_requests=4)
        serve.run(app, name="blip3o-test", route_prefix="/", blocking=False)
        _wait_running("blip3o-test")
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _wait_running(app_name: str) -> None:
    from ray import serve

    deadline = time.monotonic() + DEPLOY_TIMEOUT_S
    while True:
        status = serve.status().applications.get(app_name)
        if status is not None and status.status == "RUNNING":
            return
        assert status is None or status.status != "DEPLOY_FAILED", status
        assert time.monotonic() < deadline, f"the app did not start within {DEPLOY_TIMEOUT_S} s: {status}"
        time.sleep(0.5)


def replicas_answering(url: str, want: int, tries: int = 60) -> set[str]:
    """Send /v1/models until `want` distinct replicas have answered (Ray's router picks at random)."""
    seen = set()
    for _ in range(tries):
        r = httpx.get(f"{url}/v1/models", timeout=REQUEST_TIMEOUT_S)
        assert r.status_code == 200, r.text
        seen.add(r.headers[REPLICA_HEADER])
        if len(seen) >= want:
            break
    return seen


def kill_replica(replica_name: str) -> None:
    """Kill the Ray actor of the replica whose header is `replica_name` ("<deployment>#<replica id>")."""
    import ray

    replica_id = replica_name.rsplit("#", 1)[1]
    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith("#" + replica_id)]
    assert len(names) == 1, (replica_name, ray.util.list_named_actors(all_namespaces=True))
    ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=True)


def test_two_replicas_answer_and_survive_one_killed(ray_app, oracle):
    from blip3o_engine import SamplingParams

    want = oracle.chat(MSG, SamplingParams(max_tokens=8, temperature=0.0)).text
    replicas = replicas_answering(ray_app, 2)
    assert len(replicas) == 2, replicas
    by_replica: dict[str, list[str]] = {}
    with httpx.Client(base_url=ray_app, timeout=REQUEST_TIMEOUT_S) as http:
        for _ in range(40):  # the same routes on both replicas, with the same answers
            r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG, "max_tokens": 8,
                                                        "temperature": 0})
            assert r.status_code == 200, r.text
            by_replica.setdefault(r.headers[REPLICA_HEADER], []).append(r.json()["choices"][0]["message"]["content"])
            if len(by_replica) == 2:
                break
        assert set(by_replica) == replicas and all(t == [want] * len(t) for t in by_replica.values()), by_replica
        image = http.post("/v1/images/generations", json={"model": "tiny", "prompt": "a red apple", "seed": 1,
                                                          "num_inference_steps": 2, "dit_steps": 2})
        assert image.status_code == 200 and image.json()["data"][0]["b64_json"]
        assert http.get("/health").status_code == 200
        assert "blip3o:num_requests_running" in http.get("/metrics").text

        victim = sorted(replicas)[0]
        kill_replica(victim)
        survivors = set()
        for _ in range(8):  # every request still succeeds: Ray routes around the dead replica
            r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG, "max_tokens": 8,
                                                        "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == want
            survivors.add(r.headers[REPLICA_HEADER])
        assert victim not in survivors
