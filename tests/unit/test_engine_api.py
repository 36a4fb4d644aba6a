"""The public Engine API on the tiny checkpoint: sampling controls, batching, validation, seeds,
image conditioning, stage methods and their shape checks, progress reporting, construction errors.

Few steps everywhere (the numbers are random weights; these tests check behaviour, not pixels)."""

from __future__ import annotations

import copy
import dataclasses
import io
import re

import numpy as np
import pytest
import torch

from blip3o_engine import (
    MAX_SEED,
    CheckpointNotFoundError,
    ConfigError,
    Engine,
    ImageParams,
    InputError,
    SamplingParams,
)
from blip3o_engine.models.blip3o import random_model
from blip3o_engine.runtime import reference
from blip3o_engine.tokenization import load_image_processor

FAST = dict(dit_steps=3, decoder_steps=3)
MSG = [{"role": "user", "content": "Describe a red apple on a wooden table."}]


def img_array(result) -> np.ndarray:
    return np.asarray(result.image)


@pytest.fixture(scope="module")
def greedy16(tiny_engine):
    return tiny_engine.chat(MSG, SamplingParams(max_tokens=16, temperature=0.0))


# ------------------------------------------------------------------------------------------------
# Chat: sampling controls


def test_seeded_sampling_reproducible_and_seed_dependent(tiny_engine):
    def run(seed):
        return tiny_engine.chat(MSG, SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=seed)).token_ids

    a = run(5)
    assert run(5) == a
    assert run(6) != a


def test_top_k_one_equals_greedy(tiny_engine, greedy16):
    sampled = tiny_engine.chat(MSG, SamplingParams(max_tokens=16, temperature=1.3, top_k=1, seed=3))
    assert sampled.token_ids == greedy16.token_ids
    assert sampled.text == greedy16.text


def test_max_tokens_gives_length(tiny_engine, greedy16):
    # The tiny random model never emits an end-of-turn token in 16 steps (checked here, so a
    # retrained tiny checkpoint that does fails loudly instead of silently weakening the test).
    assert greedy16.finish_reason == "length" and len(greedy16.token_ids) == 16
    short = tiny_engine.chat(MSG, SamplingParams(max_tokens=5, temperature=0.0))
    assert short.finish_reason == "length"
    assert short.token_ids == greedy16.token_ids[:5]
    assert short.prompt_tokens == greedy16.prompt_tokens > 0
    one = tiny_engine.chat(MSG, SamplingParams(max_tokens=1, temperature=0.0))
    assert one.token_ids == greedy16.token_ids[:1] and one.finish_reason == "length"


def test_stop_string_cuts_text_before_it(tiny_engine, greedy16):
    full = greedy16.text
    # A plain-ASCII word from the middle of the greedy text (a real sub-string, first occurrence).
    words = [(m.start(), m.group()) for m in re.finditer(r"[A-Za-z]{3,}", full) if m.start() >= 3]
    assert words, f"no usable stop word in {full!r}"
    start, stop = words[0]
    assert full.find(stop) == start
    result = tiny_engine.chat(MSG, SamplingParams(max_tokens=16, temperature=0.0, stop=[stop, "never-there"]))
    assert result.finish_reason == "stop"
    assert result.text == full[:start]
    n = len(result.token_ids)
    assert 0 < n < 16 and result.token_ids == greedy16.token_ids[:n]
    # Generation stopped at the token that completed the stop string, not later.
    assert stop in tiny_engine.tokenizer.decode(result.token_ids)
    assert stop not in tiny_engine.tokenizer.decode(result.token_ids[:-1])


def test_stop_token_and_ignore_eos(tiny_engine, greedy16):
    """Pretend the 4th greedy token is <|im_end|> (the random model never emits the real one):
    it ends generation ('stop', excluded from the text) unless ignore_eos."""
    full = greedy16.token_ids
    fake_eos = full[3]
    first = full.index(fake_eos)
    # A new engine over the same weights whose special-token table (seen by its AR stage) differs.
    engine = Engine(tiny_engine.model, tiny_engine.tokenizer, tiny_engine.prompts.image_processor)
    engine.special = engine._ar.special = dataclasses.replace(tiny_engine.special, im_end=fake_eos)
    stopped = engine.chat(MSG, SamplingParams(max_tokens=16, temperature=0.0))
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == full[:first + 1]
    assert stopped.text == tiny_engine.tokenizer.decode(full[:first], skip_special_tokens=True)
    ignored = engine.chat(MSG, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    assert ignored.finish_reason == "length" and ignored.token_ids == full
    # A user stop token still stops with ignore_eos.
    user_stop = tiny_engine.chat(MSG, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True,
                                                     stop_token_ids=[fake_eos]))
    assert user_stop.token_ids == full[:first + 1] and user_stop.finish_reason == "stop"


