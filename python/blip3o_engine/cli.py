"""`blip3o-engine` command line: generate, chat, make-tiny, train-demo, export, bench, serve."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .config import TRAINED_PRESETS
from .errors import Blip3oError

RANDOM_BANNER = ("NOTE: model {name!r} is a random-weight preset: images are noise and answers are gibberish; "
                 "pass --model PATH to a downloaded BLIP3o-Model-4B/8B for real outputs.")
DEMO_NOTE = ("note: 'demo' is a toy model trained on 64x64 pictures of one red, green, blue or yellow circle, "
             "square or triangle; pass --model PATH to a downloaded BLIP3o-Model-4B/8B for real outputs.")
DEFAULT_MODEL = "demo"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="checkpoint directory or preset: demo (default, a toy model trained on coloured "
                        "shapes), tiny, small (random weights), 4b, 8b (real shapes, random weights)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: OMP_NUM_THREADS when set, else the cores this process "
                        "may use (CPU affinity, cgroup quota) that other work is not keeping busy)")
    p.add_argument("--dtype", default=None,
                   help="float32 | float16 | bfloat16 (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--backend", default="optimized", choices=["optimized", "reference"])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decoder (= --compile-decoder; default: on for CUDA, off for CPU)")
    p.add_argument("--print-memory-plan", action="store_true",
                   help="print the engine's memory plan (weights, KV pool, stage working sets) after loading")
    add_engine_option_args(p)


def add_engine_option_args(p: argparse.ArgumentParser) -> None:
    """One flag per field of EngineConfig's sections (`--block-size`, `--max-image-batch`, `--no-cuda-graphs`,
    ...), defaulting to "not given" so that only what the user sets overrides the config's defaults."""
    from .engine_config import POLICIES, EngineConfig, option_fields

    defaults = EngineConfig()
    group = p.add_argument_group("engine options (EngineConfig; default values in brackets)")
    for section, name, f in option_fields():
        flag = "--" + name.replace("_", "-")
        default = getattr(getattr(defaults, section), name)
        help_text = f"{section}.{name} [{default}]"
        if "bool" in str(f.type):
            group.add_argument(flag, dest=f"opt_{name}", action=argparse.BooleanOptionalAction, default=None,
                           help=help_text)
        elif name == "policy":
            group.add_argument(flag, dest=f"opt_{name}", choices=list(POLICIES), default=None, help=help_text)
        else:
            kind = float if ("memory" in name or "utilization" in name) else int
            group.add_argument(flag, dest=f"opt_{name}", type=kind, default=None, metavar=kind.__name__.upper(),
                               help=help_text)


def engine_options(args) -> dict:
    """The engine options the user set on the command line ({field: value})."""
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None}


def _check_model_args(args):
    """Validate device, dtype, threads and the model's config before any weights load (seconds for
    tiny, minutes for 8B); returns the model's ModelConfig and sets torch's thread count."""
    import torch

    from .config import device_from_name, dtype_from_name, model_config
    from .engine_config import EngineConfig
    from .errors import InputError
    from .threads import default_num_threads

    device = device_from_name(args.device)
    args.dtype = args.dtype or ("float32" if device.type == "cpu" else "bfloat16")
    dtype_from_name(args.dtype)
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be >= 1, got {args.threads}")
    cfg = model_config(args.model)
    EngineConfig().with_overrides(**engine_options(args))  # a bad option value fails now, not after loading
    torch.set_num_threads(args.threads or default_num_threads())
    return cfg


def _load_engine(args):
    from .engine import Engine

    engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype, backend=args.backend,
                                    compile=args.compile, **engine_options(args))
    if str(args.model).lower() in TRAINED_PRESETS and not Path(args.model).is_dir():
        print(DEMO_NOTE, file=sys.stderr)
    elif engine.is_random_preset:
        print(RANDOM_BANNER.format(name=args.model), file=sys.stderr)
    if args.print_memory_plan:
        print(engine.memory_plan().summary(), file=sys.stderr)
    return engine


