"""Tokenizer and image processor: loading from a checkpoint, special-token ids, and the tiny tokenizer.

The tokenizer and the Qwen2-VL image processor come from transformers (the well-kept implementation
of both); this module only finds them in a checkpoint directory, looks the special tokens up by
their text (never by hard-coded id: the Qwen3 branch moves them, docs/model_spec.md §6), and builds the small
byte-level BPE tokenizer the `tiny` checkpoint ships.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CheckpointError, CheckpointNotFoundError

# Qwen2-VL / Qwen2.5-VL chat template (chat_template.json of the Instruct models): a default system
# prompt, ChatML turns, and <|vision_start|><|image_pad|><|vision_end|> for every image item.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2.5's special tokens in their published id order (151643...), then the three BLIP3-o adds
# at training time (docs/model_spec.md §1.2). The tiny tokenizer appends them after its BPE vocabulary in the
# same order, so relative layout matches the real checkpoints.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
QWEN_ADDED_NON_SPECIAL = ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                          "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
BLIP3O_TOKENS = ("[IMG]", "[/IMG]", "<image>")

QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the tokens the engine must know, looked up from the tokenizer (and checked against
    config.json where it names them)."""

    img_start: int  # "[IMG]": appended after a T2I prompt, before the 64 queries (docs/model_spec.md §1.2)
    image_pad: int  # "<|image_pad|>": one per merged ViT patch
    vision_start: int
    vision_end: int
    im_start: int
    im_end: int
    endoftext: int

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, hf_config: dict[str, Any] | None = None,
                       require_generation: bool = True) -> SpecialTokens:
        def tid(text: str, required: bool = True) -> int:
            idx = tokenizer.convert_tokens_to_ids(text)
            if idx is None or idx == tokenizer.unk_token_id and text != tokenizer.unk_token:
                if required:
                    raise CheckpointError(f"tokenizer has no special token {text!r}")
                return -1
            return int(idx)

        ids = cls(img_start=tid("[IMG]", require_generation), image_pad=tid("<|image_pad|>"),
                  vision_start=tid("<|vision_start|>"), vision_end=tid("<|vision_end|>"),
                  im_start=tid("<|im_start|>"), im_end=tid("<|im_end|>"), endoftext=tid("<|endoftext|>"))
        for key, value in (("image_token_id", ids.image_pad), ("vision_start_token_id", ids.vision_start),
                           ("vision_end_token_id", ids.vision_end)):
            if hf_config and key in hf_config and int(hf_config[key]) != value:
                raise CheckpointError(f"config.json {key}={hf_config[key]} but the tokenizer says {value}")
        return ids


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' warnings for a block (restoring the user's verbosity after)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer through transformers (no remote code, files on disk only)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not any((path / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        raise CheckpointNotFoundError(f"no tokenizer files (tokenizer.json / vocab.json) in {path}")
    try:
        with quiet_transformers():  # it reads config.json too and warns about BLIP3-o's model_type
            tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    except Exception as e:  # transformers raises a zoo of types here; give one typed error
        raise CheckpointError(f"cannot load the tokenizer from {path}: {e}") from e
    if tok.chat_template is None:
        # Released BLIP3-o checkpoints are Trainer outputs and may lack a template; chat uses Qwen's.
        tok.chat_template = QWEN2_VL_CHAT_TEMPLATE
    return tok


def load_image_processor(path: str | Path):
    """Qwen2-VL image processor configured from the checkpoint's preprocessor_config.json.

    transformers 5 has a PIL/numpy backend (no torchvision needed) and a torchvision one; we take
    the PIL one when present so CPU installs need no torchvision, and the classic class otherwise.
    """
    path = Path(path)
    cfg_file = path / "preprocessor_config.json"
    if not cfg_file.is_file():
        raise CheckpointNotFoundError(f"required file {cfg_file} does not exist")
    cfg = json.loads(cfg_file.read_text())
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as Cls
    except ImportError:  # older transformers: the classic numpy implementation
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor as Cls
    keys = ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size", "image_mean",
            "image_std", "do_resize", "do_rescale", "rescale_factor", "do_normalize", "do_convert_rgb")
    kwargs = {k: cfg[k] for k in keys if k in cfg}
    if "min_pixels" in kwargs or "max_pixels" in kwargs:
        kwargs["size"] = {"shortest_edge": kwargs.get("min_pixels", 56 * 56),
                          "longest_edge": kwargs.get("max_pixels", 28 * 28 * 1280)}
    return Cls(**kwargs)


# ------------------------------------------------------------------------------------------------
# The tiny tokenizer (make-tiny)

_TINY_CORPUS = """
A red apple on a wooden table. A photo of a cute cat sleeping on a sofa. A dog running on the beach
at sunset. Please generate image based on the following caption: a small house in the mountains.
You are a helpful assistant. Describe this image in detail. What is in the picture? The picture
shows a bowl of fruit, a glass of water and a blue vase with yellow flowers. Two people are walking
in a park under tall green trees; the sky is clear and bright. A city street at night with neon
lights, cars and rain. An astronaut riding a horse on the moon, digital art, high quality.
The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 10 100 1000 2025.
Hello, world! How are you today? I am fine, thank you. Yes. No. Maybe: (a) one; (b) two; [c] three.
"""


def build_tiny_tokenizer(out_dir: Path, vocab_size: int = 512) -> int:
    """Train a byte-level BPE with Qwen2's pre-tokenizer on a small embedded corpus, add Qwen's and
    BLIP3-o's special tokens, and save it in the Hugging Face layout. Returns len(tokenizer).

    Deterministic: the same corpus and settings always give the same vocabulary.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator([_TINY_CORPUS] * 4, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_ADDED_NON_SPECIAL])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BLIP3O_TOKENS])

    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    model_json = json.loads(tok.to_str())["model"]
    (out_dir / "vocab.json").write_text(json.dumps(model_json["vocab"], ensure_ascii=False))
    merges = ["#version: 0.2"] + [" ".join(m) if isinstance(m, list) else m for m in model_json["merges"]]
    (out_dir / "merges.txt").write_text("\n".join(merges) + "\n")
    added = {str(tok.token_to_id(t)): {"content": t, "special": t not in QWEN_ADDED_NON_SPECIAL,
                                       "lstrip": False, "rstrip": False, "normalized": False,
                                       "single_word": False}
             for t in QWEN_SPECIAL_TOKENS + QWEN_ADDED_NON_SPECIAL + BLIP3O_TOKENS}
    tok_cfg = {
        "tokenizer_class": "Qwen2Tokenizer", "model_max_length": 32768, "padding_side": "right",
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None, "bos_token": None,
        "errors": "replace", "split_special_tokens": False, "clean_up_tokenization_spaces": False,
        "additional_special_tokens": list(BLIP3O_TOKENS), "added_tokens_decoder": added,
        "chat_template": QWEN2_VL_CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False))
    (out_dir / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_VL_CHAT_TEMPLATE}, indent=2))
    return tok.get_vocab_size(with_added_tokens=True)
