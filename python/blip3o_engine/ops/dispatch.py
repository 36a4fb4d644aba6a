"""The one dispatch point of every op: the Triton/CUDA kernel, or its plain-torch twin.

Models call the public ops (`ops.rms_norm`, `ops.swiglu`, ...) and never choose an implementation
themselves; what runs is decided here, per call, from the dispatch mode and the tensor's device:

- "auto" (the default): the kernel when the input lives on CUDA and triton is installed, else the twin.
  This is what the optimized backend runs, on every device.
- "reference": always the twin. The reference backend runs its model calls inside `reference_ops()`,
  so on a GPU it is still the readable oracle, not the kernels it is meant to check.
- "kernel": always the kernel, whatever the device (`force_triton()`; tests run it on CPU under
  TRITON_INTERPRET=1, set before the kernel modules load). BLIP3O_FORCE_TRITON=1 selects it at import.

The mode is a context variable: each thread (an AsyncEngine's step loop, a test) sees its own setting.
Under torch.compile and CUDA-graph capture the choice is made once, at trace/capture time (`mode` is an
assumed-constant result for dynamo).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from collections.abc import Iterator

import torch
from torch import Tensor

HAS_TRITON = importlib.util.find_spec("triton") is not None
MODES = ("auto", "reference", "kernel")

_MODE: contextvars.ContextVar[str] = contextvars.ContextVar(
    "blip3o_ops_mode", default="kernel" if os.environ.get("BLIP3O_FORCE_TRITON") == "1" else "auto")


@torch.compiler.assume_constant_result  # torch.compile reads it once, at trace time (it cannot trace ContextVar)
def mode() -> str:
    """The dispatch mode in effect in this thread (see the module docstring)."""
    return _MODE.get()


@contextlib.contextmanager
def dispatch_mode(new_mode: str) -> Iterator[None]:
    """Run the block's ops in `new_mode` ("auto", "reference" or "kernel")."""
    if new_mode not in MODES:
        raise ValueError(f"unknown dispatch mode {new_mode!r}; choose one of {MODES}")
    token = _MODE.set(new_mode)
    try:
        yield
    finally:
        _MODE.reset(token)


def reference_ops() -> contextlib.AbstractContextManager[None]:
    """Every op inside the block runs its torch twin (the reference backend's setting)."""
    return dispatch_mode("reference")


def force_triton(enabled: bool = True) -> contextlib.AbstractContextManager[None]:
    """Route every op through its Triton kernel (or, with `enabled=False`, never) inside the block.
    On CPU tensors this needs TRITON_INTERPRET=1 set before the kernels load."""
    return dispatch_mode("kernel" if enabled else "reference")


def reference_mode() -> bool:
    """Whether the reference backend is running (models then skip the engine's fused projections too)."""
    return mode() == "reference"


def use_kernel(x: Tensor) -> bool:
    """Whether an op called on `x` runs its kernel."""
    m = mode()
    if m == "auto":
        return HAS_TRITON and x.is_cuda
    return m == "kernel" and HAS_TRITON


def check(ok: bool, op: str, message: str, *args: object) -> None:
    """Raise ValueError(f"{op}: {message}") unless `ok`. `message` is a str.format template filled with
    `args` only on failure: checks run on every call of the hot path, formatting would not be free."""
    if not ok:
        raise ValueError(f"{op}: {message.format(*args) if args else message}")


__all__ = ["HAS_TRITON", "MODES", "check", "dispatch_mode", "force_triton", "mode", "reference_mode",
           "reference_ops", "use_kernel"]
