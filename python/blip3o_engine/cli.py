"""`blip3o-engine` command line: generate, chat, make-tiny, export, bench."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .errors import Blip3oError

RANDOM_BANNER = ("NOTE: model {name!r} is a random-weight preset: images are noise and answers are gibberish; "
                 "pass --model PATH to a downloaded BLIP3o-Model-4B/8B for real outputs.")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny",
                   help="checkpoint directory or preset: tiny (default, random), small, 4b, 8b")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--backend", default="optimized", choices=["optimized", "reference"])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decoder (optimized backend; default: on for CUDA, off for CPU)")


def _load_engine(args):
    from .runtime.engine import Engine

    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    engine = Engine.from_pretrained(args.model, device=args.device, dtype=dtype, backend=args.backend,
                                    compile=args.compile)
    if engine.is_random_preset:
        print(RANDOM_BANNER.format(name=args.model), file=sys.stderr)
    return engine


def cmd_generate(args) -> int:
    from PIL import Image

    from .errors import InputError
    from .params import ImageParams

    # Bad arguments fail before the model loads and before minutes of denoising.
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
    engine = _load_engine(args)
    start = time.perf_counter()
    result = engine.generate_image(args.prompt, params, image=args.image, progress=True)
    try:
        result.image.save(out)
    except OSError as e:
        raise InputError(f"cannot write {out}: {e}") from e
    print(f"wrote {out} ({result.image.width}x{result.image.height}, seed {result.seed}) "
          f"in {time.perf_counter() - start:.2f} s", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from .params import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)
    engine = _load_engine(args)
    content = [{"type": "text", "text": args.prompt}]
    if args.image:
        content.insert(0, {"type": "image", "image": args.image})
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": content}]
    result = engine.chat(messages, params)
    print(result.text)
    print(f"[{len(result.token_ids)} tokens, finish_reason={result.finish_reason}]", file=sys.stderr)
    return 0


def cmd_make_tiny(args) -> int:
    from .tiny import make_tiny_checkpoint

    out = make_tiny_checkpoint(args.dir, preset=args.preset, seed=args.seed)
    print(f"wrote a random-weight {args.preset!r} checkpoint to {out}")
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
    from .runtime.engine import Engine

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
    c.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
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

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Blip3oError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
