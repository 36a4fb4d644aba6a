"""The README's examples run as written: the commands of its "Run" section and its "Python API" block,
in a fresh directory: the packaged `demo` preset (the CLI's default) and the tiny preset (the session's
cached checkpoint)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from blip3o_engine.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


@pytest.fixture
def fresh_dir(tmp_path, tiny_dir, monkeypatch):
    import torch

    monkeypatch.setenv("BLIP3O_ENGINE_CACHE", str(tiny_dir.parent))  # the `tiny` preset is already built
    monkeypatch.chdir(tmp_path)
    # The examples run the full default step counts. tiny's ops take microseconds, so one thread is
    # as fast as two on an idle machine and cannot be slowed down by oversubscribed cores (-n 2 on a
    # shared machine: this test took 640 s with two threads per worker). conftest restores the count.
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what the CLI's default then picks too
    return tmp_path


def test_run_section_commands(fresh_dir, capsys):
    commands = [line.split(" # ")[0] for block in code_blocks(section("Run"), "bash")
                for line in block.splitlines() if line.startswith("blip3o-engine ")]
    assert len(commands) >= 4 and any(" chat " in c and "--image" in c for c in commands)
    for command in commands:
        argv = shlex.split(command)[1:]
        try:
            rc = main(argv)
        except SystemExit as e:  # --help
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 0, (command, err)
    assert (fresh_dir / "tiny-ckpt" / "config.json").is_file()
    # The main command (no --model) draws with the trained demo preset, at its native 64x64.
    from PIL import Image

    assert commands[0].startswith("blip3o-engine generate ") and "--model" not in commands[0]
    assert Image.open(fresh_dir / "circle.png").size == (64, 64)


def test_python_api_blocks(fresh_dir, capsys):
    blocks = code_blocks(section("Python API"), "python")
    assert len(blocks) >= 2  # the sync Engine, then the AsyncEngine example
    namespace = {"__name__": "readme_example"}
    for block in blocks:  # in order, one namespace: a later block may use an earlier one's names (b3)
        exec(compile(block, str(README), "exec"), namespace)
    assert (fresh_dir / "circle.png").is_file()
    assert capsys.readouterr().out.strip()
