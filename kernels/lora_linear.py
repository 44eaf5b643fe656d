"""Linear map with a shared weight plus a per-row, per-depth low-rank delta.

Row i at loop depth d(i) computes ``y[i] = x[i] Wᵀ + (x[i] A[d(i)]ᵀ) B[d(i)]ᵀ``: the
multi-LoRA batching problem (punica's shrink/expand) with "adapter id" = loop depth.
"""

from __future__ import annotations

import torch


def lora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    depth: torch.Tensor | int,
) -> torch.Tensor:
    """Pure-torch twin: base matmul plus one segment matmul per depth present.

    x: [T, in]; weight: [out, in]; lora_a: [D, r, in]; lora_b: [D, out, r];
    depth: [T] int64 depth per row, or one int for a batch at a single depth.
    """
    y = x @ weight.T
    if lora_a is None or lora_b is None or lora_a.shape[1] == 0:
        return y
    if isinstance(depth, int):
        return y + (x @ lora_a[depth].T) @ lora_b[depth].T
    for d in range(lora_a.shape[0]):
        rows = (depth == d).nonzero().squeeze(1)
        if rows.numel():
            xd = x.index_select(0, rows)
            y = y.index_add(0, rows, (xd @ lora_a[d].T) @ lora_b[d].T)
    return y


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    depth: torch.Tensor | int,
) -> torch.Tensor:
    """Dispatch entry point used by the model (see ``lora_linear_ref`` for the contract)."""
    return lora_linear_ref(x, weight, lora_a, lora_b, depth)
