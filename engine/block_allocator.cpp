#include "block_allocator.h"

#include <limits>
#include <string>

namespace blip3o {

namespace {

constexpr std::uint64_t kFnvOffset = 0xcbf29ce484222325ULL;
constexpr std::uint64_t kFnvPrime = 0x100000001b3ULL;

// MurmurHash3's 64-bit finalizer: a bijection with full avalanche.
std::uint64_t fmix64(std::uint64_t k) {
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdULL;
  k ^= k >> 33;
  k *= 0xc4ceb9fe1a85ec53ULL;
  k ^= k >> 33;
  return k;
}

template <typename T>
BlockHash hash_array(BlockHash parent_hash, const T* token_ids, std::size_t n, std::uint64_t extra) {
  BlockHasher hasher(parent_hash, extra);
  for (std::size_t i = 0; i < n; ++i) hasher.add(static_cast<std::int64_t>(token_ids[i]));
  return hasher.finish();
}

[[noreturn]] void violation(const std::string& what) {
  throw InvariantError("BlockAllocator invariant violated: " + what);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Hashing

BlockHasher::BlockHasher(BlockHash parent_hash, std::uint64_t extra) : state_(kFnvOffset) {
  feed(parent_hash);
  feed(extra);
}

void BlockHasher::feed(std::uint64_t word) {
  // Byte by byte, least significant first: the definition does not depend on host endianness.
  for (int i = 0; i < 8; ++i) {
    state_ ^= (word >> (8 * i)) & 0xffU;
    state_ *= kFnvPrime;
  }
}

void BlockHasher::add(std::int64_t token) {
  feed(static_cast<std::uint64_t>(token));
  ++count_;
}

BlockHash BlockHasher::finish() const {
  BlockHasher copy = *this;  // finish() is const so a caller may keep adding afterwards
  copy.feed(count_);
  return fmix64(copy.state_);
}

BlockHash BlockAllocator::hash_block(BlockHash parent_hash, const std::int32_t* token_ids,
                                     std::size_t n, std::uint64_t extra) {
  return hash_array(parent_hash, token_ids, n, extra);
}

BlockHash BlockAllocator::hash_block(BlockHash parent_hash, const std::int64_t* token_ids,
                                     std::size_t n, std::uint64_t extra) {
  return hash_array(parent_hash, token_ids, n, extra);
}

// ---------------------------------------------------------------------------------------------
// Allocation

BlockAllocator::BlockAllocator(std::int64_t num_blocks, std::int64_t block_size,
                               bool enable_prefix_caching)
    : enable_prefix_caching_(enable_prefix_caching) {
  // The LRU sentinel takes index num_blocks, so num_blocks itself must leave room in an int32.
  if (num_blocks <= 0 || num_blocks >= std::numeric_limits<std::int32_t>::max()) {
    throw std::invalid_argument("num_blocks must be in [1, 2^31 - 2], got " +
                                std::to_string(num_blocks));
  }
  if (block_size <= 0 || block_size > std::numeric_limits<std::int32_t>::max()) {
    throw std::invalid_argument("block_size must be positive, got " + std::to_string(block_size));
  }
  num_blocks_ = static_cast<std::int32_t>(num_blocks);
  block_size_ = static_cast<std::int32_t>(block_size);
  const auto n = static_cast<std::size_t>(num_blocks_);
  ref_.assign(n, 0);
  cached_.assign(n, 0);
  hash_.assign(n, 0);
  in_lru_.assign(n, 0);
  lru_prev_.assign(n + 1, num_blocks_);
  lru_next_.assign(n + 1, num_blocks_);
  // Pushed in reverse so that a fresh allocator hands out 0, 1, 2, ...
  free_list_.reserve(n);
  for (BlockId b = num_blocks_ - 1; b >= 0; --b) free_list_.push_back(b);
}

void BlockAllocator::check_id(BlockId block_id) const {
  if (block_id < 0 || block_id >= num_blocks_) {
    throw std::out_of_range("block id " + std::to_string(block_id) + " is out of range [0, " +
                            std::to_string(num_blocks_) + ")");
  }
}

BlockId BlockAllocator::allocate() {
  BlockId b;
  if (!free_list_.empty()) {
    b = free_list_.back();
    free_list_.pop_back();
  } else if (lru_size_ > 0) {
    b = lru_next_[static_cast<std::size_t>(num_blocks_)];  // oldest evictable block
    lru_remove(b);
    uncache(b);
  } else {
    throw OutOfBlocksError("no free or evictable KV block: all " + std::to_string(num_blocks_) +
                           " blocks are in use");
  }
  ref_[static_cast<std::size_t>(b)] = 1;
  return b;
}

void BlockAllocator::free(BlockId block_id) {
  check_id(block_id);
  auto& ref = ref_[static_cast<std::size_t>(block_id)];
  if (ref == 0) {
    throw std::invalid_argument("free of block " + std::to_string(block_id) +
                                " whose ref count is already 0");
  }
  if (--ref > 0) return;
  if (cached_[static_cast<std::size_t>(block_id)]) {
    lru_push_back(block_id);
  } else {
    free_list_.push_back(block_id);
  }
}

void BlockAllocator::incref(BlockId block_id) {
  check_id(block_id);
  auto& ref = ref_[static_cast<std::size_t>(block_id)];
  if (ref == 0) {
    throw std::invalid_argument("incref of block " + std::to_string(block_id) +
                                " which is not in use (revive cached blocks with lookup)");
  }
  ++ref;
}

std::int32_t BlockAllocator::ref_count(BlockId block_id) const {
  check_id(block_id);
  return ref_[static_cast<std::size_t>(block_id)];
}

std::int32_t BlockAllocator::num_free_blocks() const {
  return static_cast<std::int32_t>(free_list_.size()) + lru_size_;
}

// ---------------------------------------------------------------------------------------------
// Prefix cache

std::int32_t BlockAllocator::num_cached_blocks() const {
  return static_cast<std::int32_t>(hash_to_block_.size());
}

BlockId BlockAllocator::lookup(BlockHash block_hash) {
  if (!enable_prefix_caching_) return -1;
  const auto it = hash_to_block_.find(block_hash);
  if (it == hash_to_block_.end()) return -1;
  const BlockId b = it->second;
  auto& ref = ref_[static_cast<std::size_t>(b)];
  if (ref == 0) lru_remove(b);  // revive an evictable block
  ++ref;
  return b;
}

bool BlockAllocator::register_block(BlockId block_id, BlockHash block_hash) {
  check_id(block_id);
  const auto i = static_cast<std::size_t>(block_id);
  if (ref_[i] == 0) {
    throw std::invalid_argument("register of block " + std::to_string(block_id) +
                                " which is not in use");
  }
  if (!enable_prefix_caching_) return false;
  if (cached_[i]) {
    if (hash_[i] == block_hash) return true;
    throw std::invalid_argument("block " + std::to_string(block_id) +
                                " is already cached under a different hash");
  }
  if (!hash_to_block_.emplace(block_hash, block_id).second) return false;
  cached_[i] = 1;
  hash_[i] = block_hash;
  return true;
}

void BlockAllocator::uncache(BlockId block_id) {
  const auto i = static_cast<std::size_t>(block_id);
  hash_to_block_.erase(hash_[i]);
  cached_[i] = 0;
  hash_[i] = 0;
}

void BlockAllocator::lru_push_back(BlockId block_id) {
  const auto s = static_cast<std::size_t>(num_blocks_);
  const auto i = static_cast<std::size_t>(block_id);
  const BlockId newest = lru_prev_[s];
  lru_prev_[i] = newest;
  lru_next_[i] = num_blocks_;
  lru_next_[static_cast<std::size_t>(newest)] = block_id;
  lru_prev_[s] = block_id;
  in_lru_[i] = 1;
  ++lru_size_;
}

void BlockAllocator::lru_remove(BlockId block_id) {
  const auto i = static_cast<std::size_t>(block_id);
  lru_next_[static_cast<std::size_t>(lru_prev_[i])] = lru_next_[i];
  lru_prev_[static_cast<std::size_t>(lru_next_[i])] = lru_prev_[i];
  lru_prev_[i] = lru_next_[i] = num_blocks_;
  in_lru_[i] = 0;
  --lru_size_;
}

// ---------------------------------------------------------------------------------------------
// Consistency check

void BlockAllocator::check_invariants() const {
  const auto n = static_cast<std::size_t>(num_blocks_);
  std::vector<std::uint8_t> on_free_list(n, 0);
  std::vector<std::uint8_t> on_lru(n, 0);

  for (const BlockId b : free_list_) {
    if (b < 0 || b >= num_blocks_) violation("free list holds bad id " + std::to_string(b));
    if (on_free_list[static_cast<std::size_t>(b)]++) {
      violation("block " + std::to_string(b) + " is on the free list twice");
    }
  }

  // Walk the LRU oldest to newest, checking the back links; more than n steps means a cycle.
  std::int32_t lru_count = 0;
  BlockId prev = num_blocks_;
  for (BlockId b = lru_next_[n]; b != num_blocks_; b = lru_next_[static_cast<std::size_t>(b)]) {
    if (b < 0 || b > num_blocks_) violation("LRU holds bad id " + std::to_string(b));
    if (lru_prev_[static_cast<std::size_t>(b)] != prev) {
      violation("LRU back link of block " + std::to_string(b) + " is wrong");
    }
    if (on_lru[static_cast<std::size_t>(b)]++ || ++lru_count > num_blocks_) {
      violation("block " + std::to_string(b) + " is on the LRU twice");
    }
    prev = b;
  }
  if (lru_prev_[n] != prev) violation("LRU tail link is wrong");
  if (lru_count != lru_size_) violation("LRU size counter disagrees with the list");

  std::size_t num_cached = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const std::string id = "block " + std::to_string(i);
    if (ref_[i] < 0) violation(id + " has a negative ref count");
    if ((ref_[i] > 0) + on_free_list[i] + on_lru[i] != 1) {
      violation(id + " is not in exactly one of: in use, free list, LRU");
    }
    if (in_lru_[i] != on_lru[i]) violation(id + " has a stale in_lru flag");
    if (on_free_list[i] && cached_[i]) violation(id + " is on the free list but cached");
    if (on_lru[i] && !cached_[i]) violation(id + " is on the LRU but not cached");
    if (cached_[i]) {
      ++num_cached;
      const auto it = hash_to_block_.find(hash_[i]);
      if (it == hash_to_block_.end() || it->second != static_cast<BlockId>(i)) {
        violation(id + " is cached but the hash map does not point to it");
      }
    }
  }
  // Every map entry was matched by a distinct cached block above, so equal sizes mean no extras.
  if (num_cached != hash_to_block_.size()) violation("hash map holds entries for uncached blocks");
  if (!enable_prefix_caching_ && num_cached != 0) violation("cached blocks with caching disabled");
}

}  // namespace blip3o
