"""Ops of the paged-KV Qwen2.5-VL language model: a dispatching wrapper and a plain-torch `*_ref` twin per op.

Paged KV cache layout (vLLM-like; one pair of tensors per layer):
- `k_cache, v_cache`: `[num_blocks, block_size, num_kv_heads, head_dim]`, the cache dtype = the model
  dtype. Any block_size >= 1 works (16 is the usual); head_dim must be a power of two >= 16 (a
  `tl.arange` extent and the GPU's minimum `tl.dot` size; Qwen2.5-VL's is 128).
- `block_tables`: int32 `[num_seqs, max_blocks_per_seq]`; row s lists the physical blocks of sequence s in
  order (token i of s lives in block `block_tables[s, i // block_size]`, row `i % block_size`), padded
  with -1. Entries past a sequence's context are never read.
- `slot_mapping`: int64 or int32 `[num_tokens]`, the flat slot `block * block_size + row` each new token is
  written to; -1 (any negative) marks a padding token, which writes nothing.
- `context_lens`: int32 `[num_seqs]`, the tokens of each sequence in the cache *after* this step's
  `write_kv_cache` (cached prefix + new tokens).
- `cu_seqlens_q`: int32 `[num_seqs + 1]`, the offsets of each sequence's new tokens in the packed
  `[num_tokens, ...]` query (prefill); decode has exactly one new token per sequence.

Ops (T tokens, S sequences, Hq query heads, Hkv KV heads, d head_dim, H hidden, I intermediate):
- `write_kv_cache(k, v, k_cache, v_cache, slot_mapping)`: k, v `[T, Hkv, d]` into the caches, in place;
- `paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)`: q `[S, Hq, d]` ->
  `[S, Hq, d]`, each sequence's one new query over its whole context;
- `paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale)`:
  q `[T, Hq, d]` -> `[T, Hq, d]`; the new tokens see the cached prefix fully and each other causally;
- `rope_cos_sin_cache(head_dim, theta, max_positions)` (table builder, torch only) and
  `mrope_rotary(q, k, positions, cos_sin_cache, mrope_section)`: q `[T, Hq, d]`, k `[T, Hkv, d]`,
  positions `[3, T]` -> rotated (q, k); its ref is `mrope_cos_sin` (once per step) + `apply_rotary`;
GQA: query head h reads KV head h // (Hq / Hkv) (`gqa_attention_ref`).

The norms and the SwiGLU product the decoder layer also runs are in `ops.norms`. The `*_ref` twins are the
model's formulas (models/qwen2_5_vl.py calls these ops through the attention backends of `ops.attention`
and has no copy of them). `gqa_attention_ref` is the attention core of the dense reference
(`ops.attention.DenseAttention`) and of the paged refs, which gather each sequence's blocks into
contiguous K/V and run it one sequence at a time: readable, not fast.

Dispatch is `ops.dispatch`'s: the Triton kernel when the input is on CUDA (or forced), otherwise the ref;
the Triton path goes through `torch.ops.blip3o.<name>` custom ops with fake impls (write_kv_cache declares
its mutation of the caches), so it traces under torch.compile and is captured by CUDA graphs. CPU steps of
the paged model do not go through these per-layer ops but through `ops.llm_cpu` (planned once per step).
No op reads device values on the host (no syncs): the launch grids come from tensor shapes only. Outputs
are new contiguous tensors; inputs may have any token/head strides (head_dim stride 1, else copied).
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import check, use_kernel


def _kernels(name: str) -> ModuleType:
    """`blip3o_engine.kernels.triton.<name>`, imported on first use (see dit_ops: importing a kernel
    module fixes whether `@triton.jit` interprets)."""
    import importlib

    return importlib.import_module(f"..kernels.triton.{name}", __package__)


# ------------------------------------------------------------------------------------------------
# Reference twins


def write_kv_cache_ref(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """k, v `[T, Hkv, d]` -> k_cache, v_cache `[num_blocks, block_size, Hkv, d]` at the non-negative slots."""
    keep = slot_mapping >= 0  # [T]; padding tokens (-1) write nothing
    slots = slot_mapping[keep].long()
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep]  # [num_blocks * block_size, Hkv, d] view
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep]


def _gather_kv(cache: Tensor, block_table: Tensor, length: int) -> Tensor:
    """The first `length` tokens of one sequence, contiguous: `[length, Hkv, d]`."""
    block_size = cache.shape[1]
    blocks = block_table[:(length + block_size - 1) // block_size].long()
    return cache[blocks].flatten(0, 1)[:length]


def gqa_attention_ref(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None = None) -> Tensor:
    """The language model's attention core. q `[..., Hq, L, d]`, k, v `[..., Hkv, N, d]`, mask bool
    (True = may attend) broadcastable to `[..., L, N]`, or None -> `[..., Hq, L, d]`. GQA: query head h
    reads KV head h // (Hq / Hkv), by repeat_interleave; softmax and products by SDPA in the dtype;
    scale None = 1/sqrt(d)."""
    group = q.shape[-3] // k.shape[-3]
    k = k.repeat_interleave(group, dim=-3)  # [..., Hq, N, d]
    v = v.repeat_interleave(group, dim=-3)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def causal_attention_ref(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
    """q `[L, Hq, d]` (the last L of the N positions), k, v `[N, Hkv, d]` -> `[L, Hq, d]`: each query sees
    the keys at positions <= its own."""
    n = k.shape[0]
    q_pos = torch.arange(n - q.shape[0], n, device=q.device)
    allowed = torch.arange(n, device=q.device)[None, :] <= q_pos[:, None]  # [L, N]
    out = gqa_attention_ref(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), allowed, scale)
    return out.transpose(0, 1)  # [L, Hq, d]


def paged_prefill_attention_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                                cu_seqlens_q: Tensor, context_lens: Tensor, scale: float) -> Tensor:
    """q `[T, Hq, d]` -> `[T, Hq, d]`: sequence s's new tokens q[cu[s]:cu[s+1]] are the last of its
    context_lens[s] cached tokens and attend causally over all of them."""
    out = torch.empty_like(q)
    cu, lens = cu_seqlens_q.tolist(), context_lens.tolist()
    for s, n in enumerate(lens):
        if cu[s + 1] == cu[s]:
            continue
        k = _gather_kv(k_cache, block_tables[s], n)  # [N, Hkv, d]
        v = _gather_kv(v_cache, block_tables[s], n)
        out[cu[s]:cu[s + 1]] = causal_attention_ref(q[cu[s]:cu[s + 1]], k, v, scale)
    return out


def paged_decode_attention_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                               context_lens: Tensor, scale: float) -> Tensor:
    """q `[S, Hq, d]` -> `[S, Hq, d]`: prefill with one new token per sequence (it sees its whole context);
    a sequence with an empty context gives zeros, like the kernel."""
    cu = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    lens = context_lens.clamp_min(1)  # the ref attends over >= 1 key; zeroed below
    out = paged_prefill_attention_ref(q, k_cache, v_cache, block_tables, cu, lens, scale)
    return torch.where((context_lens > 0)[:, None, None], out, 0)


def rope_cos_sin_cache(head_dim: int, theta: float, max_positions: int,
                       device: torch.device | str | None = None) -> Tensor:
    """fp32 `[max_positions, head_dim]`: row p = (cos, sin) of p * inv_freq, inv_freq `[head_dim/2]` =
    theta^(-2i/head_dim) computed as transformers (and qwen2_5_vl.rope_inv_freq) does. Build once per
    model; M-RoPE positions (image rows/columns, the rope_delta-shifted text) must stay below
    max_positions."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.arange(max_positions, dtype=torch.float32, device=device)[:, None] * inv_freq  # [P, d/2]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dim (the "rotate-half" RoPE layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def mrope_cos_sin(positions: Tensor, cos_sin_cache: Tensor, mrope_section: tuple[int, int, int],
                  dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """positions `[3, ...]` (t, h, w) -> (cos, sin) `[..., 1, d]` in `dtype` (the 1 broadcasts over heads),
    looked up in a `rope_cos_sin_cache` table (`_mrope_layout` says how the axes fill the pairs)."""
    half = cos_sin_cache.shape[-1] // 2
    table = cos_sin_cache[positions.long()]  # [3, ..., d]: per axis, (cos | sin) of all pairs
    return _mrope_layout(table[..., :half], table[..., half:], mrope_section, dtype)


