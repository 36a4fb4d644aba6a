"""The benchmark harness end to end on the tiny preset (CPU), its CSV/PNG outputs, the floor and
ratio arithmetic, the timing policy, and the README table generator."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from blip3o_engine.bench import cli, report
from blip3o_engine.bench.ceilings import Ceilings, Rate
from blip3o_engine.bench.costs import Cost
from blip3o_engine.bench.stages import StageResult
from blip3o_engine.bench.timing import Timer, Timing, TimingPolicy
from blip3o_engine.params import SamplingParams

ROOT = Path(__file__).resolve().parents[2]
COLUMNS = ["date", "device", "commit", "preset", "stage", "backend", "batch", "median_ms", "p10_ms", "p90_ms",
           "floor_ms", "ratio_to_floor", "ratio_to_reference", "compile_ms", "gb_per_s", "tflop_per_s", "skipped",
           "notes"]
OLD_COLUMNS = [c for c in COLUMNS if c not in ("gb_per_s", "tflop_per_s", "skipped")]
KERNELS = {"rms_norm", "fused_add_rms_norm", "swiglu", "mrope_rotary", "write_kv_cache", "paged_decode_attention",
           "paged_prefill_attention", "rms_norm_modulate", "gated_rms_residual", "layer_norm_rope", "prepare_logits"}
FAST = ["--model", "tiny", "--steps", "2", "--dit-steps", "2", "--gen-tokens", "2", "--batch", "1,2",
        "--prompt-tokens", "16", "--warmup", "1", "--reps", "2", "--min-reps", "2", "--threads", "1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    """`--threads 1` (fewer stalls when the CI machine's 2 cores are busy) sets a process-wide
    torch setting; put it back for the tests that follow."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def tiny_run(tiny_dir, tmp_path_factory):
    """One `bench all` on tiny with CSV and PNG, shared by the tests that inspect its outputs."""
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:
        rc = cli.main(["all", *FAST, "--csv", str(out / "runs.csv"), "--plot", str(out / "runs.png")])
    finally:
        torch.set_num_threads(threads)
    return rc, out


def test_bench_all_on_tiny_writes_csv_with_exact_columns(tiny_run):
    rc, out = tiny_run
    assert rc == 0
    header, rows = read(out / "runs.csv")
    assert header == COLUMNS
    ceilings = {r["stage"]: r for r in rows if r["stage"].startswith("ceiling_")}
    # Measured on CPU too, in the same run: copy, the best of several GEMM shapes, the best convolution.
    assert set(ceilings) == {"ceiling_copy", "ceiling_matmul", "ceiling_conv"}
    assert "dtype=float32" in ceilings["ceiling_matmul"]["notes"]
    for name in ("ceiling_matmul", "ceiling_conv"):
        notes = ceilings[name]["notes"].split("; ")
        shapes = next(n for n in notes if n.startswith("shapes=")).removeprefix("shapes=").split(",")
        assert len(shapes) >= 4  # square and skinny GEMMs at the model's widths; every UNet and VAE level
        best = max(float(x.rsplit(":", 1)[1]) for x in shapes)
        assert float(ceilings[name]["tflop_per_s"]) == pytest.approx(best, rel=6e-3)  # the ceiling is the best shape
    assert float(ceilings["ceiling_copy"]["gb_per_s"]) > 0
    # Kernel rows: one per Triton / CUDA kernel and its torch twin, skipped on CPU with the reason.
    skipped = [r for r in rows if r["skipped"]]
    assert {r["stage"] for r in skipped} == KERNELS
    assert {(r["stage"], r["backend"]) for r in skipped} == \
        {(k, "cuda" if k == "prepare_logits" else "triton") for k in KERNELS} | {(k, "torch") for k in KERNELS}
    assert all(r["median_ms"] == "" for r in skipped)
    assert all("Triton interpreter is no benchmark" in r["skipped"] for r in skipped if r["stage"] != "prepare_logits")
    assert all("CUDA sampling kernel needs a GPU" in r["skipped"] for r in skipped if r["stage"] == "prepare_logits")
    rows = [r for r in rows if not r["stage"].startswith("ceiling_") and not r["skipped"]]
    stages = {(r["stage"], r["backend"], r["batch"]) for r in rows}
    expected = {"ar_prefill", "dit_loop", "decoder_loop", "t2i_e2e", "dit_step", "unet_step", "vae_decode",
                "unet_self_attn"}
    for backend in ("optimized", "reference"):
        assert {(s, backend, "1") for s in expected} <= stages
        assert ("t2i_e2e", backend, "4") in stages  # batched text-to-image (default --image-batch 1,4)
        assert {("dit_step", backend, "4"), ("unet_step", backend, "4")} <= stages  # a full decoder batch
        for batch in ("1", "2"):
            assert {("chat_ttft", backend, batch), ("decode_step", backend, batch)} <= stages
    assert len({r["date"] for r in rows}) == 1 and rows[0]["preset"] == "tiny"
    for r in rows:
        # Every stage has a cost model, so a floor from the run's ceilings, and its ratio to it.
        assert float(r["floor_ms"]) > 0 and float(r["ratio_to_floor"]) == pytest.approx(
            float(r["median_ms"]) / float(r["floor_ms"]), rel=2e-2)
        assert r["compile_ms"] == ""  # the engine has no separate compile step to time
        assert "dtype=float32" in r["notes"] and r["tflop_per_s"] and r["gb_per_s"]
        bound = next(n for n in r["notes"].split("; ") if n.startswith("bound="))
        assert bound in ("bound=gemm", "bound=conv", "bound=memory")
        if r["stage"] in ("unet_step", "vae_decode", "decoder_loop", "t2i_e2e"):
            assert bound != "bound=gemm"  # the decoder is convolutions: judged at the convolution ceiling
        if r["stage"] != "decode_step":  # a difference of two timings; may be noise-small on tiny
            assert float(r["p10_ms"]) <= float(r["median_ms"]) <= float(r["p90_ms"]) and float(r["median_ms"]) > 0
        # ratio_to_reference: optimized / reference of the same stage and batch, reference rows empty.
        assert (r["ratio_to_reference"] == "") == (r["backend"] == "reference")
    for r in rows:
        if r["stage"] == "t2i_e2e":  # images/s = batch / median, to the note's 3 significant digits
            rate = dict(n.split("=", 1) for n in r["notes"].split("; ") if "=" in n)["images/s"]
            assert float(rate) == pytest.approx(int(r["batch"]) * 1e3 / float(r["median_ms"]), rel=6e-3)
    notes = {(r["stage"], r["backend"], r["batch"]): r["notes"].split("; ") for r in rows}
    # Micro rows name what their backend's engine runs.
    assert "FlowSampler.advance(run, 2)" in notes[("dit_step", "optimized", "1")]  # 3 a step on CPU, <= --dit-steps
    assert "ReferenceFlow.advance(run, 2)" in notes[("dit_step", "reference", "1")]
    assert "PixelDecoder.step()" in notes[("unet_step", "optimized", "4")]
    assert "ReferenceDecoder.step()" in notes[("unet_step", "reference", "4")]
    ref = {(r["stage"], r["batch"]): float(r["median_ms"]) for r in rows if r["backend"] == "reference"}
    for r in rows:
        if r["backend"] == "optimized" and r["stage"] != "decode_step":
            want = float(r["median_ms"]) / ref[(r["stage"], r["batch"])]
            # The CSV prints ratios to 3 significant digits (<= 0.5% off) from 4-digit medians (<= 0.05% each).
            assert float(r["ratio_to_reference"]) == pytest.approx(want, rel=6e-3)


def test_bench_plot_is_a_png(tiny_run):
    _, out = tiny_run
    png = (out / "runs.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_csv_is_appended_and_foreign_csv_refused(tiny_dir, tmp_path, capsys):
    path = tmp_path / "a.csv"
    for _ in range(2):
        assert cli.main(["stages", *FAST, "--only", "dit_step", "--image-batch", "1", "--backend", "reference",
                         "--csv", str(path)]) == 0
    header, rows = read(path)
    rows = [r for r in rows if not r["stage"].startswith("ceiling_")]  # each run also writes its ceilings
    assert header == COLUMNS and len(rows) == 2 and rows[0]["stage"] == rows[1]["stage"] == "dit_step"
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    assert cli.main(["stages", *FAST, "--csv", str(bad)]) == 2  # refused before any timing
    assert "expected" in capsys.readouterr().err and bad.read_text() == "a,b\n1,2\n"


def test_plot_without_matplotlib_fails_before_timing(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    assert cli.main(["stages", *FAST, "--plot", str(tmp_path / "x.png")]) == 2
    assert "matplotlib" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


def test_add_bench_parser_sets_func():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    cli.add_bench_parser(sub)
    args = parser.parse_args(["bench", "t2i", "--model", "8b", "--device", "cuda", "--batch", "1,16", "--steps", "20"])
    assert args.func is cli.run_bench and args.batch == (1, 16) and args.steps == 20
    assert args.backend == ("optimized", "reference")
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "chat", "--batch", "0"])


def test_random_model_follows_the_scale_rules():
    """The 4b/8b benchmark weights are drawn on the device (models.blip3o.random_model); checked here at
    tiny shapes: every tensor materialized in the dtype, norm scales around 1, matrices ~1/sqrt(fan_in),
    and a DiT forward stays finite and O(1)."""
    from blip3o_engine.config import preset_config
    from blip3o_engine.models.blip3o import random_model

    cfg = preset_config("tiny", vocab_size=512)
    model = random_model(cfg, seed=3, dtype=torch.bfloat16, device=torch.device("cpu"))
    params = dict(model.named_parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in params.values())
    norm = params["text.norm.weight"].float()
    assert abs(norm.mean().item() - 1.0) < 0.05 and 0.05 < norm.std().item() < 0.2  # 1 + 0.1 N(0, 1)
    w = params["text.layers.0.mlp.down_proj.weight"].float()  # [H, I]: std 1/sqrt(I)
    assert w.std().item() * cfg.text.intermediate_size**0.5 == pytest.approx(1.0, rel=0.1)
    d = cfg.dit
    with torch.inference_mode():
        v = model.dit(torch.randn(2, d.in_channels, d.input_size, d.input_size, dtype=torch.bfloat16),
                      torch.tensor([500, 500]), torch.randn(2, cfg.n_query, cfg.text.hidden_size, dtype=torch.bfloat16))
    assert torch.isfinite(v).all() and 0.1 < v.float().std().item() < 100


def _ceilings(flops_per_s: float, bytes_per_s: float, conv_flops_per_s: float | None = None) -> Ceilings:
    """Ceilings whose fastest runs take 1 ms (a second shape of each kind runs at half the rate)."""
    one, two = Timing((1.0, 3.0)), Timing((2.0,))
    gemm = (Rate("gemm", "a", flops_per_s / 1e3, one), Rate("gemm", "b", flops_per_s / 1e3, two))
    conv = () if conv_flops_per_s is None else (Rate("conv", "c", conv_flops_per_s / 1e3, one),
                                                Rate("conv", "d", conv_flops_per_s / 1e3, two))
    return Ceilings(Rate("copy", "x", bytes_per_s / 1e3, one), gemm, conv, "bfloat16")


def test_rows_floor_and_ratios_with_ceilings():
    info = report.RunInfo("2026-01-01T00:00:00Z", "GPU", "abc", "8b", "bfloat16", True)
    ceil = _ceilings(flops_per_s=1e15, bytes_per_s=2e12)
    compute = Cost(flops=1e13, bytes=1e9)  # 10 ms of GEMM, 0.5 ms of traffic -> 10 ms floor
    memory = Cost(flops=1e9, bytes=4e9)  # 2 ms of traffic
    results = [StageResult("unet_step", "optimized", 1, Timing((20.0, 21.0, 19.0)), compute),
               StageResult("unet_step", "reference", 1, Timing((40.0,)), compute),
               StageResult("decode_step", "reference", 4, Timing((3.0,)), memory)]
    rows = report.build_rows(results, info, ceil)
    assert ceil.matmul_flops_per_s == pytest.approx(1e15) and ceil.copy_bytes_per_s == pytest.approx(2e12)
    assert rows[0]["floor_ms"] == "10.00" and rows[0]["ratio_to_floor"] == "2.00"
    assert rows[0]["ratio_to_reference"] == "0.500" and "bound=gemm" in rows[0]["notes"]
    assert rows[0]["tflop_per_s"] == "500" and rows[0]["gb_per_s"] == "50.0"  # 1e13 FLOP, 1e9 B in 20 ms
    assert rows[1]["ratio_to_reference"] == "" and rows[1]["ratio_to_floor"] == "4.00"
    assert rows[2]["floor_ms"] == "2.000" and "bound=memory" in rows[2]["notes"]
    assert list(rows[0]) == COLUMNS
    table = report.format_table(rows, info, ceil)
    assert "ceilings (measured in this run" in table and "unet_step" in table


def test_conv_ceiling_lowers_the_floor_of_convolution_work():
    """On the development CPU oneDNN's convolutions beat the square GEMM's rate: a decoder stage judged at the
    GEMM rate got a floor it could beat (0.99x). With the conv ceiling measured in the run it cannot."""
    info = report.RunInfo("2026-01-01T00:00:00Z", "CPU", "abc", "small", "float32", True)
    work = Cost(flops=2e12, bytes=1e6, conv_flops=1.5e12)  # 0.5 TFLOP of matmuls, 1.5 of convolutions
    run = [StageResult("t2i_e2e", "optimized", 1, Timing((1400.0,)), work)]
    gemm_only = report.build_rows(run, info, _ceilings(flops_per_s=1e12, bytes_per_s=1e10))[0]
    with_conv = report.build_rows(run, info, _ceilings(1e12, 1e10, conv_flops_per_s=2.5e12))[0]
    assert gemm_only["floor_ms"] == "2000" and float(gemm_only["ratio_to_floor"]) < 1  # the beatable floor
    assert with_conv["floor_ms"] == "1100" and with_conv["ratio_to_floor"] == "1.27"  # 500 ms + 600 ms
    assert "bound=conv" in with_conv["notes"]


def test_skipped_rows_and_baseline_backends():
    info = report.RunInfo("2026-01-01T00:00:00Z", "GPU", "abc", "8b", "bfloat16", True)
    ceil = _ceilings(1e15, 2e12)
    traffic = Cost(bytes=4e9)  # 2 ms at the copy bandwidth
    results = [StageResult("rms_norm", "triton", 1, Timing((4.0,)), traffic),
               StageResult("rms_norm", "torch", 1, Timing((8.0,)), traffic),
               StageResult("prepare_logits", "cuda", 1, None, traffic, skipped="cuda-python is not installed"),
               StageResult("prepare_logits", "torch", 1, Timing((1.0,)), traffic),
               StageResult("mixed_chat_itl", "interleave", 2, Timing((3.0,)), None),
               StageResult("mixed_chat_itl", "serial", 2, Timing((6.0,)), None)]
    rows = report.build_rows(results, info, ceil)
    assert rows[0]["ratio_to_reference"] == "0.500" and rows[0]["gb_per_s"] == "1000" and rows[0]["floor_ms"] == "2.000"
    assert rows[1]["ratio_to_reference"] == ""  # the torch twin is the kernel row's baseline
    assert rows[2]["skipped"] == "cuda-python is not installed" and rows[2]["median_ms"] == rows[2]["gb_per_s"] == ""
    assert rows[2]["ratio_to_floor"] == "" and rows[2]["floor_ms"] == "2.000"
    assert rows[4]["ratio_to_reference"] == "0.500" and rows[5]["ratio_to_reference"] == ""  # vs the serial policy
    assert "skipped: cuda-python" in report.format_table(rows, info, ceil)


def test_old_csv_files_are_read_and_upgraded_on_append(tmp_path):
    old = tmp_path / "old.csv"
    with old.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=OLD_COLUMNS)
        writer.writeheader()
        writer.writerow({c: "1" if c.endswith("_ms") else c for c in OLD_COLUMNS})
    (row,) = report.read_csv(old)
    assert list(row) == COLUMNS and row["skipped"] == row["gb_per_s"] == "" and row["median_ms"] == "1"
    assert report.check_csv(old)
    new = {c: "" for c in COLUMNS} | {"stage": "rms_norm", "skipped": "CPU"}
    report.append_csv(old, [new])
    header, rows = read(old)
    assert header == COLUMNS and rows[0]["median_ms"] == "1" and rows[0]["notes"] == "notes" and rows[1] == new


