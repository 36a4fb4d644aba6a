"""Checkpoint loading: safetensors only, lazily, straight into the target dtype and device.

Published BLIP3o-Model-4B/8B layout (docs/model_spec.md §3):

    config.json, tokenizer files, preprocessor_config.json
    model.safetensors                  or  model-0000k-of-0000n.safetensors + model.safetensors.index.json
        visual.*                       -> Qwen2.5-VL vision tower
        model.*                        -> Qwen2.5 LLM (embed_tokens, layers, norm)
        lm_head.weight                 -> LLM head (absent / ignored when tie_word_embeddings)
        model.latent_queries           -> [1, n_query, H] learned queries
        model.dit.model.*              -> NextDiT
        model.gen_vision_tower.*       -> EVA-CLIP tower, unused at inference: never read
    diffusion-decoder/{unet,vae}/diffusion_pytorch_model[.bf16].safetensors + config.json
    diffusion-decoder/scheduler/scheduler_config.json

How memory stays low: every module is built on the meta device (no storage), then each tensor is
read from the memory-mapped file one at a time, converted to the target dtype/device, and becomes the
parameter itself (`load_state_dict(assign=True)`). Files are read one at a time and each file's map
is dropped once read, so peak host memory is the loaded model plus the pages of one shard, never two
copies of the model (where no dtype/device change is needed, the parameters are views of the map
itself); keys that are skipped are never read.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import (CheckpointNotFoundError, CorruptCheckpointError, MissingKeyError, ShapeMismatchError,
                     UnexpectedKeyError, UnsupportedDTypeError)

# Floating dtypes a checkpoint tensor may have; anything else (int8, fp8, ...) is refused rather than
# silently mis-converted.
_LOADABLE_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}

# Root-checkpoint prefixes that exist in released checkpoints but are unused at inference (docs/model_spec.md §3).
SKIPPED_ROOT_PREFIXES = ("model.gen_vision_tower.", "model.down_projector.")


class SafetensorsCheckpoint:
    """Read-only view of one safetensors file or a sharded set (via its index.json).

    Opens each file lazily with memory mapping; `read()` materializes one tensor.
    """

    def __init__(self, weight_map: dict[str, Path], stored_names: dict[str, str] | None = None):
        self._weight_map = weight_map  # key -> file
        self._stored = stored_names or {}  # key -> name inside the file, where renamed
        self._handles: dict[Path, object] = {}

    def renamed(self, rename: Callable[[str], str]) -> SafetensorsCheckpoint:
        """The same files seen under other key names (e.g. transformers-5 prefixes -> published ones)."""
        weight_map, stored = {}, {}
        for key, path in self._weight_map.items():
            new = rename(key)
            weight_map[new] = path
            if new != key:
                stored[new] = self._stored.get(key, key)
        out = SafetensorsCheckpoint(weight_map, stored)
        out._handles = self._handles
        return out

    @classmethod
    def from_dir(cls, directory: Path, stem: str, variants: Iterable[str] = ("",)) -> SafetensorsCheckpoint:
        """Find `<stem>[.variant].safetensors` or its sharded index in `directory`.

        `variants` are tried in order, e.g. ("bf16", "") for diffusers' variant files.
        """
        for variant in variants:
            name = f"{stem}.{variant}" if variant else stem
            single = directory / f"{name}.safetensors"
            index = directory / f"{name}.safetensors.index.json"
            if index.is_file():
                return cls.from_index(index)
            if single.is_file():
                return cls.from_file(single)
        pickled = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
        hint = f" (found {pickled}: pickle files are never loaded; convert them to safetensors)" if pickled else ""
        raise CheckpointNotFoundError(f"no {stem}.safetensors (or sharded index) in {directory}{hint}")

    @classmethod
    def from_file(cls, path: Path) -> SafetensorsCheckpoint:
        ckpt = cls({})
        ckpt._weight_map = {key: path for key in ckpt._open(path).keys()}
        return ckpt

    @classmethod
    def from_index(cls, index_path: Path) -> SafetensorsCheckpoint:
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map must map tensor names to file names")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CorruptCheckpointError(f"{index_path} is not a valid safetensors index: {e}") from e
        files = {name: index_path.parent / name for name in set(weight_map.values())}
        for name, path in files.items():
            if not path.is_file():
                raise CheckpointNotFoundError(f"shard {path} named in {index_path.name} does not exist")
        return cls({key: files[name] for key, name in weight_map.items()})

    def _open(self, path: Path):
        if path not in self._handles:
            from safetensors import SafetensorError, safe_open

            try:
                self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
            except SafetensorError as e:
                raise CorruptCheckpointError(f"{path} is truncated or not a safetensors file: {e}") from e
            except OSError as e:
                raise CheckpointNotFoundError(f"cannot open {path}: {e}") from e
        return self._handles[path]

    def keys(self) -> list[str]:
        return list(self._weight_map)

    def file_of(self, key: str) -> Path:
        return self._weight_map[key]

    def release(self, path: Path) -> None:
        """Drop the memory map of `path`. Pages of tensors that were copied out (dtype or device
        change) then leave the process; tensors that still view the file keep the map alive."""
        self._handles.pop(path, None)

    def info(self, key: str) -> tuple[tuple[int, ...], str]:
        """(shape, safetensors dtype string) without reading the data."""
        handle = self._open(self._weight_map[key])
        try:
            sl = handle.get_slice(self._stored.get(key, key))
        except Exception as e:  # the index names a key its shard lacks
            raise CorruptCheckpointError(f"{key} is listed but missing from {self._weight_map[key]}: {e}") from e
        return tuple(sl.get_shape()), sl.get_dtype()

    def read(self, key: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        _, st_dtype = self.info(key)
        if st_dtype not in _LOADABLE_DTYPES:
            raise UnsupportedDTypeError(
                f"{key} has dtype {st_dtype}; only {', '.join(_LOADABLE_DTYPES)} tensors can be loaded")
        from safetensors import SafetensorError

        try:
            tensor = self._open(self._weight_map[key]).get_tensor(self._stored.get(key, key))
        except SafetensorError as e:
            raise CorruptCheckpointError(f"cannot read {key} from {self._weight_map[key]}: {e}") from e
        return tensor.to(device=device, dtype=dtype)


@dataclass
class ComponentSpec:
    """How one module's parameters are found in a checkpoint: `prefix + param_name`."""

    module: nn.Module  # built on the meta device
    prefix: str
    extra: dict[str, str] = field(default_factory=dict)  # param name -> full key, for keys outside prefix
    optional: frozenset[str] = frozenset()  # param names that may be absent (left as given)


