"""Projections whose weights are packed once for oneDNN (``loopserve_kernels.packed_linear``): the
form ``model.serving.pack_weights`` leaves the bf16 CPU path's linear maps in, and what the
one-call decode layer (``model.fused_layer``) reads its weights from."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loopserve_kernels import PackedWeight


@dataclass
class PackedProjection:
    """Modules (one, or a fused group) whose weights are packed for oneDNN: one per (layer,
    depth) for dense per-depth weights, one per layer for a shared weight without deltas.
    ``skip`` leading output columns are dropped (k|v out of q|k|v, for fills)."""

    modules: tuple[str, ...]
    sizes: tuple[int, ...]
    weights: list[list[PackedWeight]]  # [layer][depth], or [layer][0] when shared
    skip: int = 0

    @property
    def per_depth(self) -> bool:
        return len(self.weights[0]) > 1

    def __call__(self, layer: int, x: torch.Tensor, depth: torch.Tensor | int) -> torch.Tensor:
        ws = self.weights[layer]
        if len(ws) == 1 or isinstance(depth, int):
            y = ws[0 if len(ws) == 1 else depth](x)
        else:  # as dense_per_depth_linear's twin: one GEMM per depth segment
            y = x.new_zeros((x.shape[0], ws[0].out_features))
            for d, w in enumerate(ws):
                rows = (depth == d).nonzero().squeeze(1)
                if rows.numel():
                    y.index_copy_(0, rows, w(x.index_select(0, rows)))
        return y[:, self.skip :] if self.skip else y

    def tail(self, n: int) -> PackedProjection:
        """The last ``n`` modules: the whole GEMM, sliced (a packed weight has no views)."""
        skip = self.skip + sum(self.sizes[:-n])
        return PackedProjection(self.modules[-n:], self.sizes[-n:], self.weights, skip)


def pack_stack(weights: torch.Tensor) -> list[list[PackedWeight]]:
    """[K, out, in] shared or [K, D, out, in] per-depth weights -> packed [layer][depth]."""
    if weights.dim() == 3:
        return [[PackedWeight.pack(w)] for w in weights]
    return [[PackedWeight.pack(w) for w in per_layer] for per_layer in weights]
