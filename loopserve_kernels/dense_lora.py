"""Per-depth dense weights ``W + B_d A_d``: the path for deltas whose rank is too high.

At full rank (the exact default model) the low-rank path costs a shrink and an expand on top of
the base GEMM; one dense weight per depth costs the base GEMM alone, paid for in memory
(``D`` weights instead of one plus the factors). ``prefer_dense`` decides per module from the
shapes at load time; ``benchmarks/kernels.py`` measures both paths.
"""

from __future__ import annotations

import torch

from loopserve_kernels.dispatch import kernel_backend
from loopserve_kernels.lora_linear import masked_per_depth

DENSE_RATIO = 0.5
"""Go dense once the factors hold at least this fraction of W's parameters: there the
expand+shrink FLOPs add ≥ 50 % to the GEMM while D dense copies cost little more memory."""


def prefer_dense(out_features: int, in_features: int, rank: int) -> bool:
    """Whether per-depth dense weights beat the low-rank path for a ``[out, in]`` layer."""
    if min(out_features, in_features, rank) < 0:
        raise ValueError(f"negative size: out={out_features}, in={in_features}, rank={rank}")
    return rank * (out_features + in_features) >= DENSE_RATIO * out_features * in_features


def materialise_dense(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor
) -> torch.Tensor:
    """``W + B_d A_d`` for every depth, summed in fp32 and rounded once: [D, out, in]."""
    delta = torch.bmm(lora_b.float(), lora_a.float())
    return (weight.float().unsqueeze(0) + delta).to(weight.dtype)


def dense_per_depth_linear_ref(
    x: torch.Tensor, dense_w: torch.Tensor, depth: torch.Tensor | int
) -> torch.Tensor:
    """Torch twin: one matmul per depth segment; rows with an out-of-range depth get zeros.
    Under torch.compile every depth's matmul over every row, masked (static shapes)."""
    if isinstance(depth, int):
        return x @ dense_w[depth].T
    if torch.compiler.is_compiling():
        return masked_per_depth(depth, dense_w.shape[0], lambda d: x @ dense_w[d].T)
    y = x.new_zeros((x.shape[0], dense_w.shape[1]))
    for d in range(dense_w.shape[0]):
        rows = (depth == d).nonzero().squeeze(1)
        if rows.numel():
            y.index_copy_(0, rows, x.index_select(0, rows) @ dense_w[d].T)
    return y


def dense_per_depth_linear(
    x: torch.Tensor, dense_w: torch.Tensor, depth: torch.Tensor | int
) -> torch.Tensor:
    """``y[i] = x[i] dense_w[d(i)]ᵀ``, a grouped matmul over depth segments.

    x: [T, in]; dense_w: [D, out, in]; depth: [T] ids or one int.
    """
    if dense_w.dim() != 3:
        raise ValueError(f"dense_w must be [D, out, in], got shape {tuple(dense_w.shape)}")
    if isinstance(depth, int) and not 0 <= depth < dense_w.shape[0]:
        raise ValueError(f"depth {depth} out of range for {dense_w.shape[0]} depths")
    if kernel_backend(x) == "torch":
        return dense_per_depth_linear_ref(x, dense_w, depth)
    from loopserve_kernels.lora_linear_triton import lora_matmul

    return lora_matmul(x, dense_w, None, None, depth)
