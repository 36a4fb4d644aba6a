"""From user input to model input: message validation, image loading, chat and T2I prompts.

Chat uses the checkpoint's chat template (Qwen2-VL's) and expands each `<|image_pad|>` to one token
per merged ViT patch, as transformers' Qwen2_5_VLProcessor does. T2I uses the exact template of the
official inference script (docs/model_spec.md §1.2) followed by `[IMG]`; the 64 queries are added by the model.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from .errors import InputError
from .tokenization import SpecialTokens

# The official inference prompt (docs/model_spec.md §1.2, main:inference.py:86-91,112).
T2I_TEMPLATE = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                "Please generate image based on the following caption: {prompt}<|im_end|>\n<|im_start|>assistant\n")
# The null prompt of the decoder's CFG: stage 1 on the raw text " ", no template (docs/model_spec.md §1.6).
UNCOND_T2I_TEXT = " "
# Image-conditioned generation resizes the input to 448x448, aspect ignored (docs/model_spec.md §1.8).
T2I_IMAGE_SIZE = 448
_ROLES = ("system", "user", "assistant")


@dataclass
class PreparedPrompt:
    """Token ids plus the processed images whose features fill the `<|image_pad|>` positions."""

    token_ids: list[int]
    pixel_values: torch.Tensor | None = None  # [N_patches, C*T*P*P] as the image processor emits
    image_grid_thw: list[tuple[int, int, int]] = field(default_factory=list)
    use_mrope: bool = True  # chat: 3-D M-RoPE for image tokens; T2I: sequential 1-D (docs/model_spec.md §1.8)


def load_image(image: Any) -> Image.Image:
    """PIL image | path | bytes -> RGB PIL image, or InputError saying what was wrong."""
    try:
        if isinstance(image, Image.Image):
            img = image
        elif isinstance(image, (str, Path)):
            if not Path(image).is_file():
                raise InputError(f"image file {image} does not exist")
            img = Image.open(image)
        elif isinstance(image, (bytes, bytearray, memoryview)):
            img = Image.open(io.BytesIO(bytes(image)))
        else:
            raise InputError(f"unsupported image type {type(image).__name__}; pass a PIL image, a path or bytes")
        img.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"cannot decode image: {e}") from e
    if img.width < 1 or img.height < 1:
        raise InputError("image has zero size")
    return img.convert("RGB")


def normalize_messages(messages: Any) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """Validate chat messages; return template-ready messages and the images in order of appearance."""
    if not isinstance(messages, list) or not messages:
        raise InputError("messages must be a non-empty list of {'role', 'content'} dicts")
    out, images = [], []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise InputError(f"messages[{i}] must be a dict with 'role' and 'content'")
        if msg["role"] not in _ROLES:
            raise InputError(f"messages[{i}].role must be one of {_ROLES}, got {msg['role']!r}")
        content = msg["content"]
        if isinstance(content, str):
            out.append({"role": msg["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise InputError(f"messages[{i}].content must be a string or a list of items")
        items = []
        for j, item in enumerate(content):
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "text" and isinstance(item.get("text"), str):
                items.append({"type": "text", "text": item["text"]})
            elif kind in ("image", "image_url") or (isinstance(item, dict) and "image" in item):
                images.append(load_image(item.get("image", item.get("image_url"))))
                items.append({"type": "image"})
            else:
                raise InputError(f"messages[{i}].content[{j}] must be {{'type': 'text', 'text': str}} "
                                 f"or {{'type': 'image', 'image': PIL | path | bytes}}")
        out.append({"role": msg["role"], "content": items})
    return out, images


def expand_image_pads(token_ids: list[int], grids: list[tuple[int, int, int]], image_pad: int,
                      merge: int) -> list[int]:
    """Replace the i-th `<|image_pad|>` by t*h*w/merge² copies (one per LLM image token)."""
    out, k = [], 0
    for tok in token_ids:
        if tok != image_pad:
            out.append(tok)
            continue
        if k >= len(grids):
            raise InputError("more image placeholders in the prompt than images")
        t, h, w = grids[k]
        out.extend([image_pad] * (t * h * w // merge**2))
        k += 1
    if k != len(grids):
        raise InputError(f"{len(grids)} images but {k} image placeholders in the prompt")
    return out


class PromptBuilder:
    """Turns chat messages / T2I prompts into `PreparedPrompt`s for one checkpoint."""

    def __init__(self, tokenizer: Any, image_processor: Any, special: SpecialTokens, merge_size: int):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.special = special
        self.merge = merge_size

    def _tokenize(self, text: str) -> list[int]:
        # verbose=False: no "indexing errors" warning for a text past the tokenizer's model_max_length;
        # the Engine checks every prompt against the model's context and raises InputError instead.
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def _process_images(self, images: list[Image.Image]) -> tuple[torch.Tensor | None, list[tuple[int, int, int]]]:
        if not images:
            return None, []
        out = self.image_processor(images=images, return_tensors="pt")
        grids = [tuple(int(x) for x in g) for g in out["image_grid_thw"].tolist()]
        return torch.as_tensor(out["pixel_values"]), grids

    def chat(self, messages: Any) -> PreparedPrompt:
        msgs, images = normalize_messages(messages)
        if msgs[-1]["role"] == "assistant":
            raise InputError("the last message must not be from the assistant (nothing to answer)")
        text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = self._tokenize(text)
        pixel_values, grids = self._process_images(images)
        ids = expand_image_pads(ids, grids, self.special.image_pad, self.merge)
        return PreparedPrompt(ids, pixel_values, grids, use_mrope=True)

    def t2i(self, prompt: str, image: Any | None = None) -> PreparedPrompt:
        """The stage-1 prompt: templated caption (+ optional image) then `[IMG]`.

        With an image (docs/model_spec.md §1.8) the official pipeline swaps a caller-placed `<image>` for
        `<|vision_start|>` + pads + `<|vision_end|>`; we place it at the start of the user turn,
        as Qwen's template places images before text.
        """
        if not isinstance(prompt, str):
            raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
        text = T2I_TEMPLATE.format(prompt=prompt)
        pixel_values, grids = None, []
        if image is not None:
            img = load_image(image).resize((T2I_IMAGE_SIZE, T2I_IMAGE_SIZE), Image.BICUBIC)
            pixel_values, grids = self._process_images([img])
            text = text.replace("<|im_start|>user\n", "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>", 1)
        ids = expand_image_pads(self._tokenize(text), grids, self.special.image_pad, self.merge)
        return PreparedPrompt(ids + [self.special.img_start], pixel_values, grids, use_mrope=False)

    def t2i_uncond(self) -> PreparedPrompt:
        ids = self.tokenizer(UNCOND_T2I_TEXT, add_special_tokens=False)["input_ids"]
        return PreparedPrompt(ids + [self.special.img_start], use_mrope=False)
