"""The memory plan: weights, every stage's working set, the graph pool, then the KV pool from what is left.

Computed once at start-up, before the KV pool is allocated (vLLM's profile-then-size rule):

- CUDA: the budget is `gpu_memory_utilization` of the device. The engine hands `plan_memory` one probe per
  stage (the ViT on the largest image, the LLM at its token budget, one DiT step, one UNet step at the
  maximum image batch, one VAE decode); each runs once and its peak allocation above the baseline is its
  working set. The graph pool is sized by the largest captured step (the graphs share one pool).
- CPU: the budget is the memory available now (MemAvailable, and the cgroup's limit when tighter) plus the
  weights already loaded; working sets are estimated from the configs (`estimate_*`, counts of the largest
  live activations, documented per function), since CPU allocations cannot be profiled cheaply.

The KV pool takes `cache.num_blocks` blocks when given; else `cache.kv_cache_memory_gb`; else what is left
(CUDA) or min(two full contexts, 4 GiB, half of what is left) (CPU). `max_model_len` is the model's context
capped by what the pool holds. A configuration that does not fit raises `CapacityError` here, at start,
never an out-of-memory error mid-request.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ModelConfig, UNetConfig, VAEConfig
from ..engine_config import EngineConfig
from ..errors import CapacityError

GiB = 1 << 30
CPU_KV_CAP_BYTES = 4 * GiB  # vLLM's CPU default KV space; a bound for machines with much free memory


@dataclass(frozen=True)
class MemoryPlan:
    """What the engine planned at start-up (bytes). `Engine.memory_plan()` returns it."""

    device: str
    budget_bytes: int  # what the process may use in all
    weights_bytes: int
    stage_bytes: dict[str, int]  # reserved working set per stage
    graph_pool_bytes: int
    kv_pool_bytes: int
    num_kv_blocks: int
    block_size: int
    kv_bytes_per_token: int
    max_model_len: int
    measured: bool  # True: working sets profiled on the device; False: estimated from the configs
    notes: list[str] = field(default_factory=list)
    native_hw: tuple[int, int] = (0, 0)  # the output size the image stages' working sets were planned for

    def check_image_size(self, height: int, width: int) -> None:
        """CapacityError when an image of this size needs more than the plan holds for the decoder and the VAE
        (their working sets grow with the area; the headroom absorbs the difference up to its size)."""
        if not self.budget_bytes or not self.native_hw[0]:
            return  # nothing planned (the reference backend, a model without image stages)
        scale = height * width / (self.native_hw[0] * self.native_hw[1])
        planned = self.stage_bytes.get("decoder", 0) + self.stage_bytes.get("vae", 0)
        extra = planned * scale - planned
        if extra > self.headroom_bytes:
            raise CapacityError(
                f"a {height}x{width} image needs ~{planned * scale / GiB:.2f} GiB for the decoder and VAE; the plan "
                f"holds {planned / GiB:.2f} GiB for {self.native_hw[0]}x{self.native_hw[1]} and "
                f"{self.headroom_bytes / GiB:.2f} GiB of headroom: use a smaller size, or start the engine with a "
                f"smaller KV pool (cache.kv_cache_memory_gb) or max_image_batch")

    @property
    def headroom_bytes(self) -> int:
        return self.budget_bytes - self.weights_bytes - sum(self.stage_bytes.values()) - self.graph_pool_bytes \
            - self.kv_pool_bytes

    def as_dict(self) -> dict:
        return {"device": self.device, "budget_bytes": self.budget_bytes, "weights_bytes": self.weights_bytes,
                "stage_bytes": dict(self.stage_bytes), "graph_pool_bytes": self.graph_pool_bytes,
                "kv_pool_bytes": self.kv_pool_bytes, "num_kv_blocks": self.num_kv_blocks,
                "block_size": self.block_size, "kv_bytes_per_token": self.kv_bytes_per_token,
                "max_model_len": self.max_model_len, "headroom_bytes": self.headroom_bytes,
                "measured": self.measured, "notes": list(self.notes)}

    def summary(self) -> str:
        """A small human-readable table (GiB)."""
        rows = [("budget", self.budget_bytes), ("weights", self.weights_bytes)]
        rows += [(f"stage {k}", v) for k, v in self.stage_bytes.items()]
        rows += [("graph pool", self.graph_pool_bytes), ("KV pool", self.kv_pool_bytes),
                 ("headroom", self.headroom_bytes)]
        lines = [f"memory plan ({self.device}, {'profiled' if self.measured else 'estimated'}):"]
        lines += [f"  {name:<16} {value / GiB:9.3f} GiB" for name, value in rows]
        lines.append(f"  KV: {self.num_kv_blocks} blocks x {self.block_size} tokens "
                     f"({self.kv_bytes_per_token} B/token), max_model_len {self.max_model_len}")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


# ------------------------------------------------------------------------------------------------
# Sizes read off the machine and the model


def cpu_available_bytes() -> int:
    """Memory this process can still take: MemAvailable, or the cgroup's limit minus its usage if tighter."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    try:  # cgroup v2: a container's own limit may be below the host's free memory
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(available, 0)


