"""Helpers of the server's tests: a `blip3o-engine serve` subprocess, Prometheus text parsing, idleness."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

API_KEY = "test-key-123"
START_TIMEOUT_S = 300  # loading the tiny engine takes seconds; a machine busy with other tests can take minutes
IDLE_TIMEOUT_S = 30


class ServerProcess:
    """One `blip3o-engine serve` subprocess; `url` once it said it is ready."""

    def __init__(self, args: list[str], log_path: Path, cache_dir: Path) -> None:
        env = {**os.environ, "BLIP3O_ENGINE_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"}
        env.pop("PYTHONSAFEPATH", None)
        self.log_path = log_path
        self._log = open(log_path, "wb")
        cmd = [sys.executable, "-m", "blip3o_engine", "serve", "--model", "tiny", "--host", "127.0.0.1", "--port", "0",
               "--threads", "1", "--log-level", "warning", *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.url = self._wait_ready()

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            match = re.search(r"ready: (http://\S+)", self.log())
            if match:
                return match.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the server was not ready within {START_TIMEOUT_S} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._log.close()


def metric_values(text: str, name: str) -> dict[str, float]:
    """{labels: value} of one metric in Prometheus' text format."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels, _, value = line[len(name):].rpartition(" ")
            out[labels.strip()] = float(value)
    return out


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one series (0 if absent); labels other than model_name must all match."""
    total = 0.0
    for key, value in metric_values(text, name).items():
        if all(f'{k}="{v}"' in key for k, v in labels.items()):
            total += value
    return total


def wait_idle(url: str) -> str:
    """Poll /metrics until nothing runs or waits and no KV block is used; returns the last scrape."""
    import httpx

    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while True:
        text = httpx.get(f"{url}/metrics", timeout=30).text
        busy = {name: metric(text, name) for name in ("blip3o:num_requests_running", "blip3o:num_requests_waiting",
                                                      "blip3o:kv_cache_used_blocks")}
        if not any(busy.values()):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"the server is not idle {IDLE_TIMEOUT_S} s after the test: {busy}")
        time.sleep(0.05)


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
