"""The `blip3o-engine` command line, in-process through `cli.main` (fast, output captured) and as a
subprocess for the entry points (`python -m blip3o_engine`, the installed console script)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from blip3o_engine.cli import main

FAST = ["--steps", "3", "--dit-steps", "3"]


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def image_file(tmp_path, test_image):
    path = tmp_path / "input.png"
    test_image.save(path)
    return path


# ------------------------------------------------------------------------------------------------
# make-tiny


def test_make_tiny_writes_a_loadable_checkpoint(tmp_path, tiny_dir, capsys):
    from blip3o_engine import Engine, SamplingParams

    out_dir = tmp_path / "ck"
    rc, out, _ = run_cli(capsys, "make-tiny", out_dir)
    assert rc == 0 and str(out_dir) in out and "random-weight" in out
    for name in ("config.json", "tokenizer.json", "preprocessor_config.json", "model.safetensors.index.json",
                 "diffusion-decoder/unet", "diffusion-decoder/vae"):
        assert (out_dir / name).exists(), name
    # Deterministic: seed 0 gives the same checkpoint as the cached `tiny` preset.
    for name in ("config.json", "model.safetensors.index.json"):
        assert json.loads((out_dir / name).read_text()) == json.loads((tiny_dir / name).read_text())
    engine = Engine.from_pretrained(str(out_dir))
    assert len(engine.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=2)).token_ids) == 2


@pytest.mark.parametrize("target, fragment", [
    ("file", "exists and is not a directory"),
    ("file/sub", "cannot create"),
    ("full", "is not empty"),
])
def test_make_tiny_bad_target_is_a_one_line_error(tmp_path, capsys, target, fragment):
    (tmp_path / "file").write_text("keep me")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("keep me too")
    rc, out, err = run_cli(capsys, "make-tiny", tmp_path / target)
    assert_clean_error(rc, err, fragment, str(tmp_path / target))
    assert len(err.strip().splitlines()) == 1 and out == ""
    assert (tmp_path / "file").read_text() == "keep me"  # nothing of the user's was touched
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["notes.txt"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere")
def test_make_tiny_unwritable_dir(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        rc, _, err = run_cli(capsys, "make-tiny", locked / "ck")
        assert_clean_error(rc, err, "cannot create")
        rc, _, err = run_cli(capsys, "make-tiny", locked)
        assert_clean_error(rc, err, "not writable")
    finally:
        locked.chmod(0o700)


def test_make_tiny_bad_seed(tmp_path, capsys):
    for seed in ("-1", str(2**70)):
        rc, _, err = run_cli(capsys, "make-tiny", tmp_path / "ck", "--seed", seed)
        assert_clean_error(rc, err, "seed must be an int in [0, 2**64 - 2]")
    assert not (tmp_path / "ck").exists()


def test_make_tiny_rejects_unknown_preset(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["make-tiny", str(tmp_path / "x"), "--preset", "8b"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# generate


def test_generate_writes_png_with_progress(tmp_path, tiny_dir, capsys):
    out_file = tmp_path / "sub" / "apple.png"
    rc, out, err = run_cli(capsys, "generate", "a red apple", "-o", out_file, "--model", tiny_dir, *FAST,
                           "--seed", "1")
    assert rc == 0, err
    with Image.open(out_file) as img:
        assert img.format == "PNG" and img.size == (64, 64) and img.mode == "RGB"
    assert f"wrote {out_file}" in err and "seed 1" in err
    # tqdm bars over the denoising steps of both stages (stderr, so stdout stays clean).
    assert "dit:" in err and "decoder:" in err and "/3 [" in err
    assert out == ""
    assert "random-weight preset" not in err  # an explicit path gets no banner


def test_generate_seed_reproducible_and_size(tmp_path, tiny_dir, capsys):
    files = []
    for name, seed in (("a.png", 4), ("b.png", 4), ("c.png", 5)):
        rc, _, err = run_cli(capsys, "generate", "a cat", "-o", tmp_path / name, "--model", tiny_dir, *FAST,
                             "--seed", seed, "--backend", "reference")
        assert rc == 0, err
        files.append(Image.open(tmp_path / name).tobytes())
    assert files[0] == files[1] != files[2]
    rc, _, err = run_cli(capsys, "generate", "a cat", "-o", tmp_path / "wide.png", "--model", tiny_dir, *FAST,
                         "--height", "32", "--width", "96")
    assert rc == 0, err
    assert Image.open(tmp_path / "wide.png").size == (96, 32)


def test_generate_with_input_image(tmp_path, tiny_dir, image_file, capsys):
    rc, _, err = run_cli(capsys, "generate", "a cat", "-o", tmp_path / "o.png", "--model", tiny_dir, *FAST,
                         "--image", image_file, "--seed", "0")
    assert rc == 0, err
    assert Image.open(tmp_path / "o.png").size == (64, 64)


def test_tiny_preset_prints_random_banner(tmp_path, tiny_dir, monkeypatch, capsys):
    monkeypatch.setenv("BLIP3O_ENGINE_CACHE", str(tiny_dir.parent))  # reuse the session's tiny checkpoint
    rc, _, err = run_cli(capsys, "generate", "a dog", "-o", tmp_path / "d.png", *FAST, "--seed", "2",
                         "--model", "tiny")
    assert rc == 0, err
    banner = next(line for line in err.splitlines() if line.startswith("NOTE:"))
    assert "random" in banner and "--model" in banner and "images are noise" in banner
    assert (tmp_path / "d.png").is_file()


# ------------------------------------------------------------------------------------------------
# chat


def test_chat_prints_text_and_finish_reason(tiny_dir, capsys):
    rc, out, err = run_cli(capsys, "chat", "Hello", "--max-tokens", "5", "--model", tiny_dir)
    assert rc == 0, err
    assert out.endswith("\n") and out.strip()
    assert "[5 tokens, finish_reason=length]" in err


def test_chat_output_equals_engine(tiny_engine, tiny_dir, capsys):
    from blip3o_engine import SamplingParams

    rc, out, _ = run_cli(capsys, "chat", "Describe a red apple.", "--max-tokens", "8", "--model", tiny_dir,
                         "--system", "Answer briefly.")
    expected = tiny_engine.chat([{"role": "system", "content": "Answer briefly."},
                                 {"role": "user", "content": [{"type": "text", "text": "Describe a red apple."}]}],
                                SamplingParams(max_tokens=8, temperature=0.0))
    assert rc == 0 and out == expected.text + "\n"


def test_chat_sampling_flags(tiny_dir, capsys):
    args = ["chat", "Hello", "--max-tokens", "6", "--model", tiny_dir, "--temperature", "0.9", "--top-p", "0.9",
            "--top-k", "20", "--repetition-penalty", "1.1", "--seed", "3"]
    rc1, out1, _ = run_cli(capsys, *args)
    rc2, out2, _ = run_cli(capsys, *args)
    assert rc1 == rc2 == 0 and out1 == out2


def test_chat_with_image(tiny_dir, image_file, capsys):
    rc, out, err = run_cli(capsys, "chat", "What is in the picture?", "--image", image_file, "--max-tokens", "3",
                           "--model", tiny_dir)
    assert rc == 0, err
    assert "finish_reason=" in err


# ------------------------------------------------------------------------------------------------
# errors: exit status 2, "error: ..." on stderr, no traceback


def assert_clean_error(rc, err, *fragments):
    assert rc == 2
    assert err.startswith("error: ") or "\nerror: " in err
    assert "Traceback" not in err
    for f in fragments:
        assert f in err, (f, err)


def test_missing_model_path(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "chat", "Hi", "--model", "/nonexistent/blip3o")
    assert_clean_error(rc, err, "/nonexistent/blip3o")
    rc, _, err = run_cli(capsys, "generate", "a", "-o", tmp_path / "x.png", "--model", "/nonexistent/blip3o")
    assert_clean_error(rc, err, "/nonexistent/blip3o")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["--steps", "0"], "decoder_steps"),
    (["--dit-steps", "0"], "dit_steps"),
    (["--guidance", "-1"], "decoder_guidance"),
    (["--seed", "-5"], "seed"),
    (["--height", "40", "--width", "64"], "multiples of 16"),
    (["--height", "0"], "height"),
    (["--image", "/nonexistent/in.png"], "does not exist"),
    (["--dtype", "int8"], "unsupported dtype"),
    (["--device", "cuda:0"], "CUDA"),
    (["--device", "tpu"], "unsupported device 'tpu'; use cpu, cuda or cuda:N"),
    (["--seed", str(2**70)], "seed must be an int in [0, 2**64 - 1]"),
    (["--seed", str(2**64)], "seed must be an int in [0, 2**64 - 1]"),
    (["--guidance", "inf"], "decoder_guidance must be a finite number"),
    (["--dit-guidance", "inf"], "dit_guidance must be a finite number"),
    (["--guidance", "nan"], "decoder_guidance"),
    (["--width", "100000", "--height", "100000"], "must be an int in [1, 4096]"),
    (["--width", "4112"], "width must be an int in [1, 4096]"),
    (["--threads", "0"], "--threads must be >= 1"),
])
def test_generate_bad_arguments(tmp_path, tiny_dir, capsys, argv, fragment):
    if "cuda" in " ".join(argv):
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
    out_file = tmp_path / "x.png"
    rc, _, err = run_cli(capsys, "generate", "a", "-o", out_file, "--model", tiny_dir, *FAST, *argv)
    assert_clean_error(rc, err, fragment)
    assert not out_file.exists()


def test_bad_arguments_fail_before_loading_the_model(tmp_path, capsys):
    """Parameter errors are reported first (a real model takes minutes to load)."""
    rc, _, err = run_cli(capsys, "generate", "a", "-o", tmp_path / "x.png", "--model", "/nonexistent", "--steps", "0")
    assert_clean_error(rc, err, "decoder_steps")
    assert "/nonexistent" not in err
    rc, _, err = run_cli(capsys, "chat", "Hi", "--model", "/nonexistent", "--top-p", "2")
    assert_clean_error(rc, err, "top_p")


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fails the test if the CLI starts loading weights."""
    from blip3o_engine.engine import Engine

    def refuse(*args, **kwargs):
        pytest.fail("the CLI loaded the model before reporting a bad argument")

    monkeypatch.setattr(Engine, "from_pretrained", refuse)


