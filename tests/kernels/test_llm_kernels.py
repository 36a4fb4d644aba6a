"""Paged-KV language-model kernels (kernels/triton/{paged_attention,kv_cache,llm_norms,mrope}.py, and
swiglu.py behind silu_and_mul) vs their torch twins (ops/llm_ops.py).

On CPU the kernels run in Triton's interpreter (fp32 and fp16 only: it gets bf16 wrong) on small shapes:
block sizes 4 and 16 with sequences that end mid-block and span many blocks, physical blocks shuffled
(block tables are not contiguous), caches pre-filled with NaN so that a read of any slot outside a
sequence's context poisons the result, and GQA groups of 2, 7 (Qwen2.5-VL 7B/8B) and 8 (3B/4B). Every
Triton test counts kernel launches, so a dispatch that silently fell back to the reference cannot pass.
The refs are anchored to models/qwen2_5_vl.py: RMSNorm, mrope_cos_sin + rotate-half, the SwiGLU MLP, and
a whole TextAttention with its contiguous KVCache (prefill, then decode).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from blip3o_engine.config import TextConfig
from blip3o_engine.models import qwen2_5_vl as qwen
from blip3o_engine import ops
from blip3o_engine.ops.attention import DenseAttention, causal_mask
from blip3o_engine.ops import force_triton
from _kernel_util import randomized  # tests/kernels is on sys.path under pytest

CPU_DTYPES = [torch.float32, torch.float16]
EPS = 1e-6  # TextConfig.rms_norm_eps


def _randn(g: torch.Generator, *shape, dtype=torch.float32, device="cpu", std=1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)


def assert_close_to_ref(out: torch.Tensor, ref: torch.Tensor, oracle: torch.Tensor, ulps: float = 8,
                        half_factor: float = 2.0, min_identical: float | None = None) -> None:
    """Kernel output vs the reference (same inputs) and vs an fp32 oracle (the ref on upcast inputs).

    fp32: kernel and ref differ in summation order and the last ulp of rsqrt/exp only: within `ulps`
    fp32 ulps of the largest |ref|. Half precision (docs/ARCHITECTURE.md §7.9): the kernel's error against the
    fp32 oracle is at most `half_factor` times the reference's own error; `min_identical` (elementwise
    ops that round where the reference rounds) also asks that fraction of elements to be bit-identical.
    """
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.is_contiguous()
    if out.dtype == torch.float32:
        tol = ulps * torch.finfo(torch.float32).eps * ref.abs().max().item()
        err = (out - ref).abs().max().item()
        assert err <= tol, f"fp32 max error {err:.3g} > {tol:.3g}"
        return
    err = (out.float() - oracle).abs().max().item()
    ref_err = (ref.float() - oracle).abs().max().item()
    assert err <= half_factor * ref_err, (
        f"{out.dtype}: kernel error {err:.3g} > {half_factor} x ref error {ref_err:.3g}")
    if min_identical is not None:
        identical = (out == ref).float().mean().item()
        assert identical >= min_identical, f"{out.dtype}: only {identical:.2%} of elements equal the reference"


# ------------------------------------------------------------------------------------------------
# A paged batch


@dataclass
class PagedBatch:
    """S sequences in a paged cache. Sequence s holds context_lens[s] tokens, the last q_lens[s] of which
    are "new" (their queries are q); keys/values `[n, Hkv, d]` per sequence are kept contiguous too."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # int32 [S, max_blocks], -1 padded
    context_lens: torch.Tensor  # int32 [S]
    cu_seqlens_q: torch.Tensor  # int32 [S + 1]
    q: torch.Tensor  # [sum(q_lens), Hq, d]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    q_full: list[torch.Tensor]  # per sequence, queries of *all* its tokens [n, Hq, d]; q holds the tails


