"""The reference backend: every stage of BLIP3-o in plain PyTorch, one request at a time.

No kernels, no graphs, no paging, no caching tricks beyond what the official code does. This is
the oracle every optimized path is tested against, so it favours being obviously right over fast:
every model call here runs under `ops.reference_ops()` (the torch twins, no fused projections), even
when the weights are shared with an optimized engine or live on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from ..models.blip3o import Blip3oModel
from ..ops.dispatch import reference_ops
from ..models.qwen2_5_vl import get_mrope_positions
from ..models.unet import sdxl_time_ids
from ..params import SamplingParams
from ..prompts import PreparedPrompt
from ..sampling.euler_discrete import euler_discrete_schedule, sample_euler
from ..sampling.flow_match import sample_flow
from ..sampling.text import select_next_token
from ..tokenization import SpecialTokens

StepCallback = Callable[[int, int], None]  # (step index, number of steps)


def embed_prompt(model: Blip3oModel, prompt: PreparedPrompt, special: SpecialTokens
                 ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Token embeddings with ViT features scattered into the `<|image_pad|>` slots.

    Returns embeds [1, L, H], position ids [3, 1, L] and the M-RoPE delta for later decode positions.
    """
    device = model.device
    ids = torch.tensor(prompt.token_ids, device=device)[None]  # [1, L]
    embeds = model.text.embed(ids)  # [1, L, H]
    if prompt.pixel_values is not None:
        grid = torch.tensor(prompt.image_grid_thw, device=device)
        feats = model.visual(prompt.pixel_values.to(device=device, dtype=model.dtype), grid)  # [N_img_tok, H]
        slots = ids[0] == special.image_pad
        if int(slots.sum()) != feats.shape[0]:
            raise AssertionError(f"{int(slots.sum())} image slots but {feats.shape[0]} image features")
        embeds[0, slots] = feats.to(embeds.dtype)
    if prompt.use_mrope:
        pos, delta = get_mrope_positions(prompt.token_ids, prompt.image_grid_thw, special.image_pad,
                                         model.cfg.vision.spatial_merge_size)
        pos = pos.to(device)
    else:  # T2I: the official code passes no position ids -> 0..L-1 on all three axes (docs/model_spec.md §1.3)
        pos, delta = torch.arange(len(prompt.token_ids), device=device).expand(3, -1), 0
    return embeds, pos[:, None, :], delta


# ------------------------------------------------------------------------------------------------
# Chat


def stop_token_ids(params: SamplingParams, special: SpecialTokens) -> set[int]:
    ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        ids |= {special.im_end, special.endoftext}
    return ids


def find_stop_string(text: str, stops: tuple[str, ...]) -> int:
    """Index where the earliest stop string starts in `text`, or -1."""
    hits = [text.find(s) for s in stops]
    hits = [h for h in hits if h >= 0]
    return min(hits) if hits else -1


def sample_tokens(model: Blip3oModel, prompt: PreparedPrompt, params: SamplingParams, special: SpecialTokens
                  ) -> Iterator[int]:
    """Prefill + token-by-token decode with a contiguous KV cache: yields each sampled token, up to
    max_tokens, ending after a stop token. The consumer stops it early for a stop string."""
    with torch.inference_mode(), reference_ops():
        embeds, pos, delta = embed_prompt(model, prompt, special)
        cache = model.text.new_cache()
        hidden = model.text(embeds, pos, cache)  # [1, L, H]
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=model.device).manual_seed(params.seed)
        seen = torch.tensor(prompt.token_ids, device=model.device, dtype=torch.long)
    stops = stop_token_ids(params, special)
    for step in range(params.max_tokens):
        with torch.inference_mode(), reference_ops():  # not held across the yield (the consumer's code)
            logits = model.text.compute_logits(hidden[0, -1])  # [V]
            token = select_next_token(logits, params, seen, generator)
        yield token
        if token in stops or step + 1 == params.max_tokens:
            return
        with torch.inference_mode(), reference_ops():
            seen = torch.cat([seen, seen.new_tensor([token])])
            position = len(prompt.token_ids) + step + delta
            pos = torch.full((3, 1, 1), position, device=model.device)
            hidden = model.text(model.text.embed(seen[-1:][None]), pos, cache)


def stream_text(model: Blip3oModel, prompt: PreparedPrompt, params: SamplingParams, tokenizer,
                special: SpecialTokens, deltas: bool = True) -> Iterator[tuple[str, str, list[int], str | None]]:
    """Yields (text delta, text so far, ids so far, finish reason or None) after every sampled token; the
    deltas concatenate to the final text. The text is the full decode of the ids at each step (slow, and
    obviously right), minus what may still change: a trailing incomplete character and, with stop
    strings, the last len(longest stop) - 1 characters. Finishing: a stop token ends with "stop" (kept in
    the ids, not the text); a stop string ends with "stop", the text cut before it; else "length".
    deltas=False (a caller that wants only the end): without stop strings nothing is decoded before the
    last token, whose yield alone carries the text."""
    stops = stop_token_ids(params, special)
    hold = max(map(len, params.stop), default=1) - 1
    out: list[int] = []
    emitted = ""
    for token in sample_tokens(model, prompt, params, special):
        out.append(token)
        finish = "stop" if token in stops else "length" if len(out) == params.max_tokens else None
        if finish is None and not deltas and not params.stop:
            yield "", emitted, list(out), None  # nothing to look for in the text until the end
            continue
        text = tokenizer.decode(out[:-1] if token in stops else out, skip_special_tokens=params.skip_special_tokens)
        cut = find_stop_string(text, params.stop) if params.stop and token not in stops else -1
        if cut >= 0:
            text, finish = text[:cut], "stop"
        elif finish is None:  # hold back what a later token may still change
            text = text.rstrip("\ufffd")
            text = text[:max(len(text) - hold, len(emitted))]
        yield text[len(emitted):], text, list(out), finish
        emitted = text
        if finish is not None:
            return


