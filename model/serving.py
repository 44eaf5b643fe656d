"""Inference-time transforms of a loaded model (the checkpoint stays as it is).

At high rank the low-rank path (shrink + expand on top of the shared GEMM) costs more than a
plain per-depth weight: the exact default model is full rank, where ``W + B_p A_p`` *is* the
original layer. For such modules we materialise one dense weight per position once at load
and run a grouped matmul over depth segments instead.
"""

from __future__ import annotations

import torch

from kernels import materialise_dense, prefer_dense
from model.recursive import RecursiveLM


@torch.no_grad()
def materialise_high_rank(model: RecursiveLM, force: bool | None = None) -> list[str]:
    """Switch modules whose rank makes dense cheaper to per-position dense weights.

    ``force`` True/False overrides the shape-based rule (for benchmarks). Returns the modules
    switched; their LoRA factors are dropped from the forward path (not from the checkpoint).
    """
    switched = []
    for m, a in model.lora_a.items():
        out_f, in_f = model.config.arch.linear_shape(m)
        rank = a.shape[2]
        if not (prefer_dense(out_f, in_f, rank) if force is None else force):
            continue
        w, b = model.weights[m], model.lora_b[m]
        model.dense[m] = torch.stack(
            [materialise_dense(w[k], a[k], b[k]) for k in range(model.config.block_layers)]
        )
        switched.append(m)
    return switched