def test_chat_result_fields(tiny_engine, greedy16):
    assert isinstance(greedy16.text, str) and greedy16.text
    assert greedy16.prompt_tokens == len(tiny_engine.prompts.chat(MSG).token_ids)
    assert greedy16.timings["total"] > 0


# ------------------------------------------------------------------------------------------------
# Chat: batching and validation


def test_chat_batch_in_order_and_equal_to_single_calls(tiny_engine, test_image):
    convs = [MSG,
             [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi!"}],
             [{"role": "user", "content": [{"type": "image", "image": test_image},
                                           {"type": "text", "text": "What is in the picture?"}]}]]
    params = [SamplingParams(max_tokens=6, temperature=0.0),
              SamplingParams(max_tokens=4, temperature=0.9, seed=11),
              SamplingParams(max_tokens=5, temperature=0.0, repetition_penalty=1.2)]
    batch = tiny_engine.chat_batch(convs, params)
    single = [tiny_engine.chat(c, p) for c, p in zip(convs, params)]
    assert [r.token_ids for r in batch] == [r.token_ids for r in single]
    assert [r.text for r in batch] == [r.text for r in single]
    assert [len(r.token_ids) for r in batch] == [6, 4, 5]
    assert len({r.prompt_tokens for r in batch}) == 3
    # One SamplingParams for all.
    greedy3 = SamplingParams(max_tokens=3, temperature=0.0)
    shared = tiny_engine.chat_batch(convs[:2], greedy3)
    assert [r.token_ids for r in shared] == [tiny_engine.chat(c, greedy3).token_ids for c in convs[:2]]


@pytest.fixture
def count_generate(monkeypatch):
    calls = []
    real = reference.generate_text

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(reference, "generate_text", counting)
    return calls


@pytest.mark.parametrize("bad", [
    [{"role": "bot", "content": "x"}],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
    [],
    [{"role": "user", "content": [{"type": "image", "image": b"not an image"}]}],
])
def test_chat_batch_bad_conversation_fails_before_any_work(tiny_engine, count_generate, bad):
    with pytest.raises(InputError):
        tiny_engine.chat_batch([MSG, MSG, bad], SamplingParams(max_tokens=2))
    assert count_generate == []


def test_chat_batch_context_overflow_fails_before_any_work(tiny_engine, count_generate):
    limit = tiny_engine.cfg.text.max_position_embeddings
    with pytest.raises(InputError, match="context"):
        tiny_engine.chat_batch([MSG, MSG], [SamplingParams(max_tokens=2), SamplingParams(max_tokens=limit)])
    assert count_generate == []


def test_chat_batch_params_length_mismatch(tiny_engine, count_generate):
    with pytest.raises(InputError, match="2 conversations but 3 SamplingParams"):
        tiny_engine.chat_batch([MSG, MSG], [SamplingParams()] * 3)
    with pytest.raises(InputError, match="list of conversations"):
        tiny_engine.chat_batch(MSG[0], SamplingParams())
    assert count_generate == []


def test_prompt_plus_max_tokens_over_context(tiny_engine, count_generate):
    limit = tiny_engine.cfg.text.max_position_embeddings
    n_prompt = len(tiny_engine.prompts.chat(MSG).token_ids)
    with pytest.raises(InputError, match=f"exceeds the context \\(max_model_len\\) of {limit}"):
        tiny_engine.chat(MSG, SamplingParams(max_tokens=limit - n_prompt + 1))
    assert count_generate == []
    # Exactly at the limit is allowed (only checked, not run: 4k tokens would be slow).
    tiny_engine._check_context(limit)


def test_params_may_be_dicts_for_every_chat_method(tiny_engine, greedy16):
    as_dict = {"max_tokens": 16, "temperature": 0.0}
    assert tiny_engine.chat(MSG, params=as_dict).token_ids == greedy16.token_ids
    assert [r.token_ids for r in tiny_engine.chat_batch([MSG, MSG], as_dict)] == [greedy16.token_ids] * 2
    batch = tiny_engine.chat_batch([MSG, MSG], [as_dict, SamplingParams(max_tokens=2, temperature=0.0)])
    assert [r.token_ids for r in batch] == [greedy16.token_ids, greedy16.token_ids[:2]]
    assert "".join(tiny_engine.chat_stream(MSG, as_dict)) == greedy16.text
    tiny_engine.add_request("dict-params", MSG, {"max_tokens": 3, "temperature": 0.0})
    outs = []
    while tiny_engine.has_unfinished():
        outs += [o for o in tiny_engine.step() if o.request_id == "dict-params"]
    assert outs[-1].finished and outs[-1].token_ids == greedy16.token_ids[:3]


@pytest.mark.parametrize("call", ["chat", "chat_batch", "chat_stream", "add_request"])
def test_unknown_sampling_fields_are_named(tiny_engine, count_generate, call):
    params = {"max_token": 4, "temprature": 0.0}
    run = {"chat": lambda: tiny_engine.chat(MSG, params),
           "chat_batch": lambda: tiny_engine.chat_batch([MSG], [params]),
           "chat_stream": lambda: list(tiny_engine.chat_stream(MSG, params)),
           "add_request": lambda: tiny_engine.add_request("unknown-fields", MSG, params)}[call]
    with pytest.raises(InputError, match="unknown SamplingParams fields: max_token, temprature"):
        run()
    with pytest.raises(InputError, match="got int"):
        tiny_engine.chat(MSG, 4)
    assert count_generate == [] and not tiny_engine.has_unfinished()


def test_duplicate_request_id_is_an_input_error(tiny_engine):
    tiny_engine.add_request("dup", MSG, SamplingParams(max_tokens=2))
    with pytest.raises(InputError, match="'dup' is already in use"):
        tiny_engine.add_request("dup", MSG, SamplingParams(max_tokens=2))
    with pytest.raises(InputError, match="non-empty string"):
        tiny_engine.add_request(7, MSG)
    finished = []
    while tiny_engine.has_unfinished():
        finished += [o for o in tiny_engine.step() if o.finished]
    assert [o.request_id for o in finished] == ["dup"] and len(finished[0].token_ids) == 2  # the first ran
    tiny_engine.add_request("dup", MSG, SamplingParams(max_tokens=1))  # a finished id is free again
    while tiny_engine.has_unfinished():
        tiny_engine.step()


def test_long_prompt_is_checked_without_the_tokenizer_warning(tiny_engine, count_generate):
    """Chat and T2I give the same typed error for a prompt past the context; the text is past the
    tokenizer's model_max_length too, whose "indexing errors" warning the engine's check replaces."""
    long_text = "word " * (tiny_engine.tokenizer.model_max_length + 100)
    key = "sequence-length-is-longer-than-the-specified-maximum"
    tiny_engine.tokenizer.deprecation_warnings.pop(key, None)
    limit = tiny_engine.cfg.text.max_position_embeddings
    with pytest.raises(InputError, match=f"prompt \\+ max_tokens = .* exceeds the context \\(max_model_len\\) of {limit}"):
        tiny_engine.chat([{"role": "user", "content": long_text}], SamplingParams(max_tokens=2))
    for call in (lambda: tiny_engine.generate_image(long_text, ImageParams(**FAST, seed=0)),
                 lambda: tiny_engine.generate_images(["a cat", long_text], ImageParams(**FAST, seed=0)),
                 lambda: tiny_engine.encode_prompt(long_text)):
        with pytest.raises(InputError, match=f"prompt \\+ 64 latent queries = .* exceeds the context "
                                             f"\\(max_model_len\\) of {limit}"):
            call()
    assert key not in tiny_engine.tokenizer.deprecation_warnings  # the warning was never printed
    assert count_generate == []


def test_t2i_context_limit_is_exact(tiny_engine, monkeypatch):
    """A prompt whose ids + [IMG] + 64 queries fill the context exactly passes the check; one more fails."""
    n = len(tiny_engine.prompts.t2i("a cat").token_ids) + tiny_engine.cfg.n_query
    monkeypatch.setattr(tiny_engine._ar, "max_model_len", n)  # the engine's bound (the reference AR stage's)
    tiny_engine._t2i_prompt("a cat")
    with pytest.raises(InputError, match=f"= {n + 1} tokens exceeds the context \\(max_model_len\\) of {n} tokens"):
        tiny_engine._t2i_prompt("a cat cat")


# ------------------------------------------------------------------------------------------------
# Text-to-image: seeds and batches


def test_batch_composition_independence(tiny_engine):
    params = ImageParams(**FAST, seed=17)
    pair = tiny_engine.generate_images(["a red apple", "a dog on the beach"], params)
    first = tiny_engine.generate_image("a red apple", params)
    second = tiny_engine.generate_image("a dog on the beach", dataclasses.replace(params, seed=18))
    assert [r.seed for r in pair] == [17, 18]
    np.testing.assert_array_equal(img_array(pair[0]), img_array(first))
    np.testing.assert_array_equal(img_array(pair[1]), img_array(second))
    torch.testing.assert_close(pair[0].clip_features, first.clip_features, rtol=0, atol=0)
    torch.testing.assert_close(pair[1].clip_features, second.clip_features, rtol=0, atol=0)


def test_same_seed_same_image_different_seed_differs(tiny_engine):
    a = tiny_engine.generate_image("a cat", ImageParams(**FAST, seed=3))
    b = tiny_engine.generate_image("a cat", ImageParams(**FAST, seed=3))
    c = tiny_engine.generate_image("a cat", ImageParams(**FAST, seed=4))
    np.testing.assert_array_equal(img_array(a), img_array(b))
    torch.testing.assert_close(a.clip_features, b.clip_features, rtol=0, atol=0)
    assert not np.array_equal(img_array(a), img_array(c))
    assert not torch.equal(a.clip_features, c.clip_features)


def test_no_seed_reports_a_reproducing_seed(tiny_engine):
    r = tiny_engine.generate_image("a house", ImageParams(**FAST))
    assert isinstance(r.seed, int) and r.seed >= 0
    again = tiny_engine.generate_image("a house", ImageParams(**FAST, seed=r.seed))
    np.testing.assert_array_equal(img_array(r), img_array(again))


def test_largest_seeds(tiny_engine, monkeypatch):
    """The top of the seed range works; a batch whose seed + i would pass it fails before any work."""
    r = tiny_engine.generate_image("a house", ImageParams(**FAST, seed=MAX_SEED))
    assert r.seed == MAX_SEED
    cond = tiny_engine.encode_prompt("a house")[None]
    feats = tiny_engine.sample_clip_features(cond, ImageParams(**FAST, seed=MAX_SEED))
    torch.testing.assert_close(feats[0], r.clip_features, rtol=0, atol=0)
    calls = []
    monkeypatch.setattr(tiny_engine._loop, "add_image", lambda *a: calls.append(a))
    with pytest.raises(InputError, match="exceeds 2\\*\\*64 - 1"):
        tiny_engine.generate_images(["a", "b"], ImageParams(**FAST, seed=MAX_SEED))
    with pytest.raises(InputError, match="exceeds 2\\*\\*64 - 1"):
        tiny_engine.sample_clip_features(torch.zeros(2, 64, tiny_engine.cfg.text.hidden_size),
                                         ImageParams(**FAST, seed=MAX_SEED))
    assert calls == []


def test_image_params_may_be_dicts(tiny_engine, feats2):
    params = ImageParams(**FAST, seed=6)
    as_dict = dict(FAST, seed=6)
    want = tiny_engine.generate_image("a cat", params)
    np.testing.assert_array_equal(img_array(tiny_engine.generate_image("a cat", as_dict)), img_array(want))
    np.testing.assert_array_equal(img_array(tiny_engine.generate_images(["a cat"], as_dict)[0]), img_array(want))
    cond = tiny_engine.encode_prompt("a cat")[None]
    torch.testing.assert_close(tiny_engine.sample_clip_features(cond, as_dict),
                               tiny_engine.sample_clip_features(cond, params), rtol=0, atol=0)
    np.testing.assert_array_equal(np.asarray(tiny_engine.decode_pixels(feats2, as_dict)[0]),
                                  np.asarray(tiny_engine.decode_pixels(feats2, params)[0]))
    assert tiny_engine.uncond_features(as_dict) is tiny_engine.uncond_features(params)
    for call in (lambda: tiny_engine.generate_image("a", {"steps": 3}),
                 lambda: tiny_engine.generate_images(["a"], {"steps": 3}),
                 lambda: tiny_engine.sample_clip_features(cond, {"steps": 3}),
                 lambda: tiny_engine.decode_pixels(feats2, {"steps": 3}),
                 lambda: tiny_engine.uncond_features({"steps": 3})):
        with pytest.raises(InputError, match="unknown ImageParams fields: steps"):
            call()


def test_image_result_fields(tiny_engine):
    r = tiny_engine.generate_image("a house", ImageParams(**FAST, seed=0))
    size = tiny_engine.cfg.default_image_size
    assert r.image.size == (size, size) and r.image.mode == "RGB"
    assert tuple(r.clip_features.shape) == (tiny_engine.cfg.n_query, tiny_engine.cfg.dit.in_channels)
    assert set(r.timings) >= {"prefill", "dit", "decoder", "total"}
    assert np.asarray(r.image).std() > 0  # not a constant image


def test_generate_images_input_errors(tiny_engine):
    with pytest.raises(InputError, match="non-empty list"):
        tiny_engine.generate_images("a cat", ImageParams(**FAST))
    with pytest.raises(InputError, match="non-empty list"):
        tiny_engine.generate_images([], ImageParams(**FAST))
    with pytest.raises(InputError, match="2 prompts but 1 images"):
        tiny_engine.generate_images(["a", "b"], ImageParams(**FAST), images=[None])
    with pytest.raises(InputError, match="prompt must be a string"):
        tiny_engine.generate_image(42, ImageParams(**FAST))
    with pytest.raises(InputError, match="does not exist"):
        tiny_engine.generate_image("a", ImageParams(**FAST), image="/nonexistent/x.png")


# ------------------------------------------------------------------------------------------------
# Text-to-image: image conditioning


def test_image_conditioned_generation(tiny_engine, test_image, tmp_path):
    params = ImageParams(**FAST, seed=2)
    plain = tiny_engine.generate_image("a cat", params)
    cond = tiny_engine.generate_image("a cat", params, image=test_image)
    assert cond.image.size == plain.image.size
    assert not torch.allclose(cond.clip_features, plain.clip_features)
    path = tmp_path / "in.png"
    test_image.save(path)
    buf = io.BytesIO()
    test_image.save(buf, format="PNG")
    for src in (path, str(path), buf.getvalue()):  # PNG is lossless: the same pixels, the same result
        again = tiny_engine.generate_image("a cat", params, image=src)
        torch.testing.assert_close(again.clip_features, cond.clip_features, rtol=0, atol=0)
        np.testing.assert_array_equal(img_array(again), img_array(cond))


# ------------------------------------------------------------------------------------------------
# Stage methods


def test_stages_compose_to_generate_image(tiny_engine):
    params = ImageParams(**FAST, seed=9)
    cond = tiny_engine.encode_prompt("a red apple")
    assert tuple(cond.shape) == (tiny_engine.cfg.n_query, tiny_engine.cfg.text.hidden_size)
    feats = tiny_engine.sample_clip_features(cond[None], params)
    assert tuple(feats.shape) == (1, tiny_engine.cfg.n_query, tiny_engine.cfg.dit.in_channels)
    images = tiny_engine.decode_pixels(feats, params)
    full = tiny_engine.generate_image("a red apple", params)
    torch.testing.assert_close(feats[0], full.clip_features, rtol=0, atol=0)
    np.testing.assert_array_equal(np.asarray(images[0]), img_array(full))


def test_encode_prompt_with_image(tiny_engine, test_image):
    a = tiny_engine.encode_prompt("a cat")
    b = tiny_engine.encode_prompt("a cat", image=test_image)
    assert a.shape == b.shape and not torch.allclose(a, b)


def test_explicit_noise_is_used(tiny_engine):
    cfg = tiny_engine.cfg
    cond = tiny_engine.encode_prompt("x")[None].expand(2, -1, -1)
    s = cfg.dit.input_size
    noise = torch.randn(2, cfg.dit.in_channels, s, s, generator=torch.Generator().manual_seed(0))
    f1 = tiny_engine.sample_clip_features(cond, ImageParams(**FAST), noise=noise)
    f2 = tiny_engine.sample_clip_features(cond, ImageParams(**FAST, seed=123), noise=noise)
    torch.testing.assert_close(f1, f2, rtol=0, atol=0)  # the seed is irrelevant when noise is given
    assert not torch.equal(f1[0], f1[1])  # different noise rows -> different features


def test_sample_clip_features_shape_errors(tiny_engine):
    cfg = tiny_engine.cfg
    q, h, c, s = cfg.n_query, cfg.text.hidden_size, cfg.dit.in_channels, cfg.dit.input_size
    params = ImageParams(**FAST, seed=0)
    for bad in (torch.zeros(q, h), torch.zeros(1, q + 1, h), torch.zeros(1, q, h + 1)):
        with pytest.raises(InputError, match="cond must be"):
            tiny_engine.sample_clip_features(bad, params)
    for bad in (torch.zeros(1, c, s, s), torch.zeros(2, c + 1, s, s), torch.zeros(2, c, s, s + 1)):
        with pytest.raises(InputError, match="noise must have shape"):
            tiny_engine.sample_clip_features(torch.zeros(2, q, h), params, noise=bad)


@pytest.fixture(scope="module")
def feats2(tiny_engine):
    cond = torch.stack([tiny_engine.encode_prompt("a"), tiny_engine.encode_prompt("b")])
    return tiny_engine.sample_clip_features(cond, ImageParams(**FAST, seed=1))  # [2, Q, C]


def test_decode_pixels_shape_errors(tiny_engine, feats2):
    cfg = tiny_engine.cfg
    q, c = cfg.n_query, cfg.dit.in_channels
    params = ImageParams(**FAST, seed=0)
    for bad in (feats2[0], torch.zeros(2, q - 1, c), torch.zeros(2, q, c + 1)):
        with pytest.raises(InputError, match="features must be"):
            tiny_engine.decode_pixels(bad, params)
    for bad in (torch.zeros(3, q, c), torch.zeros(2, q, c + 1), torch.zeros(q, c)):
        with pytest.raises(InputError, match="uncond must be"):
            tiny_engine.decode_pixels(feats2, params, uncond=bad)
    side = cfg.default_image_size // cfg.vae.scale_factor
    for bad in (torch.zeros(1, 4, side, side), torch.zeros(2, 3, side, side), torch.zeros(2, 4, side, side * 2)):
        with pytest.raises(InputError, match="noise must have shape"):
            tiny_engine.decode_pixels(feats2, params, noise=bad)


def test_decode_uncond_of_batch_one_broadcasts(tiny_engine, feats2):
    params = ImageParams(**FAST, seed=4)
    uncond = tiny_engine.uncond_features(params)  # [1, Q, C]
    assert tuple(uncond.shape) == (1, *feats2.shape[1:])
    default = tiny_engine.decode_pixels(feats2, params)
    one = tiny_engine.decode_pixels(feats2, params, uncond=uncond)
    both = tiny_engine.decode_pixels(feats2, params, uncond=uncond.expand(2, -1, -1).clone())
    for a, b, d in zip(one, both, default):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(d))
    other = tiny_engine.decode_pixels(feats2, params, uncond=torch.zeros_like(uncond))
    assert not np.array_equal(np.asarray(other[0]), np.asarray(one[0]))  # uncond is actually used


