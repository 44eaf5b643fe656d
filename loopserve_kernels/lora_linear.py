"""Linear map with a shared weight plus a per-row, per-depth low-rank delta.

Row i at loop depth d(i) computes ``y[i] = x[i] Wᵀ + (x[i] A[d(i)]ᵀ) B[d(i)]ᵀ``: the
multi-LoRA batching problem (punica's shrink/expand) with "adapter id" = loop depth.
Depth ids outside ``[0, D)`` in a depth tensor get no delta. The entry points dispatch through
``loopserve_kernels.dispatch``; the ``*_ref`` twins are the CPU path and the tests' reference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from loopserve_kernels.dispatch import kernel_backend


def masked_per_depth(
    depth: torch.Tensor, num_depths: int, per_depth: Callable[[int], torch.Tensor]
) -> torch.Tensor:
    """``Σ_d [depth == d] · per_depth(d)``: each depth's result over every row, kept where the
    row is at that depth (zeros where none is). The twins' tensor-depth form under
    torch.compile: ``nonzero`` has a data-dependent shape, which would split the graph; this
    has static shapes, at ``num_depths`` times the FLOPs — small for low-rank deltas."""
    total = None
    for d in range(num_depths):
        part = torch.where((depth == d)[:, None], per_depth(d), 0)
        total = part if total is None else total + part
    assert total is not None, "no depths"
    return total


def lora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    depth: torch.Tensor | int,
) -> torch.Tensor:
    """Pure-torch twin: base matmul plus one segment matmul per depth present.

    Accumulates with ``index_put_`` rather than ``index_add``: torch 2.13's CPU ``index_add``
    takes ~40 ms on some 576-element outputs (e.g. [1, 576]), SmolLM2's hidden size.

    x: [T, in]; weight: [out, in]; lora_a: [D, r, in]; lora_b: [D, out, r];
    depth: [T] int64 depth per row, or one int for a batch at a single depth.
    """
    y = x @ weight.T
    if lora_a is None or lora_b is None or lora_a.shape[1] == 0:
        return y
    if isinstance(depth, int):
        return y + (x @ lora_a[depth].T) @ lora_b[depth].T
    if torch.compiler.is_compiling():
        return y + masked_per_depth(
            depth, lora_a.shape[0], lambda d: (x @ lora_a[d].T) @ lora_b[d].T
        )
    for d in range(lora_a.shape[0]):
        rows = (depth == d).nonzero().squeeze(1)
        if rows.numel():
            xd = x.index_select(0, rows)
            y.index_put_((rows,), (xd @ lora_a[d].T) @ lora_b[d].T, accumulate=True)
    return y


def depth_segments(depth: torch.Tensor, num_depths: int) -> list[tuple[int, int, int]] | None:
    """``(d, start, stop)`` row ranges of each depth present when ``depth`` [T] is sorted (the
    runner sorts a step's rows by depth), so a depth's rows are a slice, not a gather and an
    accumulating scatter; None when it is not sorted."""
    if depth.numel() == 0 or int(depth[0]) < 0:
        return None
    if depth.numel() > 1 and not bool((depth[1:] >= depth[:-1]).all()):
        return None
    counts = torch.bincount(depth, minlength=num_depths).tolist()
    out, start = [], 0
    for d, n in enumerate(counts):
        if n and d < num_depths:
            out.append((d, start, start + n))
        start += n
    return out


def _check_int_depth(depth: torch.Tensor | int, lora_a: torch.Tensor | None) -> None:
    if isinstance(depth, int) and lora_a is not None and not 0 <= depth < lora_a.shape[0]:
        raise ValueError(f"depth {depth} out of range for {lora_a.shape[0]} LoRA depths")


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    depth: torch.Tensor | int,
) -> torch.Tensor:
    """Dispatch entry point used by the model (see ``lora_linear_ref`` for the contract)."""
    _check_int_depth(depth, lora_a)
    if kernel_backend(x) == "torch":
        return lora_linear_ref(x, weight, lora_a, lora_b, depth)
    from loopserve_kernels.lora_linear_triton import lora_matmul

    return lora_matmul(x, weight, lora_a, lora_b, depth)


@dataclass(frozen=True)
class FusedLoRA:
    """LoRA factors of a fused projection (q|k|v or gate|up), built once at load time.

    The slices' A factors are stacked along the rank axis and their B factors placed on a block
    diagonal, so one shrink reads x once for all slices and one GEMM writes all outputs.
    lora_a: [D, Σr, in]; lora_b: [D, Σout, Σr]; out_sizes / ranks: per slice.
    """

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    out_sizes: tuple[int, ...]
    ranks: tuple[int, ...]


def fuse_lora(lora_as: Sequence[torch.Tensor], lora_bs: Sequence[torch.Tensor]) -> FusedLoRA:
    """Stack per-slice factors ``A_s [D, r_s, in]`` and ``B_s [D, out_s, r_s]`` (load time)."""
    if len(lora_as) != len(lora_bs) or not lora_as:
        raise ValueError("need one (A, B) pair per slice, at least one slice")
    num_depths = lora_as[0].shape[0]
    for i, (a, b) in enumerate(zip(lora_as, lora_bs, strict=True)):
        if a.dim() != 3 or b.dim() != 3 or a.shape[0] != num_depths or b.shape[0] != num_depths:
            raise ValueError(f"slice {i}: A {tuple(a.shape)}, B {tuple(b.shape)} not [D, ...]")
        if b.shape[2] != a.shape[1]:
            raise ValueError(f"slice {i}: B rank {b.shape[2]} != A rank {a.shape[1]}")
    out_sizes = tuple(b.shape[1] for b in lora_bs)
    ranks = tuple(a.shape[1] for a in lora_as)
    lora_a = torch.cat(list(lora_as), dim=1)
    lora_b = lora_a.new_zeros((num_depths, sum(out_sizes), sum(ranks)))
    row = col = 0
    for b in lora_bs:
        lora_b[:, row : row + b.shape[1], col : col + b.shape[2]] = b
        row, col = row + b.shape[1], col + b.shape[2]
    return FusedLoRA(lora_a, lora_b, out_sizes, ranks)


def _fused_delta(x: torch.Tensor, fused: FusedLoRA, d: int) -> torch.Tensor:
    """Depth ``d``'s delta of every slice for rows ``x``: one shrink, one expand per slice."""
    t = x @ fused.lora_a[d].T
    parts, row, col = [], 0, 0
    for out, r in zip(fused.out_sizes, fused.ranks, strict=True):
        b = fused.lora_b[d, row : row + out, col : col + r]
        parts.append(t[:, col : col + r] @ b.T)
        row, col = row + out, col + r
    return torch.cat(parts, dim=1)


def fused_lora_linear_ref(
    x: torch.Tensor, weight: torch.Tensor, fused: FusedLoRA | None, depth: torch.Tensor | int
) -> torch.Tensor:
    """Torch twin of ``fused_lora_linear``: one shrink per depth, one expand per slice."""
    y = x @ weight.T
    if fused is None or sum(fused.ranks) == 0:
        return y
    if isinstance(depth, int):
        return y + _fused_delta(x, fused, depth)
    num_depths = fused.lora_a.shape[0]
    if torch.compiler.is_compiling():
        return y + masked_per_depth(depth, num_depths, lambda d: _fused_delta(x, fused, d))
    for d in range(num_depths):
        rows = (depth == d).nonzero().squeeze(1)
        if rows.numel():
            delta = _fused_delta(x.index_select(0, rows), fused, d)
            y = y.index_put_((rows,), delta, accumulate=True)
    return y


def fused_lora_linear(
    x: torch.Tensor, weight: torch.Tensor, fused: FusedLoRA | None, depth: torch.Tensor | int
) -> torch.Tensor:
    """Fused projection ``x [W_q|W_k|W_v]ᵀ`` plus each slice's own per-depth delta.

    weight: [Σout, in], the slices' weights concatenated along out (as ``out_sizes``).
    """
    if fused is not None and weight.shape[0] != sum(fused.out_sizes):
        raise ValueError(f"weight out {weight.shape[0]} != Σ out_sizes {sum(fused.out_sizes)}")
    _check_int_depth(depth, None if fused is None else fused.lora_a)
    if kernel_backend(x) == "torch":
        return fused_lora_linear_ref(x, weight, fused, depth)
    from loopserve_kernels.lora_linear_triton import lora_matmul

    if fused is None:
        return lora_matmul(x, weight, None, None, depth)
    slices = (fused.out_sizes, fused.ranks)
    return lora_matmul(x, weight, fused.lora_a, fused.lora_b, depth, out_slices=slices)
