"""`export(engine, out_dir, format)` and `from_exported(dir, runtime)`: the two entry points.

    import blip3o_engine as b3
    from blip3o_engine.export import export

    eng = b3.Engine.from_pretrained("tiny")
    export(eng, "tiny-onnx", format="onnx")                         # or "aoti", "tensorrt", "triton"
    exported = b3.Engine.from_exported("tiny-onnx", runtime="onnxruntime")
    exported.generate_image("a red apple", b3.ImageParams(seed=0)).image.save("apple.png")

Every graph is traced once with `torch.export` (stages.py) and then written in the requested format;
the tensors that are not graphs and the model's config and tokenizer files go beside them, and
`manifest.json` (manifest.py), written last, lists it all with sha256s.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch

from ..errors import ExportError
from .manifest import FORMATS, GraphEntry, Manifest, config_hash
from .pipeline import CONFIG_DIR, WEIGHTS_FILE, build_engine
from .runtimes import RUNTIMES, load_stage
from .stages import IMAGE_STAGES, STAGE_CHOICES, STAGES, ExportSettings, StageGraph, build_graphs, torch_dtype_name, trace

TRITON_T2I_MODEL = "blip3o_t2i"


def available_stages(engine) -> list[str]:
    return [s for s in STAGES if s not in IMAGE_STAGES or engine.cfg.can_generate_images]


def _check_stages(engine, stages: list[str] | None) -> list[str]:
    have = available_stages(engine)
    if stages is None:
        return have
    unknown = [s for s in stages if s not in STAGE_CHOICES]
    if unknown:
        raise ExportError(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGE_CHOICES)}")
    missing = [s for s in stages if s in STAGES and s not in have]
    if missing:
        raise ExportError(f"model {engine.name!r} has no {', '.join(missing)} stage (it cannot generate images)")
    if "llm" in stages and "llm_prefill" in stages:
        stages = [s for s in stages if s != "llm_prefill"]
    return [s for s in STAGE_CHOICES if s in stages]  # canonical order


def _prepare_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"{out} is not empty: pass overwrite=True (--overwrite) to replace its contents")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _export_model(engine, dtype: torch.dtype):
    """The engine's model in the export dtype (a converted copy only when the dtypes differ)."""
    model = engine.model
    return model if model.dtype == dtype else copy.deepcopy(model).to(dtype)


def _layout(fmt: str, graph: StageGraph, triton_tensorrt: bool) -> dict[str, str]:
    """Relative path of each artifact of a graph: flat files, or Triton's <model>/1/model.* layout."""
    if fmt == "triton":
        return {"tensorrt": f"{graph.name}/1/model.plan"} if triton_tensorrt else {"onnx": f"{graph.name}/1/model.onnx"}
    if fmt == "aoti":
        return {"aoti": f"{graph.name}.pt2"}
    if fmt == "tensorrt":
        return {"onnx": f"{graph.name}.onnx", "tensorrt": f"{graph.name}.plan"}
    return {"onnx": f"{graph.name}.onnx"}