def make_batch(lens: list[int], q_lens: list[int], block_size: int, hq: int, hkv: int, d: int,
               dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> PagedBatch:
    g = torch.Generator().manual_seed(seed)
    blocks = [-(-n // block_size) for n in lens]
    num_blocks = sum(blocks) + 3  # spare blocks, never referenced
    physical = torch.randperm(num_blocks, generator=g)[:sum(blocks)].tolist()  # shuffled, not contiguous
    block_tables = torch.full((len(lens), max(blocks) + 1), -1, dtype=torch.int32)
    # NaN everywhere that no sequence owns: a read past a context (or of a spare block) shows up as NaN.
    k_cache = torch.full((num_blocks, block_size, hkv, d), float("nan"), dtype=dtype, device=device)
    v_cache = k_cache.clone()
    keys, values, q_full = [], [], []
    it = iter(physical)
    for s, n in enumerate(lens):
        block_tables[s, :blocks[s]] = torch.tensor([next(it) for _ in range(blocks[s])], dtype=torch.int32)
        k, v = _randn(g, n, hkv, d, dtype=dtype, device=device), _randn(g, n, hkv, d, dtype=dtype, device=device)
        slots = torch.tensor([int(block_tables[s, i // block_size]) * block_size + i % block_size for i in range(n)])
        ops.write_kv_cache_ref(k, v, k_cache, v_cache, slots.to(device))
        keys.append(k), values.append(v)
        q_full.append(_randn(g, n, hq, d, dtype=dtype, device=device))
    q = torch.cat([qf[n - ql:] for qf, n, ql in zip(q_full, lens, q_lens)])
    cu = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32, device=device)
    return PagedBatch(k_cache, v_cache, block_tables.to(device), torch.tensor(lens, dtype=torch.int32, device=device),
                      cu, q, keys, values, q_full)


def _upcast_batch(b: PagedBatch) -> tuple:
    return b.k_cache.float(), b.v_cache.float()


# (block_size, Hq, Hkv, d): group 2 and block 4 (many blocks per sequence, a key tile spans 8 blocks);
# group 7 (the 7B/8B's 28/4) with one KV head and block 16; group 8 (the 3B/4B's 16/2) at head_dim 128.
CONFIGS = [(4, 4, 2, 32), (16, 7, 1, 16), (16, 16, 2, 128)]
# Context lengths ending mid-block and crossing the kernels' 32-key tiles; prefill q_lens: a one-token
# sequence, a prefix-cached one (4 cached + 3 new), and a full 37-token prompt (two query tiles).
LENS, Q_LENS = [1, 7, 37], [1, 3, 37]
TINY_LENS, TINY_Q_LENS = [1, 5, 17], [1, 2, 17]  # head_dim 128: the interpreter's cost grows with d


def _lens(cfg) -> tuple[list[int], list[int]]:
    return (TINY_LENS, TINY_Q_LENS) if cfg[3] == 128 else (LENS, Q_LENS)


# ------------------------------------------------------------------------------------------------
# write_kv_cache


@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_write_kv_cache(dtype, slot_dtype, launches):
    """Shuffled slots, two padding tokens (-1) whose rows must land nowhere, strided k/v (slices of one
    fused qkv projection): the kernel's caches equal the ref's exactly (a copy)."""
    g = torch.Generator().manual_seed(0)
    t, hkv, d, block_size, num_blocks = 9, 2, 32, 4, 5
    qkv = _randn(g, t, 6, d, dtype=dtype)  # [T, Hq + 2 Hkv, d], Hq = 2
    k, v = qkv[:, 2:4], qkv[:, 4:6]
    slots = torch.randperm(num_blocks * block_size, generator=g)[:t]
    slots[[2, 6]] = -1
    caches = [torch.full((num_blocks, block_size, hkv, d), -7.0, dtype=dtype) for _ in range(4)]
    ops.write_kv_cache_ref(k, v, caches[0], caches[1], slots.to(slot_dtype))
    with force_triton():
        ops.write_kv_cache(k, v, caches[2], caches[3], slots.to(slot_dtype))
    assert launches == {"write_kv_cache_kernel": 1}
    assert torch.equal(caches[2], caches[0]) and torch.equal(caches[3], caches[1])
    flat_k = caches[2].view(-1, hkv, d)
    keep = slots >= 0
    assert torch.equal(flat_k[slots[keep]], k[keep])
    assert (flat_k == -7).all(-1).all(-1).sum() == num_blocks * block_size - int(keep.sum())  # padding wrote nothing


# ------------------------------------------------------------------------------------------------
# Attention kernels vs refs

# Attention in half precision: the kernel rounds the softmax probabilities to the dtype before P·V (as
# flash attention does), the CPU reference keeps them in fp32 inside SDPA; that extra rounding
# (relative 2^-11 per probability, averaging out over the keys) can add about one more output ulp to
# the reference's own error, the final rounding (<= half an ulp): hence 3x, not 2x (measured: <= 1.7x).
# fp32 tolerance 16 ulps: the online softmax rescales the accumulator once per 32-key step (measured: 4.5).
ATTN_HALF_FACTOR = 3.0


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_paged_prefill_attention(cfg, dtype, launches):
    lens, q_lens = _lens(cfg)
    b = make_batch(lens, q_lens, *cfg, dtype)
    scale = cfg[3] ** -0.5
    args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q, b.context_lens, scale)
    with force_triton():
        out = ops.paged_prefill_attention(*args)
    assert launches == {"paged_prefill_kernel": 1}
    assert not out.isnan().any()  # no slot outside a context was read
    ref = ops.paged_prefill_attention_ref(*args)
    oracle = ops.paged_prefill_attention_ref(b.q.float(), *_upcast_batch(b), *args[3:])
    assert_close_to_ref(out, ref, oracle, ulps=16, half_factor=ATTN_HALF_FACTOR)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_paged_decode_attention(cfg, dtype, launches):
    lens, _ = _lens(cfg)
    b = make_batch(lens, [1] * len(lens), *cfg, dtype)
    scale = cfg[3] ** -0.5
    args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.context_lens, scale)
    with force_triton():
        out = ops.paged_decode_attention(*args)
    assert launches == {"paged_decode_kernel": 1}
    assert not out.isnan().any()
    ref = ops.paged_decode_attention_ref(*args)
    oracle = ops.paged_decode_attention_ref(b.q.float(), *_upcast_batch(b), *args[3:])
    assert_close_to_ref(out, ref, oracle, ulps=16, half_factor=ATTN_HALF_FACTOR)  # as prefill


def _full_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The model's attention over one whole contiguous sequence: q `[n, Hq, d]`, k, v `[n, Hkv, d]` ->
    `[n, Hq, d]` through ops.attention.causal_mask and SDPA, as the dense backend computes it (no cache)."""
    n, group = q.shape[0], q.shape[1] // k.shape[1]
    mask = causal_mask(0, n, None, q.device)  # [1, 1, n, n]
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.repeat_interleave(group, 1).transpose(0, 1)[None],
                                         v.repeat_interleave(group, 1).transpose(0, 1)[None], attn_mask=mask)
    return out[0].transpose(0, 1)


def test_prefix_cached_prefill_and_decode_equal_full_attention(launches):
    """Prefill of the last q_len tokens over a cached prefix = the last q_len rows of causal attention over
    the whole sequence; decode = its last row (fp32; 16 ulps as in the kernel tests)."""
    cfg = CONFIGS[0]
    b = make_batch(LENS, Q_LENS, *cfg, torch.float32)
    scale = cfg[3] ** -0.5
    with force_triton():
        prefill = ops.paged_prefill_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q,
                                              b.context_lens, scale)
        last_q = torch.stack([qf[-1] for qf in b.q_full])  # [S, Hq, d]
        decode = ops.paged_decode_attention(last_q, b.k_cache, b.v_cache, b.block_tables, b.context_lens, scale)
    full = [_full_causal(qf, k, v) for qf, k, v in zip(b.q_full, b.keys, b.values)]
    expected = torch.cat([f[n - ql:] for f, n, ql in zip(full, LENS, Q_LENS)])
    tol = 16 * torch.finfo(torch.float32).eps
    torch.testing.assert_close(prefill, expected, rtol=0, atol=tol * expected.abs().max().item())
    expected_last = torch.stack([f[-1] for f in full])
    torch.testing.assert_close(decode, expected_last, rtol=0, atol=tol * expected_last.abs().max().item())


def test_paged_attention_edge_cases(launches):
    """A sequence with no new tokens between two others (prefill), and a zero context (decode: zeros, as
    the ref), in one batch each; and a batch whose new tokens straddle many query tiles of one sequence."""
    cfg = (4, 4, 2, 32)
    b = make_batch([6, 9, 3], [2, 0, 3], *cfg, torch.float32)
    args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q, b.context_lens, 0.2)
    with force_triton():
        out = ops.paged_prefill_attention(*args)
    torch.testing.assert_close(out, ops.paged_prefill_attention_ref(*args), rtol=1e-6, atol=1e-6)

    b = make_batch([5, 1, 7], [1, 1, 1], *cfg, torch.float32)
    lens = b.context_lens.clone()
    lens[1] = 0
    args = (b.q, b.k_cache, b.v_cache, b.block_tables, lens, 0.2)
    with force_triton():
        out = ops.paged_decode_attention(*args)
    assert (out[1] == 0).all()
    torch.testing.assert_close(out, ops.paged_decode_attention_ref(*args), rtol=1e-6, atol=1e-6)
    assert launches == {"paged_prefill_kernel": 1, "paged_decode_kernel": 1}


# ------------------------------------------------------------------------------------------------
# Norms, M-RoPE, SiLU-and-mul vs refs

# (T, H): 3584 is the 7B/8B hidden size (a masked tail in the 4096 block); 60 a small odd width.
NORM_SHAPES = [(5, 60), (2, 3584)]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
def test_rms_norms(shape, dtype, launches):
    g = torch.Generator().manual_seed(0)
    t, h = shape
    x = _randn(g, t, 2 * h, dtype=dtype, std=2.0)[:, :h]  # token stride 2H: a slice of a wider buffer
    residual = _randn(g, t, h, dtype=dtype, std=3.0)
    weight = (_randn(g, h, std=0.3) + 1).to(dtype)
    with force_triton():
        normed, new_res = ops.fused_add_rms_norm(x, residual, weight, EPS)
        plain = ops.rms_norm(x, weight, EPS)
    assert launches == {"rms_norm_kernel": 2}
    ref_normed, ref_res = ops.fused_add_rms_norm_ref(x, residual, weight, EPS)
    assert torch.equal(new_res, ref_res)  # one rounded add, as the ref
    o_normed, _ = ops.fused_add_rms_norm_ref(x.float(), residual.float(), weight.float(), EPS)
    # Elementwise after one reduction: rounding where the ref rounds, so >= 99% bit-identical in half
    # precision (rest: rsqrt / summation-order last-ulp flips) and 8 fp32 ulps (see assert_close_to_ref).
    assert_close_to_ref(normed, ref_normed, o_normed, min_identical=0.99)
    ref_plain = ops.rms_norm_ref(x, weight, EPS)
    assert_close_to_ref(plain, ref_plain, ops.rms_norm_ref(x.float(), weight.float(), EPS), min_identical=0.99)


def _mrope_inputs(t_text: int, hq: int, hkv: int, d: int, dtype: torch.dtype, device: str = "cpu"):
    """A prompt text-image-text (image grid 1x4x6 patches, merge 2: 6 tokens with distinct t/h/w
    positions), q and k as slices of one fused qkv projection, positions from get_mrope_positions."""
    image_id = 99
    ids = [1] * t_text + [image_id] * 6 + [2] * 3
    positions, _ = qwen.get_mrope_positions(ids, [(1, 4, 6)], image_id, 2)  # [3, T] int64
    g = torch.Generator().manual_seed(0)
    qkv = _randn(g, len(ids), hq + 2 * hkv, d, dtype=dtype, device=device, std=2.0)
    return qkv[:, :hq], qkv[:, hq:hq + hkv], positions.to(device)


# (Hq, Hkv, d, mrope_section): Qwen2.5-VL's sections at head_dim 128 with the 7B/8B heads; a small case.
MROPE_CONFIGS = [(28, 4, 128, (16, 24, 24)), (4, 2, 32, (4, 6, 6))]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("cfg", MROPE_CONFIGS, ids=str)
def test_mrope_rotary(cfg, dtype, launches):
    hq, hkv, d, section = cfg
    q, k, positions = _mrope_inputs(4, hq, hkv, d, dtype)
    cache = ops.rope_cos_sin_cache(d, 1e6, 64)
    with force_triton():
        q_rot, k_rot = ops.mrope_rotary(q, k, positions, cache, section)
    assert launches == {"mrope_kernel": 1}
    ref_q, ref_k = ops.mrope_rotary_ref(q, k, positions, cache, section)
    o_q, o_k = ops.mrope_rotary_ref(q.float(), k.float(), positions, cache, section)
    # Same rounding points as the ref (cos/sin, both products, the sum): fp32 and fp16 bit-identical
    # up to the fp32 sum's association, within 2 ulps.
    assert_close_to_ref(q_rot, ref_q, o_q, ulps=2, min_identical=0.99)
    assert_close_to_ref(k_rot, ref_k, o_k, ulps=2, min_identical=0.99)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_silu_and_mul(dtype, launches):
    g = torch.Generator().manual_seed(0)
    gate_up = _randn(g, 2, 3, 2 * 84, dtype=dtype, std=3.0)
    with force_triton():
        out = ops.silu_and_mul(gate_up)
    assert launches == {"swiglu_kernel": 1}
    # SiLU in fp32 rounded, then the rounded product: where the ref rounds (see assert_close_to_ref).
    assert_close_to_ref(out, ops.silu_and_mul_ref(gate_up), ops.silu_and_mul_ref(gate_up.float()),
                        min_identical=0.99)


# ------------------------------------------------------------------------------------------------
# The refs equal models/qwen2_5_vl.py


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_refs_equal_model_pieces(dtype):
    """The model's pieces over the ops: RMSNorm, the layer's fused residual + norm (x + r == r + x), the MLP on
    a fused gate/up GEMM, and M-RoPE looked up in the kernels' table vs computed from the positions (the dense
    forward's way): bit for bit."""
    g = torch.Generator().manual_seed(3)
    cfg = TextConfig(hidden_size=128, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                     mrope_section=(4, 6, 6), num_hidden_layers=1, vocab_size=64)
    x, residual = _randn(g, 7, 128, dtype=dtype), _randn(g, 7, 128, dtype=dtype)
    with torch.no_grad():
        norm = randomized(qwen.RMSNorm(128, EPS), dtype, 1)
        assert torch.equal(ops.rms_norm_ref(x, norm.weight, EPS), norm(x))
        normed, new_res = ops.fused_add_rms_norm_ref(x, residual, norm.weight, EPS)
        assert torch.equal(new_res, residual + x) and torch.equal(normed, norm(residual + x))

        mlp = randomized(qwen.SwiGLU(128, 96, bias=False), dtype, 2)
        gate_up = F.linear(x, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))  # [T, 2I], fused weight
        assert torch.equal(mlp.down_proj(ops.silu_and_mul_ref(gate_up)), mlp(x))

    q, k, positions = _mrope_inputs(4, 4, 2, cfg.head_dim, dtype)
    inv_freq = qwen.rope_inv_freq(cfg.head_dim, cfg.rope_theta)
    cos, sin = ops.mrope_cos_sin_from_freqs(positions, inv_freq, cfg.mrope_section, dtype)  # [T, 1, d]
    cache = ops.rope_cos_sin_cache(cfg.head_dim, cfg.rope_theta, 64)
    q_rot, k_rot = ops.mrope_rotary_ref(q, k, positions, cache, cfg.mrope_section)
    assert torch.equal(q_rot, q * cos + ops.rotate_half(q) * sin)
    assert torch.equal(k_rot, k * cos + ops.rotate_half(k) * sin)


def test_refs_equal_text_attention():
    """A whole TextAttention through the refs on a paged cache — qkv projections, mrope_rotary_ref,
    write_kv_cache_ref, paged_prefill_attention_ref (prompt), paged_decode_attention_ref (two steps), o_proj —
    equals the model's layer with its contiguous KVCache. fp32; not bitwise: the SDPA calls see different
    shapes (so different blockings), a few ulps apart, and o_proj then sums 128 such values: within 32
    ulps of the largest output (measured: 9)."""
    cfg = TextConfig(hidden_size=128, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                     mrope_section=(4, 6, 6), num_hidden_layers=1, vocab_size=64)
    hq, hkv, d, block_size = 4, 2, 32, 4
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        attn = randomized(qwen.TextAttention(cfg, 0), torch.float32, 6)
        q_, k_, positions = _mrope_inputs(3, hq, hkv, d, torch.float32)  # positions of a 12-token prompt
        n = positions.shape[1]
        # The prompt, then two decode steps at the next text positions (rope_delta applied).
        steps = [(positions, _randn(g, n, 128))] + [
            (torch.full((3, 1), int(positions.max()) + 1 + i), _randn(g, 1, 128)) for i in range(2)]
        cache = qwen.KVCache(1)
        k_cache = torch.full((6, block_size, hkv, d), float("nan"))
        v_cache = k_cache.clone()
        block_table = torch.tensor([[4, 1, 5, 0]], dtype=torch.int32)
        table = ops.rope_cos_sin_cache(d, cfg.rope_theta, 64)
        inv_freq = qwen.rope_inv_freq(d, cfg.rope_theta)
        done = 0
        for pos, x in steps:
            length = x.shape[0]
            dense = DenseAttention(pos[:, None], inv_freq, cfg.mrope_section, torch.float32, cache)
            expected = attn(x[None], dense)[0]  # [L, H]: the model's layer with its contiguous cache

            q = attn.q_proj(x).view(length, hq, d)
            k, v = attn.k_proj(x).view(length, hkv, d), attn.v_proj(x).view(length, hkv, d)
            q, k = ops.mrope_rotary_ref(q, k, pos, table, cfg.mrope_section)
            slots = torch.tensor([int(block_table[0, i // block_size]) * block_size + i % block_size
                                  for i in range(done, done + length)])
            ops.write_kv_cache_ref(k, v, k_cache, v_cache, slots)
            done += length
            lens = torch.tensor([done], dtype=torch.int32)
            if length > 1:
                cu = torch.tensor([0, length], dtype=torch.int32)
                out = ops.paged_prefill_attention_ref(q, k_cache, v_cache, block_table, cu, lens, d ** -0.5)
            else:
                out = ops.paged_decode_attention_ref(q, k_cache, v_cache, block_table, lens, d ** -0.5)
            got = attn.o_proj(out.reshape(length, -1))
            tol = 32 * torch.finfo(torch.float32).eps * expected.abs().max().item()
            torch.testing.assert_close(got, expected, rtol=0, atol=tol)
        assert cache.length == done


# ------------------------------------------------------------------------------------------------
# Dispatch, validation, custom ops


def test_cpu_dispatch_uses_the_reference(launches):
    """Without forcing, CPU tensors take the reference path: no launch, results identical to the refs."""
    b = make_batch([3, 6], [3, 2], 4, 4, 2, 16, torch.float32)
    args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q, b.context_lens, 0.25)
    assert torch.equal(ops.paged_prefill_attention(*args), ops.paged_prefill_attention_ref(*args))
    x = torch.randn(3, 16)
    assert torch.equal(ops.rms_norm(x, x[0], EPS), ops.rms_norm_ref(x, x[0], EPS))
    assert torch.equal(ops.silu_and_mul(x), ops.silu_and_mul_ref(x))
    assert sum(launches.values()) == 0


def test_empty_inputs(launches):
    """Zero tokens: empty results without a (zero-sized) launch."""
    b = make_batch([3], [1], 4, 4, 2, 16, torch.float32)
    q = b.q[:0]
    with force_triton():
        assert ops.paged_decode_attention(q, b.k_cache, b.v_cache, b.block_tables[:0], b.context_lens[:0],
                                          0.25).shape == (0, 4, 16)
        ops.write_kv_cache(q[:, :2], q[:, :2], b.k_cache, b.v_cache, torch.zeros(0, dtype=torch.int64))
        assert ops.rms_norm(torch.zeros(0, 8), torch.ones(8), EPS).shape == (0, 8)
        assert ops.silu_and_mul(torch.zeros(0, 8)).shape == (0, 4)
    assert sum(launches.values()) == 0


def test_validation_errors():
    b = make_batch([3, 6], [3, 2], 4, 4, 2, 16, torch.float32)
    kc, vc, bt, cu, lens = b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q, b.context_lens
    with pytest.raises(ValueError, match="power of two"):
        cache24 = torch.zeros(3, 4, 2, 24)
        ops.paged_decode_attention(torch.zeros(2, 4, 24), cache24, cache24, bt, lens, 1.0)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        ops.paged_decode_attention(torch.zeros(2, 3, 16), kc, vc, bt, lens, 1.0)
    with pytest.raises(ValueError, match="context_lens must be"):
        ops.paged_decode_attention(b.q[:2], kc, vc, bt, lens.long(), 1.0)
    with pytest.raises(ValueError, match="block_tables must be"):
        ops.paged_prefill_attention(b.q, kc, vc, bt[:1], cu, lens, 1.0)
    with pytest.raises(ValueError, match="v_cache is torch.float16"):
        ops.paged_prefill_attention(b.q, kc, vc.half(), bt, cu, lens, 1.0)
    with pytest.raises(ValueError, match="slot_mapping must be"):
        ops.write_kv_cache(b.keys[0], b.values[0], kc, vc, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="residual .* must match"):
        ops.fused_add_rms_norm(torch.zeros(3, 8), torch.zeros(2, 8), torch.ones(8), EPS)
    q, k, positions = _mrope_inputs(2, 4, 2, 32, torch.float32)
    with pytest.raises(ValueError, match="mrope_section"):
        ops.mrope_rotary(q, k, positions, ops.rope_cos_sin_cache(32, 1e6, 64), (4, 6, 5))
    with pytest.raises(ValueError, match="cos_sin_cache must be"):
        ops.mrope_rotary(q, k, positions, ops.rope_cos_sin_cache(32, 1e6, 64).double(), (4, 6, 6))
    with pytest.raises(ValueError, match="last dim must be even"):
        ops.silu_and_mul(torch.zeros(2, 5))


def _small_op_args() -> dict[str, tuple]:
    b = make_batch([3, 6], [3, 2], 4, 4, 2, 16, torch.float32)
    q, k, positions = _mrope_inputs(2, 4, 2, 32, torch.float32)
    x = torch.randn(3, 24)
    return {
        "write_kv_cache": (b.keys[1], b.values[1], b.k_cache.nan_to_num(), b.v_cache.nan_to_num(),
                           torch.arange(6, dtype=torch.int64)),
        "paged_decode_attention": (b.q[:2], b.k_cache, b.v_cache, b.block_tables, b.context_lens, 0.25),
        "paged_prefill_attention": (b.q, b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q, b.context_lens, 0.25),
        "rms_norm": (x, x[0], EPS),
        "fused_add_rms_norm": (x, x * 2, x[0], EPS),
        "mrope_rotary": (q, k, positions, ops.rope_cos_sin_cache(32, 1e6, 64), [4, 6, 6]),
        "swiglu": (x[:, :12], x[:, 12:]),  # silu_and_mul's kernel: the two halves of one fused projection
    }


@pytest.mark.parametrize("case", list(_small_op_args()))
def test_opcheck(case, interpreted):
    """torch.library.opcheck: schema (incl. write_kv_cache's declared mutation), fake impl vs real outputs,
    AOT dispatch."""
    torch.library.opcheck(getattr(torch.ops.blip3o, case).default, _small_op_args()[case])


def test_torch_compile_fullgraph(launches):
    """A decode attention block (norm, rope, cache write, attention, MLP) traces into one graph through the
    fake impls and runs the same kernels as eager."""
    b = make_batch([3, 6], [1, 1], 4, 4, 2, 16, torch.float32)
    positions = (b.context_lens - 1).long().expand(3, 2)
    table = ops.rope_cos_sin_cache(16, 1e6, 64)
    slots = torch.tensor([int(b.block_tables[s, (n - 1) // 4]) * 4 + (n - 1) % 4 for s, n in enumerate([3, 6])])

    def block(x, residual, w, k_cache, v_cache):
        h, residual = ops.fused_add_rms_norm(x, residual, w, EPS)
        qkv = h.view(2, 8, 16)
        q, k = ops.mrope_rotary(qkv[:, :4], qkv[:, 4:6], positions, table, (2, 3, 3))
        ops.write_kv_cache(k, qkv[:, 6:], k_cache, v_cache, slots)
        attn = ops.paged_decode_attention(q, k_cache, v_cache, b.block_tables, b.context_lens, 0.25)
        return ops.silu_and_mul(attn.flatten(1)) + residual[:, :32]

    g = torch.Generator().manual_seed(0)
    x, residual, w = _randn(g, 2, 128), _randn(g, 2, 128), _randn(g, 128)
    caches = [b.k_cache.nan_to_num(), b.v_cache.nan_to_num()]
    with force_triton():
        eager = block(x, residual, w, *[c.clone() for c in caches])
        compiled_caches = [c.clone() for c in caches]
        compiled = torch.compile(block, backend="aot_eager", fullgraph=True)(x, residual, w, *compiled_caches)
    assert sum(launches.values()) == 2 * 5
    assert torch.equal(compiled, eager)
    assert not torch.equal(compiled_caches[0], caches[0])  # the cache write happened under compile too


# ------------------------------------------------------------------------------------------------
# GPU: compiled kernels at bf16 (and fp32), CUDA graphs


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("cfg", [(16, 28, 4, 128), (16, 16, 2, 128), (4, 7, 1, 64)], ids=str)
def test_gpu_attention_vs_ref(cfg, dtype):
    lens, q_lens = [1, 17, 300], [1, 5, 300]
    b = make_batch(lens, q_lens, *cfg, dtype, device="cuda")
    scale = cfg[3] ** -0.5
    args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q, b.context_lens, scale)
    out = ops.paged_prefill_attention(*args)  # CUDA tensors dispatch to Triton without forcing
    oracle = ops.paged_prefill_attention_ref(b.q.float(), *_upcast_batch(b), *args[3:])
    # fp32 on the GPU: TF32 is off (ieee dots) but exp is ex2.approx: 1e-5 relative to the output scale.
    # bf16: kernel vs fp32 oracle within 3x the bf16 ref's own error (as ATTN_HALF_FACTOR).
    assert_close_to_ref(out, ops.paged_prefill_attention_ref(*args), oracle, ulps=100, half_factor=ATTN_HALF_FACTOR)
    dec = make_batch(lens, [1, 1, 1], *cfg, dtype, device="cuda")
    dargs = (dec.q, dec.k_cache, dec.v_cache, dec.block_tables, dec.context_lens, scale)
    doracle = ops.paged_decode_attention_ref(dec.q.float(), *_upcast_batch(dec), *dargs[3:])
    assert_close_to_ref(ops.paged_decode_attention(*dargs), ops.paged_decode_attention_ref(*dargs), doracle, ulps=100,
                        half_factor=ATTN_HALF_FACTOR)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_elementwise_vs_ref(dtype):
    g = torch.Generator().manual_seed(0)
    x, res = _randn(g, 64, 3584, dtype=dtype, device="cuda"), _randn(g, 64, 3584, dtype=dtype, device="cuda")
    w = (_randn(g, 3584, std=0.3) + 1).to(dtype=dtype, device="cuda")
    normed, new_res = ops.fused_add_rms_norm(x, res, w, EPS)
    ref_n, ref_r = ops.fused_add_rms_norm_ref(x, res, w, EPS)
    assert torch.equal(new_res, ref_r)
    assert_close_to_ref(normed, ref_n, ops.fused_add_rms_norm_ref(x.float(), res.float(), w.float(), EPS)[0],
                        min_identical=0.99)
    q, k, positions = _mrope_inputs(40, 28, 4, 128, dtype, device="cuda")
    table = ops.rope_cos_sin_cache(128, 1e6, 256, device="cuda")
    got = ops.mrope_rotary(q, k, positions, table, (16, 24, 24))
    ref = ops.mrope_rotary_ref(q, k, positions, table, (16, 24, 24))
    oracle = ops.mrope_rotary_ref(q.float(), k.float(), positions, table, (16, 24, 24))
    for a, r, o in zip(got, ref, oracle):
        assert_close_to_ref(a, r, o, ulps=2, min_identical=0.99)
    gate_up = _randn(g, 64, 2 * 1000, dtype=dtype, device="cuda", std=3.0)
    assert_close_to_ref(ops.silu_and_mul(gate_up), ops.silu_and_mul_ref(gate_up),
                        ops.silu_and_mul_ref(gate_up.float()), min_identical=0.99)


@pytest.mark.gpu
def test_gpu_decode_cuda_graph():
    """Cache write + decode attention capture into a CUDA graph; a replay with new inputs equals eager."""
    b = make_batch([9, 40], [1, 1], 16, 28, 4, 128, torch.bfloat16, device="cuda")
    g = torch.Generator().manual_seed(1)
    k_new, v_new = _randn(g, 2, 4, 128, dtype=torch.bfloat16, device="cuda"), _randn(g, 2, 4, 128, dtype=torch.bfloat16,
                                                                                      device="cuda")
    slots = torch.tensor([int(b.block_tables[s, (n - 1) // 16]) * 16 + (n - 1) % 16 for s, n in enumerate([9, 40])],
                         device="cuda")

    def step(q, k, v):
        ops.write_kv_cache(k, v, b.k_cache, b.v_cache, slots)
        return ops.paged_decode_attention(q, b.k_cache, b.v_cache, b.block_tables, b.context_lens, 128 ** -0.5)

    static = [b.q.clone(), k_new.clone(), v_new.clone()]
    step(*static)  # warm-up compiles the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(*static)
    for s in static:
        s.copy_(_randn(g, *s.shape, dtype=s.dtype, device="cuda"))
    graph.replay()
    assert torch.equal(out, step(*static))