def test_timing_policy_respects_reps_min_reps_and_budget():
    calls = []
    timer = Timer("cpu")
    t = timer.measure(lambda: calls.append(1), TimingPolicy(warmup=2, reps=5, min_reps=3, budget_s=60))
    assert len(t.samples_ms) == 5 and len(calls) == 7 and t.cold_ms is not None
    import time

    slow = timer.measure(lambda: time.sleep(0.02), TimingPolicy(warmup=0, reps=50, min_reps=2, budget_s=0.05))
    assert 2 <= len(slow.samples_ms) <= 4  # stops once the 50 ms budget is used, never below min_reps
    assert Timing((1.0, 2.0, 3.0, 4.0, 100.0)).median_ms == 3.0
    with pytest.raises(ValueError):
        TimingPolicy(reps=2, min_reps=3)


def _load_table_script():
    spec = importlib.util.spec_from_file_location("make_readme_table", ROOT / "benchmarks" / "make_readme_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_readme_table_renders_and_replaces_block(tiny_run, tmp_path, capsys):
    _, out = tiny_run
    mrt = _load_table_script()
    text = mrt.render([out / "runs.csv"])
    _, rows = read(out / "runs.csv")
    r = rows[0]
    assert r["device"] in text and r["commit"] in text and r["date"] in text and "| t2i_e2e | reference | 1 |" in text
    assert "3x3 conv" in text and "best of" in text  # the per-kind ceilings in the heading
    # Kernel rows not timed on CPU: one line with the reason, not a table row each.
    assert "Not timed (CPU: the Triton interpreter is no benchmark" in text and "`paged_decode_attention`" in text
    assert "| rms_norm |" not in text
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- perf:start -->\nold\n<!-- perf:end -->\n\nafter\n")
    assert mrt.main(["--csv", str(out / "runs.csv"), "--write", str(readme)]) == 0
    new = readme.read_text()
    assert "old" not in new and "| t2i_e2e |" in new and new.endswith("<!-- perf:end -->\n\nafter\n")
    readme.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="perf:start"):
        mrt.main(["--csv", str(out / "runs.csv"), "--write", str(readme)])


