#include "batch_builder.h"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>

namespace blip3o {

namespace {

constexpr std::int64_t kInt32Max = std::numeric_limits<std::int32_t>::max();
constexpr std::int64_t kInt32Min = std::numeric_limits<std::int32_t>::min();

std::int32_t checked_capacity(std::int64_t value, const char* name) {
  if (value <= 0 || value > kInt32Max) {
    throw std::invalid_argument(std::string(name) + " must be in [1, 2^31 - 1], got " +
                                std::to_string(value));
  }
  return static_cast<std::int32_t>(value);
}

[[noreturn]] void bad_sequence(const std::string& what) {
  throw std::invalid_argument("BatchBuilder.add_sequence: " + what);
}

bool fits_int32(std::int64_t v) { return v >= kInt32Min && v <= kInt32Max; }

}  // namespace

BatchBuilder::BatchBuilder(std::int64_t block_size, std::int64_t max_num_seqs,
                           std::int64_t max_num_tokens, std::int64_t max_blocks_per_seq)
    : block_size_(checked_capacity(block_size, "block_size")),
      max_num_seqs_(checked_capacity(max_num_seqs, "max_num_seqs")),
      max_num_tokens_(checked_capacity(max_num_tokens, "max_num_tokens")),
      max_blocks_per_seq_(checked_capacity(max_blocks_per_seq, "max_blocks_per_seq")) {
  // Flat indices into block_tables are int32 on the device side too.
  if (static_cast<std::int64_t>(max_num_seqs_) * max_blocks_per_seq_ > kInt32Max) {
    throw std::invalid_argument("max_num_seqs * max_blocks_per_seq must fit in int32");
  }
  const auto seqs = static_cast<std::size_t>(max_num_seqs_);
  const auto tokens = static_cast<std::size_t>(max_num_tokens_);
  block_tables_.assign(seqs * static_cast<std::size_t>(max_blocks_per_seq_), -1);
  slot_mapping_.assign(tokens, 0);
  positions_.assign(3 * tokens, 0);
  cu_seqlens_q_.assign(seqs + 1, 0);
  context_lens_.assign(seqs, 0);
  last_token_indices_.assign(seqs, 0);
}

void BatchBuilder::clear() {
  num_seqs_ = 0;
  num_tokens_ = 0;
  max_query_len_ = 0;
  max_context_len_ = 0;
}

void BatchBuilder::check_sequence(const std::int32_t* block_ids, std::size_t num_block_ids,
                                  std::int64_t num_computed_tokens, std::int64_t num_new_tokens,
                                  const std::int64_t* prompt_positions,
                                  std::int64_t num_prompt_positions,
                                  std::int64_t mrope_delta) const {
  if (num_seqs_ >= max_num_seqs_) {
    bad_sequence("batch already holds max_num_seqs=" + std::to_string(max_num_seqs_) +
                 " sequences");
  }
  if (num_computed_tokens < 0) bad_sequence("num_computed_tokens must be >= 0");
  if (num_new_tokens < 1) bad_sequence("num_new_tokens must be >= 1");
  if (num_new_tokens > max_num_tokens_ - num_tokens_) {
    bad_sequence(std::to_string(num_new_tokens) + " new tokens overflow max_num_tokens=" +
                 std::to_string(max_num_tokens_) + " (" + std::to_string(num_tokens_) +
                 " already in the batch)");
  }
  const std::int64_t context_len = num_computed_tokens + num_new_tokens;
  if (context_len > kInt32Max) bad_sequence("num_computed_tokens + num_new_tokens overflows int32");
  if (num_block_ids > static_cast<std::size_t>(max_blocks_per_seq_)) {
    bad_sequence(std::to_string(num_block_ids) + " block ids exceed max_blocks_per_seq=" +
                 std::to_string(max_blocks_per_seq_));
  }
  const std::int64_t blocks_needed = (context_len + block_size_ - 1) / block_size_;
  if (static_cast<std::int64_t>(num_block_ids) < blocks_needed) {
    bad_sequence(std::to_string(num_block_ids) + " blocks cannot hold " +
                 std::to_string(context_len) + " tokens (block_size " +
                 std::to_string(block_size_) + ")");
  }
  // The last slot of every block must be an int32 too.
  const std::int64_t max_block_id = (kInt32Max - (block_size_ - 1)) / block_size_;
  for (std::size_t k = 0; k < num_block_ids; ++k) {
    if (block_ids[k] < 0 || block_ids[k] > max_block_id) {
      bad_sequence("block id " + std::to_string(block_ids[k]) + " is negative or its slots "
                   "overflow int32");
    }
  }
  if (num_prompt_positions < 0 || (prompt_positions == nullptr && num_prompt_positions != 0)) {
    bad_sequence("num_prompt_positions must be >= 0, and 0 without positions");
  }
  // Only the positions this step reads need to fit in int32.
  const std::int64_t from_prompt_end = std::min(context_len, num_prompt_positions);
  for (std::int64_t p = num_computed_tokens; p < from_prompt_end; ++p) {
    for (std::int64_t axis = 0; axis < 3; ++axis) {
      if (!fits_int32(prompt_positions[axis * num_prompt_positions + p])) {
        bad_sequence("prompt position does not fit in int32");
      }
    }
  }
  const std::int64_t first_after = std::max(num_computed_tokens, num_prompt_positions);
  if (first_after < context_len &&
      !(fits_int32(first_after + mrope_delta) && fits_int32(context_len - 1 + mrope_delta))) {
    bad_sequence("position + mrope_delta does not fit in int32");
  }
}

void BatchBuilder::add_sequence(const std::int32_t* block_ids, std::size_t num_block_ids,
                                std::int64_t num_computed_tokens, std::int64_t num_new_tokens,
                                const std::int64_t* prompt_positions,
                                std::int64_t num_prompt_positions, std::int64_t mrope_delta) {
  check_sequence(block_ids, num_block_ids, num_computed_tokens, num_new_tokens, prompt_positions,
                 num_prompt_positions, mrope_delta);
  const auto s = static_cast<std::size_t>(num_seqs_);
  const auto width = static_cast<std::size_t>(max_blocks_per_seq_);
  std::int32_t* row = block_tables_.data() + s * width;
  std::copy(block_ids, block_ids + num_block_ids, row);
  std::fill(row + num_block_ids, row + width, -1);

  const auto tokens = static_cast<std::size_t>(max_num_tokens_);
  const std::int32_t first = num_tokens_;  // this sequence's first row on the flat token axis
  for (std::int64_t j = 0; j < num_new_tokens; ++j) {
    const std::int64_t p = num_computed_tokens + j;
    const auto t = static_cast<std::size_t>(first + j);
    const std::int64_t block = block_ids[static_cast<std::size_t>(p / block_size_)];
    slot_mapping_[t] = static_cast<std::int32_t>(block * block_size_ + p % block_size_);
    for (std::size_t axis = 0; axis < 3; ++axis) {
      const std::int64_t pos =
          p < num_prompt_positions
              ? prompt_positions[static_cast<std::int64_t>(axis) * num_prompt_positions + p]
              : p + mrope_delta;
      positions_[axis * tokens + t] = static_cast<std::int32_t>(pos);
    }
  }

  const auto n = static_cast<std::int32_t>(num_new_tokens);
  const auto context_len = static_cast<std::int32_t>(num_computed_tokens + num_new_tokens);
  num_tokens_ += n;
  cu_seqlens_q_[s + 1] = num_tokens_;
  context_lens_[s] = context_len;
  last_token_indices_[s] = num_tokens_ - 1;
  max_query_len_ = std::max(max_query_len_, n);
  max_context_len_ = std::max(max_context_len_, context_len);
  ++num_seqs_;
}

}  // namespace blip3o
