"""The KV block allocator on its invariants."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.block_allocator import BlockAllocator


def test_all_or_nothing_and_return() -> None:
    a = BlockAllocator(5)
    got = a.allocate(3)
    assert got is not None and len(set(got)) == 3
    assert a.allocate(3) is None
    assert a.num_free == 2 and a.num_used == 3
    a.free(got)
    assert a.num_free == 5 and a.usage == 0.0


def test_double_free_is_refused() -> None:
    a = BlockAllocator(2)
    (b,) = a.allocate(1) or []
    a.free([b])
    assert a.num_free == 2
    with pytest.raises(ValueError, match="double free"):
        a.free([b])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 6)), max_size=40))
def test_used_plus_free_is_total(ops: list[tuple[bool, int]]) -> None:
    a = BlockAllocator(16)
    held: list[list[int]] = []
    for alloc, n in ops:
        if alloc or not held:
            got = a.allocate(n)
            if got is not None:
                held.append(got)
        else:
            a.free(held.pop(n % len(held)))
        owned = [b for blocks in held for b in blocks]
        assert len(owned) == len(set(owned)) == a.num_used
        assert a.num_used + a.num_free == 16
    for blocks in held:
        a.free(blocks)
    assert a.num_free == 16