def export(engine, out_dir: str | Path, format: str = "onnx", stages: list[str] | None = None,
           dtype: str | torch.dtype | None = None, max_batch: int = 4, sizes: list[tuple[int, int]] | None = None,
           max_seq_len: int = 2048, vit_grids: list[tuple[int, int, int]] | None = None, opset: int = 18,
           overwrite: bool = False, triton_platform: str = "onnxruntime_onnx", trt_optimization_level: int = 3,
           aoti_configs: dict | None = None, progress: bool = True) -> Manifest:
    """Export `engine`'s stages to `out_dir` in `format` (onnx | aoti | tensorrt | triton); see the module
    docstring. stages: subset of vit, llm, dit, unet, vae (default: all the model has). dtype: of the graphs
    (default: the engine's; TensorRT builds from fp32 ONNX and takes dtype as its precision flag, default
    float16). max_batch, sizes (pixels, (H, W)), max_seq_len: the profiles of the dynamic axes.
    vit_grids: image grids (t, h, w in patches) to export ViT graphs for (default: a 448x448 image's)."""
    from ..config import dtype_from_name

    if format not in FORMATS:
        raise ExportError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if triton_platform not in ("onnxruntime_onnx", "tensorrt_plan"):
        raise ExportError(f"unknown Triton platform {triton_platform!r}: onnxruntime_onnx or tensorrt_plan")
    if max_batch < 1 or max_seq_len < 1:
        raise ExportError("max_batch and max_seq_len must be >= 1")
    stages = _check_stages(engine, stages)
    uses_trt = format == "tensorrt" or (format == "triton" and triton_platform == "tensorrt_plan")
    precision = dtype_from_name(dtype) if dtype is not None else (torch.float16 if uses_trt else engine.model.dtype)
    graph_dtype = torch.float32 if uses_trt else precision  # TensorRT takes fp32 ONNX + a precision flag
    if format in ("onnx", "triton") and graph_dtype == torch.bfloat16:
        raise ExportError("ONNX exports for onnxruntime support float32 and float16; for bfloat16 use "
                          "--format aoti or tensorrt")
    settings = ExportSettings(max_batch=max_batch, sizes=tuple(sizes or ()), max_seq_len=max_seq_len,
                              vit_grids=tuple(tuple(g) for g in vit_grids or ()))
    if settings.sizes and engine.cfg.can_generate_images:
        for h, w in settings.sizes:
            engine.image_size(_image_params(height=h, width=w))  # InputError when not a legal size
    if uses_trt:
        from .tensorrt import compute_capability, import_tensorrt

        import_tensorrt()  # fail before minutes of tracing
        capability = compute_capability()
    else:
        from .onnx import require_onnx

        if format != "aoti":
            require_onnx()

    out = Path(out_dir)
    _prepare_dir(out, overwrite)
    model = _export_model(engine, graph_dtype)
    device = engine.device
    graphs = build_graphs(model, stages, settings, graph_dtype, device)
    manifest = Manifest(format, engine.name, config_hash(engine.cfg), torch_dtype_name(graph_dtype), str(device),
                        settings={"stages": stages, "max_batch": max_batch, "sizes": [list(s) for s in settings.sizes],
                                  "max_seq_len": max_seq_len, "precision": torch_dtype_name(precision)})
    if format != "aoti":
        manifest.extra["opset"] = opset
    if uses_trt:
        manifest.extra["tensorrt"] = {"compute_capability": capability, "optimization_level": trt_optimization_level,
                                      "precision": torch_dtype_name(precision)}
    bar = _progress(graphs, progress)
    for graph in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(graph.name)
        artifacts = _layout(format, graph, triton_platform == "tensorrt_plan")
        files = _write_graph(graph, out, artifacts, format, opset, precision, trt_optimization_level, aoti_configs)
        rel = [str(p.relative_to(out)) for p in files]
        entry = GraphEntry.from_graph(graph, artifacts, rel, **({"device": str(device)} if format == "aoti" else {}))
        if format == "triton" or format == "tensorrt":
            # Triton keeps only the runtime's file per model; a plain tensorrt export also keeps the ONNX.
            entry.artifacts = {k: v for k, v in artifacts.items() if (out / v).is_file()}
        manifest.graphs[graph.name] = entry
        manifest.add_files(out, rel)
    asset_root = f"{TRITON_T2I_MODEL}/1/" if format == "triton" else ""
    manifest.assets = _write_assets(engine, model, out, asset_root)
    manifest.add_files(out, _asset_files(out, manifest.assets))
    if format == "triton":
        from .triton_server import write_repository

        manifest.add_files(out, write_repository(out, manifest, engine.device))
    if uses_trt:
        from .tensorrt import TIMING_CACHE

        manifest.extra["tensorrt"]["timing_cache"] = TIMING_CACHE  # not hashed: it changes with every build
    manifest.write(out)
    return manifest


def _image_params(**kwargs):
    from ..params import ImageParams

    return ImageParams(**kwargs)


def _progress(graphs: list[StageGraph], progress: bool):
    if not progress:
        return graphs
    from tqdm.auto import tqdm

    return tqdm(graphs, desc="export", unit="graph")


def _write_graph(graph: StageGraph, out: Path, artifacts: dict[str, str], fmt: str, opset: int,
                 precision: torch.dtype, trt_level: int, aoti_configs: dict | None) -> list[Path]:
    program = trace(graph)
    files: list[Path] = []
    if fmt == "aoti":
        from .aoti import write_aoti

        return write_aoti(graph, program, out / artifacts["aoti"], aoti_configs)
    from .onnx import write_onnx

    onnx_path = out / artifacts.get("onnx", f"{graph.name}.onnx")
    files += write_onnx(graph, program, onnx_path, opset)
    if "tensorrt" in artifacts:
        from .tensorrt import TIMING_CACHE, build_plan

        profiles = {p: graph.profile_values(p) for p in ("min", "opt", "max")}
        files.append(build_plan(onnx_path, out / artifacts["tensorrt"], graph.inputs, profiles, precision,
                                out / TIMING_CACHE, trt_level))
        if "onnx" not in artifacts:  # Triton with TensorRT: the ONNX was only the plan's source
            for f in files[:-1]:
                f.unlink()
            files = files[-1:]
    return files


