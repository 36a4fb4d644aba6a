"""The exportable stages: thin `nn.Module` wrappers over the models' own forwards, with their I/O names.

Every wrapper only calls public methods of the model modules (no layer math is repeated here), and
names its inputs and outputs as NVIDIA's TensorRT SDXL demo and Hugging Face Optimum do, so that the
graphs plug into tools that expect those names. A stage (`--stages` name) is one or more graphs:

| stage | graph         | inputs -> outputs |
|-------|---------------|-------------------|
| unet  | `unet`        | sample [2B,4,h,w], timestep [2B], encoder_hidden_states [2B,Q,C], text_embeds [2B,C], time_ids [2B,6] -> latent (ε) |
| vae   | `vae`         | latent [B,4,h,w] (already / scaling_factor) -> images [B,3,8h,8w] in [-1, 1] |
| dit   | `dit_caption` | caption [2B,Q,H] -> caption_proj [2B,Q,D] (once per image) |
|       | `dit`         | sample [2B,C,S,S], timestep [2B] int64, caption_proj [2B,Q,D] -> velocity (one step) |
| llm   | `llm_prefill` | inputs_embeds [B,L,H], position_ids [3,B,L], attention_mask [B,L] -> logits [B,1,V], last_hidden_state [B,L,H], present.{i}.key/value |
|       | `llm_decode`  | the same + past_key_values.{i}.key/value [B,kv,P,hd]; attention_mask [B,P+L] |
| vit   | `vit_TxHxW`   | pixel_values [T*H*W, C*t*p*p] -> image_embeds [T*H*W/m², H] (one graph per image grid) |

Why the DiT step takes the projected caption but not the cross-attention K/V: `NextDiTBlock.forward`
projects K/V from the caption itself (`cross_key_value` exists, but forward takes no K/V), so feeding
K/V would need a second copy of the block. The caption projection is hoisted (its own graph, run once
per image); the per-block K/V projections run in every step.

Why one ViT graph per image grid: `Qwen2_5_VisionTransformer.forward` reads `grid_thw.tolist()` and
builds its window partition with data-dependent torch ops (`sort`, `bincount`, `.tolist()`), which
`torch.export` cannot trace for a symbolic grid. The wrapper runs that partition eagerly for a fixed
grid (`static_vision_grid`) and traces the rest; the grid is in the graph's name and the manifest.

Why logits only at the last position: that is all greedy decoding reads, and at the real vocabulary
(151k) the full [B, L, V] logits of a prefill cost as much as the prefill (transformers' `logits_to_keep=1`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ExportError
from ..models import qwen2_5_vl
from ..models.unet import sdxl_time_ids

STAGES = ("vit", "llm", "dit", "unet", "vae")
IMAGE_STAGES = ("dit", "unet", "vae")
# "llm_prefill": the LLM's prefill graph alone, all that text-to-image needs (no decode graph).
STAGE_CHOICES = (*STAGES, "llm_prefill")


# ------------------------------------------------------------------------------------------------
# I/O descriptions


@dataclass(frozen=True)
class Axis:
    """A dynamic axis: any multiple of `multiple` >= 1 works in the graph; [min, max] with `opt` is the
    profile a TensorRT engine is built for (and what Triton is told). `example` is the size traced."""

    name: str
    min: int
    opt: int
    max: int
    example: int
    multiple: int = 1

    def to_json(self) -> dict:
        return {"min": self.min, "opt": self.opt, "max": self.max, "multiple": self.multiple}


@dataclass(frozen=True)
class IOSpec:
    """One input or output: name, torch dtype name, shape (ints are static; a str is an axis name or a
    sum of axis names and ints, e.g. "past_sequence_length + sequence_length")."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: dict) -> IOSpec:
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


def _term_value(term: str, values: dict[str, int]) -> int:
    term = term.strip()
    if "*" in term:
        factor, name = term.split("*")
        return int(factor) * values[name.strip()]
    return int(term) if term.isdigit() else values[term]


def dim_value(dim: int | str, values: dict[str, int]) -> int:
    """The size of one dimension given values for the axes: a sum of ints, names and int*name terms."""
    if isinstance(dim, int):
        return dim
    return sum(_term_value(t, values) for t in dim.split("+"))


def shape_of(spec: IOSpec, values: dict[str, int]) -> tuple[int, ...]:
    return tuple(dim_value(d, values) for d in spec.shape)


