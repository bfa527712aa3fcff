"""The block allocator: free list, reference counts, prefix cache with chained hashes, LRU eviction."""

import random

import pytest

from llmctl.core.serve.blocks import BlockAllocator, NoFreeBlocksError, block_hash


def _hashes(tokens, block_size):
    out, parent = [], None
    for i in range(len(tokens) // block_size):
        parent = block_hash(parent, tokens[i * block_size : (i + 1) * block_size])
        out.append(parent)
    return out


def test_block_hash_is_chained_through_the_parent():
    a = block_hash(None, [1, 2, 3])
    assert block_hash(None, [1, 2, 3]) == a
    assert block_hash(a, [4, 5]) != block_hash(None, [4, 5])  # same tokens, different prefix
    assert block_hash(None, [1, 2, 3]) != block_hash(None, [1, 23])  # ids are delimited


def test_allocate_until_empty_then_free_returns_every_block():
    alloc = BlockAllocator(4, 16)
    table = [alloc.allocate() for _ in range(4)]
    assert sorted(table) == [0, 1, 2, 3] and alloc.num_free == 0 and alloc.usage == 1.0
    with pytest.raises(NoFreeBlocksError):
        alloc.allocate()
    alloc.free(table)
    assert alloc.num_free == 4 and alloc.num_used == 0
    alloc.check()


def test_double_free_is_refused():
    alloc = BlockAllocator(2, 4)
    b = alloc.allocate()
    alloc.free([b])
    with pytest.raises(AssertionError):
        alloc.free([b])


def test_cached_prefix_is_shared_with_reference_counts():
    alloc = BlockAllocator(8, 4)
    tokens = list(range(10))  # two full blocks + 2 tokens
    hashes = _hashes(tokens, 4)
    table = [alloc.allocate() for _ in range(3)]
    alloc.register(table, hashes, 0, 2)
    hit = alloc.lookup_prefix(hashes, len(tokens))
    assert hit == table[:2]
    assert [alloc.blocks[b].ref_count for b in table] == [2, 2, 1]
    assert alloc.queries == 10 and alloc.hits == 8
    alloc.free(table)
    alloc.free(hit)
    assert alloc.num_used == 0
    # freed but still cached: a later request hits it again
    again = alloc.lookup_prefix(hashes, len(tokens))
    assert again == table[:2] and alloc.num_used == 2
    alloc.check()


def test_a_different_prefix_misses_even_with_equal_block_tokens():
    alloc = BlockAllocator(8, 2)
    a = _hashes([1, 2, 3, 4], 2)
    table = [alloc.allocate() for _ in range(2)]
    alloc.register(table, a, 0, 2)
    b = _hashes([9, 9, 3, 4], 2)  # second block has the same tokens, but another parent
    assert alloc.lookup_prefix(b, 4) == []


def test_eviction_takes_the_least_recently_freed_block_and_forgets_its_hash():
    alloc = BlockAllocator(3, 2)
    seqs = [[10 * i, 10 * i + 1] for i in range(3)]
    tables = []
    for s in seqs:
        t = [alloc.allocate()]
        alloc.register(t, _hashes(s, 2), 0, 1)
        tables.append(t)
    for t in tables:  # freed in order 0, 1, 2: block of seq 0 is the least recently used
        alloc.free(t)
    fresh = alloc.allocate()
    assert fresh == tables[0][0]
    assert alloc.lookup_prefix(_hashes(seqs[0], 2), 2) == []  # evicted
    assert alloc.lookup_prefix(_hashes(seqs[1], 2), 2) == tables[1]  # still cached
    alloc.check()


def test_no_prefix_caching_never_hits():
    alloc = BlockAllocator(4, 2, prefix_caching=False)
    h = _hashes([1, 2], 2)
    t = [alloc.allocate()]
    alloc.register(t, h, 0, 1)
    assert alloc.lookup_prefix(h, 2) == [] and alloc.hits == 0


def test_random_workload_keeps_the_invariants():
    rng = random.Random(0)
    alloc = BlockAllocator(32, 4)
    live = []
    vocab = [[rng.randrange(5) for _ in range(4 * rng.randint(1, 4))] for _ in range(6)]
    for _ in range(500):
        if live and (rng.random() < 0.4 or alloc.num_free < 5):
            alloc.free(live.pop(rng.randrange(len(live))))
        else:
            tokens = rng.choice(vocab)
            hashes = _hashes(tokens, 4)
            table = alloc.lookup_prefix(hashes, len(tokens) + 1)
            table += [alloc.allocate() for _ in range(len(hashes) - len(table))]
            alloc.register(table, hashes, 0, len(hashes))
            live.append(table)
        alloc.check()
    for t in live:
        alloc.free(t)
    assert alloc.num_used == 0 and alloc.hits > 0
    alloc.check()