def generate_text(model: Blip3oModel, prompt: PreparedPrompt, params: SamplingParams, tokenizer,
                  special: SpecialTokens) -> tuple[list[int], str, str]:
    """The whole answer: (ids, text, finish_reason), as `stream_text` finishes it."""
    text, ids, finish = "", [], "length"
    for _, text, ids, finish in stream_text(model, prompt, params, tokenizer, special, deltas=False):
        pass
    return ids, text, finish


# ------------------------------------------------------------------------------------------------
# Text-to-image, stage 1: prompt -> 64 query hidden states -> CLIP features


@torch.inference_mode()
@reference_ops()
def encode_t2i_prompt(model: Blip3oModel, prompt: PreparedPrompt, special: SpecialTokens) -> torch.Tensor:
    """One prefill over prompt + [IMG] + queries; post-final-norm hidden states of the queries [Q, H]."""
    embeds, _, _ = embed_prompt(model, prompt, special)  # [1, L, H]
    queries = model.queries.weight.to(embeds.dtype)  # [1, Q, H]
    embeds = torch.cat([embeds, queries], dim=1)  # [1, L + Q, H]
    pos = torch.arange(embeds.shape[1], device=model.device).expand(3, 1, -1)  # 1-D RoPE (docs/model_spec.md §1.3)
    hidden = model.text(embeds, pos)  # [1, L + Q, H]
    return hidden[0, -queries.shape[1]:]  # [Q, H]


def dit_model_fn(model: Blip3oModel, cond: torch.Tensor, guidance: float) -> Callable:
    """The DiT closure of the flow loop: velocities of `x_in` for the caption batch `[zeros, C]` (CFG,
    uncond first, docs/model_spec.md §1.5) or `C`. cond [B, Q, H] query states."""
    cond = cond.to(model.dtype)
    caption = torch.cat([torch.zeros_like(cond), cond]) if guidance > 1.0 else cond  # [2B or B, Q, H]
    return lambda x, t: model.dit(x, t, caption)


def clip_tokens(x0: torch.Tensor) -> torch.Tensor:
    """The DiT's final latent `[B, C, S, S]` -> CLIP features `[B, S·S, C]` (row-major grid, docs/model_spec.md §1.5)."""
    b, c = x0.shape[:2]
    return x0.reshape(b, c, -1).permute(0, 2, 1)


@torch.inference_mode()
@reference_ops()
def sample_clip_features(model: Blip3oModel, cond: torch.Tensor, noise: torch.Tensor, steps: int,
                         guidance: float, callback: StepCallback | None = None) -> torch.Tensor:
    """Flow-matching Euler over the DiT with zero-null CFG (uncond first, docs/model_spec.md §1.5).

    cond [B, Q, H] query states; noise [B, C, S, S] standard normal. Returns features [B, Q, C].
    """
    x0 = sample_flow(dit_model_fn(model, cond, guidance), noise.to(model.dtype), steps, guidance, callback=callback)
    return clip_tokens(x0)


# ------------------------------------------------------------------------------------------------
# Text-to-image, stage 2: CLIP features -> pixels


def unet_model_fn(model: Blip3oModel, feats: torch.Tensor, uncond: torch.Tensor, latent_hw: tuple[int, int],
                  guidance: float) -> Callable:
    """The UNet closure of the Euler loop: ε of `z_in` under the features `[cond, uncond]` (CFG, cond first,
    docs/model_spec.md §1.6) or the features alone. feats, uncond [B, Q, C]."""
    embeds = feats.to(model.dtype)
    if guidance > 1.0:
        embeds = torch.cat([embeds, uncond.to(model.dtype)])  # [2B, Q, C], cond first
    pooled = embeds.mean(dim=1)  # [2B or B, C] SDXL "text_embeds" = mean over tokens
    scale = model.cfg.vae.scale_factor
    time_ids = sdxl_time_ids(latent_hw[0] * scale, latent_hw[1] * scale, embeds.shape[0], model.dtype, model.device)
    return lambda z, t: model.unet(z, t, encoder_hidden_states=embeds, text_embeds=pooled, time_ids=time_ids)


def latents_to_uint8(model: Blip3oModel, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode of sampler latents [B, 4, h, w] -> uint8 images [B, H, W, 3]."""
    images = model.vae(latents / model.cfg.vae.scaling_factor)  # [B, 3, H, W] in [-1, 1]
    return model.vae.to_uint8(images)


@torch.inference_mode()
@reference_ops()
def decode_pixels(model: Blip3oModel, feats: torch.Tensor, uncond: torch.Tensor, noise: torch.Tensor,
                  steps: int, guidance: float, callback: StepCallback | None = None) -> torch.Tensor:
    """SDXL-type UNet loop (EulerDiscrete, CFG cond-first, docs/model_spec.md §1.6) then VAE decode.

    feats [B, Q, C]; uncond [B, Q, C]; noise [B, 4, h, w] standard normal (unscaled).
    Returns uint8 images [B, H, W, 3].
    """
    epsilon = unet_model_fn(model, feats, uncond, tuple(noise.shape[-2:]), guidance)
    schedule = euler_discrete_schedule(model.cfg.decoder_scheduler, steps, device=model.device)
    latents = sample_euler(epsilon, noise.to(model.dtype), schedule, guidance, callback=callback)
    return latents_to_uint8(model, latents)
