"""KVBlockManager: exact block ids (lowest free id first), all-or-nothing growth, slot mapping, and
the double-free / double-ownership checks."""

from __future__ import annotations

import pytest

from cometserve.engine.kv_manager import KVBlockManager


def test_exact_block_ids_lowest_first():
    kv = KVBlockManager(num_blocks=10, block_size=4)
    assert kv.allocate("A", 6) == [0, 1]
    assert kv.allocate("B", 9) == [2, 3, 4]
    assert kv.allocate("A", 2) == []  # 8 tokens still fit in [0, 1]
    assert kv.allocate("A", 1) == [5]
    assert kv.block_table("A") == [0, 1, 5] and kv.num_tokens("A") == 9
    assert kv.free("B") == [2, 3, 4]
    assert kv.allocate("C", 5) == [2, 3]  # the freed ids come back, lowest first
    assert kv.allocate("D", 13) == [4, 6, 7, 8]
    assert kv.num_free_blocks == 1 and kv.usage == pytest.approx(0.9)
    kv.check_invariants()


def test_allocate_is_all_or_nothing():
    kv = KVBlockManager(num_blocks=3, block_size=4)
    assert kv.allocate("A", 8) == [0, 1]
    assert not kv.can_allocate(5) and kv.can_allocate(4)
    assert kv.allocate("B", 5) is None
    assert "B" not in kv and kv.num_free_blocks == 1
    assert not kv.can_allocate(5, "A") and kv.can_allocate(4, "A")
    assert kv.allocate("A", 5) is None
    assert kv.block_table("A") == [0, 1] and kv.num_tokens("A") == 8
    kv.check_invariants()


def test_slots_are_block_id_times_block_size_plus_offset():
    kv = KVBlockManager(num_blocks=8, block_size=4)
    kv.allocate("X", 3)  # [0]
    kv.allocate("A", 6)  # [1, 2]
    kv.allocate("X", 2)  # X grows into [0, 3]
    assert kv.block_table("X") == [0, 3]
    assert kv.slots("A", 0, 6) == [4, 5, 6, 7, 8, 9]
    assert kv.slots("X", 0, 5) == [0, 1, 2, 3, 12]  # position 3 fills block 0 before block 3 is used
    assert kv.slots("X", 3, 5) == [3, 12]
    with pytest.raises(IndexError):
        kv.slots("X", 4, 6)  # position 5 is not covered


def test_free_returns_blocks_and_double_free_raises():
    kv = KVBlockManager(num_blocks=4, block_size=2)
    kv.allocate("A", 3)
    assert kv.free("A") == [0, 1]
    assert kv.num_free_blocks == 4 and kv.usage == 0.0
    with pytest.raises(ValueError, match="double free"):
        kv.free("A")
    with pytest.raises(KeyError):
        kv.block_table("A")


def test_invariant_check_catches_double_ownership():
    kv = KVBlockManager(num_blocks=4, block_size=2)
    kv.allocate("A", 2)
    kv.allocate("B", 2)
    kv._tables["B"][0] = 0  # corrupt: block 0 now in two tables
    with pytest.raises(RuntimeError, match="owned twice|owner"):
        kv.check_invariants()


def test_invariant_check_catches_a_free_block_that_is_owned():
    kv = KVBlockManager(num_blocks=4, block_size=2)
    kv.allocate("A", 2)
    kv._free.append(0)  # corrupt: block 0 both owned and free
    with pytest.raises(RuntimeError):
        kv.check_invariants()


@pytest.mark.parametrize("num_blocks, block_size", [(0, 4), (4, 0), (-1, 4), (4, 2.0)])
def test_constructor_validates(num_blocks, block_size):
    with pytest.raises(ValueError):
        KVBlockManager(num_blocks, block_size)


def test_prefix_cache_register_share_and_evict_oldest_first():
    from cometserve.engine.kv_manager import block_keys

    kv = KVBlockManager(num_blocks=6, block_size=2, enable_prefix_caching=True)
    keys = block_keys([1, 2, 3, 4, 5, 6, 7], 2)  # three full blocks; the 7th token is no block
    assert len(keys) == 3 and keys == block_keys([1, 2, 3, 4, 5, 6], 2)
    assert block_keys([9, 2, 3, 4], 2)[1] != keys[1]  # a key covers the whole prefix, not its block alone
    assert kv.allocate("A", 6) == [0, 1, 2]
    for i, key in enumerate(keys):
        kv.register("A", i, key)
    assert kv.allocate("X", 1) == [3]
    with pytest.raises(ValueError, match="not full"):
        kv.register("X", 0, b"x")  # a block is cached only once written to the end
    kv.free("X")
    assert kv.cached_prefix(keys) == [0, 1, 2] and kv.num_cached_blocks == 3
    assert kv.allocate_prefix("B", [0, 1], 1) == [3]  # shares 0, 1; its own block for token 5
    assert kv.block_table("B") == [0, 1, 3] and kv.num_tokens("B") == 5
    kv.check_invariants()
    kv.free("A")  # 2 goes idle (cached, held by nobody); 0 and 1 stay held by B
    assert kv.num_free_blocks == 3 and kv.num_used_blocks == 3
    kv.free("B")  # freed tail first: idle order 2, then 1, 0 (3 was never cached: free list)
    assert kv.num_free_blocks == 6 and kv.usage == 0.0
    assert kv.allocate("C", 8) == [3, 4, 5, 2]  # free ids first, then the oldest idle block, uncached
    assert kv.cached_prefix(keys) == [0, 1] and kv.num_cached_blocks == 2
    # all or nothing: attaching 0, 1 leaves no block for the 3 new tokens' second block
    assert kv.allocate_prefix("D", [0, 1], 3) is None and "D" not in kv
    assert kv.num_free_blocks == 2
    kv.check_invariants()


def test_prefix_cache_off_frees_straight_back():
    kv = KVBlockManager(num_blocks=4, block_size=2)  # the default: no caching, plain ids
    kv.allocate("A", 4)
    assert kv.free("A") == [0, 1] and kv.num_cached_blocks == 0
    assert kv.allocate("B", 2) == [0]
