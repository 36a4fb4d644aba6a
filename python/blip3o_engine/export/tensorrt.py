"""TensorRT engines (`.plan`) built from the exported ONNX files, and a runner for them.

UNVERIFIED: TensorRT cannot be installed on the machines this project is developed and tested on
(PyPI's `tensorrt` wheels fetch their libraries from NVIDIA's own index), so this module is written
against the documented TensorRT 10 Python API (`tensorrt.Builder`, `OnnxParser`, optimization
profiles, `IExecutionContext.execute_async_v3`) and has never run. Without the package every entry
point raises `ExportError` naming it, and the tests skip with that reason.

Build: one plan per graph from its ONNX file, one optimization profile from the manifest's min/opt/max
axis values, FP16 or BF16 builder flags from the requested dtype (the ONNX stays fp32; TensorRT picks
the precision per layer), a timing cache file shared by all graphs of the export (reused when the
directory is exported again), and the builder optimization level.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ExportError
from .stages import IOSpec, dim_value

TIMING_CACHE = "timing.cache"
PACKAGE = "tensorrt"


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise ExportError(f"the TensorRT path needs the '{PACKAGE}' package (pip install 'blip3o-engine[tensorrt]' "
                          f"on a machine with an NVIDIA GPU and driver): {e}") from e
    return trt


def compute_capability() -> str:
    if not torch.cuda.is_available():
        raise ExportError("building TensorRT engines needs a CUDA GPU; none is available")
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def profile_shapes(specs: list[IOSpec], profiles: dict[str, dict[str, int]]) -> dict[str, tuple[tuple, tuple, tuple]]:
    """(min, opt, max) shape of every input from the min/opt/max axis values."""
    return {s.name: tuple(tuple(dim_value(d, profiles[p]) for d in s.shape) for p in ("min", "opt", "max"))
            for s in specs}


def build_plan(onnx_path: Path, plan_path: Path, inputs: list[IOSpec], profiles: dict[str, dict[str, int]],
               dtype: torch.dtype, timing_cache: Path, optimization_level: int = 3,
               workspace_bytes: int | None = None) -> Path:
    """Parse `onnx_path`, build a serialized engine for the profile and write it to `plan_path`."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads the external data beside the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    if dtype == torch.float16:
        config.set_flag(trt.BuilderFlag.FP16)
    elif dtype == torch.bfloat16:
        config.set_flag(trt.BuilderFlag.BF16)
    config.builder_optimization_level = optimization_level
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile_shapes(inputs, profiles).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine for {onnx_path.name} (see the log above)")
    plan_path.write_bytes(bytes(serialized))
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return plan_path


_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
                 "INT32": torch.int32, "BOOL": torch.bool, "UINT8": torch.uint8}


class TensorRTRunner:
    """A deserialized plan as a callable: dict of named CUDA tensors in, dict of named tensors out."""

    def __init__(self, plan_path: Path, device: torch.device):
        trt = import_tensorrt()
        if device.type != "cuda":
            raise ExportError("TensorRT plans run on a CUDA device; pass device='cuda'")
        self.device = device
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise ExportError(f"TensorRT cannot load {plan_path.name} (built for another GPU or TensorRT version?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def __call__(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        stream = torch.cuda.current_stream(self.device)
        keep = {}
        for name in self.inputs:
            t = feeds[name].to(self.device).contiguous()
            keep[name] = t
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        out = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = _TORCH_DTYPES[self.engine.get_tensor_dtype(name).name]
            out[name] = torch.empty(shape, dtype=dtype, device=self.device)
            self.context.set_tensor_address(name, out[name].data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ExportError("TensorRT execution failed")
        return out


__all__ = ["build_plan", "TensorRTRunner", "import_tensorrt", "compute_capability", "profile_shapes", "TIMING_CACHE"]
