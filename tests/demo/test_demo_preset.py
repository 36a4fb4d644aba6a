"""The `demo` preset ships inside the package as a checkpoint in the published layout, loads
without writing anything, and is the CLI's default model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blip3o_engine import Engine
from blip3o_engine.cli import DEFAULT_MODEL, DEMO_NOTE, main
from blip3o_engine.config import PRESETS, TRAINED_PRESETS, ModelConfig
from blip3o_engine.tiny import PACKAGED_PRESETS_DIR, preset_checkpoint

DEMO_DIR = PACKAGED_PRESETS_DIR / "demo"
MAX_BYTES = 10 * 1024 * 1024  # issue 14: <= 10 MB in total


def test_demo_is_a_trained_preset_and_the_cli_default():
    assert "demo" in PRESETS and "demo" in TRAINED_PRESETS and DEFAULT_MODEL == "demo"
    assert preset_checkpoint("demo") == DEMO_DIR


def test_packaged_checkpoint_layout_and_size():
    files = [p for p in DEMO_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    total = sum(p.stat().st_size for p in files)
    assert total <= MAX_BYTES, f"{total / 2**20:.1f} MiB"
    names = {str(p.relative_to(DEMO_DIR)) for p in files}
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                 "preprocessor_config.json", "model.safetensors", "training.json",
                 "diffusion-decoder/model_index.json", "diffusion-decoder/scheduler/scheduler_config.json",
                 "diffusion-decoder/unet/config.json", "diffusion-decoder/unet/diffusion_pytorch_model.bf16.safetensors",
                 "diffusion-decoder/vae/config.json", "diffusion-decoder/vae/diffusion_pytorch_model.bf16.safetensors"):
        assert name in names, name
    assert not any(n.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")) for n in names)  # safetensors only
    cfg = ModelConfig.from_checkpoint(DEMO_DIR)
    assert cfg.can_generate_images and cfg.default_image_size == 64 and cfg.n_query == 64
    assert json.loads((DEMO_DIR / "config.json").read_text())["model_type"] == "blip3o_qwen"


def test_loading_demo_writes_nothing(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("BLIP3O_ENGINE_CACHE", str(cache))
    before = {p: p.stat().st_mtime_ns for p in DEMO_DIR.rglob("*")}
    engine = Engine.from_pretrained("demo")
    assert engine.cfg.name == "demo" and engine.model.dit is not None
    assert not cache.exists()
    assert {p: p.stat().st_mtime_ns for p in DEMO_DIR.rglob("*")} == before


def test_cli_default_model_is_demo_with_a_note(tmp_path, capsys):
    out = tmp_path / "circle.png"
    rc = main(["generate", "a red circle", "-o", str(out), "--seed", "0", "--steps", "3", "--dit-steps", "3"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert DEMO_NOTE in err and "random-weight" not in err
    from PIL import Image

    assert Image.open(out).size == (64, 64)


@pytest.mark.parametrize("argv, fragment", [
    (["--threads", "0"], "--threads"),
])
def test_train_demo_bad_arguments(tmp_path, capsys, argv, fragment):
    rc = main(["train-demo", "-o", str(tmp_path / "new"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and fragment in err


def test_train_demo_refuses_a_non_empty_directory(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("work")
    rc = main(["train-demo", "-o", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "not an empty directory" in err and "Traceback" not in err
    assert (tmp_path / "keep.txt").read_text() == "work"


def test_train_demo_quick_writes_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "quick"
    rc = main(["train-demo", "-o", str(out), "--quick", "--no-eval", "--no-progress", "--seed", "1"])
    text = capsys.readouterr().out
    assert rc == 0
    assert f"wrote the demo checkpoint to {out}" in text and "c_generation" in text
    assert (out / "model.safetensors").is_file() and (out / "loss_curves.png").is_file()
    assert Path(out / "training.json").is_file()


def test_demo_is_not_flagged_random():
    """`is_random_preset` drives the CLI's and the benchmarks' "outputs are noise" notes; tiny's is
    tests/unit/test_engine_api.py::test_tiny_preset_is_flagged_random."""
    engine = Engine.from_pretrained("demo", backend="reference")
    assert not engine.is_random_preset and engine.name == "demo"
