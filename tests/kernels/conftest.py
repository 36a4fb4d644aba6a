"""tests/kernels: Triton kernels vs their torch references.

Without CUDA the kernels run in Triton's CPU interpreter. `@triton.jit` decides between interpreted and
compiled when a kernel module is imported, and nothing imports one before its first Triton call (see
blip3o_engine.ops.dit_ops), so setting TRITON_INTERPRET here — at collection of this folder, before any
of its tests runs — is early enough even when the whole suite runs in one process. With CUDA it stays
unset: the kernels compile for the GPU, the `gpu` tests run them, and the interpreter tests skip.
"""

from __future__ import annotations

import collections
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def interpreted() -> None:
    """Skips on CUDA machines (kernels compiled for the GPU); fails if the kernels were loaded compiled
    on a CPU-only machine, which would mean something imported them before this conftest ran."""
    from triton.runtime.interpreter import InterpretedFunction

    from blip3o_engine.kernels.triton import kernel_modules

    if torch.cuda.is_available():
        pytest.skip("CUDA present: kernels are compiled for the GPU, interpreter tests skipped")
    for module in kernel_modules():
        for name in dir(module):
            if name.endswith("_kernel"):
                assert isinstance(getattr(module, name), InterpretedFunction), (
                    f"{module.__name__}.{name} was imported before TRITON_INTERPRET=1 was set")


class _CountingKernel:
    """Stands in for a `@triton.jit` kernel in its module and counts `kernel[grid](...)` launches."""

    def __init__(self, kernel, name: str, counts: collections.Counter) -> None:
        self.kernel, self.name, self.counts = kernel, name, counts

    def __getitem__(self, grid):
        self.counts[self.name] += 1
        return self.kernel[grid]


@pytest.fixture
def launches(monkeypatch, interpreted) -> collections.Counter:
    """Launch counts per kernel name, for the duration of one test."""
    from blip3o_engine.kernels.triton import kernel_modules

    counts: collections.Counter = collections.Counter()
    for module in kernel_modules():
        for name in dir(module):
            if name.endswith("_kernel"):
                monkeypatch.setattr(module, name, _CountingKernel(getattr(module, name), name, counts))
    return counts
