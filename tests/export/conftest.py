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


def _shared_export(tmp_path_factory, worker_id: str, name: str, **kwargs):
    """Export once per test run: under pytest-xdist the workers share one directory of the run (a file
    lock lets the first build it; a finished export is the one with a manifest), else a session dir."""
    from filelock import FileLock

    from blip3o_engine.export import export
    from blip3o_engine.export.manifest import MANIFEST_NAME

    base = tmp_path_factory.getbasetemp()
    root = base.parent if worker_id != "master" else base  # xdist: <run>/popen-gwN -> <run>
    out = root / f"export-{name}"
    with FileLock(str(root / f"export-{name}.lock")):
        if not (out / MANIFEST_NAME).is_file():
            export(kwargs.pop("engine"), out, overwrite=True, progress=False, **kwargs)
    return out


@pytest.fixture(scope="session")
def worker_id(request) -> str:
    """pytest-xdist's worker id ("gw0", ...), or "master" without xdist (xdist's own fixture, when absent)."""
    return getattr(request.config, "workerinput", {}).get("workerid", "master")


@pytest.fixture(scope="session")
def triton_repo(tiny_engine, tmp_path_factory, worker_id):
    return _shared_export(tmp_path_factory, worker_id, "triton", engine=tiny_engine, format="triton",
                          sizes=TINY_SIZES, vit_grids=VIT_GRIDS, max_batch=4)


@pytest.fixture(scope="session")
def aoti_export(tiny_engine, tmp_path_factory, worker_id):
    # O0 for the generated wrapper: compile time, not speed, matters in tests (kernels keep their -O3).
    return _shared_export(tmp_path_factory, worker_id, "aoti", engine=tiny_engine, format="aoti",
                          stages=["llm_prefill", "dit", "unet", "vae"], sizes=TINY_SIZES,
                          aoti_configs={"aot_inductor.compile_wrapper_opt_level": "O0"})