@pytest.mark.gpu
def test_bench_on_cuda_measures_ceilings_and_floors(tiny_dir, tmp_path):
    """On a GPU: CUDA-event timing, ceilings measured in the run, a floor and ratio on every stage."""
    assert torch.cuda.is_available()
    path = tmp_path / "gpu.csv"
    assert cli.main(["stages", *FAST, "--device", "cuda", "--csv", str(path)]) == 0
    assert cli.main(["kernels", *FAST, "--device", "cuda", "--csv", str(path)]) == 0
    _, rows = read(path)
    assert {"ceiling_copy", "ceiling_matmul", "ceiling_conv"} <= {r["stage"] for r in rows}
    for r in rows:
        if not r["stage"].startswith("ceiling_") and not r["skipped"]:
            assert float(r["floor_ms"]) > 0 and float(r["ratio_to_floor"]) > 0 and "dtype=bfloat16" in r["notes"]
            assert float(r["gb_per_s"]) > 0
    kernel_rows = {(r["stage"], r["backend"]) for r in rows if r["stage"] in KERNELS and not r["skipped"]}
    assert {(k, "torch") for k in KERNELS} <= kernel_rows  # every twin timed
    assert {(k, "triton") for k in KERNELS - {"prepare_logits"}} <= kernel_rows  # every Triton kernel timed


