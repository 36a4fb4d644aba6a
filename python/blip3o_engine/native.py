"""The compiled C++ host runtime, `blip3o_engine._C`, imported in one place.

Import native objects from here rather than from `_C` directly, so that a missing or stale build
fails with a message that says how to fix it instead of a bare "cannot import name '_C'".
"""

from __future__ import annotations

import sys

try:
    from blip3o_engine import _C
except ImportError as exc:
    raise ImportError(
        f"blip3o_engine._C, the compiled C++ runtime, cannot be imported for Python "
        f"{sys.version.split()[0]} ({exc}). Reinstall the package from its source tree on a "
        "machine with a C++17 compiler and CMake: `pip install -e .`"
    ) from exc

BatchBuilder = _C.BatchBuilder
BlockAllocator = _C.BlockAllocator
OutOfBlocksError = _C.OutOfBlocksError
InvariantError = _C.InvariantError

__all__ = ["BatchBuilder", "BlockAllocator", "InvariantError", "OutOfBlocksError"]
