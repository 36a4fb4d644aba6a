"""Writes of new keys/values into the paged KV cache (layout: see `blip3o_engine.ops.llm_ops`), and the
launcher.

One program copies one token's `[num_kv_heads, head_dim]` key and value rows to its slot
`slot_mapping[t] = block * block_size + row`; a negative slot (a padding token of a captured batch)
writes nothing. The copy is exact (same dtype in and out).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import KernelSpec


@triton.jit
def write_kv_cache_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, block_size,
                          stride_kt, stride_kh, stride_vt, stride_vh,
                          stride_kb, stride_ks, stride_kch, stride_vb, stride_vs, stride_vch,
                          NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Grid (num_tokens,): token t's K and V rows to slot_mapping[t], unless it is negative."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        block = slot // block_size
        row = slot % block_size
        h = tl.arange(0, HEADS_PAD)[:, None]
        d = tl.arange(0, HEAD_DIM)[None, :]
        mask = h < NUM_KV_HEADS
        k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask, other=0.0)
        v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask, other=0.0)
        tl.store(k_cache_ptr + block * stride_kb + row * stride_ks + h * stride_kch + d, k, mask=mask)
        tl.store(v_cache_ptr + block * stride_vb + row * stride_vs + h * stride_vch + d, v, mask=mask)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """k, v `[T, Hkv, d]` into k_cache, v_cache `[num_blocks, block_size, Hkv, d]` at slot_mapping `[T]`."""
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    t, hkv, d = k.shape
    if t and k.numel():
        write_kv_cache_kernel[(t,)](
            k, v, k_cache, v_cache, slot_mapping, k_cache.shape[1], k.stride(0), k.stride(1), v.stride(0),
            v.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0),
            v_cache.stride(1), v_cache.stride(2),
            NUM_KV_HEADS=hkv, HEADS_PAD=triton.next_power_of_2(hkv), HEAD_DIM=d, num_warps=1)


# CI compile gate: head_dim 128 with 4 KV heads (7B/8B) and 2 (3B/4B), int64 and int32 slot mappings,
# bf16 (the GPU dtype) and fp32.
_STRIDES = ("stride_kt", "stride_kh", "stride_vt", "stride_vh",
            "stride_kb", "stride_ks", "stride_kch", "stride_vb", "stride_vs", "stride_vch")
COMPILE_SPECS = [
    KernelSpec(write_kv_cache_kernel,
               {"k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "k_cache_ptr": f"*{dt}", "v_cache_ptr": f"*{dt}",
                "slot_ptr": slot, "block_size": "i32", **dict.fromkeys(_STRIDES, "i32"),
                "NUM_KV_HEADS": "constexpr", "HEADS_PAD": "constexpr", "HEAD_DIM": "constexpr"},
               {"NUM_KV_HEADS": hkv, "HEADS_PAD": hkv, "HEAD_DIM": 128}, num_warps=1)
    for dt in ("bf16", "fp32") for slot, hkv in (("*i64", 4), ("*i32", 2))
]
