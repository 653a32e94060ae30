"""Tests for the C++ KV-cache block pool (speedx._C.BlockPool)."""

import numpy as np
import pytest

from speedx._C import BlockPool

BS = 4


def toks(*blocks, tail=()):
    """Token list made of full blocks (each given by one repeated value) plus a tail."""
    return [v for b in blocks for v in [b] * BS] + list(tail)


def cache_one(pool, seq_id, tokens):
    """Allocate, 'compute' and register every full block, then free: leaves a cached chain."""
    assert pool.allocate_sequence(seq_id, tokens, len(tokens)) >= 0
    full = len(tokens) // BS * BS
    pool.register_blocks(seq_id, tokens[:full])
    table = pool.block_table(seq_id)
    pool.free_sequence(seq_id)
    return table


# ---- allocation -------------------------------------------------------------


def test_allocation_and_counts():
    pool = BlockPool(10, BS)
    assert (pool.num_blocks, pool.block_size, pool.enable_prefix_caching) == (10, BS, True)
    assert pool.num_free_blocks == 10 and pool.num_sequences == 0
    assert pool.allocate_sequence(1, [1, 2, 3, 4, 5], 9) == 0
    assert pool.num_sequence_blocks(1) == 3
    assert len(set(pool.block_table(1))) == 3
    assert pool.num_free_blocks == 7 and pool.num_sequences == 1
    assert pool.ensure_capacity(1, 9, 13)
    assert pool.num_sequence_blocks(1) == 4 and pool.num_free_blocks == 6
    assert pool.ensure_capacity(1, 13, 13)  # nothing to write, nothing changes
    assert pool.num_free_blocks == 6
    pool.free_sequence(1)
    assert pool.num_free_blocks == 10 and not pool.has_sequence(1)
    assert pool.num_cached_blocks == 0


def test_token_ids_accept_list_and_arrays():
    pool = BlockPool(10, BS)
    assert pool.allocate_sequence(1, np.arange(5, dtype=np.int32), 5) == 0
    assert pool.allocate_sequence(2, np.arange(5, dtype=np.int64), 5) == 0
    assert pool.num_free_blocks == 6


def test_exhaustion_changes_nothing():
    pool = BlockPool(4, BS)
    assert pool.allocate_sequence(1, [1] * 8, 8) == 0
    assert pool.allocate_sequence(2, [2] * 5, 9) == -1  # needs 3, 2 free
    assert pool.num_free_blocks == 2 and not pool.has_sequence(2)
    assert pool.num_query_tokens == 8
    assert not pool.ensure_capacity(1, 8, 17)  # needs 3 more
    assert pool.num_sequence_blocks(1) == 2 and pool.num_free_blocks == 2
    assert pool.ensure_capacity(1, 8, 16)
    assert pool.num_free_blocks == 0
    pool.free_sequence(1)
    assert pool.num_free_blocks == 4


def test_exhaustion_counts_free_cached_hits():
    pool = BlockPool(3, BS)
    cache_one(pool, 1, toks(1, 2, tail=[9]))  # 2 cached free blocks + 1 plain
    # A hit on the 2 cached blocks still consumes them, so 4 blocks are needed.
    assert pool.allocate_sequence(2, toks(1, 2, tail=[9]), 13) == -1
    assert pool.num_free_blocks == 3 and pool.num_cached_blocks == 2
    assert pool.allocate_sequence(2, toks(1, 2, tail=[9]), 12) == 2 * BS


# ---- prefix caching ---------------------------------------------------------


def test_prefix_hit_revives_free_cached_block():
    pool = BlockPool(8, BS)
    prompt = toks(1, 2, tail=[7, 7])
    table = cache_one(pool, 1, prompt)
    assert pool.num_cached_blocks == 2 and pool.num_free_blocks == 8
    assert pool.allocate_sequence(2, prompt, len(prompt)) == 2 * BS
    assert pool.block_table(2)[:2] == table[:2]
    assert pool.ref_count(table[0]) == 1 and pool.num_free_blocks == 5
    assert (pool.num_query_tokens, pool.num_hit_tokens) == (2 * len(prompt), 2 * BS)
    # A concurrent sequence shares the live cached blocks.
    assert pool.allocate_sequence(3, prompt, len(prompt)) == 2 * BS
    assert pool.ref_count(table[0]) == 2 and pool.num_free_blocks == 4


