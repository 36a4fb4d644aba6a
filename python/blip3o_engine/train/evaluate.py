"""How well a demo engine does what it was trained for, by the pixel rule of `shapes.classify_image`:
text-to-image ("a {colour} {shape}" -> is that what is drawn?) and chat ("What is in this picture?"
about rendered shapes -> does the answer name the colour and the shape?)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..params import ImageParams, SamplingParams
from . import shapes


@dataclass
class T2IResult:
    prompts: list[str]
    seeds: list[int]  # of each image
    images: list  # PIL images, prompt-major (all rounds of prompt 0, then prompt 1, ...)
    predicted: list[tuple[str, str] | None]
    expected: list[tuple[str, str]]

    @property
    def match_rate(self) -> float:
        return sum(p == e for p, e in zip(self.predicted, self.expected)) / len(self.expected)

    def per_prompt(self) -> dict[str, float]:
        n = len(self.images) // len(self.prompts)
        return {prompt: sum(self.predicted[i * n + k] == self.expected[i * n + k] for k in range(n)) / n
                for i, prompt in enumerate(self.prompts)}


def evaluate_t2i(engine, rounds: int = 4, params: ImageParams | None = None, seed: int = 0) -> T2IResult:
    """Every "a {colour} {shape}" prompt `rounds` times, each round one batched `generate_images`
    call over all 12 prompts (prompt i of round k gets seed `seed + 1000·k + i`). `params` default
    to the official settings: 30 DiT steps, 50 decoder steps, CFG 3 and 3, the native size."""
    classes = shapes.all_classes()
    prompts = [shapes.caption(c, s) for c, s in classes]
    base = params or ImageParams()
    rounds_out = [engine.generate_images(prompts, dataclasses.replace(base, seed=seed + 1000 * k))
                  for k in range(rounds)]
    images = [rounds_out[k][i].image for i in range(len(prompts)) for k in range(rounds)]
    seeds = [rounds_out[k][i].seed for i in range(len(prompts)) for k in range(rounds)]
    expected = [cls for cls in classes for _ in range(rounds)]
    return T2IResult(prompts, seeds, images, [shapes.classify_image(im) for im in images], expected)


@dataclass
class ChatResultSet:
    answers: list[str]
    expected: list[tuple[str, str]]
    correct: list[bool] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)


def answer_names(answer: str, colour: str, shape: str) -> bool:
    """True when the answer names this colour and this shape and no other colour or shape."""
    words = set(answer.lower().replace(".", " ").replace(",", " ").split())
    colours = words & set(shapes.COLOURS)
    kinds = words & set(shapes.SHAPES)
    return colours == {colour} and kinds == {shape}


def evaluate_chat(engine, n: int = 48, seed: int = 1234, max_tokens: int = 16) -> ChatResultSet:
    """Ask "What is in this picture?" about `n` freshly rendered shapes (greedy), in one batch."""
    gen = torch.Generator().manual_seed(seed)
    specs = shapes.sample_specs(n, gen)
    images = shapes.to_pil(shapes.render(specs))
    conversations = [[{"role": "user", "content": [{"type": "image", "image": im},
                                                   {"type": "text", "text": shapes.QUESTION}]}] for im in images]
    results = engine.chat_batch(conversations, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    answers = [r.text for r in results]
    labels = specs.labels()
    return ChatResultSet(answers, labels, [answer_names(a, c, s) for a, (c, s) in zip(answers, labels)])
