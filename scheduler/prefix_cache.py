"""Prefix caching: full prompt blocks shared across requests, found by a hash chain.

A prompt's block i is keyed by the hash of (key of block i-1, its tokens): equal keys mean
equal prefixes, so equal K/V at every depth (prefill runs every loop for every prompt
position, exactly). An entry holds the block id of every depth and one reference on each, so
its K/V survive the request that computed it; a request that hits takes its own reference.
Entries are evicted least recently used when the pool runs dry, before anyone is preempted.
Only blocks wholly inside the prompt are cached: nothing writes them again (decode tokens, and
the K/V that early exits fill, land in later blocks).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

from scheduler.block_allocator import BlockAllocator


def block_keys(prompt_ids: Sequence[int], block_size: int) -> list[bytes]:
    """The chain key of every full block of the prompt: a cryptographic hash, so no prompt
    can be crafted to collide with another's prefix and read its K/V."""
    keys, parent = [], b""
    for i in range(len(prompt_ids) // block_size):
        tokens = array("q", prompt_ids[i * block_size : (i + 1) * block_size]).tobytes()
        parent = hashlib.blake2b(parent + tokens, digest_size=16).digest()
        keys.append(parent)
    return keys


class PrefixCache:
    """Chain key -> the block ids of that prompt block at each depth."""

    def __init__(self, allocator: BlockAllocator, block_size: int) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self._entries: OrderedDict[bytes, tuple[int, ...]] = OrderedDict()
        self.queries = 0  # prompt tokens looked up (vLLM's prefix_cache_queries)
        self.hits = 0  # of which found cached

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, keys: Sequence[bytes], limit: int, prompt_len: int) -> list[tuple[int, ...]]:
        """The cached blocks of the longest cached prefix of ``keys`` (at most ``limit``
        blocks), each with a new reference for the caller."""
        found: list[tuple[int, ...]] = []
        for key in keys[:limit]:
            blocks = self._entries.get(key)
            if blocks is None:
                break
            self._entries.move_to_end(key)
            found.append(blocks)
        for blocks in found:
            self.allocator.share(list(blocks))
        self.queries += prompt_len
        self.hits += len(found) * self.block_size
        return found

    def insert(self, key: bytes, blocks: tuple[int, ...]) -> None:
        """Keep ``blocks`` (one per depth) under ``key``, unless an entry has it already."""
        if key in self._entries:
            return
        self.allocator.share(list(blocks))
        self._entries[key] = blocks

    def evict(self) -> bool:
        """Drop the least recently used entry (its blocks free once no request holds them);
        False when there is none."""
        if not self._entries:
            return False
        _, blocks = self._entries.popitem(last=False)
        self.allocator.free(list(blocks))
        return True
