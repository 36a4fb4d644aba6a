"""Render the README's grid of `demo` outputs: every "a {colour} {shape}" prompt with four seeds.

    python scripts/make_demo_grid.py                       # -> docs/demo/grid.png
    python scripts/make_demo_grid.py --model DIR -o x.png  # any checkpoint trained by train-demo

Rows are shapes, columns colours; each cell holds the four seeds' images (2×2, shown at 2× size)
with the prompt above it. An image the pixel rule (`blip3o_engine.train.shapes.classify_image`)
does not read as its prompt gets a red frame; the match rate is printed and written in the corner.
Default settings throughout: 30 DiT steps, 50 decoder steps, CFG 3 and 3, 64×64 pixels.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

from blip3o_engine import Engine
from blip3o_engine.train import shapes
from blip3o_engine.train.evaluate import evaluate_t2i

ROOT = Path(__file__).resolve().parents[1]
ZOOM = 2  # 64-pixel images are shown at 128 pixels, nearest neighbour (no smoothing added)
GAP, LABEL, SEP = 12, 18, 2  # between cells, caption height, between the seeds of one cell


def draw_grid(result, rounds: int) -> Image.Image:
    side = shapes.IMAGE_SIZE * ZOOM
    cell_w, cell_h = 2 * side + SEP + GAP, 2 * side + SEP + LABEL + GAP
    colours, kinds = list(shapes.COLOURS), list(shapes.SHAPES)
    canvas = Image.new("RGB", (len(colours) * cell_w + GAP, len(kinds) * cell_h + GAP + LABEL), (235, 235, 235))
    draw = ImageDraw.Draw(canvas)
    for i, (colour, kind) in enumerate(shapes.all_classes()):
        x0 = GAP + colours.index(colour) * cell_w
        y0 = GAP + kinds.index(kind) * cell_h
        draw.text((x0, y0), shapes.caption(colour, kind), fill="black")
        for k in range(rounds):
            j = i * rounds + k
            img = result.images[j].resize((side, side), Image.NEAREST)
            x, y = x0 + (k % 2) * (side + SEP), y0 + LABEL + (k // 2) * (side + SEP)
            canvas.paste(img, (x, y))
            if result.predicted[j] != result.expected[j]:
                draw.rectangle((x, y, x + side - 1, y + side - 1), outline=(230, 0, 0), width=2)
    draw.text((GAP, canvas.height - LABEL), f"pixel rule matches the prompt in {result.match_rate:.0%} "
              f"of {len(result.images)} images (red frame: no match)", fill=(90, 90, 90))
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--backend", default="optimized", choices=["optimized", "reference"])
    parser.add_argument("-o", "--output", default=str(ROOT / "docs" / "demo" / "grid.png"))
    args = parser.parse_args()
    engine = Engine.from_pretrained(args.model, backend=args.backend)
    rounds = 4
    result = evaluate_t2i(engine, rounds=rounds)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    draw_grid(result, rounds).save(out)
    print(f"wrote {out}: {result.match_rate:.1%} of {len(result.images)} images match their prompt")
    for prompt, rate in result.per_prompt().items():
        print(f"  {prompt:20s} {rate:.0%}")


if __name__ == "__main__":
    main()
