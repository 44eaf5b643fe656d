"""When a decode token may leave the loop early, and how confident it is.

Confidence is read from the exit head (final norm + LM head) at the token's current depth:
the max softmax probability, or the margin between the top two probabilities.
"""

from __future__ import annotations

import torch


def may_exit(depth: int, threshold: float, min_loops: int, last_depth: int) -> bool:
    """Whether a decode token that finished loop ``depth`` is even checked for an exit.

    Thresholds above 1 can never be met (probabilities are <= 1), so they disable exits and
    spare the LM-head cost; ``min_loops`` forces at least that many loops.
    """
    return depth < last_depth and depth >= min_loops - 1 and threshold <= 1.0


def confidence(logits: torch.Tensor, measure: str) -> torch.Tensor:
    """logits [N, V] -> confidence [N] in [0, 1]."""
    probs = logits.float().softmax(-1)
    if measure == "prob":
        return probs.max(-1).values
    if measure == "margin":
        top = probs.topk(2, dim=-1).values
        return top[:, 0] - top[:, 1]
    raise ValueError(f"unknown confidence measure {measure!r} (expected 'prob' or 'margin')")
