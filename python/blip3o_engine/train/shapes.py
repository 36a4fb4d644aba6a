"""The demo's synthetic data set, made in code: one coloured shape on a plain white background.

Every image shows a circle, a square or a triangle in red, green, blue or yellow, of random size and
position, anti-aliased so that edges look like a real rendering. Each image comes
with its caption ("a red circle", what text-to-image is trained on) and question/answer pairs ("What
is in this picture?" -> "a red circle", what chat is trained on).

`classify_image` is the pixel rule the quality tests judge generated images with: the foreground is
what is clearly coloured (the background is neutral), its dominant hue names the colour, and the
share of its bounding box it fills names the shape (square 1, circle π/4, triangle 1/2).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (235, 195, 20),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (255, 255, 255)
IMAGE_SIZE = 64
# Side of the shape's bounding box, in pixels of a 64² image (scaled with the image size).
MIN_SIZE, MAX_SIZE = 20 / 64, 44 / 64
MARGIN = 2 / 64  # the shape stays this far from the border

QUESTION = "What is in this picture?"  # the question the chat quality test asks


def caption(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def qa_pairs(colour: str, shape: str) -> list[tuple[str, str]]:
    """What the demo's chat is trained to answer about an image of this shape."""
    return [(QUESTION, caption(colour, shape)),
            ("What colour is the shape?", colour),
            ("What shape is it?", f"a {shape}")]


def all_classes() -> list[tuple[str, str]]:
    """Every (colour, shape) pair, colours outer: the demo's 12 classes in a fixed order."""
    return [(c, s) for c in COLOURS for s in SHAPES]


@dataclass(frozen=True)
class ShapeSpecs:
    """A batch of shapes to draw: class indices into COLOURS/SHAPES and geometry in pixels."""

    colour: torch.Tensor  # [N] int64, index into COLOURS
    shape: torch.Tensor  # [N] int64, index into SHAPES
    center: torch.Tensor  # [N, 2] float (x, y)
    size: torch.Tensor  # [N] float, side of the bounding box

    def __len__(self) -> int:
        return self.colour.shape[0]

    def labels(self) -> list[tuple[str, str]]:
        names = list(COLOURS)
        return [(names[c], SHAPES[s]) for c, s in zip(self.colour.tolist(), self.shape.tolist())]

    def captions(self) -> list[str]:
        return [caption(c, s) for c, s in self.labels()]


def sample_specs(n: int, generator: torch.Generator, image_size: int = IMAGE_SIZE,
                 colour: torch.Tensor | None = None, shape: torch.Tensor | None = None) -> ShapeSpecs:
    """`n` random shapes (uniform class, size and position); `colour`/`shape` [N] fix the classes."""
    if colour is None:
        colour = torch.randint(len(COLOURS), (n,), generator=generator)
    if shape is None:
        shape = torch.randint(len(SHAPES), (n,), generator=generator)
    u = torch.rand(n, 3, generator=generator)
    size = (MIN_SIZE + (MAX_SIZE - MIN_SIZE) * u[:, 0]) * image_size  # [N]
    free = image_size - size - 2 * MARGIN * image_size  # room left for the box's corner
    center = MARGIN * image_size + size[:, None] / 2 + u[:, 1:] * free[:, None]  # [N, 2]
    return ShapeSpecs(colour.long(), shape.long(), center, size)


def coverage(specs: ShapeSpecs, image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """Fraction of each pixel the shape covers, [N, H, W] in [0, 1].

    Anti-aliased from the signed distance d of each pixel centre to the outline (negative inside):
    coverage = clamp(0.5 − d, 0, 1), exact for straight edges at any angle, and cheap enough to draw
    thousands of images a second. Polygons use the max of their edges' half-plane distances.
    """
    pix = torch.arange(image_size, dtype=torch.float32) + 0.5  # pixel centres
    dx = pix[None, None, :] - specs.center[:, 0, None, None]  # [N, 1, W]
    dy = pix[None, :, None] - specs.center[:, 1, None, None]  # [N, H, 1]
    half = specs.size[:, None, None] / 2  # [N, 1, 1]
    circle = (dx**2 + dy**2).sqrt() - half
    square = torch.maximum(dx.abs(), dy.abs()) - half
    # Upright isosceles triangle filling half its box: apex at the top centre, base at the bottom;
    # the sides have slope 2, so their outward normals are (±2, −1)/√5.
    side = (2 * dx.abs() - (dy + half)) / 5**0.5
    triangle = torch.maximum(side, dy - half)
    kind = specs.shape[:, None, None]
    sdf = torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle))  # [N, H, W]
    return (0.5 - sdf).clamp(0, 1)


