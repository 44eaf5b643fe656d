"""Attention backends the model calls once per block layer.

The model knows nothing of caches or requests: it hands q/k/v for its rows to a backend that
the caller built with the batch's metadata. This file holds the cache-free backend used for
full-sequence evaluation and training; the engine supplies a paged one.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from loopserve_kernels import DecodeInputs

Window = torch.Tensor | int  # sliding window: one for all rows, or [T] per row; 0 = global


class AttentionBackend(Protocol):
    """Computes attention for the rows of one step at block layer ``layer``.

    q: [T, Hq, D], k/v: [T, Hkv, D] (RoPE applied) -> [T, Hq * D]. The model passes
    ``window`` only for sliding-window layers (Gemma 3): a query at position i then sees the
    keys at positions j with i - window < j <= i. A backend without windows rejects it.
    """

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Window = 0
    ) -> torch.Tensor: ...

    def decode_inputs(self) -> DecodeInputs | None:
        """What a whole-layer call needs (``model.fused_layer``), or None where the backend
        has no paged cache or the step is one the call cannot compute (sliding windows)."""
        ...


class CausalAttention:
    """Causal self-attention within each sequence of a ragged batch (no cache).

    Rows are sequences concatenated in order; ``seq_lens`` gives their lengths. Every row of a
    sequence must be at the same loop depth — which holds for a full-sequence forward.
    """

    def __init__(self, seq_lens: list[int]) -> None:
        if any(n <= 0 for n in seq_lens):
            raise ValueError(f"sequence lengths must be positive, got {seq_lens}")
        self.seq_lens = seq_lens

    def decode_inputs(self) -> DecodeInputs | None:
        return None  # no cache: every layer runs in Python

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Window = 0
    ) -> torch.Tensor:
        lens = self.seq_lens
        if isinstance(window, int) and len(set(lens)) == 1:
            n, s = len(lens), lens[0]
            out = _sdpa_causal(
                q.view(n, s, *q.shape[1:]),
                k.view(n, s, *k.shape[1:]),
                v.view(n, s, *v.shape[1:]),
                window,
            )
            return out.reshape(n * s, -1)
        starts = [sum(lens[:i]) for i in range(len(lens))]
        windows = [window] * len(lens) if isinstance(window, int) else window[starts].tolist()
        outs = [
            _sdpa_causal(qs[None], ks[None], vs[None], w)[0]
            for qs, ks, vs, w in zip(
                q.split(lens), k.split(lens), v.split(lens), windows, strict=True
            )
        ]
        return torch.cat(outs).flatten(1)


def _sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """q: [N, S, Hq, D], k/v: [N, S, Hkv, D] -> [N, S, Hq, D]; ``window`` 0: plain causal."""
    mask = None
    if window:
        pos = torch.arange(q.shape[1], device=q.device)
        back = pos[:, None] - pos[None, :]  # query i - key j
        mask = (back >= 0) & (back < window)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        is_causal=mask is None,
        enable_gqa=True,
    )
    return out.transpose(1, 2)
