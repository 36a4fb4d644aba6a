"""Ahead-of-time exports of BLIP3-o's stages: ONNX, AOTInductor, TensorRT, a Triton model repository.

    blip3o-engine export --model tiny --format onnx -o tiny-onnx
    engine = blip3o_engine.Engine.from_exported("tiny-onnx", runtime="onnxruntime")

Modules: `stages` (the exportable wrappers and their I/O), `manifest` (artifact format), `onnx`,
`aoti`, `tensorrt` (writers), `triton_server` (model repository + Python-backend model), `runtimes`
(exported graphs as callables), `pipeline` (the engine over them), `api` (`export`, `from_exported`).
Optional packages: `pip install 'blip3o-engine[export]'` (onnx, onnxruntime, onnxscript, tritonclient).
"""

from __future__ import annotations

from .api import FORMATS, RUNTIMES, available_stages, export, from_exported, load_stages
from .manifest import Manifest
from .stages import STAGES

__all__ = ["export", "from_exported", "load_stages", "available_stages", "Manifest", "FORMATS", "RUNTIMES", "STAGES"]