def _write_assets(engine, model, out: Path, root: str) -> dict[str, str]:
    """weights.safetensors (what is not a graph) and config/ (configs, tokenizer, image processor)."""
    from safetensors.torch import save_file

    from ..tiny import _write_json

    weights = {"embed_tokens.weight": model.text.embed_tokens.weight.detach().cpu().contiguous()}
    if model.queries is not None:
        weights["latent_queries"] = model.queries.weight.detach().cpu().contiguous()
    (out / root).mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / root / WEIGHTS_FILE), metadata={"format": "pt"})

    cfg, special = engine.cfg, engine.special
    config_dir = out / root / CONFIG_DIR
    config_dir.mkdir(parents=True, exist_ok=True)
    token_ids = {"image_token_id": special.image_pad, "vision_start_token_id": special.vision_start,
                 "vision_end_token_id": special.vision_end, "eos_token_id": special.im_end}
    _write_json(config_dir / "config.json", cfg.to_hf_dict(token_ids))
    if cfg.unet is not None:
        dec = config_dir / "diffusion-decoder"
        for sub, body in (("unet/config.json", cfg.unet.to_diffusers()), ("vae/config.json", cfg.vae.to_diffusers()),
                          ("scheduler/scheduler_config.json", cfg.decoder_scheduler.to_diffusers())):
            (dec / sub).parent.mkdir(parents=True, exist_ok=True)
            _write_json(dec / sub, body)
    engine.tokenizer.save_pretrained(str(config_dir))
    processor = engine.prompts.image_processor
    processor.save_pretrained(str(config_dir))
    proc_file = config_dir / "preprocessor_config.json"
    proc_cfg = json.loads(proc_file.read_text())
    size = getattr(processor, "size", None) or {}
    # load_image_processor reads min/max_pixels (the checkpoints' keys); transformers writes `size`.
    proc_cfg.setdefault("min_pixels", size.get("shortest_edge", getattr(processor, "min_pixels", None)))
    proc_cfg.setdefault("max_pixels", size.get("longest_edge", getattr(processor, "max_pixels", None)))
    _write_json(proc_file, {k: v for k, v in proc_cfg.items() if v is not None})
    return {"weights": root + WEIGHTS_FILE, "config": root + CONFIG_DIR}


def _asset_files(out: Path, assets: dict[str, str]) -> list[str]:
    files = []
    for rel in assets.values():
        path = out / rel
        files += [str(p.relative_to(out)) for p in sorted(path.rglob("*")) if p.is_file()] if path.is_dir() else [rel]
    return files


def load_stages(root: str | Path, runtime: str = "onnxruntime", device: str | torch.device = "cpu",
                manifest: Manifest | None = None, threads: int | None = None) -> tuple[Manifest, dict]:
    """Read and verify the manifest, then every graph as a callable on `runtime`."""
    root = Path(root)
    if runtime not in RUNTIMES:
        raise ExportError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    manifest = manifest or Manifest.read(root)
    device = torch.device(device)
    if runtime == "tensorrt":
        _check_compute_capability(manifest)
    fns = {name: load_stage(root, entry, runtime, device, threads) for name, entry in manifest.graphs.items()}
    return manifest, fns


def _check_compute_capability(manifest: Manifest) -> None:
    from .tensorrt import compute_capability

    built = manifest.extra.get("tensorrt", {}).get("compute_capability")
    here = compute_capability()
    if built and built != here:
        raise ExportError(f"the TensorRT plans were built for compute capability {built}; this GPU is {here}")


def from_exported(path: str | Path, runtime: str = "onnxruntime", device: str | torch.device = "cpu",
                  threads: int | None = None):
    """An `Engine` that runs text-to-image (and greedy chat, when the LLM was exported) on the exported
    graphs of `path`, with the engine's own prompts, schedulers and samplers (pipeline.py).

    Raises ExportError for a file whose sha256 differs from the manifest, a manifest of another engine
    or format version, a runtime whose artifacts are not in the export, or a missing package."""
    manifest, fns = load_stages(path, runtime, device, threads=threads)
    return build_engine(path, manifest, fns, torch.device(device))


__all__ = ["export", "from_exported", "load_stages", "available_stages", "FORMATS", "RUNTIMES", "TRITON_T2I_MODEL"]
