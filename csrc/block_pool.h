// Paged KV-cache block pool with ref counting, copy-on-write and verified
// prefix caching. Pure C++ (no Python); csrc/bindings.cpp wraps it.
#pragma once

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace speedx {

// Thrown for an unknown sequence id; the bindings map it to Python KeyError.
// Misuse that is a bad value throws std::invalid_argument (-> ValueError).
struct UnknownSequence : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Test hooks that weaken the hash so collisions happen and verification is
// exercised: kConstant maps every block to one value, kUnchained ignores the
// parent hash (equal token blocks collide at any position / after any prefix).
enum class DebugHash { kNone, kConstant, kUnchained };

class BlockPool {
 public:
  BlockPool(int64_t num_blocks, int64_t block_size, bool enable_prefix_caching,
            DebugHash debug_hash = DebugHash::kNone);

  // Returns the number of cached tokens, or -1 if out of blocks. That is a multiple of block_size,
  // except when the whole prompt is cached: then it is len(tokens) - 1, the last block is a copy
  // of the cached one (see take_copies) and only the last token is left to compute.
  int64_t allocate_sequence(int64_t seq_id, const std::vector<int64_t>& tokens,
                            int64_t num_tokens);
  // Grow to num_tokens slots and copy-on-write shared blocks that will be
  // written in [num_computed, num_tokens). False (no change) if out of blocks.
  bool ensure_capacity(int64_t seq_id, int64_t num_computed, int64_t num_tokens);
  // Register the next n / block_size full computed blocks; returns the count.
  int64_t register_blocks(int64_t seq_id, const int64_t* tokens, int64_t n);
  void fork(int64_t parent_id, int64_t child_id);
  void free_sequence(int64_t seq_id);
  void reset_prefix_cache();

  bool has_sequence(int64_t seq_id) const { return seqs_.count(seq_id) != 0; }
  const std::vector<int32_t>& block_table(int64_t seq_id) const { return seq(seq_id).blocks; }
  // The (src, dst) block copies owed since the last call; perform them before allocating again.
  std::vector<std::array<int32_t, 2>> take_copies();

  // Row i of out (n x m, row-major) = blocks of seq_ids[i], padded with -1.
  void build_block_tables(const int64_t* seq_ids, int64_t n, int32_t* out, int64_t m) const;
  // Slot (block * block_size + offset) of every position in [starts[i], ends[i]).
  void build_slot_mapping(const int64_t* seq_ids, const int64_t* starts, const int64_t* ends,
                          int64_t n, int64_t* out, int64_t total) const;

  int64_t num_blocks() const { return num_blocks_; }
  int64_t block_size() const { return block_size_; }
  bool enable_prefix_caching() const { return caching_; }
  int64_t num_free_blocks() const { return num_free_; }
  int64_t num_cached_blocks() const { return static_cast<int64_t>(cache_.size()); }
  int64_t num_sequences() const { return static_cast<int64_t>(seqs_.size()); }
  int64_t num_query_tokens() const { return num_query_tokens_; }
  int64_t num_hit_tokens() const { return num_hit_tokens_; }
  int64_t ref_count(int64_t block) const;

 private:
  // Identity of a block's content: block id + generation at that time.
  // Block -1 means "no parent" (first block of a chain).
  struct Parent {
    int32_t block = -1;
    uint64_t gen = 0;
    bool operator==(const Parent& o) const { return block == o.block && gen == o.gen; }
  };
  static constexpr uint64_t kRootSeed = 0x5eed5eed5eed5eedULL;  // hash "parent" of block 0
  struct Sequence {
    std::vector<int32_t> blocks;
    int64_t num_registered = 0;     // leading blocks whose hash chain is done
    uint64_t last_hash = kRootSeed; // chain state after num_registered blocks
    Parent parent;               // canonical block for the last registered position
  };

  const Sequence& seq(int64_t id) const;
  Sequence& seq(int64_t id) { return const_cast<Sequence&>(std::as_const(*this).seq(id)); }
  uint64_t hash_block(uint64_t parent_hash, const int64_t* tokens) const;
  bool same_content(int32_t b, const int64_t* tokens, const Parent& parent) const;
  int32_t allocate_block();  // pops the free queue head, evicting if cached
  void acquire(int32_t b);   // takes a reference on a cache hit
  void release(int32_t b);   // drops a reference
  void unregister(int32_t b);

  // Intrusive doubly-linked free queue over block ids (-1 = none).
  void push_head(int32_t b);
  void push_tail(int32_t b);
  void unlink(int32_t b);

  int64_t num_blocks_, block_size_;
  bool caching_;
  DebugHash debug_hash_;

  std::vector<int32_t> ref_;
  std::vector<uint64_t> gen_;  // bumped whenever a block gets new content
  std::vector<int32_t> prev_, next_;
  int32_t head_ = -1, tail_ = -1;
  int64_t num_free_ = 0;

  // Per-block prefix-cache record, valid while registered_[b].
  std::vector<char> registered_;
  std::vector<uint64_t> hash_;
  std::vector<Parent> parent_;
  std::vector<int64_t> tokens_;  // num_blocks x block_size
  std::unordered_map<uint64_t, int32_t> cache_;

  std::unordered_map<int64_t, Sequence> seqs_;
  std::vector<std::array<int32_t, 2>> copies_;
  std::vector<int32_t> copy_sources_;  // sources of allocate_sequence's copies, held until taken
  int64_t num_query_tokens_ = 0, num_hit_tokens_ = 0;
};

}  // namespace speedx
