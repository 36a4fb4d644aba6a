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
- `rms_norm(x, weight, eps)`, `fused_add_rms_norm(x, residual, weight, eps)`: x `[T, H]` ->
  RMSNorm_w(x), resp. (RMSNorm_w(x + residual), x + residual) — the decoder layer's
  `residual = x + residual; x = norm(residual)` in one pass;
- `rope_cos_sin_cache(head_dim, theta, max_positions)` (table builder, torch only) and
  `mrope_rotary(q, k, positions, cos_sin_cache, mrope_section)`: q `[T, Hq, d]`, k `[T, Hkv, d]`,
  positions `[3, T]` -> rotated (q, k); its ref is `mrope_cos_sin` (once per step) + `apply_rotary`;
- `silu_and_mul(gate_up)`: `[T, 2I]` (gate_proj | up_proj, one fused matmul) -> silu(gate) * up `[T, I]`.
GQA: query head h reads KV head h // (Hq / Hkv), as `repeat_interleave` in models/qwen2_5_vl.py.

The `*_ref` twins repeat models/qwen2_5_vl.py's formulas and rounding points (this package may not
import `models`, which sits above it); tests/kernels checks them against the model's modules. The
attention refs gather each sequence's blocks into contiguous K/V and run the model's masked
`scaled_dot_product_attention`, one sequence at a time: readable, not fast.

Dispatch is `dit_ops`'s: the Triton kernel when the input is on CUDA (or under `force_triton()` /
BLIP3O_FORCE_TRITON=1, with TRITON_INTERPRET=1 on CPU), otherwise the ref; the Triton path goes
through `torch.ops.blip3o.<name>` custom ops with fake impls (write_kv_cache declares its mutation of
the caches), so it traces under torch.compile and is captured by CUDA graphs. The paged model does
not serve CPU steps through these per-layer ops but through `ops.llm_cpu` (planned once per step). No op reads device
values on the host (no syncs): the launch grids come from tensor shapes only. Outputs are new
contiguous tensors; inputs may have any token/head strides (head_dim stride 1, else copied).
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from .dit_ops import _check, _use_triton


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


def _causal_attention_ref(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """q `[L, Hq, d]` (the last L of the N positions), k, v `[N, Hkv, d]` -> `[L, Hq, d]`: models/qwen2_5_vl's
    TextAttention core (GQA by repeat_interleave, `causal_mask`'s k_pos <= q_pos, SDPA in the dtype)."""
    n, hkv = k.shape[0], k.shape[1]
    group = q.shape[1] // hkv
    q_pos = torch.arange(n - q.shape[0], n, device=q.device)
    allowed = torch.arange(n, device=q.device)[None, :] <= q_pos[:, None]  # [L, N]
    k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, N, d]
    v = v.repeat_interleave(group, dim=1).transpose(0, 1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=allowed, scale=scale)
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
        out[cu[s]:cu[s + 1]] = _causal_attention_ref(q[cu[s]:cu[s + 1]], k, v, scale)
    return out


def paged_decode_attention_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                               context_lens: Tensor, scale: float) -> Tensor:
    """q `[S, Hq, d]` -> `[S, Hq, d]`: prefill with one new token per sequence (it sees its whole context);
    a sequence with an empty context gives zeros, like the kernel."""
    cu = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    lens = context_lens.clamp_min(1)  # the ref attends over >= 1 key; zeroed below
    out = paged_prefill_attention_ref(q, k_cache, v_cache, block_tables, cu, lens, scale)
    return torch.where((context_lens > 0)[:, None, None], out, 0)


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """`qwen2_5_vl.RMSNorm.forward`: normalize in fp32, cast back, then times the weight."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def fused_add_rms_norm_ref(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(RMSNorm_w(x + residual), x + residual): the decoder layer's residual add (in the dtype), then the
    next norm."""
    new_residual = x + residual
    return rms_norm_ref(new_residual, weight, eps), new_residual


