"""The early-exit rule: one owner for the confidence measure, the rule and "exits off".

A decode token that finished loop ``b`` leaves the loop when ``b`` is the last loop, or when
``b >= min_loops - 1`` and its exit confidence is at or above ``threshold[b]``. The engine
applies it to a step's rows (``exits``); calibration replays it over recorded confidences
(``exit_depths``) to fit the thresholds, so a calibrated threshold means the same in both.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch

from loopserve_kernels import row_max_lse

LOGIT_MEASURES: tuple[str, ...] = ("prob", "margin")
"""Confidences read off an exit's logits (the LM head must run first)."""
GATE = "gate"
"""The learned exit gate's score (``model.exit_heads``): decided before the LM head."""
EXIT_MEASURES: tuple[str, ...] = (*LOGIT_MEASURES, GATE)
EXITS_OFF = 2.0
"""A threshold no confidence reaches (confidences lie in [0, 1]): exits off at that depth."""


def confidence(
    logits: torch.Tensor,
    measure: str,
    max_lse: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Exit confidence in [0, 1] from logits [..., V]: max softmax prob or top-1 − top-2.

    "prob" is exp(max − logsumexp), from ``max_lse`` when the caller has them for these rows
    (the sampler needs them too), else computed here; "margin" needs a softmax.
    """
    if measure == "prob":
        if max_lse is None:
            _, top, lse = row_max_lse(logits.reshape(-1, logits.shape[-1]))
            return (top - lse).exp().reshape(logits.shape[:-1])
        top, lse = max_lse
        return (top - lse).exp()
    probs = logits.float().softmax(-1)
    if measure == "margin":
        top = probs.topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]
    raise ValueError(f"{measure!r} is no logit confidence measure (one of {LOGIT_MEASURES})")


def may_exit(depth: int, threshold: float, min_loops: int, last_depth: int) -> bool:
    """Whether a token that finished loop ``depth`` can exit early at all — if not, its
    confidence need not be computed (``threshold`` > 1 is never met)."""
    return depth < last_depth and depth >= min_loops - 1 and threshold <= 1.0


def exits(
    conf: torch.Tensor,
    depth: torch.Tensor,
    threshold: torch.Tensor,
    min_loops: torch.Tensor | int,
    last_depth: int,
) -> torch.Tensor:
    """The rule over rows: [R] confidences, depths, thresholds, min_loops -> [R] bool."""
    early = (depth >= min_loops - 1) & (conf >= threshold)
    return (depth >= last_depth) | early


def exit_depths(
    confidences: torch.Tensor, thresholds: Sequence[float], min_loops: int = 1
) -> torch.Tensor:
    """The depth each token exits at: the first loop where ``exits`` holds.

    confidences: [T, B] (column b = confidence after loop b; the last is unused);
    thresholds: >= B − 1 per-depth values -> [T] int64 exit depth in [0, B − 1].
    """
    t, loops = confidences.shape
    if len(thresholds) < loops - 1:
        raise ValueError(f"need {loops - 1} thresholds for {loops} loops, got {thresholds}")
    if min_loops < 1:
        raise ValueError(f"min_loops must be >= 1, got {min_loops}")
    depth = torch.full((t,), loops - 1, dtype=torch.long)
    running = torch.ones(t, dtype=torch.bool)
    for b in range(loops - 1):
        at_b = torch.full((t,), b, dtype=torch.long)
        thr = torch.full((t,), float(thresholds[b]), dtype=confidences.dtype)
        leaving = running & exits(confidences[:, b], at_b, thr, min_loops, loops - 1)
        depth[leaving] = b
        running &= ~leaving
    return depth


def forced_exit_depth(request_id: str, position: int, weights: Sequence[float]) -> int:
    """The depth a forced schedule gives the token at ``position``: drawn from ``weights``
    (one per depth) by a hash of (request, position), the same on every run."""
    u = zlib.crc32(f"{request_id}:{position}".encode()) / 2**32
    total, acc = sum(weights), 0.0
    for depth, w in enumerate(weights):
        acc += w / total
        if u < acc:
            return depth
    return len(weights) - 1