def _expected(spec: ComponentSpec) -> dict[str, tuple[str, torch.Size]]:
    """Full checkpoint key -> (param name, expected shape) of a component."""
    out = {}
    for name, tensor in spec.module.state_dict(keep_vars=True).items():
        out[spec.extra.get(name, spec.prefix + name)] = (name, tensor.shape)
    return out


def load_components(ckpt: SafetensorsCheckpoint, specs: list[ComponentSpec], dtype: torch.dtype,
                    device: torch.device, ignore: Callable[[str], bool] = lambda key: False) -> None:
    """Fill every component's parameters from `ckpt` (in place, assign=True).

    Raises typed errors naming the key for: a missing key, an unexpected key (not claimed by any
    component and not ignored), a shape mismatch (both shapes), an unsupported dtype.
    """
    expected: dict[str, tuple[int, str, torch.Size]] = {}
    for i, spec in enumerate(specs):
        for key, (name, shape) in _expected(spec).items():
            expected[key] = (i, name, shape)

    present = set(ckpt.keys())
    unexpected = sorted(k for k in present if k not in expected and not ignore(k))
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise UnexpectedKeyError(f"checkpoint has keys the model does not know: {unexpected[:5]}{more}")
    optional = {spec.extra.get(n, spec.prefix + n) for spec in specs for n in spec.optional}
    missing = sorted(k for k in expected if k not in present and k not in optional)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise MissingKeyError(f"checkpoint lacks required keys: {missing[:5]}{more}")

    for key, (_, _, shape) in expected.items():  # check every shape before reading any data
        if key in present:
            got, _ = ckpt.info(key)
            if tuple(got) != tuple(shape):
                raise ShapeMismatchError(f"{key}: checkpoint has shape {list(got)}, model expects {list(shape)}")

    # Shard by shard, dropping each file's map once read: otherwise, when tensors are converted,
    # every mapped page stays resident next to its copy and peak RSS reaches checkpoint + model.
    state: list[dict[str, torch.Tensor]] = [{} for _ in specs]
    to_read = sorted((key for key in expected if key in present), key=lambda key: str(ckpt.file_of(key)))
    for path, keys in itertools.groupby(to_read, key=ckpt.file_of):
        for key in keys:
            i, name, _ = expected[key]
            state[i][name] = ckpt.read(key, dtype, device)
        ckpt.release(path)
    for spec, sd in zip(specs, state):
        spec.module.load_state_dict(sd, strict=False, assign=True)
        _check_materialized(spec)


def _check_materialized(spec: ComponentSpec) -> None:
    for name, p in spec.module.named_parameters():
        if p.is_meta and name not in spec.optional:
            raise MissingKeyError(f"parameter {spec.prefix}{name} was not loaded")


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """Instantiate a module without allocating its weights."""
    with torch.device("meta"):
        return factory()
