"""ONNX files from the traced stages: torch's dynamo exporter (onnxscript), then names and checks.

Each graph is exported from its `torch.export` program (the same trace the AOTInductor path compiles),
at opset >= 18. Weights go to an external data file (`<name>.onnx.data`) when the model passes the
2 GB protobuf limit (the exporter decides by size). After saving, the dynamic dimensions of the
inputs and outputs are given the axis names of the stage table (`batch`, `height`,
`past_sequence_length + sequence_length`, ...) instead of the exporter's symbols, and the file is
checked with `onnx.checker` including shape inference.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from ..errors import ExportError
from .stages import IOSpec, StageGraph

MIN_OPSET = 18
DEFAULT_OPSET = 18


def require_onnx() -> None:
    """Fail early, with the package to install, when the ONNX toolchain is missing."""
    missing = []
    for module in ("onnx", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ExportError(f"ONNX export needs the packages {', '.join(missing)}: pip install 'blip3o-engine[export]'")


def write_onnx(graph: StageGraph, program: torch.export.ExportedProgram, path: Path, opset: int = DEFAULT_OPSET,
               external_data: bool | None = None) -> list[Path]:
    """Export `program` to `path`; the weights go to `<path>.data` when `external_data`, or (None) when
    the model passes the 2 GB protobuf limit. Returns the files written."""
    require_onnx()
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: the exported graphs need opset >= {MIN_OPSET}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet_exporter():
        try:
            onnx_program = torch.onnx.export(program, (), dynamo=True, opset_version=opset,
                                             input_names=[s.name for s in graph.inputs],
                                             output_names=[s.name for s in graph.outputs], verbose=False)
        except Exception as e:
            raise ExportError(f"ONNX export of graph {graph.name!r} failed: {str(e)[:2000]}") from e
        onnx_program.save(str(path), external_data=external_data)
    name_dynamic_dims(path, graph.inputs, graph.outputs)
    check_onnx(path)
    data = path.with_name(path.name + ".data")
    return [path, data] if data.is_file() else [path]


def name_dynamic_dims(path: Path, inputs: list[IOSpec], outputs: list[IOSpec]) -> None:
    """Rename the graph's dynamic dims to the stage table's axis names (weights stay where they are)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    specs = {s.name: s for s in [*inputs, *outputs]}
    for value in [*model.graph.input, *model.graph.output]:
        spec = specs.get(value.name)
        if spec is None:
            raise ExportError(f"{path.name}: unexpected graph I/O {value.name!r}")
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(spec.shape):
            raise ExportError(f"{path.name}: {value.name} has rank {len(dims)}, expected {len(spec.shape)}")
        for dim, want in zip(dims, spec.shape):
            if isinstance(want, str):
                dim.dim_param = want.replace(" ", "")
            elif dim.HasField("dim_value") and dim.dim_value != want:
                raise ExportError(f"{path.name}: {value.name} has size {dim.dim_value} where {want} was expected")
    onnx.save(model, str(path))


def check_onnx(path: Path) -> None:
    """onnx.checker with full shape inference (by path, so files with external data work too)."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{path.name} fails onnx.checker: {e}") from e


class _quiet_exporter:
    """The exporter logs each of its phases and warns about torchvision ops it skips: keep stderr for
    our own progress bar."""

    def __enter__(self):
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")
        self._loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
        self._levels = [lg.level for lg in self._loggers]
        for lg in self._loggers:
            lg.setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc):
        for lg, level in zip(self._loggers, self._levels):
            lg.setLevel(level)
        self._warnings.__exit__(*exc)
        return False


__all__ = ["write_onnx", "check_onnx", "require_onnx", "name_dynamic_dims", "MIN_OPSET", "DEFAULT_OPSET"]
