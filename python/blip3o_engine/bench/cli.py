"""`blip3o-engine bench {chat,t2i,stages,kernels,export,mixed,all}`: argument parsing and the run itself.

`add_bench_parser(subparsers)` adds the `bench` command to the main CLI; `main(argv)` runs it
standalone (`python -m blip3o_engine.bench ...` and the scripts under benchmarks/).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..errors import Blip3oError, ConfigError
from .engines import load_engines
from .mixed import POLICIES, MixedSettings, run_mixed
from .report import (RunInfo, append_csv, build_rows, check_csv, check_plotting, device_name, format_table, git_commit,
                     host_load, plot, utc_now)
from .stages import ALL_ORDER, MODES, STAGE_NAMES, BenchSettings, run_modes
from .timing import TimingPolicy


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def default_batches(device: torch.device) -> tuple[int, ...]:
    """The chat batch sizes when --batch is not given (see its help)."""
    return (1, 8, 32, 64) if device.type == "cuda" else (1, 16)


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add `bench` to an argparse subparsers object; the parsed args carry `func=run_bench`."""
    p = subparsers.add_parser("bench", help="benchmarks: per-stage timings against measured floors",
                              description="Time chat and text-to-image stages per backend: medians after warm-up, each "
                                          "against its roofline floor from ceilings measured in the run (GPU).")
    p.add_argument("mode", choices=[*MODES, "all"], help="what to time (all = every mode)")
    p.add_argument("--model", default="tiny", help="preset tiny|small|4b|8b (random weights) or a checkpoint path")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--backend", default="optimized,reference", type=_names,
                   help="comma-separated backends, timed in this order per stage (default: optimized,reference); "
                        "'transformers' adds transformers' generate over the same weights as a chat baseline "
                        "(chat mode only; opt-in: it is the slowest row and needs minutes at 4b/8b scale)")
    p.add_argument("--batch", default=None, type=_ints,
                   help="chat batch sizes / concurrencies (default: 1,8,32,64 on CUDA; 1,16 on CPU, where "
                        "larger batches take minutes per backend)")
    p.add_argument("--image-batch", default=(1, 4), type=_ints,
                   help="text-to-image batch sizes of the t2i_e2e stage, with images/s (default: 1,4)")
    p.add_argument("--steps", type=int, default=50, help="decoder (UNet) steps (default 50)")
    p.add_argument("--dit-steps", type=int, default=30, help="DiT steps (default 30)")
    p.add_argument("--gen-tokens", type=int, default=32, help="decode steps timed per chat request (default 32)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="chat message length in tokens (default 128)")
    p.add_argument("--t2i-tokens", type=int, default=98,
                   help="target AR length of the T2I prefill incl. [IMG] and the queries "
                        "(default 98, docs/model_spec.md §4)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed runs before timing, >= 1 (default 1; the first one's time is kept as cold_ms)")
    p.add_argument("--reps", type=int, default=10, help="timed runs at most (default 10)")
    p.add_argument("--min-reps", type=int, default=3, help="timed runs at least (default 3)")
    p.add_argument("--budget-s", type=float, default=20.0,
                   help="stop timing a stage after this many seconds once min-reps are done (default 20)")
    p.add_argument("--only", type=_names, default=(), help="comma-separated stage names to run (default: all)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the optimized decoder (default: on for CUDA, off for CPU); the first "
                        "(warm-up) run's time, which includes compiling, is reported as cold_ms")
    p.add_argument("--export-dir", default=None,
                   help="export mode: directory for the ONNX/AOTInductor exports (reused when present; "
                        "default: a temporary directory)")
    mixed = p.add_argument_group("mixed mode (chat and image clients through one engine; not part of all)")
    mixed.add_argument("--chat-clients", type=int, default=2, help="chat clients N (default 2)")
    mixed.add_argument("--image-clients", type=int, default=2, help="image clients M (default 2)")
    mixed.add_argument("--duration-s", type=float, default=120.0,
                       help="seconds during which clients send requests; the ones in flight then finish (default 120)")
    mixed.add_argument("--chat-interval-s", type=float, default=3.0,
                       help="mean gap between a chat client's requests, Poisson (default 3)")
    mixed.add_argument("--image-interval-s", type=float, default=40.0,
                       help="mean gap between an image client's requests, Poisson (default 40)")
    mixed.add_argument("--policies", type=_names, default=MixedSettings().policies,
                       help=f"step-loop policies to compare, each in its own engine, among {', '.join(POLICIES)} "
                            f"(default: {','.join(MixedSettings().policies)})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--csv", default=None, help="append rows to this CSV file")
    p.add_argument("--plot", default=None, help="write a PNG of the per-stage medians (needs matplotlib)")
    p.set_defaults(func=run_bench)
    return p


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed `args`; print the table; write CSV/PNG.

    Returns 0, or 2 when --plot or --csv cannot work (checked before any timing, not after
    minutes of it).
    """
    try:
        if args.plot:
            check_plotting()
        if args.csv:
            check_csv(args.csv)
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    known = {name for names in STAGE_NAMES.values() for name in names}
    if set(args.only) - known:
        raise ConfigError(f"unknown stage(s) in --only: {', '.join(sorted(set(args.only) - known))}; "
                          f"known: {', '.join(sorted(known))}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but CUDA is not available")
    try:
        policy = TimingPolicy(warmup=args.warmup, reps=args.reps, min_reps=min(args.min_reps, args.reps),
                              budget_s=args.budget_s)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if args.warmup < 1:  # the first call pays lazy initialization, compilation, graph capture
        raise ConfigError("--warmup must be >= 1: the first run of a stage is never timed")
    if args.gen_tokens < 1 or args.prompt_tokens < 1:
        raise ConfigError("--gen-tokens and --prompt-tokens must be >= 1")
    batches = args.batch or default_batches(device)
    settings = BenchSettings(batches=batches, image_batches=args.image_batch, dit_steps=args.dit_steps,
                             decoder_steps=args.steps,
                             gen_tokens=args.gen_tokens, prompt_tokens=args.prompt_tokens,
                             t2i_tokens=args.t2i_tokens, seed=args.seed, only=args.only, policy=policy,
                             export_dir=args.export_dir)
    modes = list(ALL_ORDER) if args.mode == "all" else [args.mode]
    date, load = utc_now(), host_load()
    if args.mode == "mixed":
        return _run_mixed(args, device, settings, date, load)
    print(f"loading {args.model} on {device} ...", file=sys.stderr, flush=True)
    loaded = load_engines(args.model, device, args.dtype, list(args.backend), compile=args.compile)
    first = next(iter(loaded.engines.values()))
    dtype = str(first.model.dtype).replace("torch.", "")
    print(f"loaded in {loaded.load_s:.1f} s ({dtype})", file=sys.stderr, flush=True)
    info = RunInfo(date=date, device=device_name(device), commit=git_commit(), preset=loaded.preset, dtype=dtype,
                   random_weights=loaded.random_weights, host_load=load)

    def save(new, ceil) -> None:  # rows reach the CSV stage by stage
        if args.csv:
            append_csv(args.csv, build_rows(new, info, ceil))

    results, ceil = run_modes(modes, loaded.engines, settings, on_results=save)
    rows = build_rows(results, info, ceil)
    if args.csv:
        print(f"appended {len(rows)} rows to {args.csv}", file=sys.stderr)
    if args.plot:
        plot(rows, info, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    print(format_table(rows, info, ceil, loaded.load_s))
    return 0


def _run_mixed(args: argparse.Namespace, device: torch.device, settings: BenchSettings, date: str,
               load: float | None) -> int:
    """`bench mixed`: the policies over one model, rows appended to the CSV per policy (bench/mixed.py)."""
    from ..config import PRESETS, dtype_from_name
    from .engines import default_dtype

    try:
        mixed = MixedSettings(args.chat_clients, args.image_clients, args.duration_s, args.chat_interval_s,
                              args.image_interval_s, tuple(args.policies))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    dtype = dtype_from_name(args.dtype or default_dtype(device))
    name = str(dtype).replace("torch.", "")
    is_preset = args.model.lower() in PRESETS and not Path(args.model).is_dir()
    info = RunInfo(date=date, device=device_name(device), commit=git_commit(),
                   preset=args.model.lower() if is_preset else Path(args.model).name, dtype=name,
                   random_weights=is_preset, host_load=load)

    done: list = []

    def save(new) -> None:  # rows reach the CSV policy by policy, with their ratio to the serial baseline (run first)
        done.extend(new)
        if args.csv:
            append_csv(args.csv, build_rows(done, info, None)[-len(new):])

    print(f"loading {args.model} on {device} ...", file=sys.stderr, flush=True)
    results = run_mixed(args.model, device, dtype, settings, mixed, compile=args.compile, emit=save)
    rows = build_rows(results, info, None)
    if args.csv:
        print(f"appended {len(rows)} rows to {args.csv}", file=sys.stderr)
    print(format_table(rows, info, None))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="blip3o-engine")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except (Blip3oError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


__all__ = ["add_bench_parser", "default_batches", "run_bench", "main"]
