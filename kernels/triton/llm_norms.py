"""RMSNorm of the Qwen2.5-VL language model, optionally fused with the residual add before it, and the
launchers.

One program normalizes one token (H <= a few thousand channels, all in registers). Numerics follow
`blip3o_engine.models.qwen2_5_vl.RMSNorm` and its decoder layer exactly: the residual sum is rounded to
the dtype (the reference adds two dtype tensors), the variance and the normalization run in fp32, the
normalized value is rounded to the dtype *before* the weight product, and that product is rounded
again. So half-precision results equal the reference's up to last-ulp rsqrt / summation-order flips.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import KernelSpec


@triton.jit
def rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_r, eps,
                    H: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """Grid (num_tokens,), BLOCK >= H. HAS_RESIDUAL: h = x + residual is written to res_out and
    normalized; otherwise h = x (res_ptr and res_out_ptr unused)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    dtype = out_ptr.dtype.element_ty
    h = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        h = (h + r).to(dtype)
        tl.store(res_out_ptr + row * H + offs, h, mask=mask)
        h = h.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=0) / H + eps)
    normed = (h * rstd).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * H + offs, (normed * w).to(dtype), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
            out: torch.Tensor, res_out: torch.Tensor | None) -> None:
    t, h = x.shape
    if not t:
        return
    block = triton.next_power_of_2(h)
    warps = max(1, min(8, block // 256))  # ~8 elements per thread
    has_res = residual is not None
    # Without a residual the residual pointers are never read or written; x serves as a placeholder.
    res, res_o = (residual, res_out) if has_res else (x, x)
    rms_norm_kernel[(t,)](x, res, weight.contiguous(), out, res_o, x.stride(0), res.stride(0), eps,
                          H=h, BLOCK=block, HAS_RESIDUAL=has_res, num_warps=warps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x `[T, H]`, weight `[H]` -> RMSNorm_w(x) `[T, H]`, contiguous."""
    x = _rows(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, None, weight, eps, out, None)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual `[T, H]`, weight `[H]` -> (RMSNorm_w(x + residual), x + residual), both contiguous."""
    x, residual = _rows(x), _rows(residual)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, residual, weight, eps, out, res_out)
    return out, res_out


# CI compile gate: the 7B/8B hidden size 3584 (the 3B/4B's 2048 takes the same code path), bf16 (the GPU
# dtype) and fp32, with and without the residual.
COMPILE_SPECS = [
    KernelSpec(rms_norm_kernel,
               {"x_ptr": f"*{dt}", "res_ptr": f"*{dt}", "w_ptr": f"*{dt}", "out_ptr": f"*{dt}",
                "res_out_ptr": f"*{dt}", "stride_x": "i32", "stride_r": "i32", "eps": "fp32",
                "H": "constexpr", "BLOCK": "constexpr", "HAS_RESIDUAL": "constexpr"},
               {"H": 3584, "BLOCK": 4096, "HAS_RESIDUAL": has_res}, num_warps=8)
    for dt in ("bf16", "fp32") for has_res in (True, False)
]
