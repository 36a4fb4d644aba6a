"""AOTInductor packages from the traced stages: `torch._inductor.aoti_compile_and_package`.

A package (`<name>.pt2`) holds the compiled kernels and the weights for the device the stage was
traced on (the engine's device); `aoti_load_package` loads it back as a callable with the graph's
positional inputs. Compiling needs a C++ compiler (gcc on CPU) and takes tens of seconds per graph
on a small machine.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..errors import ExportError
from .stages import StageGraph


def write_aoti(graph: StageGraph, program: torch.export.ExportedProgram, path: Path,
               inductor_configs: dict | None = None) -> list[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = torch._inductor.aoti_compile_and_package(program, package_path=str(path),
                                                           inductor_configs=inductor_configs or {})
        except Exception as e:
            raise ExportError(f"AOTInductor compile of graph {graph.name!r} failed: {str(e)[:2000]}") from e
    return [Path(out)]


__all__ = ["write_aoti"]
