"""The paged-attention contract: where each sequence's queries and K/V live for one call.

Shared by the torch twins (``loopserve_kernels.paged_attention``) and the Triton kernels
(``loopserve_kernels.paged_attention_triton``); neither imports the other's module for it.

KV cache of one block layer: ``k_cache, v_cache: [num_blocks, block_size, num_kv_heads,
head_dim]``; token position p of sequence s lives in block ``block_tables[s, p // block_size]``
at offset ``p % block_size`` (flat slot ``block * block_size + offset``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass
class PagedAttentionMetadata:
    """Where each sequence's queries and keys live for one attention call.

    block_tables: [S, max_blocks] int32 — physical block ids of sequence s, in position order
        (entries past the sequence's last block are ignored).
    context_lens: [S] int32 — KV length of sequence s *including* this step's new tokens, which
        must already be written (``write_kv``). Query row j of a chunk of q_len rows sits at
        position ``context_len - q_len + j`` and sees keys at positions ≤ that.
    query_start_loc: [S + 1] int32 — cu_seqlens: rows ``[qsl[s], qsl[s+1])`` of q belong to s.
    max_query_len / max_context_len: host-side maxima (size the grid without a device sync).
    sliding_windows: [S] int32 or None — a window per sequence (0: none): a query at position i
        then sees keys at positions j with i - window < j ≤ i (Gemma 3's sliding layers).
        The window is a property of (block layer, loop depth), so one step's calls differ in
        it: ``with_windows`` gives each its own copy of the batch.
    """

    block_tables: torch.Tensor
    context_lens: torch.Tensor
    query_start_loc: torch.Tensor
    max_query_len: int
    max_context_len: int
    sliding_windows: torch.Tensor | None = None
    # host-side work an implementation derives once per step (one step calls attention once
    # per block layer), keyed by what it depends on; the torch twin keeps its plan here
    derived: dict[object, object] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.block_tables.dim() != 2:
            raise ValueError(f"block_tables must be [S, max_blocks], got {self.block_tables.shape}")
        s = self.block_tables.shape[0]
        if self.context_lens.shape != (s,):
            raise ValueError(f"context_lens shape {tuple(self.context_lens.shape)} != ({s},)")
        if self.query_start_loc.shape != (s + 1,):
            raise ValueError(
                f"query_start_loc shape {tuple(self.query_start_loc.shape)} != ({s + 1},)"
            )
        if self.max_query_len < 0 or self.max_context_len < 0:
            raise ValueError("max_query_len and max_context_len must be ≥ 0")
        w = self.sliding_windows
        if w is not None and w.shape != (s,):
            raise ValueError(f"sliding_windows shape {tuple(w.shape)} != ({s},)")

    def with_windows(self, windows: torch.Tensor | None) -> PagedAttentionMetadata:
        """The same batch with per-sequence sliding windows [S] (None: none), and its own
        ``derived`` cache (the twin's plan depends on the windows)."""
        return replace(self, sliding_windows=windows)

    @property
    def num_seqs(self) -> int:
        """Number of sequences (block tables) in the batch."""
        return self.block_tables.shape[0]


def check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int]:
    """(block_size, num_kv_heads, head_dim) of a K/V cache pair, or ValueError."""
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"cache dtypes differ: {k_cache.dtype} vs {v_cache.dtype}")
    return k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
