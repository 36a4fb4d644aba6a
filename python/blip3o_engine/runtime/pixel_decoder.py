"""`PixelDecoder`: the optimized stage 2 (CLIP features -> uint8 pixels, docs/model_spec.md §1.6), continuously batched.

Same math and contract as `reference.decode_pixels` (SDXL-type UNet under EulerDiscrete, CFG with the
condition first, then the VAE and uint8 conversion), restructured for speed and for the step loop:

- Continuous batching of denoising. Images are admitted into slots of a `DecoderBatch` (one per latent
  size) and every `step()` runs ONE UNet call over all of them, each at its own step of its own schedule:
  per-row σ_i, σ_{i+1}, time embedding, guidance and CFG flag. Requests join and leave at any step; the
  occupied slots are always a prefix (a leaving slot is filled by the last one), padded up to a batch bucket
  with rows that are computed and discarded. An image's numbers do not depend on what it is batched with,
  up to the GEMMs' summation order (tests: within 1 uint8 level of the image generated alone).
- Loop invariants are computed once per request, at admission: every transformer block's cross-attention
  K/V of the fixed CLIP features (`UNet2DConditional.precompute_cross_kv`, for the cond and null rows) and
  the SDXL added-condition embedding. The timestep embeddings of a schedule are one batched call per step
  count, cached. A step only copies two table rows per slot (device to device) and runs: no host sync.
- The step (`DecoderStep`) and the VAE tail (`LatentsToPixels`) are plain modules with tensor inputs only and
  no data-dependent Python control flow, so torch.compile traces each as one graph per shape and export takes
  them as they are. On CUDA the step is captured as a CUDA graph per (latent size, batch bucket) through the
  runtime's `GraphCache`; the graph advances the static latents in place, so nothing in the shared pool is
  read after a replay.
- The VAE decodes one image at a time: its peak (256 channels at the output size) is what grows fastest with
  the batch, and the memory plan reserves exactly one image's worth. It runs in pieces (`begin_pixels` /
  `advance_pixels`, a few up blocks each) so that the step loop can put one piece in an engine step: the
  whole VAE at 1024² costs more than a decoder step, and chat would wait for it.

Not thread-safe: one step at a time (the step loop's thread).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..config import EulerSchedulerConfig
from ..errors import InputError
from ..models.unet import KV, UNet2DConditional, sdxl_time_ids
from ..models.vae import VAEDecoder, to_uint8
from ..sampling.euler_discrete import EulerSchedule, euler_discrete_schedule, euler_update, scale_by_sigma
from ..sampling.guidance import cfg_combine
from .cuda_graphs import GraphCache, batch_buckets, bucket_for

StepCallback = Callable[[int, int], None]  # (step index, number of steps), called after each step


class DecoderStep(nn.Module):
    """One sampler step over a batch of B images, each at its own σ: scale the input, UNet on the 2B rows
    (cond, uncond interleaved per image), guidance combine, Euler update from σ_i to σ_{i+1}.

    The unit that is compiled and captured. Every input is a tensor (a Python float timestep or guidance
    would be baked into the compiled graph and recompile per value). Rows whose `cfg` is False take the
    conditional ε alone, as the reference does without CFG (their uncond row is computed and unused)."""

    def __init__(self, unet: UNet2DConditional) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, z: Tensor, sigmas: Tensor, temb: Tensor, add_emb: Tensor, guidance: Tensor, cfg: Tensor,
                cross_kv: Sequence[KV]) -> tuple[Tensor, Tensor]:
        """z [B, 4, h, w] latents (model dtype); sigmas [B, 2] fp32 (σ_i, σ_{i+1}) per image; temb [B, T] each
        image's time embedding; add_emb [2B, T] (rows 2b = cond, 2b+1 = uncond); guidance [B] fp32; cfg [B]
        bool; cross_kv one (k, v) [2B, heads, Q, Dh] per transformer block.
        Returns (latents at σ_{i+1} [B, 4, h, w], the x0 prediction z − σ·ε [B, 4, h, w], for previews)."""
        sigma, sigma_next = sigmas[:, 0].view(-1, 1, 1, 1), sigmas[:, 1].view(-1, 1, 1, 1)  # [B, 1, 1, 1]
        z_in = scale_by_sigma(z, sigma).repeat_interleave(2, dim=0)  # [2B, 4, h, w]
        eps = self.unet.denoise(z_in, temb.repeat_interleave(2, dim=0) + add_emb, cross_kv=cross_kv)  # [2B, ...]
        eps_c, eps_u = eps[0::2], eps[1::2]  # cond first (docs/model_spec.md §1.6)
        guided = cfg_combine(eps_u, eps_c, guidance.view(-1, 1, 1, 1))
        eps = torch.where(cfg.view(-1, 1, 1, 1), guided, eps_c)
        x0 = (z.float() - sigma * eps.float()).to(z.dtype)
        return euler_update(z, eps, sigma, sigma_next), x0


class LatentsToPixels(nn.Module):
    """Sampler latents [B, 4, h, w] -> uint8 images [B, H, W, 3] on the latents' device:
    divide by the VAE scaling factor, decode, `(x/2 + 0.5).clamp(0, 1)`, round(x·255)."""

    def __init__(self, vae: VAEDecoder, scaling_factor: float) -> None:
        super().__init__()
        self.vae = vae
        self.scaling_factor = scaling_factor

    def pieces(self) -> list[Callable[[Tensor], Tensor]]:
        """`forward` in consecutive pieces (`VAEDecoder.pieces`, the scaling joined to the first and the
        uint8 conversion to the last): what `PixelDecoder.advance_pixels` runs one at a time."""
        first, *middle, last = self.vae.pieces()  # at least two
        return [lambda z: first(z / self.scaling_factor), *middle, lambda x: to_uint8(last(x))]

    def forward(self, latents: Tensor) -> Tensor:
        return to_uint8(self.vae(latents / self.scaling_factor))


@dataclass(eq=False)
class PixelsRun:
    """One image's VAE decode in progress (`PixelDecoder.begin_pixels` / `advance_pixels`)."""

    x: Tensor  # the latents [1, 4, h, w], then the activation between pieces, at the end uint8 [1, H, W, 3]
    total: int  # pieces
    done: int = 0

    @property
    def finished(self) -> bool:
        return self.done == self.total


