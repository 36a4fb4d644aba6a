"""Exports of the tiny model, made once per test session (exporting and compiling dominate the time).

- `triton_repo`: `--format triton` with every stage (ViT for two grids): its ONNX files serve the ONNX
  checks, the onnxruntime stage and end-to-end checks, and the Triton checks.
- `aoti_export`: `--format aoti` of what text-to-image needs (llm_prefill, dit, unet, vae): five gcc
  compiles, the bulk of this directory's time.
"""

from __future__ import annotations

import pytest
from _export_util import TINY_SIZES, VIT_GRIDS  # tests/export is on sys.path under pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="session")
def triton_repo(tiny_engine, tmp_path_factory):
    from blip3o_engine.export import export

    out = tmp_path_factory.mktemp("export") / "triton"
    export(tiny_engine, out, format="triton", sizes=TINY_SIZES, vit_grids=VIT_GRIDS, max_batch=4, progress=False)
    return out


@pytest.fixture(scope="session")
def aoti_export(tiny_engine, tmp_path_factory):
    from blip3o_engine.export import export

    out = tmp_path_factory.mktemp("export") / "aoti"
    # O0 for the generated wrapper: compile time, not speed, matters in tests (kernels keep their -O3).
    export(tiny_engine, out, format="aoti", stages=["llm_prefill", "dit", "unet", "vae"], sizes=TINY_SIZES,
           aoti_configs={"aot_inductor.compile_wrapper_opt_level": "O0"}, progress=False)
    return out