def render(specs: ShapeSpecs, image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """uint8 images [N, H, W, 3]: each shape blended over the background by its coverage."""
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32)  # [4, 3]
    fg = palette[specs.colour][:, None, None, :]  # [N, 1, 1, 3]
    bg = torch.tensor(BACKGROUND, dtype=torch.float32)
    a = coverage(specs, image_size)[..., None]  # [N, H, W, 1]
    return (bg + a * (fg - bg)).round().clamp(0, 255).to(torch.uint8)


def blank(n: int = 1, image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """Images of the background alone, [N, H, W, 3] uint8."""
    return torch.tensor(BACKGROUND, dtype=torch.uint8).expand(n, image_size, image_size, 3).clone()


def to_pil(images: torch.Tensor) -> list:
    from PIL import Image

    return [Image.fromarray(img.numpy()) for img in images]


# ------------------------------------------------------------------------------------------------
# The pixel rule


# A shape's mask is kept when it fills at least this share of the image (else: "nothing drawn").
MIN_FOREGROUND = 0.02
# Fill ratio of the bounding box: triangle 0.5, circle π/4 ≈ 0.785, square 1. Boundaries halfway.
TRIANGLE_MAX_FILL = 0.64
CIRCLE_MAX_FILL = 0.89


def _hue_saturation(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hue in degrees [0, 360) and chroma (max − min, 0..255) of float RGB [..., 3]."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    chroma = mx - mn
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4))
    return (hue * 60.0) % 360.0, chroma


_REFERENCE_HUES = {name: float(_hue_saturation(np.array(rgb, dtype=np.float64))[0])
                   for name, rgb in COLOURS.items()}


def foreground_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels that are clearly coloured, [H, W] bool: chroma above half of the image's strongest
    colour (so the threshold follows the shape's own colour, at least 40 of 255), then the largest
    4-connected component (a generated image may have specks)."""
    _, chroma = _hue_saturation(rgb)
    peak = float(np.percentile(chroma, 99.5))
    mask = chroma >= max(40.0, 0.5 * peak)
    return _largest_component(mask)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    label = np.zeros((h, w), dtype=np.int32)
    best, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if label[y0, x0]:
            continue
        current += 1
        label[y0, x0] = current
        queue, size = deque([(y0, x0)]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not label[ny, nx]:
                    label[ny, nx] = current
                    queue.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return label == best if best else np.zeros_like(mask)


def classify_image(image) -> tuple[str, str] | None:
    """(colour, shape) of the one shape in `image` (PIL image or uint8 array [H, W, 3]) by the pixel
    rule, or None when nothing coloured enough is drawn."""
    rgb = np.asarray(image, dtype=np.float64)[..., :3]
    mask = foreground_mask(rgb)
    if mask.sum() < MIN_FOREGROUND * mask.size:
        return None
    hue, _ = _hue_saturation(rgb[mask])  # [M]
    names = list(_REFERENCE_HUES)
    diff = np.abs(hue[:, None] - np.array([_REFERENCE_HUES[n] for n in names])[None]) % 360.0  # [M, 4]
    nearest = np.minimum(diff, 360.0 - diff).argmin(axis=1)  # each pixel's nearest reference hue
    colour = names[int(np.bincount(nearest, minlength=len(names)).argmax())]
    rows, cols = np.nonzero(mask)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    fill = mask.sum() / box
    shape = "triangle" if fill < TRIANGLE_MAX_FILL else "circle" if fill < CIRCLE_MAX_FILL else "square"
    return colour, shape


__all__ = ["COLOURS", "SHAPES", "QUESTION", "ShapeSpecs", "sample_specs", "render", "coverage", "blank",
           "caption", "qa_pairs", "all_classes", "classify_image", "foreground_mask", "to_pil"]