def rope_cos_sin_cache(head_dim: int, theta: float, max_positions: int,
                       device: torch.device | str | None = None) -> Tensor:
    """fp32 `[max_positions, head_dim]`: row p = (cos, sin) of p * inv_freq, inv_freq `[head_dim/2]` =
    theta^(-2i/head_dim) computed as transformers (and qwen2_5_vl.rope_inv_freq) does. Build once per
    model; M-RoPE positions (image rows/columns, the rope_delta-shifted text) must stay below
    max_positions."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.arange(max_positions, dtype=torch.float32, device=device)[:, None] * inv_freq  # [P, d/2]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def mrope_cos_sin(positions: Tensor, cos_sin_cache: Tensor, mrope_section: tuple[int, int, int],
                  dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """positions `[3, T]` -> (cos, sin) `[T, 1, d]` in `dtype`, as `mrope_cos_sin` in models/qwen2_5_vl:
    pair chunk a of mrope_section takes row a's angles; both halves of d share a pair's angle."""
    half = cos_sin_cache.shape[-1] // 2
    table = cos_sin_cache[positions.long()]  # [3, T, d]: per axis, (cos | sin) of all pairs
    chunks, start = [], 0
    for axis, size in enumerate(mrope_section):
        chunks.append(table[axis, :, start:start + size])
        chunks.append(table[axis, :, half + start:half + start + size])
        start += size
    cos = torch.cat(chunks[0::2], dim=-1)  # [T, d/2]
    sin = torch.cat(chunks[1::2], dim=-1)
    cos = torch.cat((cos, cos), dim=-1)[:, None].to(dtype)  # [T, 1, d]
    sin = torch.cat((sin, sin), dim=-1)[:, None].to(dtype)
    return cos, sin


def apply_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """`x * cos + rotate_half(x) * sin` in the dtype, for q `[T, Hq, d]` and k `[T, Hkv, d]`; cos, sin `[T, 1, d]`."""
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def mrope_rotary_ref(q: Tensor, k: Tensor, positions: Tensor, cos_sin_cache: Tensor,
                     mrope_section: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
    """q `[T, Hq, d]`, k `[T, Hkv, d]`, positions `[3, T]` -> (q, k) rotated as TextAttention does with
    `mrope_cos_sin`: pair chunk a of mrope_section takes row a's angles; cos/sin cast to the dtype, then
    `x * cos + rotate_half(x) * sin` in the dtype."""
    cos, sin = mrope_cos_sin(positions, cos_sin_cache, mrope_section, q.dtype)
    return apply_rotary(q, k, cos, sin)


def silu_and_mul_ref(gate_up: Tensor) -> Tensor:
    """`[..., 2I]` -> `[..., I]`: the text MLP's `silu(gate_proj(x)) * up_proj(x)`, in the dtype."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


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