# ------------------------------------------------------------------------------------------------
# Chat mode: TTFT / ITL / tokens/s per batch, and the transformers baseline


@pytest.fixture(scope="module")
def tiny_engines(tiny_dir):
    from blip3o_engine.bench.engines import load_engines

    return load_engines("tiny", torch.device("cpu"), None, ["optimized", "reference", "transformers"]).engines


def test_chat_rows_for_every_backend_and_batch_with_transformers(tiny_dir, tmp_path):
    path = tmp_path / "chat.csv"
    argv = ["all", *FAST, "--backend", "optimized,reference,transformers", "--only", "rms_norm,chat_ttft,decode_step",
            "--csv", str(path)]
    assert cli.main(argv) == 0
    _, rows = read(path)
    got = {(r["stage"], r["backend"], r["batch"]) for r in rows}
    assert got == {(stage, backend, batch) for stage in ("chat_ttft", "decode_step")
                   for backend in ("optimized", "reference", "transformers") for batch in ("1", "2")} | \
        {("rms_norm", "triton", "1"), ("rms_norm", "torch", "1")} | \
        {(f"ceiling_{k}", "torch", "1") for k in ("copy", "matmul", "conv")}  # transformers times chat only
    ref = {(r["stage"], r["batch"]): float(r["median_ms"]) for r in rows if r["backend"] == "reference"}
    for r in rows:
        notes = r["notes"].split("; ")
        if r["stage"] == "decode_step":
            assert any(n.startswith("tok/s=") for n in notes) and any(n.startswith("decode_tok/s=") for n in notes)
            method = "itl=median per-token gap" if r["backend"] == "optimized" else "itl=(total-ttft)/N"
            assert method in notes and "gen_tokens=3" in notes
        if r["stage"] == "chat_ttft":
            assert "max_tokens=1" in notes and float(r["median_ms"]) > 0
        if r["backend"] == "transformers":
            assert "transformers.generate" in notes
            if r["stage"] == "chat_ttft":  # (a decode_step reference median may be noise-small on tiny)
                want = float(r["median_ms"]) / ref[(r["stage"], r["batch"])]
                assert float(r["ratio_to_reference"]) == pytest.approx(want, rel=6e-3)  # 3-digit ratio, 4-digit medians


