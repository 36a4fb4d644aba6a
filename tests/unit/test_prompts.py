"""Prompt building: the T2I template of docs/model_spec.md §1.2, the decoder's null prompt, image-conditioned T2I
(docs/model_spec.md §1.8), chat prompts as transformers' Qwen2.5-VL processor builds them, and input validation."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from blip3o_engine import InputError
from blip3o_engine.prompts import (
    T2I_TEMPLATE,
    PromptBuilder,
    expand_image_pads,
    load_image,
    normalize_messages,
)
from blip3o_engine.tokenization import SpecialTokens, load_image_processor, load_tokenizer

# docs/model_spec.md §1.2, written out here rather than imported so a change to the engine's template fails.
SPEC_T2I = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            "Please generate image based on the following caption: {prompt}<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return load_tokenizer(tiny_dir)


@pytest.fixture(scope="module")
def processor(tiny_dir):
    return load_image_processor(tiny_dir)


@pytest.fixture(scope="module")
def special(tok):
    return SpecialTokens.from_tokenizer(tok)


@pytest.fixture(scope="module")
def builder(tok, processor, special):
    return PromptBuilder(tok, processor, special, merge_size=2)


def decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def other_image():
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (60, 200, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------------
# T2I


@pytest.mark.parametrize("caption", ["A photo of cute cat", "a red apple, 4k; (b) two!", ""])
def test_t2i_prompt_is_the_official_template_then_img(builder, tok, special, caption):
    assert T2I_TEMPLATE == SPEC_T2I
    prompt = builder.t2i(caption)
    assert prompt.token_ids[-1] == special.img_start
    assert prompt.token_ids.count(special.img_start) == 1
    assert decode(tok, prompt.token_ids) == SPEC_T2I.format(prompt=caption) + "[IMG]"
    assert prompt.token_ids[:-1] == tok(SPEC_T2I.format(prompt=caption), add_special_tokens=False)["input_ids"]
    assert prompt.pixel_values is None and prompt.image_grid_thw == []
    assert prompt.use_mrope is False  # the official T2I pass uses sequential 1-D positions


def test_t2i_uncond_is_raw_space_then_img(builder, tok, special):
    prompt = builder.t2i_uncond()
    assert prompt.token_ids == tok(" ", add_special_tokens=False)["input_ids"] + [special.img_start]
    assert decode(tok, prompt.token_ids) == " [IMG]"  # no chat template around it (docs/model_spec.md §1.6)
    assert special.im_start not in prompt.token_ids
    assert prompt.use_mrope is False


def test_t2i_rejects_non_string_prompt(builder):
    with pytest.raises(InputError, match="prompt must be a string"):
        builder.t2i(["a cat"])


def test_image_conditioned_t2i_has_256_pads_at_start_of_user_turn(builder, tok, special, test_image):
    prompt = builder.t2i("a cat", image=test_image)
    ids = prompt.token_ids
    head = tok("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
               add_special_tokens=False)["input_ids"]
    assert ids[:len(head)] == head
    k = len(head)
    # 448x448 input (docs/model_spec.md §1.8), patch 14, merge 2: (448/14)^2 / 4 = 256 LLM image tokens.
    assert ids[k] == special.vision_start
    assert ids[k + 1:k + 257] == [special.image_pad] * 256
    assert ids[k + 257] == special.vision_end
    assert ids.count(special.image_pad) == 256
    assert prompt.image_grid_thw == [(1, 32, 32)]
    assert tuple(prompt.pixel_values.shape) == (32 * 32, 3 * 2 * 14 * 14)
    assert prompt.use_mrope is False
    rest = decode(tok, ids[k + 258:])
    assert rest == "Please generate image based on the following caption: a cat<|im_end|>\n<|im_start|>assistant\n[IMG]"


def test_image_conditioned_t2i_ignores_aspect(builder, test_image):
    """The input is resized to 448x448 whatever its shape, so the grid is fixed."""
    wide = test_image.resize((300, 40))
    assert builder.t2i("x", image=wide).image_grid_thw == [(1, 32, 32)]


# ------------------------------------------------------------------------------------------------
# Chat vs what transformers' Qwen2.5-VL processor builds


def hf_style_ids(tok, processor, messages, images):
    """The Qwen2_5_VLProcessor algorithm, written out: render the chat template to text, replace the
    i-th `<|image_pad|>` by grid_i.prod() / merge² copies in the *text*, then tokenize."""
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if images:
        grids = processor(images=images, return_tensors="pt")["image_grid_thw"]
        for grid in grids:
            n = int(grid.prod()) // processor.merge_size**2
            text = text.replace("<|image_pad|>", "<|placeholder|>" * n, 1)
        text = text.replace("<|placeholder|>", "<|image_pad|>")
    return tok(text, add_special_tokens=False)["input_ids"]


def test_chat_text_only_matches_chat_template(builder, tok, processor):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": [
                    {"type": "text", "text": "What is 2+2?"}]}]
    prompt = builder.chat(messages)
    assert prompt.token_ids == hf_style_ids(tok, processor, messages, [])
    assert prompt.pixel_values is None and prompt.use_mrope is True
    assert decode(tok, prompt.token_ids).endswith("<|im_start|>assistant\n")


def test_chat_default_system_prompt(builder, tok):
    text = decode(tok, builder.chat([{"role": "user", "content": "Hi"}]).token_ids)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_chat_one_image_matches_processor(builder, tok, processor, special, test_image):
    messages = [{"role": "user", "content": [{"type": "image", "image": test_image},
                                             {"type": "text", "text": "What is in the picture?"}]}]
    prompt = builder.chat(messages)
    assert prompt.token_ids == hf_style_ids(tok, processor, messages, [test_image])
    (t, h, w), = prompt.image_grid_thw
    assert prompt.token_ids.count(special.image_pad) == t * h * w // 4
    ref = processor(images=[test_image], return_tensors="pt")
    assert prompt.image_grid_thw == [tuple(g) for g in ref["image_grid_thw"].tolist()]
    torch.testing.assert_close(prompt.pixel_values, torch.as_tensor(ref["pixel_values"]), rtol=0, atol=0)
    assert prompt.use_mrope is True


def test_chat_two_images_in_one_message(builder, tok, processor, special, test_image):
    second = other_image()
    messages = [{"role": "user", "content": [{"type": "image", "image": test_image},
                                             {"type": "text", "text": "and"},
                                             {"type": "image", "image": second},
                                             {"type": "text", "text": "Compare them."}]}]
    prompt = builder.chat(messages)
    assert prompt.token_ids == hf_style_ids(tok, processor, messages, [test_image, second])
    assert len(prompt.image_grid_thw) == 2 and prompt.image_grid_thw[0] != prompt.image_grid_thw[1]
    counts = [t * h * w // 4 for t, h, w in prompt.image_grid_thw]
    # Each image's block of pads sits between its own vision_start / vision_end, in order.
    ids = prompt.token_ids
    starts = [i for i, t in enumerate(ids) if t == special.vision_start]
    ends = [i for i, t in enumerate(ids) if t == special.vision_end]
    assert [e - s - 1 for s, e in zip(starts, ends)] == counts
    assert all(set(ids[s + 1:e]) == {special.image_pad} for s, e in zip(starts, ends))
    assert prompt.pixel_values.shape[0] == sum(t * h * w for t, h, w in prompt.image_grid_thw)


@pytest.fixture
def hf_processor(tok, processor, monkeypatch):
    """transformers' own Qwen2_5_VLProcessor. Without torchvision, transformers 5 cannot check the
    (unused) video-processor argument's class and refuses to construct it, so that one check is
    bypassed for video_processor=None; images and text go through the real processor code."""
    from transformers import Qwen2_5_VLProcessor
    from transformers.processing_utils import ProcessorMixin

    real_check = ProcessorMixin.check_argument_for_proper_class

    def check(self, name, argument):
        if name == "video_processor" and argument is None:
            return type(None)
        return real_check(self, name, argument)

    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", check)
    return Qwen2_5_VLProcessor(image_processor=processor, tokenizer=tok, video_processor=None,
                               chat_template=tok.chat_template)


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_chat_matches_transformers_processor(builder, hf_processor, test_image, n_images):
    images = [test_image, other_image()][:n_images]
    items = [{"type": "text", "text": "Describe"}]
    for img in images:
        items += [{"type": "image"}, {"type": "text", "text": "and"}]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": items}]
    text = hf_processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = hf_processor(text=[text], images=images or None, return_tensors="pt")
    it = iter(images)
    ours = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [dict(item, image=next(it)) if item["type"] == "image" else item
                                         for item in items]}]
    prompt = builder.chat(ours)
    assert prompt.token_ids == expected["input_ids"][0].tolist()
    if images:
        assert prompt.image_grid_thw == [tuple(g) for g in expected["image_grid_thw"].tolist()]
        torch.testing.assert_close(prompt.pixel_values, expected["pixel_values"], rtol=0, atol=0)


def test_chat_rejects_trailing_assistant(builder):
    with pytest.raises(InputError, match="assistant"):
        builder.chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])


# ------------------------------------------------------------------------------------------------
# load_image


def test_load_image_accepts_pil_path_bytes(tmp_path, test_image):
    path = tmp_path / "img.png"
    test_image.save(path)
    buf = io.BytesIO()
    test_image.save(buf, format="PNG")
    ref = np.asarray(test_image)
    for src in (test_image, path, str(path), buf.getvalue(), bytearray(buf.getvalue()),
                memoryview(buf.getvalue())):
        img = load_image(src)
        assert img.mode == "RGB" and img.size == test_image.size
        np.testing.assert_array_equal(np.asarray(img), ref)


def test_load_image_converts_to_rgb(test_image):
    assert load_image(test_image.convert("L")).mode == "RGB"
    assert load_image(test_image.convert("RGBA")).mode == "RGB"


def test_load_image_missing_path(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(InputError, match="does not exist"):
        load_image(str(tmp_path))  # a directory is not an image file


def test_load_image_corrupt_bytes_and_file(tmp_path, test_image):
    with pytest.raises(InputError, match="cannot decode image"):
        load_image(b"definitely not an image")
    buf = io.BytesIO()
    test_image.save(buf, format="PNG")
    with pytest.raises(InputError, match="cannot decode image"):
        load_image(buf.getvalue()[:100])  # truncated PNG
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(InputError, match="cannot decode image"):
        load_image(bad)


@pytest.mark.parametrize("value", [None, 3, 1.5, np.zeros((4, 4, 3), np.uint8), ["a.png"]])
def test_load_image_wrong_type(value):
    with pytest.raises(InputError, match="unsupported image type"):
        load_image(value)


# ------------------------------------------------------------------------------------------------
# normalize_messages


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty list"),
    (None, "non-empty list"),
    ({"role": "user", "content": "hi"}, "non-empty list"),
    (["hi"], r"messages\[0\] must be a dict"),
    ([{"role": "user"}], r"messages\[0\] must be a dict with 'role' and 'content'"),
    ([{"content": "hi"}], r"messages\[0\] must be a dict"),
    ([{"role": "bot", "content": "hi"}], r"messages\[0\]\.role must be one of"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], r"messages\[1\]\.role"),
    ([{"role": "user", "content": 5}], r"messages\[0\]\.content must be a string or a list"),
    ([{"role": "user", "content": {"type": "text", "text": "x"}}], r"messages\[0\]\.content must be"),
    ([{"role": "user", "content": ["hi"]}], r"messages\[0\]\.content\[0\] must be"),
    ([{"role": "user", "content": [{"type": "text"}]}], r"messages\[0\]\.content\[0\]"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], r"messages\[0\]\.content\[0\]"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "video", "video": "x"}]}],
     r"messages\[0\]\.content\[1\]"),
])
def test_normalize_messages_errors(messages, match):
    with pytest.raises(InputError, match=match):
        normalize_messages(messages)


def test_normalize_messages_bad_image_item(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        normalize_messages([{"role": "user", "content": [{"type": "image", "image": tmp_path / "x.png"}]}])
    with pytest.raises(InputError, match="unsupported image type"):
        normalize_messages([{"role": "user", "content": [{"type": "image"}]}])  # no image given


def test_normalize_messages_output(test_image):
    second = other_image()
    msgs, images = normalize_messages([
        {"role": "system", "content": "S"},
        {"role": "user", "content": [{"type": "image", "image": test_image}, {"type": "text", "text": "T"},
                                     {"type": "image_url", "image_url": second}], "name": "ignored"}])
    assert msgs == [{"role": "system", "content": "S"},
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "T"}, {"type": "image"}]}]
    assert [im.size for im in images] == [test_image.size, second.size]


# ------------------------------------------------------------------------------------------------
# expand_image_pads


def test_expand_image_pads():
    pad = 9
    ids = [1, pad, 2, pad, 3]
    out = expand_image_pads(ids, [(1, 4, 6), (2, 2, 2)], pad, merge=2)
    assert out == [1] + [pad] * 6 + [2] + [pad] * 2 + [3]
    assert expand_image_pads([1, 2], [], pad, 2) == [1, 2]


def test_expand_image_pads_mismatch():
    pad = 9
    with pytest.raises(InputError, match="more image placeholders"):
        expand_image_pads([pad, pad], [(1, 2, 2)], pad, 2)
    with pytest.raises(InputError, match="2 images but 1 image placeholders"):
        expand_image_pads([1, pad], [(1, 2, 2), (1, 2, 2)], pad, 2)
    with pytest.raises(InputError, match="1 images but 0"):
        expand_image_pads([1, 2], [(1, 2, 2)], pad, 2)


def test_chat_with_literal_image_pad_text_is_rejected(builder):
    """A user typing `<|image_pad|>` must not desynchronize pads and images."""
    with pytest.raises(InputError):
        builder.chat([{"role": "user", "content": "look: <|image_pad|>"}])
