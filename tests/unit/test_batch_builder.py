"""Tests of the C++ per-step batch builder (`blip3o_engine.native.BatchBuilder`).

A hypothesis test builds random ragged batches and compares every output array with a
straightforward Python implementation of the documented layout; unit tests pin the views'
zero-copy and read-only behaviour, the error paths, and agreement with get_mrope_positions.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blip3o_engine.models.qwen2_5_vl import get_mrope_positions
from blip3o_engine.native import BatchBuilder

FIELDS = ("block_tables", "slot_mapping", "positions", "cu_seqlens_q", "context_lens", "last_token_indices")


def reference_batch(block_size: int, max_blocks: int, seqs: list[dict]) -> dict[str, np.ndarray]:
    """The documented layout, one token at a time."""
    tables, slots, positions, cu, ctx, last = [], [], [[], [], []], [0], [], []
    for s in seqs:
        blocks, c, n = s["blocks"], s["computed"], s["new"]
        pos, delta = s.get("positions"), s.get("delta", 0)
        tables.append(list(blocks) + [-1] * (max_blocks - len(blocks)))
        for p in range(c, c + n):
            slots.append(blocks[p // block_size] * block_size + p % block_size)
            for axis in range(3):
                positions[axis].append(int(pos[axis][p]) if pos is not None and p < pos.shape[1] else p + delta)
        cu.append(cu[-1] + n)
        ctx.append(c + n)
        last.append(cu[-1] - 1)
    i32 = np.int32
    return {
        "block_tables": np.array(tables, dtype=i32).reshape(len(seqs), max_blocks),
        "slot_mapping": np.array(slots, dtype=i32),
        "positions": np.array(positions, dtype=i32).reshape(3, len(slots)),
        "cu_seqlens_q": np.array(cu, dtype=i32),
        "context_lens": np.array(ctx, dtype=i32),
        "last_token_indices": np.array(last, dtype=i32),
    }


def assert_matches(b: BatchBuilder, want: dict[str, np.ndarray]) -> None:
    for name in FIELDS:
        got = getattr(b, name)
        assert got.dtype == np.int32, name
        np.testing.assert_array_equal(got, want[name], err_msg=name)
    assert b.num_seqs == len(want["context_lens"])
    assert b.num_tokens == len(want["slot_mapping"])
    assert b.max_query_len == int(np.diff(want["cu_seqlens_q"]).max(initial=0))
    assert b.max_context_len == int(want["context_lens"].max(initial=0))


@st.composite
def batches(draw):
    block_size = draw(st.integers(1, 8))
    max_blocks = draw(st.integers(1, 12))
    n_seqs = draw(st.integers(0, 6))
    pool = draw(st.permutations(range(n_seqs * max_blocks + 3)))  # distinct ids across the batch
    seqs = []
    for i in range(n_seqs):
        computed = draw(st.integers(0, block_size * max_blocks - 1))
        new = draw(st.integers(1, block_size * max_blocks - computed))
        need = -(-(computed + new) // block_size)
        n_blocks = draw(st.integers(need, max_blocks))
        seq = {"blocks": pool[i * max_blocks:i * max_blocks + n_blocks], "computed": computed, "new": new}
        if draw(st.booleans()):  # an image-bearing prompt: explicit positions, then a delta
            plen = draw(st.integers(0, computed + new + 3))
            seq["positions"] = np.array(draw(st.lists(st.integers(0, 500), min_size=3 * plen, max_size=3 * plen)),
                                        dtype=np.int64).reshape(3, plen)
        seq["delta"] = draw(st.integers(-50, 50))
        seqs.append(seq)
    return block_size, max_blocks, seqs


@settings(max_examples=150, deadline=None)
@given(batches())
def test_random_batches_match_reference(batch):
    block_size, max_blocks, seqs = batch
    b = BatchBuilder(block_size, max_num_seqs=8, max_num_tokens=sum(s["new"] for s in seqs) + 5,
                     max_blocks_per_seq=max_blocks)
    want = reference_batch(block_size, max_blocks, seqs)
    b.build([s["blocks"] for s in seqs], [s["computed"] for s in seqs], [s["new"] for s in seqs],
            [s.get("positions") for s in seqs], [s["delta"] for s in seqs])
    assert_matches(b, want)
    # add_sequence one at a time builds the same batch, and a rebuild starts from scratch.
    b.build([[0]], [0], [1])
    b.clear()
    for s in seqs:
        b.add_sequence(np.array(s["blocks"], dtype=np.int32), s["computed"], s["new"], s.get("positions"), s["delta"])
    assert_matches(b, want)


def test_small_batch_by_hand():
    b = BatchBuilder(block_size=4, max_num_seqs=4, max_num_tokens=16, max_blocks_per_seq=3)
    # seq 0: decode of token 5 (block 3 holds tokens 4..7); seq 1: prefill of 3 tokens in block 2.
    b.build([[7, 3], [2]], num_computed_tokens=[5, 0], num_new_tokens=[1, 3])
    assert b.block_tables.tolist() == [[7, 3, -1], [2, -1, -1]]
    assert b.slot_mapping.tolist() == [3 * 4 + 1, 8, 9, 10]
    assert b.positions.tolist() == [[5, 0, 1, 2]] * 3
    assert b.cu_seqlens_q.tolist() == [0, 1, 4]
    assert b.context_lens.tolist() == [6, 3]
    assert b.last_token_indices.tolist() == [0, 3]
    assert (b.max_query_len, b.max_context_len) == (3, 6)


def test_views_are_zero_copy_read_only_and_keep_the_builder_alive():
    b = BatchBuilder(2, 2, 8, 2)
    b.build([[0, 1]], [0], [3])
    view = b.slot_mapping
    assert np.shares_memory(view, b.slot_mapping)  # both views look at the builder's buffer
    assert not view.flags.writeable
    with pytest.raises(ValueError):
        view[0] = 1
    positions = b.positions
    assert positions.strides == (8 * 4, 4)  # [3, T] over a [3, max_num_tokens] buffer, no copy
    b.build([[1, 0]], [0], [3])  # a new batch shows through an old view of the same size
    assert view.tolist() == [2, 3, 0]
    del b
    gc.collect()
    assert view.tolist() == [2, 3, 0]  # the view still owns a reference to the builder


def test_empty_batch():
    b = BatchBuilder(4, 2, 8, 3)
    b.build([], [], [])
    assert b.block_tables.shape == (0, 3) and b.positions.shape == (3, 0)
    assert b.cu_seqlens_q.tolist() == [0]
    assert (b.num_seqs, b.num_tokens, b.max_query_len, b.max_context_len) == (0, 0, 0, 0)


@pytest.mark.parametrize("kwargs, match", [
    ({"block_ids": [0], "num_computed_tokens": 0, "num_new_tokens": 0}, "num_new_tokens must be >= 1"),
    ({"block_ids": [0], "num_computed_tokens": -1, "num_new_tokens": 1}, "num_computed_tokens must be >= 0"),
    ({"block_ids": [0], "num_computed_tokens": 3, "num_new_tokens": 2}, "cannot hold 5 tokens"),
    ({"block_ids": [0, 1, 2, 3], "num_computed_tokens": 0, "num_new_tokens": 1}, "exceed max_blocks_per_seq"),
    ({"block_ids": [0, -1], "num_computed_tokens": 0, "num_new_tokens": 5}, "block id -1"),
    ({"block_ids": [0, 1, 2], "num_computed_tokens": 0, "num_new_tokens": 9}, "overflow max_num_tokens"),
    ({"block_ids": [0], "num_computed_tokens": 0, "num_new_tokens": 1, "prompt_positions": np.zeros((2, 4), np.int64)},
     r"shape \[3, P\]"),
    ({"block_ids": [2**40], "num_computed_tokens": 0, "num_new_tokens": 1}, "does not fit in int32"),
])
def test_bad_sequence_raises_and_leaves_the_batch_unchanged(kwargs, match):
    b = BatchBuilder(4, 4, 8, 3)
    b.add_sequence([5], 1, 2)
    with pytest.raises(ValueError, match=match):
        b.add_sequence(**kwargs)
    assert_matches(b, reference_batch(4, 3, [{"blocks": [5], "computed": 1, "new": 2}]))


def test_capacity_errors():
    b = BatchBuilder(4, max_num_seqs=1, max_num_tokens=8, max_blocks_per_seq=2)
    b.add_sequence([0], 0, 1)
    with pytest.raises(ValueError, match="max_num_seqs=1"):
        b.add_sequence([1], 0, 1)
    with pytest.raises(ValueError, match="must be in"):
        BatchBuilder(0, 1, 1, 1)
    with pytest.raises(ValueError, match="fit in int32"):
        BatchBuilder(4, 2**20, 8, 2**12)


def test_non_integer_inputs_are_rejected():
    b = BatchBuilder(4, 4, 8, 3)
    with pytest.raises(TypeError):
        b.add_sequence([0.5], 0, 1)
    with pytest.raises(TypeError):
        b.add_sequence([0], 0, 1, prompt_positions=np.zeros((3, 1)))


def test_failed_build_leaves_an_empty_batch():
    b = BatchBuilder(4, 4, 8, 3)
    b.build([[0]], [0], [1])
    with pytest.raises(ValueError, match="cannot hold"):
        b.build([[0], [1]], [0, 4], [1, 1])
    assert b.num_seqs == 0 and b.num_tokens == 0
    with pytest.raises(ValueError, match="one entry per sequence"):
        b.build([[0]], [0, 0], [1])


def test_int_dtypes_and_layouts_agree():
    b = BatchBuilder(4, 4, 16, 4)
    pos = np.arange(3 * 6, dtype=np.int64).reshape(3, 6)
    b.build([[3, 1]], [2], [6], [pos], [-2])
    want = {name: getattr(b, name).copy() for name in FIELDS}
    for blocks, p in [(np.array([3, 1], np.int64), pos.astype(np.int32)),
                      (np.array([9, 3, 9, 1])[1::2], np.asfortranarray(pos)),
                      ((3, 1), pos.tolist())]:
        b.build([blocks], [2], [6], [p], [-2])
        for name in FIELDS:
            np.testing.assert_array_equal(getattr(b, name), want[name], err_msg=name)


def test_chunked_image_prompt_then_decode_matches_get_mrope_positions():
    """An image prompt prefilled in two chunks, then two decode steps, gets exactly the positions of
    get_mrope_positions for the prompt and L + k + rope_delta for decode token k."""
    image_id, merge = 99, 2
    ids = [1, 2, 3] + [image_id] * 6 + [4, 5]  # one image of grid (1, 4, 6): 1*4*6/4 = 6 tokens
    pos, delta = get_mrope_positions(ids, [(1, 4, 6)], image_id, merge)
    prompt = pos.numpy()  # [3, 11] int64, read in place
    b = BatchBuilder(block_size=4, max_num_seqs=2, max_num_tokens=16, max_blocks_per_seq=4)
    got = []
    for computed, new in [(0, 7), (7, 4), (11, 1), (12, 1)]:
        b.build([[0, 1, 2, 3]], [computed], [new], [prompt], [delta])
        got.append(b.positions.copy())
    got = np.concatenate(got, axis=1)  # [3, 13]
    np.testing.assert_array_equal(got[:, :11], prompt)
    np.testing.assert_array_equal(got[:, 11:], np.array([[11 + delta, 12 + delta]] * 3))
    assert delta < 0  # the image made the positions shorter than the tokens
