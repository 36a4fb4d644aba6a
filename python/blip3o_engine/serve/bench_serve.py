"""`blip3o-engine bench serve`: a bounded load generator for a running server, loopback only.

    blip3o-engine bench serve --url http://127.0.0.1:8000 --concurrency 4 --duration 30 --mix chat:0.8,image:0.2

`concurrency` workers each send one request at a time until `duration` seconds have passed (then the requests
in flight finish, each within --timeout-s); every request is chat or image with the mix's weights (a seeded
choice, so runs repeat). Chat requests stream (`stream: true`, `ignore_eos`, greedy) and give TTFT (request sent
-> first content chunk) and ITL (between content chunks); image requests give their latency. The report:
requests/s, TTFT and ITL p50/p99, image latency p50/p99, and the errors by HTTP status ("conn" for connection
failures). It only targets this machine (loopback addresses): it is a measuring tool, not a way to load other
people's servers.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np

from ..errors import InputError

MAX_DURATION_S = 3600
MAX_CONCURRENCY = 256
CHAT_PROMPT = "Describe a red apple on a wooden table, in detail."
IMAGE_PROMPT = "a red apple on a wooden table"


@dataclass
class Results:
    ok: Counter = field(default_factory=Counter)  # kind -> finished requests
    errors: Counter = field(default_factory=Counter)  # status code (or "conn") -> count
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    chat_latency: list[float] = field(default_factory=list)
    image_latency: list[float] = field(default_factory=list)
    tokens: int = 0
    elapsed_s: float = 0.0

    def summary(self) -> dict:
        done = sum(self.ok.values())
        return {"requests_ok": done, "requests_failed": sum(self.errors.values()), "elapsed_s": self.elapsed_s,
                "requests_per_s": done / self.elapsed_s if self.elapsed_s else 0.0,
                "by_kind": dict(self.ok), "errors_by_status": {str(k): v for k, v in sorted(self.errors.items(),
                                                                                           key=str)},
                "ttft_ms": _percentiles(self.ttft, 1e3), "itl_ms": _percentiles(self.itl, 1e3),
                "chat_latency_s": _percentiles(self.chat_latency), "image_latency_s": _percentiles(self.image_latency),
                "generated_tokens_per_s": self.tokens / self.elapsed_s if self.elapsed_s else 0.0}


def _percentiles(values: list[float], scale: float = 1.0) -> dict:
    if not values:
        return {"n": 0, "p50": None, "p99": None}
    arr = np.asarray(values) * scale
    return {"n": len(values), "p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99))}


# ------------------------------------------------------------------------------ arguments


def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for item in text.split(","):
        kind, _, weight = item.strip().partition(":")
        try:
            value = float(weight)
        except ValueError:
            value = -1.0
        if kind not in ("chat", "image") or value < 0 or kind in mix:
            raise argparse.ArgumentTypeError(f"expected a mix like chat:0.8,image:0.2, got {text!r}")
        mix[kind] = value
    if sum(mix.values()) <= 0:
        raise argparse.ArgumentTypeError(f"the mix's weights must not all be 0: {text!r}")
    return mix


def check_loopback(url: str) -> str:
    """The URL without a trailing slash, if its host is this machine (InputError otherwise)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"--url must be http(s)://HOST:PORT, got {url!r}")
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(parts.hostname, parts.port or 80)}
    except OSError as e:
        raise InputError(f"cannot resolve {parts.hostname}: {e}") from e
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise InputError(f"bench serve only loads servers on this machine (loopback addresses); {parts.hostname} "
                         f"is {', '.join(sorted(addresses))}")
    return url.rstrip("/")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blip3o-engine bench serve",
                                description="Load-test a running `blip3o-engine serve` on this machine.")
    p.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000 (loopback only)")
    p.add_argument("--concurrency", type=int, default=4, help=f"requests in flight (1-{MAX_CONCURRENCY}, default 4)")
    p.add_argument("--duration", type=float, default=30.0,
                   help=f"seconds to keep sending (at most {MAX_DURATION_S}, default 30)")
    p.add_argument("--mix", type=parse_mix, default=parse_mix("chat:0.8,image:0.2"),
                   help="request kinds and weights (default chat:0.8,image:0.2)")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--model", default=None, help="the model id to send (default: the server's first model)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per chat request (default 32)")
    p.add_argument("--image-steps", type=int, default=10, help="decoder steps per image (default 10)")
    p.add_argument("--dit-steps", type=int, default=10, help="DiT steps per image (default 10)")
    p.add_argument("--size", default=None, help="image size WxH (default: the model's native size)")
    p.add_argument("--seed", type=int, default=0, help="seeds the choice of request kinds (default 0)")
    p.add_argument("--timeout-s", type=float, default=600.0, help="limit for one request (default 600)")
    p.add_argument("--json", default=None, help="also write the summary to this JSON file")
    return p


# ------------------------------------------------------------------------------ the load


class Load:
    def __init__(self, args, base: str, model: str) -> None:
        self.args = args
        self.base = base
        self.model = model
        self.results = Results()
        self.rng = random.Random(args.seed)
        self.kinds, self.weights = zip(*args.mix.items())

    async def run(self, client) -> Results:
        start = time.perf_counter()
        deadline = start + self.args.duration
        await asyncio.gather(*(self._worker(client, deadline) for _ in range(self.args.concurrency)))
        self.results.elapsed_s = time.perf_counter() - start
        return self.results

    async def _worker(self, client, deadline: float) -> None:
        while time.perf_counter() < deadline:
            kind = self.rng.choices(self.kinds, self.weights)[0]
            try:
                await (self._chat(client) if kind == "chat" else self._image(client))
            except _HTTPStatus as e:
                self.results.errors[e.status] += 1
            except Exception:  # noqa: BLE001 - connection failures and timeouts are results too
                self.results.errors["conn"] += 1
            else:
                self.results.ok[kind] += 1

    async def _chat(self, client) -> None:
        body = {"model": self.model, "messages": [{"role": "user", "content": CHAT_PROMPT}], "stream": True,
                "max_tokens": self.args.max_tokens, "temperature": 0, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        sent = time.perf_counter()
        last = None
        async with client.stream("POST", f"{self.base}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                raise _HTTPStatus(response.status_code)
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise _HTTPStatus(f"stream:{chunk['error'].get('code') or 'error'}")
                if chunk.get("usage"):
                    self.results.tokens += chunk["usage"]["completion_tokens"]
                if any(c["delta"].get("content") for c in chunk["choices"]):
                    now = time.perf_counter()
                    if last is None:
                        self.results.ttft.append(now - sent)
                    else:
                        self.results.itl.append(now - last)
                    last = now
        self.results.chat_latency.append(time.perf_counter() - sent)

    async def _image(self, client) -> None:
        body = {"model": self.model, "prompt": IMAGE_PROMPT, "num_inference_steps": self.args.image_steps,
                "dit_steps": self.args.dit_steps}
        if self.args.size:
            body["size"] = self.args.size
        sent = time.perf_counter()
        response = await client.post(f"{self.base}/v1/images/generations", json=body)
        if response.status_code != 200:
            raise _HTTPStatus(response.status_code)
        self.results.image_latency.append(time.perf_counter() - sent)


class _HTTPStatus(Exception):
    def __init__(self, status) -> None:
        super().__init__(status)
        self.status = status


async def _run(args, base: str) -> Results:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(headers=headers, timeout=args.timeout_s, limits=limits) as client:
        model = args.model
        if model is None:
            response = await client.get(f"{base}/v1/models")
            if response.status_code != 200:
                raise InputError(f"GET {base}/v1/models answered {response.status_code}: {response.text[:200]}")
            model = response.json()["data"][0]["id"]
        return await Load(args, base, model).run(client)


def format_report(args, summary: dict) -> str:
    def ms(p):
        return "-" if p["p50"] is None else f"{p['p50']:.1f} / {p['p99']:.1f} (n={p['n']})"

    def sec(p):
        return "-" if p["p50"] is None else f"{p['p50']:.2f} / {p['p99']:.2f} (n={p['n']})"

    errors = ", ".join(f"{k}: {v}" for k, v in summary["errors_by_status"].items()) or "none"
    mix = ",".join(f"{k}:{v:g}" for k, v in args.mix.items())
    return "\n".join([
        f"bench serve {args.url}  concurrency {args.concurrency}  duration {args.duration:g} s  mix {mix}",
        f"  requests        {summary['requests_ok']} ok ({', '.join(f'{k} {v}' for k, v in summary['by_kind'].items())}"
        f"), {summary['requests_failed']} failed in {summary['elapsed_s']:.1f} s -> "
        f"{summary['requests_per_s']:.2f} req/s",
        f"  errors          {errors}",
        f"  chat TTFT ms    p50 / p99  {ms(summary['ttft_ms'])}",
        f"  chat ITL ms     p50 / p99  {ms(summary['itl_ms'])}",
        f"  chat tokens/s   {summary['generated_tokens_per_s']:.1f}",
        f"  image latency s p50 / p99  {sec(summary['image_latency_s'])}",
    ])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not 1 <= args.concurrency <= MAX_CONCURRENCY:
            raise InputError(f"--concurrency must be in [1, {MAX_CONCURRENCY}], got {args.concurrency}")
        if not 0 < args.duration <= MAX_DURATION_S:
            raise InputError(f"--duration must be in (0, {MAX_DURATION_S}] seconds, got {args.duration}")
        if args.max_tokens < 1 or args.image_steps < 1 or args.dit_steps < 1 or args.timeout_s <= 0:
            raise InputError("--max-tokens, --image-steps and --dit-steps must be >= 1 and --timeout-s > 0")
        base = check_loopback(args.url)
        summary = asyncio.run(_run(args, base)).summary()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(args, summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "api_key"}, **summary}, f, indent=2)
    return 0


__all__ = ["build_parser", "check_loopback", "main", "parse_mix"]