def axis_names(dim: int | str) -> list[str]:
    """The axis names a dimension depends on."""
    if isinstance(dim, int):
        return []
    terms = [t.split("*")[-1].strip() for t in dim.split("+")]
    return [t for t in terms if not t.isdigit()]


# Random inputs at given axis values: (values, generator) -> tensors in input order.
InputMaker = Callable[[dict[str, int], torch.Generator], tuple[torch.Tensor, ...]]


@dataclass
class StageGraph:
    """One graph to export: the wrapper module, its I/O, its axes and how to make inputs for it."""

    name: str  # file stem and Triton model name
    stage: str  # the --stages name it belongs to
    module: nn.Module
    inputs: list[IOSpec]
    outputs: list[IOSpec]
    axes: dict[str, Axis]
    make_inputs: InputMaker
    extra: dict = field(default_factory=dict)  # recorded in the manifest (e.g. the ViT grid)

    def example_values(self) -> dict[str, int]:
        return {name: axis.example for name, axis in self.axes.items()}

    def profile_values(self, which: str) -> dict[str, int]:
        """Axis values of the "min", "opt" or "max" profile point."""
        return {name: getattr(axis, which) for name, axis in self.axes.items()}

    def dynamic_shapes(self) -> dict[str, object]:
        """torch.export's `dynamic_shapes` for the wrapper's forward arguments (one Dim per axis name,
        shared across inputs; a multiple-of axis is `multiple * Dim`; a sum of axes is left for export
        to infer (Dim.DYNAMIC))."""
        dims = {}
        for name, axis in self.axes.items():
            if axis.multiple > 1:
                dims[name] = axis.multiple * torch.export.Dim(f"{name}_div{axis.multiple}", min=1)
            else:
                dims[name] = torch.export.Dim(name, min=1)
        shapes: dict[str, object] = {}
        for spec in self.inputs:
            per_axis = {}
            for i, d in enumerate(spec.shape):
                names = axis_names(d)
                if len(names) == 1 and d == names[0]:
                    per_axis[i] = dims[names[0]]
                elif names:
                    per_axis[i] = torch.export.Dim.DYNAMIC
            shapes[spec.name] = per_axis or None
        return self._group_varargs(shapes)

    def _group_varargs(self, shapes: dict[str, object]) -> dict[str, object]:
        """The LLM wrappers take the past K/V as *past: torch.export wants those as one tuple."""
        n_fixed = getattr(self.module, "num_named_inputs", len(self.inputs))
        named = dict(list(shapes.items())[:n_fixed])
        rest = list(shapes.values())[n_fixed:]
        if rest:
            named["past"] = tuple(rest)
        return named


# ------------------------------------------------------------------------------------------------
# Wrappers (no math of their own)


class UNetStage(nn.Module):
    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        return self.unet(sample, timestep, encoder_hidden_states, text_embeds, time_ids)  # ε [2B, 4, h, w]


