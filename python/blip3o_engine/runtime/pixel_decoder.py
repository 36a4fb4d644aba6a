"""`PixelDecoder`: the optimized stage-2 path (CLIP features -> uint8 pixels, spec §1.6).

Same math and contract as `reference.decode_pixels` (SDXL-type UNet under EulerDiscrete, CFG batched
with the condition FIRST, then the VAE and uint8 conversion), restructured for speed:

- Loop invariants are computed once per request: every transformer block's cross-attention K/V of
  the fixed CLIP features (`UNet2DConditional.precompute_cross_kv`) and the SDXL added-condition
  embedding of (pooled features, size ids). The timestep embeddings of all S steps are one batched
  call per step count, cached. A step only indexes device tables: no allocation of inputs, no host
  sync (ARCHITECTURE §7.5, §7.7).
- The step (`DecoderStep`: scale input, UNet, CFG combine, Euler update) and the VAE tail
  (`LatentsToPixels`: unscale, VAE, uint8 on device) are plain modules with tensor inputs only and
  no data-dependent Python control flow, so torch.compile traces each as one graph and a later
  export (ONNX / AOTInductor / TensorRT) can take them as they are.
- On CUDA the step is compiled by inductor and captured in a CUDA graph per input shape; see
  `PixelDecoder` for why the capture is manual rather than inductor's "reduce-overhead".

Memory (8B model, bf16, one 80 GB GPU, batch 4 at 1024², i.e. a CFG batch of 8 latents of 128²):
- parameters (spec §4 counts; meta-built modules agree): LLM 7.613 B + ViT 0.677 B + queries 0.2 M
  + DiT 1.365 B + UNet 2.526 B + VAE decoder 0.049 B = 12.23 B params = 24.5 GB (22.8 GiB).
- UNet step activations: ~51 MB of skip connections per latent (conv_in and two resnet outputs at
  320x128², downsampled and level-2/3 skips) plus the transient of the widest block (~100 MB:
  GEGLU at 640x64², the 128² up block's 960-channel concat); with fused SDPA (no score matrix)
  that is 1.28 GB for the batch of 8 (fake-tensor simulation of one step: 1.28 GB; batch 1: 0.32 GB).
  A math-SDPA fallback would add 10 heads x 4096² x 2 B = 0.34 GB per latent at level 2 (2.7 GB).
  Cross-K/V: 0.17 GB, held twice when a CUDA graph keeps static copies; the graph pool keeps the
  step's activations (~1.3 GB) reserved between requests.
- VAE decode of 4 images: 6.4 GB peak (256 channels at 1024² in the last up block), after the loop.
- Total ≈ 24.5 + 1.3 + 0.3 + 6.4 + ~1.5 (CUDA context, cuBLAS/inductor workspaces) ≈ 34 GB, leaving
  ~45 GB of headroom for the LLM's paged KV pool and larger batches. The VAE, not the UNet, is what
  grows fastest with the batch (batch 16: UNet ~5 GB, VAE ~26 GB; chunking the VAE batch, not done
  here, would bound it).

Not thread-safe: one decode at a time per `PixelDecoder` (the captured graphs own static buffers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..config import EulerSchedulerConfig
from ..errors import ConfigError, InputError
from ..models.unet import KV, UNet2DConditional, sdxl_time_ids
from ..models.vae import VAEDecoder, to_uint8
from ..sampling.euler_discrete import EulerSchedule, euler_discrete_schedule, euler_step, scale_model_input

StepCallback = Callable[[int, int], None]  # (step index, number of steps), called after each step


class DecoderStep(nn.Module):
    """One sampler step with the conditioning hoisted: scale the input, UNet on [cond, uncond]
    (CFG on) or on z alone, guidance combine, Euler update from σ_i to σ_{i+1}.

    The unit that is compiled and captured. Every input is a tensor (a Python float timestep or
    guidance would be baked into the compiled graph and recompile per value); CFG on/off is read
    from shapes, which compile and export specialise on.

    Guidance as an fp32 device tensor is exact in fp32 and in compiled code (inductor computes bf16
    pointwise ops in fp32, as the reference's Python-float multiply does). Eager bf16 on CUDA casts
    it to bf16 first: exact for the default 3.0 and for any value with <= 8 significant bits.
    """

    def __init__(self, unet: UNet2DConditional) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, z: Tensor, sigmas: Tensor, temb: Tensor, add_emb: Tensor, guidance: Tensor,
                cross_kv: Sequence[KV]) -> Tensor:
        """z [B, 4, h, w] latents at σ_i (model dtype); sigmas [2] fp32 = (σ_i, σ_{i+1}); temb [T] this
        step's time embedding; add_emb [N, T] with N = 2B (CFG on, rows [cond, uncond]) or B;
        guidance [] fp32; cross_kv one (k, v) [N, heads, Q, Dh] per transformer block.
        Returns the latents at σ_{i+1} [B, 4, h, w]."""
        use_cfg = add_emb.shape[0] != z.shape[0]
        # The schedule's pure functions, on the 2-entry window: index 0 is σ_i, index 1 is σ_{i+1}.
        z_in = scale_model_input(z, sigmas, 0)  # [B, 4, h, w]
        if use_cfg:
            z_in = torch.cat([z_in, z_in])  # [2B, 4, h, w]
        eps = self.unet.denoise(z_in, temb + add_emb, cross_kv=cross_kv)  # [N, 4, h, w]
        if use_cfg:
            eps_c, eps_u = eps.chunk(2)  # cond first (spec §1.6)
            eps = eps_u + guidance * (eps_c - eps_u)
        return euler_step(z, eps, sigmas, 0)


class LatentsToPixels(nn.Module):
    """Sampler latents [B, 4, h, w] -> uint8 images [B, H, W, 3] on the latents' device:
    divide by the VAE scaling factor, decode, `(x/2 + 0.5).clamp(0, 1)`, round(x·255)."""

    def __init__(self, vae: VAEDecoder, scaling_factor: float) -> None:
        super().__init__()
        self.vae = vae
        self.scaling_factor = scaling_factor

    def forward(self, latents: Tensor) -> Tensor:
        return to_uint8(self.vae(latents / self.scaling_factor))


@dataclass(frozen=True, eq=False)
class StepTables:
    """Per step count, cached: the schedule (device tensors) and every step's time embedding."""

    schedule: EulerSchedule
    temb: Tensor  # [S, T] model dtype: row i = time MLP(sinusoid(timesteps[i]))


@dataclass(frozen=True, eq=False)
class Conditioning:
    """Per request: everything the steps read that does not change over the steps."""

    add_emb: Tensor  # [N, T] SDXL added-condition embedding, N = 2B (CFG, [cond, uncond]) or B
    cross_kv: list[KV]  # per transformer block: (k, v) [N, heads, Q, Dh]
    guidance: Tensor  # [] fp32


@dataclass(eq=False)
class CapturedStep:
    """A CUDA graph of one step for one input shape, reading and writing static buffers.

    The graph advances `z` in place (step output copied back inside the graph), so the host loop
    only refreshes the two per-step table rows and replays.
    """

    z: Tensor
    sigmas: Tensor
    temb: Tensor
    add_emb: Tensor
    guidance: Tensor
    cross_kv: list[KV]
    graph: torch.cuda.CUDAGraph | None = field(default=None)

    def load(self, z: Tensor, cond: Conditioning) -> None:
        """Copy one request's inputs into the static buffers (device-to-device, asynchronous)."""
        self.z.copy_(z)
        self.add_emb.copy_(cond.add_emb)
        self.guidance.copy_(cond.guidance)
        for (k_buf, v_buf), (k, v) in zip(self.cross_kv, cond.cross_kv):
            k_buf.copy_(k)
            v_buf.copy_(v)

    def args(self) -> tuple:
        return self.z, self.sigmas, self.temb, self.add_emb, self.guidance, self.cross_kv


class PixelDecoder:
    """Stage 2, optimized: `decode(feats, uncond, noise, steps, guidance)` gives what
    `reference.decode_pixels` gives, batched over requests.

    compile: torch.compile (inductor, dynamic=False, fullgraph) of the step and of the VAE tail.
    dynamic=False: a shape compiles once and every later step and request of that shape reuses it
    (the timestep and guidance are tensor inputs, so their values never recompile). Each new shape
    (batch, latent size, CFG on/off) compiles once; torch._dynamo's cache_size_limit (8 by
    default) bounds how many distinct shapes one process keeps compiled. Default (None): on for
    CUDA, off for CPU, where inductor on a 2-core machine takes ~80 s for even the tiny UNet.

    use_cuda_graph: capture the (compiled or eager) step in a `torch.cuda.CUDAGraph` per shape and
    replay it for every step. Manual capture rather than inductor's mode="reduce-overhead"
    because: the per-request constants (cross-K/V of ~70 blocks, added embedding, guidance) are
    copied into static buffers once per request, where cudagraph trees would copy every non-static
    input on every replay (or re-record when a static input's address changes); the step advances
    z inside the graph, which avoids cudagraph trees' rule that a replay overwrites the previous
    replay's outputs; and the eager step can be captured too (compile=False), so graph == eager is
    testable without inductor. This is the static-buffer pattern of the AR runner (ARCHITECTURE
    §7.4). All shapes share one memory pool (decodes run one at a time, and nothing a graph
    leaves in the pool is read after its replay). Default (None): on for CUDA.

    The per-step callback runs on the host after each step is queued (with a graph: replayed); it
    does not wait for the GPU.
    """

    def __init__(self, unet: UNet2DConditional, vae: VAEDecoder, vae_scaling_factor: float,
                 scheduler_cfg: EulerSchedulerConfig, device: torch.device | str, dtype: torch.dtype,
                 compile: bool | None = None, use_cuda_graph: bool | None = None) -> None:
        self.unet = unet
        self.device = torch.device(device)
        self.dtype = dtype
        self.scheduler_cfg = scheduler_cfg
        self.latent_scale = vae.cfg.scale_factor  # pixels per latent cell
        on_cuda = self.device.type == "cuda"
        self.compile = on_cuda if compile is None else compile
        self.use_cuda_graph = on_cuda if use_cuda_graph is None else use_cuda_graph
        if self.use_cuda_graph and not on_cuda:
            raise ConfigError("use_cuda_graph needs a CUDA device")
        self.step = DecoderStep(unet)
        self.to_pixels = LatentsToPixels(vae, vae_scaling_factor)
        if self.compile:
            self._step_fn = torch.compile(self.step, dynamic=False, fullgraph=True)
            self._pixels_fn = torch.compile(self.to_pixels, dynamic=False, fullgraph=True)
        else:
            self._step_fn, self._pixels_fn = self.step, self.to_pixels
        self._tables: dict[int, StepTables] = {}
        self._captured: dict[tuple, CapturedStep] = {}
        self._pool = None

    # ------------------------------------------------------------------------------ public

    @torch.inference_mode()
    def decode(self, feats: Tensor, uncond: Tensor, noise: Tensor, steps: int, guidance: float,
               callback: StepCallback | None = None) -> Tensor:
        """feats [B, Q, C] CLIP features; uncond [1 or B, Q, C] null features (stage 1 on " ");
        noise [B, 4, h, w] standard normal, unscaled. Returns uint8 images [B, 8h, 8w, 3] on device."""
        return self.latents_to_pixels(self.sample_latents(feats, uncond, noise, steps, guidance, callback))

    @torch.inference_mode()
    def sample_latents(self, feats: Tensor, uncond: Tensor, noise: Tensor, steps: int, guidance: float,
                       callback: StepCallback | None = None) -> Tensor:
        """The UNet loop alone (arguments as `decode`): the sampler's final latents [B, 4, h, w]."""
        self._check(feats, uncond, noise)
        tables = self.tables(steps)
        cond = self.condition(feats, uncond, tuple(noise.shape[-2:]), guidance)
        z = noise.to(self.device, self.dtype) * tables.schedule.init_noise_sigma  # [B, 4, h, w]
        if self.use_cuda_graph:
            return self._run_graph(z, cond, tables, callback)
        return self._run_eager(z, cond, tables, callback)

    @torch.inference_mode()
    def latents_to_pixels(self, latents: Tensor) -> Tensor:
        """Sampler latents [B, 4, h, w] -> uint8 [B, H, W, 3] (VAE, compiled when `compile`)."""
        return self._pixels_fn(latents)

    @torch.inference_mode()
    def tables(self, steps: int) -> StepTables:
        """Schedule and the [S, T] time-embedding table for `steps`, built once per step count."""
        if steps not in self._tables:
            schedule = euler_discrete_schedule(self.scheduler_cfg, steps, device=self.device)
            temb = self.unet.time_embed(schedule.timesteps, self.dtype)  # [S, T], one batched call
            self._tables[steps] = StepTables(schedule, temb)
        return self._tables[steps]

    @torch.inference_mode()
    def condition(self, feats: Tensor, uncond: Tensor, latent_hw: tuple[int, int], guidance: float
                  ) -> Conditioning:
        """The per-request invariants, built as the reference builds the UNet's inputs."""
        b = feats.shape[0]
        embeds = feats.to(self.device, self.dtype)  # [B, Q, C]
        if guidance > 1.0:
            null = uncond.to(self.device, self.dtype).expand(b, -1, -1)
            embeds = torch.cat([embeds, null])  # [2B, Q, C], cond first (spec §1.6)
        pooled = embeds.mean(dim=1)  # [N, C] SDXL "text_embeds" = mean over tokens
        h, w = latent_hw
        s = self.latent_scale
        time_ids = sdxl_time_ids(h * s, w * s, embeds.shape[0], self.dtype, self.device)  # [N, 6]
        return Conditioning(
            add_emb=self.unet.added_embed(pooled, time_ids, self.dtype),  # [N, T]
            cross_kv=self.unet.precompute_cross_kv(embeds),
            guidance=torch.full((), guidance, dtype=torch.float32, device=self.device))

    # ------------------------------------------------------------------------------ loops

    def _run_eager(self, z: Tensor, cond: Conditioning, tables: StepTables,
                   callback: StepCallback | None) -> Tensor:
        sigmas, temb = tables.schedule.sigmas, tables.temb
        steps = tables.schedule.num_steps
        for i in range(steps):  # no host syncs: the step reads views of device tables
            z = self._step_fn(z, sigmas[i:i + 2], temb[i], cond.add_emb, cond.guidance, cond.cross_kv)
            if callback is not None:
                callback(i, steps)
        return z

    def _run_graph(self, z: Tensor, cond: Conditioning, tables: StepTables,
                   callback: StepCallback | None) -> Tensor:
        captured = self._capture(z, cond)
        captured.load(z, cond)
        sigmas, temb = tables.schedule.sigmas, tables.temb
        steps = tables.schedule.num_steps
        for i in range(steps):  # no host syncs: device-to-device row copies, then a replay
            captured.sigmas.copy_(sigmas[i:i + 2])
            captured.temb.copy_(temb[i])
            captured.graph.replay()
            if callback is not None:
                callback(i, steps)
        return captured.z.clone()  # the static buffer is overwritten by the next decode

    def _capture(self, z: Tensor, cond: Conditioning) -> CapturedStep:
        """The graph for this input shape, captured on first use (after warm-up, which also
        compiles, on a side stream as CUDA graph capture requires)."""
        key = (tuple(z.shape), tuple(cond.add_emb.shape), tuple(cond.cross_kv[0][0].shape))
        if key in self._captured:
            return self._captured[key]
        d = self.device
        static = CapturedStep(
            z=torch.zeros_like(z), sigmas=torch.zeros(2, dtype=torch.float32, device=d),
            temb=torch.zeros(cond.add_emb.shape[-1], dtype=self.dtype, device=d),
            add_emb=torch.empty_like(cond.add_emb), guidance=torch.empty_like(cond.guidance),
            # empty_like keeps project_kv's transposed strides, so the graph sees eager's layout.
            cross_kv=[(torch.empty_like(k), torch.empty_like(v)) for k, v in cond.cross_kv])
        static.load(z, cond)
        static.sigmas.copy_(torch.tensor([1.0, 0.5]))  # any finite window for warm-up
        side = torch.cuda.Stream(d)
        side.wait_stream(torch.cuda.current_stream(d))
        with torch.cuda.stream(side):
            for _ in range(2):  # compiles / autotunes; initialises cuBLAS workspaces
                self._step_fn(*static.args())
        torch.cuda.current_stream(d).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        static.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(static.graph, pool=self._pool):
            static.z.copy_(self._step_fn(*static.args()))
        self._captured[key] = static
        return static

    # ------------------------------------------------------------------------------ checks

    def _check(self, feats: Tensor, uncond: Tensor, noise: Tensor) -> None:
        if feats.ndim != 3:
            raise InputError(f"feats must be [B, Q, C], got {list(feats.shape)}")
        b = feats.shape[0]
        if uncond.ndim != 3 or uncond.shape[0] not in (1, b) or uncond.shape[1:] != feats.shape[1:]:
            raise InputError(f"uncond must be [1 or {b}, {feats.shape[1]}, {feats.shape[2]}], "
                             f"got {list(uncond.shape)}")
        c = self.unet.cfg.in_channels
        if noise.ndim != 4 or noise.shape[:2] != (b, c):
            raise InputError(f"noise must be [{b}, {c}, h, w], got {list(noise.shape)}")


__all__ = ["PixelDecoder", "DecoderStep", "LatentsToPixels", "StepTables", "Conditioning", "CapturedStep"]
