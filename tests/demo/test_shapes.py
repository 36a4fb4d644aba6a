"""The demo's synthetic data set and the pixel rule that judges generated images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blip3o_engine.train import shapes


def _specs(n: int, seed: int = 0, **kw) -> shapes.ShapeSpecs:
    return shapes.sample_specs(n, torch.Generator().manual_seed(seed), **kw)


def test_captions_and_questions():
    assert shapes.caption("red", "circle") == "a red circle"
    assert len(shapes.all_classes()) == len(shapes.COLOURS) * len(shapes.SHAPES) == 12
    pairs = shapes.qa_pairs("blue", "triangle")
    assert pairs[0] == ("What is in this picture?", "a blue triangle")
    assert {q for q, _ in pairs} == {"What is in this picture?", "What colour is the shape?", "What shape is it?"}


def test_specs_are_seeded_and_inside_the_image():
    a, b = _specs(500, seed=3), _specs(500, seed=3)
    assert torch.equal(a.center, b.center) and torch.equal(a.colour, b.colour)
    assert not torch.equal(_specs(500, seed=4).center, a.center)
    half = a.size / 2
    assert (a.center - half[:, None] >= 0).all() and (a.center + half[:, None] <= shapes.IMAGE_SIZE).all()
    assert a.size.min() >= 20 and a.size.max() <= 44
    # every class occurs (uniform over 12)
    assert len(set(a.labels())) == 12


def test_render_draws_the_shape_in_its_colour_on_white():
    specs = shapes.ShapeSpecs(colour=torch.tensor([0, 3]), shape=torch.tensor([1, 0]),
                              center=torch.tensor([[32.0, 32.0], [20.0, 40.0]]), size=torch.tensor([20.0, 30.0]))
    images = shapes.render(specs)
    assert images.shape == (2, 64, 64, 3) and images.dtype == torch.uint8
    assert images[0, 32, 32].tolist() == list(shapes.COLOURS["red"])  # inside the square
    assert images[0, 0, 0].tolist() == [255, 255, 255]  # background
    assert images[1, 40, 20].tolist() == list(shapes.COLOURS["yellow"])  # centre of the circle
    # the square covers exactly its 20x20 pixels (edges on pixel boundaries)
    cov = shapes.coverage(specs)[0]
    assert cov.sum().item() == pytest.approx(400, abs=1e-3)
    # a circle's coverage is its area up to anti-aliasing
    assert shapes.coverage(specs)[1].sum().item() == pytest.approx(np.pi * 15**2, rel=0.01)


@pytest.mark.parametrize("kind, area", [(0, np.pi / 4), (1, 1.0), (2, 0.5)])
def test_coverage_is_the_shapes_area(kind, area):
    n = 64
    specs = _specs(n, seed=kind, shape=torch.full((n,), kind))
    measured = shapes.coverage(specs).sum(dim=(1, 2)) / specs.size**2
    assert measured.numpy() == pytest.approx(np.full(n, area), rel=0.03)


def test_classifier_is_right_on_rendered_images():
    """The pixel rule must be (essentially) always right on ground truth, or it cannot judge a model."""
    specs = _specs(360, seed=7)
    images = shapes.render(specs)
    predicted = [shapes.classify_image(img.numpy()) for img in images]
    assert predicted == specs.labels()


def test_classifier_reads_pil_images_and_tolerates_specks():
    specs = _specs(12, seed=1, colour=torch.arange(12) % 4, shape=torch.arange(12) % 3)
    images = shapes.render(specs).numpy().copy()
    images[:, 1, 1] = shapes.COLOURS["blue"]  # a stray pixel away from the shape
    for img, label in zip(shapes.to_pil(torch.from_numpy(images)), specs.labels()):
        assert shapes.classify_image(img) == label


def test_classifier_sees_nothing_in_a_blank_image_and_judges_the_shape_not_the_label():
    assert shapes.classify_image(shapes.blank(1)[0].numpy()) is None
    noise = np.random.default_rng(0).integers(240, 256, (64, 64, 3)).astype(np.uint8)  # near-white noise
    assert shapes.classify_image(noise) is None
    # A red disk drawn by hand is a red circle; a green filled box is a green square.
    yy, xx = np.mgrid[0:64, 0:64]
    img = np.full((64, 64, 3), 255, np.uint8)
    img[(yy - 30) ** 2 + (xx - 25) ** 2 <= 14**2] = (200, 20, 20)
    assert shapes.classify_image(img) == ("red", "circle")
    img = np.full((64, 64, 3), 255, np.uint8)
    img[10:40, 20:50] = (20, 150, 40)
    assert shapes.classify_image(img) == ("green", "square")
