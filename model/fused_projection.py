"""Projections that read one input, run as one matmul (q|k|v, gate|up, or a lone module):
per-depth dense weights, or a shared weight plus low-rank deltas, packed for the CPU GEMM or
not. ``model.serving`` builds them at load; the block layer (Python or the one-call C++ layer)
runs them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loopserve_kernels import (
    FusedLoRA,
    PackedWeight,
    cpu_kernel_available,
    cpu_kernel_mode,
    dense_per_depth_linear,
    fused_lora_linear,
    low_rank_delta_cpu,
)
from loopserve_kernels.lora_linear import depth_segments


@dataclass(frozen=True)
class PackedDelta:
    """One (layer, depth)'s fused LoRA factors packed for the CPU GEMM: the stacked shrink
    ``A [Σr, in]`` and one expand per slice ``B_s [out_s, r_s]`` (None where r_s = 0), the
    twin's GEMMs in the twin's order, so the sums are its own."""

    shrink: PackedWeight
    expands: list[PackedWeight | None]
    out_sizes: tuple[int, ...]
    ranks: tuple[int, ...]

    @staticmethod
    def pack(f: FusedLoRA, d: int) -> PackedDelta:
        expands: list[PackedWeight | None] = []
        row = col = 0
        for out, r in zip(f.out_sizes, f.ranks, strict=True):
            b = f.lora_b[d, row : row + out, col : col + r]
            expands.append(PackedWeight.pack(b) if r else None)
            row, col = row + out, col + r
        return PackedDelta(PackedWeight.pack(f.lora_a[d]), expands, f.out_sizes, f.ranks)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t = self.shrink(x)
        parts, col = [], 0
        for b, out, r in zip(self.expands, self.out_sizes, self.ranks, strict=True):
            parts.append(x.new_zeros((x.shape[0], out)) if b is None else b(t[:, col : col + r]))
            col += r
        return torch.cat(parts, dim=1)

    def factors(self) -> list[torch.Tensor | None]:
        """The shrink then each slice's expand, as ``decode_layer`` reads them."""
        return [self.shrink.packed] + [None if b is None else b.packed for b in self.expands]


@dataclass(frozen=True)
class TransposedDelta:
    """One (layer, depth)'s fused LoRA factors, float32, for the C++ low-rank GEMM: the stacked
    shrink transposed ``Aᵀ [in, Σr]`` and each slice's ``B_sᵀ [r_s, out_s]`` (None where
    r_s = 0). At a step's few rows a depth's shrink and expands are oneDNN's per-call floor
    (~20 us each, 33 calls a layer at three depths); the C++ layer runs every depth's in one
    parallel region, and this twin the same per-element sums, so both give the same bits."""

    shrink: torch.Tensor
    expands: list[torch.Tensor | None]
    out_sizes: tuple[int, ...]
    ranks: tuple[int, ...]

    @staticmethod
    def build(f: FusedLoRA, d: int) -> TransposedDelta:
        expands: list[torch.Tensor | None] = []
        row = col = 0
        for out, r in zip(f.out_sizes, f.ranks, strict=True):
            b = f.lora_b[d, row : row + out, col : col + r]
            expands.append(b.t().contiguous() if r else None)
            row, col = row + out, col + r
        return TransposedDelta(f.lora_a[d].t().contiguous(), expands, f.out_sizes, f.ranks)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mode = cpu_kernel_mode(x)
        if mode == "require" or (mode == "prefer" and cpu_kernel_available()):
            return low_rank_delta_cpu(x, self.shrink, self.expands, self.out_sizes, self.ranks)
        t = x @ self.shrink
        parts, col = [], 0
        for b, out, r in zip(self.expands, self.out_sizes, self.ranks, strict=True):
            parts.append(x.new_zeros((x.shape[0], out)) if b is None else t[:, col : col + r] @ b)
            col += r
        return torch.cat(parts, dim=1)

    def factors(self) -> list[torch.Tensor | None]:
        return [self.shrink, *self.expands]


Delta = PackedDelta | TransposedDelta


def _add_packed_deltas(
    y: torch.Tensor, x: torch.Tensor, deltas: list[Delta], depth: torch.Tensor | int
) -> torch.Tensor:
    """``add_fused_lora`` over packed factors: each row's own depth's delta onto ``y``."""
    if isinstance(depth, int):
        return y + deltas[depth](x)
    segments = depth_segments(depth, len(deltas))
    if segments is not None:
        for d, start, stop in segments:
            y[start:stop] += deltas[d](x[start:stop])
        return y
    for d, delta in enumerate(deltas):
        rows = (depth == d).nonzero().squeeze(1)
        if rows.numel():
            y.index_put_((rows,), delta(x.index_select(0, rows)), accumulate=True)
    return y


@dataclass
class FusedProjection:
    """Modules that read one input, run as one matmul: per-depth dense weights
    ``[K, D, Σout, in]``, or a shared weight ``[K, Σout, in]`` plus per-layer fused LoRA. On
    the bf16 CPU path the shared weight is ``packed`` instead (one per layer) and ``skip``
    leading output columns of its GEMM are dropped (k|v out of q|k|v, for fills)."""

    modules: tuple[str, ...]
    sizes: tuple[int, ...]
    dense: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    lora: list[FusedLoRA] | None = None
    packed: list[PackedWeight] | None = None
    packed_lora: list[list[Delta]] | None = None  # [layer][depth], beside ``packed``
    skip: int = 0

    @property
    def per_depth(self) -> bool:
        return self.dense is not None

    def __call__(self, layer: int, x: torch.Tensor, depth: torch.Tensor | int) -> torch.Tensor:
        if self.dense is not None:
            return dense_per_depth_linear(x, self.dense[layer], depth)
        if self.packed is not None:
            y = self.packed[layer](x)
            if self.packed_lora is not None:
                y = _add_packed_deltas(y, x, self.packed_lora[layer], depth)
            return y[:, self.skip :] if self.skip else y
        assert self.weight is not None
        lora = self.lora[layer] if self.lora else None
        return fused_lora_linear(x, self.weight[layer], lora, depth)

    def tail(self, n: int) -> FusedProjection:
        """The last ``n`` modules as views of the same storage (k|v out of q|k|v, for fills)."""
        skip = sum(self.sizes[:-n])
        if self.dense is not None:
            return FusedProjection(
                self.modules[-n:], self.sizes[-n:], dense=self.dense[:, :, skip:]
            )
        if self.packed is not None:  # the whole GEMM and its deltas, sliced
            return FusedProjection(
                self.modules[-n:],
                self.sizes[-n:],
                lora=self.lora,
                packed=self.packed,
                packed_lora=self.packed_lora,
                skip=self.skip + skip,
            )
        lora = None
        if self.lora:
            r = sum(self.lora[0].ranks[:-n])
            lora = [
                FusedLoRA(f.lora_a[:, r:], f.lora_b[:, skip:, r:], f.out_sizes[-n:], f.ranks[-n:])
                for f in self.lora
            ]
        assert self.weight is not None
        return FusedProjection(
            self.modules[-n:], self.sizes[-n:], weight=self.weight[:, skip:], lora=lora
        )
