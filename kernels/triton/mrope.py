"""Multimodal rotary embedding (M-RoPE, rotate-half layout) of the Qwen2.5-VL language model's queries
and keys, and the launcher.

The angles come from a precomputed fp32 table `cos_sin_cache [max_positions, head_dim]` (row p: cos of
p * inv_freq[j] for the head_dim/2 frequency pairs j, then their sin), built once with torch's accurate
cos/sin (`blip3o_engine.ops.llm_ops.rope_cos_sin_cache`), so the kernel needs no transcendental function
and its angles are those of the reference. Pair j takes its position from row a of `positions [3, T]`,
where a is j's chunk of mrope_section (t, h, w).

Numerics follow `models.qwen2_5_vl`: cos/sin rounded to the dtype, then `x * cos + rotate_half(x) * sin`
evaluated in the dtype, i.e. both products and the sum rounded (no-ops in fp32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import KernelSpec


@triton.jit
def _rotate_heads(src_ptr, dst_ptr, stride_h, c, s, NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
                  HALF: tl.constexpr):
    """One token's heads `[NUM_HEADS, 2 * HALF]` (head stride stride_h, unit channel stride) rotated by
    c, s `[HALF]` (fp32 holding dtype values) into dst (contiguous heads)."""
    dtype = dst_ptr.dtype.element_ty
    h = tl.arange(0, HEADS_PAD)[:, None]
    j = tl.arange(0, HALF)[None, :]
    mask = h < NUM_HEADS
    x1 = tl.load(src_ptr + h * stride_h + j, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src_ptr + h * stride_h + HALF + j, mask=mask, other=0.0).to(tl.float32)
    c, s = c[None, :], s[None, :]
    # rotate_half(x) = (-x2, x1): out1 = x1 cos - x2 sin, out2 = x2 cos + x1 sin, each term rounded.
    out1 = (x1 * c).to(dtype).to(tl.float32) + (-x2 * s).to(dtype).to(tl.float32)
    out2 = (x2 * c).to(dtype).to(tl.float32) + (x1 * s).to(dtype).to(tl.float32)
    tl.store(dst_ptr + h * (2 * HALF) + j, out1.to(dtype), mask=mask)
    tl.store(dst_ptr + h * (2 * HALF) + HALF + j, out2.to(dtype), mask=mask)


@triton.jit
def mrope_kernel(q_ptr, k_ptr, pos_ptr, cache_ptr, q_out_ptr, k_out_ptr, stride_qt, stride_qh, stride_kt,
                 stride_kh, stride_pa, stride_pt, stride_c, NUM_Q_HEADS: tl.constexpr, Q_HEADS_PAD: tl.constexpr,
                 NUM_K_HEADS: tl.constexpr, K_HEADS_PAD: tl.constexpr, HALF: tl.constexpr,
                 SECTION_T: tl.constexpr, SECTION_H: tl.constexpr):
    """Grid (num_tokens,): token t's query and key heads. Pairs [0, SECTION_T) use positions[0, t],
    [SECTION_T, SECTION_T + SECTION_H) positions[1, t], the rest positions[2, t]."""
    t = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, HALF)
    axis = tl.where(j < SECTION_T, 0, tl.where(j < SECTION_T + SECTION_H, 1, 2))
    pos = tl.load(pos_ptr + axis * stride_pa + t * stride_pt).to(tl.int64)  # [HALF]
    dtype = q_out_ptr.dtype.element_ty
    c = tl.load(cache_ptr + pos * stride_c + j).to(dtype).to(tl.float32)
    s = tl.load(cache_ptr + pos * stride_c + HALF + j).to(dtype).to(tl.float32)
    _rotate_heads(q_ptr + t * stride_qt, q_out_ptr + t * (NUM_Q_HEADS * 2 * HALF), stride_qh, c, s,
                  NUM_Q_HEADS, Q_HEADS_PAD, HALF)
    _rotate_heads(k_ptr + t * stride_kt, k_out_ptr + t * (NUM_K_HEADS * 2 * HALF), stride_kh, c, s,
                  NUM_K_HEADS, K_HEADS_PAD, HALF)


def mrope_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                 mrope_section: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """q `[T, Hq, d]`, k `[T, Hkv, d]`, positions `[3, T]`, cos_sin_cache `[P, d]` fp32 -> rotated
    (q, k), contiguous."""
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    cos_sin_cache = cos_sin_cache.contiguous()
    t, hq, d = q.shape
    hkv = k.shape[1]
    q_out = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty((t, hkv, d), dtype=k.dtype, device=k.device)
    if q_out.numel():
        mrope_kernel[(t,)](q, k, positions, cos_sin_cache, q_out, k_out, q.stride(0), q.stride(1), k.stride(0),
                           k.stride(1), positions.stride(0), positions.stride(1), cos_sin_cache.stride(0),
                           NUM_Q_HEADS=hq, Q_HEADS_PAD=triton.next_power_of_2(hq), NUM_K_HEADS=hkv,
                           K_HEADS_PAD=triton.next_power_of_2(hkv), HALF=d // 2, SECTION_T=mrope_section[0],
                           SECTION_H=mrope_section[1], num_warps=4)
    return q_out, k_out


# CI compile gate: head_dim 128 with mrope_section (16, 24, 24), the 7B/8B heads (28 / 4) and the 3B/4B
# ones (16 / 2), bf16 (the GPU dtype) and fp32; int32 positions, the model runner's buffer (the wrapper
# also takes int64, which only tests pass; tests/kernels/test_compile_gate.py checks what the engine launches).
COMPILE_SPECS = [
    KernelSpec(mrope_kernel,
               {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "pos_ptr": "*i32", "cache_ptr": "*fp32", "q_out_ptr": f"*{dt}",
                "k_out_ptr": f"*{dt}", "stride_qt": "i32", "stride_qh": "i32", "stride_kt": "i32", "stride_kh": "i32",
                "stride_pa": "i32", "stride_pt": "i32", "stride_c": "i32", "NUM_Q_HEADS": "constexpr",
                "Q_HEADS_PAD": "constexpr", "NUM_K_HEADS": "constexpr", "K_HEADS_PAD": "constexpr",
                "HALF": "constexpr", "SECTION_T": "constexpr", "SECTION_H": "constexpr"},
               {"NUM_Q_HEADS": hq, "Q_HEADS_PAD": triton.next_power_of_2(hq), "NUM_K_HEADS": hkv,
                "K_HEADS_PAD": hkv, "HALF": 64, "SECTION_T": 16, "SECTION_H": 24})
    for dt in ("bf16", "fp32") for hq, hkv in ((28, 4), (16, 2))
]
