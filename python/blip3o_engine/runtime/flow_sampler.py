"""`FlowSampler`: the optimized stage-1 loop (docs/model_spec.md §1.5), same features as `reference.sample_clip_features`.

The reference runs the whole DiT for every Euler step. Most of that work does not depend on the noisy latent,
so the model exposes it in hoistable pieces (`models/dit.py`: `precompute`, `modulation`, `step`) and this
sampler calls them at the right frequency:

- per request batch: `dit.precompute(caption, fold_gate=True)`: the caption projection, every block's cross
  K/V (the per-head tanh(gate) folded into V) and the caption half of temb;
- per sampler (engine lifetime): the same for the null condition (all-zero caption, CFG's unconditional
  branch, uncond rows first as in docs/model_spec.md §1.5), and, per step count, the timestep embeddings of the schedule;
- per chunk of K steps: temb = time_embed(t_i) + caption_embed for every (step, row) of the chunk and from it
  `dit.modulation`: every block's adaLN vectors and the output scale, one batched GEMM per block.

A request batch is a `DiTRun`, advanced `advance(run, max_steps)` steps at a time: the engine's step loop runs
a few DiT steps per engine step on CPU, so chat never waits for a whole DiT loop (`SchedulerConfig.
dit_steps_per_iteration`). The chunk body (`_chunk`) is a pure function of (tables, step): it only indexes
the tables with a Python int, holds no step state, never reads a device value on the host. On CUDA each
chunk length is captured as ONE graph per (batch bucket, chunk, CFG on/off, caption length, grid) over static
buffers (`cuda_graphs.GraphCache`; chunks are at most `max_unrolled_dit_steps` long, so a 1000-step schedule
replays a 32-step graph over windows of its tables instead of unrolling 1000 steps). Batches are padded to
buckets 1, 2, 4, ... with null rows and sliced after. The graph's output is the latent it advances in place,
copied out right after each replay (graphs share one pool).

Memory: the weights `[q1; k1; v1; q2]` and `[w1; w3]` of each block are fused in place (`dit.fuse_projections`:
no extra memory). Per run: the cross K/V (2·L·R·M·D values) and one chunk's tables (K·R·(4L + 1)·D): for the
released DiT at K = 30, 21 M values, 43 MB bf16 per prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..models.dit import DiTCondition, NextDiT
from ..sampling.flow_match import flow_cfg_velocity, flow_match_sigmas, flow_match_update
from .cuda_graphs import GraphCache, batch_buckets, bucket_for

StepCallback = Callable[[int, int], None]  # (step index, number of steps)


@dataclass(eq=False)
class ChunkInputs:
    """What `_chunk` reads for K steps (views of a run's tensors, or a graph's static buffers).
    B = latent rows (bucket), R = DiT rows (2B with CFG, uncond rows first; else B)."""

    x: torch.Tensor  # [B, N, C] latent tokens at the chunk's first step (token n = row*grid + col)
    kv: torch.Tensor  # [L, 2, R, H, M, d] cross-attention K and tanh(gate)-scaled V per block
    mod: torch.Tensor  # [K, L, 4, R, D] scale_msa, gate_msa, scale_mlp, gate_mlp per step and block
    final_scale: torch.Tensor  # [K, R, D] the output layer's scale per step
    dts: torch.Tensor  # [K] fp32 σ_{i+1} − σ_i
    guidance: torch.Tensor | None  # [B, 1, 1] fp32 CFG scale per latent row; None = no CFG

    def copy_(self, other: ChunkInputs) -> None:
        """Fill these (static) buffers from `other`: the only writes a graph replay needs."""
        for name in ("x", "kv", "mod", "final_scale", "dts"):
            getattr(self, name).copy_(getattr(other, name))
        if self.guidance is not None:
            self.guidance.copy_(other.guidance)


@dataclass(eq=False)
class DiTRun:
    """One request batch's loop in progress (`FlowSampler.begin`)."""

    batch: int  # prompts
    bucket: int  # latent rows (batch padded with null rows)
    steps: int
    cfg: bool
    x: torch.Tensor  # [bucket, N, C] the latent after `done` steps
    kv: torch.Tensor  # [L, 2, R, H, M, d]
    caption_emb: torch.Tensor  # [R, T]
    guidance: torch.Tensor | None  # [bucket, 1, 1] fp32
    done: int = 0

    @property
    def finished(self) -> bool:
        return self.done == self.steps


