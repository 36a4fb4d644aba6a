"""Text-to-image stage runners: one object per backend with the same three stage calls.

`ReferenceT2I` runs `runtime/reference.py` one request at a time. `OptimizedT2I` runs the stage-1
prefill through the paged AR engine when the Engine gives it a way to (`paged_prefill`: batched with
the chat requests in flight), else left-padded, one forward for all prompts; it runs the DiT loop
through `FlowSampler` (hoisted conditioning, one CUDA graph on GPU) and the decoder through
`PixelDecoder` (hoisted cross-attention K/V, compiled on GPU). The Engine owns seeds, noise, validation and caching; these
classes only compute.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..models.blip3o import Blip3oModel
from ..prompts import PreparedPrompt
from ..tokenization import SpecialTokens
from . import reference

StepCallback = Callable[[int, int], None]
# prompts -> query states [B, Q, H], or None when it cannot run now (then the left-padded prefill runs)
PagedPrefill = Callable[[list[PreparedPrompt]], torch.Tensor | None]


class ReferenceT2I:
    """One image at a time through the reference stages: every image's numbers are exactly what a
    batch-1 run gives, whatever batch it arrived in."""

    def __init__(self, model: Blip3oModel, special: SpecialTokens):
        self.model = model
        self.special = special

    def encode(self, prompts: list[PreparedPrompt]) -> torch.Tensor:
        """Stage-1 prefill for each prompt -> query states [B, Q, H]."""
        return torch.stack([reference.encode_t2i_prompt(self.model, p, self.special) for p in prompts])

    def sample(self, cond: torch.Tensor, noise: torch.Tensor, steps: int, guidance: float,
               callback: StepCallback | None = None) -> torch.Tensor:
        """cond [B, Q, H], noise [B, C, S, S] -> features [B, Q, C]."""
        return torch.cat([reference.sample_clip_features(self.model, cond[i:i + 1], noise[i:i + 1], steps, guidance,
                                                         _row_callback(callback, i, len(cond)))
                          for i in range(len(cond))])

    def decode(self, feats: torch.Tensor, uncond: torch.Tensor, noise: torch.Tensor, steps: int,
               guidance: float, callback: StepCallback | None = None) -> torch.Tensor:
        """feats, uncond [B, Q, C], noise [B, 4, h, w] -> uint8 [B, H, W, 3]."""
        return torch.cat([reference.decode_pixels(self.model, feats[i:i + 1], uncond[i:i + 1], noise[i:i + 1], steps,
                                                  guidance, _row_callback(callback, i, len(feats)))
                          for i in range(len(feats))])


def _row_callback(callback: StepCallback | None, row: int, rows: int) -> StepCallback | None:
    """Per-step progress for a row-by-row loop: report only the last row's steps, so a progress bar
    over the batch still counts `steps` ticks."""
    return callback if callback is not None and row == rows - 1 else None


class OptimizedT2I(ReferenceT2I):
    """Batched, hoisted and (on GPU) graph-captured / compiled stages; same contracts as the reference."""

    def __init__(self, model: Blip3oModel, special: SpecialTokens, compile: bool | None = None,
                 use_cuda_graph: bool | None = None, paged_prefill: PagedPrefill | None = None):
        from .flow_sampler import FlowSampler
        from .pixel_decoder import PixelDecoder

        super().__init__(model, special)
        self.paged_prefill = paged_prefill
        self.flow = FlowSampler(model.dit, model.device, model.dtype, use_cuda_graph=use_cuda_graph)
        self.pixels = PixelDecoder(model.unet, model.vae, model.cfg.vae.scaling_factor, model.cfg.decoder_scheduler,
                                   model.device, model.dtype, compile=compile, use_cuda_graph=use_cuda_graph)

    @torch.inference_mode()
    def encode(self, prompts: list[PreparedPrompt]) -> torch.Tensor:
        """Stage-1 prefill of every prompt (each + its 64 queries) -> [B, Q, H]: through `paged_prefill`
        when it runs, else one left-padded batch."""
        if self.paged_prefill is not None:
            states = self.paged_prefill(prompts)
            if states is not None:
                return states
        return self._encode_padded(prompts)

    def _encode_padded(self, prompts: list[PreparedPrompt]) -> torch.Tensor:
        """One left-padded prefill over all prompts (each + its 64 queries) -> [B, Q, H].

        Left padding keeps the queries at the same (last) positions in every row; each row's
        positions start at 0 at its first real token, and the mask hides the pads, so every row
        computes what its own unpadded prefill would (up to GEMM summation order).
        """
        model = self.model
        queries = model.queries.weight[0].to(model.dtype)  # [Q, H]
        rows = [torch.cat([reference.embed_prompt(model, p, self.special)[0][0], queries]) for p in prompts]
        longest = max(r.shape[0] for r in rows)
        embeds = rows[0].new_zeros(len(rows), longest, rows[0].shape[1])  # [B, L, H]
        mask = torch.zeros(len(rows), longest, dtype=torch.bool, device=model.device)  # [B, L] valid keys
        pos = torch.zeros(3, len(rows), longest, dtype=torch.long, device=model.device)  # [3, B, L]
        for i, row in enumerate(rows):
            n = row.shape[0]
            embeds[i, longest - n:] = row
            mask[i, longest - n:] = True
            pos[:, i, longest - n:] = torch.arange(n, device=model.device)  # 1-D RoPE (spec §1.3)
        hidden = model.text(embeds, pos, attention_mask=mask)  # [B, L, H]
        return hidden[:, -queries.shape[0]:]

    def sample(self, cond, noise, steps, guidance, callback=None):
        return self.flow.sample(cond, noise, steps, guidance, callback=callback)

    def decode(self, feats, uncond, noise, steps, guidance, callback=None):
        return self.pixels.decode(feats, uncond, noise, steps, guidance, callback=callback)
