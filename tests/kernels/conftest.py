"""tests/kernels: Triton kernels vs their torch references.

Without CUDA the kernels run in Triton's CPU interpreter: tests/conftest.py sets TRITON_INTERPRET=1
before any test module is collected (`import triton` decides for triton.language's own helpers, and
`import torch._dynamo` imports triton). With CUDA it stays unset: the kernels compile for the GPU, the
`gpu` tests run them, and the interpreter tests skip.
"""

from __future__ import annotations

import collections

import pytest
import torch



@pytest.fixture
def interpreted() -> None:
    """Skips on CUDA machines (kernels compiled for the GPU); fails if the kernels were loaded compiled
    on a CPU-only machine, which would mean something imported them before this conftest ran."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    from blip3o_engine.kernels.triton import kernel_modules

    if torch.cuda.is_available():
        pytest.skip("CUDA present: kernels are compiled for the GPU, interpreter tests skipped")
    assert isinstance(tl.zeros, InterpretedFunction), "triton was imported before TRITON_INTERPRET=1 was set"
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
