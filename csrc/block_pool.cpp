#include "block_pool.h"

#include <algorithm>
#include <utility>

namespace speedx {
namespace {

uint64_t mix64(uint64_t x) {  // splitmix64 finalizer
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

[[noreturn]] void bad(const std::string& msg) { throw std::invalid_argument(msg); }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

BlockPool::BlockPool(int64_t num_blocks, int64_t block_size, bool enable_prefix_caching,
                     DebugHash debug_hash)
    : num_blocks_(num_blocks), block_size_(block_size), caching_(enable_prefix_caching),
      debug_hash_(debug_hash) {
  if (num_blocks < 1 || num_blocks > INT32_MAX) bad("num_blocks must be in [1, 2^31)");
  if (block_size < 1 || block_size > (1 << 20)) bad("block_size must be in [1, 2^20]");
  ref_.assign(num_blocks, 0);
  gen_.assign(num_blocks, 0);
  prev_.assign(num_blocks, -1);
  next_.assign(num_blocks, -1);
  registered_.assign(num_blocks, 0);
  hash_.assign(num_blocks, 0);
  parent_.assign(num_blocks, Parent{});
  if (caching_) tokens_.assign(num_blocks * block_size, 0);
  for (int32_t b = 0; b < num_blocks; ++b) push_tail(b);
}

// ---- free queue -------------------------------------------------------------

void BlockPool::push_head(int32_t b) {
  prev_[b] = -1;
  next_[b] = head_;
  (head_ >= 0 ? prev_[head_] : tail_) = b;
  head_ = b;
  ++num_free_;
}

void BlockPool::push_tail(int32_t b) {
  next_[b] = -1;
  prev_[b] = tail_;
  (tail_ >= 0 ? next_[tail_] : head_) = b;
  tail_ = b;
  ++num_free_;
}

void BlockPool::unlink(int32_t b) {
  (prev_[b] >= 0 ? next_[prev_[b]] : head_) = next_[b];
  (next_[b] >= 0 ? prev_[next_[b]] : tail_) = prev_[b];
  prev_[b] = next_[b] = -1;
  --num_free_;
}

// ---- block life cycle -------------------------------------------------------

void BlockPool::unregister(int32_t b) {
  cache_.erase(hash_[b]);  // a registered block always owns its hash entry
  registered_[b] = 0;
}

int32_t BlockPool::allocate_block() {
  int32_t b = head_;  // callers check num_free_ first
  unlink(b);
  if (registered_[b]) unregister(b);  // eviction
  ++gen_[b];  // new content: stale parent links to this block stop verifying
  ref_[b] = 1;
  return b;
}

void BlockPool::acquire(int32_t b) {
  if (ref_[b]++ == 0) unlink(b);
}

void BlockPool::release(int32_t b) {
  if (--ref_[b] > 0) return;
  // Cached blocks go to the tail (LRU); plain ones to the head (nothing lost).
  if (registered_[b]) push_tail(b);
  else push_head(b);
}

int64_t BlockPool::ref_count(int64_t block) const {
  if (block < 0 || block >= num_blocks_) bad("block id " + std::to_string(block) + " out of range");
  return ref_[block];
}

// ---- prefix cache -----------------------------------------------------------

uint64_t BlockPool::hash_block(uint64_t parent_hash, const int64_t* tokens) const {
  if (debug_hash_ == DebugHash::kConstant) return 42;
  uint64_t h = mix64(debug_hash_ == DebugHash::kUnchained ? kRootSeed : parent_hash);
  for (int64_t i = 0; i < block_size_; ++i) h = mix64(h ^ static_cast<uint64_t>(tokens[i]));
  return h;
}

bool BlockPool::same_content(int32_t b, const int64_t* tokens, const Parent& parent) const {
  return parent_[b] == parent &&
         std::equal(tokens, tokens + block_size_, tokens_.begin() + b * block_size_);
}

void BlockPool::reset_prefix_cache() {
  for (int32_t b = 0; b < num_blocks_; ++b) {
    if (!registered_[b] || ref_[b] > 0) continue;
    unregister(b);
    unlink(b);
    push_head(b);  // now plain free block: reuse it first
  }
}

// ---- sequences --------------------------------------------------------------

const BlockPool::Sequence& BlockPool::seq(int64_t id) const {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) throw UnknownSequence("unknown seq_id " + std::to_string(id));
  return it->second;
}

int64_t BlockPool::allocate_sequence(int64_t seq_id, const std::vector<int64_t>& tokens,
                                     int64_t num_tokens) {
  const auto n = static_cast<int64_t>(tokens.size());
  if (seqs_.count(seq_id)) bad("duplicate seq_id " + std::to_string(seq_id));
  if (n < 1) bad("token_ids must not be empty");
  if (num_tokens < n) bad("num_tokens must be >= len(token_ids)");

  // Longest verified cached prefix. The last prompt token is always computed (its logits start
  // the output): when the hit covers the whole prompt, that token's block is copied rather than
  // shared and only the token itself is recomputed (n copies of one prompt prefill it once).
  Sequence s;
  uint64_t shared_hash = s.last_hash;  // chain state after the shared (not copied) hits
  Parent shared_parent = s.parent;
  int64_t free_hits = 0;
  if (caching_) {
    for (int64_t i = 0; i < n / block_size_; ++i) {
      const int64_t* blk = tokens.data() + i * block_size_;
      uint64_t h = hash_block(s.last_hash, blk);
      auto it = cache_.find(h);
      if (it == cache_.end() || !same_content(it->second, blk, s.parent)) break;
      int32_t b = it->second;
      shared_hash = s.last_hash;
      shared_parent = s.parent;
      s.blocks.push_back(b);
      s.last_hash = h;
      s.parent = {b, gen_[b]};
      free_hits += ref_[b] == 0;
    }
  }
  const int64_t hits = static_cast<int64_t>(s.blocks.size());
  const bool copy_last = hits * block_size_ == n;
  const int64_t shared = hits - copy_last;
  const int64_t total = ceil_div(num_tokens, block_size_);
  if (total - shared + free_hits > num_free_) return -1;

  // Revive hits before allocating so the allocations cannot evict them.
  for (int32_t b : s.blocks) acquire(b);
  if (copy_last) {
    const int32_t src = s.blocks.back();
    s.blocks.back() = allocate_block();
    copies_.push_back({src, s.blocks.back()});
    copy_sources_.push_back(src);  // held until take_copies(): nothing may evict it before the copy
    s.last_hash = shared_hash;
    s.parent = shared_parent;
  }
  while (static_cast<int64_t>(s.blocks.size()) < total) s.blocks.push_back(allocate_block());
  s.num_registered = shared;
  seqs_.emplace(seq_id, std::move(s));
  const int64_t cached = copy_last ? n - 1 : hits * block_size_;
  num_query_tokens_ += n;
  num_hit_tokens_ += cached;
  return cached;
}

bool BlockPool::ensure_capacity(int64_t seq_id, int64_t num_computed, int64_t num_tokens) {
  Sequence& s = seq(seq_id);
  if (num_computed < 0 || num_computed > num_tokens)
    bad("need 0 <= num_computed <= num_tokens");
  const auto have = static_cast<int64_t>(s.blocks.size());
  const int64_t grow = std::max<int64_t>(0, ceil_div(num_tokens, block_size_) - have);

  // Existing blocks that will be written: [first, last) by block index.
  const int64_t first = num_computed / block_size_;
  const int64_t last = num_computed == num_tokens ? first
                                                  : std::min(have, ceil_div(num_tokens, block_size_));
  int64_t cow = 0;
  for (int64_t i = first; i < last; ++i) cow += ref_[s.blocks[i]] > 1;
  if (grow + cow > num_free_) return false;

  for (int64_t i = first; i < last; ++i) {
    int32_t src = s.blocks[i];
    if (ref_[src] <= 1) continue;  // sole owner writes in place
    int32_t dst = allocate_block();
    --ref_[src];  // still > 0: others hold it
    s.blocks[i] = dst;
    copies_.push_back({src, dst});
  }
  for (int64_t i = 0; i < grow; ++i) s.blocks.push_back(allocate_block());
  return true;
}

int64_t BlockPool::register_blocks(int64_t seq_id, const int64_t* tokens, int64_t n) {
  Sequence& s = seq(seq_id);
  if (n % block_size_ != 0) bad("len(token_ids) must be a multiple of block_size");
  const int64_t k = n / block_size_;
  if (s.num_registered + k > static_cast<int64_t>(s.blocks.size()))
    bad("registering past the sequence's last block");

  for (int64_t i = 0; caching_ && i < k; ++i) {
    const int64_t* blk = tokens + i * block_size_;
    int32_t b = s.blocks[s.num_registered + i];
    uint64_t h = hash_block(s.last_hash, blk);
    int32_t canonical = b;
    auto it = cache_.find(h);
    if (it != cache_.end()) {
      // Identical content already cached: chain on from it so lookups that
      // find it also find our children. A collision keeps the old entry.
      if (same_content(it->second, blk, s.parent)) canonical = it->second;
    } else if (!registered_[b]) {
      registered_[b] = 1;
      hash_[b] = h;
      parent_[b] = s.parent;
      std::copy(blk, blk + block_size_, tokens_.begin() + b * block_size_);
      cache_.emplace(h, b);
    }
    s.last_hash = h;
    s.parent = {canonical, gen_[canonical]};
  }
  s.num_registered += k;
  return s.num_registered;
}

void BlockPool::fork(int64_t parent_id, int64_t child_id) {
  const Sequence& p = seq(parent_id);
  if (seqs_.count(child_id)) bad("duplicate seq_id " + std::to_string(child_id));
  for (int32_t b : p.blocks) ++ref_[b];  // shared blocks are never free
  Sequence copy = p;  // copy before emplace: it may rehash and move p
  seqs_.emplace(child_id, std::move(copy));
}

void BlockPool::free_sequence(int64_t seq_id) {
  Sequence& s = seq(seq_id);
  // Reverse order: with LRU the deeper blocks of a chain are evicted first.
  for (auto it = s.blocks.rbegin(); it != s.blocks.rend(); ++it) release(*it);
  seqs_.erase(seq_id);
}

std::vector<std::array<int32_t, 2>> BlockPool::take_copies() {
  for (int32_t b : copy_sources_) release(b);  // the caller copies before it allocates again
  copy_sources_.clear();
  return std::exchange(copies_, {});
}

// ---- batch tensors ----------------------------------------------------------

void BlockPool::build_block_tables(const int64_t* seq_ids, int64_t n, int32_t* out,
                                   int64_t m) const {
  for (int64_t i = 0; i < n; ++i)  // validate everything before writing
    if (static_cast<int64_t>(seq(seq_ids[i]).blocks.size()) > m)
      bad("seq_id " + std::to_string(seq_ids[i]) + " has more blocks than the table has columns");
  for (int64_t i = 0; i < n; ++i) {
    const auto& blocks = seq(seq_ids[i]).blocks;
    int32_t* row = out + i * m;
    std::copy(blocks.begin(), blocks.end(), row);
    std::fill(row + blocks.size(), row + m, -1);
  }
}

void BlockPool::build_slot_mapping(const int64_t* seq_ids, const int64_t* starts,
                                   const int64_t* ends, int64_t n, int64_t* out,
                                   int64_t total) const {
  int64_t sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    const auto& blocks = seq(seq_ids[i]).blocks;
    if (starts[i] < 0 || starts[i] > ends[i]) bad("need 0 <= start <= end");
    if (ends[i] > static_cast<int64_t>(blocks.size()) * block_size_)
      bad("position beyond the blocks of seq_id " + std::to_string(seq_ids[i]));
    sum += ends[i] - starts[i];
  }
  if (sum != total) bad("out has " + std::to_string(total) + " slots, need " + std::to_string(sum));
  for (int64_t i = 0; i < n; ++i) {
    const auto& blocks = seq(seq_ids[i]).blocks;
    for (int64_t p = starts[i]; p < ends[i]; ++p)
      *out++ = blocks[p / block_size_] * block_size_ + p % block_size_;
  }
}

}  // namespace speedx
