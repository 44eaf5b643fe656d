"""Request arrival times: all at once, Poisson, or gamma-distributed gaps (vLLM's model).

Gaps are gamma(shape = burstiness, scale = 1 / (rate · burstiness)): the mean gap is always
1 / rate; burstiness 1 is a Poisson process, < 1 burstier, > 1 more even.
"""

from __future__ import annotations

import math

import numpy as np


def arrival_gaps(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` seconds-gaps before each request (the first one included)."""
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if rate <= 0:
        raise ValueError(f"request rate must be > 0 (inf: all at once), got {rate}")
    if math.isinf(rate):
        return np.zeros(n)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)


def arrival_times(n: int, rate: float, burstiness: float, seed: int) -> np.ndarray:
    """Seconds after the start at which each of ``n`` requests is due."""
    return np.cumsum(arrival_gaps(n, rate, burstiness, np.random.default_rng(seed)))
