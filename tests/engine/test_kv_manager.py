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
