"""The README's "Serving" section runs as written and names what the server really has: its `openai` block
against the shared server (its URL and API key substituted), and every `blip3o:` metric it lists on /metrics."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from _serve_util import API_KEY
from test_readme import code_blocks, section  # tests/ is on sys.path: its conftest.py is the rootdir one

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_openai_example_runs(server, tmp_path, monkeypatch, capsys):
    blocks = code_blocks(section("Serving"), "python")
    assert len(blocks) == 1 and 'base_url="http://127.0.0.1:8000/v1"' in blocks[0] and '"sk-local"' in blocks[0]
    code = blocks[0].replace("http://127.0.0.1:8000/v1", f"{server.url}/v1").replace('"sk-local"', repr(API_KEY))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "readme_serving"})
    out = capsys.readouterr().out
    assert "completion_tokens=" in out and out.count("image_generation.partial_image") == 2
    assert out.rstrip().endswith("image_generation.completed")
    assert (tmp_path / "apple.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_documented_metrics_exist(server):
    documented = set(re.findall(r"`(blip3o:[a-z0-9_]+)`", section("Serving")))
    assert len(documented) >= 13
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    families = set(re.findall(r"^# TYPE (\S+) ", text, flags=re.M))
    for name in documented:  # counters are exposed as NAME_total, their family named without the suffix
        assert name in families or name.removesuffix("_total") in families, name
