"""The paged language model's attention on CPU: vectorised torch, planned once per step.

Triton does not run natively on CPU, and the `llm_ops` ref twins are per-sequence loops that redo
their index arithmetic in every layer (written to be obviously right, not fast). Serving on CPU
needs neither: everything that depends only on the step's metadata — M-RoPE cos/sin, the flat slot
of every key each sequence reads, masks — is computed once in `plan_step` and shared by all layers
(vLLM's attention-metadata pattern), and every one-token (decode) sequence of the step attends in
ONE batched SDPA call over its keys gathered from the paged cache. Sequences with several new tokens
(prefill chunks) attend one call each: their work is a matmul over many queries, so the loop costs
nothing that matters.

Same cache layout and semantics as `llm_ops` (see its docstring); tests/kernels/test_llm_cpu.py
checks every function against the ref twins on random odd-sized batches. Host reads of the metadata
(`tolist`, `max`) are free on CPU; this path is never used on CUDA, where the Triton kernels run and
nothing may synchronise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .llm_ops import apply_rotary, mrope_cos_sin


@dataclass(frozen=True)
class PrefillSeq:
    """One sequence with several new tokens: its query rows and the keys it reads."""

    rows: slice  # its new tokens in the packed [T] batch
    slots: Tensor  # [N] int64 flat cache slots of its N context tokens, in order
    mask: Tensor | None  # [L, N] bool, key allowed; None when the context is exactly the new tokens (causal)


@dataclass(frozen=True)
class StepPlan:
    """Everything the layers of one step share. T tokens, S sequences, Sd of them one-token."""

    cos: Tensor  # [T, 1, d] model dtype
    sin: Tensor  # [T, 1, d]
    write_slots: Tensor  # [T'] int64 flat slots of the tokens that write (all but padding)
    write_rows: Tensor | None  # [T'] int64 their rows, None when every token writes
    decode_rows: Tensor | None  # [Sd] int64 query rows of the one-token sequences; None if Sd == 0
    decode_slots: Tensor | None  # [Sd, Lmax] int64 slots of their keys (0 where past the context)
    decode_mask: Tensor | None  # [Sd, 1, 1, Lmax] bool key allowed; None when all have Lmax keys
    decode_empty: Tensor | None  # [Sd, 1, 1] bool, a sequence with no context (output zeros); usually None
    prefills: tuple[PrefillSeq, ...]
    decode_only: bool  # every token is a one-token sequence, in order (decode_rows == arange(T))


def _context_slots(block_table: Tensor, lens: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """block_table int32 `[R, max_blocks]`, lens int64 `[R]` -> (slots int64 `[R, Lmax]`, valid `[R, Lmax]`):
    the flat slot of key position j of row r, 0 where j >= lens[r]."""
    lmax = max(int(lens.max()), 1)
    pos = torch.arange(lmax, device=lens.device)  # [Lmax]
    blocks = block_table.long().gather(1, (pos // block_size).expand(block_table.shape[0], -1))  # [R, Lmax]
    valid = pos < lens[:, None]
    return torch.where(valid, blocks * block_size + pos % block_size, 0), valid


def plan_step(positions: Tensor, cos_sin_cache: Tensor, mrope_section: tuple[int, int, int], dtype: torch.dtype,
              slot_mapping: Tensor, block_tables: Tensor, context_lens: Tensor, cu_seqlens_q: Tensor | None,
              block_size: int) -> StepPlan:
    """The step's shared metadata (arguments as `PagedTextModel.forward`; cu_seqlens_q None = decode)."""
    cos, sin = mrope_cos_sin(positions, cos_sin_cache, mrope_section, dtype)  # [T, 1, d] each
    writes = slot_mapping >= 0
    all_write = bool(writes.all())
    write_rows = None if all_write else writes.nonzero()[:, 0]
    write_slots = slot_mapping.long() if all_write else slot_mapping[writes].long()

    num_seqs = context_lens.shape[0]
    lens = context_lens.long()
    if cu_seqlens_q is None:
        q_lens, starts = [1] * num_seqs, list(range(num_seqs))
    else:
        cu = cu_seqlens_q.tolist()
        q_lens, starts = [b - a for a, b in zip(cu, cu[1:])], cu[:-1]
    one = [s for s in range(num_seqs) if q_lens[s] == 1]
    decode_only = len(one) == num_seqs == positions.shape[1]
    decode = _plan_decodes(one, starts, block_tables, lens, block_size, decode_only)
    prefills = tuple(_plan_prefill(block_tables[s:s + 1], int(lens[s]), starts[s], q_lens[s], block_size)
                     for s in range(num_seqs) if q_lens[s] > 1)
    return StepPlan(cos, sin, write_slots, write_rows, *decode, prefills, decode_only)


