"""Block allocation order: low block ids first, cached prefixes kept until nothing else is free."""

from __future__ import annotations

from preft.engine.block_manager import BlockManager
from preft.engine.sampler import SamplingParams
from preft.engine.sequence import AdapterRef, Sequence

BLOCK = 4


def seq(tokens: list[int]) -> Sequence:
    return Sequence("r", tokens, SamplingParams())


def admit(bm: BlockManager, tokens: list[int]) -> Sequence:
    s = seq(tokens)
    assert bm.allocate(s, 10_000) > 0
    s.num_computed_tokens = s.num_tokens
    bm.register_computed(s, 0)
    return s


def test_freed_blocks_are_reused_lowest_id_first_before_untouched_ones():
    bm = BlockManager(num_blocks=64, block_size=BLOCK, enable_prefix_caching=False)
    a, b, c = admit(bm, list(range(12))), admit(bm, list(range(8))), admit(bm, list(range(12)))
    assert (a.block_table, b.block_table, c.block_table) == ([0, 1, 2], [3, 4], [5, 6, 7])
    bm.free_sequence(b)
    bm.free_sequence(a)
    d = admit(bm, list(range(16)))
    assert d.block_table == [0, 1, 2, 3]  # not the never-used 8.., and not in the order they were freed
    bm.append(d, 8)
    assert d.block_table == [0, 1, 2, 3, 4, 8]


def test_cached_prefix_blocks_outlive_free_uncached_ones_then_go_least_recently_freed_first():
    bm = BlockManager(num_blocks=6, block_size=BLOCK, enable_prefix_caching=True)
    first = admit(bm, [1] * 8 + [9])  # two full prompt blocks are cached (0, 1), block 2 holds the last token
    second = admit(bm, [2] * 4 + [9])  # block 3 cached, block 4 not
    bm.free_sequence(first)
    bm.free_sequence(second)
    assert bm.num_free_blocks == 6 and bm.num_used_blocks == 0
    fresh = admit(bm, [7, 7])  # an uncached free block is taken: the lowest one
    assert fresh.block_table == [2]
    hit = seq([1] * 8 + [5])
    assert bm.allocate(hit, 10_000) == 1 and hit.block_table[:2] == [0, 1]  # the cached prefix is still there
    bm.free_sequence(hit)
    bm.free_sequence(fresh)
    big = admit(bm, [8] * 24)  # needs all 6 blocks: uncached ones first, then cached ones, least recently freed first
    assert big.block_table == [2, 4, 5, 3, 1, 0]
    assert bm.match_prefix(seq([1] * 8 + [5])) == []  # evicted blocks are no longer found


def test_counts_stay_consistent_through_hits_and_frees():
    bm = BlockManager(num_blocks=8, block_size=BLOCK, enable_prefix_caching=True)
    a = admit(bm, [3] * 8 + [1])
    bm.free_sequence(a)
    b = admit(bm, [3] * 8 + [2])
    assert b.num_cached_tokens == 8 and bm.hits == 1
    assert bm.num_used_blocks == 3 and bm.num_free_blocks == 5
    bm.free_sequence(b)
    assert bm.num_free_blocks == 8


def test_block_cache_keys_name_the_adapter_and_mask_only_for_blocks_it_edits():
    ref = AdapterRef("a", "direft", "prefill", "h", positions=(1, 2))  # edits the first prompt token and the last two
    s = Sequence("r", list(range(12)), SamplingParams(), ref)
    keys = s.block_cache_keys(0, 3, BLOCK)
    assert keys == [((0, 1, 2, 3), "a:h:1000"), ((4, 5, 6, 7), ""), ((8, 9, 10, 11), "a:h:0011")]
    assert [s.block_cache_keys(i, i + 1, BLOCK)[0] for i in range(3)] == keys  # a range is its blocks one by one
    assert seq(list(range(12))).block_cache_keys(0, 3, BLOCK) == [(k[0], "") for k in keys]  # no adapter
