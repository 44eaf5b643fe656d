"""KV block allocator: a free list with reference counts. Torch-free, so it is tested alone.

Blocks are ids into the engine's KV tensors; one id addresses the same slots in every block
layer. ``allocate`` answers ``None`` when the pool cannot satisfy the request: the caller
preempts, never crashes.
"""

from __future__ import annotations

from collections import deque


class BlockAllocator:
    """Hands out block ids 0..num_blocks-1; a block returns to the pool at ref count 0."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks

    def allocate(self, n: int) -> list[int] | None:
        """``n`` fresh blocks (ref count 1), or None — taking nothing — if fewer are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            return None
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._refs[b] = 1
        return blocks

    def share(self, blocks: list[int]) -> None:
        """One more reference on blocks in use (a cached prefix another holder keeps)."""
        for b in blocks:
            if self._refs[b] <= 0:
                raise ValueError(f"cannot share free block {b}")
            self._refs[b] += 1

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if self._refs[b] <= 0:
                raise ValueError(f"double free of block {b}")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)
