"""Paged KV memory indexed by (block layer, block id) and the attention backend over it.

One block id addresses the same slots in every block layer's tensors; a request holds one
block table per loop depth, so the cache is indexed by (depth via the table, layer) as data,
never bound to a module that runs once per loop.

A middle-cycle model's unique first and last layers (``RecursiveLM.prefix`` / ``suffix``)
have K/V of their own at one depth: a token passes each of them once. They live in layers of
their own (``prefix``, ``suffix``), addressed through the depth-0 block table. Simple, at a
price: every block carries those layers, so (P + E) / K more K/V memory per block, although
only depth-0 blocks use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loopserve_kernels import (
    DecodeInputs,
    PagedAttentionMetadata,
    decode_inputs,
    paged_attention,
    write_kv,
)
from model.attention import Window
from model.config import ModelConfig


@dataclass
class LayerKV:
    """K and V tensors [num_blocks, block_size, kv_heads, head_dim] of some layers."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]


class KVCache:
    """K and V tensors [num_blocks, block_size, kv_heads, head_dim] per block layer (``k``,
    ``v``), and per unique layer of a middle-cycle model (``prefix``, ``suffix``)."""

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        a = config.arch
        shape = (num_blocks, block_size, a.num_kv_heads, a.head_dim)
        self.block_size = block_size

        def layers(n: int) -> list[torch.Tensor]:
            return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)]

        self.k, self.v = layers(config.block_layers), layers(config.block_layers)
        self.prefix = LayerKV(layers(config.prefix_layers), layers(config.prefix_layers))
        self.suffix = LayerKV(layers(config.suffix_layers), layers(config.suffix_layers))

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        a = config.arch
        per_layer = 2 * block_size * a.num_kv_heads * a.head_dim * dtype.itemsize
        return per_layer * (config.block_layers + config.prefix_layers + config.suffix_layers)


@dataclass
class PagedAttention:
    """The model's attention backend for one step: writes this step's K/V, then attends.

    ``metadata`` describes one query segment per work item (its rows, its block table at its
    current depth, its context length); ``slot_mapping`` [T] says where each row's K/V goes.
    """

    cache: KVCache | LayerKV  # the block's layers, or a unique stack's (one depth)
    metadata: PagedAttentionMetadata
    slot_mapping: torch.Tensor
    scale: float
    # sliding-window layers: the batch with that one window for every sequence, per window
    windowed: dict[int, PagedAttentionMetadata] = field(default_factory=dict)

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Window = 0
    ) -> torch.Tensor:
        write_kv(k, v, self.cache.k[layer], self.cache.v[layer], self.slot_mapping)
        meta = self._metadata(window)
        out = paged_attention(q, self.cache.k[layer], self.cache.v[layer], meta, self.scale)
        return out.flatten(1)

    def decode_inputs(self) -> DecodeInputs | None:
        return decode_inputs(
            self.metadata, self.cache.k, self.cache.v, self.slot_mapping, self.scale
        )

    def _metadata(self, window: Window) -> PagedAttentionMetadata:
        """The step's metadata with ``window`` (one for all rows, or per row: a sequence's
        rows share a depth, so its first row's window is the sequence's)."""
        if isinstance(window, torch.Tensor):
            first_rows = self.metadata.query_start_loc[:-1].long()
            per_seq = window.index_select(0, first_rows).to(torch.int32)
            return self.metadata.with_windows(per_seq)
        if window == 0:
            return self.metadata
        if window not in self.windowed:
            meta = self.metadata
            every = torch.full_like(meta.context_lens, window)
            self.windowed[window] = meta.with_windows(every)
        return self.windowed[window]
