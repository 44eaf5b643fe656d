"""When a token may leave the loop early.

Confidence is read from the exit head (final norm + LM head) at the token's current depth
with ``model.calibrate.confidence`` — the same function calibration fits thresholds with, so
a calibrated threshold means the same thing here.
"""

from __future__ import annotations


def may_exit(depth: int, threshold: float, min_loops: int, last_depth: int) -> bool:
    """Whether a decode token that finished loop ``depth`` is even checked for an exit.

    Thresholds above 1 can never be met (probabilities are <= 1), so they disable exits and
    spare the LM-head cost; ``min_loops`` forces at least that many loops.
    """
    return depth < last_depth and depth >= min_loops - 1 and threshold <= 1.0
