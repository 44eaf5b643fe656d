"""This machine's GEMM rate and the FLOPs a served token costs: the yardstick beside tok/s.

``gemm_peak`` times one decoder-sized matmul (best of several) at the servers' dtype and thread
count, in the benchmark's own run; ``token_flops`` counts the linear maps a token runs through
(attention scores are left out: under 10 % at these context lengths), so achieved GFLOP/s =
FLOPs of the tokens served / wall time.
"""

from __future__ import annotations

import time

import torch

from model.config import ArchConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def gemm_peak(dtype: str, threads: int | None, m: int = 256, n: int = 1536, k: int = 576) -> float:
    """GFLOP/s of a ``[m, k] x [k, n]`` matmul (SmolLM2's MLP shape), best of 20 timed runs."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        a = torch.randn(m, k, dtype=DTYPES[dtype])
        b = torch.randn(k, n, dtype=DTYPES[dtype])
        for _ in range(5):
            a @ b
        best = float("inf")
        for _ in range(20):
            t = time.perf_counter()
            for _ in range(10):
                a @ b
            best = min(best, (time.perf_counter() - t) / 10)
        return 2 * m * n * k / best / 1e9
    finally:
        torch.set_num_threads(old)


def token_flops(arch: ArchConfig) -> tuple[float, float]:
    """FLOPs of (one prompt token, one generated token): every layer's linear maps, plus the LM
    head for a generated token (a prompt position needs logits only at its end)."""
    per_layer = sum(
        2 * out_f * in_f
        for out_f, in_f in (
            arch.linear_shape(m) for m in ("q", "k", "v", "o", "gate", "up", "down")
        )
    )
    body = per_layer * arch.num_layers
    return float(body), float(body + 2 * arch.vocab_size * arch.hidden_size)
