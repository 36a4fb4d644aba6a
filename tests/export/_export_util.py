"""Settings shared by the export tests and their fixtures."""

from __future__ import annotations

import os

# The small-preset checks export and compile a 10x larger model: minutes. Run them with
# BLIP3O_RUN_SLOW=1 python -m pytest -m slow tests/export
RUN_SLOW = os.environ.get("BLIP3O_RUN_SLOW") == "1"
TINY_SIZES = [(64, 64), (32, 48)]  # pixels: the native size (opt) and a smaller non-square one
VIT_GRIDS = [(1, 32, 32), (1, 8, 12)]  # a 448x448 image's grid (image-conditioned T2I) and a small one
