"""`FlowSampler`: the optimized stage-1 loop (spec §1.5), same features as `reference.sample_clip_features`.

The reference runs the whole DiT for every Euler step. Most of that work does not depend on the noisy
latent, so here it is hoisted out of the loop (ARCHITECTURE §3 step 4, §7.7):

- per request batch: the caption projection Cp, every block's cross-attention K/V of
  `norm1_context(Cp)` (with the per-head `tanh(gate)` folded into V: attention is linear in V), and
  the caption half of temb;
- per sampler (engine lifetime): the same three for the null condition (all-zero caption, CFG's
  unconditional branch, uncond first as in spec §1.5), and, per step count, the S int-truncated
  timestep embeddings;
- per request batch, before the loop: temb = time_embed(t_i) + caption_embed for every (step, row),
  and from it every block's adaLN modulation (scale_msa, gate_msa, scale_mlp, gate_mlp) and the final
  layer's scale, in one batched GEMM per block over all steps.

The loop body (`_loop`) is then a pure function of (tables, step): it only indexes the tables with
the Python step number. It holds no step state and never reads a device value on the host, so it
never synchronises. On CUDA the whole S-step loop is captured as ONE CUDA graph per (batch bucket,
steps, CFG on/off, caption length, grid) with static input buffers, host-side prep in `plan()` and
device work only in `run()` (ARCHITECTURE §7.4, §7.6). Batches are padded to buckets 1, 2, 4, 8, …
with null rows and sliced after the replay. Elsewhere (CPU, or `use_cuda_graph=False`) the same
`_loop` runs eagerly.

Memory: the weights `[q1; k1; v1; q2]` (`[4D, D]`) and `[w1; w3]` (`[2F, D]`) of each block are fused
in place (`weight_fusion.fuse_linears`: the block's own parameters become rows of the fused matrix), so
four and two GEMMs become one each at no memory cost — which matters at CFG batch 2, where a
128 x 1792 output fills few SMs on its own. Per request, the tables hold S·R·(4L + 1)·D values and
the cross K/V 2·L·R·M·D (R = DiT rows = 2 per prompt with CFG, M = 64 caption tokens): for the released
DiT at 30 steps 10.4 M + 11.0 M values, 43 MB bf16 per prompt (static buffers, per graph bucket).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..models.dit import FINAL_NORM_EPS, LAYER_NORM_EPS, NextDiT, NextDiTBlock, rope_2d
from ..ops.dit_ops import gated_rms_residual, layer_norm_rope, rms_norm_modulate, swiglu
from ..sampling.flow_match import flow_match_sigmas
from .weight_fusion import fuse_linears

StepCallback = Callable[[int, int], None]  # (step index, number of steps)


@dataclass
class LoopInputs:
    """Everything `_loop` reads: per-request device tensors (the static buffers of a captured graph).

    B = latent rows (bucket), R = DiT rows (2B with CFG, uncond rows first; else B), S = steps.
    """

    x0: torch.Tensor  # [B, N, C] initial noise, token layout (token n = row*grid + col), model dtype
    kv: torch.Tensor  # [L, 2, R, H, M, d] cross-attention K and tanh(gate)-scaled V per block
    mod: torch.Tensor  # [S, L, 4, R, D] scale_msa, gate_msa, scale_mlp, gate_mlp per step and block
    final_scale: torch.Tensor  # [S, R, D] the output layer's scale per step
    guidance: torch.Tensor | None  # [B, 1, 1] fp32 CFG scale per latent row; None = no CFG
    dts: torch.Tensor  # [S] fp32 σ_{i+1} − σ_i

    def copy_(self, other: LoopInputs) -> None:
        """Fill these (static) buffers from `other`: the only writes a graph replay needs."""
        self.x0.copy_(other.x0)
        self.kv.copy_(other.kv)
        self.mod.copy_(other.mod)
        self.final_scale.copy_(other.final_scale)
        if self.guidance is not None:
            self.guidance.copy_(other.guidance)
        self.dts.copy_(other.dts)


@dataclass(frozen=True)
class LoopPlan:
    """Host-side description of one `run`: shapes and which captured graph (if any) replays it."""

    batch: int  # prompts in the request batch
    bucket: int  # latent rows the loop runs (batch padded up to a power of two under a graph)
    steps: int
    cfg: bool
    num_tokens: int  # caption tokens M
    grid: int  # latent grid side
    graph: _CapturedLoop | None


class _CapturedLoop:
    """One CUDA graph of the whole loop, its static inputs and its output (both live in the pool)."""

    def __init__(self, sampler: FlowSampler, static: LoopInputs, pool, stream: torch.cuda.Stream) -> None:
        self.static = static
        # Warm up on a side stream before capture, as the PyTorch CUDA-graph docs require: lazy
        # initialisation (cuBLAS handles and workspaces, Triton compiles, SDPA backend choice) must
        # not happen inside the capture. The capture then uses the same stream, so nothing
        # per-stream is first touched mid-capture, and every capture of this sampler shares that
        # stream, as pool sharing wants.
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                sampler._loop(static)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, stream=stream):
            self.out = sampler._loop(static)  # [B, N, C]

    def replay(self, inputs: LoopInputs) -> torch.Tensor:
        self.static.copy_(inputs)
        self.graph.replay()
        return self.out


def bucket_size(batch: int) -> int:
    """The smallest power of two >= batch: graphs are captured for 1, 2, 4, 8, … rows."""
    return 1 << (batch - 1).bit_length()


class FlowSampler:
    """Stage-1 flow-matching sampler over a `NextDiT`: `sample(cond, noise, steps, guidance)`."""

    def __init__(self, dit: NextDiT, device: torch.device | str, dtype: torch.dtype,
                 use_cuda_graph: bool | None = None) -> None:
        self.dit = dit
        self.cfg = dit.cfg
        self.device = torch.device(device)
        self.dtype = dtype
        on_cuda = self.device.type == "cuda"
        self.use_cuda_graph = on_cuda if use_cuda_graph is None else (bool(use_cuda_graph) and on_cuda)
        # Fused in place (the blocks' own weights become rows of these): no extra memory.
        self._qkvq = [fuse_linears([b.attn1.to_q, b.attn1.to_k, b.attn1.to_v, b.attn2.to_q])[0]
                      for b in dit.layers]  # [4D, D] each
        self._w13 = [fuse_linears([b.feed_forward.linear_1, b.feed_forward.linear_3])[0]
                     for b in dit.layers]  # [2F, D] each
        self._null: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # M -> (kv [L,2,1,H,M,d], cap [1,T])
        self._schedules: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # S -> (dts [S], time [S, T])
        self._ropes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # grid -> cos, sin [N, d/2]
        self._graphs: dict[tuple[int, int, bool, int, int], _CapturedLoop] = {}
        # One memory pool and one capture stream for all of this sampler's graphs: they never run
        # concurrently, and each replay's output is copied out at once (see `run`).
        self._pool = torch.cuda.graph_pool_handle() if self.use_cuda_graph else None
        self._stream = torch.cuda.Stream(self.device) if self.use_cuda_graph else None

    # ------------------------------------------------------------------------------ public API

    @torch.inference_mode()
    def sample(self, cond: torch.Tensor, noise: torch.Tensor, steps: int, guidance: float,
               callback: StepCallback | None = None) -> torch.Tensor:
        """Query states `cond [B, Q, H]`, noise `[B, C, S, S]` -> CLIP features `[B, Q, C]` (model dtype).

        Same contract as `reference.sample_clip_features`: `guidance > 1` runs zero-null CFG (uncond
        first), otherwise the condition alone. `callback(i, steps)` reports progress; under a CUDA graph
        it cannot run inside the replay, so it is called for every step right after the replay is
        enqueued (the steps then finish on the device asynchronously).
        """
        self._check(cond, noise, steps)
        plan = self.plan(cond.shape[0], steps, guidance, cond.shape[1], noise.shape[-1])
        feats = self.run(plan, cond, noise, guidance, callback if plan.graph is None else None)
        if plan.graph is not None and callback is not None:
            for i in range(steps):
                callback(i, steps)
        return feats

    @torch.inference_mode()
    def plan(self, batch: int, steps: int, guidance: float, num_tokens: int, grid: int) -> LoopPlan:
        """Host-side preparation: bucket, schedule, null condition and graph (captured on first use)."""
        cfg = guidance > 1.0
        self._schedule(steps)
        self._rope(grid)
        if cfg:
            self._null_condition(num_tokens)
        if not self.use_cuda_graph:
            return LoopPlan(batch, batch, steps, cfg, num_tokens, grid, None)
        bucket = bucket_size(batch)
        key = (bucket, steps, cfg, num_tokens, grid)
        if key not in self._graphs:
            static = self._empty_inputs(bucket, steps, cfg, num_tokens, grid)
            self._graphs[key] = _CapturedLoop(self, static, self._pool, self._stream)
        return LoopPlan(batch, bucket, steps, cfg, num_tokens, grid, self._graphs[key])

    @torch.inference_mode()
    def run(self, plan: LoopPlan, cond: torch.Tensor, noise: torch.Tensor, guidance: float,
            callback: StepCallback | None = None) -> torch.Tensor:
        """Device work of one request batch: encode the condition, build the tables, run or replay."""
        inputs = self.prepare(plan, cond, noise, guidance)
        if plan.graph is None:
            return self._loop(inputs, callback)[:plan.batch]  # [B, N, C]
        # The graph's output lives in the shared pool, where another graph's replay may overwrite
        # it: copy the real rows out now.
        return plan.graph.replay(inputs)[:plan.batch].clone()

    # ------------------------------------------------------------------------------ hoisted work

    def _schedule(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per step count, once: Euler increments `[S]` fp32 and timestep embeddings `[S, T]`."""
        if steps not in self._schedules:
            sigmas, timesteps = flow_match_sigmas(steps, device=self.device)  # [S+1], [S]
            # int64 truncation as the official loop feeds the DiT (spec §1.5).
            time = self.dit.time_caption_embed.embed_timestep(timesteps.to(torch.int64))  # [S, T]
            self._schedules[steps] = (sigmas[1:] - sigmas[:-1], time)
        return self._schedules[steps]

    def _rope(self, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
        if grid not in self._ropes:
            self._ropes[grid] = rope_2d(grid, self.cfg.head_dim, self.cfg.rope_theta, device=self.device)
        return self._ropes[grid]

    def _encode(self, caption: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Caption `[B, M, caption_dim]` -> cross K/V `[L, 2, B, H, M, d]` and caption embedding `[B, T]`."""
        cp = self.dit.project_caption(caption)  # [B, M, D]
        per_block = []
        for block in self.dit.layers:
            k, v = block.cross_key_value(cp)  # [B, M, H, d]
            # softmax(qkᵀ)·V·g = (softmax(qkᵀ)·V)·g: the per-head cross gate is folded into V once.
            v = v * block.gate.tanh().to(v.dtype).view(1, 1, -1, 1)
            per_block.append(torch.stack([k, v]).transpose(2, 3))  # [2, B, H, M, d]
        return torch.stack(per_block), self.dit.time_caption_embed.embed_caption(cp)

    def _null_condition(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The CFG null branch (all-zero caption), once per sampler and caption length."""
        if num_tokens not in self._null:
            zeros = torch.zeros(1, num_tokens, self.cfg.caption_dim, device=self.device, dtype=self.dtype)
            self._null[num_tokens] = self._encode(zeros)
        return self._null[num_tokens]

    def _tables(self, cap: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Caption embeddings `[R, T]` -> modulation `[S, L, 4, R, D]` and final scale `[S, R, D]`."""
        _, time = self._schedule(steps)
        temb = time[:, None, :] + cap[None, :, :]  # [S, R, T], the reference's temb at every step
        mod = torch.stack([b.norm1.modulation(temb).transpose(1, 2) for b in self.dit.layers], dim=1)
        return mod, self.dit.norm_out.scale(temb)

    @torch.inference_mode()
    def prepare(self, plan: LoopPlan, cond: torch.Tensor, noise: torch.Tensor, guidance: float) -> LoopInputs:
        """Per-request loop inputs for `plan.bucket` latent rows (rows past `plan.batch` are null padding):
        condition encoding and tables, all device work, none of it inside the loop."""
        cond = cond.to(self.device, self.dtype)
        kv, cap = self._encode(cond)  # [L, 2, B, H, M, d], [B, T]
        pad = plan.bucket - plan.batch
        x0 = noise.to(self.device, self.dtype).flatten(2).transpose(1, 2)  # [B, N, C]
        if pad or plan.cfg:
            null_kv, null_cap = self._null_condition(plan.num_tokens)
            lead = plan.bucket if plan.cfg else 0  # uncond rows first (spec §1.5)
            kv = torch.cat([null_kv.expand(-1, -1, lead, -1, -1, -1), kv,
                            null_kv.expand(-1, -1, pad, -1, -1, -1)], dim=2)  # [L, 2, R, H, M, d]
            cap = torch.cat([null_cap.expand(lead, -1), cap, null_cap.expand(pad, -1)])  # [R, T]
            x0 = torch.cat([x0, x0.new_zeros(pad, *x0.shape[1:])])  # [bucket, N, C]
        mod, final_scale = self._tables(cap, plan.steps)
        g = None
        if plan.cfg:  # [bucket, 1, 1] fp32: a buffer, not a Python constant, so one graph serves any scale
            g = torch.full((plan.bucket, 1, 1), float(guidance), dtype=torch.float32, device=self.device)
        return LoopInputs(x0, kv, mod, final_scale, g, self._schedule(plan.steps)[0])

    def _empty_inputs(self, bucket: int, steps: int, cfg: bool, num_tokens: int, grid: int) -> LoopInputs:
        """Zeroed static buffers of a graph (finite values for the warm-up and capture runs)."""
        c = self.cfg
        rows = 2 * bucket if cfg else bucket
        zeros = dict(device=self.device, dtype=self.dtype)
        return LoopInputs(
            x0=torch.zeros(bucket, grid * grid, c.in_channels, **zeros),
            kv=torch.zeros(c.num_layers, 2, rows, c.num_heads, num_tokens, c.head_dim, **zeros),
            mod=torch.zeros(steps, c.num_layers, 4, rows, c.hidden_size, **zeros),
            final_scale=torch.zeros(steps, rows, c.hidden_size, **zeros),
            guidance=torch.ones(bucket, 1, 1, dtype=torch.float32, device=self.device) if cfg else None,
            dts=torch.zeros(steps, dtype=torch.float32, device=self.device),
        )

    # ------------------------------------------------------------------------------ the loop

    def _loop(self, inp: LoopInputs, callback: StepCallback | None = None) -> torch.Tensor:
        """All Euler steps from `inp.x0` (σ = 1) to x0 (σ = 0): `[B, N, C]`.

        A pure function of (tables, step): each step only indexes `inp` with the Python int `i`.
        No host syncs here (nothing reads a device value), and no step state outside `x`; under a
        CUDA graph every intermediate lives in the graph's pool, so a replay allocates nothing.
        """
        steps = inp.dts.shape[0]
        x = inp.x0
        for i in range(steps):
            v = self._velocity(x, inp, i)  # [B, N, C]
            # flow_match_euler_step's rounding: product in fp32 rounded once to the velocity's dtype,
            # sum in fp32 (identity in fp32).
            x = (x.float() + (inp.dts[i] * v.float()).to(v.dtype)).to(x.dtype)
            if callback is not None:
                callback(i, steps)
        return x

    def _velocity(self, x: torch.Tensor, inp: LoopInputs, i: int) -> torch.Tensor:
        """Guided velocity `[B, N, C]` of latent tokens `x [B, N, C]` at step i."""
        grid = int(round(x.shape[1] ** 0.5))
        rope = self._ropes[grid]
        h = self.dit.patch_embedder.proj(x)  # [B, N, D]; the CFG halves share the latent
        if inp.guidance is not None:
            h = h.repeat(2, 1, 1)  # [2B, N, D]
        for layer, block in enumerate(self.dit.layers):
            h = self._block(layer, block, h, inp.mod[i, layer], inp.kv[layer], rope)
        out = self.dit.norm_out
        scale = inp.final_scale[i]  # [R, D]
        v = out.linear_2(F.layer_norm(h, (h.shape[-1],), eps=FINAL_NORM_EPS) * (1 + scale[:, None]))  # [R, N, C]
        if inp.guidance is None:
            return v
        v_uncond, v_cond = v.chunk(2)
        # The reference's v_u + g·(v_c − v_u) with g per row, product rounded once to the model dtype.
        return v_uncond + (inp.guidance * (v_cond - v_uncond).float()).to(v.dtype)

    def _block(self, layer: int, block: NextDiTBlock, x: torch.Tensor, mod: torch.Tensor, kv: torch.Tensor,
               rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """`NextDiTBlock.forward` from precomputed modulation `mod [4, R, D]` and cross K/V `kv [2, R, H, M, d]`."""
        scale_msa, gate_msa, scale_mlp, gate_mlp = mod  # [R, D] each
        heads, eps = self.cfg.num_heads, self.cfg.norm_eps
        cos, sin = rope
        a1, a2 = block.attn1, block.attn2
        h = rms_norm_modulate(x, block.norm1.norm.weight, scale_msa, eps)  # [R, N, D]
        q1, k1, v1, q2 = F.linear(h, self._qkvq[layer]).chunk(4, dim=-1)  # [R, N, D] each
        q1 = layer_norm_rope(q1, a1.norm_q.weight, a1.norm_q.bias, LAYER_NORM_EPS, cos, sin, heads)
        k1 = layer_norm_rope(k1, a1.norm_k.weight, a1.norm_k.bias, LAYER_NORM_EPS, cos, sin, heads)
        q2 = layer_norm_rope(q2, a2.norm_q.weight, a2.norm_q.bias, LAYER_NORM_EPS, cos, sin, heads)
        v1 = v1.unflatten(-1, (heads, -1))  # [R, N, H, d]
        self_out = F.scaled_dot_product_attention(q1.transpose(1, 2), k1.transpose(1, 2), v1.transpose(1, 2))
        cross_out = F.scaled_dot_product_attention(q2.transpose(1, 2), kv[0], kv[1])  # [R, H, N, d], gated
        mixed = a2.to_out[0]((self_out + cross_out).transpose(1, 2).flatten(2))  # [R, N, D]
        x = gated_rms_residual(x, mixed, block.norm2.weight, gate_msa, eps)
        u = rms_norm_modulate(x, block.ffn_norm1.weight, scale_mlp, eps)
        gate, up = F.linear(u, self._w13[layer]).chunk(2, dim=-1)  # [R, N, F] each
        f = block.feed_forward.linear_2(swiglu(gate, up))  # [R, N, D]
        return gated_rms_residual(x, f, block.ffn_norm2.weight, gate_mlp, eps)

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


__all__ = ["FlowSampler", "LoopInputs", "LoopPlan", "StepCallback", "bucket_size"]
