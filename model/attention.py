"""Attention backends the model calls once per block layer.

The model knows nothing of caches or requests: it hands q/k/v for its rows to a backend that
the caller built with the batch's metadata. This file holds the cache-free backend used for
full-sequence evaluation and training; the engine supplies a paged one.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class AttentionBackend(Protocol):
    """Computes attention for the rows of one step at block layer ``layer``.

    q: [T, Hq, D], k/v: [T, Hkv, D] (RoPE applied) -> [T, Hq * D].
    """

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor: ...


class CausalAttention:
    """Causal self-attention within each sequence of a ragged batch (no cache).

    Rows are sequences concatenated in order; ``seq_lens`` gives their lengths. Every row of a
    sequence must be at the same loop depth — which holds for a full-sequence forward.
    """

    def __init__(self, seq_lens: list[int]) -> None:
        if any(n <= 0 for n in seq_lens):
            raise ValueError(f"sequence lengths must be positive, got {seq_lens}")
        self.seq_lens = seq_lens

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        lens = self.seq_lens
        if len(set(lens)) == 1:
            n, s = len(lens), lens[0]
            out = _sdpa_causal(
                q.view(n, s, *q.shape[1:]), k.view(n, s, *k.shape[1:]), v.view(n, s, *v.shape[1:])
            )
            return out.reshape(n * s, -1)
        outs = [
            _sdpa_causal(qs[None], ks[None], vs[None])[0]
            for qs, ks, vs in zip(q.split(lens), k.split(lens), v.split(lens), strict=True)
        ]
        return torch.cat(outs).flatten(1)


def _sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q: [N, S, Hq, D], k/v: [N, S, Hkv, D] -> [N, S, Hq, D]."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    )
    return out.transpose(1, 2)