class VAEStage(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae(latent)  # [B, 3, 8h, 8w] in [-1, 1]


class DiTCaptionStage(nn.Module):
    def __init__(self, dit: nn.Module):
        super().__init__()
        self.dit = dit

    def forward(self, caption):
        return self.dit.project_caption(caption)  # [2B, Q, D]


class DiTStepStage(nn.Module):
    """One velocity evaluation given the projected caption: `NextDiT.forward` minus its caption projection."""

    def __init__(self, dit: nn.Module):
        super().__init__()
        self.dit = dit

    def forward(self, sample, timestep, caption_proj):
        temb = self.dit.embed_conditions(timestep, caption_proj)  # [2B, T]
        return self.dit.forward_trunk(sample, temb, caption_proj)  # velocity [2B, C, S, S]


class LLMStage(nn.Module):
    """Prefill (no past) or decode (with past) through `Qwen2_5_VLTextModel.forward` and its `KVCache`.

    Outputs: logits at the last position [B, 1, V], the post-norm hidden states [B, L, H] (T2I reads the
    queries' rows), then present.{i}.key/value = past + new [B, kv_heads, P + L, head_dim] per layer."""

    num_named_inputs = 3

    def __init__(self, text: nn.Module, with_past: bool):
        super().__init__()
        self.text = text
        self.with_past = with_past

    def forward(self, inputs_embeds, position_ids, attention_mask, *past):
        cache = self.text.new_cache()
        if self.with_past:
            cache.keys, cache.values = list(past[0::2]), list(past[1::2])
        hidden = self.text(inputs_embeds, position_ids, cache, attention_mask.bool())  # [B, L, H]
        logits = self.text.compute_logits(hidden[:, -1:])  # [B, 1, V]
        presents = [t for kv in zip(cache.keys, cache.values) for t in kv]
        return (logits, hidden, *presents)


class _StaticGrid:
    """Stands in for `grid_thw` inside the traced ViT forward: `.tolist()` gives the fixed grid."""

    def __init__(self, grid: tuple[int, int, int]):
        self.grid = grid

    def tolist(self) -> list[list[int]]:
        return [list(self.grid)]


@contextlib.contextmanager
def static_vision_grid(grid: tuple[int, int, int], fixed: tuple[torch.Tensor, list[int]]) -> Iterator[None]:
    """While the ViT runs for one grid (traced or eager): `vision_windows` returns `fixed`, the window
    partition the model's own `vision_windows` computed eagerly for that grid (ViTStage.__init__),
    so the trace sees constants instead of data-dependent torch ops."""
    original = qwen2_5_vl.vision_windows

    def windows(grids, cfg_):
        if [tuple(g) for g in grids] != [grid]:
            raise ExportError(f"ViT graph for grid {grid} asked for grids {grids}")
        return fixed

    qwen2_5_vl.vision_windows = windows
    try:
        yield
    finally:
        qwen2_5_vl.vision_windows = original


class ViTStage(nn.Module):
    def __init__(self, visual: nn.Module, grid: tuple[int, int, int]):
        super().__init__()
        self.visual = visual
        self.grid = grid
        self.windows = qwen2_5_vl.vision_windows([grid], visual.cfg)  # computed now, outside any trace

    def forward(self, pixel_values):
        with static_vision_grid(self.grid, self.windows):
            return self.visual(pixel_values, _StaticGrid(self.grid))  # [N / m², H]


# ------------------------------------------------------------------------------------------------
# Building the graphs of a model


@dataclass(frozen=True)
class ExportSettings:
    """Profiles of the dynamic axes: batch up to `max_batch` images/sequences (the CFG stages see
    2x), image sizes `sizes` in pixels (first = opt), LLM lengths up to `max_seq_len`."""

    max_batch: int = 4
    sizes: tuple[tuple[int, int], ...] = ()
    max_seq_len: int = 2048
    opt_seq_len: int = 128
    vit_grids: tuple[tuple[int, int, int], ...] = ()


def latent_multiple(cfg: ModelConfig) -> int:
    """Latent sides must survive the UNet's downsamplings: multiples of 2^(levels - 1)."""
    return 2 ** (len(cfg.unet.block_out_channels) - 1)


def _size_axes(cfg: ModelConfig, settings: ExportSettings, multiple: int) -> dict[str, Axis]:
    f = cfg.vae.scale_factor
    sizes = settings.sizes or ((cfg.default_image_size, cfg.default_image_size),)
    hs, ws = [h // f for h, _ in sizes], [w // f for _, w in sizes]
    # Traced at small, different sides (h != w, so export does not assume square latents).
    return {"height": Axis("height", min(hs), hs[0], max(hs), 2 * multiple, multiple),
            "width": Axis("width", min(ws), ws[0], max(ws), 3 * multiple, multiple)}


def _batch_axis(name: str, max_batch: int, opt: int, example: int = 2) -> Axis:
    return Axis(name, 1, opt, max(max_batch, opt), example)


def _randn(gen: torch.Generator, shape, dtype, device) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def unet_graph(model, settings: ExportSettings, dtype: torch.dtype, device: torch.device) -> StageGraph:
    cfg = model.cfg
    q, c = cfg.n_query, cfg.unet.cross_attention_dim
    lat = cfg.unet.in_channels
    axes = {"batch": _batch_axis("batch", 2 * settings.max_batch, 2, example=4),
            **_size_axes(cfg, settings, latent_multiple(cfg))}
    name = torch_dtype_name(dtype)
    inputs = [IOSpec("sample", name, ("batch", lat, "height", "width")), IOSpec("timestep", "float32", ("batch",)),
              IOSpec("encoder_hidden_states", name, ("batch", q, c)), IOSpec("text_embeds", name, ("batch", c)),
              IOSpec("time_ids", name, ("batch", 6))]
    outputs = [IOSpec("latent", name, ("batch", cfg.unet.out_channels, "height", "width"))]
    f = cfg.vae.scale_factor

    def make(v: dict[str, int], gen: torch.Generator):
        b = v["batch"]
        ctx = _randn(gen, (b, q, c), dtype, device)
        return (_randn(gen, (b, lat, v["height"], v["width"]), dtype, device),
                (torch.rand(b, generator=gen) * 999).to(device),  # timesteps of the 0..999 training range
                ctx, ctx.mean(1), sdxl_time_ids(v["height"] * f, v["width"] * f, b, dtype, device))

    return StageGraph("unet", "unet", UNetStage(model.unet), inputs, outputs, axes, make)


def vae_graph(model, settings: ExportSettings, dtype: torch.dtype, device: torch.device) -> StageGraph:
    cfg = model.cfg
    f = cfg.vae.scale_factor
    size = _size_axes(cfg, settings, 1)
    axes = {"batch": _batch_axis("batch", settings.max_batch, 1), **size}
    name = torch_dtype_name(dtype)
    lat = cfg.vae.latent_channels
    inputs = [IOSpec("latent", name, ("batch", lat, "height", "width"))]
    outputs = [IOSpec("images", name, ("batch", cfg.vae.out_channels, f"{f}*height", f"{f}*width"))]

    def make(v, gen):
        return (_randn(gen, (v["batch"], lat, v["height"], v["width"]), dtype, device),)

    return StageGraph("vae", "vae", VAEStage(model.vae), inputs, outputs, axes, make)


def dit_graphs(model, settings: ExportSettings, dtype: torch.dtype, device: torch.device) -> list[StageGraph]:
    cfg = model.cfg
    q, hc, d = cfg.n_query, cfg.dit.caption_dim, cfg.dit.hidden_size
    c, s = cfg.dit.in_channels, cfg.dit.input_size
    axes = {"batch": _batch_axis("batch", 2 * settings.max_batch, 2, example=4)}
    name = torch_dtype_name(dtype)

    def make_caption(v, gen):
        return (_randn(gen, (v["batch"], q, hc), dtype, device),)

    def make_step(v, gen):
        b = v["batch"]
        return (_randn(gen, (b, c, s, s), dtype, device), torch.randint(0, 1001, (b,), generator=gen).to(device),
                _randn(gen, (b, q, d), dtype, device))

    caption = StageGraph("dit_caption", "dit", DiTCaptionStage(model.dit), [IOSpec("caption", name, ("batch", q, hc))],
                         [IOSpec("caption_proj", name, ("batch", q, d))], axes, make_caption)
    step = StageGraph("dit", "dit", DiTStepStage(model.dit),
                      [IOSpec("sample", name, ("batch", c, s, s)), IOSpec("timestep", "int64", ("batch",)),
                       IOSpec("caption_proj", name, ("batch", q, d))],
                      [IOSpec("velocity", name, ("batch", c, s, s))], axes, make_step)
    return [caption, step]


def llm_graphs(model, settings: ExportSettings, dtype: torch.dtype, device: torch.device) -> list[StageGraph]:
    cfg = model.cfg.text
    h, kv, hd, n = cfg.hidden_size, cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
    max_seq = min(settings.max_seq_len, cfg.max_position_embeddings)
    name = torch_dtype_name(dtype)
    batch = _batch_axis("batch_size", settings.max_batch, 1)
    seq = Axis("sequence_length", 1, min(settings.opt_seq_len, max_seq), max_seq, 7)
    past = Axis("past_sequence_length", 1, min(settings.opt_seq_len, max_seq), max_seq, 5)
    total = "past_sequence_length + sequence_length"
    outputs_common = [IOSpec("logits", name, ("batch_size", 1, cfg.vocab_size)),
                      IOSpec("last_hidden_state", name, ("batch_size", "sequence_length", h))]

    def presents(length: str) -> list[IOSpec]:
        return [IOSpec(f"present.{i}.{k}", name, ("batch_size", kv, length, hd)) for i in range(n) for k in ("key", "value")]

    def make(with_past: bool):
        def inputs(v, gen):
            b, l, p = v["batch_size"], v["sequence_length"], v.get("past_sequence_length", 0) if with_past else 0
            embeds = _randn(gen, (b, l, h), dtype, device)
            pos = (torch.arange(l) + p).expand(3, b, l).contiguous().to(device)  # text positions continue the past
            mask = torch.ones(b, p + l, dtype=torch.int64)
            if b > 1:  # left padding in the first row (a batched prefill's shape), never over its last token
                mask[0, : (p + l) // 2] = 0
            pasts = [_randn(gen, (b, kv, p, hd), dtype, device) for _ in range(2 * n)] if with_past else []
            return (embeds, pos, mask.to(device), *pasts)
        return inputs

    prefill = StageGraph(
        "llm_prefill", "llm", LLMStage(model.text, with_past=False),
        [IOSpec("inputs_embeds", name, ("batch_size", "sequence_length", h)),
         IOSpec("position_ids", "int64", (3, "batch_size", "sequence_length")),
         IOSpec("attention_mask", "int64", ("batch_size", "sequence_length"))],
        outputs_common + presents("sequence_length"), {"batch_size": batch, "sequence_length": seq}, make(False))
    decode = StageGraph(
        "llm_decode", "llm", LLMStage(model.text, with_past=True),
        [IOSpec("inputs_embeds", name, ("batch_size", "sequence_length", h)),
         IOSpec("position_ids", "int64", (3, "batch_size", "sequence_length")),
         IOSpec("attention_mask", "int64", ("batch_size", total))]
        + [IOSpec(f"past_key_values.{i}.{k}", name, ("batch_size", kv, "past_sequence_length", hd))
           for i in range(n) for k in ("key", "value")],
        outputs_common + presents(total),
        {"batch_size": batch, "sequence_length": Axis("sequence_length", 1, 1, max_seq, 2), "past_sequence_length": past},
        make(True))
    return [prefill, decode]


def vit_graphs(model, settings: ExportSettings, dtype: torch.dtype, device: torch.device) -> list[StageGraph]:
    cfg = model.cfg.vision
    width = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    m2 = cfg.spatial_merge_size ** 2
    name = torch_dtype_name(dtype)
    graphs = []
    for grid in settings.vit_grids or (default_vit_grid(model.cfg),):
        t, gh, gw = grid
        if gh % cfg.spatial_merge_size or gw % cfg.spatial_merge_size:
            raise ExportError(f"ViT grid {grid}: height and width must be multiples of {cfg.spatial_merge_size}")
        n = t * gh * gw

        def make(v, gen, n=n):
            return (_randn(gen, (n, width), dtype, device),)

        graphs.append(StageGraph(
            vit_graph_name(grid), "vit", ViTStage(model.visual, grid), [IOSpec("pixel_values", name, (n, width))],
            [IOSpec("image_embeds", name, (n // m2, cfg.out_hidden_size))], {}, make, extra={"grid_thw": list(grid)}))
    return graphs


def default_vit_grid(cfg: ModelConfig) -> tuple[int, int, int]:
    """The grid of a 448x448 image (what image-conditioned T2I resizes to): (1, 32, 32) patches of 14."""
    from ..prompts import T2I_IMAGE_SIZE

    side = T2I_IMAGE_SIZE // cfg.vision.patch_size
    return (1, side, side)


def vit_graph_name(grid: tuple[int, int, int]) -> str:
    return "vit_{}x{}x{}".format(*grid)


def build_graphs(model, stages: list[str], settings: ExportSettings, dtype: torch.dtype,
                 device: torch.device) -> list[StageGraph]:
    graphs: list[StageGraph] = []
    for stage in stages:
        if stage == "unet":
            graphs.append(unet_graph(model, settings, dtype, device))
        elif stage == "vae":
            graphs.append(vae_graph(model, settings, dtype, device))
        elif stage == "dit":
            graphs += dit_graphs(model, settings, dtype, device)
        elif stage in ("llm", "llm_prefill"):
            graphs += llm_graphs(model, settings, dtype, device)[: 1 if stage == "llm_prefill" else 2]
        elif stage == "vit":
            graphs += vit_graphs(model, settings, dtype, device)
        else:
            raise ExportError(f"unknown stage {stage!r}; choose from {', '.join(STAGE_CHOICES)}")
    return graphs


def torch_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def trace(graph: StageGraph) -> torch.export.ExportedProgram:
    """torch.export of the graph's wrapper at its example sizes, with its dynamic axes."""
    args = graph.make_inputs(graph.example_values(), torch.Generator().manual_seed(0))
    with torch.no_grad():
        try:
            return torch.export.export(graph.module.eval(), args, dynamic_shapes=graph.dynamic_shapes() or None,
                                       strict=False)
        except Exception as e:  # torch.export's errors are long; keep the head and say which graph
            raise ExportError(f"torch.export of graph {graph.name!r} failed: {str(e)[:2000]}") from e


__all__ = ["STAGES", "STAGE_CHOICES", "IMAGE_STAGES", "Axis", "IOSpec", "StageGraph", "ExportSettings", "build_graphs", "trace",
           "dim_value", "shape_of", "vit_graph_name", "default_vit_grid", "latent_multiple"]
