"""Stage (a), understanding: the ViT and the LLM learn to answer questions about shape images.

First the ViT alone is pre-trained CLIP-style against the 12 captions (`pretrain_vision`), then ViT
and LLM together learn the question/answer pairs (`train_understanding`). Every chat sample is built exactly as inference builds a chat prompt (`PromptBuilder.chat`: Qwen's chat
template, the image processor, one `<|image_pad|>` per merged patch, M-RoPE positions), followed by
the answer and `<|im_end|>`, where generation stops. The loss is next-token cross-entropy on the
answer and the `<|im_end|>` only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.blip3o import Blip3oModel
from ..models.qwen2_5_vl import get_mrope_positions
from ..prompts import PromptBuilder
from . import shapes
from .common import LossLog, Optimizer, progress_bar

STAGE = "a_understanding"
VISION_STAGE = "a_vision"
CLIP_TEMPERATURE = 0.1
# How often each question is asked: the chat test's question half of the time.
QUESTION_WEIGHTS = (0.5, 0.25, 0.25)


class ChatBatcher:
    """Builds padded training batches of (image, question, answer) in the inference prompt format."""

    def __init__(self, prompts: PromptBuilder, image_size: int = shapes.IMAGE_SIZE) -> None:
        self.prompts = prompts
        self.special = prompts.special
        self.image_size = image_size
        questions = [q for q, _ in shapes.qa_pairs(*shapes.all_classes()[0])]
        probe = shapes.to_pil(shapes.blank(1, image_size))[0]
        # Prompt ids per question, image pads expanded: the same for every image of this size.
        self.templates = [self._prompt(probe, q).token_ids for q in questions]
        self.grid = self._prompt(probe, questions[0]).image_grid_thw[0]

    def _prompt(self, image, question: str):
        return self.prompts.chat([{"role": "user", "content": [{"type": "image", "image": image},
                                                                {"type": "text", "text": question}]}])

    def images(self, n: int, generator: torch.Generator) -> tuple[shapes.ShapeSpecs, torch.Tensor, torch.Tensor]:
        """n random shapes through the image processor: specs, pixel_values [N, C*T*P*P], grids [n, 3]."""
        specs = shapes.sample_specs(n, generator, self.image_size)
        processed = self.prompts.image_processor(images=shapes.to_pil(shapes.render(specs, self.image_size)),
                                                 return_tensors="pt")
        return specs, torch.as_tensor(processed["pixel_values"]), torch.as_tensor(processed["image_grid_thw"])

    def batch(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        specs, pixel_values, grid = self.images(n, generator)
        which = torch.multinomial(torch.tensor(QUESTION_WEIGHTS), n, replacement=True, generator=generator)
        rows, targets = [], []
        for (colour, shape), q in zip(specs.labels(), which.tolist()):
            answer = shapes.qa_pairs(colour, shape)[q][1]
            answer_ids = self.prompts.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.special.im_end]
            rows.append(self.templates[q] + answer_ids)
            targets.append(len(self.templates[q]))  # index of the first answer token
        return {**self._pad(rows, targets), "pixel_values": pixel_values, "grid": grid}

    def _pad(self, rows: list[list[int]], starts: list[int]) -> dict[str, torch.Tensor]:
        longest = max(map(len, rows))
        ids = torch.full((len(rows), longest), self.special.endoftext, dtype=torch.long)  # [B, L]
        labels = torch.full((len(rows), longest), -100, dtype=torch.long)  # [B, L], -100 = no loss
        pos = torch.zeros(3, len(rows), longest, dtype=torch.long)  # [3, B, L]
        for i, (row, start) in enumerate(zip(rows, starts)):
            ids[i, :len(row)] = torch.tensor(row)
            labels[i, start:len(row)] = torch.tensor(row[start:])
            # Right padding: causal attention never lets a real token see the pads after it.
            pos[:, i, :len(row)] = get_mrope_positions(row, [self.grid], self.special.image_pad,
                                                       self.prompts.merge)[0]
        return {"ids": ids, "labels": labels, "pos": pos}


def pretrain_vision(model: Blip3oModel, prompts: PromptBuilder, steps: int, batch_size: int, lr: float,
                    generator: torch.Generator, log: LossLog, progress: bool = True) -> None:
    """CLIP-style pre-training of the ViT alone: its mean-pooled image tokens are matched against a
    learned embedding of each of the 12 captions (cosine similarity, cross-entropy over captions).

    Qwen2.5-VL's ViT starts from such a pre-training too. From scratch, the question/answer loss alone
    reaches the ViT only through the LLM and teaches it colour long before shape; matched against
    the captions first, it sees shapes within a few hundred steps.
    """
    batcher = ChatBatcher(prompts)
    captions = torch.nn.Embedding(len(shapes.all_classes()), model.cfg.vision.out_hidden_size)
    params = [*model.visual.parameters(), *captions.parameters()]
    optimizer = Optimizer(params, lr, steps)
    with progress_bar(steps, "(a) ViT pre-training", progress) as bar:
        for step in range(steps):
            specs, pixel_values, grid = batcher.images(batch_size, generator)
            tokens = model.visual(pixel_values, grid).view(batch_size, -1, captions.embedding_dim)  # [B, 4, H]
            pooled = F.normalize(tokens.mean(dim=1), dim=-1)
            logits = pooled @ F.normalize(captions.weight, dim=-1).T / CLIP_TEMPERATURE  # [B, 12]
            loss = F.cross_entropy(logits, specs.colour * len(shapes.SHAPES) + specs.shape)
            optimizer.step(loss)
            log.add(VISION_STAGE, step, clip=loss.item())
            bar.set_postfix(clip=f"{log.final(VISION_STAGE, 'clip', 20):.3f}", refresh=False)
            bar.update(1)
    for p in model.visual.parameters():
        p.requires_grad_(False)


def chat_loss(model: Blip3oModel, batch: dict[str, torch.Tensor], image_pad: int) -> torch.Tensor:
    """Next-token cross-entropy over the answer tokens of a batch from `ChatBatcher`."""
    ids = batch["ids"]
    embeds = model.text.embed(ids)  # [B, L, H]
    feats = model.visual(batch["pixel_values"], batch["grid"])  # [B * tokens per image, H]
    embeds = embeds.masked_scatter((ids == image_pad)[..., None], feats.to(embeds.dtype))
    hidden = model.text(embeds, batch["pos"])  # [B, L, H]
    logits = model.text.compute_logits(hidden[:, :-1])  # [B, L-1, V]
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100)


def train_understanding(model: Blip3oModel, prompts: PromptBuilder, steps: int, batch_size: int, lr: float,
                        generator: torch.Generator, log: LossLog, progress: bool = True) -> None:
    """Train `model.visual` and `model.text` on shape Q&A for `steps` steps (in place)."""
    batcher = ChatBatcher(prompts)
    params = [*model.visual.parameters(), *model.text.parameters()]
    optimizer = Optimizer(params, lr, steps, weight_decay=0.01, clip_norm=1.0)
    model.train()
    with progress_bar(steps, "(a) understanding: ViT + LLM", progress) as bar:
        for step in range(steps):
            loss = chat_loss(model, batcher.batch(batch_size, generator), prompts.special.image_pad)
            optimizer.step(loss)
            log.add(STAGE, step, chat_ce=loss.item())
            bar.set_postfix(ce=f"{log.final(STAGE, 'chat_ce', 20):.4f}", refresh=False)
            bar.update(1)
    model.eval()
    for p in params:
        p.requires_grad_(False)
