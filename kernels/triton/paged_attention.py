"""Paged-KV attention of the Qwen2.5-VL language model (decode and varlen prefill), and launchers.

Cache layout (vLLM-like, see `blip3o_engine.ops.llm_ops`): per layer `k_cache, v_cache` are
`[num_blocks, block_size, num_kv_heads, head_dim]`; sequence s's token i lives in physical block
`block_tables[s, i // block_size]` at row `i % block_size`.

Both kernels run the same inner loop (`_attend_keys`): flash-attention's online softmax over the keys
[0, key_end) of one sequence, BLOCK_N keys per step. A key tile is gathered key by key through the block
table, so BLOCK_N is independent of the cache's block_size (which may be any positive integer, even
smaller than the 16 rows `tl.dot` needs on the GPU). One program serves one KV head and every query head
of its GQA group, so each K/V tile is read once per group, not once per query head.

Numerics: scores and softmax statistics in fp32 (q·k by `tl.dot` with fp32 accumulation, `ieee` for
fp32 inputs so no TF32), probabilities rounded to the cache dtype for the P·V product as flash attention
does, output rounded once. head_dim must be a power of two (it is a `tl.arange` extent; Qwen2.5-VL's is
128) and at least 16 (the GPU's minimum `tl.dot` K).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import KernelSpec

# Keys per online-softmax step. 32 keeps the K/V tiles of head_dim 128 at 8 KiB (bf16) each.
BLOCK_N = 32
# Query rows (tokens x heads of a GQA group) per prefill program.
PREFILL_BLOCK_M = 64


@triton.jit
def _attend_keys(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, bt_row_ptr, kv_head, q_pos, key_end, block_size,
                 stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, scale,
                 CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax of q `[M, HEAD_DIM]` over the keys [0, key_end) of one sequence.

    acc `[M, HEAD_DIM]`, m_i, l_i `[M]` fp32 carry the running numerator, max and denominator. With
    CAUSAL, row r sees keys at positions <= q_pos[r]. Key 0 is visible to every row, and the loop starts
    there, so m_i is finite after the first step (no inf - inf) whenever key_end >= 1.
    """
    offs_d = tl.arange(0, HEAD_DIM)
    for start in range(0, key_end, BLOCK_N):
        kpos = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] positions in the sequence
        kmask = kpos < key_end
        block = tl.load(bt_row_ptr + kpos // block_size, mask=kmask, other=0).to(tl.int64)
        row = (kpos % block_size).to(tl.int64)
        k_off = block * stride_kb + row * stride_ks + kv_head * stride_kh  # [BLOCK_N]
        v_off = block * stride_vb + row * stride_vs + kv_head * stride_vh
        k = tl.load(k_cache_ptr + k_off[:, None] + offs_d[None, :], mask=kmask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [M, BLOCK_N] fp32
        visible = kmask[None, :]
        if CAUSAL:
            visible = visible & (kpos[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)  # rescales what was accumulated under the old max
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + v_off[:, None] + offs_d[None, :], mask=kmask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def paged_decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, bt_ptr, ctx_ptr, out_ptr, scale, block_size,
                        stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
                        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    """Grid (num_seqs, num_kv_heads): the one new query of sequence `seq` for the GROUP query heads that
    share `kv_head`, over all context_lens[seq] cached keys (the new token's own included). GROUP_PAD >=
    max(16, GROUP) rows, the padding rows masked at the store. A zero context gives zeros."""
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    g = tl.arange(0, GROUP_PAD)
    gmask = g < GROUP
    offs_d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g  # [GROUP_PAD] query heads of the group
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], mask=gmask[:, None],
                other=0.0)
    ctx = tl.load(ctx_ptr + seq)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), dtype=tl.float32)
    m_i = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((GROUP_PAD,), dtype=tl.float32)
    acc, m_i, l_i = _attend_keys(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, bt_ptr + seq * stride_bt, kv_head,
                                 g, ctx, block_size, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                                 stride_vh, scale, CAUSAL=False, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=gmask[:, None])


