"""Exported graphs as callables: `runner(feeds: {input name: tensor}) -> {output name: tensor}`.

One class per runtime (onnxruntime sessions, AOTInductor packages, TensorRT plans), all with the same
interface over torch tensors, so the pipeline (`pipeline.py`) and the Triton Python model do not care
which runtime computes a stage.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import ExportError
from .manifest import GraphEntry
from .stages import torch_dtype

RUNTIMES = ("onnxruntime", "aoti", "tensorrt")
ARTIFACT_OF_RUNTIME = {"onnxruntime": "onnx", "aoti": "aoti", "tensorrt": "tensorrt"}
StageFn = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


class OnnxRuntimeStage:
    """An onnxruntime session. Tensors cross as numpy arrays (CPU copies; on CUDA a real deployment
    would bind device buffers through IO binding)."""

    def __init__(self, path: Path, entry: GraphEntry, device: torch.device, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ExportError("runtime='onnxruntime' needs the 'onnxruntime' package: "
                              "pip install 'blip3o-engine[export]'") from e
        for spec in entry.inputs + entry.outputs:
            if spec.dtype == "bfloat16":
                raise ExportError(f"{entry.name}: onnxruntime through numpy cannot feed bfloat16 ({spec.name}); "
                                  "export with --dtype float32 or float16")
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ExportError("onnxruntime has no CUDAExecutionProvider here: install onnxruntime-gpu")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        # Idle intra-op threads sleep instead of spinning: the engine interleaves torch work (samplers,
        # embeddings) between graph calls, and spinning threads would compete with it for the cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        self.entry = entry
        self.device = device
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.output_names = [s.name for s in entry.outputs]

    def __call__(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        arrays = {s.name: feeds[s.name].detach().to("cpu", torch_dtype(s.dtype)).contiguous().numpy()
                  for s in self.entry.inputs}
        outs = self.session.run(self.output_names, arrays)
        return {n: torch.from_numpy(o).to(self.device) for n, o in zip(self.output_names, outs)}


class AOTIStage:
    """An AOTInductor package (`aoti_load_package`), called with the graph's inputs in order."""

    def __init__(self, path: Path, entry: GraphEntry, device: torch.device):
        built_for = torch.device(entry.extra.get("device", "cpu"))
        if built_for.type != device.type:
            raise ExportError(f"{path.name} was compiled for {built_for.type}, not {device.type}: "
                              f"export again on the target device")
        self.entry = entry
        self.device = device
        index = device.index if device.type == "cuda" and device.index is not None else -1
        self.model = torch._inductor.aoti_load_package(str(path), device_index=index)

    def __call__(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        args = [feeds[s.name].to(self.device, torch_dtype(s.dtype)).contiguous() for s in self.entry.inputs]
        with torch.inference_mode():
            outs = self.model(*args)
        if isinstance(outs, torch.Tensor):
            outs = [outs]
        return {s.name: o for s, o in zip(self.entry.outputs, outs)}


def load_stage(root: Path, entry: GraphEntry, runtime: str, device: torch.device, threads: int | None = None) -> StageFn:
    """The graph `entry` of the export at `root` as a callable on `runtime`."""
    if runtime not in RUNTIMES:
        raise ExportError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    kind = ARTIFACT_OF_RUNTIME[runtime]
    if kind not in entry.artifacts:
        raise ExportError(f"graph {entry.name!r} has no {kind} artifact in this export (it has: "
                          f"{', '.join(entry.artifacts) or 'none'}); export with the matching --format")
    path = root / entry.artifacts[kind]
    if runtime == "onnxruntime":
        return OnnxRuntimeStage(path, entry, device, threads)
    if runtime == "aoti":
        return AOTIStage(path, entry, device)
    from .tensorrt import TensorRTRunner

    return TensorRTRunner(path, device)


__all__ = ["RUNTIMES", "StageFn", "OnnxRuntimeStage", "AOTIStage", "load_stage"]