def cmd_generate(args) -> int:
    from PIL import Image

    from .errors import ConfigError, InputError
    from .params import ImageParams
    from .prompts import load_image

    # Every argument and the input image are checked before the model loads and before minutes of
    # denoising.
    params = ImageParams(height=args.height, width=args.width, dit_steps=args.dit_steps,
                         dit_guidance=args.dit_guidance, decoder_steps=args.steps,
                         decoder_guidance=args.guidance, seed=args.seed)
    out = Path(args.output)
    if out.suffix.lower() not in Image.registered_extensions():
        raise InputError(f"cannot tell the image format of {out}: use an extension such as .png or .jpg")
    try:  # a bad output path must fail now, not after the denoising loops
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the output folder {out.parent}: {e}") from e
    if not os.access(out.parent, os.W_OK):
        raise InputError(f"output folder {out.parent} is not writable")
    cfg = _check_model_args(args)
    if not cfg.can_generate_images:
        raise ConfigError(f"model {args.model!r} has no DiT/decoder: it can chat but not generate images")
    cfg.image_size(params.height, params.width)
    image = load_image(args.image) if args.image is not None else None
    engine = _load_engine(args)
    start = time.perf_counter()
    result = engine.generate_image(args.prompt, params, image=image, progress=True)
    try:
        result.image.save(out)
    except OSError as e:
        raise InputError(f"cannot write {out}: {e}") from e
    print(f"wrote {out} ({result.image.width}x{result.image.height}, seed {result.seed}) "
          f"in {time.perf_counter() - start:.2f} s", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from .params import SamplingParams
    from .prompts import load_image

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)
    _check_model_args(args)
    image = load_image(args.image) if args.image is not None else None  # before the weights load
    engine = _load_engine(args)
    content = [{"type": "text", "text": args.prompt}]
    if image is not None:
        content.insert(0, {"type": "image", "image": image})
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": content}]
    result = engine.chat(messages, params)
    print(result.text)
    print(f"[{len(result.token_ids)} tokens, finish_reason={result.finish_reason}]", file=sys.stderr)
    return 0


def cmd_make_tiny(args) -> int:
    from .errors import InputError
    from .tiny import make_tiny_checkpoint

    try:  # a bad target path raises InputError up front; this catches what fails mid-write (disk full)
        out = make_tiny_checkpoint(args.dir, preset=args.preset, seed=args.seed)
    except OSError as e:
        raise InputError(f"cannot write the checkpoint to {args.dir}: {e}") from e
    print(f"wrote a random-weight {args.preset!r} checkpoint to {out}")
    return 0


def cmd_train_demo(args) -> int:
    from .errors import InputError

    out = Path(args.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out} already exists and is not an empty directory; choose a new one")
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be >= 1, got {args.threads}")
    try:
        import matplotlib  # noqa: F401  (the loss-curve plot; fail now, not after the training)
    except ImportError as e:
        raise InputError("train-demo plots its loss curves with matplotlib: pip install 'blip3o-engine[train]'") from e
    from .train.recipe import DemoRecipe, train_demo

    recipe = DemoRecipe.smoke() if args.quick else DemoRecipe()
    command = "blip3o-engine train-demo " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["train-demo"] else None
    summary = train_demo(out, seed=args.seed, threads=args.threads, recipe=recipe, progress=not args.no_progress,
                         evaluate=not args.no_eval, command=command)
    wall, cpu = summary["wall_seconds"], summary["cpu_seconds"]
    print(f"wrote the demo checkpoint to {out} in {wall['total'] / 60:.1f} min ({cpu['total'] / 60:.1f} min of CPU, "
          f"{summary['threads']} thread(s)); loss curves: {out / 'loss_curves.png'}")
    for stage, losses in summary["final_losses"].items():
        print(f"  {stage:16s} " + "  ".join(f"{k}={v:.4g}" for k, v in losses.items())
              + f"  ({wall[stage]:.0f} s, {cpu[stage]:.0f} s CPU)")
    if "evaluation" in summary:
        ev = summary["evaluation"]
        print(f"  evaluation: text-to-image match {ev['t2i_match_rate']:.0%} of {ev['t2i_images']} images, "
              f"chat {ev['chat_accuracy']:.0%} of {ev['chat_images']}")
    return 0


