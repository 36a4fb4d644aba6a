"""Ceilings measured in the same run as the stages they judge.

- Copy bandwidth: a device-to-device `copy_` of a large random buffer; bytes counted = bytes read +
  bytes written, the traffic a memory-bound kernel pays for its weights.
- Matmul rate: a large square GEMM in the model's dtype (bf16 on the GPU), 2·n³ FLOPs per call.

These are what this device reaches with PyTorch here, not the datasheet numbers, so a stage at
ratio 1.0 to its floor is as fast as the device's own copy / GEMM. On a CPU they are measured with
the threads torch uses in the run, on a buffer (128 MiB) far larger than the last-level cache and a
2048² fp32 GEMM (MKL's rate flattens out from there on the dev machine): a CPU's rates move with
threads, caches and the host's load, which is exactly why they are measured in the same run as the
stages they judge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .timing import Timer, Timing, TimingPolicy


@dataclass(frozen=True)
class Ceilings:
    copy_bytes_per_s: float
    matmul_flops_per_s: float
    copy: Timing  # one copy of `copy_bytes` bytes of traffic
    matmul: Timing  # one n x n x n GEMM
    copy_bytes: int
    matmul_flops: float
    matmul_dtype: str

    def describe(self) -> str:
        return (f"copy {self.copy_bytes_per_s / 1e9:,.0f} GB/s (read+write), "
                f"{self.matmul_dtype} GEMM {self.matmul_flops_per_s / 1e12:,.3g} TFLOP/s")


def measure_ceilings(device: torch.device, dtype: torch.dtype = torch.bfloat16, copy_mib: int | None = None,
                     gemm_n: int | None = None, policy: TimingPolicy | None = None) -> Ceilings:
    """Measure copy bandwidth and GEMM rate on `device`. Buffers are random, never zeros. Defaults:
    1 GiB and n = 8192 on CUDA, 128 MiB and n = 2048 on CPU."""
    on_cuda = device.type == "cuda"
    copy_mib = copy_mib or (1024 if on_cuda else 128)
    gemm_n = gemm_n or (8192 if on_cuda else 2048)
    policy = policy or (TimingPolicy(warmup=3, reps=20, min_reps=10, budget_s=5.0) if on_cuda
                        else TimingPolicy(warmup=1, reps=7, min_reps=3, budget_s=4.0))
    timer = Timer(device)
    gen = torch.Generator(device).manual_seed(0)

    n_el = copy_mib * 2**20 // 4
    src = torch.randn(n_el, device=device, dtype=torch.float32, generator=gen)
    dst = torch.empty_like(src)
    copy = timer.measure(lambda: dst.copy_(src), policy)
    copy_bytes = 2 * src.numel() * src.element_size()  # read + write
    del src, dst

    a = torch.randn(gemm_n, gemm_n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(gemm_n, gemm_n, device=device, dtype=dtype, generator=gen)
    c = torch.empty(gemm_n, gemm_n, device=device, dtype=dtype)
    matmul = timer.measure(lambda: torch.mm(a, b, out=c), policy)
    flops = 2.0 * gemm_n**3
    del a, b, c
    if on_cuda:
        torch.cuda.empty_cache()
    return Ceilings(copy_bytes_per_s=copy_bytes / (copy.median_ms / 1e3),
                    matmul_flops_per_s=flops / (matmul.median_ms / 1e3), copy=copy, matmul=matmul,
                    copy_bytes=copy_bytes, matmul_flops=flops, matmul_dtype=str(dtype).replace("torch.", ""))
