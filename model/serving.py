"""Inference-time transforms of a loaded model (the checkpoint stays as it is).

Applied once at load, in this order:

1. ``materialise_high_rank``: at high rank the low-rank path (shrink + expand on top of the
   shared GEMM) costs more than a plain per-depth weight — the exact default model is full rank,
   where ``W + B_p A_p`` *is* the original layer. Such modules get one dense weight per position
   and run a grouped matmul over depth segments; the shared weight and factors they replace are
   freed, so the exact default holds the original's weights once, not 2.4 times.
2. ``fuse_projections``: q|k|v and gate|up read the same input; concatenated along their outputs
   they run as one matmul each (7 → 4 per layer), which a small decode batch turns into fewer,
   better-shaped GEMMs. The separate weights are freed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kernels import (
    FusedLoRA,
    dense_per_depth_linear,
    fuse_lora,
    fused_lora_linear,
    materialise_dense,
    prefer_dense,
)
from model.recursive import GATE_UP, KV, QKV, RecursiveLM

FUSED_GROUPS: tuple[tuple[str, ...], ...] = (QKV, GATE_UP)


def _free(param: nn.Parameter) -> None:
    """Drop a parameter's storage in place (its name stays, so the module's layout does)."""
    param.data = param.data.new_empty(0)


@torch.no_grad()
def materialise_high_rank(model: RecursiveLM, force: bool | None = None) -> list[str]:
    """Switch modules whose rank makes dense cheaper to per-position dense weights.

    ``force`` True/False overrides the shape-based rule (for benchmarks). Returns the modules
    switched; their shared weights and LoRA factors are freed (not changed in the checkpoint).
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
        for p in (w, a, b):
            _free(p)
        switched.append(m)
    return switched


@dataclass
class FusedProjection:
    """Modules that read one input, run as one matmul: per-depth dense weights
    ``[K, D, Σout, in]``, or a shared weight ``[K, Σout, in]`` plus per-layer fused LoRA."""

    modules: tuple[str, ...]
    sizes: tuple[int, ...]
    dense: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    lora: list[FusedLoRA] | None = None

    def __call__(self, layer: int, x: torch.Tensor, depth: torch.Tensor | int) -> torch.Tensor:
        if self.dense is not None:
            return dense_per_depth_linear(x, self.dense[layer], depth)
        assert self.weight is not None
        return fused_lora_linear(
            x, self.weight[layer], self.lora[layer] if self.lora else None, depth
        )

    def tail(self, n: int) -> FusedProjection:
        """The last ``n`` modules as views of the same storage (k|v out of q|k|v, for fills)."""
        skip = sum(self.sizes[:-n])
        if self.dense is not None:
            return FusedProjection(
                self.modules[-n:], self.sizes[-n:], dense=self.dense[:, :, skip:]
            )
        assert self.weight is not None
        lora = None
        if self.lora:
            r = sum(self.lora[0].ranks[:-n])
            lora = [
                FusedLoRA(f.lora_a[:, r:], f.lora_b[:, skip:, r:], f.out_sizes[-n:], f.ranks[-n:])
                for f in self.lora
            ]
        return FusedProjection(
            self.modules[-n:], self.sizes[-n:], weight=self.weight[:, skip:], lora=lora
        )


@torch.no_grad()
def fuse_projections(model: RecursiveLM) -> list[tuple[str, ...]]:
    """Fuse each group whose modules are all dense, or all shared weight + LoRA; returns the
    groups fused. Call after ``materialise_high_rank``."""
    fused = []
    arch, layers, loops = model.config.arch, model.config.block_layers, model.config.loops
    for group in FUSED_GROUPS:
        sizes = tuple(arch.linear_shape(m)[0] for m in group)
        kinds = {m in model.dense for m in group}
        if len(kinds) != 1:
            continue
        if kinds == {True}:
            proj = FusedProjection(
                group, sizes, dense=torch.cat([model.dense.pop(m) for m in group], 2)
            )
        else:
            weight = torch.cat([model.weights[m] for m in group], 1)
            lora = None
            if any(m in model.lora_a for m in group):
                in_f = arch.linear_shape(group[0])[1]
                empty_a = weight.new_zeros(loops, 0, in_f)
                lora = [
                    fuse_lora(
                        [model.lora_a[m][k] if m in model.lora_a else empty_a for m in group],
                        [
                            model.lora_b[m][k]
                            if m in model.lora_b
                            else weight.new_zeros(loops, s, 0)
                            for m, s in zip(group, sizes, strict=True)
                        ],
                    )
                    for k in range(layers)
                ]
                for m in group:
                    if m in model.lora_a:
                        _free(model.lora_a[m])
                        _free(model.lora_b[m])
            for m in group:
                _free(model.weights[m])
            proj = FusedProjection(group, sizes, weight=weight, lora=lora)
        model.fused[group] = proj
        if group == QKV:
            model.fused[KV] = proj.tail(len(KV))  # views: fills project K/V alone
        fused.append(group)
    return fused


def prepare_for_serving(model: RecursiveLM) -> tuple[list[str], list[tuple[str, ...]]]:
    """Both transforms, as the engine serves a model: (modules made dense, groups fused)."""
    return materialise_high_rank(model), fuse_projections(model)
