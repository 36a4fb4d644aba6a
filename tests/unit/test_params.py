"""SamplingParams / ImageParams: validated once at construction; every bad value is an InputError
whose message names the offending field."""

from __future__ import annotations

import dataclasses

import pytest

from blip3o_engine import MAX_IMAGE_SIDE, MAX_SEED, ImageParams, InputError, SamplingParams
from blip3o_engine.params import as_image_params, as_sampling_params

INF, NAN = float("inf"), float("nan")

# ------------------------------------------------------------------------------------------------
# SamplingParams


def test_sampling_defaults_follow_vllm():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (256, 1.0, 1.0, -1, 1.0)
    assert p.stop == () and p.stop_token_ids == () and p.seed is None
    assert not p.ignore_eos and p.skip_special_tokens
    assert not p.greedy
    assert SamplingParams(temperature=0.0).greedy


def test_stop_string_becomes_tuple():
    assert SamplingParams(stop="END").stop == ("END",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop=None).stop == ()
    assert SamplingParams(stop_token_ids=[3, 5]).stop_token_ids == (3, 5)


def test_stop_token_ids_accept_numpy_and_torch_integers():
    import numpy as np
    import torch

    ids = SamplingParams(stop_token_ids=[np.int64(3), torch.tensor(4)]).stop_token_ids
    assert ids == (3, 4) and all(type(t) is int for t in ids)


def test_sampling_params_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingParams().temperature = 0.5  # type: ignore[misc]


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(max_tokens=2.5), "max_tokens"),
    (dict(max_tokens=True), "max_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=INF), "temperature"),
    (dict(temperature=10**400), "temperature"),  # finite as an int, not as a float
    (dict(temperature="hot"), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=-0.2), "top_p"),
    (dict(top_p=None), "top_p"),
    (dict(top_p=NAN), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=2.0), "top_k"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(repetition_penalty="x"), "repetition_penalty"),
    (dict(repetition_penalty=INF), "repetition_penalty"),
    (dict(repetition_penalty=NAN), "repetition_penalty"),
    (dict(stop=[""]), "stop"),
    (dict(stop=[1]), "stop"),
    (dict(stop_token_ids=["eos"]), "stop_token_ids"),
    (dict(stop_token_ids=[1.5]), "stop_token_ids"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(seed=1.5), "seed"),
    (dict(seed="7"), "seed"),
    (dict(seed=-1), "seed"),
    (dict(seed=2**64), "seed"),
    (dict(seed=2**70), "seed"),
])
def test_bad_sampling_values_raise_input_error(kwargs, field):
    with pytest.raises(InputError, match=field):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(max_tokens=1), dict(temperature=0.0), dict(temperature=2), dict(top_p=1e-9), dict(top_p=1),
    dict(top_k=0), dict(top_k=1), dict(repetition_penalty=0.5), dict(seed=0), dict(seed=2**40),
    dict(seed=MAX_SEED),
])
def test_good_sampling_edge_values_accepted(kwargs):
    SamplingParams(**kwargs)


# ------------------------------------------------------------------------------------------------
# ImageParams


def test_image_defaults_are_the_official_ones():
    """docs/model_spec.md §1.7: 30 DiT steps at CFG 3.0, 50 decoder steps at CFG 3.0; native size; fresh seed."""
    p = ImageParams()
    assert (p.dit_steps, p.dit_guidance, p.decoder_steps, p.decoder_guidance) == (30, 3.0, 50, 3.0)
    assert p.height is None and p.width is None and p.seed is None


