"""Shared fixtures: the tiny checkpoint (built once per session) and an engine over it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Without CUDA the Triton kernels run in Triton's CPU interpreter. `@triton.jit` picks interpreted or
# compiled when a function is decorated, and triton.language's own jit helpers (`tl.zeros`, ...) are
# decorated at `import triton`, which `import torch._dynamo` already does (any engine import, the export
# tests' collection). So the choice is made here, before any test module is collected; a kernel test that
# runs with compiled helpers fails with "Cannot call @triton.jit'd outside of the scope of a kernel".
if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1 "
                           "(a pytest plugin?); set TRITON_INTERPRET=1 in the environment")
    os.environ["TRITON_INTERPRET"] = "1"

# Shared engine helpers (`_paged_util`) live in tests/parity; unit tests import them too.
sys.path.insert(0, str(Path(__file__).parent / "parity"))

# Tests are small; more threads than cores only adds contention on 2-core CI machines.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """The CLI sets torch's thread count (--threads or its default); tests run it in-process."""
    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The `tiny` preset checkpoint. Uses $BLIP3O_ENGINE_CACHE when set (CI shares it across runs),
    else a per-session temporary cache so tests never touch the user's home cache."""
    if "BLIP3O_ENGINE_CACHE" not in os.environ:
        os.environ["BLIP3O_ENGINE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    from blip3o_engine.tiny import preset_checkpoint

    return preset_checkpoint("tiny")


@pytest.fixture(scope="session")
def tiny_engine(tiny_dir):
    from blip3o_engine import Engine

    return Engine.from_pretrained(str(tiny_dir), device="cpu", dtype="float32", backend="reference")


@pytest.fixture(scope="session")
def test_image():
    """A deterministic non-square RGB test image (gradients + noise, not zeros)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    h, w = 100, 150
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], -1) + rng.integers(0, 30, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype("uint8"))