@pytest.mark.parametrize("argv, fragment", [
    (["generate", "a", "--image", "/nonexistent/in.png"], "does not exist"),
    (["generate", "a", "--image", "BAD"], "cannot decode image"),
    (["generate", "a", "--width", "40"], "multiples of 16"),
    (["generate", "a", "--height", "8", "--width", "64"], "multiples of 16"),
    (["generate", "a", "--device", "tpu"], "unsupported device"),
    (["generate", "a", "--dtype", "int4"], "unsupported dtype"),
    (["chat", "Hi", "--image", "/nonexistent/in.png"], "does not exist"),
    (["chat", "Hi", "--image", "BAD"], "cannot decode image"),
    (["chat", "Hi", "--device", "tpu"], "unsupported device"),
])
def test_inputs_are_checked_before_loading_the_model(tmp_path, tiny_dir, capsys, no_model_loading, argv, fragment):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    argv = [str(bad) if a == "BAD" else a for a in argv]
    out = ["-o", tmp_path / "x.png"] if argv[0] == "generate" else []
    rc, _, err = run_cli(capsys, *argv, *out, "--model", tiny_dir)
    assert_clean_error(rc, err, fragment)
    assert not (tmp_path / "x.png").exists()


def test_size_step_of_a_real_model_is_checked_before_loading(tmp_path, capsys, no_model_loading):
    """The 8b preset's 2.5 B-parameter decoder is never built for a size it cannot take (step 32)."""
    rc, _, err = run_cli(capsys, "generate", "a", "-o", tmp_path / "x.png", "--model", "8b", "--width", "1000")
    assert_clean_error(rc, err, "multiples of 32")