def test_hit_chain_state_continues():
    pool = BlockPool(8, BS)
    cache_one(pool, 1, toks(1, 2, tail=[0]))
    # Seq 2 reuses two blocks and registers its third; seq 3 then hits all three.
    prompt = toks(1, 2, 3, tail=[0])
    assert pool.allocate_sequence(2, prompt, len(prompt)) == 2 * BS
    assert pool.register_blocks(2, toks(3)) == 3
    assert pool.allocate_sequence(3, prompt, len(prompt)) == 3 * BS
    assert pool.block_table(3)[:3] == pool.block_table(2)[:3]


@pytest.mark.parametrize("where", [0, 1, 2])
def test_miss_on_any_different_token(where):
    pool = BlockPool(16, BS)
    prompt = toks(1, 2, 3, tail=[0])
    cache_one(pool, 1, prompt)
    other = list(prompt)
    other[where * BS + 2] = 99
    assert pool.allocate_sequence(2, other, len(other)) == where * BS


def test_chained_miss():
    pool = BlockPool(16, BS)
    cache_one(pool, 1, toks(1, 2, tail=[0]))
    # Block 2 has the same tokens, but its parent differs: no hit at all.
    assert pool.allocate_sequence(2, toks(5, 2, tail=[0]), 9) == 0


def test_whole_prompt_hit_copies_the_last_block_and_leaves_one_token():
    pool = BlockPool(16, BS)
    table = cache_one(pool, 1, toks(1, 2, 3))
    # All 12 tokens are cached, but the last one must be computed for its logits: the first two
    # blocks are shared, the third is a copy of the cached one (written at slot 11 only).
    assert pool.allocate_sequence(2, toks(1, 2, 3), 12) == 11
    mine = pool.block_table(2)
    assert mine[:2] == table[:2] and mine[2] != table[2]
    assert pool.take_copies().tolist() == [[table[2], mine[2]]]
    assert pool.num_hit_tokens == 11
    # Its chain continues from the shared blocks: registering the copy keeps one cache entry, and
    # the next identical prompt still hits all three cached blocks.
    assert pool.register_blocks(2, toks(3)) == 3
    assert pool.num_cached_blocks == 3
    assert pool.allocate_sequence(3, toks(1, 2, 3, tail=[5]), 13) == 3 * BS
    assert pool.block_table(3)[:3] == table[:3]
    assert pool.allocate_sequence(4, toks(1), 4) == 3  # a one-block prompt: its block is copied
    assert pool.take_copies().tolist() == [[table[0], pool.block_table(4)[0]]]


def test_copy_source_is_held_until_the_copy_is_taken():
    pool = BlockPool(3, BS)
    table = cache_one(pool, 1, toks(1, 2))  # 2 cached free blocks, 1 plain
    assert pool.allocate_sequence(2, toks(1, 2), 8) == 7  # block 0 shared, block 1 copied
    src = table[1]
    assert pool.ref_count(src) == 1 and pool.num_free_blocks == 0
    # Out of blocks: the copy source is not up for eviction before the copy is done.
    assert pool.allocate_sequence(3, [9], 1) == -1
    assert pool.take_copies().tolist() == [[src, pool.block_table(2)[1]]]
    assert pool.ref_count(src) == 0 and pool.num_free_blocks == 1  # free again, still cached
    assert pool.num_cached_blocks == 2


def test_register_identical_content_keeps_one_entry():
    pool = BlockPool(16, BS)
    prompt = toks(1, 2, tail=[0])
    for sid in (1, 2):  # two sequences computed the same blocks concurrently
        assert pool.allocate_sequence(sid, prompt, len(prompt)) == 0
    assert pool.register_blocks(1, toks(1)) == 1
    # Seq 2's block 0 duplicates seq 1's: its block 1 must chain on seq 1's.
    assert pool.register_blocks(2, toks(1, 2)) == 2
    assert pool.register_blocks(1, toks(2)) == 2
    assert pool.num_cached_blocks == 2
    first = [pool.block_table(1)[0], pool.block_table(2)[1]]
    pool.free_sequence(1)
    pool.free_sequence(2)
    assert pool.allocate_sequence(3, prompt, len(prompt)) == 2 * BS
    assert pool.block_table(3)[:2] == first[:2]


