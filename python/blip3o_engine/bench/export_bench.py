"""`bench export`: each exported graph on its runtimes against the in-process module.

The graphs of the llm, dit, unet and vae stages are exported to ONNX and AOTInductor packages (into
`--export-dir`, reused when it already holds them, else a temporary directory; the export time per
graph goes to the compile_ms column), then each graph is timed on random inputs at its "opt"
profile point (CFG batch 2 for the DiT/UNet, the native image size, a 128-token prefill, one decode
token after 128 cached) on:
- reference: the wrapper module in-process (eager torch, the engine's models),
- onnxruntime: an onnxruntime CPU session (as many threads as torch uses),
- aoti: the AOTInductor package loaded with `aoti_load_package`.
Every backend sees the same inputs; the outputs are checked against the module's before timing, so
a row is never the time of a wrong answer.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..export.api import export, load_stages
from ..export.manifest import Manifest
from ..export.stages import ExportSettings, StageGraph, build_graphs
from ..engine import Engine
from . import costs
from .stages import REFERENCE, StageResult, Workload
from .timing import Timer

EXPORT_STAGES = ["llm", "dit", "unet", "vae"]
FORMATS = {"onnxruntime": "onnx", "aoti": "aoti"}
# Largest |exported - module| accepted before timing, relative to the output's largest magnitude: the
# graphs reorder fp32 sums (fusions, other GEMM kernels), nothing more.
MAX_REL_ERR = 1e-3


def graph_cost(graph: StageGraph, engine: Engine, values: dict[str, int], bpp: float) -> costs.Cost | None:
    cfg = engine.cfg
    if graph.name == "unet":
        return costs.unet_step(cfg.unet, values["batch"], values["height"], values["width"], cfg.n_query,
                               bytes_per_param=bpp)
    if graph.name == "vae":
        return costs.vae_decode(cfg.vae, values["batch"], values["height"], values["width"], bytes_per_param=bpp)
    if graph.name == "dit":  # the step graph projects the cross K/V itself; the floor also counts the
        # caption projection (dit_caption's two linears), a few % of a step: a slightly generous floor
        return costs.dit_step(cfg.dit, values["batch"], hoisted=False, bytes_per_param=bpp)
    if graph.name == "llm_prefill":
        return costs.llm_prefill(cfg.text, values["sequence_length"], values["batch_size"], logits_tokens=1,
                                 bytes_per_param=bpp)
    if graph.name == "llm_decode":
        return costs.llm_prefill(cfg.text, values["sequence_length"], values["batch_size"],
                                 past=values["past_sequence_length"], logits_tokens=1, bytes_per_param=bpp)
    return None


def images_of(graph: str, values: dict[str, int]) -> int:
    """The CSV's batch column counts images / sequences: the DiT and UNet graphs see 2 rows per image (CFG)."""
    if graph in ("unet", "dit", "dit_caption"):
        return max(1, values["batch"] // 2)
    return values.get("batch", values.get("batch_size", 1))


def run_export(w: Workload, engine: Engine, timer: Timer, export_dir: str | None, log,
               emit: Callable[[list[StageResult]], None] | None = None) -> list[StageResult]:
    policy = w.settings.policy
    root = Path(export_dir) if export_dir else Path(tempfile.mkdtemp(prefix="blip3o-bench-export-"))
    graphs = {g.name: g for g in build_graphs(engine.model, EXPORT_STAGES, ExportSettings(), engine.model.dtype,
                                              engine.device)}
    runners: dict[str, dict[str, Callable]] = {REFERENCE: {}}
    export_ms: dict[str, dict[str, float]] = {}
    for backend, fmt in FORMATS.items():
        runners[backend], export_ms[backend] = {}, {}
        for stage in EXPORT_STAGES:
            stage_dir = root / fmt / stage
            try:
                manifest = Manifest.read(stage_dir)
            except Exception:
                log(f"  exporting {stage} to {fmt} ...")
                start = time.perf_counter()
                manifest = export(engine, stage_dir, format=fmt, stages=[stage], overwrite=True, progress=False)
                per_graph = (time.perf_counter() - start) * 1e3 / len(manifest.graphs)
                export_ms[backend].update({name: per_graph for name in manifest.graphs})
            _, fns = load_stages(stage_dir, backend, engine.device, manifest, threads=torch.get_num_threads())
            runners[backend].update(fns)
    gen = torch.Generator().manual_seed(w.settings.seed)
    results: list[StageResult] = []
    for name, graph in graphs.items():
        values = graph.profile_values("opt")
        args = graph.make_inputs(values, gen)
        feeds = {s.name: a for s, a in zip(graph.inputs, args)}
        with torch.inference_mode():
            expected = graph.module(*args)
        expected = expected if isinstance(expected, tuple) else (expected,)
        cost = graph_cost(graph, engine, values, w.bpp)
        shape = "axes=" + ",".join(f"{k}:{v}" for k, v in values.items())
        stage_results = []
        for backend in (REFERENCE, *FORMATS):
            if backend == REFERENCE:
                def call(args=args):
                    return graph.module(*args)
            else:
                fn = runners[backend][name]
                got = fn(feeds)
                err = max(float((got[s.name].float() - e.float()).abs().max() / e.float().abs().max().clamp_min(1e-6))
                          for s, e in zip(graph.outputs, expected))
                if err > MAX_REL_ERR:
                    raise RuntimeError(f"{backend} {name}: relative error {err:.2e} vs the module; not timing it")

                def call(fn=fn):
                    return fn(feeds)
            timing = timer.measure(lambda call=call: _no_grad(call), policy)
            compile_ms = export_ms.get(backend, {}).get(name)
            what = "in-process module" if backend == REFERENCE else f"{FORMATS[backend]} export"
            stage_results.append(StageResult(f"export_{name}", backend, images_of(name, values), timing, cost,
                                             compile_ms, (shape, what)))
            log(f"  export_{name:<14} {backend:<12} median {timing.median_ms:10.3f} ms")
        if emit is not None:
            emit(stage_results)
        results += stage_results
    return results


def _no_grad(call):
    with torch.inference_mode():
        return call()


__all__ = ["run_export", "EXPORT_STAGES"]
