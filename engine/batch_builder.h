// Per-step batch builder: the flat int32 metadata of one AR forward over a ragged batch.
//
// Each step the scheduler picks sequences and, for each, how many new tokens to compute (a prefill
// chunk or one decode token). The attention kernels and the KV-cache writes need that choice as
// flat arrays; this class fills them in one pass on the host, into buffers it owns and sizes once
// (from the capacities given to the constructor), so the Python side can expose them as zero-copy
// numpy views and the model runner can copy them into its static device buffers.
//
// For a batch of S sequences with T new tokens in all (sequence i has c_i computed tokens whose
// KV is already in the cache, and n_i >= 1 new ones, tokens c_i .. c_i + n_i - 1):
//   block_tables       [S, max_blocks_per_seq]  sequence i's block ids, padded with -1
//   slot_mapping       [T]   cache slot of each new token: block * block_size + offset in block
//   positions          [3, T]  M-RoPE (t, h, w) position of each new token (see below)
//   cu_seqlens_q       [S + 1] cumulative new-token counts: sequence i's queries are
//                              cu_seqlens_q[i] .. cu_seqlens_q[i + 1] - 1 of the flat token axis
//   context_lens       [S]   c_i + n_i: keys each sequence attends to after this step's writes
//   last_token_indices [S]   cu_seqlens_q[i + 1] - 1: the row whose logits are sampled
//
// Positions. Token p of a sequence (0-based over the whole sequence) gets
//   prompt_positions[:, p]        if p < P, where prompt_positions [3, P] is given for the sequence
//   p + mrope_delta on all axes   otherwise
// A text-only prompt passes no positions and delta 0 (plain 1-D RoPE positions). A prompt with
// images passes its 3-D positions and rope_delta from get_mrope_positions(); the tokens after the
// prompt (decode, or recomputation after a preemption) then continue at p + rope_delta.
//
// Buffers are never reallocated, so a view stays memory-safe for the builder's lifetime; its
// contents are those of the latest batch. Not thread-safe.

#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace blip3o {

class BatchBuilder {
 public:
  // Throws std::invalid_argument unless every capacity is positive and the buffers' sizes fit in
  // int32 indices (max_num_tokens, max_num_seqs * max_blocks_per_seq).
  BatchBuilder(std::int64_t block_size, std::int64_t max_num_seqs, std::int64_t max_num_tokens,
               std::int64_t max_blocks_per_seq);

  // Starts a new, empty batch.
  void clear();

  // Appends one sequence to the batch.
  //   block_ids          its block table, num_block_ids >= 0 ids, each >= 0; must cover its first
  //                      num_computed_tokens + num_new_tokens tokens
  //   prompt_positions   row-major [3, num_prompt_positions] M-RoPE positions of its prompt, or
  //                      nullptr (then num_prompt_positions must be 0)
  //   mrope_delta        offset of every position at or past num_prompt_positions
  // Throws std::invalid_argument (leaving the batch unchanged) when an argument is out of range
  // or a capacity would be exceeded.
  void add_sequence(const std::int32_t* block_ids, std::size_t num_block_ids,
                    std::int64_t num_computed_tokens, std::int64_t num_new_tokens,
                    const std::int64_t* prompt_positions, std::int64_t num_prompt_positions,
                    std::int64_t mrope_delta);

  std::int32_t block_size() const { return block_size_; }
  std::int32_t max_num_seqs() const { return max_num_seqs_; }
  std::int32_t max_num_tokens() const { return max_num_tokens_; }
  std::int32_t max_blocks_per_seq() const { return max_blocks_per_seq_; }

  std::int32_t num_seqs() const { return num_seqs_; }
  std::int32_t num_tokens() const { return num_tokens_; }
  std::int32_t max_query_len() const { return max_query_len_; }      // max n_i (0 if empty)
  std::int32_t max_context_len() const { return max_context_len_; }  // max c_i + n_i (0 if empty)

  // Raw buffers, laid out at full capacity: block_tables is [max_num_seqs, max_blocks_per_seq]
  // row-major and positions is [3, max_num_tokens] row-major; only the first num_seqs rows /
  // num_tokens columns belong to the current batch.
  const std::int32_t* block_tables() const { return block_tables_.data(); }
  const std::int32_t* slot_mapping() const { return slot_mapping_.data(); }
  const std::int32_t* positions() const { return positions_.data(); }
  const std::int32_t* cu_seqlens_q() const { return cu_seqlens_q_.data(); }
  const std::int32_t* context_lens() const { return context_lens_.data(); }
  const std::int32_t* last_token_indices() const { return last_token_indices_.data(); }

 private:
  void check_sequence(const std::int32_t* block_ids, std::size_t num_block_ids,
                      std::int64_t num_computed_tokens, std::int64_t num_new_tokens,
                      const std::int64_t* prompt_positions, std::int64_t num_prompt_positions,
                      std::int64_t mrope_delta) const;

  std::int32_t block_size_;
  std::int32_t max_num_seqs_;
  std::int32_t max_num_tokens_;
  std::int32_t max_blocks_per_seq_;

  std::int32_t num_seqs_ = 0;
  std::int32_t num_tokens_ = 0;
  std::int32_t max_query_len_ = 0;
  std::int32_t max_context_len_ = 0;

  std::vector<std::int32_t> block_tables_;
  std::vector<std::int32_t> slot_mapping_;
  std::vector<std::int32_t> positions_;
  std::vector<std::int32_t> cu_seqlens_q_;
  std::vector<std::int32_t> context_lens_;
  std::vector<std::int32_t> last_token_indices_;
};

}  // namespace blip3o
