"""Chat through the engine vs transformers' Qwen2_5_VLForConditionalGeneration on the same tiny
checkpoint directory (fp32): greedy tokens identical, logits within a reasoned tolerance."""

from __future__ import annotations

import pytest
import torch

from blip3o_engine import SamplingParams
from blip3o_engine.runtime import reference

transformers = pytest.importorskip("transformers")

# fp32, same weights, different attention kernels (HF eager vs our SDPA) and summation order:
# observed differences are ~1e-6 on O(1) logits; 1e-4 is far below any real bug (a wrong position,
# mask or image scatter moves logits by > 1e-2) and far above fp32 noise.
LOGITS_ATOL = 1e-4


@pytest.fixture(scope="module")
def hf_model(tiny_dir):
    import json

    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    # transformers' from_pretrained mis-parses a config whose model_type is not its own (BLIP3-o saves
    # "blip3o_qwen"): it reads the vision sub-config as the text config. Parsing the same config.json
    # with from_dict is exact; the weights then load from the directory's own sharded safetensors.
    config = Qwen2_5_VLConfig.from_dict(json.loads((tiny_dir / "config.json").read_text()))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_dir), config=config, dtype=torch.float32,
                                                               attn_implementation="eager")
    return model.eval()


def hf_inputs(engine, messages):
    prompt = engine.prompts.chat(messages)
    ids = torch.tensor([prompt.token_ids])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if prompt.pixel_values is not None:
        inputs["pixel_values"] = prompt.pixel_values
        inputs["image_grid_thw"] = torch.tensor(prompt.image_grid_thw)
        # HF 5.x needs the modality map to build 3-D M-RoPE positions (else silently 1-D).
        inputs["mm_token_type_ids"] = (ids == engine.special.image_pad).int()
    return prompt, inputs


def hf_greedy(hf_model, engine, inputs, max_new_tokens):
    out = hf_model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                            eos_token_id=[engine.special.im_end, engine.special.endoftext],
                            pad_token_id=engine.special.endoftext, temperature=None, top_p=None, top_k=None)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


TEXT_MSG = [{"role": "user", "content": "Describe a red apple on a wooden table."}]


def image_msg(image):
    return [{"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "text", "text": "What is in the picture?"}]}]


def test_prefill_logits_match(tiny_engine, hf_model, test_image):
    for messages in (TEXT_MSG, image_msg(test_image)):
        prompt, inputs = hf_inputs(tiny_engine, messages)
        with torch.no_grad():
            ref = hf_model(**inputs).logits[0]  # [L, V]
            embeds, pos, _ = reference.embed_prompt(tiny_engine.model, prompt, tiny_engine.special)
            ours = tiny_engine.model.text.compute_logits(tiny_engine.model.text(embeds, pos))[0]
        torch.testing.assert_close(ours, ref, atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("with_image", [False, True])
def test_greedy_tokens_identical(tiny_engine, hf_model, test_image, with_image):
    messages = image_msg(test_image) if with_image else TEXT_MSG
    _, inputs = hf_inputs(tiny_engine, messages)
    expected = hf_greedy(hf_model, tiny_engine, inputs, max_new_tokens=24)
    result = tiny_engine.chat(messages, SamplingParams(max_tokens=24, temperature=0.0))
    assert result.token_ids == expected
    assert result.finish_reason == ("stop" if len(expected) < 24 else "length")
    assert result.prompt_tokens == inputs["input_ids"].shape[1]


def test_batch_of_three_different_lengths(tiny_engine, hf_model, test_image):
    batch = [TEXT_MSG,
             [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi!"}],
             image_msg(test_image)]
    results = tiny_engine.chat_batch(batch, SamplingParams(max_tokens=12, temperature=0.0))
    lengths = set()
    for messages, result in zip(batch, results):
        _, inputs = hf_inputs(tiny_engine, messages)
        lengths.add(inputs["input_ids"].shape[1])
        assert result.token_ids == hf_greedy(hf_model, tiny_engine, inputs, max_new_tokens=12)
    assert len(lengths) == 3


def test_stop_token_ends_generation_like_eos(tiny_engine, hf_model):
    """A user stop token behaves as HF's eos: generation ends right after it."""
    full = tiny_engine.chat(TEXT_MSG, SamplingParams(max_tokens=10, temperature=0.0)).token_ids
    stop_at = full[4]
    first = full.index(stop_at)
    _, inputs = hf_inputs(tiny_engine, TEXT_MSG)
    out = hf_model.generate(**inputs, do_sample=False, max_new_tokens=10, eos_token_id=[stop_at],
                            pad_token_id=tiny_engine.special.endoftext)
    hf_ids = out[0, inputs["input_ids"].shape[1]:].tolist()
    result = tiny_engine.chat(TEXT_MSG, SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=[stop_at],
                                                       ignore_eos=True))
    assert result.token_ids == full[:first + 1] == hf_ids
    assert result.finish_reason == "stop"


def test_repetition_penalty_matches_hf(tiny_engine, hf_model):
    _, inputs = hf_inputs(tiny_engine, TEXT_MSG)
    out = hf_model.generate(**inputs, do_sample=False, max_new_tokens=16, repetition_penalty=1.3,
                            eos_token_id=[tiny_engine.special.im_end], pad_token_id=tiny_engine.special.endoftext)
    expected = out[0, inputs["input_ids"].shape[1]:].tolist()
    result = tiny_engine.chat(TEXT_MSG, SamplingParams(max_tokens=16, temperature=0.0, repetition_penalty=1.3))
    assert result.token_ids == expected
