"""Paged-KV block manager: per-request block tables over the C++ `BlockAllocator`, with prefix caching.

The scheduler asks this class for blocks; it never sees tensors. A request's block table lists the
blocks holding its tokens in order: token p lives in block `table[p // block_size]` at offset
`p % block_size`.

Prefix caching. A full block is identified by a hash chain over the request's content,
    h_i = hash_block(h_{i-1}, tokens of block i, extra_i),   h_{-1} = 0,
so two requests share block i only if everything up to and including it is equal. Image
placeholder tokens are all the same id, so the image itself enters through `extra_i`: a key folded
from the content hashes of the images whose placeholder runs overlap block i (0 for text-only
blocks). Blocks are registered only after their KV has been written (`cache_full_blocks`, called
once a step's output is applied), so a hit never reads KV that is still being computed.

Running out of blocks is temporary (a running request finishes, or the scheduler preempts one), so
it is reported as a return value here, never as an exception to the user.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from blip3o_engine.native import BlockAllocator, OutOfBlocksError


class ImageSpan(NamedTuple):
    """An image's placeholder tokens in a prompt: `length` tokens from `offset`, and its content hash
    (any int, taken modulo 2**64; e.g. a hash of the pixels and grid)."""

    offset: int
    length: int
    content_hash: int


class KVBlockManager:
    """Block tables of live requests over a pool of `num_blocks` blocks of `block_size` tokens."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.allocator = BlockAllocator(num_blocks, block_size, enable_prefix_caching)
        self._tables: dict[str, list[int]] = {}
        # Chain hashes of each request's leading full blocks, computed lazily and reused between
        # the prefix lookup and later registrations (a request's tokens are only ever appended).
        self._hashes: dict[str, list[int]] = {}
        # How many leading blocks of each table are known to be in the cache (hit or registered).
        self._num_cached: dict[str, int] = {}

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def block_size(self) -> int:
        return self.allocator.block_size

    @property
    def enable_prefix_caching(self) -> bool:
        return self.allocator.enable_prefix_caching

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now: free plus evictable cached ones."""
        return self.allocator.num_free_blocks

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.allocator.num_free_blocks

    def block_table(self, request_id: str) -> list[int]:
        """The request's block table (the live list: do not modify it); [] for an unknown request."""
        return self._tables.get(request_id, [])

    def lookup_prefix(self, request_id: str, token_ids: Sequence[int], num_tokens: int,
                      image_spans: Sequence[ImageSpan] = ()) -> int:
        """Take the cached blocks that hold the longest prefix of `token_ids[:num_tokens]` made of full
        blocks, as the start of the request's table; return how many tokens they hold (0 on a miss or
        with caching off). The request must hold no blocks yet. Callers pass `num_tokens` below the
        request's length when its last token must be computed anyway (to get its logits)."""
        if self._tables.get(request_id):
            raise ValueError(f"request {request_id!r} already holds blocks; look up its prefix before allocating")
        table = self._tables.setdefault(request_id, [])
        if not self.enable_prefix_caching:
            return 0
        hashes = self._block_hashes(request_id, token_ids, num_tokens // self.block_size, image_spans)
        for block_hash in hashes:
            block = self.allocator.lookup(block_hash)
            if block < 0:
                break
            table.append(block)
        self._num_cached[request_id] = len(table)
        return len(table) * self.block_size

    def allocate_slots(self, request_id: str, num_tokens: int) -> bool:
        """Grow the request's table to hold `num_tokens` tokens. All or nothing: returns False, changing
        nothing, when the pool lacks the blocks (a transient shortage for the scheduler to handle)."""
        table = self._tables.setdefault(request_id, [])
        need = self.blocks_for(num_tokens) - len(table)
        if need <= 0:
            return True
        if need > self.allocator.num_free_blocks:
            return False
        start = len(table)
        try:
            for _ in range(need):
                table.append(self.allocator.allocate())
        except OutOfBlocksError:  # cannot happen after the check above; roll back if it ever does
            for block in reversed(table[start:]):
                self.allocator.free(block)
            del table[start:]
            return False
        return True

    def cache_full_blocks(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int,
                          image_spans: Sequence[ImageSpan] = ()) -> None:
        """Register the request's blocks that are full of computed KV (the first
        `num_computed_tokens // block_size`) in the prefix cache, so later requests can hit them."""
        if not self.enable_prefix_caching or request_id not in self._tables:
            return
        table = self._tables[request_id]
        num_full = min(num_computed_tokens // self.block_size, len(table))
        start = self._num_cached.get(request_id, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(request_id, token_ids, num_full, image_spans)
        for i in range(start, num_full):
            # False means another request registered the same content first; this copy stays
            # uncached and is freed normally. Either way block i is settled.
            self.allocator.register(table[i], hashes[i])
        self._num_cached[request_id] = num_full

    def free(self, request_id: str) -> None:
        """Release every block of the request (no-op for an unknown one). Last to first, so that a
        prompt's head outlives its tail in the LRU of cached blocks: heads are what prompts share."""
        for block in reversed(self._tables.pop(request_id, [])):
            self.allocator.free(block)
        self._hashes.pop(request_id, None)
        self._num_cached.pop(request_id, None)

    def check_invariants(self) -> None:
        """Raise AssertionError (or the allocator's InvariantError) unless every block's ref count equals
        the number of tables holding it and no table holds a block twice."""
        self.allocator.check_invariants()
        owners = [0] * self.num_blocks
        for request_id, table in self._tables.items():
            assert len(set(table)) == len(table), f"request {request_id!r} holds a block twice: {table}"
            for block in table:
                owners[block] += 1
        for block, n in enumerate(owners):
            ref = self.allocator.ref_count(block)
            assert ref == n, f"block {block} has ref count {ref} but {n} tables hold it"

    # --------------------------------------------------------------------------------------------

    def _block_hashes(self, request_id: str, token_ids: Sequence[int], num_full_blocks: int,
                      image_spans: Sequence[ImageSpan]) -> list[int]:
        """Chain hashes of the request's first `num_full_blocks` blocks (extending the memo)."""
        hashes = self._hashes.setdefault(request_id, [])
        bs = self.block_size
        for i in range(len(hashes), num_full_blocks):
            parent = hashes[-1] if hashes else 0
            extra = _image_key(image_spans, i * bs, (i + 1) * bs)
            hashes.append(BlockAllocator.hash_block(parent, token_ids[i * bs:(i + 1) * bs], extra))
        return hashes


def _image_key(image_spans: Sequence[ImageSpan], start: int, end: int) -> int:
    """The `extra` key of the block of tokens [start, end): 0 when no image overlaps it, else the
    content hashes of the overlapping images folded in order (so swapping two images changes it)."""
    key = 0
    for span in image_spans:
        if span.offset < end and span.offset + span.length > start:
            key = BlockAllocator.hash_block(key, (), span.content_hash)
    return key