def weights_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's parameters and buffers, shared storages counted once (0 for a model facade that
    is not a module, e.g. exported graphs)."""
    if not isinstance(module, torch.nn.Module):
        return 0
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """K and V of every layer for one token."""
    t = cfg.text
    return 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * dtype.itemsize


# ------------------------------------------------------------------------------------------------
# Working-set estimates (CPU). Each counts the largest set of activations alive at once, with margins.


def estimate_llm_bytes(cfg: ModelConfig, tokens: int, seqs: int, dtype: torch.dtype) -> int:
    """One LLM step over `tokens` packed tokens: hidden states and residual, q/k/v, the attention output,
    the gate/up product (the widest), plus `seqs` fp32 logit rows and the fp32 sampling copies."""
    t = cfg.text
    per_token = 4 * t.hidden_size + (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim \
        + 3 * t.intermediate_size
    return tokens * per_token * dtype.itemsize + 3 * seqs * t.vocab_size * 4


def estimate_unet_bytes(unet: UNetConfig, latent_hw: tuple[int, int], rows: int, dtype: torch.dtype) -> int:
    """One UNet step over `rows` latents: every skip connection kept for the up path, plus three times the
    widest transient (the transformers' GEGLU: 8·C channels at a level's resolution)."""
    h, w = latent_hw
    skips, widest = 0, 0
    for level, channels in enumerate(unet.block_out_channels):
        cells = (h >> level) * (w >> level)
        skips += (unet.layers_per_block + 1) * channels * cells
        widest = max(widest, 8 * channels * cells)
    return rows * (skips + 3 * widest) * dtype.itemsize


def estimate_vae_bytes(vae: VAEConfig, image_hw: tuple[int, int], images: int, dtype: torch.dtype) -> int:
    """The VAE decoder's peak: three tensors of its full-resolution block's width at the output size, per
    image decoded at once."""
    h, w = image_hw
    return images * 3 * vae.block_out_channels[0] * h * w * dtype.itemsize + images * 3 * h * w * 4


def estimate_dit_bytes(cfg: ModelConfig, rows: int, dtype: torch.dtype, steps: int = 30) -> int:
    """A DiT batch: the step tables (modulation of every block and step) and cross K/V, plus one block's
    activations."""
    d = cfg.dit
    tables = steps * rows * (4 * d.num_layers + 1) * d.hidden_size
    kv = 2 * d.num_layers * rows * d.num_tokens * d.hidden_size
    block = rows * d.num_tokens * (8 * d.hidden_size + 2 * d.ffn_hidden_size)
    return (tables + kv + block) * dtype.itemsize


def estimate_vit_bytes(cfg: ModelConfig, patches: int, dtype: torch.dtype) -> int:
    """The vision tower on `patches` patches: q/k/v, the MLP's widest product, the merger's input."""
    v = cfg.vision
    return patches * (6 * v.hidden_size + 3 * v.intermediate_size) * dtype.itemsize


def estimate_stage_bytes(cfg: ModelConfig, ecfg: EngineConfig, dtype: torch.dtype, image_hw: tuple[int, int],
                         vit_patches: int) -> dict[str, int]:
    """The estimates of every stage this model has, at the engine's limits."""
    s = ecfg.scheduler
    tokens = max(s.max_num_batched_tokens, s.max_num_seqs)
    stages = {"llm": estimate_llm_bytes(cfg, tokens, s.max_num_seqs, dtype),
              "vit": estimate_vit_bytes(cfg, vit_patches, dtype)}
    if cfg.can_generate_images:
        factor = cfg.vae.scale_factor
        latent = (image_hw[0] // factor, image_hw[1] // factor)
        stages["dit"] = estimate_dit_bytes(cfg, 2 * s.max_image_batch, dtype)
        stages["decoder"] = estimate_unet_bytes(cfg.unet, latent, 2 * s.max_image_batch, dtype)
        stages["vae"] = estimate_vae_bytes(cfg.vae, image_hw, 1, dtype)  # the VAE decodes one image at a time
    return stages


# ------------------------------------------------------------------------------------------------
# The plan


def profile_peak_bytes(probe: Callable[[], object], device: torch.device) -> int:
    """Peak CUDA allocation of one `probe()` run above what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    probe()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.empty_cache()
    return max(int(peak), 0)


def plan_memory(cfg: ModelConfig, ecfg: EngineConfig, device: torch.device, dtype: torch.dtype, weights: int,
                stages: dict[str, int], measured: bool, graphs: bool, budget: int | None = None,
                native_hw: tuple[int, int] = (0, 0)) -> MemoryPlan:
    """Size the KV pool from what the weights, the stages and the graph pool leave (module docstring).

    stages: working set per stage (profiled on CUDA, `estimate_stage_bytes` on CPU); graphs: whether a graph
    pool is reserved (the largest stage's working set: the pool holds one step's intermediates at a time).
    budget: override of the device budget (tests)."""
    c, s = ecfg.cache, ecfg.scheduler
    per_token = kv_bytes_per_token(cfg, dtype)
    per_block = per_token * c.block_size
    if budget is None:
        if device.type == "cuda":
            budget = int(torch.cuda.mem_get_info(device)[1] * c.gpu_memory_utilization)
        else:
            budget = cpu_available_bytes() + weights
    graph_pool = max(stages.values(), default=0) if graphs else 0
    left = budget - weights - sum(stages.values()) - graph_pool
    notes: list[str] = []
    model_len = cfg.text.max_position_embeddings
    if c.num_blocks is not None:
        num_blocks = c.num_blocks
        notes.append("KV pool size given (cache.num_blocks)")
    elif c.kv_cache_memory_gb is not None:
        num_blocks = int(c.kv_cache_memory_gb * GiB) // per_block
        notes.append(f"KV budget given (cache.kv_cache_memory_gb = {c.kv_cache_memory_gb})")
    elif device.type == "cuda":
        num_blocks = max(left, 0) // per_block
    else:
        two_contexts = 2 * (-(-model_len // c.block_size))
        num_blocks = min(two_contexts, CPU_KV_CAP_BYTES // per_block, max(left, 0) // 2 // per_block)
    kv_pool = num_blocks * per_block
    if kv_pool > max(left, 0):
        raise CapacityError(
            f"the KV pool ({kv_pool / GiB:.2f} GiB, {num_blocks} blocks) does not fit: the {device.type} budget "
            f"is {budget / GiB:.2f} GiB, of which weights take {weights / GiB:.2f} GiB, the stages' working sets "
            f"{sum(stages.values()) / GiB:.2f} GiB and the graph pool {graph_pool / GiB:.2f} GiB; lower "
            f"cache.num_blocks / kv_cache_memory_gb, scheduler.max_image_batch or max_num_batched_tokens")
    if num_blocks < 1:
        raise CapacityError(
            f"no KV block fits: {max(left, 0) / GiB:.2f} GiB are left of the {device.type} budget "
            f"({budget / GiB:.2f} GiB) after weights {weights / GiB:.2f} GiB and working sets "
            f"{(sum(stages.values()) + graph_pool) / GiB:.2f} GiB; lower scheduler.max_image_batch or "
            f"max_num_batched_tokens, or give the engine more memory")
    max_len = min(model_len, num_blocks * c.block_size)
    if s.max_model_len is not None:
        if s.max_model_len > max_len:
            raise CapacityError(f"scheduler.max_model_len = {s.max_model_len} exceeds what the model and the KV "
                                f"pool allow ({max_len} tokens)")
        max_len = s.max_model_len
    elif max_len < model_len:
        notes.append(f"max_model_len capped by the KV pool at {max_len} (the model allows {model_len})")
    return MemoryPlan(str(device), int(budget), int(weights), dict(stages), int(graph_pool), int(kv_pool),
                      int(num_blocks), c.block_size, per_token, int(max_len), measured, notes, native_hw)


__all__ = ["MemoryPlan", "cpu_available_bytes", "estimate_stage_bytes", "estimate_unet_bytes", "estimate_vae_bytes",
           "kv_bytes_per_token", "plan_memory", "profile_peak_bytes", "weights_bytes"]