class FlowSampler:
    """Stage-1 flow-matching sampler over a `NextDiT` (module docstring)."""

    def __init__(self, dit: NextDiT, device: torch.device | str, dtype: torch.dtype, graphs: GraphCache | None = None,
                 max_batch: int = 8, max_unrolled_steps: int = 32) -> None:
        self.dit = dit
        self.cfg = dit.cfg
        self.device = torch.device(device)
        self.dtype = dtype
        self.graphs = graphs if graphs is not None else GraphCache("dit", None, False)
        self.graphs.on_evict = lambda key: self._static.pop(key, None)
        self.buckets = batch_buckets(max_batch)
        self.max_unrolled_steps = max_unrolled_steps
        dit.fuse_projections()
        self._null: dict[int, DiTCondition] = {}  # M -> the all-zero caption's condition (1 row)
        self._schedules: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # S -> (dts [S], time [S, T])
        self._ropes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # grid -> cos, sin [N, d/2]
        self._static: dict[tuple, ChunkInputs] = {}  # graph key -> its static buffers

    # ------------------------------------------------------------------------------ public API

    @torch.inference_mode()
    def sample(self, cond: torch.Tensor, noise: torch.Tensor, steps: int, guidance: float | list[float],
               callback: StepCallback | None = None) -> torch.Tensor:
        """Query states `cond [B, Q, H]`, noise `[B, C, S, S]` -> CLIP features `[B, Q, C]` (model dtype).

        Same contract as `reference.sample_clip_features` (guidance > 1: zero-null CFG, uncond first; one
        value, or one per prompt). `callback(i, steps)` runs after each step (under a graph: after each
        chunk's replay is queued, for its steps)."""
        run = self.begin(cond, noise, steps, guidance)
        while not run.finished:
            first = run.done
            self.advance(run, self.max_unrolled_steps, callback)
            if self.graphs.enabled and callback is not None:
                for i in range(first, run.done):
                    callback(i, steps)
        return self.result(run)

    @torch.inference_mode()
    def begin(self, cond: torch.Tensor, noise: torch.Tensor, steps: int, guidance: float | list[float],
              bucket: int | None = None) -> DiTRun:
        """Device work before the loop: the condition (cross K/V, caption embedding), padding to a bucket
        (under graphs, the smallest batch bucket; `bucket` forces one, for tests of the padding)."""
        self._check(cond, noise, steps)
        batch = cond.shape[0]
        values = [float(g) for g in guidance] if isinstance(guidance, (list, tuple)) else [float(guidance)] * batch
        if len(values) != batch:
            raise InputError(f"{batch} prompts but {len(values)} guidance values")
        cfg = values[0] > 1.0
        if any((g > 1.0) != cfg for g in values):
            raise InputError("one DiT batch runs CFG for all rows or for none")
        if bucket is None:
            bucket = (bucket_for(batch, self.buckets) or batch) if self.graphs.enabled else batch
        if bucket < batch:
            raise ValueError(f"bucket {bucket} is smaller than the batch of {batch}")
        c = self.dit.precompute(cond.to(self.device, self.dtype), fold_gate=True)  # kv [L, 2, B, H, M, d]
        kv, cap = c.cross_kv, c.caption_emb
        pad = bucket - batch
        x = noise.to(self.device, self.dtype).flatten(2).transpose(1, 2)  # [B, N, C]
        if pad or cfg:
            null = self._null_condition(cond.shape[1])
            lead = bucket if cfg else 0  # uncond rows first (docs/model_spec.md §1.5)
            kv = torch.cat([null.cross_kv.expand(-1, -1, lead, -1, -1, -1), kv,
                            null.cross_kv.expand(-1, -1, pad, -1, -1, -1)], dim=2)  # [L, 2, R, H, M, d]
            cap = torch.cat([null.caption_emb.expand(lead, -1), cap, null.caption_emb.expand(pad, -1)])  # [R, T]
            x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])  # [bucket, N, C]
        g = None
        if cfg:  # a buffer, not a Python constant, so one graph serves any scale
            g = torch.tensor(values + [1.0] * pad, dtype=torch.float32).view(bucket, 1, 1).to(self.device)
        self._schedule(steps)
        self._rope(noise.shape[-1])
        return DiTRun(batch, bucket, steps, cfg, x.contiguous(), kv, cap, g)

    @torch.inference_mode()
    def advance(self, run: DiTRun, max_steps: int, callback: StepCallback | None = None) -> bool:
        """Run up to `max_steps` more steps of `run` (in chunks of at most `max_unrolled_steps`); True once it
        has run all of them."""
        end = min(run.steps, run.done + max_steps)
        while run.done < end:
            k = min(end - run.done, self.max_unrolled_steps)
            inputs = self._chunk_inputs(run, k)
            key = (run.bucket, k, run.cfg, run.kv.shape[4], int(round(run.x.shape[1] ** 0.5)))
            graph = self.graphs.get(key, self._graph_run(key, inputs)) if self.graphs.enabled else None
            if graph is None:
                run.x = self._chunk(inputs, callback, run.done, run.steps)
            else:
                self._static[key].copy_(inputs)
                run.x = graph.replay().clone()  # the static latent is the next run's buffer too
            run.done += k
        return run.finished

    def result(self, run: DiTRun) -> torch.Tensor:
        """The CLIP features `[B, Q, C]` of a finished run (row-major grid tokens, docs/model_spec.md §1.5)."""
        if not run.finished:
            raise RuntimeError(f"the DiT run has done {run.done} of {run.steps} steps")
        return run.x[:run.batch]

    # ------------------------------------------------------------------------------ hoisted work

    def _schedule(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per step count, once: Euler increments `[S]` fp32 and timestep embeddings `[S, T]`."""
        if steps not in self._schedules:
            sigmas, timesteps = flow_match_sigmas(steps, device=self.device)  # [S+1], [S]
            # int64 truncation as the official loop feeds the DiT (docs/model_spec.md §1.5).
            time = self.dit.embed_timestep(timesteps.to(torch.int64))  # [S, T]
            self._schedules[steps] = (sigmas[1:] - sigmas[:-1], time)
        return self._schedules[steps]

    def _rope(self, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
        if grid not in self._ropes:
            self._ropes[grid] = self.dit.rope(grid, self.device)
        return self._ropes[grid]

    def _null_condition(self, num_tokens: int) -> DiTCondition:
        """The CFG null branch (all-zero caption), once per sampler and caption length."""
        if num_tokens not in self._null:
            zeros = torch.zeros(1, num_tokens, self.cfg.caption_dim, device=self.device, dtype=self.dtype)
            self._null[num_tokens] = self.dit.precompute(zeros, fold_gate=True)
        return self._null[num_tokens]

    def _chunk_inputs(self, run: DiTRun, k: int) -> ChunkInputs:
        """The tables of steps [run.done, run.done + k): temb per (step, row), then every block's modulation."""
        dts, time = self._schedule(run.steps)
        window = slice(run.done, run.done + k)
        temb = time[window, None, :] + run.caption_emb[None, :, :]  # [K, R, T], the reference's temb
        mod, final_scale = self.dit.modulation(temb)  # [K, L, 4, R, D], [K, R, D]
        return ChunkInputs(run.x, run.kv, mod, final_scale, dts[window], run.guidance)

    def _graph_run(self, key: tuple, inputs: ChunkInputs):
        """The closure a chunk graph captures: `_chunk` over static buffers, writing the latent back in place."""
        if key not in self._static:
            self._static[key] = ChunkInputs(*(t.clone() if t is not None else None for t in (
                inputs.x, inputs.kv, inputs.mod, inputs.final_scale, inputs.dts, inputs.guidance)))
        static = self._static[key]

        def run() -> torch.Tensor:
            static.x.copy_(self._chunk(static))
            return static.x
        return run

    # ------------------------------------------------------------------------------ the loop

    def _chunk(self, inp: ChunkInputs, callback: StepCallback | None = None, first: int = 0,
               steps: int = 0) -> torch.Tensor:
        """K Euler steps from `inp.x`: `[B, N, C]`. A pure function of (tables, step): no host syncs (nothing
        reads a device value), no step state outside `x`; under a CUDA graph every intermediate lives in the
        pool, so a replay allocates nothing."""
        x = inp.x
        cond = DiTCondition(inp.kv, None, gate_folded=True)
        rope = self._ropes[int(round(x.shape[1] ** 0.5))]
        for j in range(inp.dts.shape[0]):
            x_in = x.repeat(2, 1, 1) if inp.guidance is not None else x  # [R, N, C]: the CFG halves share x
            v = self.dit.step(x_in, inp.mod[j], inp.final_scale[j], cond, rope)  # [R, N, C]
            if inp.guidance is not None:
                v = flow_cfg_velocity(v, inp.guidance)  # [B, N, C]
            x = flow_match_update(x, v, inp.dts[j])
            if callback is not None:
                callback(first + j, steps)
        return x

    # ------------------------------------------------------------------------------ checks

    def _check(self, cond: torch.Tensor, noise: torch.Tensor, steps: int) -> None:
        c = self.cfg
        if cond.ndim != 3 or cond.shape[-1] != c.caption_dim:
            raise InputError(f"cond must be [B, Q, {c.caption_dim}], got {list(cond.shape)}")
        if noise.ndim != 4 or noise.shape[0] != cond.shape[0] or noise.shape[1] != c.in_channels \
                or noise.shape[2] != noise.shape[3]:
            raise InputError(f"noise must be [{cond.shape[0]}, {c.in_channels}, S, S], got {list(noise.shape)}")
        if steps < 1:
            raise InputError(f"steps must be >= 1, got {steps}")


__all__ = ["ChunkInputs", "DiTRun", "FlowSampler", "StepCallback"]
