"""`blip3o-engine bench serve`: the bounded load generator, against the shared server (loopback only)."""

from __future__ import annotations

import json

import pytest

from blip3o_engine.cli import main
from _serve_util import API_KEY


def test_bench_serve_reports_latencies_and_rate(server, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "serve", "--url", server.url, "--api-key", API_KEY, "--concurrency", "2", "--duration", "2",
               "--mix", "chat:0.5,image:0.5", "--max-tokens", "8", "--image-steps", "2", "--dit-steps", "2",
               "--json", str(out)])
    assert rc == 0
    report = capsys.readouterr().out
    assert "req/s" in report and "chat TTFT ms" in report and "image latency s" in report
    summary = json.loads(out.read_text())
    assert summary["requests_failed"] == 0 and summary["errors_by_status"] == {}
    assert summary["by_kind"]["chat"] > 0 and summary["by_kind"]["image"] > 0
    assert summary["requests_ok"] == summary["by_kind"]["chat"] + summary["by_kind"]["image"]
    assert summary["ttft_ms"]["n"] == summary["by_kind"]["chat"]  # one TTFT per chat request
    # 8 tokens: at most 7 gaps between content chunks (a token that ends inside a UTF-8 character sends no text)
    assert 0 < summary["itl_ms"]["n"] <= 7 * summary["by_kind"]["chat"]
    assert summary["image_latency_s"]["n"] == summary["by_kind"]["image"]
    assert summary["generated_tokens_per_s"] > 0 and "api_key" not in summary["args"]


def test_bench_serve_counts_errors_by_status(server, tmp_path, capsys):
    """Six workers against --max-pending 4 with long chats: the first four run for seconds, the other two get
    429 while they do; the report counts them by status."""
    out = tmp_path / "bench.json"
    rc = main(["bench", "serve", "--url", server.url, "--api-key", API_KEY, "--concurrency", "6", "--duration", "1",
               "--mix", "chat:1", "--max-tokens", "1500", "--json", str(out)])
    assert rc == 0
    summary = json.loads(out.read_text())
    assert summary["errors_by_status"].get("429", 0) > 0 and set(summary["errors_by_status"]) == {"429"}
    assert summary["by_kind"]["chat"] >= 4
    assert "429: " in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--url", "http://10.1.2.3:8000"], "loopback"),
    (["--url", "ftp://127.0.0.1:1"], "--url"),
    (["--url", "http://127.0.0.1:1", "--concurrency", "0"], "--concurrency"),
    (["--url", "http://127.0.0.1:1", "--duration", "100000"], "--duration"),
])
def test_bench_serve_refuses_bad_arguments(args, message, capsys):
    assert main(["bench", "serve", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_bench_serve_refuses_a_bad_mix(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "serve", "--url", "http://127.0.0.1:1", "--mix", "chat:0.5,video:0.5"])
    assert exc.value.code == 2 and "chat:0.8,image:0.2" in capsys.readouterr().err