@triton.jit
def _find_sequence(cu_q_ptr, num_seqs, tile, BLOCK_Q: tl.constexpr):
    """The sequence that owns query tile `tile`: the last s with cu_q[s] // BLOCK_Q + s <= tile.

    Sequence s is given the tiles [cu_q[s] // BLOCK_Q + s, cu_q[s + 1] // BLOCK_Q + s + 1): at least
    cdiv(q_len, BLOCK_Q) of them, and together cu_q[S] // BLOCK_Q + S, which the launcher knows without
    reading cu_q on the host. Binary search over the S + 1 offsets."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(cu_q_ptr + mid) // BLOCK_Q + mid <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def paged_prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, bt_ptr, cu_q_ptr, ctx_ptr, out_ptr, scale, num_seqs,
                         block_size, stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
                         stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
                         HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (T // BLOCK_Q + num_seqs, num_kv_heads): BLOCK_Q new tokens of one sequence times the GROUP_PAD
    query heads of `kv_head`'s group (row r = token r // GROUP_PAD, head r % GROUP_PAD). The sequence's
    first context_len - q_len tokens are already cached (prefix); new token i sits at position
    prefix + i and sees the keys at positions <= its own. Surplus tiles do nothing."""
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_sequence(cu_q_ptr, num_seqs, tile, BLOCK_Q)
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    first = (tile - (q_start // BLOCK_Q + seq)) * BLOCK_Q  # first new token of this tile, within the sequence
    if first < q_len:
        r = tl.arange(0, BLOCK_Q * GROUP_PAD)
        qi = first + r // GROUP_PAD  # [M] token index within the new tokens
        g = r % GROUP_PAD
        rmask = (qi < q_len) & (g < GROUP)
        offs_d = tl.arange(0, HEAD_DIM)
        tok = (q_start + qi).to(tl.int64)
        heads = kv_head * GROUP + g
        q = tl.load(q_ptr + tok[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=rmask[:, None], other=0.0)
        ctx = tl.load(ctx_ptr + seq)
        prefix = ctx - q_len
        key_end = tl.minimum(ctx, prefix + first + BLOCK_Q)  # past the tile's last query: nothing to see
        acc = tl.zeros((BLOCK_Q * GROUP_PAD, HEAD_DIM), dtype=tl.float32)
        m_i = tl.full((BLOCK_Q * GROUP_PAD,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_Q * GROUP_PAD,), dtype=tl.float32)
        acc, m_i, l_i = _attend_keys(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr,
                                     bt_ptr + seq.to(tl.int64) * stride_bt, kv_head, prefix + qi, key_end,
                                     block_size, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                                     scale, CAUSAL=True, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + tok[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=rmask[:, None])


# ------------------------------------------------------------------------------------------------
# Launchers: shapes, dtypes and devices are validated by blip3o_engine.ops.llm_ops.


def _head_dim_last(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when its head_dim is dense, else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _cache_strides(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, ...]:
    return (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2))


def decode_group_pad(group: int) -> int:
    """Rows of a decode program: the GQA group padded to a power of two, at least tl.dot's 16."""
    return max(16, triton.next_power_of_2(group))


def prefill_blocks(group: int) -> tuple[int, int]:
    """(GROUP_PAD, BLOCK_Q) of a prefill program: BLOCK_Q tokens x GROUP_PAD heads = PREFILL_BLOCK_M rows."""
    group_pad = triton.next_power_of_2(group)
    return group_pad, max(1, PREFILL_BLOCK_M // group_pad)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q `[S, Hq, d]` (one token per sequence) -> `[S, Hq, d]`, contiguous."""
    q = _head_dim_last(q)
    s, hq, d = q.shape
    hkv = k_cache.shape[2]
    out = torch.empty((s, hq, d), dtype=q.dtype, device=q.device)
    if out.numel():
        group = hq // hkv
        paged_decode_kernel[(s, hkv)](
            q, k_cache, v_cache, block_tables, context_lens, out, scale, k_cache.shape[1],
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
            *_cache_strides(k_cache, v_cache),
            GROUP=group, GROUP_PAD=decode_group_pad(group), HEAD_DIM=d, BLOCK_N=BLOCK_N, num_warps=4)
    return out


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                            scale: float) -> torch.Tensor:
    """q `[T, Hq, d]` (the new tokens of S sequences, packed) -> `[T, Hq, d]`, contiguous."""
    q = _head_dim_last(q)
    t, hq, d = q.shape
    hkv = k_cache.shape[2]
    num_seqs = cu_seqlens_q.shape[0] - 1
    out = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
    if out.numel():
        group = hq // hkv
        group_pad, block_q = prefill_blocks(group)
        paged_prefill_kernel[(t // block_q + num_seqs, hkv)](
            q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out, scale, num_seqs, k_cache.shape[1],
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
            *_cache_strides(k_cache, v_cache),
            GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, HEAD_DIM=d, BLOCK_N=BLOCK_N, num_warps=4)
    return out


# ------------------------------------------------------------------------------------------------
# CI compile gate: Qwen2.5-VL's head_dim 128 with the 7B/8B text model's GQA group of 7 (28 query heads
# over 4 KV heads), in bf16, the GPU dtype. The 3B/4B's group of 8 (16 over 2) builds the same code with
# another GROUP value (same GROUP_PAD and BLOCK_Q), so it is not compiled twice. fp32 (GPU tests only) is
# left out: its ieee-precision dots are FMA loops that take ptxas ~10 s per target, a third of the gate.
_STRIDES = ("stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_bt",
            "stride_kb", "stride_ks", "stride_kh", "stride_vb", "stride_vs", "stride_vh")


def _compile_specs(group: int = 7, dt: str = "bf16") -> list[KernelSpec]:
    p = f"*{dt}"
    common = {"q_ptr": p, "k_cache_ptr": p, "v_cache_ptr": p, "bt_ptr": "*i32"}
    group_pad, block_q = prefill_blocks(group)
    return [
        KernelSpec(paged_decode_kernel,
                   {**common, "ctx_ptr": "*i32", "out_ptr": p, "scale": "fp32", "block_size": "i32",
                    **dict.fromkeys(_STRIDES, "i32"), "GROUP": "constexpr", "GROUP_PAD": "constexpr",
                    "HEAD_DIM": "constexpr", "BLOCK_N": "constexpr"},
                   {"GROUP": group, "GROUP_PAD": decode_group_pad(group), "HEAD_DIM": 128, "BLOCK_N": BLOCK_N}),
        KernelSpec(paged_prefill_kernel,
                   {**common, "cu_q_ptr": "*i32", "ctx_ptr": "*i32", "out_ptr": p, "scale": "fp32",
                    "num_seqs": "i32", "block_size": "i32", **dict.fromkeys(_STRIDES, "i32"), "GROUP": "constexpr",
                    "GROUP_PAD": "constexpr", "BLOCK_Q": "constexpr", "HEAD_DIM": "constexpr", "BLOCK_N": "constexpr"},
                   {"GROUP": group, "GROUP_PAD": group_pad, "BLOCK_Q": block_q, "HEAD_DIM": 128, "BLOCK_N": BLOCK_N}),
    ]


COMPILE_SPECS = _compile_specs()
