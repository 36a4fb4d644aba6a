"""SwiGLU product of the NextDiT feed-forward: `silu(gate.float()).to(dtype) * up`, and its launcher.

Numerics follow `blip3o_engine.models.dit.FeedForward`: SiLU in fp32 as x / (1 + e^-x) (torch's formula
on CPU and CUDA), rounded to the dtype, then the product rounded once more.

Layout: `gate` and `up` are viewed as `[rows, F]` with any row stride and unit column stride, so the two
halves of one fused `[.., 2F]` projection are read in place. The output is a new contiguous tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import KernelSpec


@triton.jit
def swiglu_kernel(gate_ptr, up_ptr, out_ptr, F, stride_g, stride_u, BLOCK: tl.constexpr):
    """Grid (rows, cdiv(F, BLOCK)): one BLOCK of columns of one row per program."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    dtype = out_ptr.dtype.element_ty
    g = tl.load(gate_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * F + cols, (act * u).to(dtype), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """`t` as `[rows, F]` with unit column stride: a view when the leading dims allow it, else a copy."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up `[..., F]` (same shape and dtype) -> silu(gate) * up, contiguous, same shape."""
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel():
        g2, u2 = _rows(gate), _rows(up)
        rows, f = g2.shape
        block = min(1024, triton.next_power_of_2(f))
        swiglu_kernel[(rows, triton.cdiv(f, block))](g2, u2, out, f, g2.stride(0), u2.stride(0),
                                                     BLOCK=block, num_warps=4)
    return out


# CI compile gate: bf16 (the GPU dtype) and fp32.
COMPILE_SPECS = [
    KernelSpec(swiglu_kernel,
               {"gate_ptr": f"*{dt}", "up_ptr": f"*{dt}", "out_ptr": f"*{dt}", "F": "i32", "stride_g": "i32",
                "stride_u": "i32", "BLOCK": "constexpr"},
               {"BLOCK": 1024})
    for dt in ("bf16", "fp32")
]
