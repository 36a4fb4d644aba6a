"""Next-token selection for chat: repetition penalty, temperature, top-k, top-p, greedy.

Same processors and order as transformers' `generate` (repetition penalty is a logits processor
applied before the temperature/top-k/top-p warpers), so greedy and seeded sampling agree with it.
"""

from __future__ import annotations

import torch

from ..params import SamplingParams


def apply_repetition_penalty(logits: torch.Tensor, seen_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on every token already in the prompt or output (HF semantics):
    positive logits are divided by `penalty`, negative ones multiplied.

    logits: [V] fp32; seen_ids: [N] int64 (duplicates allowed).
    """
    if penalty == 1.0 or seen_ids.numel() == 0:
        return logits
    picked = logits.gather(0, seen_ids)  # [N]
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits.scatter(0, seen_ids, picked)


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering as HF's TopPLogitsWarper: drop the low tail whose mass is <= 1 - top_p,
    always keeping the most likely token."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False)  # ascending, as HF
    cum = sorted_logits.softmax(-1).cumsum(-1)
    remove_sorted = cum <= (1 - top_p)
    remove_sorted[-1] = False
    remove = remove_sorted.scatter(0, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def select_next_token(logits: torch.Tensor, params: SamplingParams, seen_ids: torch.Tensor,
                      generator: torch.Generator | None) -> int:
    """Pick one token from `logits` [V] (any float dtype; processed in fp32)."""
    logits = apply_repetition_penalty(logits.float(), seen_ids, params.repetition_penalty)
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    logits = apply_top_p(apply_top_k(logits, params.top_k), params.top_p)
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