@pytest.mark.parametrize("kwargs, field", [
    (dict(height=0), "height"),
    (dict(height=-64), "height"),
    (dict(height=64.0), "height"),
    (dict(width=0), "width"),
    (dict(width="64"), "width"),
    (dict(dit_steps=0), "dit_steps"),
    (dict(dit_steps=1001), "dit_steps"),
    (dict(dit_steps=3.0), "dit_steps"),
    (dict(decoder_steps=0), "decoder_steps"),
    (dict(decoder_steps=None), "decoder_steps"),
    (dict(dit_guidance=-1.0), "dit_guidance"),
    (dict(dit_guidance=float("nan")), "dit_guidance"),
    (dict(dit_guidance="3"), "dit_guidance"),
    (dict(decoder_guidance=-0.5), "decoder_guidance"),
    (dict(decoder_guidance=INF), "decoder_guidance"),
    (dict(dit_guidance=INF), "dit_guidance"),
    (dict(dit_guidance=-INF), "dit_guidance"),
    (dict(seed=-1), "seed"),
    (dict(seed=1.0), "seed"),
    (dict(seed=2**64), "seed"),
    (dict(seed=2**70), "seed"),
    (dict(height=MAX_IMAGE_SIDE + 16), "height"),
    (dict(width=100000), "width"),
])
def test_bad_image_values_raise_input_error(kwargs, field):
    with pytest.raises(InputError, match=field):
        ImageParams(**kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(dit_steps=1, decoder_steps=1), dict(dit_steps=1000), dict(dit_guidance=0.0, decoder_guidance=1.0),
    dict(dit_guidance=1), dict(height=32, width=96), dict(seed=0), dict(seed=MAX_SEED),
    dict(height=MAX_IMAGE_SIDE, width=MAX_IMAGE_SIDE),
])
def test_good_image_edge_values_accepted(kwargs):
    ImageParams(**kwargs)


def test_input_error_is_a_value_error():
    """Applications that catch ValueError (the Python convention for bad arguments) still work."""
    with pytest.raises(ValueError):
        ImageParams(dit_steps=0)


# ------------------------------------------------------------------------------------------------
# Seeds: one rule for both classes, and image i's seed + i stays in range


def test_seed_rule_is_the_same_for_both_classes():
    for seed in (0, 1, 2**63, MAX_SEED):
        assert SamplingParams(seed=seed).seed == ImageParams(seed=seed).seed == seed
    for seed in (-1, -5, MAX_SEED + 1, 2**70):
        with pytest.raises(InputError, match=r"seed must be an int in \[0, 2\*\*64 - 1\]"):
            SamplingParams(seed=seed)
        with pytest.raises(InputError, match=r"seed must be an int in \[0, 2\*\*64 - 1\]"):
            ImageParams(seed=seed)


def test_every_valid_seed_seeds_a_torch_generator():
    import torch

    for seed in ImageParams(seed=MAX_SEED - 2).image_seeds(3):
        torch.Generator().manual_seed(seed)  # the call that overflowed before the range check


def test_image_seeds():
    assert ImageParams(seed=5).image_seeds(3) == [5, 6, 7]
    assert ImageParams(seed=MAX_SEED - 1).image_seeds(2) == [MAX_SEED - 1, MAX_SEED]
    with pytest.raises(InputError, match="seed \\+ i"):
        ImageParams(seed=MAX_SEED).image_seeds(2)
    fresh = ImageParams().image_seeds(2)
    assert fresh[1] == fresh[0] + 1 and 0 <= fresh[0] < 2**31


# ------------------------------------------------------------------------------------------------
# Params as dicts


def test_params_from_dicts():
    assert as_sampling_params({"max_tokens": 4, "stop": "x"}) == SamplingParams(max_tokens=4, stop=("x",))
    assert as_image_params({"seed": 3, "height": 32}) == ImageParams(seed=3, height=32)
    assert as_sampling_params(None) == SamplingParams() and as_image_params(None) == ImageParams()
    p = SamplingParams(max_tokens=3)
    assert as_sampling_params(p) is p
    with pytest.raises(InputError, match="top_p"):  # values are validated as usual
        as_sampling_params({"top_p": 2})


@pytest.mark.parametrize("convert, value, match", [
    (as_sampling_params, {"max_token": 4, "temp": 0}, "unknown SamplingParams fields: max_token, temp"),
    (as_image_params, {"steps": 4}, "unknown ImageParams fields: steps"),
    (as_sampling_params, ImageParams(), "must be SamplingParams"),
    (as_image_params, SamplingParams(), "must be ImageParams"),
    (as_sampling_params, 4, "must be SamplingParams, a dict of its fields or None, got int"),
    (as_image_params, [("seed", 1)], "got list"),
])
def test_bad_params_objects(convert, value, match):
    with pytest.raises(InputError, match=match):
        convert(value)
