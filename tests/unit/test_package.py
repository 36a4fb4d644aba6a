"""The top-level package: lazy public names that `dir()` and `from blip3o_engine import *` see."""

from __future__ import annotations

import blip3o_engine


def test_dir_lists_every_public_name():
    names = dir(blip3o_engine)
    for name in blip3o_engine.__all__:
        assert name in names, name
        assert getattr(blip3o_engine, name) is not None
    assert {"Engine", "SamplingParams", "ImageParams", "InputError", "MAX_IMAGE_SIDE", "MAX_SEED"} <= set(names)
    assert names == sorted(names)


def test_star_import_gives_the_public_names():
    scope: dict = {}
    exec("from blip3o_engine import *", scope)
    assert {"Engine", "SamplingParams", "ImageParams", "ConfigError"} <= set(scope)