@dataclass(frozen=True, eq=False)
class StepTables:
    """Per step count, cached: the schedule (device tensors) and every step's time embedding."""

    schedule: EulerSchedule
    temb: Tensor  # [S, T] model dtype: row i = time MLP(sinusoid(timesteps[i]))


@dataclass(eq=False)
class _Slot:
    key: Hashable
    tables: StepTables
    step: int = 0  # steps done

    @property
    def total(self) -> int:
        return self.tables.schedule.num_steps


@dataclass(frozen=True)
class DecoderProgress:
    """What one `PixelDecoder.step()` did for one image."""

    key: Hashable
    step: int  # steps done now (1..total)
    total: int

    @property
    def finished(self) -> bool:
        return self.step == self.total


@dataclass(eq=False)
class DecoderBatch:
    """The continuous batch of one latent size: static per-slot buffers, occupied slots a prefix."""

    z: Tensor  # [cap, 4, h, w]
    x0: Tensor  # [cap, 4, h, w] the last step's x0 prediction
    sigmas: Tensor  # [cap, 2] fp32
    temb: Tensor  # [cap, T]
    add_emb: Tensor  # [2cap, T]
    guidance: Tensor  # [cap] fp32
    cfg: Tensor  # [cap] bool
    cross_kv: list[tuple[Tensor, Tensor]]  # per block [2cap, heads, Q, Dh]
    slots: list[_Slot] = field(default_factory=list)

    @property
    def capacity(self) -> int:
        return self.z.shape[0]

    def rows(self, b: int) -> tuple:
        """The step's arguments over the first b slots."""
        return (self.z[:b], self.sigmas[:b], self.temb[:b], self.add_emb[:2 * b], self.guidance[:b], self.cfg[:b],
                [(k[:2 * b], v[:2 * b]) for k, v in self.cross_kv])

    def move(self, src: int, dst: int) -> None:
        """Copy slot src's state into slot dst (a leaving slot is filled by the last one)."""
        for t in (self.z, self.x0, self.sigmas, self.temb, self.guidance, self.cfg):
            t[dst] = t[src]
        self.add_emb[2 * dst:2 * dst + 2] = self.add_emb[2 * src:2 * src + 2]
        for k, v in self.cross_kv:
            k[2 * dst:2 * dst + 2] = k[2 * src:2 * src + 2]
            v[2 * dst:2 * dst + 2] = v[2 * src:2 * src + 2]


