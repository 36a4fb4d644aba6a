"""Stage (c), generation — BLIP3-o's sequential step: the LLM is frozen; the 64 latent queries and
the DiT learn, with the flow-matching loss, to produce the CLIP features of captioned images.

The query states are what the inference prefill gives (templated caption, `[IMG]`, then the
queries; 1-D positions; the post-norm hidden states of the query positions), for all captions in one
left-padded batch as the optimized backend computes them. The DiT loss is what `sampling/flow_match.py`
integrates: x_t = (1 − σ)·x0 + σ·noise, target velocity noise − x0, timestep 1000·σ; 10% of captions
are dropped to zeros, which is what makes the zero-null CFG of inference work. The decoder's null
prompt " " is trained too, towards the features of an empty picture (the UNet's dropped condition).
"""

from __future__ import annotations

import torch

from ..models.blip3o import Blip3oModel
from ..prompts import PreparedPrompt, PromptBuilder
from . import shapes
from .common import EMA, LossLog, Optimizer, progress_bar
from .decoder import EncodedShapes

STAGE = "c_generation"
CAPTION_DROPOUT = 0.1  # captions replaced by zeros: the unconditional branch of the DiT's CFG
UNCOND_PROMPT_SHARE = 0.05  # samples that train the null prompt " " -> empty-picture features


def caption_prompts(prompts: PromptBuilder) -> list[PreparedPrompt]:
    """The stage-1 prompts of every caption (in `shapes.all_classes()` order), then the null prompt."""
    return [prompts.t2i(shapes.caption(c, s)) for c, s in shapes.all_classes()] + [prompts.t2i_uncond()]


class QueryEncoder:
    """Post-norm hidden states of the 64 queries after each prompt, [P, Q, H], differentiable in the
    queries (the LLM's own weights are frozen).

    The prompts' tokens never change and the LLM is frozen, so their keys/values are computed once
    (left-padded: each row's positions start at 0 at its first token, the mask hides the pads) and
    every step runs the LLM on the 64 query positions only, attending to that cache: the same
    numbers as one prefill over prompt + queries (up to summation order), at a fraction of the cost.
    """

    def __init__(self, model: Blip3oModel, prompts: list[PreparedPrompt]) -> None:
        self.model = model
        longest = max(len(p.token_ids) for p in prompts)
        pads = [longest - len(p.token_ids) for p in prompts]
        ids = torch.tensor([[0] * pad + p.token_ids for pad, p in zip(pads, prompts)])  # [P, Lp]
        self.prefix_mask = torch.arange(longest)[None] >= torch.tensor(pads)[:, None]  # [P, Lp]
        self.lengths = torch.tensor([len(p.token_ids) for p in prompts])  # [P]
        pos = (torch.arange(longest)[None] - torch.tensor(pads)[:, None]).clamp(min=0)  # [P, Lp]
        cache = model.text.new_cache()
        with torch.no_grad():
            model.text(model.text.embed(ids), pos[None].expand(3, -1, -1), cache, attention_mask=self.prefix_mask)
        self.keys, self.values = list(cache.keys), list(cache.values)  # per layer [P, kv, Lp, hd]

    def __call__(self) -> torch.Tensor:
        text = self.model.text
        queries = self.model.queries.weight[0]  # [Q, H]
        n, q = self.lengths.shape[0], queries.shape[0]
        cache = text.new_cache()
        cache.keys, cache.values = list(self.keys), list(self.values)  # `append` rebinds, never mutates
        pos = self.lengths[:, None] + torch.arange(q)[None]  # [P, Q]: right after each prompt
        mask = torch.cat([self.prefix_mask, torch.ones(n, q, dtype=torch.bool)], dim=1)  # [P, Lp + Q]
        return text(queries.expand(n, -1, -1), pos[None].expand(3, -1, -1), cache, attention_mask=mask)


def train_generation(model: Blip3oModel, prompts: PromptBuilder, data: EncodedShapes, steps: int,
                     batch_size: int, lr: float, ema_decay: float, generator: torch.Generator, log: LossLog,
                     progress: bool = True) -> None:
    """Train `model.queries` and `model.dit` (in place; they end holding their EMA weights)."""
    model.text.requires_grad_(False)
    model.visual.requires_grad_(False)
    trained = torch.nn.ModuleDict({"queries": model.queries, "dit": model.dit})
    optimizer = Optimizer(trained.parameters(), lr, steps, clip_norm=1.0)
    ema = EMA(trained, ema_decay)
    all_prompts = caption_prompts(prompts)
    encode = QueryEncoder(model, all_prompts)
    null_class = len(all_prompts) - 1
    side = model.cfg.dit.input_size
    trained.train()
    with progress_bar(steps, "(c) generation: queries + DiT", progress) as bar:
        for step in range(steps):
            idx = torch.randint(len(data), (batch_size,), generator=generator)
            classes = data.classes[idx]
            x0 = data.features[idx]  # [B, 64, C]
            to_null = torch.rand(batch_size, generator=generator) < UNCOND_PROMPT_SHARE
            classes = torch.where(to_null, null_class, classes)
            x0 = torch.where(to_null[:, None, None], data.null_features.expand_as(x0), x0)
            x0 = x0.transpose(1, 2).reshape(batch_size, -1, side, side)  # [B, C, S, S], token n = cell n

            caption = encode()[classes]  # [B, Q, H]
            drop = torch.rand(batch_size, generator=generator) < CAPTION_DROPOUT
            caption = torch.where(drop[:, None, None], torch.zeros_like(caption), caption)

            sigma = torch.rand(batch_size, generator=generator)
            noise = torch.randn(x0.shape, generator=generator)
            s = sigma[:, None, None, None]
            x_t = (1 - s) * x0 + s * noise
            velocity = model.dit(x_t, sigma * 1000, caption)
            loss = (velocity - (noise - x0)).pow(2).mean()
            optimizer.step(loss)
            ema.update(trained, step)
            log.add(STAGE, step, flow_mse=loss.item())
            bar.set_postfix(mse=f"{log.final(STAGE, 'flow_mse', 50):.4f}", refresh=False)
            bar.update(1)
    ema.copy_to(trained)
    trained.eval().requires_grad_(False)
