// Paged-KV block allocator: ref-counted fixed-size blocks, a free list, and a prefix cache.
//
// The KV cache is a pool of `num_blocks` blocks of `block_size` tokens each. A sequence holds a
// list of block ids (its block table). This class only does the bookkeeping on the host; it never
// sees tensors. It is not thread-safe: the scheduler owns it and calls it from one thread.
//
// Every block is in exactly one of three states (`check_invariants()` verifies this):
//   in use     ref_count > 0 (held by one or more sequences; may also be cached)
//   free       ref_count == 0, on the free list, holds nothing worth keeping
//   evictable  ref_count == 0, cached (its content is registered under a hash), on the LRU list
//
// Prefix cache. A full block's content is identified by a chained hash,
//   hash_i = hash_block(hash_{i-1}, tokens of block i, extra_i),   hash_{-1} = 0,
// so equal hashes mean equal prefixes up to and including the block. `register_block` records
// hash -> block for a block that has been filled; `lookup` finds it again and takes a reference.
// When the last reference to a cached block goes away the block is not forgotten: it goes to the
// back of an LRU list and can still be revived by `lookup`. `allocate` prefers the free list and
// only when that is empty evicts the least recently released cached block (front of the LRU),
// dropping its hash mapping.
//
// Callers should free a finished sequence's blocks last-to-first, so that its tail blocks are
// evicted before its head blocks (a head is the part most likely shared with a future prompt).
//
// Hash collisions: only the 64-bit hash is stored, not the tokens, so two different prefixes with
// the same hash would share KV. For N cached blocks the chance of any accidental collision is about
// N^2 / 2^65 (3e-8 at a million blocks), which we accept for the memory and time it saves. The
// hash is unkeyed and not cryptographic, so it does NOT protect against an adversary who crafts
// colliding prompts to poison a cache shared between tenants; a deployment that serves mutually
// untrusted users should disable prefix caching or mix a tenant id into `extra` so that tenants
// never share blocks.

#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <unordered_map>
#include <vector>

namespace blip3o {

using BlockId = std::int32_t;
using BlockHash = std::uint64_t;

// Raised by allocate() when no block is free or evictable. Transient: the scheduler should
// preempt or wait, not fail the request.
class OutOfBlocksError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Raised by check_invariants(): the allocator's internal state is inconsistent (a bug).
class InvariantError : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

// Streaming form of BlockAllocator::hash_block, for callers whose tokens are not one contiguous
// array (e.g. a strided numpy view). The hash is FNV-1a 64 over the sequence of 64-bit words
//   parent_hash, extra, t_0, ..., t_{n-1}, n
// each fed as its 8 little-endian bytes (tokens sign-extended to int64, so int32 and int64 inputs
// hash alike), followed by the MurmurHash3 fmix64 finalizer (a bijection that spreads FNV's weak
// low bits). Writing n last lets the hash be computed in one pass without knowing n up front.
// It depends on nothing but these integers: same inputs, same hash, in every process.
class BlockHasher {
 public:
  BlockHasher(BlockHash parent_hash, std::uint64_t extra);
  void add(std::int64_t token);
  BlockHash finish() const;

 private:
  void feed(std::uint64_t word);
  std::uint64_t state_;
  std::uint64_t count_ = 0;
};

class BlockAllocator {
 public:
  // Throws std::invalid_argument unless 0 < num_blocks <= INT32_MAX and block_size > 0.
  BlockAllocator(std::int64_t num_blocks, std::int64_t block_size,
                 bool enable_prefix_caching = true);

  // Takes a block with ref count 1: from the free list, else by evicting the oldest evictable
  // cached block. Throws OutOfBlocksError when every block is in use.
  BlockId allocate();

  // Drops one reference. At zero a cached block becomes evictable (back of the LRU), any other
  // block returns to the free list. Throws std::invalid_argument if the ref count is already 0,
  // std::out_of_range for a bad id.
  void free(BlockId block_id);

  // Adds a reference to a block in use (a sequence sharing it, e.g. after a fork). Throws
  // std::invalid_argument if the block is not in use: revive a cached block with lookup() instead.
  void incref(BlockId block_id);

  // Finds the block cached under `block_hash`. On a hit takes a reference (reviving the block
  // from the LRU if it was evictable) and returns its id; returns -1 on a miss or when prefix
  // caching is disabled.
  BlockId lookup(BlockHash block_hash);

  // Records that the (in-use, full) block holds the content hashed as `block_hash`. Returns true
  // if the block is now the cache entry for that hash (also when it already was). Returns false,
  // leaving the block uncached, when prefix caching is disabled or another block already holds
  // the hash (two sequences computed the same block at once; the first one stays the entry).
  // Throws std::invalid_argument if the block is not in use or is cached under another hash
  // (a full block's content never changes).
  bool register_block(BlockId block_id, BlockHash block_hash);

  // See BlockHasher for the exact definition.
  static BlockHash hash_block(BlockHash parent_hash, const std::int32_t* token_ids, std::size_t n,
                              std::uint64_t extra = 0);
  static BlockHash hash_block(BlockHash parent_hash, const std::int64_t* token_ids, std::size_t n,
                              std::uint64_t extra = 0);

  std::int32_t num_blocks() const { return num_blocks_; }
  std::int32_t block_size() const { return block_size_; }
  bool enable_prefix_caching() const { return enable_prefix_caching_; }
  // Blocks allocate() can hand out without failing: free list + evictable cached blocks.
  std::int32_t num_free_blocks() const;
  // Cached blocks with ref count 0 (the LRU).
  std::int32_t num_evictable_blocks() const { return lru_size_; }
  // Blocks that hold a registered hash, in use or evictable.
  std::int32_t num_cached_blocks() const;
  std::int32_t ref_count(BlockId block_id) const;

  // Verifies the whole internal state (every block in exactly one state, free list and LRU
  // well-formed and duplicate-free, hash map and per-block hashes agree). O(num_blocks).
  // Throws InvariantError describing the first violation found.
  void check_invariants() const;

 private:
  void check_id(BlockId block_id) const;
  void lru_push_back(BlockId block_id);
  void lru_remove(BlockId block_id);
  void uncache(BlockId block_id);

  std::int32_t num_blocks_;
  std::int32_t block_size_;
  bool enable_prefix_caching_;

  std::vector<std::int32_t> ref_;
  // LIFO stack of free block ids. Order does not matter for cache hits (blocks worth keeping are
  // on the LRU, never here), so the cheapest structure wins: O(1) push/pop, no allocation, and
  // a just-freed block is reused first, which keeps the set of live ids small and traces simple.
  std::vector<BlockId> free_list_;

  std::vector<std::uint8_t> cached_;  // 1 if hash_[b] is registered in hash_to_block_
  std::vector<BlockHash> hash_;
  std::unordered_map<BlockHash, BlockId> hash_to_block_;

  // Intrusive doubly linked LRU of evictable blocks: index num_blocks_ is the sentinel,
  // lru_next_[sentinel] is the oldest (evicted first), lru_prev_[sentinel] the newest.
  std::vector<BlockId> lru_prev_;
  std::vector<BlockId> lru_next_;
  std::vector<std::uint8_t> in_lru_;
  std::int32_t lru_size_ = 0;
};

}  // namespace blip3o
