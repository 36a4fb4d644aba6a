"""`blip3o-engine` command line: generate, chat, make-tiny, train-demo, bench."""

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
    if str(args.model).lower() in TRAINED_PRESETS and not Path(args.model).is_dir():
        print(DEMO_NOTE, file=sys.stderr)
    elif engine.is_random_preset:
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

    d = sub.add_parser("train-demo", help="train the 'demo' preset from scratch (BLIP3-o's recipe at toy scale, "
                                          "about 20 minutes on 2 CPU cores)")
    d.add_argument("-o", "--output", required=True, help="new directory for the checkpoint and loss_curves.png")
    d.add_argument("--seed", type=int, default=0, help="seed of weights and data (default 0: the shipped preset)")
    d.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's, one per core; on a busy machine 1 is often faster)")
    d.add_argument("--quick", action="store_true", help="a few steps per stage: checks the pipeline in seconds")
    d.add_argument("--no-eval", action="store_true", help="skip the quick evaluation of the written checkpoint")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_train_demo)

    from .bench.cli import add_bench_parser  # argparse only; the benchmark code loads when run

    add_bench_parser(sub)
    return parser


def _passive_openmp() -> None:
    """Let idle OpenMP threads sleep instead of spinning (set before torch loads its OpenMP runtime).

    Training runs thousands of small steps; on a machine whose cores other processes also use, a
    spinning thread steals the core its partner needs, and a 2-thread conv backward measured 10x
    slower than with one thread. Passive waiting costs little on an idle machine.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
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