def test_generate_prompt_past_the_context(tmp_path, tiny_dir, capsys):
    rc, _, err = run_cli(capsys, "generate", "word " * 5000, "-o", tmp_path / "x.png", "--model", tiny_dir, *FAST)
    assert_clean_error(rc, err, "exceeds the context (max_model_len) of 4096 tokens")
    assert "indexing errors" not in err and not (tmp_path / "x.png").exists()


def test_threads_option(tiny_dir, capsys, monkeypatch):
    import torch

    rc, _, err = run_cli(capsys, "chat", "Hi", "--max-tokens", "1", "--model", tiny_dir, "--threads", "1")
    assert rc == 0, err
    assert torch.get_num_threads() == 1
    from blip3o_engine import threads

    monkeypatch.setattr(threads, "default_num_threads", lambda: 2)  # no --threads: the default is applied
    torch.set_num_threads(1)
    rc, _, err = run_cli(capsys, "chat", "Hi", "--max-tokens", "1", "--model", tiny_dir)
    assert rc == 0, err
    assert torch.get_num_threads() == 2


def test_generate_unknown_output_format(tmp_path, tiny_dir, capsys):
    rc, _, err = run_cli(capsys, "generate", "a", "-o", tmp_path / "x.notaformat", "--model", tiny_dir, *FAST)
    assert_clean_error(rc, err, "x.notaformat")


