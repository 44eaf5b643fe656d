"""Learned exit heads: one affine map per early-exit depth, applied before the final norm.

An intermediate loop's hidden state lives in a different basis than the last loop's, so the
shared final norm + LM head read it poorly (DESIGN.md §7: 8 % / 18 % agreement at loops 0 / 1
of the exact default). A tuned lens (Belrose et al. 2023) learns, per depth b < B − 1, an
affine map ``h ↦ h Wᵀ + bias`` [H, H] that carries it into the last loop's basis; the final
norm + LM head then give that depth's exit logits. Identity-initialised, so an untrained head
changes nothing. ``training.exit_heads`` fits them; the engine applies them via
``RecursiveLM.exit_logits``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ExitHeads(nn.Module):
    """Affine maps ``weight`` [D, H, H] and ``bias`` [D, H] for exit depths 0..D−1 (D = B − 1);
    a depth >= D (the last loop) passes through unchanged."""

    def __init__(
        self,
        depths: int,
        hidden_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        eye = torch.eye(hidden_size, dtype=dtype, device=device)
        self.weight = nn.Parameter(eye.repeat(depths, 1, 1))
        self.bias = nn.Parameter(torch.zeros(depths, hidden_size, dtype=dtype, device=device))

    @property
    def depths(self) -> int:
        return self.weight.shape[0]

    def forward(self, hidden: torch.Tensor, depth: int | Sequence[int]) -> torch.Tensor:
        """hidden [..., H] after loop ``depth`` (one int, or one per row of hidden [R, H])."""
        if isinstance(depth, int):
            if depth >= self.depths:
                return hidden
            return nn.functional.linear(hidden, self.weight[depth], self.bias[depth])
        out = hidden.clone()
        for d in sorted(set(depth)):
            if d >= self.depths:
                continue
            rows = torch.tensor([i for i, x in enumerate(depth) if x == d], device=hidden.device)
            out[rows] = nn.functional.linear(hidden[rows], self.weight[d], self.bias[d])
        return out