def _sizes(text: str) -> list[tuple[int, ...]]:
    """"1024x1024,512x768" -> [(1024, 1024), (512, 768)]; also t x h x w grids."""
    out = []
    for item in text.split(","):
        try:
            out.append(tuple(int(v) for v in item.strip().lower().split("x")))
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected sizes like 1024x1024, got {item!r}") from e
    return out


def cmd_export(args) -> int:
    from .export.api import export
    from .export.stages import STAGE_CHOICES
    from .engine import Engine

    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    bad = [s for s in stages or () if s not in STAGE_CHOICES]
    if bad:  # before loading the model
        from .errors import ExportError

        raise ExportError(f"unknown stage(s) {', '.join(bad)}; choose from {', '.join(STAGE_CHOICES)}")
    uses_trt = args.format == "tensorrt" or args.triton_platform == "tensorrt_plan"
    # The graphs are traced in the export dtype (TensorRT: fp32 ONNX + a precision flag).
    load_dtype = "float32" if uses_trt or args.dtype is None else args.dtype
    engine = Engine.from_pretrained(args.model, device=args.device, dtype=load_dtype)
    start = time.perf_counter()
    manifest = export(engine, args.output, format=args.format, stages=stages, dtype=args.dtype,
                      max_batch=args.max_batch, sizes=args.sizes, max_seq_len=args.max_seq_len,
                      vit_grids=args.vit_grids, opset=args.opset, overwrite=args.overwrite,
                      triton_platform=args.triton_platform, trt_optimization_level=args.trt_opt_level)
    size = sum((Path(args.output) / f).stat().st_size for f in manifest.files)
    print(f"wrote {len(manifest.graphs)} graphs ({', '.join(manifest.graphs)}) to {args.output} "
          f"({size / 2**20:.1f} MiB, {args.format}) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blip3o-engine", description="BLIP3-o inference engine")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="text-to-image")
    g.add_argument("prompt")
    g.add_argument("-o", "--output", default="out.png", help="output image file (default: out.png)")
    g.add_argument("--image", default=None, help="optional input image to condition on")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--steps", type=int, default=50, help="decoder (UNet) steps (default 50)")
    g.add_argument("--guidance", type=float, default=3.0, help="decoder CFG scale (default 3.0)")
    g.add_argument("--dit-steps", type=int, default=30, help="DiT flow-matching steps (default 30)")
    g.add_argument("--dit-guidance", type=float, default=3.0, help="DiT CFG scale (default 3.0)")
    g.add_argument("--height", type=int, default=None, help="default: the model's native size")
    g.add_argument("--width", type=int, default=None)
    _add_model_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="answer one user message (optionally about an image)")
    c.add_argument("prompt")
    c.add_argument("--image", default=None)
    c.add_argument("--system", default=None, help="system prompt (default: Qwen's)")
    c.add_argument("--max-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (the default here, for reproducible answers; the Python API's "
                        "SamplingParams defaults to vLLM's 1.0)")
    c.add_argument("--top-p", type=float, default=1.0)
    c.add_argument("--top-k", type=int, default=-1)
    c.add_argument("--repetition-penalty", type=float, default=1.0)
    c.add_argument("--seed", type=int, default=None)
    _add_model_args(c)
    c.set_defaults(func=cmd_chat)

    t = sub.add_parser("make-tiny", help="write a random-weight checkpoint in the published layout")
    t.add_argument("dir")
    t.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_make_tiny)

    d = sub.add_parser("train-demo", help="train the 'demo' preset from scratch (BLIP3-o's recipe at toy scale, "
                                          "about 20 minutes on 2 CPU cores, see the README)")
    d.add_argument("-o", "--output", required=True, help="new directory for the checkpoint and loss_curves.png")
    d.add_argument("--seed", type=int, default=0, help="seed of weights and data (default 0: the shipped preset)")
    d.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's, one per core; on a busy machine 1 is often faster)")
    d.add_argument("--quick", action="store_true", help="a few steps per stage: checks the pipeline in seconds")
    d.add_argument("--no-eval", action="store_true", help="skip the quick evaluation of the written checkpoint")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_train_demo)

    e = sub.add_parser("export", help="export the stages: ONNX, AOTInductor, TensorRT or a Triton repository",
                       description="Export the model's stages ahead of time; load them back with "
                                   "Engine.from_exported(DIR, runtime=...).")
    e.add_argument("--format", required=True, choices=["onnx", "aoti", "tensorrt", "triton"])
    e.add_argument("-o", "--output", required=True, help="output directory (created; must be empty unless --overwrite)")
    e.add_argument("--stages", default=None,
                   help="comma-separated: vit,llm,dit,unet,vae (default: all the model has); llm_prefill = "
                        "the LLM's prefill graph only (enough for text-to-image)")
    e.add_argument("--max-batch", type=int, default=4, help="images / sequences per call in the profiles (default 4)")
    e.add_argument("--sizes", type=_sizes, default=None,
                   help="image sizes HxW in pixels for the profiles, first = opt (default: the native size)")
    e.add_argument("--max-seq-len", type=int, default=2048, help="longest LLM sequence in the profiles (default 2048)")
    e.add_argument("--vit-grids", type=_sizes, default=None,
                   help="ViT graphs for these image grids TxHxW in patches (default: 1x32x32, a 448x448 image)")
    e.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 18)")
    e.add_argument("--triton-platform", default="onnxruntime_onnx", choices=["onnxruntime_onnx", "tensorrt_plan"])
    e.add_argument("--trt-opt-level", type=int, default=3, help="TensorRT builder optimization level (0-5)")
    e.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty output directory")
    e.add_argument("--model", default="tiny", help="checkpoint directory or preset (default: tiny)")
    e.add_argument("--device", default="cpu", help="device to trace on (AOTInductor compiles for it)")
    e.add_argument("--dtype", default=None,
                   help="graph dtype (default: float32 on CPU; TensorRT: the precision flag, default float16)")
    e.set_defaults(func=cmd_export)

    from .bench.cli import add_bench_parser  # argparse only; the benchmark code loads when run

    b = add_bench_parser(sub)
    b.epilog = ((b.epilog or "") + " `blip3o-engine bench serve --help`: load-test a running server instead.").strip()

    from .serve.cli import add_serve_args  # argparse only; the server's packages load when it runs

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat, images), web playground at /",
                       description="Serve the model over HTTP: /v1/chat/completions, /v1/images/generations, "
                                   "/v1/images/edits, /v1/models, /health, /metrics, and a playground at /. "
                                   "Needs the [serve] extra ([ray] for --replicas).")
    add_serve_args(s)
    _add_model_args(s)
    s.set_defaults(func=cmd_serve)
    return parser


def cmd_serve(args) -> int:
    from .serve.cli import run_serve

    return run_serve(args)


def _bench_serve(argv: list[str]) -> int:
    """`blip3o-engine bench serve ...`: the HTTP load generator, whose flags differ from the stage benchmarks'."""
    from .serve.bench_serve import main as bench_serve_main

    return bench_serve_main(argv)


def _passive_openmp() -> None:
    """Let idle OpenMP threads sleep instead of spinning (set before torch loads its OpenMP runtime).

    Training runs thousands of small steps; on a machine whose cores other processes also use, a
    spinning thread steals the core its partner needs, and a 2-thread conv backward measured 10x
    slower than with one thread. Passive waiting costs little on an idle machine.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["bench", "serve"]:
        return _bench_serve(argv[2:])
    if argv[:1] == ["train-demo"]:
        _passive_openmp()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Blip3oError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