class PixelDecoder:
    """Stage 2, optimized and continuously batched (module docstring).

    admit(key, ...) -> step() per engine step -> take(key) once finished -> latents_to_pixels(...).
    `decode(feats, uncond, noise, steps, guidance)` runs a whole batch the same way (stage methods, tests).

    compile: torch.compile (inductor, dynamic=False) of the step and of the VAE tail, one compile per shape
    (latent size x batch bucket), reused by every later step and request. Default (None): on for CUDA, off for
    CPU. graphs: the runtime's `GraphCache` for this decoder (None: eager).
    """

    def __init__(self, unet: UNet2DConditional, vae: VAEDecoder, vae_scaling_factor: float,
                 scheduler_cfg: EulerSchedulerConfig, device: torch.device | str, dtype: torch.dtype,
                 compile: bool | None = None, graphs: GraphCache | None = None, max_batch: int = 4) -> None:
        self.unet = unet
        self.device = torch.device(device)
        self.dtype = dtype
        self.scheduler_cfg = scheduler_cfg
        self.latent_scale = vae.cfg.scale_factor  # pixels per latent cell
        self.compile = self.device.type == "cuda" if compile is None else compile
        self.graphs = graphs if graphs is not None else GraphCache("decoder", None, False)
        self.max_batch = max_batch
        self.buckets = batch_buckets(max_batch)
        self.step_module = DecoderStep(unet)
        self.to_pixels = LatentsToPixels(vae, vae_scaling_factor)
        pieces = self.to_pixels.pieces()
        if self.compile:
            self._step_fn = torch.compile(self.step_module, dynamic=False, fullgraph=True)
            self._pixel_fns = [torch.compile(p, dynamic=False, fullgraph=True) for p in pieces]
        else:
            self._step_fn, self._pixel_fns = self.step_module, pieces
        self._tables: dict[int, StepTables] = {}
        self._batches: dict[tuple[int, int], DecoderBatch] = {}  # latent (h, w) -> its continuous batch
        self._where: dict[Hashable, tuple[int, int]] = {}  # key -> latent size of its batch

    # ------------------------------------------------------------------------------ continuous batching

    def has_room(self, latent_hw: tuple[int, int]) -> bool:
        batch = self._batches.get(tuple(latent_hw))
        return batch is None or len(batch.slots) < batch.capacity

    def __len__(self) -> int:
        return len(self._where)

    @torch.inference_mode()
    def admit(self, key: Hashable, feats: Tensor, uncond: Tensor, noise: Tensor, steps: int, guidance: float) -> None:
        """Start denoising one image: feats, uncond [Q, C]; noise [4, h, w] standard normal (unscaled)."""
        hw = tuple(noise.shape[-2:])
        if key in self._where:
            raise ValueError(f"decoder key {key!r} is already admitted")
        if not self.has_room(hw):
            raise RuntimeError(f"the decoder batch for latents {hw} is full ({self.max_batch} images)")
        batch = self._batch(hw, feats.shape[-2], feats.shape[-1])
        s = len(batch.slots)
        tables = self.tables(steps)
        cfg = guidance > 1.0
        embeds = torch.stack([feats, uncond if cfg else torch.zeros_like(uncond)]).to(self.device, self.dtype)
        pooled = embeds.mean(dim=1)  # [2, C] SDXL "text_embeds" = mean over tokens
        time_ids = self._time_ids(hw, 2)
        batch.add_emb[2 * s:2 * s + 2] = self.unet.added_embed(pooled, time_ids, self.dtype)
        for (k_buf, v_buf), (k, v) in zip(batch.cross_kv, self.unet.precompute_cross_kv(embeds)):
            k_buf[2 * s:2 * s + 2] = k
            v_buf[2 * s:2 * s + 2] = v
        batch.z[s] = noise.to(self.device, self.dtype) * tables.schedule.init_noise_sigma
        batch.guidance[s] = guidance
        batch.cfg[s] = cfg
        batch.slots.append(_Slot(key, tables))
        self._where[key] = hw

    @torch.inference_mode()
    def step(self) -> list[DecoderProgress]:
        """ONE denoising step of every admitted image (one UNet call per latent size)."""
        progress = []
        for hw, batch in self._batches.items():
            n = len(batch.slots)
            if not n:
                continue
            for s, slot in enumerate(batch.slots):  # device-to-device copies of this step's table rows
                batch.sigmas[s] = slot.tables.schedule.sigmas[slot.step:slot.step + 2]
                batch.temb[s] = slot.tables.temb[slot.step]
            b = (bucket_for(n, self.buckets) or n) if self.graphs.enabled else n
            graph = self.graphs.get((hw, b), self._graph_run(batch, b)) if self.graphs.enabled else None
            if graph is not None:
                graph.replay()
            else:
                z, x0 = self._step_fn(*batch.rows(b))
                batch.z[:b], batch.x0[:b] = z, x0
            for slot in batch.slots:
                slot.step += 1
                progress.append(DecoderProgress(slot.key, slot.step, slot.total))
        return progress

    @torch.inference_mode()
    def take(self, key: Hashable) -> Tensor:
        """The final latents [4, h, w] of a finished image; frees its slot."""
        batch, s = self._locate(key)
        slot = batch.slots[s]
        if slot.step != slot.total:
            raise RuntimeError(f"image {key!r} has run {slot.step} of {slot.total} decoder steps")
        latents = batch.z[s].clone()
        self.release(key)
        return latents

    @torch.inference_mode()
    def preview(self, key: Hashable) -> Tensor:
        """The x0 prediction [4, h, w] of the image's last step (for partial images)."""
        batch, s = self._locate(key)
        return batch.x0[s].clone()

    @torch.inference_mode()
    def release(self, key: Hashable) -> bool:
        """Drop an image (finished or aborted) from its batch; False if unknown."""
        if key not in self._where:
            return False
        batch, s = self._locate(key)
        last = len(batch.slots) - 1
        if s != last:
            batch.move(last, s)
            batch.slots[s] = batch.slots[last]
        batch.slots.pop()
        batch.sigmas[last] = 1.0  # a padding row stays finite (σ = 0 would divide by zero)
        del self._where[key]
        return True

    @torch.inference_mode()
    def latents_to_pixels(self, latents: Tensor) -> Tensor:
        """Sampler latents [B, 4, h, w] -> uint8 [B, H, W, 3], one image at a time (module docstring)."""
        out = []
        for i in range(latents.shape[0]):
            run = self.begin_pixels(latents[i:i + 1])
            while not self.advance_pixels(run):
                pass
            out.append(run.x)
        return torch.cat(out)

    def begin_pixels(self, latents: Tensor) -> PixelsRun:
        """One image's VAE decode, latents [1, 4, h, w], to run piece by piece (`LatentsToPixels.pieces`)."""
        return PixelsRun(latents, len(self._pixel_fns))

    @torch.inference_mode()
    def advance_pixels(self, run: PixelsRun) -> bool:
        """Run the next piece; True once `run.x` holds the uint8 image [1, H, W, 3]."""
        run.x = self._pixel_fns[run.done](run.x)
        run.done += 1
        return run.finished

    # ------------------------------------------------------------------------------ whole batches

    @torch.inference_mode()
    def decode(self, feats: Tensor, uncond: Tensor, noise: Tensor, steps: int, guidance: float,
               callback: StepCallback | None = None) -> Tensor:
        """feats [B, Q, C]; uncond [1 or B, Q, C] null features (stage 1 on " "); noise [B, 4, h, w] standard
        normal, unscaled. Returns uint8 images [B, 8h, 8w, 3] on the device."""
        return self.latents_to_pixels(self.sample_latents(feats, uncond, noise, steps, guidance, callback))

    @torch.inference_mode()
    def sample_latents(self, feats: Tensor, uncond: Tensor, noise: Tensor, steps: int, guidance: float,
                       callback: StepCallback | None = None) -> Tensor:
        """The UNet loop alone (arguments as `decode`): the final latents [B, 4, h, w], in waves of at most
        `max_batch` images."""
        self._check(feats, uncond, noise)
        uncond = uncond.expand(feats.shape[0], -1, -1)
        out = []
        for start in range(0, feats.shape[0], self.max_batch):
            keys = [("decode", start + i) for i in range(min(self.max_batch, feats.shape[0] - start))]
            for i, key in enumerate(keys):
                self.admit(key, feats[start + i], uncond[start + i], noise[start + i], steps, guidance)
            for i in range(steps):
                self.step()
                if callback is not None:
                    callback(i, steps)
            out += [self.take(key) for key in keys]
        return torch.stack(out)

    @torch.inference_mode()
    def tables(self, steps: int) -> StepTables:
        """Schedule and the [S, T] time-embedding table for `steps`, built once per step count."""
        if steps not in self._tables:
            schedule = euler_discrete_schedule(self.scheduler_cfg, steps, device=self.device)
            temb = self.unet.time_embed(schedule.timesteps, self.dtype)  # [S, T], one batched call
            self._tables[steps] = StepTables(schedule, temb)
        return self._tables[steps]

    # ------------------------------------------------------------------------------ internals

    def _time_ids(self, latent_hw: tuple[int, int], rows: int) -> Tensor:
        h, w = latent_hw
        return sdxl_time_ids(h * self.latent_scale, w * self.latent_scale, rows, self.dtype, self.device)

    def _batch(self, hw: tuple[int, int], num_tokens: int, channels: int) -> DecoderBatch:
        """The continuous batch for latents of size hw, allocated on first use."""
        if hw not in self._batches:
            cap, dev, dt = self.max_batch, self.device, self.dtype
            t = self.unet.cfg.time_embed_dim
            probe = torch.zeros(1, num_tokens, channels, device=dev, dtype=dt)
            kv = [(torch.zeros(2 * cap, *k.shape[1:], device=dev, dtype=dt),
                   torch.zeros(2 * cap, *v.shape[1:], device=dev, dtype=dt))
                  for k, v in self.unet.precompute_cross_kv(probe)]
            self._batches[hw] = DecoderBatch(
                z=torch.zeros(cap, self.unet.cfg.in_channels, *hw, device=dev, dtype=dt),
                x0=torch.zeros(cap, self.unet.cfg.in_channels, *hw, device=dev, dtype=dt),
                sigmas=torch.ones(cap, 2, device=dev, dtype=torch.float32),
                temb=torch.zeros(cap, t, device=dev, dtype=dt), add_emb=torch.zeros(2 * cap, t, device=dev, dtype=dt),
                guidance=torch.ones(cap, device=dev, dtype=torch.float32),
                cfg=torch.zeros(cap, device=dev, dtype=torch.bool), cross_kv=kv)
        return self._batches[hw]

    def _graph_run(self, batch: DecoderBatch, b: int):
        """The closure a step graph captures: the step over the first b slots, latents advanced in place."""
        def run() -> Tensor:
            z, x0 = self._step_fn(*batch.rows(b))
            batch.z[:b].copy_(z)
            batch.x0[:b].copy_(x0)
            return batch.z
        return run

    def _locate(self, key: Hashable) -> tuple[DecoderBatch, int]:
        batch = self._batches[self._where[key]]
        return batch, next(i for i, slot in enumerate(batch.slots) if slot.key == key)

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


__all__ = ["DecoderBatch", "DecoderProgress", "DecoderStep", "LatentsToPixels", "PixelDecoder", "StepTables"]
