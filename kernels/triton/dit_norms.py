"""Fused per-token norm kernels of the NextDiT block, and their launchers.

One program normalizes one token (a row of D <= a few thousand channels, all in registers): the
reduction, the affine part and what the reference does next (modulation, gated residual, RoPE) run in
one pass, so each fused op reads its inputs and writes its output once.

Numerics follow `blip3o_engine.models.dit` exactly: statistics and math in fp32, and a cast to the
tensor dtype (`.to(dtype).to(fp32)`, a no-op for fp32) wherever the reference rounds an intermediate
to the model dtype, so half-precision results equal the reference's up to the last-ulp differences of
rsqrt/exp and summation order.

Layout: inputs are `[B, N, D]` with any batch/token strides and unit channel stride (launchers copy
only when the channel stride is not 1); the per-batch vectors (`scale`, `gate` `[B, D]`, e.g. chunks
of one modulation matmul) may have any batch stride. Outputs are new contiguous tensors.

No libdevice here: the CPU interpreter used by the tests has none, so tanh is built from exp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import KernelSpec


@triton.jit
def _tanh(g):
    """fp32 tanh without libdevice. Near 0, 1 - e^(-2|g|) cancels, so |g| < 0.5 uses the odd Taylor
    series to g^15 (truncation < 1e-8 relative there); elsewhere (1 - e) / (1 + e) with e = e^(-2|g|)
    <= e^-1 loses under 1 bit to cancellation."""
    a = tl.abs(g)
    a2 = a * a
    poly = 0.0014558343870513183 * a2 - 0.0035921280365724811  # 929569/638512875, -21844/6081075
    poly = poly * a2 + 0.0088632355299021966  # 1382/155925
    poly = poly * a2 - 0.021869488536155203  # 62/2835
    poly = poly * a2 + 0.053968253968253968  # 17/315
    poly = poly * a2 - 0.13333333333333333  # 2/15
    poly = poly * a2 + 0.33333333333333333  # 1/3
    small = a - a * a2 * poly  # a - a^3/3 + 2a^5/15 - ...
    e = tl.exp(-2.0 * a)
    large = (1.0 - e) / (1.0 + e)
    t = tl.where(a < 0.5, small, large)
    return tl.where(g < 0, -t, t)


@triton.jit
def _rms_norm_row(row_ptr, w_ptr, offs, mask, eps, D: tl.constexpr):
    """RMSNorm of one row as `dit.RMSNorm` rounds it: (x * rsqrt(mean(x^2) + eps)) cast to the dtype,
    times the weight, cast again. Returns fp32 holding dtype-rounded values."""
    dtype = row_ptr.dtype.element_ty
    x = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    normed = (x * r).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return (normed * w).to(dtype).to(tl.float32)


@triton.jit
def rms_norm_modulate_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, N, stride_xb, stride_xn, stride_sb, eps,
                             D: tl.constexpr, BLOCK: tl.constexpr):
    """out[b, n] = RMSNorm_w(x[b, n]) * (1 + scale[b]); one program per token, BLOCK >= D."""
    row = tl.program_id(0).to(tl.int64)
    b = row // N
    n = row - b * N
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    dtype = out_ptr.dtype.element_ty
    h = _rms_norm_row(x_ptr + b * stride_xb + n * stride_xn, w_ptr, offs, mask, eps, D)
    s = tl.load(scale_ptr + b * stride_sb + offs, mask=mask, other=0.0).to(tl.float32)
    s1 = (1.0 + s).to(dtype).to(tl.float32)  # the reference's `1 + scale` is a dtype tensor
    tl.store(out_ptr + row * D + offs, (h * s1).to(dtype), mask=mask)


@triton.jit
def gated_rms_residual_kernel(x_ptr, y_ptr, w_ptr, gate_ptr, out_ptr, N, stride_xb, stride_xn,
                              stride_yb, stride_yn, stride_gb, eps, D: tl.constexpr, BLOCK: tl.constexpr):
    """out[b, n] = x[b, n] + tanh(gate[b]) * RMSNorm_w(y[b, n]); one program per token, BLOCK >= D."""
    row = tl.program_id(0).to(tl.int64)
    b = row // N
    n = row - b * N
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    dtype = out_ptr.dtype.element_ty
    h = _rms_norm_row(y_ptr + b * stride_yb + n * stride_yn, w_ptr, offs, mask, eps, D)
    g = tl.load(gate_ptr + b * stride_gb + offs, mask=mask, other=0.0).to(tl.float32)
    t = _tanh(g).to(dtype).to(tl.float32)
    gated = (t * h).to(dtype).to(tl.float32)
    x = tl.load(x_ptr + b * stride_xb + n * stride_xn + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + offs, (x + gated).to(dtype), mask=mask)


@triton.jit
def layer_norm_rope_kernel(t_ptr, w_ptr, b_ptr, cos_ptr, sin_ptr, out_ptr, N, stride_tb, stride_tn,
                           stride_cn, eps, D: tl.constexpr, HALF_HEAD: tl.constexpr,
                           HAS_ROPE: tl.constexpr, BLOCK: tl.constexpr):
    """LayerNorm of one token over D, then (HAS_ROPE) each head's interleaved pairs (2j, 2j+1) rotated
    by that token's angle j: (a, c) -> (a cos - c sin, a sin + c cos). Lane p holds channels 2p and
    2p+1, so a pair never leaves its lane; channel 2p is pair j = p % HALF_HEAD of head p // HALF_HEAD.
    BLOCK >= D / 2."""
    row = tl.program_id(0).to(tl.int64)
    bi = row // N
    n = row - bi * N
    p = tl.arange(0, BLOCK)
    mask = p < D // 2
    even = 2 * p
    dtype = out_ptr.dtype.element_ty
    t_row = t_ptr + bi * stride_tb + n * stride_tn
    a = tl.load(t_row + even, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(t_row + even + 1, mask=mask, other=0.0).to(tl.float32)
    mean = (tl.sum(a, axis=0) + tl.sum(c, axis=0)) / D
    da = tl.where(mask, a - mean, 0.0)
    dc = tl.where(mask, c - mean, 0.0)
    rstd = tl.rsqrt((tl.sum(da * da, axis=0) + tl.sum(dc * dc, axis=0)) / D + eps)  # biased variance
    wa = tl.load(w_ptr + even, mask=mask, other=0.0).to(tl.float32)
    wc = tl.load(w_ptr + even + 1, mask=mask, other=0.0).to(tl.float32)
    ba = tl.load(b_ptr + even, mask=mask, other=0.0).to(tl.float32)
    bc = tl.load(b_ptr + even + 1, mask=mask, other=0.0).to(tl.float32)
    # nn.LayerNorm rounds once, at its output; apply_rope then works on that dtype tensor in fp32.
    ya = (da * rstd * wa + ba).to(dtype).to(tl.float32)
    yc = (dc * rstd * wc + bc).to(dtype).to(tl.float32)
    if HAS_ROPE:
        j = p % HALF_HEAD
        cs = tl.load(cos_ptr + n * stride_cn + j, mask=mask, other=0.0).to(tl.float32)
        sn = tl.load(sin_ptr + n * stride_cn + j, mask=mask, other=0.0).to(tl.float32)
        ya, yc = ya * cs - yc * sn, ya * sn + yc * cs
    out_row = out_ptr + row * D
    tl.store(out_row + even, ya.to(dtype), mask=mask)
    tl.store(out_row + even + 1, yc.to(dtype), mask=mask)


# ------------------------------------------------------------------------------------------------
# Launchers: shapes and dtypes are validated by blip3o_engine.ops.dit_ops; these only fix layouts.


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when its last dimension is dense, else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _row_launch(d: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a one-program-per-row kernel over `d` elements: ~8 elements per thread."""
    block = triton.next_power_of_2(d)
    return block, max(1, min(8, block // 256))


def rms_norm_modulate(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """x `[B, N, D]`, weight `[D]`, scale `[B, D]` -> RMSNorm_w(x) * (1 + scale[:, None]), contiguous."""
    x, weight, scale = _unit_last_stride(x), weight.contiguous(), _unit_last_stride(scale)
    b, n, d = x.shape
    out = torch.empty((b, n, d), dtype=x.dtype, device=x.device)
    if out.numel():
        block, warps = _row_launch(d)
        rms_norm_modulate_kernel[(b * n,)](x, weight, scale, out, n, x.stride(0), x.stride(1), scale.stride(0),
                                           eps, D=d, BLOCK=block, num_warps=warps)
    return out


def gated_rms_residual(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor,
                       eps: float) -> torch.Tensor:
    """x, y `[B, N, D]`, weight `[D]`, gate `[B, D]` -> x + tanh(gate)[:, None] * RMSNorm_w(y), contiguous."""
    x, y, weight, gate = _unit_last_stride(x), _unit_last_stride(y), weight.contiguous(), _unit_last_stride(gate)
    b, n, d = x.shape
    out = torch.empty((b, n, d), dtype=x.dtype, device=x.device)
    if out.numel():
        block, warps = _row_launch(d)
        gated_rms_residual_kernel[(b * n,)](x, y, weight, gate, out, n, x.stride(0), x.stride(1), y.stride(0),
                                            y.stride(1), gate.stride(0), eps, D=d, BLOCK=block, num_warps=warps)
    return out


def layer_norm_rope(t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                    cos: torch.Tensor | None, sin: torch.Tensor | None, num_heads: int) -> torch.Tensor:
    """t `[B, N, D]` -> LayerNorm over D, heads `[B, N, H, d]`, rotated by cos/sin `[N, d/2]` if given."""
    t, weight, bias = _unit_last_stride(t), weight.contiguous(), bias.contiguous()
    b, n, d = t.shape
    out = torch.empty((b, n, num_heads, d // num_heads), dtype=t.dtype, device=t.device)
    has_rope = cos is not None
    # Without RoPE the table pointers are never read; any tensor serves as a placeholder.
    cos, sin = (cos.contiguous(), sin.contiguous()) if has_rope else (t, t)
    if out.numel():
        block, warps = _row_launch(d // 2)
        layer_norm_rope_kernel[(b * n,)](t, weight, bias, cos, sin, out, n, t.stride(0), t.stride(1),
                                         cos.stride(0), eps, D=d, HALF_HEAD=d // num_heads // 2,
                                         HAS_ROPE=has_rope, BLOCK=block, num_warps=warps)
    return out


# ------------------------------------------------------------------------------------------------
# CI compile gate: the variants the engine launches at the 4b/8b DiT shape (D = 1792, 28 heads of
# 64), in bf16 (the GPU dtype) and fp32.


def _compile_specs() -> list[KernelSpec]:
    specs = []
    for dt in ("bf16", "fp32"):
        p = f"*{dt}"
        specs.append(KernelSpec(
            rms_norm_modulate_kernel,
            {"x_ptr": p, "w_ptr": p, "scale_ptr": p, "out_ptr": p, "N": "i32", "stride_xb": "i32",
             "stride_xn": "i32", "stride_sb": "i32", "eps": "fp32", "D": "constexpr", "BLOCK": "constexpr"},
            {"D": 1792, "BLOCK": 2048}, num_warps=8))
        specs.append(KernelSpec(
            gated_rms_residual_kernel,
            {"x_ptr": p, "y_ptr": p, "w_ptr": p, "gate_ptr": p, "out_ptr": p, "N": "i32", "stride_xb": "i32",
             "stride_xn": "i32", "stride_yb": "i32", "stride_yn": "i32", "stride_gb": "i32", "eps": "fp32",
             "D": "constexpr", "BLOCK": "constexpr"},
            {"D": 1792, "BLOCK": 2048}, num_warps=8))
        for has_rope in (True, False):
            specs.append(KernelSpec(
                layer_norm_rope_kernel,
                {"t_ptr": p, "w_ptr": p, "b_ptr": p, "cos_ptr": "*fp32", "sin_ptr": "*fp32", "out_ptr": p,
                 "N": "i32", "stride_tb": "i32", "stride_tn": "i32", "stride_cn": "i32", "eps": "fp32",
                 "D": "constexpr", "HALF_HEAD": "constexpr", "HAS_ROPE": "constexpr", "BLOCK": "constexpr"},
                {"D": 1792, "HALF_HEAD": 32, "HAS_ROPE": has_rope, "BLOCK": 1024}, num_warps=4))
    return specs


COMPILE_SPECS = _compile_specs()