def test_disabled_prefix_caching():
    pool = BlockPool(8, BS, enable_prefix_caching=False)
    assert not pool.enable_prefix_caching
    prompt = toks(1, 2, tail=[0])
    assert pool.allocate_sequence(1, prompt, len(prompt)) == 0
    assert pool.register_blocks(1, toks(1, 2)) == 2  # count still advances
    pool.free_sequence(1)
    assert pool.num_cached_blocks == 0
    assert pool.allocate_sequence(2, prompt, len(prompt)) == 0


def test_reset_prefix_cache():
    pool = BlockPool(8, BS)
    prompt = toks(1, 2, tail=[0])
    cache_one(pool, 1, prompt)
    assert pool.allocate_sequence(2, toks(1, tail=[0]), 5) == BS  # keeps block 0 alive
    pool.reset_prefix_cache()
    assert pool.num_cached_blocks == 1  # in-use block stays registered
    assert pool.allocate_sequence(3, prompt, len(prompt)) == BS


# ---- LRU eviction -----------------------------------------------------------


def test_lru_eviction_order():
    pool = BlockPool(4, BS)
    a = cache_one(pool, 1, toks(1, 2))  # older chain: 2 cached blocks
    b = cache_one(pool, 2, toks(3, 4))  # newer chain
    assert pool.num_cached_blocks == 4 and pool.num_free_blocks == 4
    # One fresh block evicts the deepest block of the older chain.
    assert pool.allocate_sequence(10, [0], 1) == 0
    assert pool.block_table(10) == [a[1]]
    assert pool.num_cached_blocks == 3
    assert pool.allocate_sequence(11, [0], 1) == 0
    assert pool.block_table(11) == [a[0]]
    assert pool.allocate_sequence(12, [0], 1) == 0
    assert pool.block_table(12) == [b[1]]
    # The newer chain's first block survived and still hits.
    assert pool.allocate_sequence(13, toks(3, tail=[0]), 5) == -1  # needs 2, 1 free
    pool.free_sequence(10)
    assert pool.allocate_sequence(13, toks(3, tail=[0]), 5) == BS
    assert pool.block_table(13)[0] == b[0]


def test_plain_free_blocks_reused_before_cached():
    pool = BlockPool(6, BS)
    cached = cache_one(pool, 1, toks(1, 2))
    assert pool.allocate_sequence(2, [5] * 6, 6) == 0
    plain = pool.block_table(2)
    pool.free_sequence(2)  # 2 unregistered blocks go back to the head
    assert pool.allocate_sequence(3, [6] * 8, 8) == 0
    assert sorted(pool.block_table(3)) == sorted(plain)
    assert pool.num_cached_blocks == 2
    assert not set(pool.block_table(3)) & set(cached)


# ---- fork and copy-on-write -------------------------------------------------


def test_fork_shares_blocks():
    pool = BlockPool(8, BS)
    assert pool.allocate_sequence(1, [1] * 6, 6) == 0
    pool.fork(1, 2)
    assert pool.block_table(2) == pool.block_table(1)
    assert all(pool.ref_count(b) == 2 for b in pool.block_table(1))
    assert pool.num_free_blocks == 6
    pool.free_sequence(1)
    assert pool.num_free_blocks == 6  # child keeps them alive
    assert all(pool.ref_count(b) == 1 for b in pool.block_table(2))
    pool.free_sequence(2)
    assert pool.num_free_blocks == 8


def test_fork_copies_hash_chain_state():
    pool = BlockPool(8, BS)
    assert pool.allocate_sequence(1, toks(1, 2, tail=[0]), 9) == 0
    assert pool.register_blocks(1, toks(1)) == 1
    pool.fork(1, 2)
    assert pool.register_blocks(2, toks(2)) == 2  # child continues after block 0
    assert pool.register_blocks(1, toks(2)) == 2  # same shared block: no new entry
    assert pool.num_cached_blocks == 2
    assert pool.allocate_sequence(3, toks(1, 2, tail=[0]), 9) == 2 * BS


