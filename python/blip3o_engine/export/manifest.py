"""The artifact format of an export directory: `manifest.json`, file hashes, versions, the config hash.

An export directory holds the graphs (ONNX files with their external data, AOTInductor packages,
TensorRT plans), the tensors that are not graphs (`weights.safetensors`: token embeddings, latent
queries) and the checkpoint's configuration and tokenizer files (`config/`). `manifest.json` lists
every one of those files with its sha256, and per graph its I/O names, dtypes, shapes with named
dynamic axes, the axes' min/opt/max profiles, the opset and the tool versions. Reading a manifest
checks the format and engine versions and every file's hash, so a tampered or half-copied export
fails with an `ExportError` naming the file instead of producing wrong images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from .. import __version__
from ..config import ModelConfig
from ..errors import ExportError
from .stages import Axis, IOSpec, StageGraph

FORMAT_NAME = "blip3o-engine-export"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
FORMATS = ("onnx", "aoti", "tensorrt", "triton")
# Packages whose versions shape the artifacts (recorded when installed).
TOOLS = ("torch", "onnx", "onnxruntime", "onnxscript", "onnx-ir", "tensorrt", "tritonclient")


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def config_hash(cfg: ModelConfig) -> str:
    """sha256 of the model configuration (every field but the display name), canonical JSON."""
    fields = dataclasses.asdict(cfg)
    fields.pop("name", None)
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def tool_versions() -> dict[str, str]:
    out = {}
    for name in TOOLS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


@dataclass
class GraphEntry:
    """One exported graph: the file each runtime loads (`artifacts`: "onnx" / "aoti" / "tensorrt" -> path
    relative to the export directory), every file it consists of, and its I/O."""

    name: str
    stage: str
    artifacts: dict[str, str]
    files: list[str]
    inputs: list[IOSpec]
    outputs: list[IOSpec]
    axes: dict[str, Axis]
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_graph(cls, graph: StageGraph, artifacts: dict[str, str], files: list[str], **extra) -> GraphEntry:
        return cls(graph.name, graph.stage, artifacts, files, list(graph.inputs), list(graph.outputs), dict(graph.axes),
                   {**graph.extra, **extra})

    def to_json(self) -> dict:
        return {"stage": self.stage, "artifacts": self.artifacts, "files": self.files,
                "inputs": [s.to_json() for s in self.inputs], "outputs": [s.to_json() for s in self.outputs],
                "dynamic_axes": {n: a.to_json() for n, a in self.axes.items()}, **self.extra}

    @classmethod
    def from_json(cls, name: str, d: dict) -> GraphEntry:
        known = {"stage", "artifacts", "files", "inputs", "outputs", "dynamic_axes"}
        axes = {n: Axis(n, a["min"], a["opt"], a["max"], a["opt"], a.get("multiple", 1))
                for n, a in d["dynamic_axes"].items()}
        return cls(name, d["stage"], dict(d["artifacts"]), list(d["files"]), [IOSpec.from_json(s) for s in d["inputs"]],
                   [IOSpec.from_json(s) for s in d["outputs"]], axes, {k: v for k, v in d.items() if k not in known})

    def profile(self, which: str) -> dict[str, int]:
        return {n: getattr(a, which) for n, a in self.axes.items()}


@dataclass
class Manifest:
    export_format: str  # onnx | aoti | tensorrt | triton
    model_name: str
    config_sha256: str
    dtype: str
    device: str
    graphs: dict[str, GraphEntry] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256, every file of the export
    assets: dict[str, str] = field(default_factory=dict)  # role -> relative path (weights, config dir)
    settings: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # opset, gpu compute capability, ...
    engine_version: str = __version__
    format_version: int = FORMAT_VERSION
    tools: dict[str, str] = field(default_factory=tool_versions)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))

    @property
    def stages(self) -> list[str]:
        return sorted({g.stage for g in self.graphs.values()})

    def add_files(self, root: Path, paths: list[str]) -> None:
        for rel in paths:
            self.files[rel] = sha256_file(root / rel)

    def to_json(self) -> dict:
        return {"format": FORMAT_NAME, "format_version": self.format_version, "engine_version": self.engine_version,
                "export_format": self.export_format, "created": self.created,
                "model": {"name": self.model_name, "config_sha256": self.config_sha256, "dtype": self.dtype,
                          "device": self.device},
                "tools": self.tools, "settings": self.settings, **self.extra, "assets": self.assets,
                "graphs": {n: g.to_json() for n, g in self.graphs.items()}, "files": self.files}

    def write(self, root: str | Path) -> Path:
        """Write manifest.json last and atomically: a directory with a manifest is a finished export."""
        path = Path(root) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, root: str | Path, verify: bool = True) -> Manifest:
        """Read and check `root/manifest.json`: format and engine version, then (verify) every file's sha256."""
        root = Path(root)
        path = root / MANIFEST_NAME
        if not path.is_file():
            raise ExportError(f"{root} is not an export directory: {MANIFEST_NAME} is missing")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ExportError(f"{path} is not valid JSON: {e}") from e
        if raw.get("format") != FORMAT_NAME:
            raise ExportError(f"{path} is not a {FORMAT_NAME} manifest (format {raw.get('format')!r})")
        if raw.get("format_version") != FORMAT_VERSION:
            raise ExportError(f"{path} has export format version {raw.get('format_version')}; this engine reads "
                              f"version {FORMAT_VERSION}: re-export the model with this engine")
        if raw.get("engine_version") != __version__:
            raise ExportError(f"{path} was exported by blip3o-engine {raw.get('engine_version')}; this is "
                              f"blip3o-engine {__version__}: re-export the model with this engine")
        known = {"format", "format_version", "engine_version", "export_format", "created", "model", "tools",
                 "settings", "assets", "graphs", "files"}
        model = raw["model"]
        manifest = cls(raw["export_format"], model["name"], model["config_sha256"], model["dtype"], model["device"],
                       {n: GraphEntry.from_json(n, g) for n, g in raw["graphs"].items()}, dict(raw["files"]),
                       dict(raw["assets"]), raw.get("settings", {}), {k: v for k, v in raw.items() if k not in known},
                       raw["engine_version"], raw["format_version"], raw.get("tools", {}), raw.get("created", ""))
        if verify:
            manifest.verify_files(root)
        return manifest

    def verify_files(self, root: Path) -> None:
        for rel, digest in self.files.items():
            file = root / rel
            if not file.is_file():
                raise ExportError(f"{file} is listed in the manifest but missing")
            actual = sha256_file(file)
            if actual != digest:
                raise ExportError(f"{file} does not match the manifest: sha256 {actual}, expected {digest} "
                                  f"(modified or corrupted after export)")


__all__ = ["Manifest", "GraphEntry", "FORMATS", "FORMAT_VERSION", "MANIFEST_NAME", "sha256_file", "config_hash",
           "tool_versions"]