def test_image_size_rules(tiny_engine):
    cfg = tiny_engine.cfg
    native = cfg.default_image_size
    multiple = cfg.vae.scale_factor * 2 ** (len(cfg.unet.block_out_channels) - 1)
    assert tiny_engine.image_size(ImageParams()) == (native, native)
    assert tiny_engine.image_size(ImageParams(height=multiple, width=3 * multiple)) == (multiple, 3 * multiple)
    for h, w in ((multiple + 8, native), (native, multiple * 2 + 1), (8, 8)):
        with pytest.raises(InputError, match=f"multiples of {multiple}"):
            tiny_engine.image_size(ImageParams(height=h, width=w))
    with pytest.raises(InputError, match="multiples of"):
        tiny_engine.generate_image("a", ImageParams(**FAST, height=multiple + 8, width=native))


def test_non_default_size(tiny_engine):
    """32x96 (tiny: multiples of 16): a non-square, non-native latent through UNet and VAE."""
    r = tiny_engine.generate_image("a wide photo", ImageParams(**FAST, height=32, width=96, seed=1))
    assert r.image.size == (96, 32)  # PIL reports (width, height)
    imgs = tiny_engine.decode_pixels(r.clip_features[None], ImageParams(**FAST, height=96, width=32, seed=1))
    assert imgs[0].size == (32, 96)