def test_copy_on_write_partial_last_block():
    pool = BlockPool(8, BS)
    assert pool.allocate_sequence(1, [1] * 6, 6) == 0  # blocks: full + 2/4 filled
    pool.fork(1, 2)
    assert pool.take_copies().shape == (0, 2)
    shared_last = pool.block_table(1)[1]
    # Child writes position 6: the shared partial block is copied.
    assert pool.ensure_capacity(2, 6, 7)
    copies = pool.take_copies()
    assert copies.dtype == np.int64 and copies.shape == (1, 2)
    child_last = pool.block_table(2)[1]
    assert copies.tolist() == [[shared_last, child_last]] and child_last != shared_last
    assert pool.block_table(2)[0] == pool.block_table(1)[0]  # full block still shared
    assert pool.ref_count(shared_last) == 1 and pool.num_free_blocks == 5
    # Parent is now the sole owner: writes in place.
    assert pool.ensure_capacity(1, 6, 7)
    assert pool.take_copies().shape == (0, 2)
    assert pool.block_table(1)[1] == shared_last
    assert pool.take_copies().shape == (0, 2)  # cleared by the previous call


def test_copy_on_write_exhaustion():
    pool = BlockPool(2, BS)
    assert pool.allocate_sequence(1, [1] * 6, 6) == 0
    pool.fork(1, 2)
    assert not pool.ensure_capacity(2, 0, 8)  # two shared blocks, no free block
    assert pool.block_table(2) == pool.block_table(1)
    assert pool.take_copies().shape == (0, 2)


# ---- batch tensors ----------------------------------------------------------