@torch.library.custom_op("blip3o::rms_norm", mutates_args=())
def _rms_norm_op(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return _kernels("llm_norms").rms_norm(x, weight, eps)


@_rms_norm_op.register_fake
def _(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("blip3o::fused_add_rms_norm", mutates_args=())
def _fused_add_rms_norm_op(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return _kernels("llm_norms").fused_add_rms_norm(x, residual, weight, eps)


@_fused_add_rms_norm_op.register_fake
def _(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape), x.new_empty(x.shape)


@torch.library.custom_op("blip3o::mrope_rotary", mutates_args=())
def _mrope_rotary_op(q: Tensor, k: Tensor, positions: Tensor, cos_sin_cache: Tensor,
                     mrope_section: list[int]) -> tuple[Tensor, Tensor]:
    return _kernels("mrope").mrope_rotary(q, k, positions, cos_sin_cache, tuple(mrope_section))


@_mrope_rotary_op.register_fake
def _(q: Tensor, k: Tensor, positions: Tensor, cos_sin_cache: Tensor,
      mrope_section: list[int]) -> tuple[Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("blip3o::silu_and_mul", mutates_args=())
def _silu_and_mul_op(gate_up: Tensor) -> Tensor:
    # The DiT's SwiGLU kernel computes the same thing (fp32 SiLU rounded to the dtype, times up, rounded):
    # it reads the two halves of the fused projection in place.
    half = gate_up.shape[-1] // 2
    return _kernels("swiglu").swiglu(gate_up[..., :half], gate_up[..., half:])


@_silu_and_mul_op.register_fake
def _(gate_up: Tensor) -> Tensor:
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


# ------------------------------------------------------------------------------------------------
# Public ops: validate (same rules on both paths, shapes only: no device reads), then dispatch.


def _check_same(op: str, ref: Tensor, **tensors: Tensor) -> None:
    for name, t in tensors.items():
        _check(t.dtype == ref.dtype, op, f"{name} is {t.dtype}, expected {ref.dtype}")
        _check(t.device == ref.device, op, f"{name} is on {t.device}, expected {ref.device}")


def _check_head_dim(op: str, d: int) -> None:
    _check(d >= 16 and d & (d - 1) == 0, op, f"head_dim must be a power of two >= 16, got {d}")


def _check_cache(op: str, q: Tensor, k_cache: Tensor, v_cache: Tensor) -> None:
    """q `[N, Hq, d]`; caches `[num_blocks, block_size, Hkv, d]` alike; Hq a multiple of Hkv."""
    _check(q.dim() == 3, op, f"expected q [tokens, heads, head_dim], got {tuple(q.shape)}")
    _check(k_cache.dim() == 4 and k_cache.shape == v_cache.shape, op,
           f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must be equal "
           "[num_blocks, block_size, kv_heads, head_dim]")
    _check(k_cache.shape[3] == q.shape[2], op, f"cache head_dim {k_cache.shape[3]} != q's {q.shape[2]}")
    _check(q.shape[1] % k_cache.shape[2] == 0, op,
           f"query heads {q.shape[1]} must be a multiple of kv heads {k_cache.shape[2]}")
    _check_head_dim(op, q.shape[2])
    _check_same(op, q, k_cache=k_cache, v_cache=v_cache)
    _check(k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, op, "caches need a unit head_dim stride")


def _check_int_vector(op: str, name: str, t: Tensor, length: int, device: torch.device,
                      dtypes: tuple[torch.dtype, ...] = (torch.int32,)) -> None:
    _check(t.shape == (length,), op, f"{name} must be [{length}], got {tuple(t.shape)}")
    _check(t.dtype in dtypes and t.device == device, op,
           f"{name} must be {'/'.join(map(str, dtypes))} on {device}, got {t.dtype} on {t.device}")


def _check_block_tables(op: str, block_tables: Tensor, num_seqs: int, device: torch.device) -> None:
    _check(block_tables.dim() == 2 and block_tables.shape[0] == num_seqs, op,
           f"block_tables must be [{num_seqs}, max_blocks], got {tuple(block_tables.shape)}")
    _check(block_tables.dtype == torch.int32 and block_tables.device == device and block_tables.stride(1) == 1,
           op, f"block_tables must be int32 on {device} with unit column stride")


def write_kv_cache(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """k, v `[T, Hkv, d]` -> k_cache, v_cache `[num_blocks, block_size, Hkv, d]` at slot_mapping `[T]`
    (int64/int32 `block * block_size + row`; -1 skips the token), in place."""
    op = "write_kv_cache"
    _check(k.dim() == 3 and k.shape == v.shape, op,
           f"k {tuple(k.shape)} and v {tuple(v.shape)} must be equal [T, Hkv, d]")
    _check_cache(op, k, k_cache, v_cache)
    _check(k_cache.shape[2] == k.shape[1], op, f"k has {k.shape[1]} heads, the cache {k_cache.shape[2]}")
    _check_same(op, k, v=v)
    _check_int_vector(op, "slot_mapping", slot_mapping, k.shape[0], k.device, (torch.int64, torch.int32))
    if _use_triton(k):
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
    if _use_triton(q):
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
    _check(num_seqs >= 0, op, f"cu_seqlens_q must be [S + 1], got {tuple(cu_seqlens_q.shape)}")
    _check_int_vector(op, "cu_seqlens_q", cu_seqlens_q, num_seqs + 1, q.device)
    _check_block_tables(op, block_tables, num_seqs, q.device)
    _check_int_vector(op, "context_lens", context_lens, num_seqs, q.device)
    if _use_triton(q):
        return _paged_prefill_op(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale)
    return paged_prefill_attention_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale)


def _check_norm(op: str, x: Tensor, weight: Tensor) -> None:
    _check(x.dim() == 2, op, f"expected x [T, H], got {tuple(x.shape)}")
    _check(weight.shape == (x.shape[1],), op, f"weight must be [{x.shape[1]}], got {tuple(weight.shape)}")
    _check_same(op, x, weight=weight)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x `[T, H]`, weight `[H]` -> RMSNorm_w(x) `[T, H]` (qwen2_5_vl.RMSNorm)."""
    _check_norm("rms_norm", x, weight)
    if _use_triton(x):
        return _rms_norm_op(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """x, residual `[T, H]`, weight `[H]` -> (normed, new_residual): new_residual = x + residual (in the
    dtype), normed = RMSNorm_w(new_residual)."""
    op = "fused_add_rms_norm"
    _check_norm(op, x, weight)
    _check(residual.shape == x.shape, op, f"residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    _check_same(op, x, residual=residual)
    if _use_triton(x):
        return _fused_add_rms_norm_op(x, residual, weight, eps)
    return fused_add_rms_norm_ref(x, residual, weight, eps)


def mrope_rotary(q: Tensor, k: Tensor, positions: Tensor, cos_sin_cache: Tensor,
                 mrope_section: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
    """q `[T, Hq, d]`, k `[T, Hkv, d]`, positions int64/int32 `[3, T]` (t, h, w; text: three equal rows),
    cos_sin_cache fp32 `[P, d]` from `rope_cos_sin_cache` (positions must be < P) -> rotated (q, k)."""
    op = "mrope_rotary"
    _check(q.dim() == 3 and k.dim() == 3 and k.shape[0] == q.shape[0] and k.shape[2] == q.shape[2], op,
           f"expected q [T, Hq, d] and k [T, Hkv, d], got {tuple(q.shape)} and {tuple(k.shape)}")
    t, _, d = q.shape
    _check_head_dim(op, d)
    _check_same(op, q, k=k)
    _check(len(mrope_section) == 3 and sum(mrope_section) == d // 2, op,
           f"mrope_section {tuple(mrope_section)} must be 3 sizes summing to head_dim/2 = {d // 2}")
    _check(positions.shape == (3, t) and positions.dtype in (torch.int64, torch.int32)
           and positions.device == q.device, op, f"positions must be int64/int32 [3, {t}] on q's device")
    _check(cos_sin_cache.dim() == 2 and cos_sin_cache.shape[1] == d and cos_sin_cache.dtype == torch.float32
           and cos_sin_cache.device == q.device, op, f"cos_sin_cache must be fp32 [P, {d}] on q's device")
    if _use_triton(q):
        return _mrope_rotary_op(q, k, positions, cos_sin_cache, list(mrope_section))
    return mrope_rotary_ref(q, k, positions, cos_sin_cache, mrope_section)


def silu_and_mul(gate_up: Tensor) -> Tensor:
    """gate_up `[..., 2I]` (gate | up) -> silu(gate) * up `[..., I]`, in the dtype (SiLU evaluated in fp32,
    rounded, then the product rounded: what `F.silu(gate) * up` does on half tensors)."""
    _check(gate_up.dim() > 0 and gate_up.shape[-1] % 2 == 0, "silu_and_mul",
           f"last dim must be even (gate | up), got {tuple(gate_up.shape)}")
    if _use_triton(gate_up):
        return _silu_and_mul_op(gate_up)
    return silu_and_mul_ref(gate_up)


__all__ = [
    "write_kv_cache", "write_kv_cache_ref",
    "paged_decode_attention", "paged_decode_attention_ref",
    "paged_prefill_attention", "paged_prefill_attention_ref",
    "rms_norm", "rms_norm_ref",
    "fused_add_rms_norm", "fused_add_rms_norm_ref",
    "rope_cos_sin_cache", "mrope_cos_sin", "apply_rotary", "mrope_rotary", "mrope_rotary_ref",
    "silu_and_mul", "silu_and_mul_ref",
]