def mrope_cos_sin_from_freqs(positions: Tensor, inv_freq: Tensor, mrope_section: tuple[int, int, int],
                             dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The same (cos, sin) computed from the positions directly (no table: what the dense forward and its
    exports use). The angles are the table's, `p · inv_freq` in fp32, so the values are equal."""
    freqs = positions[..., None].float() * inv_freq  # [3, ..., d/2]
    return _mrope_layout(freqs.cos(), freqs.sin(), mrope_section, dtype)


def _mrope_layout(cos: Tensor, sin: Tensor, mrope_section: tuple[int, int, int],
                  dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Per-axis cos/sin `[3, ..., d/2]` -> `[..., 1, d]`: the d/2 frequency pairs are cut into consecutive
    chunks of `mrope_section` = (temporal, height, width) sizes and chunk a takes its angles from position
    row a (transformers' chunked layout for qwen2_5_vl, not Qwen3-VL's interleaved one); both halves of d
    share a pair's angle (rotate-half layout). For text the three rows are equal: ordinary 1-D RoPE."""
    cos_chunks, sin_chunks, start = [], [], 0
    for axis, size in enumerate(mrope_section):
        cos_chunks.append(cos[axis, ..., start:start + size])
        sin_chunks.append(sin[axis, ..., start:start + size])
        start += size
    cos, sin = torch.cat(cos_chunks, dim=-1), torch.cat(sin_chunks, dim=-1)  # [..., d/2]
    cos = torch.cat((cos, cos), dim=-1)[..., None, :].to(dtype)  # [..., 1, d]
    sin = torch.cat((sin, sin), dim=-1)[..., None, :].to(dtype)
    return cos, sin


def apply_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """`x * cos + rotate_half(x) * sin` in the dtype, for q `[..., Hq, d]` and k `[..., Hkv, d]`; cos, sin
    `[..., 1, d]`."""
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def mrope_rotary_ref(q: Tensor, k: Tensor, positions: Tensor, cos_sin_cache: Tensor,
                     mrope_section: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
    """q `[T, Hq, d]`, k `[T, Hkv, d]`, positions `[3, T]` -> (q, k) rotated as TextAttention does with
    `mrope_cos_sin`: pair chunk a of mrope_section takes row a's angles; cos/sin cast to the dtype, then
    `x * cos + rotate_half(x) * sin` in the dtype."""
    cos, sin = mrope_cos_sin(positions, cos_sin_cache, mrope_section, q.dtype)
    return apply_rotary(q, k, cos, sin)


# ------------------------------------------------------------------------------------------------
# Custom ops around the Triton launchers (the Triton path only).


@torch.library.custom_op("blip3o::write_kv_cache", mutates_args=("k_cache", "v_cache"))
def _write_kv_cache_op(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    _kernels("kv_cache").write_kv_cache(k, v, k_cache, v_cache, slot_mapping)


@_write_kv_cache_op.register_fake
def _(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    return None


@torch.library.custom_op("blip3o::paged_decode_attention", mutates_args=())
def _paged_decode_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor,
                     scale: float) -> Tensor:
    return _kernels("paged_attention").paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens,
                                                              scale)


@_paged_decode_op.register_fake
def _(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor,
      scale: float) -> Tensor:
    return q.new_empty(q.shape)


@torch.library.custom_op("blip3o::paged_prefill_attention", mutates_args=())
def _paged_prefill_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, cu_seqlens_q: Tensor,
                      context_lens: Tensor, scale: float) -> Tensor:
    return _kernels("paged_attention").paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q,
                                                               context_lens, scale)


@_paged_prefill_op.register_fake
def _(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, cu_seqlens_q: Tensor,
      context_lens: Tensor, scale: float) -> Tensor:
    return q.new_empty(q.shape)


@torch.library.custom_op("blip3o::mrope_rotary", mutates_args=())
def _mrope_rotary_op(q: Tensor, k: Tensor, positions: Tensor, cos_sin_cache: Tensor,
                     mrope_section: list[int]) -> tuple[Tensor, Tensor]:
    return _kernels("mrope").mrope_rotary(q, k, positions, cos_sin_cache, tuple(mrope_section))


@_mrope_rotary_op.register_fake
def _(q: Tensor, k: Tensor, positions: Tensor, cos_sin_cache: Tensor,
      mrope_section: list[int]) -> tuple[Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape)


# ------------------------------------------------------------------------------------------------
# Public ops: validate (same rules on both paths, shapes only: no device reads), then dispatch.


def _check_same(op: str, ref: Tensor, **tensors: Tensor) -> None:
    for name, t in tensors.items():
        check(t.dtype == ref.dtype, op, "{} is {}, expected {}", name, t.dtype, ref.dtype)
        check(t.device == ref.device, op, "{} is on {}, expected {}", name, t.device, ref.device)


def _check_head_dim(op: str, d: int) -> None:
    check(d >= 16 and d & (d - 1) == 0, op, "head_dim must be a power of two >= 16, got {}", d)


def _check_cache(op: str, q: Tensor, k_cache: Tensor, v_cache: Tensor) -> None:
    """q `[N, Hq, d]`; caches `[num_blocks, block_size, Hkv, d]` alike; Hq a multiple of Hkv."""
    check(q.dim() == 3, op, "expected q [tokens, heads, head_dim], got {}", tuple(q.shape))
    check(k_cache.dim() == 4 and k_cache.shape == v_cache.shape, op,
          "k_cache {} and v_cache {} must be equal [num_blocks, block_size, kv_heads, head_dim]",
          tuple(k_cache.shape), tuple(v_cache.shape))
    check(k_cache.shape[3] == q.shape[2], op, "cache head_dim {} != q's {}", k_cache.shape[3], q.shape[2])
    check(q.shape[1] % k_cache.shape[2] == 0, op, "query heads {} must be a multiple of kv heads {}",
          q.shape[1], k_cache.shape[2])
    _check_head_dim(op, q.shape[2])
    _check_same(op, q, k_cache=k_cache, v_cache=v_cache)
    check(k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, op, "caches need a unit head_dim stride")


def _check_int_vector(op: str, name: str, t: Tensor, length: int, device: torch.device,
                      dtypes: tuple[torch.dtype, ...] = (torch.int32,)) -> None:
    check(t.shape == (length,), op, "{} must be [{}], got {}", name, length, tuple(t.shape))
    check(t.dtype in dtypes and t.device == device, op, "{} must be {} on {}, got {} on {}",
          name, "/".join(map(str, dtypes)), device, t.dtype, t.device)


def _check_block_tables(op: str, block_tables: Tensor, num_seqs: int, device: torch.device) -> None:
    check(block_tables.dim() == 2 and block_tables.shape[0] == num_seqs, op,
          "block_tables must be [{}, max_blocks], got {}", num_seqs, tuple(block_tables.shape))
    check(block_tables.dtype == torch.int32 and block_tables.device == device and block_tables.stride(1) == 1,
          op, "block_tables must be int32 on {} with unit column stride", device)


def write_kv_cache(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """k, v `[T, Hkv, d]` -> k_cache, v_cache `[num_blocks, block_size, Hkv, d]` at slot_mapping `[T]`
    (int64/int32 `block * block_size + row`; -1 skips the token), in place."""
    op = "write_kv_cache"
    check(k.dim() == 3 and k.shape == v.shape, op, "k {} and v {} must be equal [T, Hkv, d]",
          tuple(k.shape), tuple(v.shape))
    _check_cache(op, k, k_cache, v_cache)
    check(k_cache.shape[2] == k.shape[1], op, "k has {} heads, the cache {}", k.shape[1], k_cache.shape[2])
    _check_same(op, k, v=v)
    _check_int_vector(op, "slot_mapping", slot_mapping, k.shape[0], k.device, (torch.int64, torch.int32))
    if use_kernel(k):
        _write_kv_cache_op(k, v, k_cache, v_cache, slot_mapping)
    else:
        write_kv_cache_ref(k, v, k_cache, v_cache, slot_mapping)


def paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                           context_lens: Tensor, scale: float) -> Tensor:
    """q `[S, Hq, d]` (each sequence's one new token, already in the cache) -> `[S, Hq, d]`: softmax(q k^T
    * scale) v over the context_lens[s] cached tokens of sequence s (zeros when it is 0)."""
    op = "paged_decode_attention"
    _check_cache(op, q, k_cache, v_cache)
    _check_block_tables(op, block_tables, q.shape[0], q.device)
    _check_int_vector(op, "context_lens", context_lens, q.shape[0], q.device)
    if use_kernel(q):
        return _paged_decode_op(q, k_cache, v_cache, block_tables, context_lens, scale)
    return paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale)