def test_block_tables_and_slot_mapping_random():
    rng = np.random.default_rng(0)
    pool = BlockPool(200, BS)
    lens = {}
    for sid in range(12):
        n = int(rng.integers(1, 40))
        assert pool.allocate_sequence(sid, rng.integers(0, 50, n).tolist(), n) == 0
        lens[sid] = n
    for sid in range(0, 12, 3):  # interleave frees and new allocations
        pool.free_sequence(sid)
        del lens[sid]
    for sid in range(100, 104):
        n = int(rng.integers(1, 40))
        assert pool.allocate_sequence(sid, [1] * n, n) == 0
        lens[sid] = n

    ids = np.array(sorted(lens), dtype=np.int64)
    m = max(pool.num_sequence_blocks(int(s)) for s in ids) + 2
    out = np.zeros((len(ids), m), dtype=np.int32)
    pool.build_block_tables(ids, out)
    for row, sid in zip(out, ids):
        t = pool.block_table(int(sid))
        assert row.tolist() == t + [-1] * (m - len(t))

    starts = np.array([rng.integers(0, lens[s] + 1) for s in ids], dtype=np.int64)
    ends = np.array([rng.integers(st, lens[s] + 1) for st, s in zip(starts, ids)], dtype=np.int64)
    slots = np.empty(int((ends - starts).sum()), dtype=np.int64)
    pool.build_slot_mapping(ids, starts, ends, slots)
    expect = []
    for sid, st, en in zip(ids, starts, ends):
        t = pool.block_table(int(sid))
        expect += [t[p // BS] * BS + p % BS for p in range(st, en)]
    assert slots.tolist() == expect


# ---- misuse -----------------------------------------------------------------


def test_bad_inputs():
    with pytest.raises(ValueError):
        BlockPool(0, BS)
    with pytest.raises(ValueError):
        BlockPool(4, 0)
    pool = BlockPool(8, BS)
    assert pool.allocate_sequence(1, [1] * 5, 5) == 0
    with pytest.raises(ValueError, match="duplicate"):
        pool.allocate_sequence(1, [1], 1)
    with pytest.raises(ValueError):
        pool.allocate_sequence(2, [], 1)
    with pytest.raises(ValueError):
        pool.allocate_sequence(2, [1, 2], 1)  # num_tokens < len(token_ids)
    with pytest.raises(ValueError):
        pool.allocate_sequence(2, np.zeros(3, dtype=np.float32), 3)
    with pytest.raises(ValueError):
        pool.allocate_sequence(2, np.zeros((1, 3), dtype=np.int64), 3)
    with pytest.raises(ValueError):
        pool.allocate_sequence(2, ["a"], 3)
    for call in (
        lambda: pool.free_sequence(7),
        lambda: pool.block_table(7),
        lambda: pool.num_sequence_blocks(7),
        lambda: pool.ensure_capacity(7, 0, 1),
        lambda: pool.register_blocks(7, [1] * BS),
        lambda: pool.fork(7, 8),
    ):
        with pytest.raises(KeyError, match="7"):
            call()
    with pytest.raises(ValueError, match="duplicate"):
        pool.fork(1, 1)
    with pytest.raises(ValueError):
        pool.ensure_capacity(1, 5, 4)
    with pytest.raises(ValueError):
        pool.register_blocks(1, [1] * 3)  # not a multiple of block_size
    with pytest.raises(ValueError):
        pool.register_blocks(1, [1] * 3 * BS)  # past the sequence's 2 blocks
    with pytest.raises(ValueError):
        pool.ref_count(8)
    assert pool.num_sequences == 1 and pool.num_free_blocks == 6

    ids = np.array([1], dtype=np.int64)
    with pytest.raises(ValueError):
        pool.build_block_tables(ids, np.zeros((1, 1), dtype=np.int32))  # too few columns
    with pytest.raises(ValueError):
        pool.build_block_tables(ids, np.zeros((1, 4), dtype=np.int64))  # dtype
    with pytest.raises(ValueError):
        pool.build_block_tables(ids, np.zeros((2, 4), dtype=np.int32))  # rows
    with pytest.raises(ValueError):
        pool.build_block_tables(ids.astype(np.int32), np.zeros((1, 4), dtype=np.int32))
    with pytest.raises(ValueError):
        pool.build_block_tables(ids, np.zeros((1, 8), dtype=np.int32)[:, ::2])  # strided
    ro = np.zeros((1, 4), dtype=np.int32)
    ro.flags.writeable = False
    with pytest.raises(ValueError):
        pool.build_block_tables(ids, ro)
    with pytest.raises(KeyError):
        pool.build_block_tables(np.array([9], dtype=np.int64), np.zeros((1, 4), dtype=np.int32))

    z = np.zeros(1, dtype=np.int64)
    with pytest.raises(ValueError):
        pool.build_slot_mapping(ids, z, z + 3, np.zeros(2, dtype=np.int64))  # total mismatch
    with pytest.raises(ValueError):
        pool.build_slot_mapping(ids, z, z + 9, np.zeros(9, dtype=np.int64))  # beyond blocks
    with pytest.raises(ValueError):
        pool.build_slot_mapping(ids, z + 2, z + 1, np.zeros(0, dtype=np.int64))  # start > end
    with pytest.raises(ValueError):
        pool.build_slot_mapping(ids, z, np.zeros(2, dtype=np.int64), np.zeros(0, dtype=np.int64))
    with pytest.raises(ValueError):
        pool.build_slot_mapping(ids, z, z + 3, np.zeros(3, dtype=np.int32))


# ---- hash collisions --------------------------------------------------------


def test_collision_safety():
    # Every block hashes to the same value: only verification separates them.
    pool = BlockPool(16, BS, _debug_constant_hash=True)
    a = toks(1, 2, tail=[0])
    cache_one(pool, 1, a)
    assert pool.num_cached_blocks == 1  # block 1 collided with block 0: not registered
    assert pool.allocate_sequence(2, toks(3, 2, tail=[0]), 9) == 0  # different tokens miss
    assert pool.allocate_sequence(3, a, 9) == BS  # the true block 0 still hits
    # Registering colliding content keeps the existing entry intact.
    assert pool.register_blocks(2, toks(3, 2)) == 2
    assert pool.num_cached_blocks == 1
    for sid in (2, 3):
        pool.free_sequence(sid)
    assert pool.allocate_sequence(4, toks(3, tail=[0]), 5) == 0
    assert pool.allocate_sequence(5, a, 9) == BS
    # Same tokens, same hash, but the cached block sits at position 0, not 1.
    assert pool.allocate_sequence(6, toks(1, 1, tail=[0]), 9) == BS


def test_unchained_collision_checks_parent():
    # Hash ignores the prefix: equal blocks collide after different prefixes.
    pool = BlockPool(16, BS, _debug_unchained_hash=True)
    cache_one(pool, 1, toks(1, 2, tail=[0]))
    assert pool.num_cached_blocks == 2
    assert pool.allocate_sequence(2, toks(1, 2, tail=[0]), 9) == 2 * BS
    assert pool.allocate_sequence(3, toks(5, 2, tail=[0]), 9) == 0
    assert pool.allocate_sequence(4, toks(2, 2, tail=[0]), 9) == 0


def test_parent_generation_detects_reused_parent_block():
    pool = BlockPool(8, BS, _debug_unchained_hash=True)
    prompt = toks(1, 2, tail=[0])
    for sid in (1, 2):  # computed concurrently
        assert pool.allocate_sequence(sid, prompt, 9) == 0
    assert pool.register_blocks(1, toks(1)) == 1
    assert pool.register_blocks(2, toks(1, 2)) == 2  # its block 1 chains on seq 1's block 0
    parent = pool.block_table(1)[0]
    pool.free_sequence(1)
    pool.reset_prefix_cache()  # drops the free parent; seq 2's block 1 stays cached
    assert pool.num_cached_blocks == 1
    # The parent's block id gets new content at position 0.
    assert pool.allocate_sequence(3, toks(3, tail=[0]), 5) == 0
    assert pool.block_table(3)[0] == parent
    assert pool.register_blocks(3, toks(3)) == 1
    # Block 0 hits the new content; the child of the old content must not.
    assert pool.allocate_sequence(4, toks(3, 2, tail=[0]), 9) == BS


# ---- randomized end-to-end check ---------------------------------------------


@pytest.mark.parametrize("hash_mode", ["real", "constant", "unchained"])
def test_random_ops_never_serve_wrong_kv(hash_mode):
    """Simulate a runner whose 'KV' at position p is the whole prefix [0..p]
    and that applies the copies: every sequence must read back its own prefixes."""
    rng = np.random.default_rng(1)
    debug = {f"_debug_{hash_mode}_hash": True} if hash_mode != "real" else {}
    pool = BlockPool(24, BS, **debug)
    kv = {}  # block id -> per-slot prefix tuple written there
    seqs = {}  # seq id -> tokens computed so far (all of them are)
    next_id = 0

    def write(sid, start):
        for src, dst in pool.take_copies().tolist():
            kv[dst] = list(kv[src])
        table = pool.block_table(sid)
        for p in range(start, len(seqs[sid])):
            kv.setdefault(table[p // BS], [None] * BS)[p % BS] = tuple(seqs[sid][: p + 1])

    def register(sid, before):
        toks_ = seqs[sid]
        full = len(toks_) // BS
        if full > before:
            assert pool.register_blocks(sid, toks_[before * BS : full * BS]) == full

    for _ in range(600):
        op = rng.integers(0, 10)
        if op < 3 or not seqs:
            prompt = rng.integers(0, 2, int(rng.integers(1, 14))).tolist()
            cached = pool.allocate_sequence(next_id, prompt, len(prompt))
            if cached < 0:
                continue
            seqs[next_id] = prompt
            write(next_id, cached)
            register(next_id, cached // BS)
            next_id += 1
        elif op < 7:
            sid = int(rng.choice(list(seqs)))
            n = len(seqs[sid])
            if not pool.ensure_capacity(sid, n, n + 1):
                continue
            before = n // BS
            seqs[sid] = seqs[sid] + [int(rng.integers(0, 2))]
            write(sid, n)
            register(sid, before)
        elif op < 8:
            sid = int(rng.choice(list(seqs)))
            pool.fork(sid, next_id)
            seqs[next_id] = list(seqs[sid])
            next_id += 1
        else:
            sid = int(rng.choice(list(seqs)))
            pool.free_sequence(sid)
            del seqs[sid]

        refs = [pool.ref_count(b) for b in range(pool.num_blocks)]
        assert pool.num_free_blocks == refs.count(0)
        assert sum(refs) == sum(pool.num_sequence_blocks(s) for s in seqs)
        for sid, toks_ in seqs.items():
            table = pool.block_table(sid)
            assert [kv[table[p // BS]][p % BS] for p in range(len(toks_))] == [
                tuple(toks_[: p + 1]) for p in range(len(toks_))
            ]
    assert pool.num_hit_tokens > 0
