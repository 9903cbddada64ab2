import pytest

from services.engine import kv_cache
from services.engine.kv_cache import BlockManager, num_kv_blocks
from services.engine.sequence import Sequence


def make_seq(seq_id, tokens, request_id=None):
    return Sequence(seq_id, request_id or f"req-{seq_id}", tokens)


def prefill(bm, seq):
    """Allocate and register everything a full prefill would compute."""
    bm.allocate(seq)
    bm.commit(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.check_invariants()


def test_num_kv_blocks_counts_k_and_v_over_all_layers():
    # Grok-1 on one of 8 tensor-parallel ranks: 1 kv head of 128, 64 layers, bf16, 16-token blocks.
    per_block = 2 * 64 * 16 * 1 * 128 * 2
    assert per_block == 524288
    kw = {"num_layers": 64, "num_kv_heads": 1, "head_size": 128, "block_size": 16, "dtype_bytes": 2}
    assert num_kv_blocks(2**30, **kw) == 2048
    assert num_kv_blocks(2**30 - 1, **kw) == 2047
    assert num_kv_blocks(per_block - 1, **kw) == 0


@pytest.mark.parametrize("field", ["num_layers", "num_kv_heads", "head_size", "block_size", "dtype_bytes"])
def test_num_kv_blocks_validates(field):
    kw = {"num_layers": 2, "num_kv_heads": 1, "head_size": 8, "block_size": 4, "dtype_bytes": 2}
    kw[field] = 0
    with pytest.raises(ValueError, match=field):
        num_kv_blocks(1024, **kw)
    with pytest.raises(ValueError, match="memory_bytes"):
        num_kv_blocks(-1, num_layers=2, num_kv_heads=1, head_size=8, block_size=4, dtype_bytes=2)


def test_allocate_and_free_return_every_block():
    bm = BlockManager(8, 4)
    a, b = make_seq(0, range(10)), make_seq(1, range(100, 105))
    assert bm.can_allocate(a)
    assert bm.allocate(a) == 0
    bm.allocate(b)
    assert len(a.block_table) == 3 and len(b.block_table) == 2
    assert bm.num_free_blocks == 3 and bm.usage == pytest.approx(5 / 8)
    bm.check_invariants()
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8 and bm.usage == 0.0
    assert not a.block_table and a.num_computed_tokens == 0
    bm.check_invariants()


def test_cannot_allocate_beyond_capacity():
    bm = BlockManager(2, 4)
    big = make_seq(0, range(9))  # 3 blocks
    assert not bm.can_allocate(big)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate(big)
    bm.check_invariants()
    assert bm.num_free_blocks == 2


def test_prefix_hit_shares_full_blocks_but_never_the_last_token():
    bm = BlockManager(16, 4)
    a = make_seq(0, range(10))
    prefill(bm, a)
    b = make_seq(1, list(range(10)) + [55, 56])
    assert bm.allocate(b) == 8  # blocks [0..3], [4..7]; tokens 8.. differ in block 2's fill
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert bm.blocks[a.block_table[0]].ref_count == 2
    # A prompt of exactly 8 cached tokens must still compute its last token: only 1 block hits.
    c = make_seq(2, range(8))
    assert bm.allocate(c) == 4
    assert bm.prefix_cache_queries == 10 + 12 + 8
    assert bm.prefix_cache_hits == 8 + 4
    bm.check_invariants()


def test_disabled_prefix_caching_never_hits():
    bm = BlockManager(16, 4, enable_prefix_caching=False)
    a = make_seq(0, range(10))
    prefill(bm, a)
    b = make_seq(1, range(10))
    assert bm.allocate(b) == 0
    assert bm.prefix_cache_queries == 0
    bm.check_invariants()


def test_freed_blocks_stay_cached_and_are_revived():
    bm = BlockManager(4, 4)
    a = make_seq(0, range(12))  # 3 blocks, the third full too
    prefill(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 4 and bm.num_cached_free_blocks == 3
    # 4 blocks needed, 2 of them revived from the cache: fits in exactly 4 free blocks.
    b = make_seq(1, list(range(12)) + [1, 2, 3, 4])
    assert bm.can_allocate(b)
    assert bm.allocate(b) == 12
    assert bm.num_free_blocks == 0
    bm.check_invariants()
    c = make_seq(2, [7])
    assert not bm.can_allocate(c)


def test_revived_blocks_count_against_free_space():
    bm = BlockManager(3, 4)
    a = make_seq(0, range(8))
    prefill(bm, a)
    bm.free(a)
    # Holder of one fresh block leaves 2 free blocks, both cached.
    other = make_seq(1, [99])
    bm.allocate(other)
    assert bm.num_free_blocks == 2
    b = make_seq(2, list(range(8)) + [1])  # 3 blocks: 2 hits (both currently free) + 1 fresh
    assert not bm.can_allocate(b)


def test_lru_eviction_order_oldest_freed_first_and_tail_blocks_first():
    bm = BlockManager(4, 2)
    a = make_seq(0, [1, 2, 3, 4])
    b = make_seq(1, [5, 6, 7, 8])
    prefill(bm, a)
    prefill(bm, b)
    a_blocks, b_blocks = list(a.block_table), list(b.block_table)
    bm.free(a)
    bm.free(b)
    assert bm.num_cached_free_blocks == 4
    # Each fresh block evicts the least recently freed; within a sequence its tail goes first.
    takers = [make_seq(2 + i, [100 + i]) for i in range(2)]
    for taker, expected in zip(takers, [a_blocks[1], a_blocks[0]]):
        bm.allocate(taker)
        assert taker.block_table == [expected]
        assert bm.blocks[expected].hash is None
    bm.check_invariants()
    # b's blocks survived: its prompt hits fully (up to the block of its last token).
    for taker in takers:
        bm.free(taker)
    e = make_seq(4, [5, 6, 7, 8, 0])
    assert bm.allocate(e) == 4 and e.block_table[:2] == b_blocks
    bm.check_invariants()


def test_append_allocates_on_block_boundary_and_registers_full_blocks():
    bm = BlockManager(8, 4)
    a = make_seq(0, [1, 2, 3])
    bm.allocate(a)
    bm.commit(a, 3)
    a.num_computed_tokens = 3
    assert len(a.block_table) == 1
    a.append_token(4)  # fills block 0 once computed
    assert bm.can_append(a)
    bm.may_append(a)
    assert len(a.block_table) == 1
    bm.commit(a, 4)
    a.num_computed_tokens = 4
    assert bm.blocks[a.block_table[0]].hash is not None
    a.append_token(5)  # first token of block 1
    bm.may_append(a)
    assert len(a.block_table) == 2
    bm.check_invariants()
    # A later request with the generated text as prompt reuses the decode-filled block.
    b = make_seq(1, [1, 2, 3, 4, 9])
    assert bm.allocate(b) == 4 and b.block_table[0] == a.block_table[0]
    bm.check_invariants()


def test_can_append_false_when_full():
    bm = BlockManager(1, 2)
    a = make_seq(0, [1, 2])
    prefill(bm, a)
    a.append_token(3)
    assert not bm.can_append(a)
    with pytest.raises(RuntimeError):
        bm.may_append(a)
    bm.check_invariants()


def test_siblings_share_prompt_blocks_and_refcounts():
    bm = BlockManager(8, 4)
    seqs = [Sequence(i, "req", range(9), index=i) for i in range(3)]
    bm.allocate(seqs[0])
    bm.commit(seqs[0], 9)  # the first sibling's prefill registers blocks 0 and 1
    for s in seqs[1:]:
        assert bm.allocate(s) == 8
    shared = seqs[0].block_table[:2]
    assert all(s.block_table[:2] == shared for s in seqs)
    assert [bm.blocks[b].ref_count for b in shared] == [3, 3]
    assert bm.num_free_blocks == 8 - 2 - 3
    bm.free(seqs[0])
    assert [bm.blocks[b].ref_count for b in shared] == [2, 2]
    bm.check_invariants()


def test_same_prefix_committed_twice_keeps_one_copy_and_children_chain():
    bm = BlockManager(16, 2)
    a = make_seq(0, [1, 2, 3, 4, 0])
    b = make_seq(1, [1, 2, 3, 4, 5, 6, 0])
    bm.allocate(a)
    bm.allocate(b)  # no hits yet: both compute the shared prefix in the same step
    bm.commit(a, 5)
    bm.commit(b, 7)
    bm.check_invariants()
    assert bm.blocks[b.block_table[0]].hash is None  # duplicate of a's block
    assert bm.blocks[b.block_table[2]].hash is not None  # b's own continuation is registered
    c = make_seq(2, [1, 2, 3, 4, 5, 6, 9])
    assert bm.allocate(c) == 6
    assert c.block_table[:3] == a.block_table[:2] + b.block_table[2:3]
    bm.check_invariants()


def test_forced_hash_collision_is_a_miss_not_a_wrong_hit(monkeypatch):
    monkeypatch.setattr(kv_cache, "hash_block_tokens", lambda parent, tokens: 42)
    bm = BlockManager(16, 2)
    a = make_seq(0, [1, 2, 3, 4, 0])
    prefill(bm, a)
    b = make_seq(1, [7, 8, 3, 4, 0])  # first block differs, same hash
    assert bm.allocate(b) == 0
    c = make_seq(2, [1, 2, 9, 9, 0])  # first block matches for real, second collides
    assert bm.allocate(c) == 2
    bm.check_invariants()
    for s in (a, b, c):
        bm.free(s)
    bm.check_invariants()


def test_a_child_registered_after_another_prefix_is_not_reused(monkeypatch):
    # A hash blind to the parent: the chain alone would then accept a block computed after a
    # different prefix. The parent-identity check must refuse it.
    monkeypatch.setattr(kv_cache, "hash_block_tokens", lambda parent, tokens: hash(tokens))
    bm = BlockManager(12, 2)
    s1 = make_seq(0, [1, 2, 3, 4, 0])
    s2 = make_seq(1, [1, 2, 3, 4, 5, 6, 0])
    bm.allocate(s1)
    bm.allocate(s2)
    bm.commit(s1, 5)
    bm.commit(s2, 7)  # s2's [5, 6] block is registered as the child of prefix [1, 2, 3, 4]
    bm.free(s1)
    filler = make_seq(2, range(100, 100 + 2 * bm.num_free_blocks))
    bm.allocate(filler)  # evicts s1's cached [1, 2] and [3, 4]
    bm.free(s2)  # [5, 6] stays cached
    bm.free(filler)
    bm.check_invariants()
    d = make_seq(3, [7, 8, 9, 10, 0])
    prefill(bm, d)
    probe = make_seq(4, [7, 8, 9, 10, 5, 6, 0])
    assert bm.allocate(probe) == 4  # [7, 8], [9, 10] hit; [5, 6] was computed after [1, 2, 3, 4]
    bm.check_invariants()


def test_reset_prefix_cache_forgets_everything():
    bm = BlockManager(8, 2)
    a = make_seq(0, [1, 2, 3, 4, 0])
    b = make_seq(1, [5, 6, 0])
    prefill(bm, a)
    prefill(bm, b)
    bm.free(a)
    bm.reset_prefix_cache()
    bm.check_invariants()
    assert bm.num_cached_free_blocks == 0
    assert bm.allocate(make_seq(2, [1, 2, 3, 4, 0])) == 0
    assert bm.allocate(make_seq(3, [5, 6, 0])) == 0
    bm.check_invariants()


def test_invariant_checker_catches_corruption():
    bm = BlockManager(4, 2)
    a = make_seq(0, [1, 2, 3])
    bm.allocate(a)
    bm.blocks[a.block_table[0]].ref_count += 1
    with pytest.raises(AssertionError, match="ref_count"):
        bm.check_invariants()
