"""Paged KV bookkeeping: blocks handed out and returned, all-or-nothing reservation."""

from __future__ import annotations

import pytest

from moemesh.runtime.block_manager import BlockManager
from moemesh.runtime.types import CapacityError


def test_reserve_grows_tables_by_whole_blocks():
    bm = BlockManager(num_blocks=6, block_size=4)
    bm.reserve({"a": 5, "b": 4})  # a: 2 blocks, b: 1
    assert bm.table("a") == [0, 1] and bm.table("b") == [2]
    assert bm.free_blocks == 3 and bm.sequences == 2
    bm.reserve({"a": 8, "b": 5})  # a still fits in 2 blocks; b needs a second one
    assert bm.table("a") == [0, 1] and bm.table("b") == [2, 3]
    assert bm.missing("a", 9) == 1 and bm.missing("new", 1) == 1


def test_capacity_error_changes_nothing():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.reserve({"a": 8})
    with pytest.raises(CapacityError, match="needs 3 more blocks, 2 of 4 free"):
        bm.reserve({"a": 12, "b": 5})  # a +1, b +2 > 2 free
    assert bm.free_blocks == 2 and bm.table("a") == [0, 1] and "b" not in bm
    bm.reserve({"a": 12, "b": 1})  # exactly the 2 free blocks
    assert bm.free_blocks == 0


def test_free_and_truncate_return_blocks():
    bm = BlockManager(num_blocks=5, block_size=2)
    bm.reserve({"a": 6, "b": 3})
    bm.truncate("a", 3)  # keeps the 2 blocks that hold 3 tokens
    assert bm.table("a") == [0, 1] and bm.free_blocks == 1
    bm.truncate("b", 0)  # 0 tokens: the sequence is dropped
    assert "b" not in bm and bm.free_blocks == 3
    assert bm.free("a") and not bm.free("a") and not bm.free("never")
    assert bm.free_blocks == 5
    bm.reserve({"c": 10})  # every block is reusable
    assert sorted(bm.table("c")) == [0, 1, 2, 3, 4]


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="num_blocks must be >= 1, got 0"):
        BlockManager(0)
    with pytest.raises(ValueError, match="block_size must be >= 1, got 0"):
        BlockManager(4, block_size=0)