def test_transformers_baseline_matches_the_reference_greedy_tokens(tiny_engines):
    """Same weights, same prompts: HF generate (left-padded batch of two lengths) gives the engine's
    greedy tokens; a wrong name mapping or rotary table would change them."""
    hf, ref = tiny_engines["transformers"], tiny_engines["reference"]
    convs = [[{"role": "user", "content": "a somewhat longer first message here"}], [{"role": "user", "content": "hi"}]]
    out = hf.generate(convs, 6)  # [2, L + 6]
    assert out.shape[1] == len(ref.prompts.chat(convs[0]).token_ids) + 6
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    for row, conv in zip(out, convs):
        assert row[-6:].tolist() == ref.chat(conv, params).token_ids
    opt = tiny_engines["optimized"]  # the first backend owns the loaded weights; transformers shares them
    assert hf.model.model.language_model.embed_tokens.weight.data_ptr() == opt.model.text.embed_tokens.weight.data_ptr()


def test_cpu_backends_do_not_share_weights(tiny_engines):
    """The optimized backend re-lays its LLM weights out in place on CPU; a reference sharing them would
    be timed with the optimization: each backend gets its own copy (same values)."""
    opt, ref = tiny_engines["optimized"], tiny_engines["reference"]
    assert opt.model is not ref.model
    a, b = opt.model.text.layers[0].mlp.up_proj.weight, ref.model.text.layers[0].mlp.up_proj.weight
    assert a.data_ptr() != b.data_ptr() and torch.equal(a, b)


def test_fresh_chats_defeat_the_prefix_cache_at_equal_length(tiny_engines):
    from blip3o_engine.bench.stages import BenchSettings, Workload

    engine = tiny_engines["optimized"]
    w = Workload(engine, BenchSettings(prompt_tokens=16))
    convs = w.fresh_chats(3) + w.fresh_chats(2)
    ids = [engine.prompts.chat(c).token_ids for c in convs]
    assert len({tuple(x) for x in ids}) == 5 and {len(x) for x in ids} == {w.chat_prompt_len}


def test_stepped_run_records_one_gap_per_token_after_the_first(tiny_engines):
    from blip3o_engine.bench.stages import BenchSettings, Workload, _stepped_run

    engine = tiny_engines["optimized"]
    w = Workload(engine, BenchSettings(prompt_tokens=16))
    gaps: list[list[float]] = []
    run = _stepped_run(engine, w, batch=3, n_tokens=4, gaps=gaps)
    run()
    run()
    assert len(gaps) == 2 and all(len(g) == 3 * 3 and min(g) > 0 for g in gaps)
    assert not engine.has_unfinished()


def test_chat_batch_defaults_by_device_and_backend_errors(tiny_dir):
    from blip3o_engine.bench.engines import load_engines
    from blip3o_engine.errors import ConfigError

    assert cli.default_batches(torch.device("cpu")) == (1, 16)
    assert cli.default_batches(torch.device("cuda")) == (1, 8, 32, 64)
    parser = argparse.ArgumentParser()
    cli.add_bench_parser(parser.add_subparsers(dest="command", required=True))
    assert parser.parse_args(["bench", "chat"]).batch is None  # resolved from the device in run_bench
    with pytest.raises(ConfigError, match="engine backend"):
        load_engines("tiny", torch.device("cpu"), None, ["transformers"])
    with pytest.raises(ConfigError, match="unknown backend"):
        load_engines("tiny", torch.device("cpu"), None, ["vllm"])


# ------------------------------------------------------------------------------------------------
# Micro rows time what each backend's engine runs; kernel cases; the mixed workload