def _plan_decodes(one: list[int], starts: list[int], block_tables: Tensor, lens: Tensor, block_size: int,
                  decode_only: bool) -> tuple[Tensor | None, ...]:
    """(rows, slots, mask, empty) of StepPlan for the one-token sequences `one` (all None if there are none)."""
    if not one:
        return None, None, None, None
    idx = None if decode_only else torch.tensor(one)
    tables, one_lens = (block_tables, lens) if decode_only else (block_tables[idx], lens[idx])
    rows = torch.arange(len(one)) if decode_only else torch.tensor([starts[s] for s in one])
    slots, valid = _context_slots(tables, one_lens, block_size)
    mask = None if bool(valid.all()) else valid[:, None, None, :]
    empty = None
    if bool((one_lens == 0).any()):  # every key masked: SDPA would give NaN; the contract is zeros
        empty = (one_lens == 0)[:, None, None]
        mask = mask | empty[..., None]  # let the row attend to slot 0, zeroed after
    return rows, slots, mask, empty


def _plan_prefill(block_table: Tensor, n: int, start: int, q_len: int, block_size: int) -> PrefillSeq:
    """A sequence with q_len > 1 new tokens (rows start...) ending its n-token context."""
    slots, _ = _context_slots(block_table, torch.tensor([n]), block_size)  # [1, N]
    mask = None
    if n != q_len:  # new token i sits at position n - q_len + i and sees keys at positions <= it
        q_pos = torch.arange(n - q_len, n)
        mask = torch.arange(n)[None, :] <= q_pos[:, None]  # [L, N]
    return PrefillSeq(slice(start, start + q_len), slots[0, :n], mask)


def rotary(q: Tensor, k: Tensor, plan: StepPlan) -> tuple[Tensor, Tensor]:
    """q `[T, Hq, d]`, k `[T, Hkv, d]` rotated with the step's cos/sin (`llm_ops.mrope_rotary`'s math)."""
    return apply_rotary(q, k, plan.cos, plan.sin)


def write_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, plan: StepPlan) -> None:
    """k, v `[T, Hkv, d]` into the caches at the step's slots (padding tokens skipped), in place."""
    if plan.write_rows is not None:
        k, v = k[plan.write_rows], v[plan.write_rows]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, plan.write_slots, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, plan.write_slots, v)


def _decode_attention(q: Tensor, k_flat: Tensor, v_flat: Tensor, plan: StepPlan, scale: float) -> Tensor:
    """The one-token sequences' queries q `[Sd, Hq, d]` over their gathered keys, one SDPA: `[Sd, Hq, d]`."""
    k = k_flat[plan.decode_slots].transpose(1, 2)  # [Sd, Hkv, Lmax, d]
    v = v_flat[plan.decode_slots].transpose(1, 2)
    o = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=plan.decode_mask, scale=scale,
                                       enable_gqa=True)  # [Sd, Hq, 1, d]
    if plan.decode_empty is not None:
        o = o.masked_fill(plan.decode_empty[..., None], 0)
    return o[:, :, 0]


def attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, plan: StepPlan, scale: float) -> Tensor:
    """q `[T, Hq, d]` (the step's new tokens, already written to the cache) -> `[T, Hq, d]`: what
    `llm_ops.paged_prefill_attention` (and, for one-token sequences, `paged_decode_attention`) gives."""
    k_flat = k_cache.view(-1, *k_cache.shape[2:])  # [slots, Hkv, d]
    v_flat = v_cache.view(-1, *v_cache.shape[2:])
    if plan.decode_only:  # the common decode step: the batched call's output is the whole output
        return _decode_attention(q, k_flat, v_flat, plan, scale)
    out = q.new_empty(q.shape)
    if plan.decode_rows is not None:
        out[plan.decode_rows] = _decode_attention(q[plan.decode_rows], k_flat, v_flat, plan, scale)
    for seq in plan.prefills:
        k = k_flat[seq.slots].transpose(0, 1)  # [Hkv, N, d]
        v = v_flat[seq.slots].transpose(0, 1)
        qs = q[seq.rows].transpose(0, 1)  # [Hq, L, d]
        o = F.scaled_dot_product_attention(qs, k, v, attn_mask=seq.mask, is_causal=seq.mask is None, scale=scale,
                                           enable_gqa=True)
        out[seq.rows] = o.transpose(0, 1)
    return out


__all__ = ["PrefillSeq", "StepPlan", "attention", "plan_step", "rotary", "write_kv"]