@pytest.mark.parametrize("argv, fragment", [
    (["--max-tokens", "0"], "max_tokens"),
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "top_p"),
    (["--top-k", "-3"], "top_k"),
    (["--repetition-penalty", "0"], "repetition_penalty"),
    (["--image", "/nonexistent/in.png"], "does not exist"),
    (["--max-tokens", "100000"], "context"),
    (["--seed", str(2**70)], "seed must be an int in [0, 2**64 - 1]"),
    (["--seed", "-1"], "seed must be an int in [0, 2**64 - 1]"),
    (["--temperature", "inf"], "temperature must be a finite number"),
    (["--top-p", "nan"], "top_p"),
    (["--repetition-penalty", "inf"], "repetition_penalty must be a finite number"),
    (["--device", "tpu"], "unsupported device 'tpu'"),
    (["--threads", "-2"], "--threads must be >= 1"),
])
def test_chat_bad_arguments(tiny_dir, capsys, argv, fragment):
    rc, out, err = run_cli(capsys, "chat", "Hi", "--model", tiny_dir, *argv)
    assert_clean_error(rc, err, fragment)
    assert out == ""


def test_bad_image_bytes(tmp_path, tiny_dir, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    rc, _, err = run_cli(capsys, "chat", "Hi", "--image", bad, "--model", tiny_dir)
    assert_clean_error(rc, err, "cannot decode image")


def test_argparse_errors_exit_2(capsys):
    for argv in ([], ["generate"], ["chat"], ["fly"], ["generate", "a", "--steps", "many"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert "usage:" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# help


@pytest.mark.parametrize("sub, options", [
    ([], ["generate", "chat", "make-tiny"]),
    (["generate"], ["--output", "--steps", "--dit-steps", "--guidance", "--seed", "--image", "--model", "--height",
                    "--threads", "OMP_NUM_THREADS"]),
    (["chat"], ["--image", "--max-tokens", "--temperature", "--top-p", "--top-k", "--system", "--model", "--threads"]),
    (["make-tiny"], ["--preset", "--seed"]),
])
def test_help(capsys, sub, options):
    with pytest.raises(SystemExit) as exc:
        main([*sub, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: blip3o-engine")
    for opt in options:
        assert opt in out


def test_chat_help_says_its_greedy_default_differs_from_sampling_params(capsys):
    with pytest.raises(SystemExit):
        main(["chat", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "0 = greedy (the default here" in text and "SamplingParams defaults to vLLM's 1.0" in text


def test_python_dash_m_help():
    proc = subprocess.run([sys.executable, "-m", "blip3o_engine", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage: blip3o-engine" in proc.stdout and "generate" in proc.stdout


def test_console_script_help():
    script = Path(sys.executable).with_name("blip3o-engine")
    if not script.is_file():
        found = shutil.which("blip3o-engine")
        if found is None:
            pytest.skip("blip3o-engine console script not installed (pip install -e .)")
        script = Path(found)
    proc = subprocess.run([str(script), "chat", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--max-tokens" in proc.stdout
    proc = subprocess.run([str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "usage:" in proc.stderr


# ------------------------------------------------------------------------------------------------
# serve (the server itself: tests/serve/)


@pytest.mark.parametrize("argv, fragment", [
    (["--max-pending", "0"], "--max-pending"),
    (["--port", "70000"], "--port"),
    (["--max-body-mb", "0"], "max_body_mb"),
    (["--allowed-local-media-path", "/nonexistent/media"], "not a directory"),
    (["--allowed-media-domains", "http://example.com"], "host names"),
    (["--api-key", " padded "], "API keys"),
    (["--device", "tpu"], "unsupported device"),
    (["--replicas", "2", "--port", "0"], "explicit --port"),
    (["--replicas", "0", "--port", "8123"], "--replicas"),
])
def test_serve_bad_arguments_fail_before_loading(tiny_dir, capsys, no_model_loading, argv, fragment):
    pytest.importorskip("fastapi")
    if "--replicas" in argv:
        pytest.importorskip("ray")
    rc, _, err = run_cli(capsys, "serve", "--model", tiny_dir, *argv)
    assert_clean_error(rc, err, fragment)


def test_serve_on_a_taken_port_fails_before_loading(tiny_dir, capsys, no_model_loading):
    import socket

    pytest.importorskip("fastapi")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        rc, _, err = run_cli(capsys, "serve", "--model", tiny_dir, "--port", taken.getsockname()[1])
    assert_clean_error(rc, err, "cannot listen on 127.0.0.1")


def test_serve_and_bench_serve_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert exc.value.code == 0
    for opt in ("--host", "--port", "--api-key", "--served-model-name", "--max-pending", "--max-body-mb",
                "--allowed-media-domains", "--allowed-local-media-path", "--replicas", "--replica-num-cpus",
                "--threads", "--backend", "default: 127.0.0.1"):
        assert opt in out, opt
    with pytest.raises(SystemExit) as exc:
        main(["bench", "serve", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "--concurrency" in out and "--mix" in out and "loopback" in out
