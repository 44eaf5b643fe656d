"""Learned exit heads: one affine map per early-exit depth, applied before the final norm.

An intermediate loop's hidden state lives in a different basis than the last loop's, so the
shared final norm + LM head read it poorly (DESIGN.md §7: 8 % / 18 % agreement at loops 0 / 1
of the exact default). A tuned lens (Belrose et al. 2023) learns, per depth b < B − 1, an
affine map ``h ↦ h Wᵀ + bias`` [H, H] that carries it into the last loop's basis; the final
norm + LM head then give that depth's exit logits. Identity-initialised, so an untrained head
changes nothing. ``training.exit_heads`` fits them; the engine applies them via
``RecursiveLM.exit_logits``.

Beside each map sits a **gate** (CALM's learned exit classifier): a logistic score on the
RMS-normalised hidden state, ~2H FLOPs a row, trained to predict whether that depth's exit
token equals the final loop's. As the ``"gate"`` exit measure it decides exits *before* the
vocabulary projection, so the LM head runs only for rows that leave.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ExitHeads(nn.Module):
    """Affine maps ``weight`` [D, H, H] and ``bias`` [D, H] for exit depths 0..D−1 (D = B − 1),
    a depth >= D (the last loop) passing through unchanged; gates ``gate_weight`` [D, H] and
    ``gate_bias`` [D] (zero: a constant 0.5 until trained)."""

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
        self.gate_weight = nn.Parameter(torch.zeros_like(self.bias))
        self.gate_bias = nn.Parameter(torch.zeros(depths, dtype=dtype, device=device))

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

    def gate_logit(self, hidden: torch.Tensor, depth: int | Sequence[int]) -> torch.Tensor:
        """The gate's pre-sigmoid score of rows [..., H] after early loop(s) ``depth`` -> [...]."""
        x = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)
        if isinstance(depth, int):
            return x @ self.gate_weight[depth] + self.gate_bias[depth]
        at = torch.tensor(list(depth), device=hidden.device)
        return (x * self.gate_weight[at]).sum(-1) + self.gate_bias[at]

    def gate(self, hidden: torch.Tensor, depth: int | Sequence[int]) -> torch.Tensor:
        """The gate's exit confidence in [0, 1]: P(this depth's token = the final loop's)."""
        return torch.sigmoid(self.gate_logit(hidden, depth))
