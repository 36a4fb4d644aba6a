"""Ceilings measured in the same run as the stages they judge, per kind of work.

- Copy bandwidth: a device-to-device `copy_` of a large random buffer; bytes counted = bytes read +
  bytes written, the traffic a memory-bound kernel pays for its weights.
- GEMM rate: the best of several matmul shapes in the model's dtype — a large square one and the
  model's own widths (the LLM's prefill and decode projections, the DiT's feed-forward, the UNet's
  attention feed-forward), square and skinny. One square shape is not an upper bound: a library can
  be faster on another shape, and a floor built from a slower shape can be beaten.
- Convolution rate: the best of the UNet's and the VAE's 3x3 convolution shapes (channels and latent /
  pixel sizes per level, CFG batch 2 for the UNet), 2·k²·C_in·C_out FLOPs per output pixel. oneDNN and
  cuDNN pick Winograd / implicit-GEMM kernels per shape, so a convolution's rate in these nominal FLOPs
  can exceed the GEMM rate (on the development CPU it does), and a stage made of convolutions must be
  judged against this rate, not the GEMM's. `costs.Cost.floor_s` charges convolution FLOPs at the faster
  of the two (a convolution can always run as a GEMM).

Every ceiling is the rate of its *fastest* timed run (not the median): stage medians compared with it
can only come out slower, so a floor is a lower bound even on a noisy host. These are what this device
reaches with PyTorch here, not datasheet numbers, measured with the threads torch uses in the run,
because a CPU's rates move with threads, caches and the host's load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from .timing import Timer, Timing, TimingPolicy


@dataclass(frozen=True)
class Rate:
    """One measured shape: `work` (bytes or FLOPs) per call, timed; its rate uses the fastest run."""

    kind: str  # "copy" | "gemm" | "conv"
    shape: str  # e.g. "128MiB", "2048x2048x2048" (M x K x N), "2x64x64@32x32" (B x Cin x Cout @ H x W)
    work: float
    timing: Timing

    @property
    def per_s(self) -> float:
        return self.work / (self.timing.best_ms / 1e3)


@dataclass(frozen=True)
class Ceilings:
    copy: Rate
    gemm: tuple[Rate, ...]  # every GEMM shape; the ceiling is the fastest
    conv: tuple[Rate, ...]  # every convolution shape (empty for a model without the image decoder)
    dtype: str  # of the GEMMs and convolutions

    @property
    def copy_bytes_per_s(self) -> float:
        return self.copy.per_s

    @property
    def best_gemm(self) -> Rate:
        return max(self.gemm, key=lambda r: r.per_s)

    @property
    def best_conv(self) -> Rate | None:
        return max(self.conv, key=lambda r: r.per_s) if self.conv else None

    @property
    def matmul_flops_per_s(self) -> float:
        return self.best_gemm.per_s

    @property
    def conv_flops_per_s(self) -> float | None:
        best = self.best_conv
        return best.per_s if best is not None else None

    def describe(self) -> str:
        text = (f"copy {self.copy_bytes_per_s / 1e9:,.3g} GB/s (read+write), {self.dtype} GEMM "
                f"{self.matmul_flops_per_s / 1e12:,.3g} TFLOP/s (best of {len(self.gemm)} shapes: "
                f"{self.best_gemm.shape})")
        if self.conv:
            text += (f", conv {self.conv_flops_per_s / 1e12:,.3g} TFLOP/s (best of {len(self.conv)} shapes: "
                     f"{self.best_conv.shape})")
        return text


def gemm_shapes(cfg: ModelConfig | None, device: torch.device) -> list[tuple[int, int, int]]:
    """(M, K, N) of the GEMM ceiling: a large square one and the model's widths, square and skinny.
    M = rows (tokens): a prefill's token budget, a decode batch, a DiT CFG batch of 4 images, the UNet's
    first attention level under CFG."""
    on_cuda = device.type == "cuda"
    n = 8192 if on_cuda else 2048  # MKL's fp32 rate flattens out from 2048 on the development CPU
    shapes = [(n, n, n)]
    if cfg is not None:
        t = cfg.text
        prefill, decode = (2048, 32) if on_cuda else (512, 16)
        shapes += [(prefill, t.hidden_size, 2 * t.intermediate_size),  # fused gate/up of a prefill chunk
                   (prefill, t.intermediate_size, t.hidden_size),  # down projection
                   (decode, t.hidden_size, 2 * t.intermediate_size)]  # a decode batch: skinny
        if cfg.can_generate_images:
            d, u = cfg.dit, cfg.unet
            shapes.append((2 * 4 * d.num_tokens, d.hidden_size, 2 * d.ffn_hidden_size))  # DiT [w1; w3]
            level = next((i for i, k in enumerate(u.down_block_types) if k.startswith("CrossAttn")), 0)
            side = u.sample_size
            for _ in range(level):
                side = (side + 1) // 2
            c = u.block_out_channels[level]
            shapes.append((2 * side * side, c, 8 * c))  # GEGLU projection, CFG batch 2
    return list(dict.fromkeys(shapes))


def conv_shapes(cfg: ModelConfig | None, latent_hw: tuple[int, int] | None) -> list[tuple[int, int, int, int, int]]:
    """(batch, C_in, C_out, H, W) of the 3x3 convolutions that dominate the decoder: every UNet level at the
    latent size (CFG batch 2) and every VAE level at its upsampled size (one image)."""
    if cfg is None or not cfg.can_generate_images or latent_hw is None:
        return []
    u, v = cfg.unet, cfg.vae
    shapes = []
    h, w = latent_hw
    for c in u.block_out_channels:
        shapes.append((2, c, c, h, w))
        h, w = (h + 1) // 2, (w + 1) // 2
    h, w = latent_hw
    for i, c in enumerate(reversed(v.block_out_channels)):
        shapes.append((1, c, c, h, w))
        if i < len(v.block_out_channels) - 1:
            h, w = 2 * h, 2 * w
    return list(dict.fromkeys(shapes))


def _policy(device: torch.device, big: bool) -> TimingPolicy:
    if device.type == "cuda":
        return TimingPolicy(warmup=3, reps=20, min_reps=5, budget_s=2.0)
    return TimingPolicy(warmup=1, reps=6 if big else 8, min_reps=3, budget_s=2.0 if big else 1.0)


def measure_ceilings(device: torch.device, dtype: torch.dtype = torch.bfloat16, cfg: ModelConfig | None = None,
                     latent_hw: tuple[int, int] | None = None, copy_mib: int | None = None,
                     gemm: list[tuple[int, int, int]] | None = None,
                     conv: list[tuple[int, int, int, int, int]] | None = None) -> Ceilings:
    """Measure the copy bandwidth, the GEMM rate over `gemm` shapes (default `gemm_shapes(cfg)`) and the
    convolution rate over `conv` shapes (default `conv_shapes(cfg, latent_hw)`) on `device`. Inputs are
    random, never zeros. The copy moves 1 GiB on CUDA, 128 MiB on CPU (far beyond the last-level cache)."""
    timer = Timer(device)
    gen = torch.Generator(device).manual_seed(0)
    copy_mib = copy_mib or (1024 if device.type == "cuda" else 128)
    src = torch.randn(copy_mib * 2**20 // 4, device=device, dtype=torch.float32, generator=gen)
    dst = torch.empty_like(src)
    copy = Rate("copy", f"{copy_mib}MiB", 2.0 * src.numel() * src.element_size(),  # read + write
                timer.measure(lambda: dst.copy_(src), _policy(device, True)))
    del src, dst

    gemms = []
    for m, k, n in (gemm if gemm is not None else gemm_shapes(cfg, device)):
        a = torch.randn(m, k, device=device, dtype=dtype, generator=gen)
        b = torch.randn(k, n, device=device, dtype=dtype, generator=gen)
        c = torch.empty(m, n, device=device, dtype=dtype)
        timing = timer.measure(lambda: torch.mm(a, b, out=c), _policy(device, m * k * n >= 2**30))
        gemms.append(Rate("gemm", f"{m}x{k}x{n}", 2.0 * m * k * n, timing))
        del a, b, c

    convs = []
    for batch, c_in, c_out, h, w in (conv if conv is not None else conv_shapes(cfg, latent_hw)):
        x = torch.randn(batch, c_in, h, w, device=device, dtype=dtype, generator=gen)
        weight = torch.randn(c_out, c_in, 3, 3, device=device, dtype=dtype, generator=gen) / (9 * c_in) ** 0.5
        bias = torch.randn(c_out, device=device, dtype=dtype, generator=gen)
        with torch.inference_mode():
            timing = timer.measure(lambda: F.conv2d(x, weight, bias, padding=1), _policy(device, True))
        convs.append(Rate("conv", f"{batch}x{c_in}x{c_out}@{h}x{w}", 2.0 * batch * h * w * c_in * c_out * 9, timing))
        del x, weight, bias
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Ceilings(copy, tuple(gemms), tuple(convs), str(dtype).replace("torch.", ""))


__all__ = ["Ceilings", "Rate", "conv_shapes", "gemm_shapes", "measure_ceilings"]