# ------------------------------------------------------------------------------------------------
# Progress


def test_progress_callback_sees_every_step(tiny_engine):
    events = []
    params = ImageParams(dit_steps=4, decoder_steps=3, seed=0)
    tiny_engine.uncond_features(params)  # warm the null-prompt cache: it runs without progress
    tiny_engine.generate_image("a cat", params, progress=lambda *e: events.append(e))
    assert events == [("dit", i, 4) for i in range(4)] + [("decoder", i, 3) for i in range(3)]


def test_progress_callback_on_stage_methods(tiny_engine, feats2):
    events = []
    params = ImageParams(**FAST, seed=0)
    tiny_engine.decode_pixels(feats2, params, progress=lambda *e: events.append(e))
    assert events == [("decoder", i, 3) for i in range(3)]


# ------------------------------------------------------------------------------------------------
# Construction


def test_from_pretrained_errors(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="unknown backend"):
        Engine.from_pretrained(str(tiny_dir), backend="fast")
    with pytest.raises(ConfigError, match="unsupported dtype"):
        Engine.from_pretrained(str(tiny_dir), dtype="int8")
    with pytest.raises(CheckpointNotFoundError, match="neither a checkpoint directory nor a preset"):
        Engine.from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(CheckpointNotFoundError):
        Engine.from_pretrained(str(tmp_path))  # exists but empty: no config.json
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            Engine.from_pretrained(str(tiny_dir), device="cuda")
    for device in ("tpu", "cuda:x", "meta", ""):
        with pytest.raises(ConfigError, match="unsupported device .*; use cpu, cuda or cuda:N"):
            Engine.from_pretrained(str(tiny_dir), device=device)