def paged_prefill_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                            cu_seqlens_q: Tensor, context_lens: Tensor, scale: float) -> Tensor:
    """q `[T, Hq, d]` (the new tokens of S sequences, packed by cu_seqlens_q `[S+1]`, already in the cache)
    -> `[T, Hq, d]`: new token i of sequence s sits at position context_lens[s] - q_len + i and attends
    to the cached tokens at positions <= its own (prefix fully, new tokens causally)."""
    op = "paged_prefill_attention"
    _check_cache(op, q, k_cache, v_cache)
    num_seqs = cu_seqlens_q.shape[0] - 1 if cu_seqlens_q.dim() == 1 else -1
    check(num_seqs >= 0, op, "cu_seqlens_q must be [S + 1], got {}", tuple(cu_seqlens_q.shape))
    _check_int_vector(op, "cu_seqlens_q", cu_seqlens_q, num_seqs + 1, q.device)
    _check_block_tables(op, block_tables, num_seqs, q.device)
    _check_int_vector(op, "context_lens", context_lens, num_seqs, q.device)
    if use_kernel(q):
        return _paged_prefill_op(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale)
    return paged_prefill_attention_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale)


def mrope_rotary(q: Tensor, k: Tensor, positions: Tensor, cos_sin_cache: Tensor,
                 mrope_section: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
    """q `[T, Hq, d]`, k `[T, Hkv, d]`, positions int64/int32 `[3, T]` (t, h, w; text: three equal rows),
    cos_sin_cache fp32 `[P, d]` from `rope_cos_sin_cache` (positions must be < P) -> rotated (q, k)."""
    op = "mrope_rotary"
    check(q.dim() == 3 and k.dim() == 3 and k.shape[0] == q.shape[0] and k.shape[2] == q.shape[2], op,
          "expected q [T, Hq, d] and k [T, Hkv, d], got {} and {}", tuple(q.shape), tuple(k.shape))
    t, _, d = q.shape
    _check_head_dim(op, d)
    _check_same(op, q, k=k)
    check(len(mrope_section) == 3 and sum(mrope_section) == d // 2, op,
          "mrope_section {} must be 3 sizes summing to head_dim/2 = {}", tuple(mrope_section), d // 2)
    check(positions.shape == (3, t) and positions.dtype in (torch.int64, torch.int32)
          and positions.device == q.device, op, "positions must be int64/int32 [3, {}] on q's device", t)
    check(cos_sin_cache.dim() == 2 and cos_sin_cache.shape[1] == d and cos_sin_cache.dtype == torch.float32
          and cos_sin_cache.device == q.device, op, "cos_sin_cache must be fp32 [P, {}] on q's device", d)
    if use_kernel(q):
        return _mrope_rotary_op(q, k, positions, cos_sin_cache, list(mrope_section))
    return mrope_rotary_ref(q, k, positions, cos_sin_cache, mrope_section)


__all__ = [
    "write_kv_cache", "write_kv_cache_ref",
    "paged_decode_attention", "paged_decode_attention_ref",
    "paged_prefill_attention", "paged_prefill_attention_ref",
    "rope_cos_sin_cache", "mrope_cos_sin", "mrope_cos_sin_from_freqs", "apply_rotary", "rotate_half", "mrope_rotary", "mrope_rotary_ref",
    "gqa_attention_ref", "causal_attention_ref",
]