def test_micro_rows_time_the_engines_own_stage_calls(tiny_dir, tmp_path, monkeypatch):
    """The optimized unet_step row is `PixelDecoder.step()` over an admitted batch, the reference row the
    reference Euler step; dit_step is the DiT stage's `advance` (counted: warm-up + timed calls each)."""
    from blip3o_engine.runtime.flow_sampler import FlowSampler
    from blip3o_engine.runtime.pixel_decoder import PixelDecoder
    from blip3o_engine.runtime.reference_images import ReferenceDecoder, ReferenceFlow

    calls: dict[str, list[int]] = {}

    def count(cls, name: str, key: str):
        original = getattr(cls, name)

        def wrapped(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            calls.setdefault(key, []).append(len(getattr(self, "_where", getattr(self, "_images", ()))))
            return out
        monkeypatch.setattr(cls, name, wrapped)

    count(PixelDecoder, "step", "optimized unet")
    count(ReferenceDecoder, "step", "reference unet")
    count(FlowSampler, "advance", "optimized dit")
    count(ReferenceFlow, "advance", "reference dit")
    path = tmp_path / "micro.csv"
    assert cli.main(["stages", *FAST, "--only", "dit_step,unet_step", "--image-batch", "3", "--csv", str(path)]) == 0
    # warm-up 1 + 2 timed runs per row; the decoder held the 3 admitted images at every step
    assert calls["optimized unet"] == calls["reference unet"] == [3, 3, 3]
    assert len(calls["optimized dit"]) == len(calls["reference dit"]) == 3
    _, rows = read(path)
    assert {(r["stage"], r["backend"], r["batch"]) for r in rows if not r["stage"].startswith("ceiling_")} == \
        {(stage, b, "3") for stage in ("dit_step", "unet_step") for b in ("optimized", "reference")}


def test_kernel_cases_cover_every_kernel_and_run_their_twins(tiny_dir):
    """One case per Triton kernel module and the CUDA sampling kernel; their inputs pass the ops' checks (run
    here through the torch twins, as the torch rows do) and their byte counts are the tensors'."""
    import pkgutil

    from blip3o_engine.bench.engines import load_engines
    from blip3o_engine.bench.kernels import kernel_cases, kernel_unavailable
    from blip3o_engine.bench.stages import BenchSettings, Workload
    from blip3o_engine.kernels import triton as triton_kernels
    from blip3o_engine.ops import reference_ops

    engine = load_engines("tiny", torch.device("cpu"), None, ["reference"]).engines["reference"]
    w = Workload(engine, BenchSettings(prompt_tokens=16, dit_steps=2, decoder_steps=2))
    cases = kernel_cases(w)
    assert {c.name for c in cases} == KERNELS
    module_of = {"rms_norm": "llm_norms", "fused_add_rms_norm": "llm_norms", "swiglu": "swiglu",
                 "mrope_rotary": "mrope", "write_kv_cache": "kv_cache", "paged_decode_attention": "paged_attention",
                 "paged_prefill_attention": "paged_attention", "rms_norm_modulate": "dit_norms",
                 "gated_rms_residual": "dit_norms", "layer_norm_rope": "dit_norms"}
    modules = {m.name for m in pkgutil.iter_modules(triton_kernels.__path__) if not m.name.startswith("_")}
    assert set(module_of.values()) == modules  # a new kernel module needs a bench case
    for case in cases:
        reason = "CPU: the CUDA sampling kernel" if case.kernel == "cuda" else "CPU: the Triton interpreter"
        assert kernel_unavailable(case, torch.device("cpu")).startswith(reason)
        call, cost, notes = case.make()
        with torch.inference_mode(), reference_ops():
            out = call()
        assert out is None or isinstance(out, (torch.Tensor, tuple))
        assert cost.bytes > 0 and notes
    norm = next(c for c in cases if c.name == "rms_norm").make()[1]
    h, t = engine.cfg.text.hidden_size, engine.config.scheduler.max_num_batched_tokens
    assert norm.bytes == (2 * t * h + h) * 4  # x read, out written, the weight read, fp32
    decode = next(c for c in cases if c.name == "paged_decode_attention").make()[1]
    assert decode.flops == 4 * engine.config.scheduler.max_num_seqs * engine.cfg.text.num_attention_heads \
        * engine.cfg.text.head_dim * 1024


def test_poisson_clients_are_seeded_and_send_one_request_at_a_time():
    import numpy as np

    from blip3o_engine.bench.mixed import Client, MixedSettings, make_clients, poisson_times

    times = poisson_times(np.random.default_rng(0), 2.0, 10_000.0)
    assert times == sorted(times) and all(0 <= t < 10_000 for t in times)
    assert np.mean(np.diff(times)) == pytest.approx(2.0, rel=0.05)  # exponential gaps of mean 2 s (~5000 draws)
    s = MixedSettings(chat_clients=3, image_clients=2, duration_s=60, chat_interval_s=1, image_interval_s=20)
    a, b = make_clients(s, seed=7), make_clients(s, seed=7)
    assert [c.due for c in a] == [c.due for c in b] and [c.kind for c in a] == ["chat"] * 3 + ["image"] * 2
    assert len({c.due[0] for c in a}) == 5  # the clients arrive at different times
    client = Client("image", 0, [1.0, 2.0, 50.0])
    assert client.next_send(10.0) == 1.0
    client.due.pop(0)
    client.free_at = 4.5  # its first request finished late: the second goes out then
    assert client.next_send(10.0) == 4.5
    client.due.pop(0)
    assert client.next_send(10.0) is None and client.due == []  # nothing is sent after the duration
    with pytest.raises(ValueError):
        MixedSettings(chat_clients=0, image_clients=0)
    with pytest.raises(ValueError):
        MixedSettings(policies=("fifo",))


def test_stall_is_the_longest_chat_gap_over_image_work():
    from blip3o_engine.bench.mixed import (Client, MixedSettings, PolicyRun, StepTimes, _Request, _Step,
                                           policy_results, stall)
    from blip3o_engine.runtime.step_loop import StepTrace

    chat, image = Client("chat", 0, []), Client("image", 0, [])
    # Steps: 0-1 chat only, 1-3 with an image (3 s: a serial image run), 3-3.1 chat only.
    steps = [_Step(0.0, 1.0, False), _Step(1.0, 3.0, True), _Step(3.0, 3.1, False)]
    chats = [_Request(chat, 0.0, tokens=[1.0, 3.1], done=3.1), _Request(chat, 0.0, tokens=[0.5, 0.9], done=0.9)]
    run = PolicyRun("serial", chats, [_Request(image, 0.5, done=3.0)], steps, makespan_s=3.1, load=1.0)
    st = stall(run)
    assert st.worst_ms == pytest.approx(2100.0) and st.longest_ms == pytest.approx(2100.0) and st.gaps == 1
    assert st.worst_steps == tuple(steps[1:3]) and st.worst_between_ms == pytest.approx(0.0)
    assert st.max_units == 0  # these steps carry no trace of what they ran
    traced = [_Step(0.0, 1.0, False, StepTrace(0.01)),
              _Step(1.0, 1.5, True, StepTrace(0.02, unit="decoder", unit_s=0.48, decoder_batch=2)),
              _Step(1.6, 2.0, True, StepTrace(0.05, prompt_tokens=True)),
              _Step(2.0, 2.4, True, StepTrace(0.01, unit="vae", unit_s=0.39))]
    chat_run = [_Request(chat, 0.0, tokens=[1.0, 1.5, 2.0, 2.4], done=2.4), _Request(chat, 0.0, tokens=[1.0, 2.4])]
    st = stall(PolicyRun("interleave", chat_run, [], traced, makespan_s=2.4, load=1.0))
    assert st.worst_ms == pytest.approx(1400.0) and st.max_units == 2 and st.gaps == 4
    assert st.worst_between_ms == pytest.approx(100.0)  # 1.4 s gap, 1.3 s of it in three steps
    from blip3o_engine.bench.mixed import decoder_steps_in_run
    assert decoder_steps_in_run(PolicyRun("interleave", chat_run, [], traced, 2.4, 1.0)) == (2, [pytest.approx(500.0)])
    assert st.describe() == ("3 step(s): LLM 20.0 ms + decoder (2 images) 480.0 ms / LLM 50.0 ms (prompt tokens) / "
                             "LLM 10.0 ms + vae 390.0 ms, between steps 100.0 ms")
    times = StepTimes(decode_ms=10.0, decoder_ms=500.0, dit_chunk_ms=100.0, vae_ms=50.0, chats=1, images=1, dit_chunk=3)
    rows = {r.stage: r for r in policy_results(run, times, MixedSettings(chat_clients=1, image_clients=1))}
    assert rows["mixed_chat_stall"].timing.median_ms == pytest.approx(2100.0)
    notes = rows["mixed_chat_stall"].notes
    assert "limit_ms=510" in notes and "within_limit=no" in notes
    assert rows["mixed_image_latency"].timing.median_ms == pytest.approx(2500.0)
    assert "images/s=0.323" in rows["mixed_image_latency"].notes  # 1 image / 3.1 s
    assert rows["mixed_chat_ttft"].timing.samples_ms == pytest.approx((1000.0, 500.0))
    assert "tok/s=1.29" in rows["mixed_chat_itl"].notes  # 4 tokens / 3.1 s
    # With 90th percentiles measured, the limit is their sum (a worst gap against near-worst steps).
    noisy = StepTimes(10.0, 500.0, 100.0, 50.0, 1, 4, 3, decoder_one_ms=150.0, decode_p90_ms=12.0, decoder_p90_ms=530.0)
    assert noisy.limit_ms == pytest.approx(542.0)
    rows = {r.stage: r for r in policy_results(run, noisy, MixedSettings(chat_clients=1, image_clients=4))}
    assert "limit_ms=542" in rows["mixed_chat_stall"].notes and "limit_median_ms=510" in rows["mixed_chat_stall"].notes
    assert "decoder_ms_per_image=150 (1 image) / 125 (4 images)" in rows["mixed_image_latency"].notes


def test_bench_mixed_on_tiny_compares_the_policies(tiny_dir, tmp_path):
    path = tmp_path / "mixed.csv"
    argv = ["mixed", "--model", "tiny", "--steps", "3", "--dit-steps", "3", "--gen-tokens", "6", "--prompt-tokens",
            "16", "--threads", "1", "--duration-s", "1.5", "--chat-interval-s", "0.2", "--image-interval-s", "0.4",
            "--policies", "interleave,static,serial", "--csv", str(path)]
    assert cli.main(argv) == 0
    header, rows = read(path)
    assert header == COLUMNS
    got = {(r["stage"], r["backend"]) for r in rows}
    for policy in ("interleave", "static", "serial"):
        assert {("mixed_chat_ttft", policy), ("mixed_chat_itl", policy), ("mixed_image_latency", policy)} <= got
    by = {(r["stage"], r["backend"]): r for r in rows}
    images = by[("mixed_image_latency", "interleave")]
    assert float(images["median_ms"]) > 0 and "images/s=" in images["notes"] and "p99_ms=" in images["notes"]
    assert images["ratio_to_reference"] and by[("mixed_image_latency", "serial")]["ratio_to_reference"] == ""
    stall_row = by[("mixed_chat_stall", "interleave")]
    assert "limit_ms=" in stall_row["notes"] and "decoder_step_ms=" in stall_row["notes"]
    assert "max_units_per_gap=1" in stall_row["notes"] and "decoder_steps_in_run_ms=median " in stall_row["notes"]  # the step loop: one image unit per chat gap at most
    assert "worst_gap=" in stall_row["notes"] and " step(s): LLM " in stall_row["notes"]
    assert all("loadavg_start=" in r["notes"] for r in rows)


# A floor is a lower bound by construction; rows are what they say


def test_floors_never_count_more_work_than_each_backend_runs(tiny_engines):
    """Every t2i and stages row's cost (its floor's FLOPs) is at most what the backend's timed call executes,
    counted by FlopCounterMode (SDPA on its math path: the CPU flash kernel has no FLOP formula). A cost above
    the executed work makes a beatable floor, as the repeated-caption t2i_e2e (prefix-cache hits) and the DiT's
    null caption (cached) once did."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from blip3o_engine.bench.stages import BenchSettings, Workload, build_stages

    engines = {b: tiny_engines[b] for b in ("optimized", "reference")}
    settings = BenchSettings(prompt_tokens=16, dit_steps=3, decoder_steps=2, image_batches=(2,),
                             policy=TimingPolicy(warmup=1, reps=1, min_reps=1))
    w = Workload(engines["optimized"], settings)
    seen = set()
    for mode in ("stages", "t2i"):
        for stage in build_stages(mode, w):
            for backend, engine in engines.items():
                prepared = stage.prepare(engine)
                context = prepared if isinstance(prepared, contextlib.AbstractContextManager) else \
                    contextlib.nullcontext(prepared)
                with torch.inference_mode(), context as fn:
                    fn()  # the warm-up run: first-use work (caches) is not a timed run's
                    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
                        fn()
                per = stage.per_call(engine) if callable(stage.per_call) else stage.per_call
                executed = counter.get_total_flops() / per
                assert executed >= stage.cost.flops, (stage.name, backend, stage.batch, executed / stage.cost.flops)
                seen.add(stage.name)
    assert seen == {"dit_step", "unet_step", "unet_self_attn", "vae_decode", "ar_prefill", "dit_loop", "decoder_loop",
                    "t2i_e2e"}


def test_ceilings_are_the_fastest_run_of_the_fastest_shape_and_beaten_floors_are_flagged():
    """A ceiling slower than some shape the device runs (one square GEMM, a median run) makes a floor that work
    of that shape beats: the ceiling is the best shape's best run, so no ceiling shape beats its own floor."""
    gemm = (Rate("gemm", "square", 8e9, Timing((100.0, 90.0, 95.0))),  # 88.9 GFLOP/s at its best run
            Rate("gemm", "skinny", 4e9, Timing((30.0, 40.0))))  # 133 GFLOP/s: the ceiling
    conv = (Rate("conv", "a", 2e9, Timing((10.0, 12.0))), Rate("conv", "b", 1e9, Timing((8.0,))))
    ceil = Ceilings(Rate("copy", "x", 1e9, Timing((100.0, 50.0))), gemm, conv, "float32")
    assert ceil.matmul_flops_per_s == pytest.approx(4e9 / 0.030) and ceil.best_gemm.shape == "skinny"
    assert ceil.conv_flops_per_s == pytest.approx(2e9 / 0.010) and ceil.copy_bytes_per_s == pytest.approx(1e9 / 0.05)
    info = report.RunInfo("2026-01-01T00:00:00Z", "CPU", "abc", "tiny", "float32", True)
    # Each ceiling shape's own work, timed at its median, judged against the floor: never below 1.
    results = [StageResult(r.shape, "torch", 1, r.timing, Cost(flops=r.work, conv_flops=r.work if r.kind == "conv" else 0))
               for r in gemm + conv]
    rows = report.build_rows(results, info, ceil)
    assert all(float(r["ratio_to_floor"]) >= 1 for r in rows) and report.beaten_floors(rows) == []
    assert report.floor_check(rows).startswith("floor check: all 4 timed rows are at or above")
    # A row below its floor is reported, never silently printed.
    fast = report.build_rows([StageResult("dit_step", "optimized", 1, Timing((1.0,)), Cost(flops=8e9))], info, ceil)
    assert [r["stage"] for r in report.beaten_floors(fast)] == ["dit_step"]
    assert report.floor_check(fast).startswith("FLOOR CHECK FAILED: 1 of 1 rows")
    assert "FLOOR CHECK FAILED" in report.format_table(fast, info, ceil)


def test_recorded_runs_with_per_kind_ceilings_never_beat_a_floor():
    """The CSVs under benchmarks/results: every run that measured the per-kind ceilings (a ceiling_conv row)
    has each timed row at or above its floor (older runs, with one square GEMM as the only ceiling, did not)."""
    rows = [r for path in sorted((ROOT / "benchmarks" / "results").glob("*.csv")) for r in report.read_csv(path)]
    runs_with_conv = {(r["device"], r["date"]) for r in rows if r["stage"] == "ceiling_conv"}
    judged = [r for r in rows if (r["device"], r["date"]) in runs_with_conv]
    assert judged and report.beaten_floors(judged) == []


def test_kernel_rows_run_the_kernel_and_torch_rows_the_twin(tiny_engines, monkeypatch):
    """The triton row of `bench kernels` calls the op in "kernel" mode and never reaches a `*_ref` twin; the torch
    row runs the twin. (triton forced available: where it is not installed, the kernel path fails on the import,
    still before any twin; the CUDA sampling kernel needs a GPU and is left out.)"""
    from blip3o_engine import ops
    from blip3o_engine.bench.kernels import _run, kernel_cases
    from blip3o_engine.bench.stages import BenchSettings, Workload
    from blip3o_engine.ops import dispatch, dit_ops, llm_ops, norms, sampling_ops

    twins: list[str] = []
    for module in (dit_ops, llm_ops, norms, sampling_ops, ops):
        for name in dir(module):
            fn = getattr(module, name)
            if name.endswith("_ref") and callable(fn):
                def wrapped(*args, _fn=fn, _name=name, **kwargs):
                    twins.append(_name)
                    return _fn(*args, **kwargs)
                monkeypatch.setattr(module, name, wrapped)
    monkeypatch.setattr(dispatch, "HAS_TRITON", True)
    w = Workload(tiny_engines["reference"], BenchSettings(prompt_tokens=16, dit_steps=2, decoder_steps=2))
    # Small shapes (the twins at the default token budget take a minute on 2 busy cores): what is checked is
    # which implementation each row reaches, not its speed.
    w.engine_config = w.engine_config.with_overrides(max_num_batched_tokens=64, max_num_seqs=4, max_image_batch=1)
    cases = [c for c in kernel_cases(w) if c.kernel == "triton"]
    assert len(cases) == 10
    for case in cases:
        call, _, _ = case.make()
        twins.clear()
        with torch.inference_mode():
            _run(call, "reference")()
        assert twins, f"{case.name}: the torch row ran no *_ref twin"
        twins.clear()
        with torch.inference_mode():
            try:
                _run(call, "kernel")()
            except Exception:  # noqa: BLE001 - the kernel cannot run here; what matters is what it reached first
                pass
        assert twins == [], f"{case.name}: the triton row reached the twin(s) {twins}"