def test_optimized_backend_matches_reference(tiny_dir, tiny_engine, greedy16):
    opt = Engine.from_pretrained(str(tiny_dir), backend="optimized")
    assert opt.backend == "optimized" and not opt.is_random_preset
    assert opt.chat(MSG, SamplingParams(max_tokens=16, temperature=0.0)).token_ids == greedy16.token_ids


def test_tiny_preset_is_flagged_random(tiny_dir, monkeypatch):
    monkeypatch.setenv("BLIP3O_ENGINE_CACHE", str(tiny_dir.parent))
    engine = Engine.from_pretrained("tiny")
    assert engine.is_random_preset and engine.name == "tiny"


@pytest.fixture(scope="module")
def chat_only_engine(tiny_engine, tiny_dir):
    """A plain Qwen2.5-VL (no DiT, no decoder) with the tiny shapes."""
    cfg = dataclasses.replace(tiny_engine.cfg, dit=None, unet=None, vae=None, model_type="qwen2_5_vl")
    return Engine(random_model(cfg, seed=1), tiny_engine.tokenizer, load_image_processor(tiny_dir))


def test_model_without_dit_chats_but_cannot_generate(chat_only_engine, test_image):
    e = chat_only_engine
    assert not e.cfg.can_generate_images
    r = e.chat([{"role": "user", "content": [{"type": "image", "image": test_image},
                                             {"type": "text", "text": "What is this?"}]}],
               SamplingParams(max_tokens=4, temperature=0.0))
    assert len(r.token_ids) == 4
    for call in (lambda: e.generate_image("a cat", ImageParams(**FAST)),
                 lambda: e.generate_images(["a", "b"]),
                 lambda: e.encode_prompt("a cat"),
                 lambda: e.sample_clip_features(torch.zeros(1, 64, e.cfg.text.hidden_size)),
                 lambda: e.decode_pixels(torch.zeros(1, 64, 32)),
                 lambda: e.uncond_features()):
        with pytest.raises(ConfigError, match="can chat but not generate images"):
            call()


def test_unknown_backend_in_constructor(tiny_engine):
    with pytest.raises(ConfigError, match="unknown backend"):
        Engine(tiny_engine.model, tiny_engine.tokenizer, tiny_engine.prompts.image_processor, backend="x")
